"""The outbox dispatcher: delivers every queued push (notices, alerts, relayed replies, broadcasts)
within Telegram's limits, and records each outcome.

Limits are kept here, not learnt from Telegram's refusals:

* ``LIBRARYBOT_BROADCAST_RATE`` messages per second overall, counted as Telegram counts them: in
  any rolling second, edits included. One :class:`SendBudget` (evenly paced grants, no burst
  credit, served by priority) is shared by the outbox and by the bot's direct answers and edits
  (through :class:`BudgetRateLimiter`, the application's rate limiter): answers take the next
  token before any push, an emergency before notices, so a broadcast at the full rate neither
  stalls the answers nor makes them meet 429s.
* about one message per second per private chat and 20 per minute per group: a row whose chat must
  wait more than a moment goes back to the queue with a ``not_before`` instead of holding a slot.

On 429 the row goes back to the queue with Telegram's ``retry_after``. When the chat had just been
sent to, it met its own limit and only that chat waits; otherwise pushes pause for that long
(answers do not), go on a little slower and climb back to the full rate within seconds. A 403 (blocked, deactivated) or "chat not found" marks the recipient
unreachable for good; network errors and timeouts retry with exponential backoff.

Crash safety: rows are leased to this process (``claimed_by``) and the lease is renewed while it
lives; outcomes are written in small batches every few tens of milliseconds. After a crash, rows
of the dead process go back to the queue (at once when it ran on this host, else when the lease
runs out), so nobody is skipped and only messages in flight at the moment of the crash may be sent
twice.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import heapq
import itertools
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from sqlalchemy import select, update
from telegram import Bot, InputFile
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import BaseRateLimiter
from telegram.request import BaseRequest, RequestData

from bot.i18n import language_for, localise, t
from bot.telegram_text import cant_parse, fit_plain, plain_text
from bot.ui import MAX_CAPTION, MAX_TEXT, fit, keyboard
from storage import outbox
from storage.db import Database
from storage.outbox import Delivery, DeliveryState, Outcome, claim_due, mark_many
from storage.people import User
from storage.staffchat import StaffChatState

log = logging.getLogger(__name__)

# The dispatchers running in this process (the demo and the tests run several bots in one process):
# a worker id of this pid that is not among them belongs to a dispatcher that stopped or died.
LIVE_WORKERS: set[str] = set()

REPLY_PRIORITY = -10  # answers to people chatting with the bot go before every push
MAX_ATTEMPTS = 8
LEASE = dt.timedelta(seconds=20)
HEARTBEAT = 5.0  # seconds between lease renewals and looks for dead processes' rows
FLUSH_INTERVAL = 0.05  # outcomes are written at least this often
FLUSH_BATCH = 200
PRIVATE_CHAT_INTERVAL = 1.0
GROUP_CHAT_INTERVAL = 3.0  # 20 per minute
MAX_CHAT_WAIT = 1.5  # a row whose chat must wait longer goes back to the queue
MIN_RATE = 1.0  # the rate never drops below this after 429s
WINDOW = 1.0  # Telegram counts a bot's messages in any rolling second
JITTER = 0.02  # a small margin for clocks that differ: ``rate`` messages in any 1.02 s
TIMER_SLACK = 0.25  # seconds of tokens a late timer or a busy event loop may leave for the next grants
CUT = 0.9  # after a 429 for the whole bot the rate is cut to this share
CLIMB = 0.05  # then climbs back by this share of the configured rate per second (2 s from 0.9)
PRIVATE_LOOKBACK = 2.0  # a private chat sent to this recently may have met its own limit
GROUP_LOOKBACK = 60.0
GROUP_BUSY = 10  # a group sent this many messages in a minute may have met its own limit
REPLY_RETRIES = 3
MAX_REQUESTS = 16
SEND_ENDPOINTS = frozenset(
    "sendMessage sendPhoto sendDocument sendVideo sendAudio sendVoice sendAnimation sendSticker "
    "sendMediaGroup sendLocation sendVenue sendContact sendPoll sendDice sendVideoNote sendInvoice "
    "sendPaidMedia copyMessage copyMessages forwardMessage forwardMessages".split()
)
# Telegram counts edits against the same limits as new messages.
EDIT_ENDPOINTS = frozenset(
    "editMessageText editMessageCaption editMessageMedia editMessageReplyMarkup editMessageLiveLocation".split()
)


class SendBudget:
    """Telegram's overall sending budget: ``rate`` messages per second, granted by priority.

    Waiters with the lowest priority number are served first, in arrival order within a priority.
    Telegram counts a bot's messages in any rolling second, so nothing is saved up in quiet moments:
    grants are paced evenly (a late timer or a busy event loop may catch up ``TIMER_SLACK``
    seconds' worth), and at most ``rate`` messages are counted in any ``WINDOW + JITTER`` seconds,
    whatever was saved up. A message is counted from its grant until Telegram has answered, then
    from the answer (:meth:`landed`): it reached Telegram somewhere in between, so messages held up
    on the way (a busy event loop, a slow connection) cannot crowd one of Telegram's seconds with
    one too many.

    After a 429 for the whole bot (:meth:`too_many`), pushes pause for ``retry_after``, the rate is
    cut by ``CUT`` and then climbs back by ``CLIMB`` of the configured rate per second without
    429s, so it is at the configured rate again a few seconds later. A 429 for one chat only
    delays that chat.
    """

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self.configured = self.rate = float(rate)
        self.burst = burst  # kept for callers; the budget saves up no credit beyond timer slack
        self.capacity = self._capacity()
        self.tokens = 1.0
        self.stamp = time.monotonic()
        self.paused_until = 0.0
        self.slowed_at = float("-inf")  # when Telegram last refused a message for the whole bot (429)
        self.granted = 0
        self.window: list[float] = []  # sorted: when each recent message was granted, or answered
        self.chat_ready: dict[int, float] = {}  # chat id -> monotonic time it may get a push again
        self.chat_sent: dict[int, collections.deque[float]] = {}  # chat id -> when it was last sent to
        self._heap: list[tuple[int, int, asyncio.Future[float]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def _capacity(self) -> float:
        # One token, plus what a late timer or a busy event loop left unused (TIMER_SLACK seconds'
        # worth): a CPU-bound paid broadcast keeps its rate, and the rolling window caps any second.
        return 1.0 + self._pace() * TIMER_SLACK

    def _pace(self) -> float:
        return self.rate * WINDOW / (WINDOW + JITTER)

    def _window_limit(self) -> int:
        return max(1, math.floor(self.rate * WINDOW))

    def _refill(self, now: float) -> None:
        if self.rate < self.configured and now > self.paused_until:
            # Additive increase: no 429 since the pause ended, so creep back to the configured rate.
            since = max(self.stamp, self.paused_until)
            self.rate = min(self.configured, self.rate + (now - since) * self.configured * CLIMB)
            self.capacity = self._capacity()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self._pace())
        self.stamp = now

    def _window_wait(self, now: float) -> float:
        """Seconds until one more grant fits in the rolling window (0 if it does now)."""
        span = WINDOW + JITTER
        gone = bisect.bisect_right(self.window, now - span)
        if gone:
            del self.window[:gone]
        limit = self._window_limit()
        if len(self.window) < limit:
            return 0.0
        return self.window[len(self.window) - limit] + span - now

    def _grant(self, now: float) -> None:
        self.tokens -= 1
        self.granted += 1
        self.window.append(now)

    def _paused(self, priority: int, now: float) -> bool:
        return priority > REPLY_PRIORITY and now < self.paused_until

    async def take(self, priority: int) -> float:
        """Wait for a token; lower ``priority`` numbers are served first. Returns when it was granted
        (pass it to :meth:`landed` once Telegram has answered)."""
        now = time.monotonic()
        self._refill(now)
        if not self._heap and self.tokens >= 1 and not self._paused(priority, now) and self._window_wait(now) == 0:
            self._grant(now)
            return now
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, next(self._seq), future))
        self._serve()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._ungrant()  # granted but not used
            raise

    def landed(self, granted_at: float) -> None:
        """Telegram answered the message granted at ``granted_at``: count it in the rolling window
        from now on instead. It reached Telegram somewhere in between, so a message that spent long
        on the way (a busy event loop, a slow connection) cannot make a later second hold one too
        many."""
        window = self.window
        i = bisect.bisect_left(window, granted_at)
        if i < len(window) and window[i] == granted_at:  # not yet out of the window, nor refunded
            del window[i]
            bisect.insort(window, time.monotonic())

    def _ungrant(self) -> None:
        self.tokens = min(self.capacity, self.tokens + 1)
        self.granted -= 1
        if self.window:
            self.window.pop()

    def pause(self, seconds: float) -> None:
        """Telegram refused a message for the whole bot (429): hold every push (not the answers) for
        ``seconds``, then go on a little slower, climbing back to the configured rate."""
        now = time.monotonic()
        self._refill(now)
        self.paused_until = max(self.paused_until, now + seconds)
        self.tokens = min(self.tokens, 0.0)
        if now - self.slowed_at > seconds:  # one cut per refusal window, however many were in flight
            self.rate = max(MIN_RATE, self.rate * CUT)
            self.capacity = self._capacity()
            log.warning(
                "Telegram refused a message (429): pushes wait %.1f s, then %.1f messages/s, back to %.1f within %.0f s",
                seconds, self.rate, self.configured, (1 - CUT) / CLIMB,
            )
        self.slowed_at = now
        self._serve()

    def too_many(self, chat_id: Any, seconds: float) -> bool:
        """Telegram answered 429 to a message for ``chat_id``; True when the whole bot was over its
        limit (pushes pause, see :meth:`pause`), False when that chat alone was (only it waits).

        Telegram does not say which limit was hit. A chat that was just sent to has used up its own
        allowance (about one a second per private chat, 20 a minute per group); otherwise it was the
        bot's overall limit.
        """
        now = time.monotonic()
        try:
            chat = int(chat_id)
        except (TypeError, ValueError):
            chat = 0
        self.chat_ready[chat] = max(self.chat_ready.get(chat, 0.0), now + seconds)
        if chat and self._chat_busy(chat, now):
            log.info("a chat met its own flood limit (429); only it waits %.0f s", seconds)
            return False
        self.pause(seconds)
        return True

    def _chat_busy(self, chat: int, now: float) -> bool:
        sent = self.chat_sent.get(chat)
        if not sent:
            return False
        recent = [at for at in sent if at > now - GROUP_LOOKBACK]
        if chat > 0:  # the refused message is the last one recorded; another shortly before it?
            return sum(1 for at in recent if at > now - PRIVATE_LOOKBACK) >= 2
        return len(recent) >= GROUP_BUSY or sum(1 for at in recent if at > now - GROUP_CHAT_INTERVAL) >= 2

    def note_sent(self, chat_id: Any) -> None:
        """A message is going to ``chat_id`` now (remembered to tell a chat's 429 from the bot's)."""
        with contextlib.suppress(TypeError, ValueError):
            chat = int(chat_id)
            now = time.monotonic()
            sent = self.chat_sent.setdefault(chat, collections.deque(maxlen=GROUP_BUSY + 1))
            sent.append(now)

    def refund(self) -> None:
        """Give back a token whose message Telegram refused without sending it (blocked, bad chat)."""
        self._ungrant()
        self._serve()

    def note_chat(self, chat_id: Any) -> None:
        """An answer was just sent to ``chat_id``: keep the next push to it a moment later."""
        self.note_sent(chat_id)
        with contextlib.suppress(TypeError, ValueError):
            chat = int(chat_id)
            now = time.monotonic()
            interval = PRIVATE_CHAT_INTERVAL if chat > 0 else GROUP_CHAT_INTERVAL
            self.chat_ready[chat] = max(self.chat_ready.get(chat, 0.0), now + interval)

    def _serve(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        self._refill(now)
        delay = 0.0
        while self._heap:
            priority, _, future = self._heap[0]
            if future.done():  # its waiter was cancelled
                heapq.heappop(self._heap)
                continue
            if self._paused(priority, now):
                delay = self.paused_until - now
                break
            if self.tokens < 1:
                delay = (1 - self.tokens) / self._pace()
                break
            full = self._window_wait(now)
            if full > 0:
                delay = full
                break
            heapq.heappop(self._heap)
            self._grant(now)
            future.set_result(now)
        else:
            return
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0005), self._serve)

    def prune(self) -> None:
        """Forget the pace of chats that may be sent to again."""
        now = time.monotonic()
        if len(self.chat_ready) > 1000:
            self.chat_ready = {c: r for c, r in self.chat_ready.items() if r > now}
        if len(self.chat_sent) > 1000:
            self.chat_sent = {c: s for c, s in self.chat_sent.items() if s and s[-1] > now - GROUP_LOOKBACK}


class BudgetRateLimiter(BaseRateLimiter[dict[str, Any]]):
    """The application's rate limiter: the bot's direct answers take tokens from the shared budget
    first, so they go out at once even during a broadcast at Telegram's full rate."""

    def __init__(self, budget: SendBudget) -> None:
        self.budget = budget

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: dict[str, Any] | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        if (endpoint not in SEND_ENDPOINTS and endpoint not in EDIT_ENDPOINTS) or (rate_limit_args or {}).get("outbox"):
            return await callback(*args, **kwargs)  # answers to buttons, chat actions, or a push already paced
        self.budget.note_chat(data.get("chat_id"))
        for attempt in range(REPLY_RETRIES + 1):
            granted = await self.budget.take(REPLY_PRIORITY)  # a retry is a message again
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                wait = _retry_after(exc)
                if wait > 10 or attempt == REPLY_RETRIES:
                    raise
                log.warning("an answer met a 429; retrying after %.0f s", wait)
                # Pushes (to this chat, or all of them when the bot's limit was hit) wait a little
                # longer, so the answer goes first.
                self.budget.too_many(data.get("chat_id"), wait + 0.25)
                await asyncio.sleep(wait)
            finally:
                self.budget.landed(granted)
        raise AssertionError("unreachable")


class OutboxRequest(BaseRequest):
    """The outbox's own HTTP client (aiohttp): a fraction of httpx's CPU per request, which is what
    limits a paid broadcast at 1,000 messages/s; and the pushes never queue in the connection pool
    of the bot's answers."""

    def __init__(self, connections: int, timeout: float = 10.0) -> None:
        self.connections = connections
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self.closed = False

    @property
    def read_timeout(self) -> float:
        return self.timeout

    async def initialize(self) -> None:
        if self.closed:
            raise NetworkError("the outbox's connections are closed (the bot is stopping)")
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=self.connections, ttl_dns_cache=300)
            self.session = aiohttp.ClientSession(connector=connector)

    async def shutdown(self) -> None:
        self.closed = True
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        await self.initialize()
        assert self.session is not None
        data: Any = None
        if request_data is not None:
            data = request_data.json_parameters
            if request_data.contains_files:
                form = aiohttp.FormData()
                for name, value in data.items():
                    form.add_field(name, value)
                for name, (filename, content, mimetype) in request_data.multipart_data.items():
                    form.add_field(name, content, filename=filename, content_type=mimetype)
                data = form
        seconds = read_timeout if isinstance(read_timeout, (int, float)) else self.timeout
        try:
            async with self.session.request(method, url, data=data, timeout=aiohttp.ClientTimeout(total=seconds + 5)) as resp:
                return resp.status, await resp.read()
        except TimeoutError as exc:
            raise TimedOut(f"no answer in {seconds + 5:.0f} s") from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"{type(exc).__name__}: {exc}") from exc


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
        budget: SendBudget | None = None,
        concurrency: int | None = None,
        poll_interval: float = 0.25,
        lease: dt.timedelta = LEASE,
    ) -> None:
        self.bot = bot
        self.sender: Any = bot  # what sends: the application's Bot with the outbox's own connections
        self.requests_made: list[OutboxRequest] = []
        self.db = db
        self.budget = budget or SendBudget(rate)
        self.default_language = default_language
        self.clock = clock
        self.paid_broadcast = paid_broadcast
        self.max_in_flight = concurrency or max(32, int(rate))  # about a second of sending
        # Requests open at once: enough for Telegram's latency at the full rate, few enough that the
        # HTTP connection pool stays cheap and the bot's answers never queue behind a broadcast.
        self.requests = asyncio.Semaphore(MAX_REQUESTS)
        self.poll_interval = poll_interval
        self.lease = lease
        self.host = socket.gethostname()
        self.worker = f"{self.host}|{os.getpid()}|{uuid.uuid4().hex[:8]}"
        self.held: dict[int, Delivery] = {}  # claimed rows whose outcome is not known yet
        self.outcomes: list[Outcome] = []  # known outcomes not yet written
        self.wakeup = asyncio.Event()
        self.room = asyncio.Event()
        self.flush_now = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.flusher: asyncio.Task[None] | None = None
        self.waiting: set[asyncio.Task[None]] = set()  # deliveries not yet handed to Telegram
        self.in_flight: set[asyncio.Task[None]] = set()
        self.sent_count = 0
        self.too_many_requests = 0
        self.stopping = False
        self.staff: Any = None  # bot.staffchat.StaffChat: where the staff group's rows go now

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        LIVE_WORKERS.add(self.worker)
        self.sender = self._own_sender()
        outbox.add_listener(self.wake)
        self.task = asyncio.create_task(self._run(), name="outbox-dispatcher")
        self.flusher = asyncio.create_task(self._flush_loop(), name="outbox-flusher")

    async def stop(self) -> None:
        """Stop taking rows, let the messages already handed to Telegram finish, put the others back."""
        outbox.remove_listener(self.wake)
        self.stopping = True
        LIVE_WORKERS.discard(self.worker)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        waiting = list(self.waiting)
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(waiting, timeout=5)
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=10)
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        self.outcomes.extend(Outcome(row.id, DeliveryState.QUEUED, refund=True) for row in self.held.values())
        self.held.clear()
        for _ in range(3):
            try:
                await self._flush()
                break
            except Exception:  # a lease that runs out does the same, a little later
                log.warning("could not record the last outcomes at shutdown; retrying")
                await asyncio.sleep(0.2)
        for request in self.requests_made:
            await request.shutdown()

    def _own_sender(self) -> Any:
        """A Bot like the application's, with the outbox's own HTTP client (the same bot otherwise)."""
        token = getattr(self.bot, "token", None)
        if not isinstance(self.bot, Bot) or not token:
            return self.bot  # a test double
        self.requests_made = [OutboxRequest(MAX_REQUESTS), OutboxRequest(1)]  # closed by stop()
        return Bot(
            token,
            base_url=self.bot.base_url.removesuffix(token),
            base_file_url=self.bot.base_file_url.removesuffix(token),
            request=self.requests_made[0],
            get_updates_request=self.requests_made[1],
        )

    def wake(self) -> None:
        """Look at the outbox now (called after something was queued)."""
        self.wakeup.set()

    # --- claiming -------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._recover()
        except Exception:
            log.exception("could not look for rows of dead processes; their lease will run out")
        while not self.stopping:
            if len(self.held) >= self.max_in_flight:
                self.room.clear()
                await self.room.wait()
                continue
            try:
                claimed = await self.dispatch_once()
            except Exception:  # the database may be restarting: keep going, nothing is lost
                log.exception("outbox dispatch failed; retrying")
                await asyncio.sleep(1)
                continue
            if claimed == 0:
                self.wakeup.clear()
                await _wait(self.wakeup, self.poll_interval)

    async def dispatch_once(self) -> int:
        """Claim the most urgent due rows and start sending them; the number claimed."""
        room = self.max_in_flight - len(self.held)
        if room <= 0:
            return 0
        now = time.monotonic()
        busy = [c for c, ready in self.budget.chat_ready.items() if ready - now > MAX_CHAT_WAIT][:500]
        async with self.db.session() as session:
            rows = await claim_due(session, self.clock(), room, self.lease, worker=self.worker, skip_chats=busy)
            languages = await self._languages(session, rows)
        for row in rows:
            self.held[row.id] = row
            task = asyncio.create_task(self._deliver(row, languages.get(row.chat_id, self.default_language)))
            self.waiting.add(task)
            task.add_done_callback(self.waiting.discard)
        return len(rows)

    async def _languages(self, session: Any, rows: list[Delivery]) -> dict[int, str]:
        chat_ids = {row.chat_id for row in rows if row.chat_id > 0 and not row.language}
        found: dict[int, str] = {}
        if chat_ids:
            users = await session.execute(
                select(User.telegram_id, User.language, User.telegram_language).where(User.telegram_id.in_(chat_ids))
            )
            found = {uid: language_for(chosen, tg, self.default_language) for uid, chosen, tg in users}
        return {row.chat_id: row.language or found.get(row.chat_id, self.default_language) for row in rows}

    async def _recover(self) -> None:
        """At start: take back at once the rows of dead processes of this host, then stale leases."""
        now = self.clock()
        async with self.db.session() as session:
            for worker in await outbox.claimants(session):
                if self._dead(worker):
                    count = await outbox.recover_worker(session, worker, now)
                    log.info("took back %d messages left in flight by a stopped process", count)
            await outbox.recover_stale(session, now, self.worker)

    def _dead(self, worker: str) -> bool:
        """True when ``worker`` was a process of this host that no longer runs."""
        host, _, rest = worker.partition("|")
        pid_text, _, _token = rest.partition("|")
        if host != self.host or worker == self.worker or not pid_text.isdigit():
            return False
        pid = int(pid_text)
        if pid == os.getpid():  # this pid is ours now: gone unless another dispatcher of this process runs
            return worker not in LIVE_WORKERS
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:  # killed but not yet reaped by its parent
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            return False

    # --- sending --------------------------------------------------------------------------------

    async def _deliver(self, row: Delivery, lang: str) -> None:
        task = asyncio.current_task()
        try:
            wait = self._reserve_chat(row.chat_id)
            if wait is None:  # the chat must wait long: back to the queue, the slot goes to others
                ready = self.budget.chat_ready.get(row.chat_id, 0.0) - time.monotonic()
                retry = self.clock() + dt.timedelta(seconds=max(ready, 0.0))
                self._finish(row, Outcome(row.id, DeliveryState.QUEUED, retry_at=retry, refund=True))
                return
            if wait > 0:
                await asyncio.sleep(wait)
            granted = await self.budget.take(row.priority)
            self.budget.note_sent(row.chat_id)
        except asyncio.CancelledError:
            self._finish(row, Outcome(row.id, DeliveryState.QUEUED, refund=True))
            raise
        if task is not None:
            self.waiting.discard(task)
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
        try:
            async with self.requests:
                outcome = await self._send(row, lang)
        except Exception as exc:  # a bug in rendering, say: keep the row, try again later
            log.exception("delivery %s could not be sent", row.id)
            outcome = self._retry(row, f"{type(exc).__name__}: {exc}")
        finally:
            self.budget.landed(granted)
        self._finish(row, outcome)

    def _reserve_chat(self, chat_id: int) -> float | None:
        """Seconds to wait before sending to ``chat_id`` (the slot is booked), or None if too long."""
        now = time.monotonic()
        ready = self.budget.chat_ready.get(chat_id, 0.0)
        if ready - now > MAX_CHAT_WAIT:
            return None
        start = max(now, ready)
        self.budget.chat_ready[chat_id] = start + (PRIVATE_CHAT_INTERVAL if chat_id > 0 else GROUP_CHAT_INTERVAL)
        return start - now

    def _finish(self, row: Delivery, outcome: Outcome) -> None:
        self.held.pop(row.id, None)
        self.outcomes.append(outcome)
        if outcome.state == DeliveryState.SENT:
            self.sent_count += 1
        if len(self.outcomes) >= FLUSH_BATCH:
            self.flush_now.set()
        if len(self.held) <= self.max_in_flight // 2:
            self.room.set()

    async def _send(self, row: Delivery, lang: str) -> Outcome:
        """Send one row; what became of it."""
        text, markup = render(row, lang)
        extra: dict[str, Any] = {}
        staff = self.staff if self.staff is not None and self.staff.addresses(row.chat_id) else None
        if staff is not None and not staff.writable:
            self.budget.refund()  # nothing goes to the group now
            return await staff.unavailable(row)
        chat_id = staff.chat_id if staff is not None else row.chat_id
        if staff is not None:
            extra.update(staff.thread_for(row))  # the topic of this kind of alert
        if self.paid_broadcast and row.kind == "broadcast":
            extra["allow_paid_broadcast"] = True  # only emergencies pay for the higher rate
        if getattr(self.sender, "rate_limiter", None) is not None:
            extra["rate_limit_args"] = {"outbox": True}  # the budget was taken above
        try:
            message = await self._post(row, chat_id, text, markup, extra, html=True)
        except RetryAfter as exc:
            wait = _retry_after(exc)
            self.too_many_requests += 1
            if self.budget.too_many(row.chat_id, wait):
                log.warning("Telegram asked to slow down for %.0f s; pushes wait, answers do not", wait)
            return Outcome(row.id, DeliveryState.QUEUED, "429", retry_at=self.clock() + dt.timedelta(seconds=wait), refund=True)
        except ChatMigrated as exc:
            self.budget.refund()
            if staff is None:
                return self._retry(row, str(exc))
            return await staff.migrated(row, exc.new_chat_id, str(exc))
        except Forbidden as exc:
            if staff is not None:
                return await self._staff_refused(staff, row, exc)
            log.info("chat %s is unreachable (%s)", row.chat_id, exc.message)
            self.budget.refund()  # nothing was sent: the slot goes to the next recipient
            return Outcome(row.id, DeliveryState.UNREACHABLE, exc.message)
        except BadRequest as exc:
            if cant_parse(exc):  # an emergency is not given up for its formatting
                return await self._send_plain(row, chat_id, text, markup, extra)
            self.budget.refund()
            if staff is not None:
                return await self._staff_refused(staff, row, exc)
            if "chat not found" in exc.message.lower():
                return Outcome(row.id, DeliveryState.UNREACHABLE, exc.message)
            log.warning("delivery %s refused by Telegram: %s", row.id, exc.message)
            return Outcome(row.id, DeliveryState.FAILED, exc.message)
        except (NetworkError, TelegramError) as exc:
            return self._retry(row, str(exc))
        return Outcome(row.id, DeliveryState.SENT, message_id=message.message_id, at=self.clock())

    async def _staff_refused(self, staff: Any, row: Delivery, exc: TelegramError) -> Outcome:
        """Telegram refused a row for the staff group: removed, muted, a topic that does not exist,
        or a message it would refuse anywhere."""
        if isinstance(exc, Forbidden):
            self.budget.refund()
            return await staff.refused(row, StaffChatState.REMOVED, exc.message)
        message = exc.message.lower()
        if "not enough rights" in message or "chat_write_forbidden" in message or "have no rights" in message:
            return await staff.refused(row, StaffChatState.MUTED, exc.message)
        if "thread not found" in message:
            return staff.topic_missing(row, exc.message)
        log.warning("delivery %s refused by Telegram: %s", row.id, exc.message)
        return Outcome(row.id, DeliveryState.FAILED, exc.message)

    async def _send_plain(self, row: Delivery, chat_id: int, text: str, markup: Any, extra: dict[str, Any]) -> Outcome:
        """Telegram refused the formatting of ``row``: send its words again as plain text."""
        log.warning("delivery %s: formatting refused by Telegram; sent as plain text", row.id)
        try:
            message = await self._post(row, chat_id, plain_text(text), markup, extra, html=False)
        except TelegramError as exc:
            return self._retry(row, str(exc))
        return Outcome(row.id, DeliveryState.SENT, message_id=message.message_id, at=self.clock())

    async def _post(self, row: Delivery, chat_id: int, text: str, markup: Any, extra: dict[str, Any], *, html: bool) -> Any:
        """One send of ``row`` as what it is (a file, a relayed document, a photo or a text), in HTML
        or as plain text, cut to Telegram's limits."""
        mode, cut = (ParseMode.HTML, fit) if html else (None, fit_plain)
        if row.document is not None:
            return await self.sender.send_document(
                chat_id, InputFile(row.document, filename=row.document_name or "file"),
                caption=cut(text, MAX_CAPTION), parse_mode=mode, reply_markup=markup, **extra,
            )
        if row.photo_file_id and row.photo_file_id.startswith("doc:"):  # a relayed document (#16)
            return await self.sender.send_document(
                chat_id, row.photo_file_id.removeprefix("doc:"), caption=cut(text, MAX_CAPTION), parse_mode=mode,
                reply_markup=markup, **extra,
            )
        if row.photo_file_id:
            return await self.sender.send_photo(
                chat_id, row.photo_file_id, caption=cut(text, MAX_CAPTION), parse_mode=mode, reply_markup=markup, **extra,
            )
        return await self.sender.send_message(
            chat_id, text if html else cut(text, MAX_TEXT), parse_mode=mode, reply_markup=markup,
            disable_web_page_preview=True, **extra,
        )

    def _retry(self, row: Delivery, error: str) -> Outcome:
        """Try again later with exponential backoff, or give up after ``MAX_ATTEMPTS``."""
        if row.attempts >= MAX_ATTEMPTS:
            log.warning("delivery %s failed after %d attempts: %s", row.id, row.attempts, error)
            return Outcome(row.id, DeliveryState.FAILED, error)
        backoff = min(2 ** max(row.attempts - 1, 0), 300) * random.uniform(0.8, 1.2)
        return Outcome(row.id, DeliveryState.QUEUED, error, retry_at=self.clock() + dt.timedelta(seconds=backoff))

    # --- recording ------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        next_heartbeat = time.monotonic() + HEARTBEAT
        while True:
            await _wait(self.flush_now, FLUSH_INTERVAL)
            self.flush_now.clear()
            try:
                await self._flush()
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT
                    await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not record delivery outcomes; retrying")
                await asyncio.sleep(0.5)

    async def _flush(self) -> None:
        """Write the known outcomes in one transaction (kept for the next try if it fails)."""
        if not self.outcomes:
            return
        batch, self.outcomes = self.outcomes, []
        try:
            async with self.db.session() as session:
                await mark_many(session, batch)
                gone = [o.delivery_id for o in batch if o.state == DeliveryState.UNREACHABLE]
                if gone:
                    chats = select(Delivery.chat_id).where(Delivery.id.in_(gone) & (Delivery.chat_id > 0))
                    await session.execute(update(User).where(User.telegram_id.in_(chats)).values(unreachable=True))
        except BaseException:
            self.outcomes[:0] = batch
            raise

    async def _heartbeat(self) -> None:
        """Renew the leases this process holds; put back rows of processes whose lease ran out."""
        now = self.clock()
        async with self.db.session() as session:
            await outbox.extend_leases(session, self.worker, now + self.lease)
            recovered = await outbox.recover_stale(session, now, self.worker)
        if recovered:
            log.info("took back %d messages whose sender stopped answering", recovered)
        self.budget.prune()


def render_text(lang: str, text_key: str, params: dict[str, Any] | None) -> str:
    """A stored message (key and parameters) in ``lang``, not yet cut to Telegram's limit."""
    return t(lang, text_key, **{k: _param(lang, v) for k, v in (params or {}).items()})


def render(row: Delivery, lang: str) -> tuple[str, Any]:
    """The text and keyboard of a row in ``lang``."""
    text = fit(render_text(lang, row.text_key, row.params))
    markup = keyboard(lang, [[(_label(lang, b[0]), b[1]) for b in r] for r in row.buttons or []])
    return text, markup


def _param(lang: str, value: Any) -> Any:
    """A stored parameter in ``lang``: ``{"t": key}`` is a catalogue message, a bilingual dict its half."""
    if isinstance(value, dict) and set(value) == {"t"}:
        return t(lang, str(value["t"]))
    return localise(lang, value)


def _label(lang: str, label: Any) -> str:
    """A stored button label: a message id, or a bilingual dict rendered as literal text."""
    if isinstance(label, dict):
        return "=" + str(localise(lang, label))
    return str(label)


def _seconds(value: float | dt.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def _retry_after(exc: RetryAfter) -> float:
    # PTB 22 warns when ``retry_after`` is read as an int; the timedelta is kept privately.
    value = getattr(exc, "_retry_after", None)
    return _seconds(value) if isinstance(value, (int, float, dt.timedelta)) else 1.0


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds`` (``asyncio.wait_for`` may swallow a cancel in 3.11)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
