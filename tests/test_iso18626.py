"""ISO 18626 v1.2 on the wire, without Telegram: every message the library builds is valid against
the published schema (checked here with lxml, independently of the module's own check), what it
parses comes back unchanged, bad input is refused as BadlyFormedMessage, partners in the policy are
checked key by key, and the outgoing queue keeps each request's messages in order and backs off."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from storage import ill, ill_exchange
from storage import iso18626 as iso
from storage.db import Database
from storage.policy import Policy, PolicyError, load_policy
from tests.auxil.iso_partner import PartnerLibrary, assert_valid

NOW = dt.datetime(2026, 11, 20, 9, 30, tzinfo=dt.UTC)
LIBRARY = iso.AgencyId.parse("ISIL:CN-990000-L")
PARTNER = iso.AgencyId.parse("ISIL:CN-110000-A")


def header(request_id: str = "ILL-000042") -> iso.Header:
    return iso.Header(supplying=PARTNER, requesting=LIBRARY, requesting_request_id=request_id, timestamp=NOW)


def every_kind() -> list[iso.Message]:
    citation = iso.Citation(
        title="Annalen der Physik", title_of_component="Zur Elektrodynamik bewegter Körper", author_of_component="A. Einstein",
        volume="17", issue="10", pages="891-921", identifiers=[("ISSN", "0003-3804")], publisher="Wiley", publication_date="1905",
    )
    request = iso.Request(header(), citation, "Copy", need_before=dt.date(2026, 12, 24),
                          copyright_compliance="reader-declaration", note="PDF please", delivery_address="main")
    supplying = iso.SupplyingAgencyMessage(header(), "RequestResponse", "Unfilled", NOW, reason_unfilled="NotHeld", note="x")
    requesting = iso.RequestingAgencyMessage(header(), "ShippedReturn", note="by post")
    return [
        request, supplying, requesting,
        iso.confirm(request, NOW), iso.confirm(supplying, NOW), iso.confirm(requesting, NOW),
        iso.confirm(supplying, NOW, error=iso.InvalidMessage(iso.ErrorType.UNRECOGNISED_DATA_VALUE, "requestingAgencyRequestId")),
        iso.confirm(None, NOW, kind=iso.Kind.REQUESTING_AGENCY_MESSAGE,
                    error=iso.InvalidMessage(iso.ErrorType.BADLY_FORMED_MESSAGE, "bad")),
    ]


@pytest.mark.parametrize("message", every_kind(), ids=lambda m: m.kind.value)
def test_every_message_built_is_valid_and_reads_back(message: iso.Message) -> None:
    data = iso.to_xml(message)
    root = assert_valid(data)  # the schema, loaded by the test itself
    assert root.tag == "{http://illtransactions.org/2013/iso18626}ISO18626Message"
    assert root.get("{http://illtransactions.org/2013/iso18626}version") == "1.2"  # qualified, as the schema says
    again = iso.parse(data)
    assert again.kind == message.kind
    assert iso.to_xml(again) == data


def test_the_shipped_schema_is_the_published_one() -> None:
    xsd = Path(iso.SCHEMA_PATH).read_text(encoding="utf-8")
    assert 'targetNamespace="http://illtransactions.org/2013/iso18626"' in xsd
    assert 'attributeFormDefault="qualified"' in xsd and "Version 1.2 November 2017" in xsd


def test_a_value_outside_the_standard_is_never_built() -> None:
    wrong = iso.SupplyingAgencyMessage(header(), "RequestResponse", "Lent", NOW)
    with pytest.raises(ValueError, match="invalid ISO 18626"):
        iso.to_xml(wrong)


@pytest.mark.parametrize("data", [
    b"", b"not xml", b"<ISO18626Message/>",
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
    iso.to_xml(every_kind()[1]).replace(b' ill:version="1.2"', b""),
    iso.to_xml(every_kind()[1]).replace(b"<ill:status>Unfilled</ill:status>", b""),
    b"<x>" * 100_000,
])
def test_bad_input_is_badly_formed(data: bytes) -> None:
    with pytest.raises(iso.InvalidMessage) as refused:
        iso.parse(data)
    assert refused.value.error_type == iso.ErrorType.BADLY_FORMED_MESSAGE
    answer = iso.confirm(None, NOW, kind=refused.value.kind, error=refused.value)
    assert_valid(iso.to_xml(answer))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        iso.parse(data)
    except iso.InvalidMessage as refused:
        assert_valid(iso.to_xml(iso.confirm(None, NOW, kind=refused.kind, error=refused)))


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=200).filter(lambda s: "\x00" not in s))
def test_any_title_travels_unchanged(title: str) -> None:
    clean = "".join(ch for ch in title if ch in "\t\n\r" or (" " <= ch and ch not in "\ufffe\uffff"
                                                             and not 0xD800 <= ord(ch) <= 0xDFFF))
    clean = " ".join(clean.split())
    if not clean:
        return
    message = iso.Request(header(), iso.Citation(title=clean), "Loan")
    assert isinstance(parsed := iso.parse(iso.to_xml(message)), iso.Request)
    assert parsed.citation.title == clean


def test_a_partners_own_messages_are_read() -> None:
    partner = PartnerLibrary(str(PARTNER), str(LIBRARY))
    parsed = iso.parse(partner.supplying_message("ILL-000042", "Unfilled", reason="RequestResponse", unfilled="NotHeld"))
    assert isinstance(parsed, iso.SupplyingAgencyMessage)
    assert (parsed.status, parsed.reason_unfilled, parsed.header.supplying) == ("Unfilled", "NotHeld", PARTNER)
    asked = iso.parse(partner.request("DC-1", "Orientalism", isbn="9780394740676"))
    assert isinstance(asked, iso.Request)
    assert asked.citation.identifiers == [("ISBN", "9780394740676")] and asked.need_before == dt.date(2027, 1, 31)


def test_partners_in_the_policy_are_checked_key_by_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[ill.partners]]\nagency_id = "ISIL:CN-110000-A"\nname_zh = "东城区图书馆"\nname_en = "Dongcheng District Library"\n'
        'endpoint = "https://ill.partner.example/iso18626"\nauth_header = "Bearer x"\n'
        '[[ill.partners]]\nagency_id = "ISIL:CN-110000-B"\nname_zh = "西城"\nname_en = "Xicheng"\n'
        'endpoint = "http://127.0.0.1:9/iso18626"\n', encoding="utf-8")
    policy = load_policy(good)
    assert [p.agency_id for p in policy.ill.partners] == ["ISIL:CN-110000-A", "ISIL:CN-110000-B"]
    assert policy.ill.partner("ISIL:CN-110000-B") is not None and Policy().ill.partners == []
    for body, wrong in [
        ('agency_id = "CN-110000-A"\nname_zh = "a"\nname_en = "a"\nendpoint = "https://x/y"', "ill.partners.0.agency_id"),
        ('agency_id = "ISIL:A"\nname_zh = "a"\nname_en = "a"\nendpoint = "ftp://x/y"', "ill.partners.0.endpoint"),
        ('agency_id = "ISIL:A"\nname_zh = "a"\nendpoint = "https://x/y"', "ill.partners.0.name_en"),
        ('agency_id = "ISIL:A"\nname_zh = "a"\nname_en = "a"\nendpoint = "https://x/y"\nurl = "x"', "ill.partners.0.url"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text("[[ill.partners]]\n" + body + "\n", encoding="utf-8")
        with pytest.raises(PolicyError, match=wrong.replace(".", r"\.")):
            load_policy(bad)
    twice = tmp_path / "twice.toml"
    twice.write_text(('[[ill.partners]]\nagency_id = "ISIL:A"\nname_zh = "a"\nname_en = "a"\nendpoint = "https://x/y"\n') * 2)
    with pytest.raises(PolicyError, match="listed twice"):
        load_policy(twice)


def test_backoff_grows_and_stops_growing() -> None:
    waits = [ill_exchange.backoff(n) for n in range(1, 12)]
    assert waits[0] == dt.timedelta(seconds=30) and waits[1] == dt.timedelta(seconds=60)
    assert waits == sorted(waits) and waits[-1] == dt.timedelta(hours=1)


async def test_the_queue_keeps_each_requests_messages_in_order(db: Database) -> None:
    policy = Policy.model_validate({"ill": {"partners": [
        {"agency_id": str(PARTNER), "name_zh": "东城", "name_en": "Dongcheng", "endpoint": "http://127.0.0.1:9/iso18626"}]}})
    identity = ill_exchange.Identity(LIBRARY, policy)
    async with db.session() as s:
        for token in ("a", "b"):
            result = await ill.submit_request(
                s, {"kind": "loan", "title": f"Book {token}", "pickup_branch": "main"}, token=token, telegram_id=1,
                reader_id=None, now=NOW, policy=policy, today=NOW.date(), staff_chat_id=None,
            )
            assert result.request is not None
            sent = await ill_exchange.send_to_partners(s, result.request.id, actor=9, expected=ill.IllStatus.SUBMITTED,
                                                       identity=identity, now=NOW)
            assert sent.ok
        again = await ill_exchange.send_to_partners(s, 1, actor=9, expected=None, identity=identity, now=NOW)
        assert again.refusal == "stale"  # requested already: not sent twice
        assert await ill_exchange.ask_partner_to_cancel(s, 1, identity, NOW)
    async with db.session() as s:
        due = await ill_exchange.due_messages(s, NOW)
        # The first request's Cancel waits behind its request; the second request goes alongside.
        assert [(m.conversation.rsplit("|", 1)[1], m.summary) for m in due] == [("ILL-000001", "request"), ("ILL-000002", "request")]
        assert await ill_exchange.lease(s, due[0].id, NOW)
        assert not await ill_exchange.lease(s, due[0].id, NOW)  # one sender wins
        await ill_exchange.retry_later(s, due[0], "HTTP 503", NOW, identity)
    async with db.session() as s:
        assert [m.summary for m in await ill_exchange.due_messages(s, NOW)] == ["request"]  # only the second
        later = NOW + dt.timedelta(minutes=1)
        first = (await ill_exchange.due_messages(s, later))[0]
        assert first.conversation.endswith("ILL-000001") and first.attempts == 1
        await ill_exchange.mark_sent(s, first.id, later)
    async with db.session() as s:
        due = await ill_exchange.due_messages(s, NOW + dt.timedelta(minutes=1))
        assert [m.summary for m in due] == ["request", "Cancel"]  # oldest first
        for row in due:
            assert_valid(row.body.encode())


def test_xml_the_schema_refuses_is_refused_by_lxml_too() -> None:
    schema = etree.XMLSchema(etree.parse(str(iso.SCHEMA_PATH)))
    doc = etree.fromstring(iso.to_xml(every_kind()[0]))
    assert schema.validate(doc)
    doc[0].tag = "{http://illtransactions.org/2013/iso18626}requisition"
    assert not schema.validate(doc)


async def test_librarybot_stats_reports_each_partner(db: Database, tmp_path: Path) -> None:
    """``librarybot stats`` (the console script's code, run as a process) adds the per-partner figures."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        '[[ill.partners]]\nagency_id = "ISIL:CN-110000-A"\nname_zh = "东城区图书馆"\nname_en = "Dongcheng District Library"\n'
        'endpoint = "https://a.example/iso18626"\n', encoding="utf-8")
    policy = load_policy(policy_file)
    async with db.session() as s:
        for token, shipped in (("a", True), ("b", False)):
            made = await ill.submit_request(
                s, {"kind": "loan", "title": f"Book {token}", "pickup_branch": "main"}, token=token, telegram_id=1,
                reader_id=None, now=NOW, policy=policy, today=NOW.date(), staff_chat_id=None,
            )
            assert made.request is not None
            s.add(ill_exchange.PartnerAttempt(
                request_id=made.request.id, agency_id="ISIL:CN-110000-A", position=1, asked_at=NOW,
                state="shipped" if shipped else "declined", shipped_at=NOW + dt.timedelta(days=2) if shipped else None,
            ))
        s.add(ill_exchange.LendingRequest(agency_id="ISIL:CN-110000-A", their_request_id="DC-1", kind="loan",
                                          title="Lent", received_at=NOW, shipped_at=NOW + dt.timedelta(days=1),
                                          state="loaned"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    env |= {"LIBRARYBOT_DATABASE_URL": db.url, "LIBRARYBOT_POLICY_FILE": str(policy_file), "LIBRARYBOT_LANGUAGE": "en",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for fmt, expected in [
        ("text", "Dongcheng District Library (ISIL:CN-110000-A) — as borrower: 2 requests, fill rate 50% (1/2), "
                 "turnaround 2.0 days; as lender: 1 requests, fill rate 100% (1/1), turnaround 1.0 days"),
        ("csv", "partners,borrowed_fill_rate,ISIL:CN-110000-A,0.5000"),
    ]:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "bot.cli", "stats", "--format", fmt], capture_output=True, text=True,
            timeout=120, env=env, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
