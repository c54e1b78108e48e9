"""The outbox dispatcher: delivers every queued push (notices, alerts, relayed replies, broadcasts)
within Telegram's limits, and records each outcome.

Limits kept here, not by Telegram's refusals: ``LIBRARYBOT_BROADCAST_RATE`` messages per second
overall (a token bucket), about one per second per private chat and 20 per minute per group. A 429
puts the row back with Telegram's ``retry_after`` and pauses only this dispatcher, so the bot's
answers to people chatting with it are not stalled. A 403 (blocked, deactivated) marks the
recipient unreachable for good; network errors retry with backoff.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from telegram import Bot, InputFile
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError

from bot.i18n import language_for, localise, t
from bot.ui import fit, keyboard
from storage.db import Database
from storage.outbox import Delivery, DeliveryState, claim_due, mark
from storage.people import User

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
LEASE = dt.timedelta(seconds=60)
PRIVATE_CHAT_INTERVAL = 1.0
GROUP_CHAT_INTERVAL = 3.0  # 20 per minute


class TokenBucket:
    """``rate`` tokens per second, at most one second's worth saved up."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class Dispatcher:
    """Delivers the outbox; one per bot process, several processes may share one database."""

    def __init__(
        self,
        bot: Bot,
        db: Database,
        *,
        rate: float,
        default_language: str,
        clock: Callable[[], dt.datetime],
        paid_broadcast: bool = False,
        concurrency: int = 32,
        poll_interval: float = 0.25,
    ) -> None:
        self.bot = bot
        self.db = db
        self.bucket = TokenBucket(rate)
        self.default_language = default_language
        self.clock = clock
        self.paid_broadcast = paid_broadcast
        self.slots = asyncio.Semaphore(concurrency)
        self.poll_interval = poll_interval
        self.chat_ready: dict[int, float] = {}  # chat id -> monotonic time it may be sent to again
        self.paused_until = 0.0
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.in_flight: set[asyncio.Task[None]] = set()
        self.sent_count = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="outbox-dispatcher")

    async def stop(self) -> None:
        """Stop taking new rows and let the messages already in flight finish."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=10)

    def wake(self) -> None:
        """Look at the outbox now (called after something was queued)."""
        self.wakeup.set()

    async def _run(self) -> None:
        while True:
            try:
                claimed = await self.dispatch_once()
            except Exception:  # the database may be restarting: keep going, nothing is lost
                log.exception("outbox dispatch failed; retrying")
                claimed = 0
            if claimed == 0:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), self.poll_interval)
                except TimeoutError:
                    pass

    async def dispatch_once(self, limit: int = 64) -> int:
        """Claim the most urgent due rows and start sending them; the number claimed."""
        pause = self.paused_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        async with self.db.session() as session:
            rows = await claim_due(session, self.clock(), limit, LEASE)
            languages = await self._languages(session, rows)
        for row in rows:
            await self.slots.acquire()
            task = asyncio.create_task(self._deliver(row, languages.get(row.chat_id, self.default_language)))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        return len(rows)

    async def _languages(self, session: Any, rows: list[Delivery]) -> dict[int, str]:
        chat_ids = {row.chat_id for row in rows if row.chat_id > 0}
        users = await session.execute(
            select(User.telegram_id, User.language, User.telegram_language).where(User.telegram_id.in_(chat_ids))
        )
        found = {uid: language_for(chosen, tg, self.default_language) for uid, chosen, tg in users}
        return {row.chat_id: row.language or found.get(row.chat_id, self.default_language) for row in rows}

    async def _wait_for_chat(self, chat_id: int) -> None:
        interval = PRIVATE_CHAT_INTERVAL if chat_id > 0 else GROUP_CHAT_INTERVAL
        now = time.monotonic()
        ready = self.chat_ready.get(chat_id, 0.0)
        self.chat_ready[chat_id] = max(now, ready) + interval
        if ready > now:
            await asyncio.sleep(ready - now)

    async def _deliver(self, row: Delivery, lang: str) -> None:
        try:
            await self._wait_for_chat(row.chat_id)
            await self.bucket.take()
            state, details = await self._send(row, lang)
        finally:
            self.slots.release()
        async with self.db.session() as session:
            await mark(session, row.id, state, **details)
            if state == DeliveryState.UNREACHABLE and row.chat_id > 0:
                await session.execute(update(User).where(User.telegram_id == row.chat_id).values(unreachable=True))

    async def _send(self, row: Delivery, lang: str) -> tuple[DeliveryState, dict[str, Any]]:
        """Send one row; the state to record and its details."""
        params = {k: localise(lang, v) for k, v in (row.params or {}).items()}
        text = fit(t(lang, row.text_key, **params))
        markup = keyboard(lang, [[(_label(lang, b[0]), b[1]) for b in r] for r in row.buttons or []])
        extra: dict[str, Any] = {"allow_paid_broadcast": True} if self.paid_broadcast else {}
        try:
            if row.document is not None:
                message = await self.bot.send_document(
                    row.chat_id, InputFile(row.document, filename=row.document_name or "file"),
                    caption=text[:1024], parse_mode=ParseMode.HTML, reply_markup=markup, **extra,
                )
            elif row.photo_file_id:
                message = await self.bot.send_photo(
                    row.chat_id, row.photo_file_id, caption=text[:1024], parse_mode=ParseMode.HTML,
                    reply_markup=markup, **extra,
                )
            else:
                message = await self.bot.send_message(
                    row.chat_id, text, parse_mode=ParseMode.HTML, reply_markup=markup,
                    disable_web_page_preview=True, **extra,
                )
        except RetryAfter as exc:
            wait = _seconds(exc.retry_after)
            self.paused_until = max(self.paused_until, time.monotonic() + wait)
            log.warning("Telegram asked to slow down for %.0f s", wait)
            return DeliveryState.QUEUED, {"error": "429", "retry_at": self.clock() + dt.timedelta(seconds=wait)}
        except Forbidden as exc:
            log.info("chat %s is unreachable (%s)", row.chat_id, exc.message)
            return DeliveryState.UNREACHABLE, {"error": exc.message}
        except BadRequest as exc:
            log.warning("delivery %s refused by Telegram: %s", row.id, exc.message)
            return DeliveryState.FAILED, {"error": exc.message}
        except (NetworkError, TelegramError) as exc:
            if row.attempts >= MAX_ATTEMPTS:
                return DeliveryState.FAILED, {"error": str(exc)}
            backoff = dt.timedelta(seconds=min(2**row.attempts, 300))
            return DeliveryState.QUEUED, {"error": str(exc), "retry_at": self.clock() + backoff}
        self.sent_count += 1
        return DeliveryState.SENT, {"message_id": message.message_id}


def _label(lang: str, label: Any) -> str:
    """A stored button label: a message id, or a bilingual dict rendered as literal text."""
    if isinstance(label, dict):
        return "=" + str(localise(lang, label))
    return str(label)


def _seconds(value: int | dt.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
