"""Bot state that must survive a restart: processed update ids and conversation/user/chat data."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import String, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow


class ProcessedUpdate(Base):
    """An update the bot received: kept (with its content) before Telegram is told it arrived, and
    marked done once its handlers finished; a second delivery of the same update is ignored.

    Until it is done the row is leased to the process handling it (``worker``, ``leased_until``);
    the rows of a process that died are taken over by another (or the next) one when the lease runs
    out. Once done, the content is dropped and only the id is kept, to recognise a late copy.
    """

    __tablename__ = "processed_updates"

    update_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    processed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # when it was received
    payload: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(64), default=None)
    leased_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    done_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class PersistedState(Base):
    """One value of python-telegram-bot's persistence: a conversation's state, or user/chat data."""

    __tablename__ = "persisted_state"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)  # conversation:<name>, user, chat, bot
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[dict[str, Any]]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind is not None and session.bind.dialect.name == "postgresql" else sqlite_insert


async def receive_update(
    session: AsyncSession, update_id: int, payload: dict[str, Any], worker: str, lease_until: dt.datetime
) -> bool:
    """Keep a received update (leased to ``worker``) before it is acknowledged; False when a copy
    of it was received before (by this process or another), which is then not processed again."""
    stmt = _insert(session)(ProcessedUpdate).values(
        update_id=update_id, processed_at=utcnow(), payload=payload, worker=worker, leased_until=lease_until, attempts=1
    )
    result = await session.execute(stmt.on_conflict_do_nothing(index_elements=["update_id"]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def take_update(session: AsyncSession, update_id: int, worker: str, lease_until: dt.datetime) -> bool:
    """Just before the handlers run: True when ``worker`` may process the update, i.e. it holds its
    lease, or nobody had recorded the update (it could not be kept when it arrived) and now
    ``worker`` has. False when it is done, or another process took it over."""
    result = await session.execute(
        update(ProcessedUpdate)
        .where(ProcessedUpdate.update_id == update_id, ProcessedUpdate.worker == worker, ProcessedUpdate.done_at.is_(None))
        .values(leased_until=lease_until)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        return True
    stmt = _insert(session)(ProcessedUpdate).values(
        update_id=update_id, processed_at=utcnow(), worker=worker, leased_until=lease_until, attempts=1
    )
    result = await session.execute(stmt.on_conflict_do_nothing(index_elements=["update_id"]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def finish_update(session: AsyncSession, update_id: int) -> None:
    """The update's handlers finished: mark it done and drop its content."""
    await session.execute(
        update(ProcessedUpdate)
        .where(ProcessedUpdate.update_id == update_id, ProcessedUpdate.done_at.is_(None))
        .values(done_at=utcnow(), payload=None, worker=None, leased_until=None)
    )


async def renew_leases(session: AsyncSession, worker: str, lease_until: dt.datetime) -> None:
    """``worker`` is alive: extend the lease of every update it holds and has not finished."""
    await session.execute(
        update(ProcessedUpdate)
        .where(ProcessedUpdate.worker == worker, ProcessedUpdate.done_at.is_(None))
        .values(leased_until=lease_until)
    )


async def release_leases(session: AsyncSession, worker: str) -> None:
    """``worker`` stops: what it holds and did not finish may be taken over at once."""
    await session.execute(
        update(ProcessedUpdate)
        .where(ProcessedUpdate.worker == worker, ProcessedUpdate.done_at.is_(None))
        .values(leased_until=utcnow() - dt.timedelta(seconds=1))
    )


async def abandoned_updates(session: AsyncSession, worker: str, now: dt.datetime, limit: int = 100) -> list[int]:
    """Received updates not done whose lease ran out (their process died), oldest first."""
    rows = await session.scalars(
        select(ProcessedUpdate.update_id)
        .where(
            ProcessedUpdate.done_at.is_(None),
            ProcessedUpdate.leased_until < now,
            or_(ProcessedUpdate.worker.is_(None), ProcessedUpdate.worker != worker),
        )
        .order_by(ProcessedUpdate.update_id)
        .limit(limit)
    )
    return list(rows)


async def take_over_update(
    session: AsyncSession, update_id: int, worker: str, now: dt.datetime, lease_until: dt.datetime
) -> tuple[dict[str, Any] | None, int] | None:
    """Take over one abandoned update for ``worker``: its content and how many times it was tried,
    or None when another process took it first (or it got done meanwhile)."""
    row = (await session.execute(
        select(ProcessedUpdate.worker, ProcessedUpdate.payload, ProcessedUpdate.attempts).where(
            ProcessedUpdate.update_id == update_id, ProcessedUpdate.done_at.is_(None), ProcessedUpdate.leased_until < now
        )
    )).first()
    if row is None:
        return None
    previous, payload, attempts = row
    # Compare and set on the previous holder: of two processes taking over at once, one wins.
    result = await session.execute(
        update(ProcessedUpdate)
        .where(
            ProcessedUpdate.update_id == update_id,
            ProcessedUpdate.done_at.is_(None),
            ProcessedUpdate.leased_until < now,
            ProcessedUpdate.worker.is_(None) if previous is None else ProcessedUpdate.worker == previous,
        )
        .values(worker=worker, leased_until=lease_until, attempts=attempts + 1)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return payload, attempts + 1


async def update_seen(session: AsyncSession, update_id: int) -> bool:
    """True when ``update_id`` was already processed."""
    return await session.get(ProcessedUpdate, update_id) is not None


async def forget_user_state(session: AsyncSession, telegram_id: int) -> None:
    """Erase the persisted chat data, user data and conversation states of one person."""
    uid = int(telegram_id)
    # Conversation keys are JSON lists such as "[chat_id, user_id]".
    in_key = or_(*(PersistedState.key.like(p) for p in (f"[{uid}]", f"[{uid}, %", f"%, {uid}]", f"%, {uid}, %")))
    await session.execute(
        delete(PersistedState).where(
            PersistedState.kind.in_(["user", "chat"]) & (PersistedState.key == str(uid))
            | PersistedState.kind.like("conversation:%") & in_key
        )
    )


async def forget_update_ids_before(session: AsyncSession, before: dt.datetime) -> None:
    """Drop the record of old update ids that are done (Telegram never redelivers after 24 hours)."""
    await session.execute(
        delete(ProcessedUpdate).where(ProcessedUpdate.processed_at < before, ProcessedUpdate.done_at.is_not(None))
    )


async def load_state(session: AsyncSession, kind: str) -> dict[str, dict[str, Any]]:
    """Every stored value of ``kind``, by key."""
    rows = await session.execute(select(PersistedState.key, PersistedState.value).where(PersistedState.kind == kind))
    return {key: value for key, value in rows}


async def save_state(session: AsyncSession, kind: str, key: str, value: dict[str, Any] | None) -> None:
    """Store (or with None, delete) one value."""
    if value is None:
        await session.execute(delete(PersistedState).where(PersistedState.kind == kind, PersistedState.key == key))
        return
    stmt = _insert(session)(PersistedState).values(kind=kind, key=key, value=value, updated_at=utcnow())
    await session.execute(
        stmt.on_conflict_do_update(index_elements=["kind", "key"], set_={"value": value, "updated_at": utcnow()})
    )
