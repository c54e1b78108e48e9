"""The way of an update from Telegram to the handlers: kept in the database before Telegram is told
it arrived, processed one at a time per chat and person (many chats at once), and marked done when
its handlers finished.

Acknowledging an update (the webhook's 200, the next ``getUpdates`` offset) tells Telegram never to
send it again, so it happens only once the update is stored: ``UpdateInbox.receive`` runs inside
``DurableUpdateQueue.put``, which both the webhook and python-telegram-bot's long polling call
before acknowledging. A copy of an update already received (delivered twice, or to two processes)
is not put in the queue. Each stored update is leased to the process that received it; that
process renews its leases while it lives. When it dies (SIGKILL, power cut), another process, or
the next one started, takes over the stored updates whose lease ran out and processes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from telegram import Update
from telegram.ext import Application, BaseUpdateProcessor

from storage.db import Database, utcnow
from storage.state import (
    abandoned_updates,
    finish_update,
    forget_update_ids_before,
    receive_update,
    release_leases,
    renew_leases,
    take_over_update,
    take_update,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

LEASE = dt.timedelta(seconds=15)  # a process silent for this long is taken for dead
TICK = 3.0  # seconds between lease renewals and looks for abandoned updates
MAX_ATTEMPTS = 3  # an update whose process died this many times while handling it is given up
KEEP_DONE = dt.timedelta(days=2)  # Telegram never redelivers after 24 hours
DATABASE_DOWN = (DBAPIError, OperationalError, OSError, ConnectionError, TimeoutError)


class UpdateInbox:
    """The received updates of one bot process, in the ``processed_updates`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.worker = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue: DurableUpdateQueue | None = None
        self.app: Application | None = None  # type: ignore[type-arg]
        self.finished: set[int] = set()  # done already (by the last handler group), not to mark again
        self.held: set[int] = set()  # stored for this process, not yet started
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        # Many updates arrive at once (a webhook gets dozens of requests together): they are stored,
        # and marked done, a batch to one transaction, so that a burst does not queue one write
        # per update for SQLite's single writer.
        self._receiving: GroupCommit[tuple[int, dict[str, Any]], bool] = GroupCommit(db, self._receive_all)
        self._finishing: GroupCommit[int, None] = GroupCommit(db, self._finish_all)

    def lease_until(self) -> dt.datetime:
        return utcnow() + LEASE

    async def receive(self, update: Update) -> bool:
        """Store ``update`` for this process; False when a copy was received before."""
        new = await self._receiving.write((update.update_id, update.to_dict()))
        if new:
            self.held.add(update.update_id)
        return new

    async def _receive_all(self, session: AsyncSession, batch: list[tuple[int, dict[str, Any]]]) -> list[bool]:
        lease = self.lease_until()
        return [await receive_update(session, update_id, payload, self.worker, lease) for update_id, payload in batch]

    async def _finish_all(self, session: AsyncSession, batch: list[int]) -> list[None]:
        for update_id in batch:
            await finish_update(session, update_id)
        return [None] * len(batch)

    async def take(self, update_id: int) -> bool:
        """Just before the handlers: may this process handle the update (see ``take_update``)?"""
        if update_id in self.held:  # stored for this process moments ago, its lease renewed since
            self.held.discard(update_id)
            return True
        async with self.db.session() as session:
            return await take_update(session, update_id, self.worker, self.lease_until())

    async def finish(self, update_id: int) -> None:
        """The handlers of ``update_id`` finished: it is done."""
        if update_id in self.finished:
            self.finished.discard(update_id)
            return
        try:
            await self._finishing.write(update_id)
        except DATABASE_DOWN as exc:  # its lease runs out and it is processed again: logged, not lost
            log.warning("could not mark update %s done: %s", update_id, type(exc).__name__)

    async def finish_early(self, update_id: int) -> None:
        """Mark done from the last handler group (so that what the update erased is gone when its
        answer is out); the processor then does not mark it again."""
        await self._finishing.write(update_id)
        self.finished.add(update_id)

    # -- the process's heartbeat: leases, abandoned updates, old ids --------------------------------

    def start(self, app: Application) -> None:  # type: ignore[type-arg]
        self.app = app
        self._task = asyncio.create_task(self._run(), name="update-inbox")

    async def stop(self) -> None:
        """Stop renewing; whatever this process holds and did not finish may be taken over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with self.db.session() as session:
                await release_leases(session, self.worker)
        except DATABASE_DOWN as exc:
            log.warning("could not release the updates in hand: %s", type(exc).__name__)

    async def _run(self) -> None:
        ticks = 0
        while True:
            try:
                await self.tick(prune=ticks % 1000 == 0)
                self._failing_since = None
            except DATABASE_DOWN as exc:
                now = asyncio.get_running_loop().time()
                if self._failing_since is None or now - self._failing_since > 60:
                    self._failing_since = now  # logged once a minute while it lasts
                    log.warning("update inbox: database unreachable (%s)", type(exc).__name__)
            except Exception:
                log.exception("update inbox: unexpected error")
            ticks += 1
            await asyncio.sleep(TICK)

    async def tick(self, *, prune: bool = False) -> int:
        """Renew this process's leases and take over abandoned updates; how many were taken over."""
        async with self.db.session() as session:
            await renew_leases(session, self.worker, self.lease_until())
            if prune:
                await forget_update_ids_before(session, utcnow() - KEEP_DONE)
        async with self.db.session() as session:
            candidates = await abandoned_updates(session, self.worker, utcnow())
        taken = 0
        for update_id in candidates:
            async with self.db.session() as session:
                got = await take_over_update(session, update_id, self.worker, utcnow(), self.lease_until())
            if got is None:
                continue
            payload, attempts = got
            if payload is None or attempts > MAX_ATTEMPTS:
                log.warning("update %s given up after %s attempts", update_id, attempts - 1)
                await self.finish(update_id)
                continue
            assert self.app is not None and self.queue is not None
            log.info("update %s taken over from a process that stopped (attempt %s)", update_id, attempts)
            self.held.add(update_id)
            await self.queue.requeue(Update.de_json(payload, self.app.bot))
            taken += 1
        return taken


class GroupCommit(Generic[T, R]):
    """Writes asked for while a transaction is running wait for it, then go together in the next."""

    def __init__(self, db: Database, write_all: Callable[[AsyncSession, list[T]], Awaitable[list[R]]]) -> None:
        self.db = db
        self.write_all = write_all
        self.pending: list[tuple[T, asyncio.Future[R]]] = []
        self.writing = False
        self.task: asyncio.Task[None] | None = None

    async def write(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if not self.writing:
            self.writing = True
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with self.db.session() as session:
                        results = await self.write_all(session, [item for item, _ in batch])
                except BaseException as exc:  # every writer of the batch learns why
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self.writing = False


class DurableUpdateQueue(asyncio.Queue):  # type: ignore[type-arg]
    """The application's update queue: an update is stored before it is queued, and ``put``
    returns (so the update may be acknowledged) only then. A copy of an update received before is
    dropped. When the database cannot be reached the update is queued all the same: the gate then
    tells the person to try again, which answers it."""

    def __init__(self, inbox: UpdateInbox) -> None:
        super().__init__()
        self.inbox = inbox
        inbox.queue = self

    async def put(self, item: Any) -> None:
        if isinstance(item, Update):
            try:
                if not await self.inbox.receive(item):
                    log.info("update %s received before; ignored", item.update_id)
                    return
            except DATABASE_DOWN as exc:
                log.warning("update %s could not be stored: %s", item.update_id, type(exc).__name__)
        await super().put(item)

    async def requeue(self, update: Update) -> None:
        """Queue an update taken over from the store (it is stored already)."""
        await super().put(update)


def order_key(update: object) -> tuple[int, int] | None:
    """Updates with the same key are processed one after the other: one person in one chat, the
    key of python-telegram-bot's conversations."""
    if not isinstance(update, Update) or update.effective_chat is None or update.effective_user is None:
        return None
    return update.effective_chat.id, update.effective_user.id


class ChatOrderedProcessor(BaseUpdateProcessor):
    """Many updates at once, but one person's updates in one chat one at a time, in the order they
    arrived: a conversation reads its state when an update starts, so two messages for the same step
    handled together would both be taken as that step's answer.

    An update waiting for its turn does not hold one of the ``limit`` processing slots (a person
    sending fifty messages does not stall everybody else); the lock of a key is dropped when no
    update of that key is running or waiting. Once processed, the update is marked done.
    """

    def __init__(self, inbox: UpdateInbox | None, limit: int = 64) -> None:
        # python-telegram-bot's own bound is set high: waiting for a key's turn must not take a slot.
        super().__init__(max_concurrent_updates=limit * 16)
        self.inbox = inbox
        self.slots = asyncio.Semaphore(limit)
        self.locks: dict[tuple[int, int], tuple[asyncio.Lock, int]] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        key = order_key(update)
        if key is None:
            async with self.slots:
                await coroutine
            await self._finish(update)
            return
        lock, users = self.locks.get(key, (asyncio.Lock(), 0))
        self.locks[key] = (lock, users + 1)
        try:
            async with lock:
                async with self.slots:
                    await coroutine
                await self._finish(update)
        finally:
            lock, users = self.locks[key]
            if users == 1:
                del self.locks[key]
            else:
                self.locks[key] = (lock, users - 1)

    async def _finish(self, update: object) -> None:
        if self.inbox is not None and isinstance(update, Update):
            await self.inbox.finish(update.update_id)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
