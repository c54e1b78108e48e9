"""The durable outbox: every push the bot sends (notices, alerts, replies relayed between people,
emergency broadcasts) is first a row here, written in the same transaction as the change that
caused it, then delivered by ``bot.dispatcher``.

A row carries a message key of the translation catalogue and its parameters, not rendered text:
the dispatcher renders it in the recipient's language at send time. A parameter whose value is a
``{"zh": …, "en": …}`` dict is taken in the recipient's language.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import Index, LargeBinary, String, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

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
    telegram_message_id: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]


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
    if dedupe_key is None:
        session.add(delivery)
        await session.flush()
        return delivery
    try:
        async with session.begin_nested():
            session.add(delivery)
        return delivery
    except IntegrityError:
        return None


async def claim_due(session: AsyncSession, now: dt.datetime, limit: int, lease: dt.timedelta) -> list[Delivery]:
    """Take up to ``limit`` due messages, most urgent first, leasing them to this process.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets several bot processes share the outbox without
    sending a row twice; SQLite serialises writers, so the same query is safe there too. A row whose
    lease ran out (its process died mid-send) is due again.
    """
    due = (
        (Delivery.state == DeliveryState.QUEUED) & (Delivery.not_before <= now)
        | (Delivery.state == DeliveryState.SENDING) & (Delivery.claimed_until < now)
    )
    query = select(Delivery).where(due).order_by(Delivery.priority, Delivery.id).limit(limit)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list(await session.scalars(query))
    for row in rows:
        row.state = DeliveryState.SENDING
        row.claimed_until = now + lease
        row.attempts += 1
    await session.flush()
    return rows


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
    values: dict[str, Any] = {"state": state, "claimed_until": None}
    if error is not None:
        values["last_error"] = error[:512]
    if message_id is not None:
        values["telegram_message_id"] = message_id
    if state == DeliveryState.SENT:
        values["sent_at"] = utcnow()
    if retry_at is not None:
        values["state"] = DeliveryState.QUEUED
        values["not_before"] = retry_at
    await session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


async def backlog(session: AsyncSession) -> int:
    """How many messages are waiting to be sent."""
    count = await session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING]))
    )
    return int(count or 0)


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """Erase every message addressed to this person (they may quote their own words)."""
    from sqlalchemy import delete

    await session.execute(delete(Delivery).where(Delivery.chat_id == telegram_id))
