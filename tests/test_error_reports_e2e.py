"""Errors reach someone: an unexpected error in a handler of the running bot is reported privately
to the admins (id, kind of update, exception, where; nothing personal), once per kind of error
every ten minutes of the bot's clock; the person who hit it is told to try again."""

from __future__ import annotations

import asyncio
import datetime as dt

from telegram import Update
from telegram.ext import CommandHandler, ContextTypes

from bot.embedded import EmbeddedBot
from tests.auxil.chat import Chat, texts
from tests.auxil.people import make_person

READER, ADMIN, STAFF = 9301, 9302, 9303


async def broken_renewal(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A handler with a bug, whose message names the person (as careless code does)."""
    assert update.effective_user is not None
    raise RuntimeError(f"no loan for user {update.effective_user.id} named 'Ann Lee'")


async def broken_lookup(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    raise KeyError("C-ANN-0042")


def reports(env: EmbeddedBot, chat_id: int) -> list[str]:
    return [m["plain"] for m in env.emulator.chat_messages(chat_id) if m["from_bot"] and "Unexpected error" in (m["plain"] or "")]


async def until_count(env: EmbeddedBot, chat_id: int, count: int) -> list[str]:
    for _ in range(400):
        found = reports(env, chat_id)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} reports, have {reports(env, chat_id)}")


async def test_unexpected_errors_are_reported_to_admins_once_per_kind_per_ten_minutes(bot_env: EmbeddedBot) -> None:
    env = bot_env
    assert env.app is not None
    # Two buggy commands, after the bot's own handlers (the unknown-command answer does not stop them).
    env.app.add_handler(CommandHandler("brokenrenew", broken_renewal), group=7)
    env.app.add_handler(CommandHandler("brokenlookup", broken_lookup), group=7)
    await make_person(env.db, READER, "reader", first_name="Ann")
    await make_person(env.db, ADMIN, "admin")
    await make_person(env.db, STAFF, "staff")
    env.emulator.started(ADMIN, STAFF)  # staff who pressed Start long ago: the bot may write to them
    reader = Chat(env, READER, first_name="Ann")

    told = await reader.send("/brokenrenew my secret words")
    assert "went wrong" in texts(told).lower() or "try again" in texts(told).lower()
    first = (await until_count(env, ADMIN, 1))[0]
    assert "Update: message /brokenrenew" in first
    assert "RuntimeError: no loan for user … named '…'" in first
    assert "tests/test_error_reports_e2e.py:" in first and "in broken_renewal" in first
    for private in ("secret", "Ann Lee", str(READER)):
        assert private not in first
    assert reports(env, STAFF) == []  # admins only

    # The same error again within ten minutes: not reported; another kind: reported at once.
    await reader.send("/brokenrenew")
    await reader.send("/brokenrenew")
    await reader.send("/brokenlookup")
    found = await until_count(env, ADMIN, 2)
    assert "KeyError: '…'" in found[1] and "C-ANN" not in found[1]
    await asyncio.sleep(0.5)
    assert len(reports(env, ADMIN)) == 2

    # Ten minutes later the next one is reported, with how many were held back.
    env.move_clock(dt.timedelta(minutes=10, seconds=1))
    await reader.send("/brokenrenew")
    third = (await until_count(env, ADMIN, 3))[2]
    assert "RuntimeError" in third and "2 more times since the last report" in third
