"""Small builders for circulation tests: titles with copies, cards, linked Telegram users."""

from __future__ import annotations

import datetime as dt
import functools

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.catalog import Item, Record
from storage.outbox import Delivery
from storage.people import Reader, User, hash_pin


@functools.cache
def pin_hash(pin: str = "1234") -> str:
    """Hashing takes ~20 ms, so each test PIN is hashed once per run."""
    return hash_pin(pin)


async def title(session: AsyncSession, control: str, name: str, copies: int = 1, item_type: str = "book") -> Record:
    record = Record(control_number=control, title=name, isbns=[])
    session.add(record)
    await session.flush()
    for n in range(copies):
        session.add(Item(barcode=f"{control}-{n + 1}", record_id=record.id, item_type=item_type, location="3F"))
    await session.flush()
    return record


async def card(
    session: AsyncSession,
    number: str,
    *,
    telegram_id: int | None = None,
    category: str = "adult",
    expires_on: dt.date | None = None,
    blocked: bool = False,
    fines_cents: int = 0,
    reminder_days: int = 3,
    name: str | None = None,
) -> Reader:
    reader = Reader(
        card_number=number, name=name or f"Reader {number}", pin_hash=pin_hash(), category=category,
        expires_on=expires_on, blocked=blocked, fines_cents=fines_cents,
    )
    session.add(reader)
    await session.flush()
    if telegram_id is not None:
        session.add(User(telegram_id=telegram_id, first_name=number, reader_id=reader.id, reminder_days=reminder_days))
        await session.flush()
    return reader


async def outbox(session: AsyncSession, chat_id: int | None = None, key: str | None = None) -> list[Delivery]:
    query = select(Delivery).order_by(Delivery.id)
    if chat_id is not None:
        query = query.where(Delivery.chat_id == chat_id)
    if key is not None:
        query = query.where(Delivery.text_key == key)
    return list(await session.scalars(query))
