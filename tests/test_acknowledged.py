"""An update acknowledged is an update answered: the real bot process (``python -m bot.cli run``)
is killed with SIGKILL while it answers many people, in long polling and in webhook mode; after a
restart every person is answered, and an update is never processed twice because a copy of it came
again (Telegram resends what it was not told had arrived)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.embedded import TOKEN
from bot.emulator import Emulator
from storage.db import Database
from storage.state import ProcessedUpdate
from tests.auxil.subprocess_bot import BotProcess, free_port

HOURS = "Sample Library"
PEOPLE = 200
FIRST_ID = 7_000


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(token=TOKEN)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def hours_update(update_id: int, user_id: int) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": 1, "date": int(time.time()), "text": "/hours",
            "entities": [{"type": "bot_command", "offset": 0, "length": 6}],
            "chat": {"id": user_id, "type": "private", "first_name": "Visitor"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Visitor", "language_code": "en"},
        },
    }


def answers(emulator: Emulator, chat_id: int) -> int:
    return sum(1 for m in emulator.chat_messages(chat_id) if m["from_bot"] and HOURS in (m["text"] or ""))


def answered(emulator: Emulator) -> int:
    return sum(1 for k in range(PEOPLE) if answers(emulator, FIRST_ID + k))


async def until(condition: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def everyone_answered_after_a_sigkill(db: Database, emulator: Emulator, tmp_path: Path, *, webhook: bool) -> None:
    bot = BotProcess(db.url, emulator.base_url, tmp_path / "bot.log", webhook_port=free_port() if webhook else None)
    await bot.start()
    try:
        for k in range(PEOPLE):
            emulator.inject_update(hours_update(100_000 + k, FIRST_ID + k))
        # Killed while it works through them: some answered, most received (and acknowledged) only.
        assert await until(lambda: answered(emulator) >= 10, timeout=60), bot.new_log()[-3000:]
        bot.kill()
        await asyncio.sleep(0.5)  # the emulator (in this loop) takes in the requests that reached it before the kill
        at_the_kill = answered(emulator)
        assert at_the_kill < PEOPLE  # (otherwise the kill came too late to test anything)
        async with db.session() as s:
            done_at_the_kill = await s.scalar(
                select(func.count()).select_from(ProcessedUpdate).where(ProcessedUpdate.done_at.is_not(None)))
        # A copy of an update already received arrives again: it is not processed twice.
        emulator.inject_update(hours_update(100_000, FIRST_ID))
        await bot.start()
        done = await until(lambda: answered(emulator) == PEOPLE, timeout=120)
        assert done, (at_the_kill, answered(emulator), bot.new_log()[-3000:])
        for _ in range(100):  # and everything stored is done
            async with db.session() as s:
                left = await s.scalar(select(func.count()).select_from(ProcessedUpdate).where(ProcessedUpdate.done_at.is_(None)))
            if not left:
                break
            await asyncio.sleep(0.1)
        assert not left
        await asyncio.sleep(1)  # a second answer, if any, would arrive now
    finally:
        bot.kill()
    counts = [answers(emulator, FIRST_ID + k) for k in range(PEOPLE)]
    assert min(counts) == 1
    # Only an update whose answer was out but which was not yet marked done when the process died is
    # answered again (Telegram cannot be asked what was sent): no other.
    assert sum(counts) - PEOPLE <= at_the_kill - done_at_the_kill, [FIRST_ID + k for k, n in enumerate(counts) if n > 1]
    assert "Traceback" not in bot.log(), bot.log()[-3000:]


async def test_sigkill_while_polling_loses_no_update(db: Database, emulator: Emulator, tmp_path: Path) -> None:
    await everyone_answered_after_a_sigkill(db, emulator, tmp_path, webhook=False)


async def test_sigkill_in_webhook_mode_loses_no_update(db: Database, emulator: Emulator, tmp_path: Path) -> None:
    await everyone_answered_after_a_sigkill(db, emulator, tmp_path, webhook=True)
