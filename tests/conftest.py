"""Shared fixtures: a real database (SQLite file, or PostgreSQL when LIBRARYBOT_TEST_DATABASE_URL is
set), and a running bot talking HTTP to the Bot API emulator."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from storage.db import Database

if TYPE_CHECKING:
    from bot.embedded import EmbeddedBot
from storage.models import create_schema

ROOT = Path(__file__).resolve().parents[1]


async def _fresh_database(tmp_path: Path) -> Database:
    url = os.environ.get("LIBRARYBOT_TEST_DATABASE_URL")
    if not url:
        return Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    # One PostgreSQL database per test: created from the server's maintenance database, dropped after.
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:16]}"
    base, _, _ = url.rpartition("/")
    admin = await asyncpg.connect(base.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return Database(f"{base}/{name}")


async def _drop_database(db: Database) -> None:
    await db.dispose()
    if db.dialect != "postgresql":
        return
    import asyncpg

    base, _, name = db.url.rpartition("/")
    admin = await asyncpg.connect(base.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A fresh database with the current schema."""
    database = await _fresh_database(tmp_path)
    await create_schema(database)
    try:
        yield database
    finally:
        await _drop_database(database)


@pytest.fixture
async def bot_env(db: Database) -> AsyncIterator[EmbeddedBot]:
    """The real bot polling the Bot API emulator over HTTP, on the test database."""
    from bot.embedded import EmbeddedBot

    env = await EmbeddedBot.start(db)
    try:
        yield env
    finally:
        await env.stop()
