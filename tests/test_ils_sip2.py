"""The circulation interface over SIP2 (storage/ils_sip2.py) against the replay server: cards and
PINs, loans, renewals that never happen twice, holds, availability, link alerts, the notice cycle's
loans at a bounded rate, and ``librarybot sip2 check``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.i18n import t
from bot.settings import Settings
from storage.catalog import Item, Record
from storage.db import Database
from storage.ils import CirculationService, CirculationUnavailable, HoldRefused, RenewalRefused
from storage.ils_sip2 import PLACEHOLDER_PIN_HASH, Sip2Circulation, forget_person, sip2_config
from storage.notices import run_notice_cycle
from storage.outbox import Delivery
from storage.people import LoginLock, LoginOutcome, Reader, User, login, pin_matches
from storage.policy import Policy
from storage.sip2 import protocol as p
from storage.sip2.client import Sip2Config
from storage.sip2.replay import SYNTHETIC_PIN, ReplayServer, default_exchanges_path
from storage.state import PersistedState

ROOT = Path(__file__).resolve().parents[1]
EXCHANGES = default_exchanges_path()

STAFF_CHAT = -100777
PERL = "1565921879"  # on loan to djfiander in the recordings, due 2026-12-10
DUE = dt.date(2026, 12, 10)
RECORDED_AT = dt.datetime(2026, 11, 26, 5, 29, 10)  # the server's local time in the recordings


def at_recording() -> dt.datetime:
    """The bot's clock (UTC) for these tests: when the exchanges were recorded, whatever today is."""
    return RECORDED_AT.replace(tzinfo=dt.UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(port: int, **overrides: Any) -> Sip2Config:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "user": "scclient", "password": "clientpwd", "institution": "UWOLS",
        "location": "lib", "timeout": 0.5, "heartbeat_seconds": 0, "pool_size": 4,
    }
    return Sip2Config(**{**values, **overrides})


def on_loan_recordings(folder: Path) -> Path:
    """The recordings as the server answered after the checkout of 1565921879 to djfiander: without
    the item information answers from before the checkout and after the checkin (the replay server
    has no state; this gives it the one the loan, renewal and hold exchanges were recorded in)."""
    before_or_after = {"[main] 17 item info (available)", "[after] 17 item info 1565921879 after crashes"}
    data = json.loads(EXCHANGES.read_text(encoding="utf-8"))
    data["exchanges"] = [e for e in data["exchanges"] if e.get("label") not in before_or_after]
    path = folder / "sip2-on-loan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ReplayServer]:
    srv = ReplayServer(on_loan_recordings(tmp_path), clock=lambda: RECORDED_AT)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def sip2(db: Database, server: ReplayServer) -> AsyncIterator[Sip2Circulation]:
    service = Sip2Circulation(db, Policy(), config(server.port), staff_chat_id=STAFF_CHAT, rate=1000, clock=at_recording)
    yield service
    await service.close()


async def linked(db: Database, service: Sip2Circulation, telegram_id: int, card: str, pin: str) -> int:
    """Log the card in through the service (which makes its local row) and link a Telegram user."""
    assert (await service.check_card(card, pin)).valid
    async with db.session() as s:
        reader = await s.scalar(select(Reader).where(Reader.card_number == card))
        assert reader is not None
        s.add(User(telegram_id=telegram_id, first_name=card, reader_id=reader.id))
        return reader.id


async def catalogue_copy(db: Database, barcode: str, title: str, **fields: Any) -> int:
    async with db.session() as s:
        record = Record(control_number=f"ctl-{barcode}", title=title, isbns=[])
        s.add(record)
        await s.flush()
        s.add(Item(barcode=barcode, record_id=record.id, **fields))
        return record.id


async def alerts(db: Database) -> list[str]:
    async with db.session() as s:
        return list(await s.scalars(select(Delivery.text_key).where(Delivery.chat_id == STAFF_CHAT).order_by(Delivery.id)))


def test_it_is_a_circulation_service(db: Database) -> None:
    service = Sip2Circulation(db, Policy(), config(6001))
    assert isinstance(service, CirculationService)


async def test_card_and_pin_are_checked_by_the_system(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    check = await sip2.check_card(" djfiander ", "6789")
    assert check.valid and check.name == "David J. Fiander" and not check.expired and not check.blocked
    async with db.session() as s:
        reader = await s.scalar(select(Reader).where(Reader.card_number == "djfiander"))
        assert reader is not None and reader.name == "David J. Fiander"
        assert reader.expires_on == dt.date(2050, 12, 31)  # PA, the expiry extension
        assert reader.pin_hash == PLACEHOLDER_PIN_HASH and not pin_matches(reader.pin_hash, "6789")
        reader.name = "stale"
    assert (await sip2.check_card("djfiander", "6789")).valid  # a second login refreshes the row
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Reader)) == 1
        assert await s.scalar(select(Reader.name)) == "David J. Fiander"

    assert not (await sip2.check_card("djfiander", "wrong")).valid  # CQ N
    assert not (await sip2.check_card("nobody", "0000")).valid  # BL N
    asked = server.count("63")
    assert not (await sip2.check_card("dj|fiander", "6789")).valid  # never sent: it would forge a field
    assert not (await sip2.check_card("djfiander", "67\r89")).valid
    async with db.session() as s:  # a card locked by failed logins is not asked about
        s.add(LoginLock(key="card:miker", failures=5, locked_until=sip2.clock() + dt.timedelta(minutes=5)))

    async def ask() -> bool:
        return (await sip2.check_card("miker", "6789")).valid

    async with db.session() as s:  # people.login counts the attempt first and asks only when it may
        assert (await login(s, 9, "miker", "6789", sip2.clock(), verify=ask)).outcome is LoginOutcome.LOCKED
    assert server.count("63") == asked


async def test_loans_come_from_the_system(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    [loan] = await sip2.loans(reader_id)  # the server lists the loan twice; it is one loan
    assert loan.barcode == PERL and loan.title == "Perl 5 desktop reference"
    assert loan.due_at.astimezone(sip2.tz).date() == DUE and loan.due_at.tzinfo is not None
    assert loan.renewable and loan.renewals == 0 and loan.max_renewals is None
    assert server.count("17") == 1

    many = await linked(db, sip2, 2, "reader30", SYNTHETIC_PIN)
    loans = await sip2.loans(many)
    assert len(loans) == 30 and loans[0].title.startswith("Synthetic title")
    assert await sip2.loans(424242) == []  # no such card row


async def test_a_renewal_is_sent_once_per_button(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    done = await sip2.renew(reader_id, PERL, expected_renewals=0)
    assert done.ok and done.title == "Perl 5 desktop reference" and done.new_due_at is not None
    assert done.new_due_at.astimezone(sip2.tz).date() == DUE
    again = await sip2.renew(reader_id, PERL, expected_renewals=0)  # the same button, pressed twice
    assert not again.ok and again.reason == RenewalRefused.ALREADY_RENEWED
    assert again.new_due_at == done.new_due_at and again.title == done.title
    assert server.count("29") == 1
    [loan] = await sip2.loans(reader_id)
    assert loan.renewals == 1  # the renewals made through the bot: the next list's button carries it
    assert (await sip2.renew(reader_id, PERL, expected_renewals=1)).ok
    assert server.count("29") == 2

    # Two presses of one button at the same moment: one 29.
    first, second = await asyncio.gather(
        sip2.renew(reader_id, PERL, expected_renewals=2), sip2.renew(reader_id, PERL, expected_renewals=2)
    )
    assert sorted([first.ok, second.ok]) == [False, True] and server.count("29") == 3


async def test_a_refusal_says_why_and_can_be_tried_again(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    refused = await sip2.renew(reader_id, "0440242746", expected_renewals=0)
    assert not refused.ok and refused.reason == RenewalRefused.NOT_ON_LOAN and refused.title == ""
    assert refused.message == "Item not checked out to David J. Fiander"
    assert not (await sip2.renew(reader_id, "0440242746", expected_renewals=0)).ok
    assert server.count("29") == 2  # a refusal keeps no note: pressing again asks again
    bad = await sip2.renew(reader_id, "A|B")
    assert bad.reason == RenewalRefused.NOT_ON_LOAN and server.count("29") == 2

    # Other readers waiting for the book: the system's hold queue (CF) explains the refusal.
    server.respond_next_with("300NUN20261126    052910AAdjfiander|AB1565921879|AJPerl 5 desktop reference|AH|"
                             "AOUWOLS|AFRenewal limit|")
    server.respond_next_with("64  Y           00020261126    052910000000000002000100000000AOUWOLS|AAdjfiander|"
                             "AEDavid J. Fiander|AU1565921879|BLY|")
    server.respond_next_with("1804020120261126    052910CF2|AB1565921879|AJPerl 5 desktop reference|"
                             "AH20261210    052910|")
    held = await sip2.renew(reader_id, PERL, expected_renewals=0)
    assert not held.ok and held.reason == RenewalRefused.ON_HOLD and held.title == "Perl 5 desktop reference"
    assert held.message == "Renewal limit"
    # The same, with the card blocked (charge privileges denied in the patron status).
    server.respond_next_with("300NUN20261126    052910AAdjfiander|AB1565921879|AJ|AH|AOUWOLS|")
    server.respond_next_with("64Y             00020261126    052910000000000002000100000000AOUWOLS|AAdjfiander|"
                             "AEDavid J. Fiander|AU1565921879|BLY|")
    blocked = await sip2.renew(reader_id, PERL, expected_renewals=0)
    assert blocked.reason == RenewalRefused.CARD_BLOCKED and blocked.message is None
    [loan] = await sip2.loans(reader_id)
    assert loan.renewals == 0 and loan.renewable


async def test_a_renewal_whose_fate_is_unknown_is_never_sent_again(
    db: Database, sip2: Sip2Circulation, server: ReplayServer
) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    server.respond_next_with(None, close=True)  # reads the 29, then hangs up without an answer
    with pytest.raises(CirculationUnavailable):
        await sip2.renew(reader_id, PERL, expected_renewals=0)
    assert server.count("29") == 1
    again = await sip2.renew(reader_id, PERL, expected_renewals=0)
    assert again.reason == RenewalRefused.ALREADY_RENEWED and again.new_due_at is not None
    assert server.count("29") == 1
    [loan] = await sip2.loans(reader_id)
    assert loan.renewals == 1  # a fresh list gives a button that may renew it


async def test_renew_all(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    listed = sip2.clock()
    [outcome] = await sip2.renew_all(reader_id, listed_at=listed)  # one 65; the server names the loan twice
    assert outcome.ok and outcome.title == "Perl 5 desktop reference"
    assert outcome.new_due_at is not None and outcome.new_due_at.astimezone(sip2.tz).date() == DUE
    [twice] = await sip2.renew_all(reader_id, listed_at=listed)  # Renew all pressed again
    assert twice.reason == RenewalRefused.ALREADY_RENEWED
    assert server.count("65") == 1 and server.count("29") == 0
    [loan] = await sip2.loans(reader_id)
    assert loan.renewals == 1

    # Renewed one by one after the list was shown: Renew all from that list renews nothing twice.
    later = sip2.clock() + dt.timedelta(seconds=1)
    sip2.clock = lambda: later + dt.timedelta(seconds=5)
    assert (await sip2.renew(reader_id, PERL, expected_renewals=1)).ok
    [old_list] = await sip2.renew_all(reader_id, listed_at=later)
    assert old_list.reason == RenewalRefused.ALREADY_RENEWED and server.count("65") == 1
    assert [o.ok for o in await sip2.renew_all(reader_id)] == [True]  # /renew all: one more 65
    assert server.count("65") == 2


async def test_renew_all_whose_fate_is_unknown(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    listed = sip2.clock()
    server.respond_next_with(None, close=True)
    with pytest.raises(CirculationUnavailable):
        await sip2.renew_all(reader_id, listed_at=listed)
    [outcome] = await sip2.renew_all(reader_id, listed_at=listed)
    assert outcome.reason == RenewalRefused.ALREADY_RENEWED and outcome.new_due_at is not None
    assert server.count("65") == 1 and server.count("29") == 0


async def test_holds_placed_listed_and_cancelled(db: Database, sip2: Sip2Circulation, server: ReplayServer) -> None:
    reader_id = await linked(db, sip2, 1, "miker", "6789")
    record = await catalogue_copy(db, PERL, "Perl 5 desktop reference")
    placed = await sip2.place_hold(reader_id, record, pickup_branch="east")
    assert placed.ok and placed.position == 1 and placed.hold_id == PERL and placed.title == "Perl 5 desktop reference"
    sent = [r for r in server.received if r.startswith("15")][-1]
    assert "BSeast|" in sent and "|BY2|" in sent and f"|AB{PERL}|" in sent and "|AAmiker|" in sent

    [hold] = await sip2.holds(reader_id)  # the recorded server lists the hold as "HASH(0x…)"
    assert hold.hold_id.startswith("HASH(") and hold.title == hold.hold_id and hold.status == "waiting"
    assert await sip2.cancel_hold(reader_id, hold.hold_id)
    assert [r for r in server.received if r.startswith("15")][-1].startswith("15-")
    cancels = server.count("15")
    assert not await sip2.cancel_hold(reader_id, "not-my-hold")  # not listed: nothing is sent
    assert not await sip2.cancel_hold(reader_id, "a|b")
    assert server.count("15") == cancels

    assert (await sip2.place_hold(reader_id, 424242)).refused == HoldRefused.UNKNOWN_RECORD
    async with db.session() as s:
        bare = Record(control_number="ctl-bare", title="No copy at all", isbns=[])
        s.add(bare)
        await s.flush()
    assert (await sip2.place_hold(reader_id, bare.id)).refused == HoldRefused.NOT_HOLDABLE

    server.respond_next_with("160N20261126    052910AAmiker|AB1565921879|AJPerl 5 desktop reference|AOUWOLS|"
                             "AFHold not allowed|")
    refused = await sip2.place_hold(reader_id, record)
    assert not refused.ok and refused.refused is None and refused.message == "Hold not allowed"


async def test_availability_is_the_systems(db: Database, sip2: Sip2Circulation) -> None:
    perl = await catalogue_copy(db, PERL, "Perl 5 desktop reference", status="available", location="2F")
    unknown = await catalogue_copy(db, "0440242746", "Known only here", status="missing")
    shown = await sip2.availability([perl, unknown, 424242])
    [copy] = shown[perl].copies
    assert shown[perl].on_shelf == 0 and copy.status == "on_loan"  # the system says it is lent out
    assert copy.due_at is not None and copy.due_at.astimezone(sip2.tz).date() == DUE and copy.location == "2F"
    assert shown[unknown].on_shelf == 0 and shown[unknown].copies[0].status == "missing"  # the catalogue's word
    assert 424242 not in shown and shown[perl].holdable
    assert await sip2.availability([]) == {}

    before_checkout = ReplayServer(EXCHANGES)  # the recordings from before the checkout: on the shelf
    await before_checkout.start()
    service = Sip2Circulation(db, Policy(), config(before_checkout.port))
    try:
        shelf = await service.availability([perl])
        assert shelf[perl].on_shelf == 1 and shelf[perl].copies[0].status == "available"
    finally:
        await service.close()
        await before_checkout.stop()


async def test_a_dead_system_is_told_once_and_its_return_too(db: Database, server: ReplayServer) -> None:
    port = server.port
    sip2 = Sip2Circulation(db, Policy(), config(port), staff_chat_id=STAFF_CHAT, probe_every=0.1)
    other = Sip2Circulation(db, Policy(), config(port), staff_chat_id=STAFF_CHAT, probe_every=60)  # another process
    try:
        reader_id = await linked(db, sip2, 1, "djfiander", "6789")
        await server.stop()
        for _ in range(2):
            with pytest.raises(CirculationUnavailable):
                await sip2.loans(reader_id)
        with pytest.raises(CirculationUnavailable):
            await other.loans(reader_id)
        assert await alerts(db) == ["sip2.link_down"]

        revived = ReplayServer(EXCHANGES, port=port)
        await revived.start()
        try:
            for _ in range(50):  # the probe notices without any reader asking
                if len(await alerts(db)) == 2:
                    break
                await asyncio.sleep(0.05)
            assert await alerts(db) == ["sip2.link_down", "sip2.link_up"]
            assert revived.count("99") >= 1
            assert len(await other.loans(reader_id)) == 1  # the other process learns it is up: no new alert
            assert await alerts(db) == ["sip2.link_down", "sip2.link_up"]
        finally:
            await revived.stop()
        with pytest.raises(CirculationUnavailable):  # a second outage is a new alert
            await other.loans(reader_id)
        assert await alerts(db) == ["sip2.link_down", "sip2.link_up", "sip2.link_down"]
        async with db.session() as s:
            keys = list(await s.scalars(select(Delivery.dedupe_key).where(Delivery.chat_id == STAFF_CHAT).order_by(Delivery.id)))
            down = await s.scalar(select(Delivery.params).where(Delivery.dedupe_key == "sip2:link-down:1"))
        assert keys == ["sip2:link-down:1", "sip2:link-up:1", "sip2:link-down:2"]
        assert down is not None and "127.0.0.1" in down["address"] and down["reason"]
        assert "clientpwd" not in str(down)
        for lang in ("zh", "en"):
            assert "127.0.0.1" in t(lang, "sip2.link_down", **down)
    finally:
        await sip2.close()
        await other.close()


async def test_a_silent_system_answers_within_the_timeout(db: Database) -> None:
    silent = ReplayServer(EXCHANGES, silent=True)
    await silent.start()
    sip2 = Sip2Circulation(db, Policy(), config(silent.port, timeout=0.3))
    try:
        with pytest.raises(CirculationUnavailable):
            await sip2.check_card("djfiander", "6789")
        assert silent.received[0].startswith("93") and len(silent.received) == 1  # asked once, then gave up
    finally:
        await sip2.close()
        await silent.stop()


async def test_the_notice_cycle_asks_the_system_at_a_bounded_rate(db: Database, server: ReplayServer) -> None:
    sip2 = Sip2Circulation(db, Policy(), config(server.port), rate=100, clock=at_recording)
    try:
        await linked(db, sip2, 1, "djfiander", "6789")
        many = await linked(db, sip2, 2, "reader30", SYNTHETIC_PIN)
        before = len(server.received)
        started = time.monotonic()
        day = DUE - dt.timedelta(days=3)  # the default reminder: three days ahead
        report = await run_notice_cycle(db, Policy(), day, sip2.tz, render=t, now=sip2.clock())
        elapsed = time.monotonic() - started  # a lower bound only: the rate is a ceiling
        asked = [r for r in server.received[before:] if r[:2] in ("63", "17")]
        assert len(asked) == 2 + 1 + 30  # a 63 per reader, a 17 per loan
        assert elapsed >= (len(asked) - 1) / 100 * 0.9
        assert report.digests_queued == 2 and report.due_soon == 31  # reader30's are due in 14 days too
        async with db.session() as s:
            digests = {d.chat_id: d for d in await s.scalars(select(Delivery).where(Delivery.text_key == "loans.digest"))}
        assert "Perl 5 desktop reference (1565921879)" in digests[1].params["body"]["en"]
        assert "Synthetic title 1 (READER30-001)" in digests[2].params["body"]["en"] and many
    finally:
        await sip2.close()
    # Closed: the cycle reads the local loans again (none here), and asks nobody.
    before = len(server.received)
    await run_notice_cycle(db, Policy(), DUE, sip2.tz, render=t)
    assert len(server.received) == before


async def test_forgetting_a_sip2_card(db: Database, sip2: Sip2Circulation) -> None:
    reader_id = await linked(db, sip2, 1, "djfiander", "6789")
    assert (await sip2.renew(reader_id, PERL)).ok
    async with db.session() as s:
        await forget_person(s, 1)
    async with db.session() as s:
        assert await s.get(Reader, reader_id) is None
        assert await s.scalar(select(func.count()).select_from(PersistedState).where(PersistedState.key.like(f"{reader_id}:%"))) == 0


def test_settings_name_the_sip2_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LIBRARYBOT_ILS": "SIP2", "LIBRARYBOT_SIP2_HOST": "ils.example.org", "LIBRARYBOT_SIP2_PORT": "6443",
        "LIBRARYBOT_SIP2_USER": "librarybot", "LIBRARYBOT_SIP2_PASSWORD": "s3cret", "LIBRARYBOT_SIP2_INSTITUTION": "MAIN",
        "LIBRARYBOT_SIP2_LOCATION": "bot", "LIBRARYBOT_SIP2_TLS": "true", "LIBRARYBOT_SIP2_ENCODING": "GB18030",
        "LIBRARYBOT_SIP2_ERROR_DETECTION": "false", "LIBRARYBOT_SIP2_RATE": "2.5",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.ils == "sip2" and settings.sip2_rate == 2.5
    c = sip2_config(settings)
    assert (c.host, c.port, c.user, c.password, c.institution, c.location) == (
        "ils.example.org", 6443, "librarybot", "s3cret", "MAIN", "bot")
    assert c.tls and c.encoding == "gb18030" and not c.error_detection and c.timeout == 5.0
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(c)
    monkeypatch.delenv("LIBRARYBOT_SIP2_HOST")
    with pytest.raises(ValueError, match="LIBRARYBOT_SIP2_HOST"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("LIBRARYBOT_ILS", "koha")
    with pytest.raises(ValueError, match="local or sip2"):
        Settings(_env_file=None)  # type: ignore[call-arg]


async def test_sip2_check_command(
    server: ReplayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot import cli

    env = {
        "LIBRARYBOT_SIP2_HOST": "127.0.0.1", "LIBRARYBOT_SIP2_PORT": str(server.port), "LIBRARYBOT_SIP2_USER": "scclient",
        "LIBRARYBOT_SIP2_PASSWORD": "clientpwd", "LIBRARYBOT_SIP2_INSTITUTION": "UWOLS", "LIBRARYBOT_SIP2_LOCATION": "lib",
        "LIBRARYBOT_SIP2_TIMEOUT": "1",
    }
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    async def check() -> str:
        """``librarybot sip2 check`` in a thread (it runs its own event loop); the failure's line, if any."""
        try:
            assert await asyncio.to_thread(cli.cmd_sip2_check, argparse.Namespace()) == 0
            return ""
        except cli.CliError as exc:
            return str(exc)

    assert await check() == ""
    out = capsys.readouterr().out
    assert "Login / 登录:" in out and "[x] renew / 续借" in out and "clientpwd" not in out

    monkeypatch.setenv("LIBRARYBOT_SIP2_PORT", str(free_port()))
    reason = await check()
    assert "FAILED / 失败" in capsys.readouterr().out
    assert reason.startswith("SIP2 check failed: cannot connect to the library system") and "\n" not in reason

    monkeypatch.delenv("LIBRARYBOT_SIP2_HOST")
    assert "LIBRARYBOT_SIP2_HOST is not set" in await check()

    # As run from a shell: exit status 1, and one line on stderr saying why.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "sip2", "check",
        env={**base, **env, "LIBRARYBOT_SIP2_PASSWORD": "WRONG", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1 and "REFUSED / 被拒绝" in out_bytes.decode()
    [line] = err_bytes.decode().strip().splitlines()
    assert line.startswith("librarybot: SIP2 check failed:") and "refused the SIP2 login" in line
    assert "WRONG" not in line


async def test_renew_all_trusts_the_ok_flag_the_counts_and_the_readers_loans(
    db: Database, sip2: Sip2Circulation, server: ReplayServer
) -> None:
    """(#15) What the live Evergreen SIPServer sends in a 66: placeholders such as ARRAY(0x…) in the
    item lists of a refusal, which must never be shown as renewed nor get a renewal note."""
    reader = await linked(db, sip2, 701, "djfiander", "6789")
    stamp = p.format_timestamp(RECORDED_AT)

    server.respond_next_with(f"6600000000{stamp}AOUWOLS|BMARRAY(0x555d47525720)|BNARRAY(0x555d47602388)|"
                             "AFInvalid patron password.|")
    refused = await sip2.renew_all(reader)
    assert [(o.barcode, o.ok, o.message) for o in refused] == [("", False, "Invalid patron password.")]

    server.respond_next_with(f"6610001000{stamp}AOUWOLS|BMARRAY(0x1)|BM{PERL}|BNHASH(0x2)|")
    renewed = await sip2.renew_all(reader)
    assert [(o.barcode, o.ok) for o in renewed] == [(PERL, True)]

    server.respond_next_with(f"6610000000{stamp}AOUWOLS|BM{PERL}|AFNothing was renewed today|")
    counted = await sip2.renew_all(reader)  # the list names the loan, the count says none: the count wins
    assert [(o.barcode, o.ok, o.message) for o in counted] == [(PERL, False, "Nothing was renewed today")]

    for flag in ("0", "1"):  # a clean refusal with only the system's words is not "no loans"
        server.respond_next_with(f"66{flag}00000000{stamp}AOUWOLS|AFYour card has expired|")
        clean = await sip2.renew_all(reader)
        assert [(o.barcode, o.ok, o.message) for o in clean] == [("", False, "Your card has expired")]

    async with db.session() as s:
        notes = list(await s.scalars(select(PersistedState.key).where(PersistedState.kind == "sip2-renewal")))
    assert notes == [f"{reader}:0:{PERL}"]  # one note, for the real loan renewed once
