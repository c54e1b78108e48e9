"""The people a robustness test plays: a visitor, a reader with a linked card, staff, a duty
officer and an admin, made directly in the store (no chat needed)."""

from __future__ import annotations

import functools

from storage.db import Database
from storage.people import Reader, Role, User, add_staff, hash_pin

ROLES = ("visitor", "reader", "staff", "duty_officer", "admin")


@functools.cache
def pin_hash(pin: str) -> str:
    """Argon2 is slow on purpose: hash each test PIN once."""
    return hash_pin(pin)


async def add_card(db: Database, card: str, pin: str, name: str, *, category: str = "adult") -> int:
    """A library card (reader record); its id."""
    async with db.session() as s:
        reader = Reader(card_number=card, name=name, pin_hash=pin_hash(pin), category=category)
        s.add(reader)
        await s.flush()
        return reader.id


async def make_person(
    db: Database, user_id: int, role: str, *, first_name: str = "Test", language: str = "en",
    reader_id: int | None = None,
) -> None:
    """A Telegram user with ``role``; a reader is linked to ``reader_id`` (a card made for them if None)."""
    if role == "reader" and reader_id is None:
        reader_id = await add_card(db, f"C{user_id}", "2468", f"Reader {user_id}")
    async with db.session() as s:
        user = await s.get(User, user_id)
        if user is None:
            user = User(telegram_id=user_id, first_name=first_name, telegram_language=language)
            s.add(user)
        if role == "reader":
            user.reader_id = reader_id
        if role in ("staff", "duty_officer", "admin"):
            await add_staff(s, user_id, Role.parse(role), f"{role} {user_id}")
