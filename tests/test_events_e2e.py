"""Events and programmes end to end: the real bot over HTTP through the emulator, as readers and as
staff — registering, the waiting list and its promotion, /myevents, the .ics file and the QR code,
reminders across a restart, /checkin, feedback, the staff's guided form, changes, cancellation and
subscriptions. Every time is relative to the bot's own clock (moved forward by the test)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import aiohttp
from sqlalchemy import func, select

from bot.embedded import STAFF_CHAT_ID, TOKEN, EmbeddedBot
from bot.emulator import Emulator, Person
from bot.runner import start_bot, stop_bot
from bot.settings import Settings
from storage.db import Database
from storage.events import EventDraft, EventFeedback, EventRegistration, create_event, register
from storage.outbox import Delivery
from storage.people import Reader, Role, User, add_staff
from storage.policy import Policy
from tests.auxil.chat import relax_flood_control

FANG, MING, STAFF = 301, 302, 9001


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or "") or fragment in (m.get("caption") or "")


async def watch(env: EmbeddedBot, user_id: int) -> Person:
    person = await env.person(user_id)
    await person.__aenter__()
    return person


async def setup(env: EmbeddedBot) -> None:
    async with env.db.session() as s:
        s.add_all([Reader(id=1, card_number="C0301", name="Wang Fang", pin_hash="x"),
                   Reader(id=2, card_number="C0302", name="Li Ming", pin_hash="x")])
        await s.flush()
        s.add_all([User(telegram_id=FANG, first_name="Fang", telegram_language="en", reader_id=1),
                   User(telegram_id=MING, first_name="Ming", telegram_language="en", reader_id=2)])
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
    relax_flood_control(env)  # the staff walk a long form faster than any person types


async def document_text(env: EmbeddedBot, message: dict[str, Any]) -> bytes:
    url = env.emulator.base_url.removesuffix("/bot") + message["document"]["url"]
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.read()


async def files(person: Person, answers: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in answers if m.get(kind)] or await person.wait_for(lambda m: bool(m.get(kind)))
    return found[-1]


async def test_register_wait_promote_remind_check_in_and_rate(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    start = bot_env.now() + dt.timedelta(days=3)
    async with bot_env.db.session() as s:
        created = await create_event(
            s, EventDraft(title_zh="宋代版刻讲座", title_en="Song printing lecture", starts_at=start, ends_at=start + dt.timedelta(hours=2),
                          place="3F", category="lecture", capacity=1, description_en="With the rare-books curator."),
            now=bot_env.now(), tz=bot_env.settings.tz, policy=bot_env.policy, organiser_staff_id=STAFF)
        assert created.event is not None
    fang, ming, staff = await watch(bot_env, FANG), await watch(bot_env, MING), await watch(bot_env, STAFF)

    listing = texts(await fang.send("/events"))
    assert "Song printing lecture" in listing and "Seats left: 1" in listing and "3F Social Sciences" in listing
    details = texts(await fang.press("1. Song printing lecture"))
    assert "rare-books curator" in details and "capacity 1" in details
    registered = texts(await fang.press("✅ Register"))
    assert "You are registered" in registered
    async with bot_env.db.session() as s:
        code_fang = (await s.scalar(select(EventRegistration.code).where(EventRegistration.telegram_id == FANG)))
    assert code_fang and code_fang in registered

    await ming.send("/events")
    await ming.press("1. Song printing lecture")
    assert "number 1 on the waiting list" in texts(await ming.press("⏳ Join the waiting list"))

    # Fang cancels from /myevents: Ming gets the seat and is told at once.
    mine = texts(await fang.send("/myevents"))
    assert "Song printing lecture" in mine and code_fang in mine
    assert "is cancelled" in texts(await fang.press("1. Cancel my registration"))
    promoted = (await ming.wait_for(containing("A seat freed up")))[-1]
    async with bot_env.db.session() as s:
        code_ming = await s.scalar(select(EventRegistration.code).where(EventRegistration.telegram_id == MING))
    assert code_ming and code_ming in promoted["text"]

    # The calendar file and the QR image of the code.
    await ming.send("/myevents")
    await ming.press("1. Details")
    calendar = await files(ming, await ming.press("📅 Add to calendar"), "document")
    assert calendar["document"]["file_name"] == "event-1.ics"
    body = (await document_text(bot_env, calendar)).decode()
    assert body.startswith("BEGIN:VCALENDAR") and "SUMMARY:Song printing lecture" in body
    qr = await files(ming, await ming.press("🎫 Check-in code"), "photo")
    assert code_ming in qr["text"]

    # Reminders: 24 hours before, once, even after a restart; then the 2-hour one.
    bot_env.move_clock(dt.timedelta(days=2, hours=1))
    await bot_env.run_jobs()
    await ming.wait_for(containing("is tomorrow"))
    await bot_env.restart()
    await bot_env.run_jobs()
    bot_env.move_clock(dt.timedelta(hours=21, minutes=30))
    await bot_env.run_jobs()
    await bot_env.run_jobs()
    await ming.wait_for(containing("starts in two hours"))
    seen = [m["text"] for m in ming.bot_messages()]
    assert sum("is tomorrow" in x for x in seen) == 1 and sum("starts in two hours" in x for x in seen) == 1
    assert not any("is tomorrow" in (m["text"] or "") for m in fang.bot_messages())

    # At the door: /checkin with the code; a repeat says so.
    bot_env.move_clock(dt.timedelta(hours=2))
    assert "Checked in: Li Ming" in texts(await staff.send(f"/checkin {code_ming.lower()}"))
    assert "Already checked in" in texts(await staff.send(f"/checkin {code_ming}"))
    assert "No registration has the code" in texts(await staff.send("/checkin NOPE42"))
    assert "only for library staff" in texts(await ming.send(f"/checkin {code_ming}"))

    # After the event: the rating with a comment, stored with the organising staff member.
    bot_env.move_clock(dt.timedelta(hours=3))
    await bot_env.run_jobs()
    ask = (await ming.wait_for(containing("How was it?")))[-1]
    assert "write a comment" in texts(await ming.press("4 ★", message=ask))
    assert "comment is saved" in texts(await ming.send("Fascinating, thank you"))
    async with bot_env.db.session() as s:
        feedback = await s.scalar(select(EventFeedback))
    assert feedback is not None and (feedback.rating, feedback.comment, feedback.organiser_staff_id) == (4, "Fascinating, thank you", STAFF)
    await ming.press_data(ask["message_id"], "ev:rate:2:5")  # the old buttons, pressed again
    assert "already rated" in ming.last_callback_answer["text"]

    report = texts(await staff.send("/stats"))
    assert "Events and programmes" in report and "promoted from the waiting list: 1" in report and "Average rating: 4.00 (1)" in report


async def test_staff_create_change_cancel_and_subscribers(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    fang, staff = await watch(bot_env, FANG), await watch(bot_env, STAFF)

    # Fang subscribes to workshops in /settings.
    await fang.send("/settings")
    assert "Choose the categories" in texts(await fang.press("🔔 Event news by category"))
    assert any("✅ Workshop" in b["text"] for m in await fang.press("▫️ Workshop") for row in m["buttons"] for b in row)

    # Li Na creates a workshop through the guided form.
    start = (bot_env.now() + dt.timedelta(days=5)).astimezone(bot_env.settings.tz)
    await staff.send("/events")
    assert "title in Chinese" in texts(await staff.press("➕ New event"))
    await staff.send("古籍修复工作坊")
    await staff.send("Rare-book repair workshop")
    await staff.send("-")
    assert "When does it start" in texts(await staff.send("Mend a thread-bound book."))
    assert "write the date" in texts(await staff.send("next friday"))
    await staff.send(start.strftime("%Y-%m-%d 14:00"))
    assert "Where?" in texts(await staff.send("16:30"))
    await staff.press("B1 Compact stacks")
    await staff.send("10")
    await staff.press("Workshop")
    await staff.press("Card holders only")
    preview = texts(await staff.press("Open now, until the start"))
    assert "Rare-book repair workshop" in preview and "14:00–16:30" in preview
    assert "Event #1 is published; 1 subscribers" in texts(await staff.press("Publish"))

    news = (await fang.wait_for(containing("New event")))[-1]
    await fang.press("Details", message=news)
    assert "You are registered" in texts(await fang.press("✅ Register"))

    # A new place is told to every registrant; the registrants as CSV.
    await staff.send("/events")
    view = texts(await staff.press("1. Rare-book repair workshop"))
    assert "1 registered, 0 waiting" in view and "Organiser: Li Na" in view
    await staff.press("Change place")
    assert "1 registrants are told" in texts(await staff.press("4F Study rooms"))
    assert "4F Study rooms" in (await fang.wait_for(containing("Change to")))[-1]["text"]
    await staff.send("/events")
    await staff.press("1. Rare-book repair workshop")
    assert "The new start" in texts(await staff.press("Change time"))
    assert "1 registrants are told" in texts(await staff.send(start.strftime("%Y-%m-%d 15:00")))
    moved = await fang.wait_for(lambda m: "Change to" in (m["text"] or "") and "15:00–17:30" in m["text"])
    assert "4F Study rooms" in moved[-1]["text"]
    await staff.send("/events")
    await staff.press("1. Rare-book repair workshop")
    sheet = await files(staff, await staff.press("Registrants (CSV)"), "document")
    rows = (await document_text(bot_env, sheet)).decode().splitlines()
    assert rows[0].startswith("event_id,title,name,telegram_id,status") and f",{FANG},registered," in rows[1]

    # Cancelled: everyone is told.
    assert "Everyone registered or waiting (1)" in texts(await staff.press("Cancel this event"))
    assert "cancelled; 1 people are told" in texts(await staff.press("Yes, cancel it and tell everyone"))
    await fang.wait_for(containing("has been cancelled"))
    assert "No upcoming events" in texts(await fang.send("/events"))


async def test_five_a_page_and_the_category_filter(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    first = bot_env.now() + dt.timedelta(days=1)
    async with bot_env.db.session() as s:
        for n in range(7):
            starts = first + dt.timedelta(days=n)
            await create_event(
                s, EventDraft(title_zh=f"活动{n}", title_en=f"Event {n}", starts_at=starts, ends_at=starts + dt.timedelta(hours=1),
                              place="1F", category="children" if n in (2, 6) else "lecture"),
                now=bot_env.now(), tz=bot_env.settings.tz, policy=bot_env.policy)
    fang = await watch(bot_env, FANG)
    page = texts(await fang.send("/events"))
    assert "(1–5 of 7)" in page and "Event 4" in page and "Event 5" not in page and "Seats left: no limit" in page
    page = texts(await fang.press("ev:l:-:1"))  # Next
    assert "(6–7 of 7)" in page and "Event 6" in page and "Event 0" not in page
    await fang.press("🔎 Category")
    children = texts(await fang.press("Children"))
    assert "in “Children”" in children and "(1–2 of 2)" in children and "Event 2" in children and "Event 0" not in children


async def test_two_bot_processes_send_each_reminder_once(db: Database) -> None:
    """Two bot applications, each with its own connection pool (as two processes have), run the
    reminder job at the same moment, twice over, and after a restart of one: every registrant gets
    exactly one 24-hour reminder, delivered once by the two outbox dispatchers."""
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    policy = Policy()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db.url, telegram_api_url=emulator.base_url, staff_chat_id=STAFF_CHAT_ID, language="en",
    )
    dbs = [Database(db.url), Database(db.url)]
    apps = [await start_bot(settings, d, policy, TOKEN, poll=False) for d in dbs]
    people = list(range(5001, 5013))
    try:
        now = apps[0].bot_data["services"].now()
        start = now + dt.timedelta(days=2)
        async with db.session() as s:
            created = await create_event(
                s, EventDraft(title_zh="讲座", title_en="Twin lecture", starts_at=start, ends_at=start + dt.timedelta(hours=1),
                              place="3F", category="lecture"), now=now, tz=settings.tz, policy=policy)
            assert created.event is not None
            for person in people:
                s.add(User(telegram_id=person, first_name="R", telegram_language="en"))
                await register(s, created.event.id, person, name="R", is_reader=True, now=now)
        emulator.started(*people)  # readers who pressed Start long ago: the bot may write to them
        for app in apps:
            app.bot_data["services"].clock_offset = dt.timedelta(days=1, hours=1)

        async def run_everywhere() -> None:
            await asyncio.gather(*(job.run(app) for app in apps for job in app.job_queue.jobs() if job.name == "events.reminders"))

        await run_everywhere()
        await run_everywhere()
        await stop_bot(apps[1])
        apps[1] = await start_bot(settings, dbs[1], policy, TOKEN, poll=False)  # a restart of one of them
        # The same clock as the other process: processes share one (their outbox leases compare it).
        apps[1].bot_data["services"].clock_offset = dt.timedelta(days=1, hours=1)
        await run_everywhere()

        async def delivered() -> list[int]:
            return [sum("is tomorrow" in (m["text"] or "") for m in emulator.chat_messages(p) if m["from_bot"]) for p in people]

        for _ in range(300):
            if all(await delivered()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # time for a second copy, were there one
        assert await delivered() == [1] * len(people)
        async with db.session() as s:
            rows = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.text_key == "events.push_reminder_24h"))
        assert rows == len(people)
    finally:
        for app in apps:
            await stop_bot(app)
        await emulator.stop()
