"""The outbox and its dispatcher, against a fake Bot: priorities, the shared budget, 403 / 429 /
network errors, per-chat pace, leases and recovery after a crash, several dispatchers at once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter

from bot.dispatcher import REPLY_PRIORITY, Dispatcher, SendBudget, render
from storage.db import Database, utcnow
from storage.outbox import (
    Delivery,
    DeliveryState,
    Priority,
    claim_due,
    enqueue,
    enqueue_many,
    recover_stale,
)
from storage.people import User


class FakeBot:
    """Records sends; ``failures[chat_id]`` is a list of exceptions raised by the next sends there."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sent: list[tuple[int, str]] = []
        self.failures: dict[int, list[Exception]] = {}
        self.delay = delay
        self.next_id = 1

    async def send_message(self, chat_id: int, text: str, **kwargs: Any) -> Any:
        if self.delay:
            await asyncio.sleep(self.delay)
        queue = self.failures.get(chat_id)
        if queue:
            raise queue.pop(0)
        self.sent.append((chat_id, text))
        self.next_id += 1
        return SimpleNamespace(message_id=self.next_id)

    send_photo = send_message


class Clock:
    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset


def make(bot: FakeBot, db: Database, rate: float = 1000, clock: Clock | None = None, **kw: Any) -> Dispatcher:
    return Dispatcher(bot, db, rate=rate, default_language="zh", clock=clock or Clock(), poll_interval=0.02, **kw)  # type: ignore[arg-type]


async def wait_until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def states(db: Database) -> dict[str, int]:
    async with db.session() as s:
        rows = await s.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
        return {str(state): int(n) for state, n in rows}


async def all_final(db: Database) -> bool:
    found = await states(db)
    return found.get("queued", 0) == 0 and found.get("sending", 0) == 0


async def test_delivers_in_the_recipients_language_and_records_message_ids(db: Database) -> None:
    async with db.session() as s:
        s.add(User(telegram_id=1, telegram_language="en"))
        s.add(User(telegram_id=2, language="zh"))
        await s.flush()
        for chat in (1, 2):
            await enqueue(s, chat, "common.yes", kind="notice")
        await enqueue(s, 3, "broadcast.message", {"drill": {"t": "broadcast.drill_mark"}, "text": {"zh": "中文", "en": "English"}})
    bot = FakeBot()
    dispatcher = make(bot, db)
    dispatcher.start()
    try:
        await wait_until(lambda: all_final(db))
    finally:
        await dispatcher.stop()
    assert sorted(bot.sent) == [(1, "Yes"), (2, "是"), (3, "【演练 DRILL】中文")]
    async with db.session() as s:
        rows = list(await s.scalars(select(Delivery)))
    assert all(r.state == DeliveryState.SENT and r.telegram_message_id and r.sent_at for r in rows)
    assert all(r.claimed_by is None for r in rows)


async def test_an_emergency_goes_before_notices_queued_earlier(db: Database) -> None:
    async with db.session() as s:
        await enqueue_many(s, list(range(1000, 1100)), "common.yes", {}, kind="notice", priority=Priority.BULK)
        await enqueue_many(s, list(range(1, 11)), "common.no", {}, kind="broadcast", priority=Priority.EMERGENCY)
    bot = FakeBot()
    dispatcher = make(bot, db, rate=200, concurrency=16)
    dispatcher.start()
    try:
        await wait_until(lambda: all_final(db))
    finally:
        await dispatcher.stop()
    order = [chat for chat, _ in bot.sent]
    assert sorted(order[:10]) == list(range(1, 11))
    assert len(order) == 110 and len(set(order)) == 110


async def test_blocked_recipients_become_unreachable_and_are_not_retried(db: Database) -> None:
    async with db.session() as s:
        s.add(User(telegram_id=5))
        await s.flush()
        await enqueue(s, 5, "common.yes")
        await enqueue(s, 6, "common.yes")
    bot = FakeBot()
    bot.failures[5] = [Forbidden("Forbidden: bot was blocked by the user")]
    bot.failures[6] = [BadRequest("Bad Request: chat not found")]
    dispatcher = make(bot, db)
    dispatcher.start()
    try:
        await wait_until(lambda: all_final(db))
    finally:
        await dispatcher.stop()
    assert await states(db) == {"unreachable": 2}
    async with db.session() as s:
        assert (await s.get(User, 5)).unreachable is True  # type: ignore[union-attr]
        row = await s.scalar(select(Delivery).where(Delivery.chat_id == 5))
    assert row is not None and row.attempts == 1 and "blocked" in (row.last_error or "")
    assert bot.sent == []


async def test_429_requeues_with_retry_after_pauses_pushes_and_keeps_answers_going(db: Database) -> None:
    async with db.session() as s:
        await enqueue(s, 7, "common.yes")
    bot = FakeBot()
    with warnings.catch_warnings():  # PTB 22.x warns in RetryAfter's own constructor
        warnings.simplefilter("ignore")
        bot.failures[7] = [RetryAfter(dt.timedelta(seconds=1))]
    dispatcher = make(bot, db)
    dispatcher.start()
    try:
        await wait_until(lambda: _has_error(db, 7, "429"), within=3)
        assert dispatcher.too_many_requests == 1
        # A push waits for the pause; an answer (reply priority) does not.
        push = asyncio.create_task(dispatcher.budget.take(0))
        await dispatcher.budget.take(REPLY_PRIORITY)
        assert not push.done()  # the answer went ahead while the push still waits out the pause
        await push
        await wait_until(lambda: all_final(db), within=5)
    finally:
        await dispatcher.stop()
    assert bot.sent == [(7, "是")]
    async with db.session() as s:
        row = await s.scalar(select(Delivery))
    assert row is not None and row.attempts == 1  # the 429 did not count as an attempt


async def _has_error(db: Database, chat: int, error: str) -> bool:
    async with db.session() as s:
        row = await s.scalar(select(Delivery).where(Delivery.chat_id == chat))
    return row is not None and row.last_error == error


async def test_network_errors_retry_with_backoff_then_give_up(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bot.dispatcher.PRIVATE_CHAT_INTERVAL", 0.01)  # retries to one chat, without waiting 1 s each
    clock = Clock()
    async with db.session() as s:
        await enqueue(s, 8, "common.yes")
        await enqueue(s, 9, "common.yes")
    bot = FakeBot()
    bot.failures[8] = [NetworkError("Bad Gateway")]
    bot.failures[9] = [NetworkError("timed out")] * 20
    dispatcher = make(bot, db, clock=clock)
    dispatcher.start()
    try:
        await wait_until(lambda: _has_error(db, 8, "Bad Gateway"))
        for _ in range(12):  # move the clock past each backoff
            clock.offset += dt.timedelta(minutes=6)
            dispatcher.wake()
            await asyncio.sleep(0.1)
        await wait_until(lambda: all_final(db))
    finally:
        await dispatcher.stop()
    async with db.session() as s:
        by_chat = {r.chat_id: r for r in await s.scalars(select(Delivery))}
    assert by_chat[8].state == DeliveryState.SENT and by_chat[8].attempts == 2
    assert by_chat[9].state == DeliveryState.FAILED and by_chat[9].attempts == 8


async def test_budget_serves_by_priority_and_keeps_the_rate() -> None:
    budget = SendBudget(rate=50)
    order: list[int] = []

    async def taker(priority: int, n: int) -> None:
        await budget.take(priority)
        order.append(n)

    started = time.monotonic()
    tasks = [asyncio.create_task(taker(20, n)) for n in range(10)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(taker(REPLY_PRIORITY, 99)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    assert order.index(99) <= 1  # the answer overtook the queued pushes
    assert elapsed >= 9 / 50 * 0.9  # 11 tokens at 50/s, one saved up


async def test_a_cancelled_waiter_does_not_lose_its_place_to_nobody() -> None:
    budget = SendBudget(rate=20)
    await budget.take(0)  # the saved-up token
    waiter = asyncio.create_task(budget.take(5))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.wait_for(budget.take(5), 0.5)


async def test_per_chat_pace_books_slots_and_defers_long_waits(db: Database) -> None:
    dispatcher = make(FakeBot(), db)
    assert dispatcher._reserve_chat(42) == 0
    assert dispatcher._reserve_chat(42) == pytest.approx(1.0, abs=0.05)
    assert dispatcher._reserve_chat(42) is None  # would wait 2 s: back to the queue
    assert dispatcher._reserve_chat(-100) == 0
    assert dispatcher._reserve_chat(-100) is None  # groups: 20 per minute


async def test_messages_to_one_chat_are_spaced_without_blocking_others(db: Database) -> None:
    async with db.session() as s:
        for _ in range(3):
            await enqueue(s, 77, "common.yes")
        await enqueue_many(s, list(range(200, 230)), "common.no", {}, kind="notice", priority=Priority.NORMAL)
    bot = FakeBot()
    dispatcher = make(bot, db)
    dispatcher.start()
    try:
        await wait_until(lambda: _count_sent(bot, lambda c: c >= 200, 30), within=1.0)
        await wait_until(lambda: all_final(db), within=5)
    finally:
        await dispatcher.stop()
    assert [c for c, _ in bot.sent].count(77) == 3


async def _count_sent(bot: FakeBot, which: Any, n: int) -> bool:
    return sum(1 for c, _ in bot.sent if which(c)) >= n


async def test_bulk_insert_of_a_large_broadcast(db: Database) -> None:
    started = time.perf_counter()
    async with db.session() as s:
        count = await enqueue_many(
            s, list(range(1, 10_001)), "broadcast.message", {"text": {"zh": "x", "en": "y"}, "drill": ""},
            kind="broadcast", priority=Priority.EMERGENCY, broadcast_id=1, dedupe_prefix="bc:1:",
        )
    print(f"10,000 delivery rows in {time.perf_counter() - started:.2f} s")
    assert count == 10_000
    assert await states(db) == {"queued": 10_000}


async def test_claim_leases_rows_to_one_worker_and_recovers_stale_leases(db: Database) -> None:
    now = utcnow()
    async with db.session() as s:
        await enqueue_many(s, list(range(1, 6)), "common.yes", {}, kind="notice", priority=Priority.NORMAL, not_before=now)
    async with db.session() as s:
        first = await claim_due(s, now, 3, dt.timedelta(seconds=10), worker="a")
    async with db.session() as s:
        second = await claim_due(s, now, 10, dt.timedelta(seconds=10), worker="b", skip_chats=[5])
    assert [r.chat_id for r in first] == [1, 2, 3]
    assert [r.chat_id for r in second] == [4]
    assert all(r.attempts == 1 and r.state == DeliveryState.SENDING for r in first + second)
    async with db.session() as s:
        assert await recover_stale(s, now + dt.timedelta(seconds=5)) == 0
        assert await recover_stale(s, now + dt.timedelta(seconds=11), worker="a") == 1  # b's row only
    assert await states(db) == {"sending": 3, "queued": 2}


async def test_after_a_crash_rows_of_a_dead_local_process_are_taken_back_at_start(db: Database) -> None:
    dead = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dispatcher = make(FakeBot(), db)
    dead_worker = f"{dispatcher.host}|{int(dead.stdout)}|deadbeef"
    live_worker = f"{dispatcher.host}|{os.getppid()}|cafe0000"  # our parent process is alive
    async with db.session() as s:
        await enqueue_many(s, [1, 2, 3, 4], "common.yes", {}, kind="notice", priority=Priority.NORMAL)
    async with db.session() as s:
        await claim_due(s, utcnow(), 3, dt.timedelta(minutes=5), worker=dead_worker)
    async with db.session() as s:
        await claim_due(s, utcnow(), 1, dt.timedelta(minutes=5), worker=live_worker)
    bot = dispatcher.bot
    dispatcher.start()
    try:
        await wait_until(lambda: _count_sent(bot, lambda c: True, 3))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
    finally:
        await dispatcher.stop()
    assert sorted(c for c, _ in bot.sent) == [1, 2, 3]  # type: ignore[attr-defined]
    assert await states(db) == {"sent": 3, "sending": 1}  # the live process's row waits for its lease


async def test_stop_puts_unsent_claimed_rows_back(db: Database) -> None:
    async with db.session() as s:
        await enqueue_many(s, list(range(1, 41)), "common.yes", {}, kind="notice", priority=Priority.NORMAL)
    bot = FakeBot()
    dispatcher = make(bot, db, rate=20)
    dispatcher.start()
    await wait_until(lambda: _count_sent(bot, lambda c: True, 3))
    await dispatcher.stop()
    found = await states(db)
    assert found.get("sending", 0) == 0
    assert found["sent"] == len(bot.sent) and found["queued"] == 40 - len(bot.sent)
    async with db.session() as s:
        assert max(await s.scalars(select(Delivery.attempts).where(Delivery.state == "queued"))) == 0


async def test_two_dispatchers_on_one_database_send_each_row_once(db: Database) -> None:
    async with db.session() as s:
        await enqueue_many(s, list(range(1, 301)), "common.yes", {}, kind="notice", priority=Priority.NORMAL)
    bot_a, bot_b = FakeBot(delay=0.002), FakeBot(delay=0.002)
    a, b = make(bot_a, db, rate=500, concurrency=16), make(bot_b, db, rate=500, concurrency=16)
    a.start()
    b.start()
    try:
        await wait_until(lambda: all_final(db), within=10)
    finally:
        await a.stop()
        await b.stop()
    chats = [c for c, _ in bot_a.sent + bot_b.sent]
    assert sorted(chats) == list(range(1, 301))
    assert bot_a.sent and bot_b.sent


def test_render_takes_catalogue_references_and_bilingual_labels() -> None:
    row = Delivery(
        text_key="incidents.alert",
        params={"id": 3, "kind": {"t": "incidents.kind_fire"}, "place": {"zh": "一层", "en": "1F"}, "reporter": "A", "time": "10:00"},
        buttons=[[["incidents.btn_take", "inc:take:3"], [{"zh": "中", "en": "En"}, "x"]]],
    )
    text, markup = render(row, "en")
    assert "1F" in text and "#3" in text
    assert [b.text for b in markup.inline_keyboard[0]][1] == "En"


async def test_budget_saves_no_burst_that_overruns_a_rolling_second() -> None:
    budget = SendBudget(rate=40)
    await asyncio.sleep(0.3)  # a quiet spell
    times: list[float] = []
    for _ in range(60):
        await budget.take(20)
        times.append(time.monotonic())
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 40  # never more than the rate in any rolling second, even right after quiet
    # Paced: the quiet spell saved up at most a quarter second's worth (a busy loop's slack).
    assert sum(1 for t in times if t < times[0] + 0.25) <= 1 + 40 * 0.25 + 40 * 0.25


async def test_a_429_for_one_chat_slows_only_that_chat() -> None:
    budget = SendBudget(rate=30)
    budget.note_sent(55)
    budget.note_sent(55)  # two messages to one person in a moment: that chat met its own limit
    assert budget.too_many(55, 3) is False
    assert budget.rate == 30 and budget.paused_until < time.monotonic()
    assert budget.chat_ready[55] > time.monotonic() + 2
    await asyncio.wait_for(budget.take(20), 0.5)  # pushes to everybody else go on


async def test_after_a_429_for_the_bot_the_rate_climbs_back_to_the_configured_one() -> None:
    budget = SendBudget(rate=30)
    budget.note_sent(56)
    assert budget.too_many(56, 1) is True  # nothing recent to that chat: the bot's own limit
    assert budget.rate < 30 and budget.paused_until > time.monotonic()
    resumed = budget.paused_until
    budget._refill(resumed + 1.0)
    assert 27 < budget.rate < 30  # climbing, additively
    budget._refill(resumed + 10.0)
    assert budget.rate == 30  # back at the configured rate within 10 s without another 429
