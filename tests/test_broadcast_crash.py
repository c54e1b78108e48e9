"""Crash safety of a broadcast: the production bot (``python -m bot.cli run``) sends a broadcast to
the emulator running in this test, is killed with SIGKILL half way, and is started again. Every
recipient gets the notice; only messages that were in flight at the moment of the kill (rows the
dead process held) may arrive twice."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from bot.embedded import TOKEN
from bot.emulator import Emulator
from storage.db import Database, utcnow
from storage.incidents import confirm_broadcast, draft_broadcast
from storage.models import create_schema
from storage.outbox import Delivery, DeliveryState
from storage.people import Role, User, add_staff
from storage.policy import Policy
from tests.auxil.subprocess_bot import BotProcess

RECIPIENTS = 150
DUTY = 9002


async def pending(db: Database) -> int:
    async with db.session() as s:
        count = await s.scalar(
            select(func.count()).select_from(Delivery)
            .where(Delivery.broadcast_id == 1, Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING]))
        )
    return int(count or 0)


def notice_copies(emulator: Emulator) -> Counter[int]:
    """How many copies of the notice each chat received."""
    return Counter(chat for _, chat, method in emulator.stats.sends if method.lower() == "sendmessage" and chat < 100_000)


async def test_sigkill_mid_broadcast_then_restart_delivers_everyone(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}")
    await create_schema(db)
    async with db.session() as s:
        await add_staff(s, DUTY, Role.DUTY_OFFICER, "Zhao Lei")
        s.add_all(User(telegram_id=uid, first_name=f"U{uid}", telegram_language="en") for uid in range(1, RECIPIENTS + 1))
    async with db.session() as s:
        draft = await draft_broadcast(
            s, emergency_type="fire", drill=False, place_code="1F", place_text=None, audience="all",
            text_zh="火警", text_en="Fire", created_by=DUTY, now=utcnow(), policy=Policy(),
        )
    async with db.session() as s:
        await confirm_broadcast(s, draft.id, DUTY, utcnow())

    emulator = Emulator(token=TOKEN)
    emulator.started(DUTY, *range(1, RECIPIENTS + 1))  # they pressed Start some time ago
    await emulator.start()
    emulator.set_limits(global_rate=30, per_chat_rate=1)
    bot = BotProcess(db.url, emulator.base_url, tmp_path / "bot.log")
    try:
        await bot.start()
        deadline = time.monotonic() + 30
        while sum(notice_copies(emulator).values()) < RECIPIENTS // 3:
            assert time.monotonic() < deadline, bot.log()[-2000:]
            await asyncio.sleep(0.02)
        bot.kill()
        async with db.session() as s:
            held = set(await s.scalars(select(Delivery.chat_id).where(Delivery.state == DeliveryState.SENDING)))
        assert await pending(db) > 0, "the broadcast finished before the kill: nothing was tested"

        await bot.start()
        deadline = time.monotonic() + 30
        while await pending(db):
            assert time.monotonic() < deadline, bot.log()[-2000:]
            await asyncio.sleep(0.1)
        await bot.terminate()
    finally:
        bot.kill()
        await emulator.stop()
        await db.dispose()

    copies = notice_copies(emulator)
    everyone = set(range(1, RECIPIENTS + 1)) | {DUTY}
    lost = everyone - set(copies)
    twice = {chat for chat, n in copies.items() if n > 1}
    print(f"lost {len(lost)}, sent twice {len(twice)}, held at the kill {len(held)}")
    assert not lost, f"recipients skipped: {sorted(lost)}"
    assert max(copies.values()) <= 2
    assert twice <= held, f"sent twice but not in flight at the kill: {sorted(twice - held)}"
    assert "took back" in bot.log()  # the restarted process recovered the dead one's rows at once
