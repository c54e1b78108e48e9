"""The staff group changing under the running bot, against the emulator doing what Telegram does:
an upgrade to a supergroup (a new id, 400 "group chat was upgraded" for the old one, service
messages), the bot removed or muted and added back, and a forum whose topics sort the alerts."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from storage.db import Database
from storage.outbox import Delivery, Priority, enqueue
from storage.people import Role, User, add_staff
from storage.staffchat import StaffChat
from tests.auxil.chat import Chat

VISITOR, STAFF, DUTY, ADMIN = 5101, 9101, 9102, 9103
BASIC_GROUP = -4_000_001


async def setup(db: Database) -> None:
    async with db.session() as s:
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, DUTY, Role.DUTY_OFFICER, "Zhao Lei")
        await add_staff(s, ADMIN, Role.ADMIN, "Wang Fang")
        for uid in (STAFF, DUTY, ADMIN):
            s.add(User(telegram_id=uid, first_name=str(uid), telegram_language="en"))


def bot_texts(env: EmbeddedBot, chat_id: int) -> list[str]:
    return [m["text"] or "" for m in env.emulator.chat_messages(chat_id) if m["from_bot"]]


async def until(check: Callable[[], Any], what: str, tries: int = 400) -> Any:
    """Wait for a push (the outbox delivers it a moment after the update that caused it)."""
    for _ in range(tries):
        found = check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def containing(env: EmbeddedBot, chat_id: int, fragment: str) -> Callable[[], list[str]]:
    return lambda: [t for t in bot_texts(env, chat_id) if fragment in t]


async def report_incident(env: EmbeddedBot, user_id: int = VISITOR) -> None:
    visitor = Chat(env, user_id)
    await visitor.send("/report")
    await visitor.press("Water leak")
    await visitor.press("2F Sciences reading area")
    done = await visitor.press("Send without photo")
    assert "has reached the staff on duty" in done[-1]["text"]


async def stored(db: Database, configured: int) -> StaffChat:
    async with db.session() as s:
        row = await s.get(StaffChat, configured)
        assert row is not None
        return row


async def test_upgrade_found_by_a_refused_send_is_followed_and_kept_across_a_restart(db: Database) -> None:
    await setup(db)
    env = await EmbeddedBot.start(db, staff_chat_id=BASIC_GROUP)
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    try:
        # The group becomes a supergroup while the bot misses the service messages.
        new_id = env.emulator.upgrade_group(BASIC_GROUP, announce=False)
        await report_incident(env)

        # The alert refused for the old id ("group chat was upgraded") is sent again to the new one,
        # and the group is told once that its id changed.
        await until(containing(env, new_id, "突发事件 #1"), "the alert in the supergroup")
        await until(containing(env, new_id, f"{BASIC_GROUP} → {new_id}"), "the notice of the new id")
        assert bot_texts(env, BASIC_GROUP) == []
        assert (await stored(db, BASIC_GROUP)).chat_id == new_id

        # A new process reads LIBRARYBOT_STAFF_CHAT_ID (unchanged) and goes straight to the new id.
        await env.stop_bot()
        env.settings.staff_chat_id = BASIC_GROUP
        requests_before = env.emulator.stats.requests["sendMessage"]
        await env._start_app()
        await report_incident(env, VISITOR + 1)
        await until(containing(env, new_id, "突发事件 #2"), "the second alert in the supergroup")
        assert bot_texts(env, BASIC_GROUP) == []
        assert len(containing(env, new_id, f"{BASIC_GROUP} → {new_id}")()) == 1
        # After the restart nothing went to the old id first.
        async with db.session() as s:
            refused = await s.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.last_error.like("%migrated%"))
            )
        assert refused == 1  # only the first alert ever met the refusal
        assert env.emulator.stats.requests["sendMessage"] > requests_before
    finally:
        await env.stop()


async def test_upgrade_announced_by_service_messages_is_followed_before_any_alert(db: Database) -> None:
    await setup(db)
    env = await EmbeddedBot.start(db, staff_chat_id=BASIC_GROUP)
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    try:
        new_id = env.emulator.upgrade_group(BASIC_GROUP)  # both service messages reach the bot
        await until(containing(env, new_id, f"{BASIC_GROUP} → {new_id}"), "the notice of the new id")
        assert (await stored(db, BASIC_GROUP)).chat_id == new_id
        await report_incident(env)
        await until(containing(env, new_id, "突发事件 #1"), "the alert in the supergroup")
        async with db.session() as s:
            refused = await s.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.last_error.like("%migrated%"))
            )
        assert refused == 0
        assert len(containing(env, new_id, "已升级为超级群")()) == 1  # two service messages, one notice
    finally:
        await env.stop()


def healthz(env: EmbeddedBot) -> dict[str, Any]:
    assert env.emulator.url is not None
    with urllib.request.urlopen(env.emulator.url + "/healthz", timeout=10) as answer:  # noqa: S310 (loopback)
        result: dict[str, Any] = json.loads(answer.read())
        return result


async def test_bot_removed_tells_admins_sends_urgent_alerts_privately_and_recovers(bot_env: EmbeddedBot) -> None:
    env = bot_env
    await setup(env.db)
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    assert (await asyncio.to_thread(healthz, env))["staff_chat"] == {"chat_id": STAFF_CHAT_ID, "state": "ok"}

    env.emulator.set_bot_member(STAFF_CHAT_ID, "kicked")
    for uid in (DUTY, ADMIN):
        await until(containing(env, uid, "removed from the staff group"), f"{uid} told")
    assert not containing(env, STAFF, "removed from the staff group")()  # admins and duty officers only
    assert (await asyncio.to_thread(healthz, env))["staff_chat"]["state"] == "removed"

    # An incident cannot wait: every staff member gets it privately; the duty officer once.
    async with env.db.session() as s:
        await enqueue(s, STAFF_CHAT_ID, "loans.staff_digest", {"body": "digest of the day"}, kind="alert", priority=Priority.BULK)
        await enqueue(s, STAFF_CHAT_ID, "tickets.escalation", {"count": 1, "lines": "T-000042"}, kind="ticket", priority=Priority.ALERT)
    await report_incident(env)
    await until(containing(env, STAFF, "T-000042"), "the ticket escalation sent privately")
    await until(containing(env, STAFF, "Incident #1: Water leak"), "the staff member alerted privately")
    await until(containing(env, ADMIN, "Incident #1: Water leak"), "the admin alerted privately")
    await until(containing(env, DUTY, "Incident #1: Water leak"), "the duty officer alerted")
    await asyncio.sleep(0.5)
    assert len(containing(env, DUTY, "Incident #1")()) == 1
    assert bot_texts(env, STAFF_CHAT_ID) == []

    # Added back: the admins are told, the digest that waited reaches the group, health is ok again.
    env.emulator.set_bot_member(STAFF_CHAT_ID, "member")
    await until(containing(env, ADMIN, "can post in the staff group again"), "admin told it is back")
    await until(containing(env, STAFF_CHAT_ID, "digest of the day"), "the digest that waited")
    assert not containing(env, STAFF_CHAT_ID, "突发事件 #1")()  # already delivered privately
    assert (await asyncio.to_thread(healthz, env))["staff_chat"]["state"] == "ok"


async def test_refusals_without_an_update_are_noticed_from_the_send(bot_env: EmbeddedBot) -> None:
    env = bot_env
    await setup(env.db)
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    env.emulator.block(STAFF_CHAT_ID)  # 403 "bot was kicked from the group chat", and no update reached the bot
    await report_incident(env)
    await until(containing(env, STAFF, "Incident #1: Water leak"), "the staff member alerted privately")
    await until(containing(env, ADMIN, "removed from the staff group"), "admin told")
    assert (await stored(env.db, STAFF_CHAT_ID)).state == "removed"


async def test_muted_bot_is_noticed_and_recovers(bot_env: EmbeddedBot) -> None:
    env = bot_env
    await setup(env.db)
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    env.emulator.set_bot_member(STAFF_CHAT_ID, "restricted", can_send_messages=False)
    await until(containing(env, DUTY, "may no longer post in the staff group"), "duty officer told")
    await report_incident(env)
    await until(containing(env, STAFF, "Incident #1: Water leak"), "the staff member alerted privately")
    env.emulator.set_bot_member(STAFF_CHAT_ID, "administrator")
    await until(containing(env, DUTY, "can post in the staff group again"), "duty officer told it is back")
    await report_incident(env, VISITOR + 1)
    await until(containing(env, STAFF_CHAT_ID, "突发事件 #2"), "the group alerted again")


async def test_alerts_go_to_their_topic_and_the_rest_to_the_general_topic(db: Database) -> None:
    await setup(db)
    env = await EmbeddedBot.start(db, staff_topics="incidents=7, overdue=9, tickets=99")
    env.emulator.started(STAFF, DUTY, ADMIN)  # staff who pressed Start long ago: the bot may write to them
    try:
        env.emulator.make_forum(STAFF_CHAT_ID, {7: "Incidents", 9: "Overdue"})
        await report_incident(env)
        async with db.session() as s:
            await enqueue(s, STAFF_CHAT_ID, "loans.staff_digest", {"body": "digest of the day"}, kind="alert", priority=Priority.BULK)
            # A topic that does not exist in the group (a mistake in LIBRARYBOT_STAFF_TOPICS).
            await enqueue(s, STAFF_CHAT_ID, "tickets.escalation", {"count": 1, "lines": "T-000001"}, kind="ticket", priority=Priority.ALERT)

        def threads() -> dict[str, Any]:
            found = {}
            for m in env.emulator.messages_api(STAFF_CHAT_ID):
                for fragment in ("突发事件 #1", "digest of the day", "T-000001"):
                    if fragment in (m.get("text") or m.get("caption") or ""):
                        found[fragment] = m.get("message_thread_id")
            return found if len(found) == 3 else {}

        found = await until(threads, "three alerts in the group")
        assert found == {"突发事件 #1": 7, "digest of the day": 9, "T-000001": None}
        assert [m for m in env.emulator.messages_api(STAFF_CHAT_ID) if "T-000001" in (m.get("text") or "")][0].get("is_topic_message") is None
    finally:
        await env.stop()
