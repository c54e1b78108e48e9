"""Tickets in the store: the status rules, the daily limit, the claim race, relaying through the
outbox (anonymity kept), escalation once per ticket, auto-closing, privacy, and the statistics
against figures computed by hand."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from storage.db import Database
from storage.outbox import Delivery, DeliveryState, mark
from storage.people import Reader, Role, User, add_staff
from storage.policy import Policy
from storage.tickets import (
    MAX_TEXT,
    FileRefused,
    Labels,
    Outcome,
    TextProblem,
    Ticket,
    TicketEvent,
    TicketMessage,
    TicketStatus,
    add_rating_comment,
    autoclose,
    can_move,
    claim,
    clip,
    escalate_late,
    file_ticket,
    forget_person,
    history,
    is_late,
    late_by_text,
    parse_ticket_number,
    queue_order,
    rate,
    reader_reply,
    reader_tickets,
    resolve,
    seed_demo,
    set_watching,
    sla_breached,
    staff_queue,
    staff_reply,
    text_problem,
    ticket_number,
    ticket_stats,
)

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
STAFF_CHAT = -1001
READER, VISITOR, OTHER = 101, 102, 103
STAFF, STAFF2, WATCHER = 9001, 9003, 9004
LABELS = Labels(
    categories={"service": {"zh": "服务", "en": "Service"}, "environment": {"zh": "环境", "en": "Environment"}},
    anonymous={"zh": "匿名读者", "en": "Anonymous reader"},
    no_place={"zh": "—", "en": "—"},
)
POLICY = Policy()


def h(n: float) -> dt.timedelta:
    return dt.timedelta(hours=n)


# --------------------------------------------------------------------------------------------------
# Pure rules


def test_ticket_numbers() -> None:
    assert ticket_number(123) == "T-000123"
    assert ticket_number(1234567) == "T-1234567"
    for text in ("T-000123", "t123", "123", " T-123 "):
        assert parse_ticket_number(text) == 123
    for text in ("", "T-", "abc", "T-0", "-5", "T-12x"):
        assert parse_ticket_number(text) is None


@given(st.integers(min_value=1, max_value=10**9))
def test_ticket_number_round_trip(n: int) -> None:
    assert parse_ticket_number(ticket_number(n)) == n


def test_status_rules() -> None:
    assert can_move("new", "open")
    assert not can_move("new", "resolved")
    assert can_move("open", "waiting_on_reader") and can_move("waiting_on_reader", "open")
    assert can_move("open", "resolved") and can_move("waiting_on_reader", "resolved")
    assert can_move("resolved", "closed")
    assert not any(can_move("closed", s) for s in TicketStatus)
    assert not can_move("resolved", "open")


def test_text_rules() -> None:
    assert text_problem("") is TextProblem.EMPTY
    assert text_problem("   \n ") is TextProblem.EMPTY
    assert text_problem(None, photo=True) is None
    assert text_problem("x" * MAX_TEXT) is None
    assert text_problem("x" * (MAX_TEXT + 1)) is TextProblem.TOO_LONG


@given(st.text(max_size=300), st.integers(min_value=2, max_value=200))
def test_clip_never_breaks_html(text: str, limit: int) -> None:
    clipped = clip(text, limit)
    assert len(clipped) <= limit
    body = clipped.removesuffix("…")
    assert text.startswith(html.unescape(body))
    assert "<" not in clipped and ">" not in clipped


def test_sla_and_lateness() -> None:
    t = Ticket(id=1, status="new", created_at=T0, respond_by=T0 + h(24), first_response_at=None)
    assert not is_late(t, T0 + h(23.9)) and not sla_breached(t, T0 + h(24))
    assert is_late(t, T0 + h(24)) and sla_breached(t, T0 + h(24.01))
    t.first_response_at = T0 + h(25)
    assert not is_late(t, T0 + h(30)) and sla_breached(t, T0 + h(30))
    t.first_response_at = T0 + h(24)
    assert not sla_breached(t, T0 + h(100))  # exactly on time is on time
    assert late_by_text(h(2) + dt.timedelta(minutes=5)) == "2:05"
    assert late_by_text(h(49.5)) == "49:30"


def test_queue_order_puts_late_first() -> None:
    now = T0 + h(30)
    late_open = Ticket(id=1, status="open", created_at=T0, respond_by=T0 + h(24))
    fresh_new = Ticket(id=2, status="new", created_at=T0 + h(29), respond_by=T0 + h(53))
    waiting = Ticket(id=3, status="waiting_on_reader", created_at=T0 - h(5), respond_by=T0 + h(19), first_response_at=T0)
    fresh_open = Ticket(id=4, status="open", created_at=T0 + h(10), respond_by=T0 + h(34))
    ordered = sorted([waiting, fresh_open, fresh_new, late_open], key=lambda t: queue_order(t, now))
    assert [t.id for t in ordered] == [1, 2, 4, 3]


# --------------------------------------------------------------------------------------------------
# In the store


async def people(db: Database) -> None:
    async with db.session() as s:
        s.add(Reader(id=1, card_number="C0001", name="Wang Fang", pin_hash="x"))
        await s.flush()
        s.add_all([
            User(telegram_id=READER, first_name="Fang", reader_id=1),
            User(telegram_id=VISITOR, first_name="Guest"),
            User(telegram_id=OTHER, first_name="Other"),
        ])
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, STAFF2, Role.STAFF, "Chen Jie")
        await add_staff(s, WATCHER, Role.STAFF, "Sun Li")
        await set_watching(s, WATCHER, True)


async def file(db: Database, who: int = READER, *, now: dt.datetime = T0, anonymous: bool = False,
               text: str = "The 3rd floor is noisy", category: str = "environment", **kw: object) -> Ticket:
    async with db.session() as s:
        filed = await file_ticket(s, who, category, text, policy=POLICY, now=now, staff_chat_id=STAFF_CHAT,
                                  labels=LABELS, anonymous=anonymous, **kw)  # type: ignore[arg-type]
        assert filed.ticket is not None, filed.refused
        return filed.ticket


async def outbox(db: Database) -> list[Delivery]:
    async with db.session() as s:
        return list(await s.scalars(select(Delivery).order_by(Delivery.id)))


async def load(db: Database, ticket_id: int) -> Ticket:
    async with db.session() as s:
        ticket = await s.get(Ticket, ticket_id)
        assert ticket is not None
        return ticket


async def test_filing_alerts_staff_chat_and_watchers(db: Database) -> None:
    await people(db)
    ticket = await file(db, place="3F", photo_file_id="PHOTO1")
    assert ticket.number == "T-000001" and ticket.status == "new"
    assert ticket.respond_by == T0 + h(24)
    assert (ticket.requester_name, ticket.requester_card) == ("Wang Fang", "C0001")
    rows = await outbox(db)
    assert [r.chat_id for r in rows] == [STAFF_CHAT, WATCHER]
    alert = rows[0]
    assert alert.text_key == "tickets.staff_new" and alert.photo_file_id == "PHOTO1"
    assert alert.buttons == [[["tickets.btn_claim", "tk:claim:1"]]]
    assert alert.params["who"] == "Wang Fang (C0001)"
    assert alert.params["place"]["en"].startswith("3F")
    assert alert.params["category"] == {"zh": "环境", "en": "Environment"}


async def test_anonymous_ticket_never_names_the_reader_to_staff(db: Database) -> None:
    await people(db)
    ticket = await file(db, anonymous=True)
    async with db.session() as s:
        assert (await claim(s, ticket.id, STAFF, T0 + h(1))).outcome is Outcome.OK
        assert (await staff_reply(s, ticket.id, STAFF, "Which room?", T0 + h(2))).outcome is Outcome.OK
        assert (await reader_reply(s, ticket.id, READER, "Room 301", T0 + h(3), labels=LABELS,
                                   staff_chat_id=STAFF_CHAT)).outcome is Outcome.OK
    staff_rows = [r for r in await outbox(db) if r.chat_id != READER]
    assert {r.text_key for r in staff_rows} == {"tickets.staff_new", "tickets.reply_to_staff"}
    for row in staff_rows:
        dump = repr(row.params) + repr(row.buttons)
        for secret in ("Wang", "Fang", "C0001", str(READER)):
            assert secret not in dump
        assert row.params["who"] == LABELS.anonymous
    relayed = staff_rows[-1]
    assert relayed.chat_id == STAFF and relayed.params["text"] == "Room 301"


async def test_visitor_ticket_and_refusals(db: Database) -> None:
    await people(db)
    ticket = await file(db, VISITOR, category="service")
    assert (ticket.requester_name, ticket.requester_card) == ("Guest", None)
    async with db.session() as s:
        async def attempt(**kw: object) -> FileRefused | None:
            args = {"category": "service", "text": "hello", **kw}
            filed = await file_ticket(s, VISITOR, args.pop("category"), args.pop("text"), policy=POLICY, now=T0,  # type: ignore[arg-type]
                                      staff_chat_id=None, labels=LABELS, **args)  # type: ignore[arg-type]
            return filed.refused

        assert await attempt(category="weather") is FileRefused.BAD_CATEGORY
        assert await attempt(text="  ") is FileRefused.EMPTY
        assert await attempt(text="x" * 2001) is FileRefused.TOO_LONG
        assert await attempt(place="9F") is FileRefused.BAD_PLACE
        assert await attempt(text="x" * 2000) is None


async def test_daily_limit(db: Database) -> None:
    await people(db)
    for n in range(5):
        await file(db, now=T0 + h(n))
    async with db.session() as s:
        refused = await file_ticket(s, READER, "service", "sixth", policy=POLICY, now=T0 + h(5), staff_chat_id=None, labels=LABELS)
        assert refused.refused is FileRefused.DAILY_LIMIT
        # Another person is not affected, and 24 hours after the first ticket one more is accepted.
        other = await file_ticket(s, OTHER, "service", "mine", policy=POLICY, now=T0 + h(5), staff_chat_id=None, labels=LABELS)
        assert other.ticket is not None
        later = await file_ticket(s, READER, "service", "next day", policy=POLICY, now=T0 + h(24), staff_chat_id=None, labels=LABELS)
        assert later.ticket is not None


async def test_two_staff_claiming_at_once_exactly_one_wins(db: Database) -> None:
    await people(db)
    ticket = await file(db)

    async def try_claim(staff: int) -> Outcome:
        async with db.session() as s:
            result = await claim(s, ticket.id, staff, T0 + h(1))
            if result.outcome is Outcome.TAKEN:
                assert result.other in ("Li Na", "Chen Jie")
            return result.outcome

    outcomes = await asyncio.gather(try_claim(STAFF), try_claim(STAFF2))
    assert sorted(outcomes) == sorted([Outcome.OK, Outcome.TAKEN])
    stored = await load(db, ticket.id)
    assert stored.status == "open" and stored.assignee_id in (STAFF, STAFF2)
    async with db.session() as s:
        events = list(await s.scalars(select(TicketEvent.kind).where(TicketEvent.ticket_id == ticket.id)))
        assert events.count("claimed") == 1
        again = await claim(s, ticket.id, STAFF, T0 + h(2))
        assert again.outcome is Outcome.TAKEN
        assert (await claim(s, 999, STAFF, T0)).outcome is Outcome.NOT_FOUND


async def test_conversation_round_trip_and_status_changes(db: Database) -> None:
    await people(db)
    ticket = await file(db)
    async with db.session() as s:
        # Staff cannot answer an unclaimed ticket, and only the one on it may answer.
        assert (await staff_reply(s, ticket.id, STAFF, "hi", T0)).outcome is Outcome.NOT_CLAIMED
        assert (await claim(s, ticket.id, STAFF, T0 + h(1))).outcome is Outcome.OK
        not_mine = await staff_reply(s, ticket.id, STAFF2, "hi", T0 + h(1))
        assert not_mine.outcome is Outcome.NOT_YOURS and not_mine.other == "Li Na"
        assert (await staff_reply(s, ticket.id, STAFF, "  ", T0 + h(1))).outcome is Outcome.EMPTY
        assert (await staff_reply(s, ticket.id, STAFF, "x" * 2001, T0 + h(1))).outcome is Outcome.TOO_LONG
        first = await staff_reply(s, ticket.id, STAFF, "We will check <now>", T0 + h(2))
        assert first.outcome is Outcome.OK and first.ticket is not None
        assert first.ticket.status == "waiting_on_reader" and first.ticket.first_response_at == T0 + h(2)
        # A stranger cannot answer on somebody else's ticket.
        assert (await reader_reply(s, ticket.id, OTHER, "me too", T0 + h(3), labels=LABELS,
                                   staff_chat_id=STAFF_CHAT)).outcome is Outcome.NOT_YOURS
        back = await reader_reply(s, ticket.id, READER, "Thanks", T0 + h(3), labels=LABELS, staff_chat_id=STAFF_CHAT,
                                  photo_file_id="P2")
        assert back.outcome is Outcome.OK and back.ticket is not None and back.ticket.status == "open"
        second = await staff_reply(s, ticket.id, STAFF, "Fixed soon", T0 + h(4))
        assert second.ticket is not None and second.ticket.first_response_at == T0 + h(2)  # the first one counts
    rows = await outbox(db)
    to_reader = [r for r in rows if r.chat_id == READER]
    assert [r.text_key for r in to_reader] == ["tickets.claimed_to_reader", "tickets.reply_to_reader", "tickets.reply_to_reader"]
    assert to_reader[1].params["text"] == "We will check &lt;now&gt;"
    assert to_reader[1].buttons == [[["tickets.btn_reply", "tk:reply:1"]]]
    to_staff = [r for r in rows if r.chat_id == STAFF]
    assert len(to_staff) == 1 and to_staff[0].photo_file_id == "P2" and to_staff[0].params["who"] == "Wang Fang (C0001)"
    async with db.session() as s:
        entries = await history(s, ticket.id)
    assert [(e.message.from_staff, e.message.text) for e in entries] == [
        (True, "We will check <now>"), (False, "Thanks"), (True, "Fixed soon")]


async def test_resolve_rate_and_replies_after_the_end(db: Database) -> None:
    await people(db)
    ticket = await file(db)
    async with db.session() as s:
        assert (await resolve(s, ticket.id, STAFF, "done", T0)).outcome is Outcome.NOT_CLAIMED
        await claim(s, ticket.id, STAFF, T0 + h(1))
        assert (await resolve(s, ticket.id, STAFF2, "done", T0 + h(2))).outcome is Outcome.NOT_YOURS
        assert (await resolve(s, ticket.id, STAFF, "", T0 + h(2))).outcome is Outcome.EMPTY
        done = await resolve(s, ticket.id, STAFF, "Quiet zone signs are up.", T0 + h(5))
        assert done.outcome is Outcome.OK and done.ticket is not None
        assert done.ticket.status == "resolved" and done.ticket.first_response_at == T0 + h(5)
        assert (await resolve(s, ticket.id, STAFF, "again", T0 + h(6))).outcome is Outcome.FINISHED
        # No more messages on a resolved ticket, from either side.
        assert (await staff_reply(s, ticket.id, STAFF, "more", T0 + h(6))).outcome is Outcome.FINISHED
        assert (await reader_reply(s, ticket.id, READER, "hm", T0 + h(6), labels=LABELS,
                                   staff_chat_id=None)).outcome is Outcome.FINISHED
        assert (await rate(s, ticket.id, OTHER, 5, T0 + h(7))).outcome is Outcome.NOT_YOURS
        assert (await rate(s, ticket.id, READER, 6, T0 + h(7))).outcome is Outcome.BAD_RATING
        rated = await rate(s, ticket.id, READER, 4, T0 + h(7))
        assert rated.outcome is Outcome.OK and rated.ticket is not None
        assert (rated.ticket.status, rated.ticket.rating, rated.ticket.closed_reason) == ("closed", 4, "rated")
        assert (await rate(s, ticket.id, READER, 1, T0 + h(8))).outcome is Outcome.FINISHED
        assert (await add_rating_comment(s, ticket.id, READER, "Nice staff")).outcome is Outcome.OK
        assert (await add_rating_comment(s, ticket.id, READER, "again")).outcome is Outcome.FINISHED
    closing = [r for r in await outbox(db) if r.text_key == "tickets.resolved_to_reader"]
    assert len(closing) == 1 and closing[0].buttons[0][4] == ["=5 ★", "tk:rate:1:5"]
    stored = await load(db, ticket.id)
    assert stored.rating_comment == "Nice staff"


async def test_escalation_once_per_ticket(db: Database) -> None:
    await people(db)
    unclaimed = await file(db, now=T0)
    claimed_silent = await file(db, OTHER, now=T0 + h(1), category="service")
    answered = await file(db, VISITOR, now=T0)
    fresh = await file(db, VISITOR, now=T0 + h(20))
    async with db.session() as s:
        await claim(s, claimed_silent.id, STAFF, T0 + h(2))
        await claim(s, answered.id, STAFF, T0 + h(2))
        await staff_reply(s, answered.id, STAFF, "on it", T0 + h(3))
    async with db.session() as s:
        assert await escalate_late(s, T0 + h(23), STAFF_CHAT, LABELS) == []
    now = T0 + h(26) + dt.timedelta(minutes=30)
    async with db.session() as s:
        late = await escalate_late(s, now, STAFF_CHAT, LABELS)
    assert [(item.ticket.id, item.late_by) for item in late] == [
        (unclaimed.id, h(2.5)), (claimed_silent.id, h(1.5))]
    async with db.session() as s:
        assert await escalate_late(s, now + h(5), STAFF_CHAT, LABELS) == []
        later = await escalate_late(s, now + h(50), STAFF_CHAT, LABELS)
        assert [item.ticket.id for item in later] == [fresh.id]  # only the one late since; none twice
    alerts = [r for r in await outbox(db) if r.text_key == "tickets.escalation"]
    assert alerts[0].chat_id == STAFF_CHAT and alerts[0].params["count"] == 2
    # lateness in words in each language (#20: "🔴 +6:33" said nothing)
    assert alerts[0].params["lines"]["en"] == "• T-000001 · Environment · 2 h 30 min late\n• T-000002 · Service · 1 h 30 min late · Li Na"
    assert alerts[0].params["lines"]["zh"].startswith("• T-000001 · 环境 · 超时 2 小时 30 分钟")
    assert alerts[0].buttons == [[["=✋ T-000001", "tk:claim:1"]]]  # only the unclaimed one can be claimed
    assert fresh.id not in [item.ticket.id for item in late]


async def test_concurrent_escalation_runs_tell_once(db: Database) -> None:
    await people(db)
    for n in range(3):
        await file(db, now=T0 + h(n))

    async def run() -> int:
        async with db.session() as s:
            return len(await escalate_late(s, T0 + h(40), STAFF_CHAT, LABELS))

    counts = await asyncio.gather(run(), run())
    assert sum(counts) == 3


async def test_autoclose_after_the_policy_days(db: Database) -> None:
    await people(db)
    ticket = await file(db)
    async with db.session() as s:
        await claim(s, ticket.id, STAFF, T0)
        await resolve(s, ticket.id, STAFF, "done", T0 + h(1))
    async with db.session() as s:
        assert await autoclose(s, POLICY, T0 + h(1) + dt.timedelta(days=7) - dt.timedelta(seconds=1)) == 0
        assert await autoclose(s, POLICY, T0 + h(1) + dt.timedelta(days=7)) == 1
        assert await autoclose(s, POLICY, T0 + dt.timedelta(days=30)) == 0
    stored = await load(db, ticket.id)
    assert (stored.status, stored.closed_reason, stored.rating) == ("closed", "auto", None)
    async with db.session() as s:  # a late rating is still welcome; it keeps the ticket closed
        late_rating = await rate(s, ticket.id, READER, 3, T0 + dt.timedelta(days=9))
        assert late_rating.outcome is Outcome.OK and late_rating.ticket is not None
        assert late_rating.ticket.closed_reason == "auto"


async def test_reply_to_a_reader_who_blocked_the_bot_is_kept_and_marked(db: Database) -> None:
    await people(db)
    ticket = await file(db)
    async with db.session() as s:
        await claim(s, ticket.id, STAFF, T0)
        await staff_reply(s, ticket.id, STAFF, "Answer", T0 + h(1))
    reply_row = [r for r in await outbox(db) if r.text_key == "tickets.reply_to_reader"][0]
    async with db.session() as s:  # what the dispatcher does on a 403
        await mark(s, reply_row.id, DeliveryState.UNREACHABLE, error="Forbidden: bot was blocked by the user")
        (await s.get(User, READER)).unreachable = True  # type: ignore[union-attr]
    async with db.session() as s:
        entries = await history(s, ticket.id)
        assert len(entries) == 1 and entries[0].message.text == "Answer" and entries[0].delivered is False
        again = await staff_reply(s, ticket.id, STAFF, "Hello?", T0 + h(2))
        assert again.outcome is Outcome.OK and again.unreachable


async def test_lists_for_readers_and_staff(db: Database) -> None:
    await people(db)
    a = await file(db, now=T0)
    b = await file(db, now=T0 + h(1))
    c = await file(db, OTHER, now=T0 + h(2))
    async with db.session() as s:
        await claim(s, b.id, STAFF, T0 + h(3))
        await resolve(s, b.id, STAFF, "done", T0 + h(4))
        assert [t.id for t in await reader_tickets(s, READER)] == [b.id, a.id]
        queue = await staff_queue(s, T0 + h(25))
        assert [t.id for t in queue] == [a.id, c.id]  # a is late; b is resolved


async def test_forget_person_erases_the_reader_keeps_the_figures(db: Database) -> None:
    await people(db)
    ticket = await file(db, photo_file_id="P")
    async with db.session() as s:
        await claim(s, ticket.id, STAFF, T0)
        await staff_reply(s, ticket.id, STAFF, "Answer", T0 + h(1))
        await reader_reply(s, ticket.id, READER, "My phone is 123", T0 + h(2), labels=LABELS, staff_chat_id=None)
    async with db.session() as s:
        await forget_person(s, READER)
    async with db.session() as s:
        stored = await s.get(Ticket, ticket.id)
        assert stored is not None
        assert (stored.requester_id, stored.requester_name, stored.requester_card, stored.text, stored.photo_file_id) == (
            None, "", None, "", None)
        assert stored.status == "closed" and stored.category == "environment"
        texts = list(await s.scalars(select(TicketMessage.text).where(TicketMessage.ticket_id == ticket.id)))
        assert texts == ["", ""]
        stats = await ticket_stats(s, None, None, T0 + h(3))
        assert stats.by_category["environment"] == 1
    async with db.session() as s:
        await forget_person(s, STAFF)
        stored = await s.get(Ticket, ticket.id)
        assert stored is not None and stored.assignee_id is None


async def test_ticket_stats_against_hand_computed_figures(db: Database) -> None:
    """Six tickets with fixed times; every figure below is worked out by hand in the comments."""
    now = T0 + h(100)
    rows = [
        # id category     status              filed  respond_by first  resolved rating
        (1, "service", "closed", 0, 24, 2, 10, 5),  # first 2 h, resolution 10 h
        (2, "service", "closed", 1, 25, 31, 41, 3),  # first 30 h (breach), resolution 40 h
        (3, "environment", "resolved", 2, 26, 6, 8, None),  # first 4 h, resolution 6 h
        (4, "digital", "waiting_on_reader", 3, 27, 11, None, None),  # first 8 h
        (5, "other", "new", 4, 28, None, None, None),  # no answer, now is past 28 h: breach
        (6, "service", "open", 90, 114, None, None, None),  # no answer yet, still on time
        (7, "collection", "closed", -200, -176, -199, -198, 1),  # filed before ``since``: left out
    ]
    async with db.session() as s:
        for tid, category, status, filed, due, first, resolved, rating in rows:
            s.add(Ticket(
                id=tid, category=category, status=status, text="t", requester_id=READER,
                created_at=T0 + h(filed), respond_by=T0 + h(due),
                first_response_at=T0 + h(first) if first is not None else None,
                resolved_at=T0 + h(resolved) if resolved is not None else None, rating=rating,
            ))
    async with db.session() as s:
        stats = await ticket_stats(s, T0, T0 + h(1000), now)
    assert stats.by_category == {"service": 3, "environment": 1, "facilities": 0, "collection": 0,
                                 "digital": 1, "suggestion": 0, "other": 1}
    assert stats.by_status == {"new": 1, "open": 1, "waiting_on_reader": 1, "resolved": 1, "closed": 2}
    assert stats.total == 6
    # First responses 2, 30, 4, 8 h (ids 1–4 — filed 0,1,2,3; answered 2,31,6,11): median (4 + 8) / 2 = 6.
    assert stats.median_first_response_hours == pytest.approx(6.0)
    # Resolutions 10, 40, 6 h: median 10.
    assert stats.median_resolution_hours == pytest.approx(10.0)
    # Ticket 2 answered 6 h late; ticket 5 unanswered 72 h past its promise at ``now``.
    assert stats.sla_breaches == 2
    # Ratings 5 and 3.
    assert (stats.ratings, stats.average_rating) == (2, pytest.approx(4.0))
    async with db.session() as s:
        everything = await ticket_stats(s, None, None, now)
        early = await ticket_stats(s, None, T0, now)
        empty = await ticket_stats(s, T0 + h(500), None, now)
    assert everything.total == 7 and everything.ratings == 3 and everything.average_rating == pytest.approx(3.0)
    assert early.total == 1 and early.median_first_response_hours == pytest.approx(1.0)
    assert early.median_resolution_hours == pytest.approx(2.0) and early.sla_breaches == 0
    assert empty.total == 0 and empty.median_first_response_hours is None and empty.average_rating is None
    assert empty.median_resolution_hours is None and empty.ratings == 0 and empty.sla_breaches == 0


async def test_seed_demo_has_tickets_in_several_states(db: Database) -> None:
    await people(db)
    async with db.session() as s:
        await seed_demo(s, POLICY, T0, random.Random(1), [READER, VISITOR])
    async with db.session() as s:
        statuses = set(await s.scalars(select(Ticket.status)))
        assert statuses == {"new", "open", "waiting_on_reader", "resolved", "closed"}
        queue = await staff_queue(s, T0)
        assert queue and is_late(queue[0], T0)
        stats = await ticket_stats(s, None, None, T0)
        assert stats.ratings >= 1


def test_a_new_ticket_needs_words_in_any_script() -> None:
    """#20: a complaint of emoji only was accepted."""
    assert text_problem("😡😡 !!", words=True) is TextProblem.NO_WORDS
    assert text_problem("😡 打印机坏了", words=True) is None
    assert text_problem("3", words=True) is None
    assert text_problem("😡😡") is None  # a reply in a running conversation may be an emoji
