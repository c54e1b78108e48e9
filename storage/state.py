"""Bot state that must survive a restart: processed update ids and conversation/user/chat data."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import String, delete, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow


class ProcessedUpdate(Base):
    """An update id the bot has handled; a second delivery of the same update is ignored."""

    __tablename__ = "processed_updates"

    update_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    processed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class PersistedState(Base):
    """One value of python-telegram-bot's persistence: a conversation's state, or user/chat data."""

    __tablename__ = "persisted_state"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)  # conversation:<name>, user, chat, bot
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[dict[str, Any]]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind is not None and session.bind.dialect.name == "postgresql" else sqlite_insert


async def claim_update(session: AsyncSession, update_id: int) -> bool:
    """Record ``update_id`` as processed; False when it already was (a duplicate delivery)."""
    stmt = _insert(session)(ProcessedUpdate).values(update_id=update_id, processed_at=utcnow())
    result = await session.execute(stmt.on_conflict_do_nothing(index_elements=["update_id"]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


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
    """Drop the record of old update ids (Telegram never redelivers after 24 hours)."""
    await session.execute(delete(ProcessedUpdate).where(ProcessedUpdate.processed_at < before))


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
