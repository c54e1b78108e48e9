"""Emergency broadcasts end to end through the emulator: a real broadcast in each recipient's
language with the live progress message, confirming twice, staff acknowledgements with "Need
help", reminders, the all-clear, a drill kept apart, bad input, 403 and 429."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from sqlalchemy import func, select

from bot.embedded import EmbeddedBot
from bot.emulator import Person
from storage.incidents import Broadcast
from storage.outbox import Delivery, DeliveryState
from storage.people import Reader, Role, User, add_staff

DUTY, DUTY2, STAFF, STAFF_ZH = 9002, 9004, 9001, 9005
READERS_EN, READERS_ZH, VISITOR = [101, 102], [103], 201


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or "") or fragment in (m["plain"] or "")


async def watch(env: EmbeddedBot, user_id: int, *, language_code: str = "en") -> Person:
    person = await env.person(user_id, language_code=language_code)
    person.quiet = 0.15
    await person.__aenter__()
    return person


async def latest(person: Person, fragment: str, within: float = 10) -> dict[str, Any]:
    found = [m for m in person.bot_messages() if containing(fragment)(m)]
    return found[-1] if found else (await person.wait_for(containing(fragment), timeout=within))[-1]


async def setup(env: EmbeddedBot) -> None:
    """Two duty officers, two staff (one reads Chinese), three readers and a visitor: 8 people."""
    async with env.db.session() as s:
        for uid, role, name, lang in (
            (DUTY, Role.DUTY_OFFICER, "Zhao Lei", "en"), (DUTY2, Role.DUTY_OFFICER, "Sun Li", "en"),
            (STAFF, Role.STAFF, "Li Na", "en"), (STAFF_ZH, Role.STAFF, "Wang Wei", "zh"),
        ):
            await add_staff(s, uid, role, name)
            s.add(User(telegram_id=uid, first_name=name, telegram_language=lang))
        for uid in READERS_EN + READERS_ZH:
            reader = Reader(card_number=f"C{uid}", name=f"Reader {uid}", pin_hash="x")
            s.add(reader)
            await s.flush()
            s.add(User(telegram_id=uid, first_name=f"R{uid}", telegram_language="zh" if uid in READERS_ZH else "en", reader_id=reader.id))
        s.add(User(telegram_id=VISITOR, first_name="Guest", telegram_language="en"))
    env.emulator.started(DUTY, DUTY2, STAFF, STAFF_ZH, *READERS_EN, *READERS_ZH, VISITOR)  # they pressed Start


async def forge(person: Person, data: str) -> str:
    """Press forged button data on a message of the person's own chat; the toast they get."""
    if person.last_message() is None:
        await person.send("/hours")
    last = person.last_message()
    assert last is not None
    await person.press_data(last["message_id"], data)
    assert person.last_callback_answer is not None
    return str(person.last_callback_answer["text"])


async def finished(env: EmbeddedBot, duty: Person, broadcast_id: int) -> dict[str, Any]:
    """Run the progress job (the clock moved past its 3 s pace) until it reports the broadcast done."""
    for _ in range(50):
        env.move_clock(dt.timedelta(seconds=4))
        await env.run_jobs()
        await asyncio.sleep(0.1)
        done = [m for m in duty.bot_messages() if f"Broadcast #{broadcast_id}</b>" in (m["text"] or "") and "done in" in m["text"]]
        if done:
            return done[-1]
    raise AssertionError("the broadcast did not finish")


async def prepare(duty: Person, command: str, kind: str, place: str, audience: str) -> list[dict[str, Any]]:
    """Walk the steps up to the preview; the preview messages."""
    await duty.send(command)
    await duty.press(kind)
    await duty.press(place)
    await duty.press("✅ Use this text")
    return await duty.press(audience)


async def test_broadcast_acknowledgements_reminders_allclear_and_reports(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    duty2 = await watch(bot_env, DUTY2)
    staff = await watch(bot_env, STAFF)
    staff_zh = await watch(bot_env, STAFF_ZH, language_code="zh")
    reader_en = await watch(bot_env, READERS_EN[0])
    reader_zh = await watch(bot_env, READERS_ZH[0], language_code="zh")
    visitor = await watch(bot_env, VISITOR)

    await duty.send("/emergency")
    await duty.press("Fire")
    drafted = await duty.press("3F Social Sciences reading area")
    assert "火警" in drafted[-1]["text"] and "FIRE at 3F Social Sciences reading area" in drafted[-1]["text"]
    audiences = await duty.press("✅ Use this text")
    labels = [b["text"] for row in audiences[-1]["buttons"] for b in row]
    assert labels[:3] == ["Everyone (8)", "Readers only (3)", "Staff only (4)"]
    preview = await duty.press("Everyone (8)")
    assert "Preview" in preview[-1]["text"] and "To: everyone who started the bot, 8 people" in preview[-1]["text"]

    # A duty officer who did not write it cannot send it; a reader cannot either.
    assert "Only the duty officer who prepared" in await forge(duty2, preview[-1]["buttons"][0][0]["callback_data"])
    assert "only for library staff" in await forge(visitor, preview[-1]["buttons"][0][0]["callback_data"])

    confirm = preview[-1]["buttons"][0][0]
    assert confirm["text"] == "📣 Send to 8 people"
    await duty.press(confirm["text"])
    await duty.press_data(preview[-1]["message_id"], confirm["callback_data"])  # pressed twice
    assert "already sent" in duty.last_callback_answer["text"]

    got_en = await latest(reader_en, "FIRE at 3F")
    got_zh = await latest(reader_zh, "【火警】")
    assert got_en["buttons"] == [] and "FIRE" not in got_zh["text"]
    staff_copy = await latest(staff, "FIRE at 3F")
    assert [b["text"] for b in staff_copy["buttons"][0]] == ["✅ Received", "🟢 I'm safe", "🆘 Need help"]
    await latest(staff_zh, "员工请用下方按钮回复")
    await latest(visitor, "FIRE at 3F")
    await latest(duty, "FIRE at 3F")  # the author's own copy comes a second after their last answer

    progress = await finished(bot_env, duty, 1)
    assert "done in" in progress["text"] and "Delivered: 8 of 8" in progress["text"], progress["text"]
    async with bot_env.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Broadcast)) == 1
        assert await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.broadcast_id == 1)) == 8

    # Acknowledgements: a reader's forged press is refused; "Need help" alerts the duty officers with who and where.
    await reader_en.press_data(got_en["message_id"], "ack:1:s")
    assert "not for you" in reader_en.last_callback_answer["text"]
    await staff_zh.press("🟢 我平安")
    assert "您平安" in staff_zh.last_callback_answer["text"]
    asked = await staff.press("🆘 Need help")
    assert "Where are you?" in asked[-1]["text"]
    alert = await latest(duty, "Li Na needs help")
    await latest(duty2, "Li Na needs help")
    assert "Place not given yet" in alert["text"]
    await staff.press("2F Sciences reading area")
    await latest(duty, "Li Na needs help at 2F Sciences reading area")

    # After ack_minutes the silent staff (the two duty officers) are reminded once and listed.
    bot_env.move_clock(dt.timedelta(minutes=11))
    await bot_env.run_jobs()
    await bot_env.run_jobs()
    await latest(duty2, "Please answer emergency notice #1")
    listing = await latest(duty, "2 staff have not answered")
    assert "Sun Li" in listing["text"] and "Zhao Lei" in listing["text"] and "Li Na" not in listing["text"]
    async with bot_env.db.session() as s:
        reminders = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.text_key == "broadcast.ack_reminder"))
    assert reminders == 2

    # The all-clear goes to the same 8 people and closes the incident.
    clear = await duty.send("/allclear")
    assert "All-clear for #1" in clear[-1]["text"]
    await duty.press("📣 Send all-clear to 8 people")
    await latest(reader_en, "ALL CLEAR")
    await latest(reader_zh, "【解除】")
    await latest(duty, "ALL CLEAR")  # the duty officer is one of the 8: their copy, before the report
    assert "no active emergency" in (await duty.send("/allclear"))[-1]["text"]

    # The report and the CSV of every recipient.
    await duty.send("/incidents")
    await duty.press("#1")
    text = (await latest(duty, "Incident #1"))["text"]  # the all-clear push to the duty officer may come after it
    assert "Incident #1" in text and "Delivered 8" in text and "need help 1" in text and "safe 1" in text
    assert "All-clear #2" in text
    # Other pushes (late acknowledgements, progress) may arrive around the file: look for the file.
    answers = await duty.press("CSV #1")
    files = [m for m in answers if m.get("document")] or await duty.wait_for(lambda m: bool(m.get("document")))
    document = files[-1]["document"]
    assert document["file_name"] == "broadcast-1-recipients.csv"


async def test_a_drill_with_edited_text_is_marked_and_kept_apart(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    staff = await watch(bot_env, STAFF)
    reader = await watch(bot_env, READERS_EN[0])

    asked = await duty.send("/drill")
    assert "【演练 DRILL】" in asked[-1]["text"]
    await duty.press("Evacuation")
    typed = await duty.send("the east wing")
    assert "【演练 DRILL】" in typed[-1]["text"] and "the east wing" in typed[-1]["text"]
    await duty.press("✏️ Edit English")
    assert "The text is empty" in (await duty.send("   "))[-1]["text"]
    too_long = await duty.send("x" * 5000)
    assert "That text has 5,000 characters" in too_long[-1]["text"] and "4,096" in too_long[-1]["text"]
    shown = await duty.send("Drill: leave by the <east> exit & wait outside.")
    assert "Drill: leave by the <east> exit & wait outside." in shown[-1]["plain"]
    await duty.press("✅ Use this text")
    preview = await duty.press("Staff only (4)")
    assert "【演练 DRILL】" in preview[-1]["text"]
    await duty.press("📣 Send drill to 4 people")

    got = await latest(staff, "Drill: leave by the <east> exit")
    assert got["plain"].startswith("【演练 DRILL】")
    assert not [m for m in reader.bot_messages() if "DRILL" in (m["text"] or "")]

    listing = await duty.send("/incidents")
    assert "No incidents have been recorded" in listing[-1]["text"]
    drills = await duty.press("Drills")
    assert "#1" in drills[-1]["text"] and "Evacuation" in drills[-1]["text"]


async def test_bad_input_is_refused_politely(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    reader = await watch(bot_env, READERS_EN[0])

    assert "only for library staff" in (await reader.send("/emergency"))[-1]["text"]
    assert "only for library staff" in (await reader.send("/drill"))[-1]["text"]
    assert "only for library staff" in (await reader.send("/allclear"))[-1]["text"]
    assert "no active emergency" in (await duty.send("/allclear"))[-1]["text"]

    await duty.send("/emergency")
    places = await duty.press("Flood")
    await duty.press_data(places[-1]["message_id"], "em:p:ZZ")
    assert "I don't know that place" in duty.last_callback_answer["text"]
    await duty.press("the whole building")
    cancelled = await duty.press("Cancel")
    assert "nothing was sent" in cancelled[-1]["text"]
    await duty.press_data(places[-1]["message_id"], "bc:go:99")  # a draft that never existed
    assert "no longer exists" in duty.last_callback_answer["text"]
    async with bot_env.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery)) == 0


async def test_blocked_recipients_and_flood_limits(bot_env: EmbeddedBot) -> None:
    """403: the reader who blocked the bot is unreachable (no retry); 429: with Telegram allowing
    only 4 messages a second, everybody still gets the notice exactly once, and a reader chatting
    meanwhile is answered."""
    await setup(bot_env)
    async with bot_env.db.session() as s:
        for uid in range(300, 304):
            s.add(User(telegram_id=uid, first_name=f"U{uid}", telegram_language="en"))
    bot_env.emulator.started(*range(300, 304))
    duty = await watch(bot_env, DUTY)
    reader = await watch(bot_env, READERS_EN[1])
    bot_env.emulator.block(READERS_EN[0])
    preview = await prepare(duty, "/emergency", "Power outage", "1F Lobby and circulation desk", "Everyone (12)")
    bot_env.emulator.set_limits(global_rate=4, per_chat_rate=None)
    await duty.press(preview[-1]["buttons"][0][0]["text"])
    hours = await reader.send("/hours", timeout=15)
    assert "Sample Library" in hours[-1]["text"]

    async def settled() -> bool:
        async with bot_env.db.session() as s:
            left = await s.scalar(
                select(func.count()).select_from(Delivery)
                .where(Delivery.broadcast_id == 1, Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING]))
            )
        return left == 0

    for _ in range(200):
        if await settled():
            break
        await asyncio.sleep(0.1)
    assert await settled()
    stats = bot_env.emulator.stats
    assert stats.too_many_requests > 0  # the emulator refused some, the dispatcher waited and retried
    async with bot_env.db.session() as s:
        rows = {r.chat_id: r for r in await s.scalars(select(Delivery).where(Delivery.broadcast_id == 1))}
        blocked = await s.get(User, READERS_EN[0])
    assert rows[READERS_EN[0]].state == DeliveryState.UNREACHABLE and rows[READERS_EN[0]].attempts == 1
    assert blocked is not None and blocked.unreachable
    assert all(r.state == DeliveryState.SENT for uid, r in rows.items() if uid != READERS_EN[0])
    for uid in rows:  # everybody reachable got it exactly once
        copies = [m for m in bot_env.emulator.chat_messages(uid) if m["plain"].startswith(("POWER OUTAGE", "【停电】"))]
        assert len(copies) == (0 if uid == READERS_EN[0] else 1), uid
