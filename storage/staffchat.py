"""The staff group as the store knows it: its current id and whether the bot may write to it.

The configured id (``LIBRARYBOT_STAFF_CHAT_ID``) names the group for good; the group itself may
change under the bot. When a group becomes a supergroup Telegram gives it a new id: the new id is
kept here (the configured value stays as it was) and every queued message follows it. When the bot
is removed from the group or may no longer write there, the group is marked unavailable: the
admins and duty officers are told privately, messages that cannot wait go to the staff privately
(``deliver_privately``) and the others wait until the bot is back (``mark_available``).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import String, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow
from storage.outbox import Delivery, DeliveryState, Priority, enqueue
from storage.people import Role, staff_ids


class StaffChatState(enum.StrEnum):
    OK = "ok"
    REMOVED = "removed"  # the bot was removed (kicked, or left)
    MUTED = "muted"  # the bot is in the group but may not post


class StaffChat(Base):
    """The staff group, keyed by its configured id."""

    __tablename__ = "staff_chat"

    configured_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    chat_id: Mapped[int]  # where it is now (a supergroup's new id after an upgrade)
    state: Mapped[str] = mapped_column(String(16), default=StaffChatState.OK)
    changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    migrated_at: Mapped[dt.datetime | None]


async def staff_chat(session: AsyncSession, configured_id: int) -> StaffChat:
    """The staff group's stored state (made, as configured and available, on first use)."""
    row = await session.get(StaffChat, configured_id)
    if row is None:
        row = StaffChat(configured_id=configured_id, chat_id=configured_id, state=StaffChatState.OK, changed_at=utcnow())
        session.add(row)
        await session.flush()
    return row


async def follow_migration(session: AsyncSession, configured_id: int, old_id: int, new_id: int, now: dt.datetime) -> bool:
    """The group ``old_id`` became the supergroup ``new_id``: keep the new id, move the messages
    not yet sent there (so later edits find them) and tell the group once. False when it was already known, or not the staff group."""
    row = await staff_chat(session, configured_id)
    if row.chat_id == new_id or old_id not in (row.chat_id, configured_id):
        return False
    result = await session.execute(
        update(StaffChat)
        .where((StaffChat.configured_id == configured_id) & (StaffChat.chat_id != new_id))
        .values(chat_id=new_id, migrated_at=now)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return False  # another process followed it first
    await session.execute(
        update(Delivery)
        .where(Delivery.chat_id.in_({old_id, configured_id}) & Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING]))
        .values(chat_id=new_id)
        .execution_options(synchronize_session=False)
    )
    await enqueue(
        session, new_id, "staffchat.migrated", {"old": old_id, "new": new_id},
        kind="system", priority=Priority.ALERT, dedupe_key=f"staffchat:migrated:{new_id}",
    )
    return True


async def mark_unavailable(session: AsyncSession, configured_id: int, state: StaffChatState, now: dt.datetime) -> bool:
    """The bot may no longer write to the group: record it and tell the admins and duty officers
    privately. False when it was already known (every process and every failed send may report it)."""
    row = await staff_chat(session, configured_id)
    result = await session.execute(
        update(StaffChat)
        .where((StaffChat.configured_id == configured_id) & (StaffChat.state != state))
        .values(state=state, changed_at=now)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return False
    stamp = int(now.timestamp())
    for uid in await staff_ids(session, Role.DUTY_OFFICER):
        await enqueue(
            session, uid, f"staffchat.{state}", {"chat": row.chat_id},
            kind="system", priority=Priority.ALERT, dedupe_key=f"staffchat:{state}:{stamp}:{uid}",
        )
    return True


async def mark_available(session: AsyncSession, configured_id: int, now: dt.datetime) -> bool:
    """The bot may write to the group again: tell the admins and duty officers, and send what
    waited for it. False when it was not unavailable."""
    row = await staff_chat(session, configured_id)
    result = await session.execute(
        update(StaffChat)
        .where((StaffChat.configured_id == configured_id) & (StaffChat.state != StaffChatState.OK))
        .values(state=StaffChatState.OK, changed_at=now)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return False
    await session.execute(
        update(Delivery)
        .where(Delivery.chat_id.in_({row.chat_id, configured_id}) & (Delivery.state == DeliveryState.QUEUED))
        .values(not_before=now)
        .execution_options(synchronize_session=False)
    )
    stamp = int(now.timestamp())
    for uid in await staff_ids(session, Role.DUTY_OFFICER):
        await enqueue(
            session, uid, "staffchat.back", {"chat": row.chat_id},
            kind="system", priority=Priority.ALERT, dedupe_key=f"staffchat:back:{stamp}:{uid}",
        )
    return True


async def deliver_privately(session: AsyncSession, delivery_id: int) -> int:
    """Queue a copy of a staff-group message to every staff member privately (the group cannot be
    written to); people who already received the same message privately are left out. How many."""
    row = await session.get(Delivery, delivery_id)
    if row is None:
        return 0
    siblings = await session.execute(
        select(Delivery.chat_id, Delivery.params).where(
            (Delivery.text_key == row.text_key) & (Delivery.chat_id > 0) & (Delivery.id != row.id)
            & (Delivery.created_at >= row.created_at - dt.timedelta(minutes=1))
        )
    )
    already = {chat for chat, params in siblings if _same(params, row.params)}
    count = 0
    for uid in await staff_ids(session, Role.STAFF):
        if uid in already:
            continue
        copy = await enqueue(
            session, uid, row.text_key, row.params,
            kind=row.kind, priority=Priority(min(row.priority, Priority.ALERT)), buttons=row.buttons,
            photo_file_id=row.photo_file_id,
            document=(row.document_name or "file", row.document) if row.document is not None else None,
            dedupe_key=f"staffchat:private:{row.id}:{uid}",
        )
        count += copy is not None
    return count


def _same(a: Any, b: Any) -> bool:
    return (a or {}) == (b or {})
