"""Incident reports end to end: the real bot over HTTP through the emulator, as a visitor reporting,
the duty officer and the staff chat alerted, escalation to every staff member when nobody takes it
(the clock moved, the jobs run), "I'm handling it" shown to everyone and the reporter told."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from bot.emulator import Person
from storage.incidents import Incident
from storage.outbox import Delivery
from storage.people import Role, User, add_staff

VISITOR, READER, STAFF, STAFF2, DUTY = 5001, 5002, 9001, 9003, 9002


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or "") or fragment in (m["plain"] or "")


async def watch(env: EmbeddedBot, user_id: int, *, chat_id: int | None = None, language_code: str = "en") -> Person:
    """A person whose chat is followed from now on (pushes arriving later are seen by ``wait_for``)."""
    person = await env.person(user_id, chat_id=chat_id, language_code=language_code)
    person.quiet = 0.15
    await person.__aenter__()
    return person


async def latest(person: Person, fragment: str) -> dict[str, Any]:
    found = [m for m in person.bot_messages() if containing(fragment)(m)]
    return found[-1] if found else (await person.wait_for(containing(fragment)))[-1]


async def setup(env: EmbeddedBot) -> None:
    async with env.db.session() as s:
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, STAFF2, Role.STAFF, "Chen Jie")
        await add_staff(s, DUTY, Role.DUTY_OFFICER, "Zhao Lei")
        for uid in (STAFF, STAFF2, DUTY):
            s.add(User(telegram_id=uid, first_name=str(uid), telegram_language="en"))
    env.emulator.started(STAFF, STAFF2, DUTY)  # they pressed Start some time ago


async def test_a_report_reaches_the_duty_officer_escalates_and_is_taken(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    visitor = await watch(bot_env, VISITOR)
    duty = await watch(bot_env, DUTY)
    staff = await watch(bot_env, STAFF)
    staff2 = await watch(bot_env, STAFF2)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID, language_code="zh")

    await visitor.send("/report")
    await visitor.press("Water leak")
    await visitor.press("2F Sciences reading area")
    await visitor.press("Send without photo")
    await latest(visitor, "Report #1 has reached the staff on duty")  # waits for it on a slow machine

    alert = await latest(duty, "Incident #1: Water leak")
    assert "2F Sciences reading area" in alert["text"] and alert["buttons"][0][0]["callback_data"] == "inc:take:1"
    assert "漏水" in (await latest(group, "突发事件 #1"))["text"]  # the staff chat, in the library's language
    assert not [m for m in staff.bot_messages() if "#1" in (m["text"] or "")]  # staff are not alerted yet

    bot_env.move_clock(dt.timedelta(minutes=4))
    await bot_env.run_jobs()
    bot_env.move_clock(dt.timedelta(minutes=2))
    await bot_env.run_jobs()
    await bot_env.run_jobs()  # a second run (or a second process) sends nothing more
    escalation = await latest(staff, "Nobody has taken incident #1 for 5 min")
    await latest(staff2, "Nobody has taken incident #1")
    await latest(duty, "Nobody has taken incident #1")
    async with bot_env.db.session() as s:
        sent = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.text_key == "incidents.escalation"))
    assert sent == 3

    await staff2.press("🙋 I'm handling it")
    assert "You are handling incident #1" in staff2.last_callback_answer["text"]
    told = await latest(visitor, "is handling your report #1")
    assert "Chen Jie" in told["text"]
    edited = await duty.wait_for(lambda m: m["message_id"] == alert["message_id"] and "Handled by Chen Jie" in m["text"])
    assert edited[-1]["buttons"] == []
    await group.wait_for(lambda m: "由 Chen Jie 处理" in (m["text"] or ""))

    # Li Na's copy lost its button too; a press that raced the edit is told who was first.
    assert (await staff.wait_for(lambda m: m["message_id"] == escalation["message_id"] and not m["buttons"]))
    await staff.press_data(escalation["message_id"], "inc:take:1")
    assert "already handled by Chen Jie" in staff.last_callback_answer["text"]
    async with bot_env.db.session() as s:
        incident = await s.get(Incident, 1)
    assert incident is not None and incident.handled_by == STAFF2


async def test_report_with_typed_place_and_photo_and_bad_input(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    visitor = await watch(bot_env, VISITOR)
    duty = await watch(bot_env, DUTY)

    await visitor.send("/report")
    asked = await visitor.press("Fire or smoke")
    await visitor.press_data(asked[-1]["message_id"], "rep:p:ZZ")  # a forged place
    assert "I don't know that place" in visitor.last_callback_answer["text"]
    too_long = await visitor.send("x" * 201)
    assert "at most 200 characters" in too_long[-1]["text"]
    await visitor.send("next to the <east> stairs")
    asked_photo = await visitor.send("not a photo")
    assert "Please send a photo" in asked_photo[-1]["text"]
    done = await visitor.send_photo()
    assert "Report #1" in done[-1]["text"]

    alert = await latest(duty, "Incident #1: Fire or smoke")
    assert alert["photo"] and "next to the <east> stairs" in alert["plain"]

    # A visitor cannot take an incident, even with forged button data.
    await visitor.press_data(done[-1]["message_id"], "inc:take:1")
    assert "only for library staff" in visitor.last_callback_answer["text"]
    async with bot_env.db.session() as s:
        assert (await s.get(Incident, 1)).handled_by is None  # type: ignore[union-attr]

    # /cancel leaves the conversation half way.
    await visitor.send("/report")
    cancelled = await visitor.send("/cancel")
    assert "Cancelled" in cancelled[-1]["text"]


async def test_only_duty_officers_see_the_incident_reports(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    visitor = await watch(bot_env, VISITOR)
    staff = await watch(bot_env, STAFF)
    duty = await watch(bot_env, DUTY)
    refused = await visitor.send("/incidents")
    assert "only for library staff" in refused[-1]["text"]
    assert "only for the duty officers" in (await staff.send("/incidents"))[-1]["text"]
    empty = await duty.send("/incidents")
    assert "No incidents have been recorded" in empty[-1]["text"]

    await visitor.send("/report")
    await visitor.press("Power failure")
    await visitor.press("B1 Compact stacks")
    await visitor.press("Send without photo")
    await latest(duty, "Incident #1")
    listing = await duty.send("/incidents")
    assert "#1" in listing[-1]["text"] and "Power failure" in listing[-1]["text"] and "waiting for someone" in listing[-1]["text"]
    report = await duty.press("#1")
    assert "Incident #1" in report[-1]["text"] and "B1 Compact stacks" in report[-1]["text"]
