"""The durable outbox: every push the bot sends (notices, alerts, replies relayed between people,
emergency broadcasts) is first a row here, written in the same transaction as the change that
caused it, then delivered by ``bot.dispatcher``.

A row carries a message key of the translation catalogue and its parameters, not rendered text:
the dispatcher renders it in the recipient's language at send time. A parameter whose value is a
``{"zh": …, "en": …}`` dict is taken in the recipient's language; a parameter ``{"t": "area.key"}``
is that catalogue message in the recipient's language (so storage can name a label without
holding its text).

Life of a row: ``queued → sending → sent | failed | unreachable``. ``claim_due`` leases due rows to
one dispatcher (``claimed_by``, ``claimed_until``); the dispatcher renews the lease of the rows it
holds while it is alive. A row whose lease ran out (its process died mid-send) is put back in the
queue by ``recover_stale``; a process that finds the rows of a dead process on its own host at start
takes them back at once (``recover_worker``). Only rows whose request had reached Telegram when the
process died can be sent twice.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Index,
    LargeBinary,
    String,
    Table,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from storage.db import Base, utcnow


class Priority(enum.IntEnum):
    """Lower numbers go first: an emergency preempts everything else."""

    EMERGENCY = 0
    ALERT = 10  # staff alerts, incident reports, replies between people
    NORMAL = 20  # status changes, hold notices
    BULK = 30  # daily digests


class DeliveryState(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


FINAL_STATES = (DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.UNREACHABLE)

# Buttons: rows of [label key or {"zh","en"} dict, callback data]; a label key is rendered like text.
Buttons = list[list[list[Any]]]


class Delivery(Base):
    """One message to one chat."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "state", "priority", "not_before", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    chat_id: Mapped[int] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(32))  # notice, alert, broadcast, ticket, ill, …
    priority: Mapped[int] = mapped_column(default=Priority.NORMAL)
    text_key: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    buttons: Mapped[list[Any] | None]
    photo_file_id: Mapped[str | None] = mapped_column(String(256))
    document_name: Mapped[str | None] = mapped_column(String(256))
    document: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Unique when set: the same notice is never enqueued twice, by a rerun or a second process.
    dedupe_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    broadcast_id: Mapped[int | None] = mapped_column(index=True)  # storage.incidents.Broadcast
    language: Mapped[str | None] = mapped_column(String(8))  # forces a language (e.g. the staff chat)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.QUEUED)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(String(512))
    not_before: Mapped[dt.datetime] = mapped_column(default=utcnow)
    claimed_until: Mapped[dt.datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(96))  # the dispatcher holding the lease
    telegram_message_id: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


# --- waking the dispatcher -------------------------------------------------------------------------

_listeners: set[Callable[[], None]] = set()


def add_listener(callback: Callable[[], None]) -> None:
    """Call ``callback`` after every commit that queued a message (the dispatcher wakes up)."""
    _listeners.add(callback)


def remove_listener(callback: Callable[[], None]) -> None:
    _listeners.discard(callback)


def _queued(session: AsyncSession) -> None:
    session.sync_session.info["outbox_queued"] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop("outbox_queued", False):
        for callback in list(_listeners):
            callback()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("outbox_queued", None)


# --- queueing --------------------------------------------------------------------------------------


async def enqueue(
    session: AsyncSession,
    chat_id: int,
    text_key: str,
    params: dict[str, Any] | None = None,
    *,
    kind: str = "notice",
    priority: Priority = Priority.NORMAL,
    buttons: Buttons | None = None,
    photo_file_id: str | None = None,
    document: tuple[str, bytes] | None = None,
    dedupe_key: str | None = None,
    broadcast_id: int | None = None,
    language: str | None = None,
    not_before: dt.datetime | None = None,
) -> Delivery | None:
    """Queue one message to ``chat_id``; None when ``dedupe_key`` was already queued.

    The row is part of the caller's transaction, so the message exists exactly when the change
    that caused it was committed.
    """
    delivery = Delivery(
        chat_id=chat_id,
        kind=kind,
        priority=int(priority),
        text_key=text_key,
        params=params or {},
        buttons=buttons,
        photo_file_id=photo_file_id,
        document_name=document[0] if document else None,
        document=document[1] if document else None,
        dedupe_key=dedupe_key,
        broadcast_id=broadcast_id,
        language=language,
        not_before=not_before or utcnow(),
    )
    _queued(session)
    if dedupe_key is None:
        session.add(delivery)
        await session.flush()
        return delivery
    if await session.scalar(select(Delivery.id).where(Delivery.dedupe_key == dedupe_key)) is not None:
        return None  # the common case of a rerun, without a savepoint
    try:
        async with session.begin_nested():
            session.add(delivery)
        return delivery
    except IntegrityError:
        return None


async def enqueue_many(
    session: AsyncSession,
    chat_ids: Sequence[int],
    text_key: str,
    params: dict[str, Any] | Callable[[int], dict[str, Any]],
    *,
    kind: str,
    priority: Priority,
    buttons: Buttons | None | Callable[[int], Buttons | None] = None,
    broadcast_id: int | None = None,
    dedupe_prefix: str | None = None,
    not_before: dt.datetime | None = None,
    dedupe_keys: Callable[[int], str] | None = None,
) -> int:
    """Queue the same message to many chats in one multi-row INSERT; the number of rows.

    ``params`` and ``buttons`` may be functions of the chat id. With ``dedupe_prefix`` each row's
    dedupe key is ``f"{dedupe_prefix}{chat_id}"`` (with ``dedupe_keys``, ``dedupe_keys(chat_id)``);
    the caller makes sure none exists yet (the whole insert fails otherwise, which is the right
    outcome for a broadcast confirmed twice).
    """
    if not chat_ids:
        return 0
    now = not_before or utcnow()
    rows = [
        {
            "chat_id": chat_id,
            "kind": kind,
            "priority": int(priority),
            "text_key": text_key,
            "params": params(chat_id) if callable(params) else params,
            "buttons": buttons(chat_id) if callable(buttons) else buttons,
            "dedupe_key": (
                dedupe_keys(chat_id)
                if dedupe_keys is not None
                else f"{dedupe_prefix}{chat_id}" if dedupe_prefix is not None else None
            ),
            "broadcast_id": broadcast_id,
            "state": DeliveryState.QUEUED.value,
            "attempts": 0,
            "not_before": now,
            "created_at": now,
        }
        for chat_id in chat_ids
    ]
    await session.execute(insert(Delivery), rows)
    _queued(session)
    return len(rows)


# --- the dispatcher's side -------------------------------------------------------------------------


async def claim_due(
    session: AsyncSession,
    now: dt.datetime,
    limit: int,
    lease: dt.timedelta,
    *,
    worker: str | None = None,
    skip_chats: Iterable[int] = (),
) -> list[Delivery]:
    """Take up to ``limit`` due messages, most urgent first, leasing them to ``worker``.

    On PostgreSQL one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)`` lets several bot
    processes share the outbox without sending a row twice. On SQLite the ids are read first (no
    write lock while the outbox is idle) and the update takes only rows still queued, so a row taken
    meanwhile by another process is simply not returned. ``skip_chats`` leaves out chats that cannot
    be sent to right now (their per-chat pace), so they do not block the others.
    """
    if limit <= 0:
        return []
    due = (Delivery.state == DeliveryState.QUEUED) & (Delivery.not_before <= now)
    skip = list(skip_chats)
    if skip:
        due = due & Delivery.chat_id.not_in(skip)
    pick = select(Delivery.id).where(due).order_by(Delivery.priority, Delivery.id).limit(limit)
    values = {
        "state": DeliveryState.SENDING,
        "claimed_until": now + lease,
        "claimed_by": worker,
        "attempts": Delivery.attempts + 1,
    }
    target: ColumnElement[bool]
    if _dialect(session) == "postgresql":
        target = Delivery.id.in_(pick.with_for_update(skip_locked=True).scalar_subquery())
    else:
        ids = list(await session.scalars(pick))
        if not ids:
            return []
        target = Delivery.id.in_(ids) & (Delivery.state == DeliveryState.QUEUED)
    statement = (
        update(Delivery)
        .where(target)
        .values(**values)
        .returning(Delivery)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    rows = list(await session.scalars(statement))
    rows.sort(key=lambda r: (r.priority, r.id))
    return rows


async def extend_leases(session: AsyncSession, worker: str, until: dt.datetime) -> None:
    """Renew the lease of every row ``worker`` holds (it is alive)."""
    await session.execute(
        update(Delivery)
        .where((Delivery.state == DeliveryState.SENDING) & (Delivery.claimed_by == worker))
        .values(claimed_until=until)
    )


async def recover_stale(session: AsyncSession, now: dt.datetime, worker: str | None = None) -> int:
    """Put back in the queue the rows whose lease ran out (not ``worker``'s own); how many."""
    stale = (Delivery.state == DeliveryState.SENDING) & (Delivery.claimed_until < now)
    if worker is not None:
        stale = stale & ((Delivery.claimed_by.is_(None)) | (Delivery.claimed_by != worker))
    result = await session.execute(
        update(Delivery)
        .where(stale)
        .values(state=DeliveryState.QUEUED, claimed_by=None, claimed_until=None, not_before=now)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        _queued(session)
    return count


async def claimants(session: AsyncSession) -> list[str]:
    """The dispatchers that hold rows being sent."""
    rows = await session.scalars(
        select(Delivery.claimed_by)
        .where((Delivery.state == DeliveryState.SENDING) & Delivery.claimed_by.is_not(None))
        .distinct()
    )
    return [r for r in rows if r]


async def recover_worker(session: AsyncSession, worker: str, now: dt.datetime) -> int:
    """Put back in the queue every row held by ``worker``, a dispatcher known to be dead."""
    result = await session.execute(
        update(Delivery)
        .where((Delivery.state == DeliveryState.SENDING) & (Delivery.claimed_by == worker))
        .values(state=DeliveryState.QUEUED, claimed_by=None, claimed_until=None, not_before=now)
    )
    count = int(getattr(result, "rowcount", 0) or 0)
    if count:
        _queued(session)
    return count


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed row.

    ``retry_at`` puts it back in the queue; ``refund`` does not count the attempt (the row was
    never tried, e.g. put back because its chat must wait, or Telegram asked everyone to slow down).
    """

    delivery_id: int
    state: DeliveryState
    error: str | None = None
    message_id: int | None = None
    retry_at: dt.datetime | None = None
    at: dt.datetime | None = None
    refund: bool = False


async def mark(
    session: AsyncSession,
    delivery_id: int,
    state: DeliveryState,
    *,
    error: str | None = None,
    message_id: int | None = None,
    retry_at: dt.datetime | None = None,
) -> None:
    """Record the outcome of one send attempt (``retry_at`` puts it back in the queue)."""
    await mark_many(session, [Outcome(delivery_id, state, error, message_id, retry_at)])


async def mark_many(session: AsyncSession, outcomes: Sequence[Outcome]) -> None:
    """Record many outcomes at once: the sent ones in one batched UPDATE, the rest one by one."""
    sent = [o for o in outcomes if o.state == DeliveryState.SENT and o.retry_at is None]
    if sent:
        table = Delivery.__table__
        assert isinstance(table, Table)
        statement = (
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values(
                state=DeliveryState.SENT.value,
                claimed_until=None,
                claimed_by=None,
                telegram_message_id=bindparam("b_message_id"),
                sent_at=bindparam("b_at"),
            )
        )
        await session.execute(
            statement,
            [{"b_id": o.delivery_id, "b_message_id": o.message_id, "b_at": o.at or utcnow()} for o in sent],
        )
    for outcome in outcomes:
        if outcome.state == DeliveryState.SENT and outcome.retry_at is None:
            continue
        values: dict[str, Any] = {"state": outcome.state, "claimed_until": None, "claimed_by": None}
        if outcome.error is not None:
            values["last_error"] = outcome.error[:512]
        if outcome.message_id is not None:
            values["telegram_message_id"] = outcome.message_id
        if outcome.retry_at is not None:
            values["state"] = DeliveryState.QUEUED
            values["not_before"] = outcome.retry_at
            _queued(session)
        if outcome.refund:
            values["attempts"] = func.max(Delivery.attempts - 1, 0) if _dialect(session) == "sqlite" else func.greatest(Delivery.attempts - 1, 0)
        await session.execute(update(Delivery).where(Delivery.id == outcome.delivery_id).values(**values))


async def backlog(session: AsyncSession) -> int:
    """How many messages are waiting to be sent."""
    count = await session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING]))
    )
    return int(count or 0)


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """Erase every message addressed to this person (they may quote their own words)."""
    await session.execute(delete(Delivery).where(Delivery.chat_id == telegram_id))


def _dialect(session: AsyncSession) -> str:
    bind = session.bind
    return bind.dialect.name if bind is not None else ""
