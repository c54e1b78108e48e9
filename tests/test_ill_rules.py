"""Interlibrary loan rules: the state machine over every allowed and forbidden transition, the
checks on what readers type, submission (once per form), notices, ratings, duplicates, the holding
look-up, privacy and the demo data."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select
from stdnum import ean

from storage import ill
from storage.catalog import Item, Record
from storage.db import Database
from storage.ill import (
    CANCELLABLE,
    CLOSED,
    TRANSITIONS,
    Identifier,
    IllEvent,
    IllRequest,
    IllStatus,
    Invalid,
    RateOutcome,
    Refusal,
    check_transition,
)
from storage.outbox import Delivery
from storage.people import Reader, Role, User, add_staff
from storage.policy import Policy

S = IllStatus
NOW = dt.datetime(2026, 11, 10, 2, 0, tzinfo=dt.UTC)
TODAY = dt.date(2026, 11, 10)
READER_UID = 501
OTHER_UID = 502
STAFF_UID = 9001
OTHER_STAFF_UID = 9003
STAFF_CHAT = -100123
POLICY = Policy()

# The path from submission to every status (the shortest one).
PATH: dict[IllStatus, list[IllStatus]] = {
    S.SUBMITTED: [],
    S.IN_REVIEW: [S.IN_REVIEW],
    S.REQUESTED: [S.IN_REVIEW, S.REQUESTED],
    S.RECEIVED: [S.IN_REVIEW, S.REQUESTED, S.RECEIVED],
    S.AVAILABLE: [S.IN_REVIEW, S.REQUESTED, S.RECEIVED, S.AVAILABLE],
    S.COMPLETED: [S.IN_REVIEW, S.REQUESTED, S.RECEIVED, S.AVAILABLE, S.COMPLETED],
    S.UNFILLED: [S.UNFILLED],
    S.CANCELLED: [S.CANCELLED],
}


def loan_form(**extra: Any) -> dict[str, Any]:
    return {"kind": "loan", "title": "万历十五年", "author": "黄仁宇", "isbn": "9787108009821", "pickup_branch": "main", **extra}


def copy_form(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "copy", "title": "On the electrodynamics of moving bodies", "author": "Einstein",
        "journal": "Annalen der Physik", "volume": "17", "issue": "10", "pages": "891-921",
        "pickup_branch": "east", "copyright": True, **extra,
    }


async def setup_people(db: Database) -> int:
    async with db.session() as s:
        reader = Reader(card_number="C001", name="Wang Fang", pin_hash="x")
        s.add(reader)
        await s.flush()
        s.add(User(telegram_id=READER_UID, first_name="Fang", telegram_language="zh", reader_id=reader.id))
        s.add(User(telegram_id=OTHER_UID, first_name="Other", telegram_language="en"))
        await add_staff(s, STAFF_UID, Role.STAFF, "Li Na")
        await add_staff(s, OTHER_STAFF_UID, Role.STAFF, "Chen")
        return reader.id


async def submit(db: Database, form: dict[str, Any] | None = None, token: str = "t1", uid: int = READER_UID, reader_id: int | None = 1) -> IllRequest:
    async with db.session() as s:
        result = await ill.submit_request(
            s, form or loan_form(), token=token, telegram_id=uid, reader_id=reader_id, now=NOW,
            policy=POLICY, today=TODAY, staff_chat_id=STAFF_CHAT,
        )
        assert result.request is not None, result.missing
        return result.request


async def move(db: Database, request_id: int, target: IllStatus, **kw: Any) -> ill.MoveResult:
    args: dict[str, Any] = {"actor": STAFF_UID, "staff": True, "now": NOW, "policy": POLICY, "staff_chat_id": STAFF_CHAT}
    if target == S.REQUESTED:
        args["partner"] = "Peking University Library"
    if target == S.UNFILLED:
        args["reason"] = "not_available"
    args.update(kw)
    async with db.session() as s:
        return await ill.move_request(s, request_id, target, **args)


async def at_status(db: Database, status: IllStatus, token: str = "t1") -> IllRequest:
    request = await submit(db, token=token)
    for step in PATH[status]:
        kw = {"actor": READER_UID, "staff": False} if step == S.CANCELLED else {}
        result = await move(db, request.id, step, **kw)
        assert result.ok, (step, result.refusal)
    return request


async def deliveries(db: Database, chat_id: int | None = None) -> list[Delivery]:
    async with db.session() as s:
        query = select(Delivery).order_by(Delivery.id)
        if chat_id is not None:
            query = query.where(Delivery.chat_id == chat_id)
        return list(await s.scalars(query))


# -------------------------------------------------------------------------------------------------
# The state machine as a pure function: all 64 pairs


ALLOWED = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}


@pytest.mark.parametrize("current,target", list(itertools.product(IllStatus, IllStatus)))
def test_every_transition_is_allowed_or_refused_with_a_reason(current: IllStatus, target: IllStatus) -> None:
    refusal = check_transition(current, target)
    if (current, target) in ALLOWED:
        assert refusal is None
    elif current == target:
        assert refusal is Refusal.SAME
    elif current in CLOSED:
        assert refusal is Refusal.CLOSED
    elif target == S.CANCELLED:
        assert refusal is Refusal.TOO_LATE_TO_CANCEL
    else:
        assert refusal is Refusal.NOT_ALLOWED


def test_the_machine_is_the_one_in_the_specification() -> None:
    assert ALLOWED == {
        (S.SUBMITTED, S.IN_REVIEW), (S.IN_REVIEW, S.REQUESTED), (S.REQUESTED, S.RECEIVED),
        (S.RECEIVED, S.AVAILABLE), (S.AVAILABLE, S.COMPLETED),
        (S.SUBMITTED, S.UNFILLED), (S.IN_REVIEW, S.UNFILLED), (S.REQUESTED, S.UNFILLED),
        (S.SUBMITTED, S.CANCELLED), (S.IN_REVIEW, S.CANCELLED),
    }
    assert CANCELLABLE == {S.SUBMITTED, S.IN_REVIEW}
    assert ill.staff_next_steps(S.SUBMITTED) == [S.IN_REVIEW, S.UNFILLED]
    assert ill.staff_next_steps(S.COMPLETED) == []


# -------------------------------------------------------------------------------------------------
# The same over the store: every allowed move works and is recorded, every forbidden one changes nothing


@pytest.mark.parametrize("current,target", sorted(ALLOWED))
async def test_allowed_move_is_applied_recorded_and_notified(db: Database, current: IllStatus, target: IllStatus) -> None:
    await setup_people(db)
    request = await at_status(db, current)
    later = NOW + dt.timedelta(hours=5)
    result = await move(db, request.id, target, now=later, expected=current)
    assert result.ok and result.previous == current
    async with db.session() as s:
        row = await ill.get_request(s, request.id)
        events = await ill.history(s, request.id)
    assert row is not None and row.status == target
    assert (events[-1].from_status, events[-1].to_status, events[-1].actor, events[-1].at) == (current, target, STAFF_UID, later)
    assert events[0].from_status is None and events[0].to_status == S.SUBMITTED
    assert len(events) == len(PATH[current]) + 2
    if target == S.AVAILABLE:
        assert row.available_at == later
    if target in CLOSED:
        assert row.closed_at == later
    notices = [d.text_key for d in await deliveries(db, READER_UID)]
    expected = {
        S.AVAILABLE: "ill.notice_available_loan", S.UNFILLED: "ill.notice_unfilled_not_available",
    }.get(target, f"ill.notice_{target}")
    assert notices[-1] == expected


@pytest.mark.parametrize("current", list(IllStatus))
async def test_every_forbidden_move_is_refused_and_changes_nothing(db: Database, current: IllStatus) -> None:
    await setup_people(db)
    request = await at_status(db, current)
    before = len(await deliveries(db))
    forbidden = [target for target in IllStatus if (current, target) not in ALLOWED]
    assert forbidden
    for target in forbidden:
        result = await move(db, request.id, target)
        assert result.refusal is check_transition(current, target) and result.refusal is not None, target
        assert result.previous == current
    async with db.session() as s:
        row = await ill.get_request(s, request.id)
        events = await ill.history(s, request.id)
    assert row is not None and row.status == current
    assert len(events) == len(PATH[current]) + 1
    assert len(await deliveries(db)) == before


async def test_a_move_on_a_request_someone_just_closed_is_stale(db: Database) -> None:
    await setup_people(db)
    request = await at_status(db, S.REQUESTED)
    assert (await move(db, request.id, S.UNFILLED, expected=S.REQUESTED, actor=OTHER_STAFF_UID)).ok
    late = await move(db, request.id, S.RECEIVED, expected=S.REQUESTED)
    assert late.refusal is Refusal.STALE and late.previous == S.UNFILLED


async def test_requested_needs_a_partner_and_unfilled_a_known_reason(db: Database) -> None:
    await setup_people(db)
    request = await at_status(db, S.IN_REVIEW)
    assert (await move(db, request.id, S.REQUESTED, partner="   ")).refusal is Refusal.NEEDS_PARTNER
    assert (await move(db, request.id, S.UNFILLED, reason="because")).refusal is Refusal.NEEDS_REASON
    done = await move(db, request.id, S.REQUESTED, partner="  CALIS   文献传递 ")
    assert done.ok and done.request is not None and done.request.partner == "CALIS 文献传递"
    notice = (await deliveries(db, READER_UID))[-1]
    assert notice.params["partner"] == "CALIS 文献传递"


async def test_readers_may_only_cancel_their_own_request_before_it_is_requested(db: Database) -> None:
    reader_id = await setup_people(db)
    request = await at_status(db, S.IN_REVIEW)
    forged = await move(db, request.id, S.CANCELLED, actor=OTHER_UID, staff=False)
    assert forged.refusal is Refusal.NOT_YOURS and forged.request is None
    staff_move = await move(db, request.id, S.REQUESTED, actor=READER_UID, staff=False, reader_id=reader_id)
    assert staff_move.refusal is Refusal.STAFF_ONLY
    cancelled = await move(db, request.id, S.CANCELLED, actor=READER_UID, staff=False)
    assert cancelled.ok
    # The reader saw their own answer: no push to them; the staff chat and the handler are told.
    assert [d.text_key for d in await deliveries(db, READER_UID)] == ["ill.notice_in_review"]
    assert [d.text_key for d in await deliveries(db, STAFF_CHAT)][-1] == "ill.staff_cancelled"
    assert [d.text_key for d in await deliveries(db, STAFF_UID)] == ["ill.staff_cancelled"]


async def test_too_late_to_cancel_once_requested(db: Database) -> None:
    await setup_people(db)
    request = await at_status(db, S.REQUESTED)
    result = await move(db, request.id, S.CANCELLED, actor=READER_UID, staff=False)
    assert result.refusal is Refusal.TOO_LATE_TO_CANCEL


async def test_unknown_request(db: Database) -> None:
    assert (await move(db, 999, S.IN_REVIEW)).refusal is Refusal.NOT_FOUND


async def test_staff_cancelling_for_the_reader_notifies_the_reader(db: Database) -> None:
    await setup_people(db)
    request = await at_status(db, S.SUBMITTED)
    assert (await move(db, request.id, S.CANCELLED)).ok
    assert [d.text_key for d in await deliveries(db, READER_UID)] == ["ill.notice_cancelled"]


async def test_completion_asks_for_a_rating_once(db: Database) -> None:
    reader_id = await setup_people(db)
    request = await at_status(db, S.AVAILABLE)
    async with db.session() as s:
        assert await ill.rate_request(s, request.id, READER_UID, reader_id, 5, NOW) is RateOutcome.NOT_COMPLETED
    await move(db, request.id, S.COMPLETED)
    notice = (await deliveries(db, READER_UID))[-1]
    assert notice.text_key == "ill.notice_completed"
    assert [b[1] for b in notice.buttons[0]] == [f"illrt:{request.id}:{n}" for n in range(1, 6)]
    async with db.session() as s:
        assert await ill.rate_request(s, request.id, OTHER_UID, None, 1, NOW) is RateOutcome.NOT_YOURS
        assert await ill.rate_request(s, request.id, READER_UID, reader_id, 6, NOW) is RateOutcome.INVALID
        assert await ill.rate_request(s, request.id, READER_UID, reader_id, 4, NOW) is RateOutcome.OK
        assert await ill.rate_request(s, request.id, READER_UID, reader_id, 1, NOW) is RateOutcome.ALREADY
        assert await ill.rate_request(s, 999, READER_UID, reader_id, 1, NOW) is RateOutcome.NOT_FOUND
        row = await ill.get_request(s, request.id)
    assert row is not None and row.rating == 4


async def test_notices_are_not_queued_twice(db: Database) -> None:
    await setup_people(db)
    request = await at_status(db, S.SUBMITTED)
    await move(db, request.id, S.IN_REVIEW)
    async with db.session() as s:  # a repeat of the same notice (a retried update) is deduplicated
        row = await ill.get_request(s, request.id)
        assert row is not None
        await ill._notify(s, row, STAFF_UID, POLICY, STAFF_CHAT)
    assert [d.text_key for d in await deliveries(db, READER_UID)] == ["ill.notice_in_review"]


# -------------------------------------------------------------------------------------------------
# Submission


async def test_submit_once_per_form_and_alert_the_staff(db: Database) -> None:
    await setup_people(db)
    async with db.session() as s:
        await ill.set_watching(s, OTHER_STAFF_UID, True, NOW)
        await ill.set_watching(s, STAFF_UID, True, NOW)
        await ill.set_watching(s, STAFF_UID, False, NOW)
    first = await submit(db, token="form-a")
    again = await submit(db, token="form-a")
    assert again.id == first.id
    async with db.session() as s:
        count = len(list(await s.scalars(select(IllRequest))))
    assert count == 1
    alerts = await deliveries(db)
    assert {(d.chat_id, d.text_key) for d in alerts} == {
        (STAFF_CHAT, "ill.staff_new_loan"), (OTHER_STAFF_UID, "ill.staff_new_loan")
    }
    assert alerts[0].buttons == [[
        ["ill.btn_in_review", f"illmv:{first.id}:submitted:in_review"], ["ill.btn_unfilled", f"illun:{first.id}:submitted"],
    ]]
    assert "Wang Fang (C001)" in alerts[0].params["requester"]
    assert first.number == f"ILL-{first.id:06d}"


async def test_submit_refuses_an_incomplete_form(db: Database) -> None:
    await setup_people(db)
    async with db.session() as s:
        for form, missing in [
            ({}, ["kind"]),
            ({"kind": "book"}, ["kind"]),
            ({"kind": "loan"}, ["title", "pickup_branch"]),
            (copy_form(copyright=False, pages=""), ["pages", "copyright"]),
            (loan_form(pickup_branch="moon"), ["pickup_branch"]),
            (loan_form(need_before="2026-11-09"), ["need_before"]),
        ]:
            result = await ill.submit_request(
                s, form, token=f"x{len(missing)}{form.get('kind')}", telegram_id=READER_UID, reader_id=None,
                now=NOW, policy=POLICY, today=TODAY, staff_chat_id=None,
            )
            assert result.request is None and result.missing == missing, form
    assert await deliveries(db) == []


async def test_a_copy_carries_what_iso_18626_needs(db: Database) -> None:
    await setup_people(db)
    request = await submit(db, copy_form(issn="0003-3804", need_before="2026-12-01", note="for my thesis"))
    message = ill.iso18626_request(request, "CN-SAMPLE")
    assert message["ServiceInfo"] == {
        "RequestType": "New", "ServiceType": "Copy", "NeedBeforeDate": "2026-12-01",
        "CopyrightCompliance": "reader-declaration", "Note": "for my thesis",
    }
    biblio = message["BibliographicInfo"]
    assert biblio["Title"] == "Annalen der Physik" and biblio["TitleOfComponent"].startswith("On the electro")
    assert biblio["PagesRequested"] == "891-921" and biblio["BibliographicItemId"] == [
        {"BibliographicItemIdentifierCode": "ISSN", "BibliographicItemIdentifier": "0003-3804"}
    ]
    assert message["Header"]["RequestingAgencyRequestId"] == request.number
    assert request.copyright_accepted_at == NOW
    loan = await submit(db, token="t2")
    assert ill.iso18626_request(loan)["ServiceInfo"]["ServiceType"] == "Loan"
    assert loan.identifier == "ISBN 978-7-108-00982-1"


async def test_duplicates_of_the_readers_own_open_requests(db: Database) -> None:
    reader_id = await setup_people(db)
    first = await submit(db, token="a", reader_id=reader_id)
    async with db.session() as s:
        same_isbn = await ill.open_duplicates(s, loan_form(title="Another title"), READER_UID, reader_id)
        same_title = await ill.open_duplicates(s, {"kind": "loan", "title": " 万历 十五年 "}, READER_UID, reader_id)
        other_kind = await ill.open_duplicates(s, {"kind": "copy", "title": "万历十五年"}, READER_UID, reader_id)
        someone_else = await ill.open_duplicates(s, loan_form(), OTHER_UID, None)
    assert [r.id for r in same_isbn] == [first.id] and [r.id for r in same_title] == [first.id]
    assert other_kind == [] and someone_else == []
    await move(db, first.id, S.UNFILLED)
    async with db.session() as s:
        assert await ill.open_duplicates(s, loan_form(), READER_UID, reader_id) == []


async def test_queue_is_oldest_first_and_filterable(db: Database) -> None:
    await setup_people(db)
    a = await submit(db, token="a")
    b = await submit(db, token="b")
    await move(db, b.id, S.IN_REVIEW)
    c = await submit(db, token="c")
    await move(db, c.id, S.UNFILLED)
    async with db.session() as s:
        assert [r.id for r in await ill.open_queue(s)] == [a.id, b.id]
        assert [r.id for r in await ill.open_queue(s, S.IN_REVIEW)] == [b.id]
        assert [r.id for r in await ill.requests_of(s, READER_UID, None)] == [c.id, b.id, a.id]
        assert await ill.staff_names(s, [STAFF_UID, None]) == {STAFF_UID: "Li Na"}


# -------------------------------------------------------------------------------------------------
# What readers type


def test_identifiers() -> None:
    assert ill.parse_identifier("9787108009821") == Identifier("isbn", "9787108009821")
    assert ill.parse_identifier("ISBN 978-7-108-00982-1") == Identifier("isbn", "9787108009821")
    assert ill.parse_identifier("0-306-40615-2") == Identifier("isbn", "9780306406157")  # ISBN-10 → 13
    assert ill.parse_identifier("9787108009820") == Invalid("bad_check_digit", {"scheme": "ISBN"})
    assert ill.parse_identifier("0317-8471") == Identifier("issn", "0317-8471")
    assert ill.parse_identifier("ISSN 03178472") == Invalid("bad_check_digit", {"scheme": "ISSN"})
    assert ill.parse_identifier("10.1000/xyz123") == Identifier("doi", "10.1000/xyz123")
    assert ill.parse_identifier("https://doi.org/10.1038/nphys1170") == Identifier("doi", "10.1038/nphys1170")
    assert ill.parse_identifier("doi:10.1000/182") == Identifier("doi", "10.1000/182")
    assert ill.parse_identifier("doi: 11.1000/182") == Invalid("bad_doi")
    assert ill.parse_identifier("10.12/abc") == Invalid("bad_doi")
    assert ill.parse_identifier("97871080098") == Invalid("bad_identifier")
    assert ill.parse_identifier("ISBN 97871080098") == Invalid("bad_isbn")
    assert ill.parse_identifier("hello") == Invalid("bad_identifier")


@given(st.integers(min_value=0, max_value=10**9 - 1))
def test_every_valid_isbn_is_accepted_and_every_wrong_check_digit_named(body: int) -> None:
    stem = f"978{body:09d}"
    good = stem + ean.calc_check_digit(stem)
    assert ill.parse_identifier(good) == Identifier("isbn", good)
    bad = stem + str((int(good[-1]) + 1) % 10)
    assert ill.parse_identifier(bad) == Invalid("bad_check_digit", {"scheme": "ISBN"})


@given(st.text(max_size=60))
def test_parsers_never_crash(text: str) -> None:
    assert isinstance(ill.parse_identifier(text), Identifier | Invalid)
    assert isinstance(ill.parse_need_by(text, TODAY), dt.date | Invalid)
    assert isinstance(ill.parse_year(text, TODAY), str | Invalid)
    assert isinstance(ill.parse_pages(text), str | Invalid)
    for name in ill.LIMITS:
        assert isinstance(ill.clean_text(text, name), str | Invalid)


def test_needed_by_dates() -> None:
    assert ill.parse_need_by("2026-12-01", TODAY) == dt.date(2026, 12, 1)
    assert ill.parse_need_by("2026/12/1", TODAY) == dt.date(2026, 12, 1)
    assert ill.parse_need_by("2026年12月1日", TODAY) == dt.date(2026, 12, 1)
    assert ill.parse_need_by("2026-11-10", TODAY) == TODAY
    assert ill.parse_need_by("2026-02-30", TODAY) == Invalid("no_such_date", {"date": "2026-02-30"})
    assert ill.parse_need_by("2026-11-09", TODAY) == Invalid("date_in_past", {"today": "2026-11-10"})
    assert ill.parse_need_by("2035-01-01", TODAY) == Invalid("date_too_far")
    assert ill.parse_need_by("next week", TODAY) == Invalid("bad_date_format")


def test_years_pages_and_text_limits() -> None:
    assert ill.parse_year("1997", TODAY) == "1997" and ill.parse_year("1997年", TODAY) == "1997"
    assert ill.parse_year("2028", TODAY) == Invalid("bad_year", {"max": 2027})
    assert ill.parse_year("97", TODAY) == Invalid("bad_year", {"max": 2027})
    assert ill.parse_pages("pp. 45–67") == "45-67"
    assert ill.parse_pages("12, 14 - 20") == "12, 14-20"
    assert ill.parse_pages("xii-xv") == "xii-xv"
    assert ill.parse_pages("第45-67页") == "45-67"
    assert ill.parse_pages("some pages") == Invalid("bad_pages")
    assert ill.clean_text("x" * 5000, "title") == Invalid("too_long", {"limit": 500, "length": 5000})
    assert ill.clean_text("  A \t title\n\u200b ", "title") == "A title"
    assert ill.clean_text("   ", "title") == Invalid("empty")
    assert ill.clean_text("line one\n\n line  two ", "note") == "line one\n\nline two"
    assert ill.is_skip("跳过") and ill.is_skip(" - ") and not ill.is_skip("Skipper")
    assert ill.norm_title("The  Title: A-Story") == ill.norm_title("the title a story")


# -------------------------------------------------------------------------------------------------
# The library's own holdings, privacy, the demo


async def add_record(db: Database) -> int:
    """万历十五年 with two copies, one on the shelf; its ISBN indexed as the catalog does, when it does."""
    import storage.catalog as catalog

    async with db.session() as s:
        record = Record(control_number="001", title="万历十五年 / 黄仁宇著", author="黄仁宇", year="1997",
                        isbns=["9787108009821"], call_number="K248.3/1")
        s.add(record)
        await s.flush()
        s.add_all([Item(barcode="B1", record_id=record.id, status="available"),
                   Item(barcode="B2", record_id=record.id, status="on_loan")])
        if hasattr(catalog, "RecordIdentifier"):
            s.add(catalog.RecordIdentifier(record_id=record.id, kind="isbn", value="9787108009821"))
        return record.id


async def test_holding_without_the_catalogs_look_ups(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.catalog as catalog

    monkeypatch.delattr(catalog, "find_record", raising=False)
    monkeypatch.setitem(sys.modules, "storage.search", None)
    record_id = await add_record(db)
    async with db.session() as s:
        by_isbn = await ill.find_holding(s, isbn="9787108009821")
        by_title = await ill.find_holding(s, title="万历十五年", author="黄仁宇")
        wrong_author = await ill.find_holding(s, title="万历十五年", author="Somebody Else")
        nothing = await ill.find_holding(s, isbn="9780306406157", title="Unknown")
    assert by_isbn is not None and (by_isbn.copies, by_isbn.on_shelf, by_isbn.call_number) == (2, 1, "K248.3/1")
    assert by_isbn.record_id == record_id
    assert by_title is not None and by_title.record_id == record_id
    assert wrong_author is None and nothing is None


async def test_holding_through_the_catalogs_look_ups(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shapes the catalog answers with: a record from find_record, a page of hits from search."""
    import types

    import storage.catalog as catalog

    record_id = await add_record(db)
    asked: list[str] = []

    async def find_record(session: object, key: str) -> object:
        asked.append(key)
        return types.SimpleNamespace(id=record_id) if key == "9787108009821" else None

    async def search(session: object, query: str, limit: int = 5, offset: int = 0) -> object:
        hit = types.SimpleNamespace(record_id=record_id, title="万历十五年", author="黄仁宇 著")
        other = types.SimpleNamespace(record_id=999, title="万历十五年研究", author="")
        return types.SimpleNamespace(hits=[other, hit], total=2)

    monkeypatch.setattr(catalog, "find_record", find_record, raising=False)
    monkeypatch.setitem(sys.modules, "storage.search", types.SimpleNamespace(search=search))
    async with db.session() as s:
        by_isbn = await ill.find_holding(s, isbn="9787108009821")
        by_title = await ill.find_holding(s, title="万历十五年", author="黄仁宇")
        other_title = await ill.find_holding(s, title="明朝那些事儿")
    assert asked == ["9787108009821"]
    assert by_isbn is not None and by_isbn.record_id == record_id and by_isbn.on_shelf == 1
    assert by_title is not None and by_title.record_id == record_id
    assert other_title is None


async def test_a_failing_catalog_look_up_is_only_advice(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.catalog as catalog

    async def broken(session: object, key: str) -> object:
        raise RuntimeError("the index is being rebuilt")

    monkeypatch.setattr(catalog, "find_record", broken, raising=False)
    await add_record(db)
    async with db.session() as s:
        assert await ill.find_holding(s, isbn="9787108009821") is None
        assert await s.scalar(select(Record.title)) is not None  # the session is still usable


async def test_holding_with_the_real_catalog(db: Database) -> None:
    record_id = await add_record(db)
    async with db.session() as s:
        found = await ill.find_holding(s, isbn="9787108009821")
        missing = await ill.find_holding(s, isbn="9780306406157")
    assert found is not None and found.record_id == record_id and missing is None


async def test_forget_person_unlinks_requests_but_keeps_them_for_statistics(db: Database) -> None:
    await setup_people(db)
    request = await submit(db, loan_form(note="my phone is 123"))
    await move(db, request.id, S.CANCELLED, actor=READER_UID, staff=False)
    async with db.session() as s:
        await ill.set_watching(s, READER_UID, True, NOW)
        await ill.forget_person(s, READER_UID)
    async with db.session() as s:
        row = await ill.get_request(s, request.id)
        events = await ill.history(s, request.id)
        assert await ill.watchers(s) == []
    assert row is not None and (row.telegram_id, row.reader_id, row.note) == (None, None, "")
    assert all(e.actor != READER_UID for e in events) and row.status == S.CANCELLED


async def test_demo_requests_in_several_states(db: Database) -> None:
    await setup_people(db)
    async with db.session() as s:
        await ill.seed_demo(s, POLICY, NOW, random.Random(1), [READER_UID])
        await ill.seed_demo(s, POLICY, NOW, random.Random(1), [READER_UID])  # a second run adds nothing
    async with db.session() as s:
        rows = list(await s.scalars(select(IllRequest)))
        events = list(await s.scalars(select(IllEvent)))
    assert len(rows) == len(ill._DEMO)
    assert {r.status for r in rows} == set(IllStatus) - {S.RECEIVED}
    assert all(r.telegram_id == READER_UID and r.reader_id == 1 for r in rows)
    for row in rows:  # every demo request followed the state machine
        steps = [e for e in events if e.request_id == row.id]
        assert steps[-1].to_status == row.status
        assert all(check_transition(IllStatus(a.to_status), IllStatus(b.to_status)) is None for a, b in itertools.pairwise(steps))
