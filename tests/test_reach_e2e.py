"""Readers the bot cannot reach, end to end: a card imported with a Telegram id whose owner never
pressed Start gets Telegram's 403 "bot can't initiate conversation with a user" for the morning
digest; the bot marks them unreachable without retrying, skips them the next mornings, and the
staff digest says how many readers with loans it cannot reach."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import select

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from storage.catalog import Item
from storage.circulation import Loan
from storage.outbox import Delivery, DeliveryState
from storage.people import User
from tests.circ_helpers import card, title

NEVER_STARTED, STARTED = 7101, 7102


async def overdue_loan(env: EmbeddedBot, reader_id: int, control: str) -> None:
    async with env.db.session() as s:
        record = await title(s, control, f"Title {control}")
        item = await s.scalar(select(Item).where(Item.record_id == record.id))
        assert item is not None
        item.status = "on_loan"
        due = env.now() - dt.timedelta(days=1)
        s.add(Loan(item_id=item.id, reader_id=reader_id, checked_out_at=due - dt.timedelta(days=28), due_at=due))


async def morning(env: EmbeddedBot) -> None:
    """The daily notice job, as the job queue runs it, then until the outbox has nothing left."""
    assert env.app is not None and env.app.job_queue is not None
    [job] = env.app.job_queue.get_jobs_by_name("daily-notices")
    await job.run(env.app)
    for _ in range(300):
        async with env.db.session() as s:
            left = await s.scalar(
                select(Delivery.id).where(Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING])).limit(1)
            )
        if left is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the outbox did not empty")


def staff_texts(env: EmbeddedBot) -> list[str]:
    return [str(m.get("caption") or m["plain"]) for m in env.emulator.chat_messages(STAFF_CHAT_ID) if m["from_bot"]]


async def test_readers_who_never_pressed_start_are_skipped_and_counted_for_staff(bot_env: EmbeddedBot) -> None:
    env = bot_env
    async with env.db.session() as s:
        imported = await card(s, "IMP1", telegram_id=NEVER_STARTED)  # from the library's CSV
        linked = await card(s, "ACT1", telegram_id=STARTED)
    env.emulator.started(STARTED)  # this one pressed Start long ago
    await overdue_loan(env, imported.id, "NS")
    await overdue_loan(env, linked.id, "ST")

    await morning(env)
    async with env.db.session() as s:
        rows = {r.chat_id: r for r in await s.scalars(select(Delivery).where(Delivery.text_key == "loans.digest"))}
        user = await s.get(User, NEVER_STARTED)
    refused = rows[NEVER_STARTED]
    assert refused.state == DeliveryState.UNREACHABLE and refused.attempts == 1  # no retry
    assert "bot can't initiate conversation with a user" in (refused.last_error or "")
    assert user is not None and user.unreachable
    assert rows[STARTED].state == DeliveryState.SENT
    assert any("Title ST" in m["plain"] for m in env.emulator.chat_messages(STARTED))
    assert env.emulator.chat_messages(NEVER_STARTED) == []

    env.move_clock(dt.timedelta(days=6))  # 7 days overdue: a new digest level for both
    await morning(env)
    async with env.db.session() as s:
        digests = list(await s.scalars(select(Delivery).where(Delivery.text_key == "loans.digest")))
    assert sorted(d.chat_id for d in digests) == [NEVER_STARTED, STARTED, STARTED]  # skipped, not retried
    assert "机器人无法联系的读者（从未按过“开始”或已屏蔽机器人）：1 人" in staff_texts(env)[-1]  # the staff chat reads Chinese
    assert env.emulator.stats.forbidden == 1

