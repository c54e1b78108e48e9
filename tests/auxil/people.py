"""The people a robustness test plays: a visitor, a reader with a linked card, staff, a duty
officer and an admin, made directly in the store (no chat needed)."""

from __future__ import annotations

import functools
from typing import Any

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


# Columns that say whose a row is, and columns holding what people wrote or what identifies them.
OWNER_COLUMNS = ("telegram_id", "requester_id", "author_id", "reporter_id", "user_id", "reader_id", "chat_id")
# (Titles are left out: a title a reader asked for may also be in the catalog, which is public.)
PRIVATE_COLUMNS = ("text", "note", "description", "place", "comment", "reason", "body", "name", "card_number")
PUBLIC_TABLES = ("records", "record_identifiers", "items", "search_terms", "staff", "invites", "deliveries",
                 "persisted_state", "processed_updates", "login_locks")


async def others_private_strings(db: Database, telegram_id: int, reader_id: int | None = None) -> set[str]:
    """What people wrote to the library, and the cards and names of readers, except what is
    ``telegram_id``'s own (and their card's): none of it may ever be shown to ``telegram_id``."""
    from sqlalchemy import select

    from storage.db import Base

    mine = {telegram_id, reader_id} - {None}
    found: set[str] = set()
    theirs: set[str] = set()  # the same words in their own rows (a canned staff reply) are no leak
    owned: dict[str, set[Any]] = {}  # primary keys of the rows that are the person's own, by table
    async with db.session() as s:
        for table in Base.metadata.sorted_tables:  # parents before children: follow foreign keys
            if table.name in PUBLIC_TABLES:
                continue
            owners = [c for c in table.columns if c.name in OWNER_COLUMNS]
            parents = [(c, fk.column.table.name) for c in table.columns for fk in c.foreign_keys]
            private = [c for c in table.columns if c.name in PRIVATE_COLUMNS]
            key = next(iter(table.primary_key.columns), None)
            for row in (await s.execute(select(table))).mappings():
                own = (
                    table.name == "readers" and row["id"] in mine
                    or any(row[c.name] in mine for c in owners)
                    or any(row[c.name] in owned.get(parent, ()) for c, parent in parents)
                )
                if own:
                    if key is not None:
                        owned.setdefault(table.name, set()).add(row[key.name])
                    theirs.update(str(row[c.name]).strip() for c in private if row[c.name])
                    continue
                if not owners and not parents and table.name != "readers":
                    continue
                for column in private:
                    value = row[column.name]
                    if isinstance(value, str) and len(value.strip()) >= 5:
                        found.add(value.strip())
    return found - theirs


_SMALL_CATALOG: list[Any] = []


async def seed_library(db: Database, policy: Any) -> Any:
    """The demo library (readers with loans and holds, staff, tickets, requests, incidents: every
    module's ``seed_demo``) on a catalog of a few records instead of two thousand, to keep tests fast.
    Sample cards: D0001/1234 (Telegram 8001), D0002/2345 (8002), D0003/3456 (8003), D0004/4567;
    staff 9001, duty officer 9002."""
    import shutil
    import tempfile
    from pathlib import Path

    import bot.demo as demo

    small = [name for name in ("loc-books-extra.mrc",) if (demo.DEMO_DATA / name).is_file()]
    if not small:
        return await demo.seed(db, policy)
    if not _SMALL_CATALOG:
        folder = Path(tempfile.mkdtemp(prefix="librarybot-small-catalog-"))
        for name in small:
            shutil.copy(demo.DEMO_DATA / name, folder / name)
        _SMALL_CATALOG.append(folder)
    full, demo.DEMO_DATA = demo.DEMO_DATA, _SMALL_CATALOG[0]
    try:
        return await demo.seed(db, policy)
    finally:
        demo.DEMO_DATA = full
