"""Events and programmes: the rules of the store, without Telegram, on a real database (SQLite, or
PostgreSQL with LIBRARYBOT_TEST_DATABASE_URL). Every time is given (``NOW``), never read from the clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

from storage.db import Database, retry_busy
from storage.events import (
    CSV_COLUMNS,
    CheckIn,
    Event,
    EventDraft,
    EventFeedback,
    EventProblem,
    EventRegistration,
    Outcome,
    Rated,
    add_comment,
    cancel_event,
    cancel_registration,
    change_event,
    check_in,
    create_event,
    event_stats,
    fill_free_seats,
    forget_person,
    ics,
    import_events,
    new_code,
    normalise_code,
    queue_feedback_requests,
    queue_reminders,
    rate,
    register,
    registrants,
    registrants_csv,
    seed_demo,
    set_organiser,
    subscriptions,
    toggle_subscription,
    upcoming,
    waiting_position,
)
from storage.outbox import Delivery
from storage.people import Reader, User
from storage.policy import Policy

TZ = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2026, 3, 2, 2, 0, tzinfo=dt.UTC)  # 10:00 in Shanghai
START = NOW + dt.timedelta(days=3)
POLICY = Policy()
ORGANISER = 9001


def draft(**changes: object) -> EventDraft:
    values: dict[str, object] = {
        "title_zh": "讲座", "title_en": "Lecture", "starts_at": START, "ends_at": START + dt.timedelta(hours=2),
        "place": "3F", "category": "lecture", "capacity": 2,
    }
    values.update(changes)
    return EventDraft(**values)  # type: ignore[arg-type]


async def make_event(db: Database, **changes: object) -> int:
    async with db.session() as s:
        created = await create_event(s, draft(**changes), now=NOW, tz=TZ, policy=POLICY, organiser_staff_id=ORGANISER)
        assert created.event is not None, created.problem
        return created.event.id


async def sign_up(db: Database, event_id: int, person: int, *, at: dt.datetime = NOW, is_reader: bool = True) -> Outcome:
    async with db.session() as s:
        return (await register(s, event_id, person, name=f"P{person}", is_reader=is_reader, now=at)).outcome


async def pushes(db: Database, key: str) -> list[int]:
    async with db.session() as s:
        return list(await s.scalars(select(Delivery.chat_id).where(Delivery.text_key == key).order_by(Delivery.id)))


async def test_seats_then_waiting_list_with_positions_and_promotion(db: Database) -> None:
    event_id = await make_event(db)
    assert [await sign_up(db, event_id, p) for p in (1, 2, 3, 4)] == ["registered", "registered", "waitlisted", "waitlisted"]
    assert await sign_up(db, event_id, 1) == Outcome.ALREADY  # one registration per reader
    async with db.session() as s:
        fourth = await s.scalar(select(EventRegistration).where(EventRegistration.telegram_id == 4))
        assert fourth is not None and await waiting_position(s, fourth) == 2
    async with db.session() as s:
        assert await cancel_registration(s, event_id, 2, now=NOW, tz=TZ, policy=POLICY) is not None
    async with db.session() as s:
        regs = {r.telegram_id: r for r in await registrants(s, event_id)}
        event = await s.get(Event, event_id)
        assert event is not None and event.seats_taken == 2
        assert regs[3].status == "registered" and regs[3].promoted_at == NOW
        assert regs[2].status == "cancelled" and await waiting_position(s, regs[4]) == 1
    assert await pushes(db, "events.push_promoted") == [3]  # told at once, through the outbox
    # Cancelling a place on the waiting list frees no seat; a cancelled reader may come back, at the end.
    async with db.session() as s:
        await cancel_registration(s, event_id, 4, now=NOW, tz=TZ, policy=POLICY)
    assert await sign_up(db, event_id, 2) == Outcome.WAITLISTED
    assert await pushes(db, "events.push_promoted") == [3]


async def test_registration_window_audience_and_cancelled_event(db: Database) -> None:
    event_id = await make_event(db, registration_opens=NOW + dt.timedelta(hours=1), registration_closes=START - dt.timedelta(days=1),
                                audience="readers")
    assert await sign_up(db, event_id, 1) == Outcome.NOT_YET
    assert await sign_up(db, event_id, 1, at=NOW + dt.timedelta(hours=2), is_reader=False) == Outcome.READERS_ONLY
    assert await sign_up(db, event_id, 1, at=NOW + dt.timedelta(hours=2)) == Outcome.REGISTERED
    assert await sign_up(db, event_id, 2, at=START - dt.timedelta(hours=12)) == Outcome.CLOSED
    async with db.session() as s:
        assert (await cancel_event(s, event_id, now=NOW, tz=TZ, policy=POLICY)).told == 1
        assert (await cancel_event(s, event_id, now=NOW, tz=TZ, policy=POLICY)).event is None
    assert await sign_up(db, event_id, 3, at=NOW + dt.timedelta(hours=2)) == Outcome.CANCELLED
    assert await pushes(db, "events.push_cancelled") == [1]


async def test_drafts_are_checked() -> None:
    assert draft(title_zh="", title_en=" ").problem() == EventProblem.NO_TITLE
    assert draft(ends_at=START).problem() == EventProblem.ENDS_BEFORE_START
    assert draft(category="party").problem() == EventProblem.BAD_CATEGORY
    assert draft(capacity=-1).problem() == EventProblem.BAD_CAPACITY
    assert draft(registration_closes=START + dt.timedelta(hours=1)).problem() == EventProblem.BAD_WINDOW
    assert draft().problem() is None


async def test_reminders_24h_and_2h_once_each_and_again_after_a_move(db: Database) -> None:
    event_id = await make_event(db, capacity=1)
    await sign_up(db, event_id, 1)
    await sign_up(db, event_id, 2)  # waiting: no reminder

    async def run(at: dt.datetime) -> int:
        async with db.session() as s:
            return await queue_reminders(s, now=at, tz=TZ, policy=POLICY)

    assert await run(START - dt.timedelta(hours=30)) == 0
    assert await run(START - dt.timedelta(hours=23)) == 1
    assert await run(START - dt.timedelta(hours=22)) == 0  # a restart, a rerun: nothing twice
    assert await run(START - dt.timedelta(hours=1, minutes=50)) == 1
    assert await run(START - dt.timedelta(hours=1)) == 0
    assert await pushes(db, "events.push_reminder_24h") == [1]
    assert await pushes(db, "events.push_reminder_2h") == [1]
    # Moved a day later: everyone is told, and the reminders come again for the new time.
    async with db.session() as s:
        changed = await change_event(s, event_id, now=START - dt.timedelta(hours=1), tz=TZ, policy=POLICY,
                                     starts_at=START + dt.timedelta(days=1))
        assert changed.told == 2
    assert await run(START + dt.timedelta(hours=1)) == 1
    assert await pushes(db, "events.push_reminder_24h") == [1, 1]


async def test_two_processes_queue_each_reminder_once(db: Database) -> None:
    event_id = await make_event(db, capacity=0)
    for person in range(1, 21):
        await sign_up(db, event_id, person)
    second = Database(db.url)  # another process: its own engine and connections
    try:
        @retry_busy
        async def run(database: Database) -> int:
            async with database.session() as s:
                return await queue_reminders(s, now=START - dt.timedelta(hours=20), tz=TZ, policy=POLICY)

        counts = await asyncio.gather(run(db), run(second), run(db), run(second))
    finally:
        await second.dispose()
    assert sum(counts) == 20
    assert sorted(await pushes(db, "events.push_reminder_24h")) == list(range(1, 21))


async def test_the_last_seat_goes_to_exactly_one_of_two_at_the_same_moment(db: Database) -> None:
    others = [Database(db.url) for _ in range(2)]  # two separate connection pools, as two bot processes
    try:
        for round_ in range(8):
            event_id = await make_event(db, capacity=1 if round_ % 2 else 3, title_en=f"Race {round_}")
            if round_ % 2 == 0:  # two seats already taken: one left
                await sign_up(db, event_id, 100)
                await sign_up(db, event_id, 101)

            @retry_busy
            async def take(database: Database, person: int, event_id: int = event_id) -> str:
                async with database.session() as s:
                    return (await register(s, event_id, person, name="x", is_reader=True, now=NOW)).outcome.value

            outcomes = await asyncio.gather(take(others[0], 1), take(others[1], 2))
            assert sorted(outcomes) == ["registered", "waitlisted"], outcomes
            async with db.session() as s:
                event = await s.get(Event, event_id)
                assert event is not None and event.seats_taken == event.capacity
                seated = await s.scalar(select(func.count()).select_from(EventRegistration).where(
                    EventRegistration.event_id == event_id, EventRegistration.status == "registered"))
                assert seated == event.capacity
    finally:
        for other in others:
            await other.dispose()


async def test_check_in_no_shows_feedback_and_statistics(db: Database) -> None:
    async with db.session() as s:
        s.add(Reader(id=1, card_number="C1", name="Wang", pin_hash="x"))
    event_id = await make_event(db, capacity=2)
    for person in (1, 2, 3):
        await sign_up(db, event_id, person)
    async with db.session() as s:
        regs = {r.telegram_id: r for r in await registrants(s, event_id)}
    code = regs[1].code
    async with db.session() as s:
        assert (await check_in(s, code, staff_id=ORGANISER, now=START - dt.timedelta(hours=3))).outcome == CheckIn.TOO_EARLY
        spaced = f"{code[:3].lower()}-{code[3:]}"
        assert (await check_in(s, spaced, staff_id=ORGANISER, now=START)).outcome == CheckIn.CHECKED_IN
        assert (await check_in(s, code, staff_id=ORGANISER, now=START)).outcome == CheckIn.ALREADY
        assert (await check_in(s, regs[3].code, staff_id=ORGANISER, now=START)).outcome == CheckIn.NOT_REGISTERED
        assert (await check_in(s, "ZZZZZZ", staff_id=ORGANISER, now=START)).outcome == CheckIn.UNKNOWN
    ended = START + dt.timedelta(hours=3)
    async with db.session() as s:
        assert await rate(s, regs[1].id, 1, 5, now=START) == Rated.NOT_ALLOWED  # not over yet
        assert await queue_feedback_requests(s, now=ended, tz=TZ, policy=POLICY) == 1
        assert await queue_feedback_requests(s, now=ended, tz=TZ, policy=POLICY) == 0
        assert await rate(s, regs[2].id, 2, 4, now=ended) == Rated.NOT_ALLOWED  # a no-show
        assert await rate(s, regs[1].id, 2, 4, now=ended) == Rated.NOT_ALLOWED  # not theirs
        assert await rate(s, regs[1].id, 1, 4, now=ended) == Rated.SAVED
        assert await rate(s, regs[1].id, 1, 5, now=ended) == Rated.ALREADY
    assert await pushes(db, "events.push_feedback") == [1]
    async with db.session() as s:
        feedback = await s.scalar(select(EventFeedback))
        assert feedback is not None and (feedback.rating, feedback.organiser_staff_id) == (4, ORGANISER)
        stats = await event_stats(s, None, None, ended)
    assert (stats.events, stats.registrations, stats.waitlisted, stats.attended, stats.no_shows) == (1, 2, 1, 1, 1)
    assert stats.attendance_rate == 0.5 and stats.no_show_rate == 0.5 and stats.average_rating == 4.0
    assert "50%" in "\n".join(stats.lines("en")) and ["events", "no_shows", "", 1] in stats.csv_rows()
    async with db.session() as s:
        event = await s.get(Event, event_id)
        assert event is not None
        text = registrants_csv(event, await registrants(s, event_id), TZ)
    assert text.splitlines()[0].startswith("event_id,title,name") and code in text


async def test_subscribers_hear_of_new_events_of_their_categories(db: Database) -> None:
    async with db.session() as s:
        s.add(Reader(id=1, card_number="C1", name="Wang", pin_hash="x"))
        await s.flush()
        s.add_all([User(telegram_id=1, reader_id=1), User(telegram_id=2)])
        assert await toggle_subscription(s, 1, "workshop") is True
        assert await toggle_subscription(s, 2, "workshop") is True
        assert await toggle_subscription(s, 2, "lecture") is True
        assert await toggle_subscription(s, 2, "lecture") is False
        assert await toggle_subscription(s, 2, "nonsense") is None
    await make_event(db, category="workshop", audience="readers")  # the visitor (2) is not told
    await make_event(db, category="workshop", title_en="Second")
    await make_event(db, category="lecture")
    assert await pushes(db, "events.push_new") == [1, 1, 2]
    async with db.session() as s:
        spacing = list(await s.scalars(select(Delivery.not_before).where(Delivery.text_key == "events.push_new").order_by(Delivery.id)))
    assert spacing[2] - spacing[1] == dt.timedelta(seconds=1)


async def test_import_csv_with_reasons_for_bad_rows(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        ",".join(CSV_COLUMNS) + "\n"
        "读书会,Book club,,,2026-04-01T19:00,2026-04-01T21:00,4F,12,reading,everyone,,\n"
        "坏,Bad,,,2026-04-01 19:00,2026-04-01T18:00,4F,0,reading,everyone,,\n"
        "坏,Bad,,,tomorrow,2026-04-01T18:00,4F,0,reading,everyone,,\n"
        "坏,Bad,,,2026-04-01T19:00,2026-04-01T21:00,4F,lots,reading,everyone,,\n",
        encoding="utf-8",
    )
    async with db.session() as s:
        report = await import_events(s, path, tz=TZ, policy=POLICY, now=NOW)
    assert report.imported == 1 and len(report.skipped) == 3
    assert report.skipped[0].startswith("line 3: ends before start")
    assert "line 4: bad date-time" in report.skipped[1] and "capacity" in report.skipped[2]
    async with db.session() as s:
        event = await s.scalar(select(Event))
    assert event is not None and event.starts_at == dt.datetime(2026, 4, 1, 11, 0, tzinfo=dt.UTC)  # 19:00 in Shanghai


async def test_ics_and_codes() -> None:
    event = Event(id=7, title_zh="讲座", title_en="Lecture, with; commas", description_zh="", description_en="Line one\nline two " + "x" * 90,
                  starts_at=START, ends_at=START + dt.timedelta(hours=2), place="3F", capacity=0, seats_taken=0,
                  category="lecture", audience="everyone", status="scheduled", updated_at=NOW)
    text = ics(event, "en", "3F Social Sciences").decode()
    assert "DTSTART:20260305T020000Z" in text and "SUMMARY:Lecture\\, with\\; commas" in text and "UID:event-7@librarybot" in text
    assert all(len(line.encode()) <= 75 for line in text.split("\r\n"))
    code = new_code()
    assert len(code) == 6 and normalise_code(f" {code[:2].lower()} {code[2:]} ") == code


async def test_demo_has_a_lecture_a_story_hour_and_a_repair_workshop(db: Database) -> None:
    async with db.session() as s:
        s.add_all([Reader(id=n, card_number=f"D{n}", name=f"Reader {n}", pin_hash="x") for n in (1, 2, 3)])
        await s.flush()
        s.add_all([User(telegram_id=8000 + n, reader_id=n) for n in (1, 2, 3)])
        await s.flush()
        await seed_demo(s, POLICY, NOW, random.Random(1), [8001, 8002, 8003])
        events = await upcoming(s, NOW)
        workshop = [(r.name, r.status) for r in await registrants(s, events[2].id)]
    assert workshop == [("Reader 1", "registered"), ("Reader 2", "registered"), ("Reader 3", "waitlisted")]
    assert [e.category for e in events] == ["lecture", "children", "workshop"]
    assert "Rare-book repair" in events[2].title_en and events[2].audience == "readers"
    assert all(e.starts_at > NOW for e in events)


async def test_a_larger_capacity_seats_the_waiting_list_in_order(db: Database) -> None:
    event_id = await make_event(db, capacity=1)
    for person in (1, 2, 3, 4):
        await sign_up(db, event_id, person)
    async with db.session() as s:
        changed = await change_event(s, event_id, now=NOW, tz=TZ, policy=POLICY, capacity=3)
        assert changed.event is not None and changed.told == 0  # not a change of time or place
    assert await pushes(db, "events.push_promoted") == [2, 3]
    async with db.session() as s:
        assert [r.telegram_id for r in await registrants(s, event_id) if r.status == "waitlisted"] == [4]


async def test_forgetting_a_person_gives_up_their_seat_and_keeps_only_counts(db: Database) -> None:
    event_id = await make_event(db, capacity=1)
    await sign_up(db, event_id, 1)
    await sign_up(db, event_id, 2)
    async with db.session() as s:
        await toggle_subscription(s, 1, "lecture")
        await forget_person(s, 1)
    async with db.session() as s:
        regs = await registrants(s, event_id)
        assert all(r.telegram_id != 1 and r.name != "P1" for r in regs)
        assert await subscriptions(s, 1) == set()
        assert await fill_free_seats(s, now=NOW, tz=TZ, policy=POLICY) == 1
        assert await fill_free_seats(s, now=NOW, tz=TZ, policy=POLICY) == 0
    assert await pushes(db, "events.push_promoted") == [2]
    async with db.session() as s:
        stats = await event_stats(s, None, None, NOW)
    assert (stats.registrations, stats.promotions) == (2, 1)


async def test_ratings_count_for_the_organiser_at_the_time(db: Database) -> None:
    event_id = await make_event(db)
    await sign_up(db, event_id, 1)
    async with db.session() as s:
        reg = (await registrants(s, event_id))[0]
        await check_in(s, reg.code, staff_id=ORGANISER, now=START)
        event = await set_organiser(s, event_id, 9005)
        assert event is not None
        assert await rate(s, reg.id, 1, 3, now=START + dt.timedelta(hours=2)) == Rated.SAVED
        assert await add_comment(s, reg.id, 1, "  Too short  ") is True
        assert await add_comment(s, reg.id, 1, "again") is False
        feedback = await s.scalar(select(EventFeedback))
    assert feedback is not None and (feedback.organiser_staff_id, feedback.comment) == (9005, "Too short")
