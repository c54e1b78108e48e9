"""Database faults: the database goes away while the bot runs (PostgreSQL restarted, or on SQLite a
simulated outage), and SQLite is busy under concurrent writers.

On PostgreSQL with ``LIBRARYBOT_PG_CTL`` set (``.ci/run`` exports it: a command prefix controlling
the test server, e.g. ``runuser -u … -- pg_ctl -D …``) the server is really stopped and started.
Otherwise the same scenario runs against an outage simulated in the driver: every new connection is
refused and the idle ones are dropped, which is what the bot sees of a restarting server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import event, func, select

from bot.embedded import EmbeddedBot
from bot.i18n import t
from storage.db import Database
from storage.outbox import Delivery, enqueue
from storage.people import LoginLock, User
from tests.auxil.chat import Chat, texts
from tests.auxil.people import add_card, make_person

TRY_AGAIN = t("en", "common.try_again_later")
ERROR = t("en", "common.error")


def _pg_ctl(*args: str) -> None:
    command = shlex.split(os.environ["LIBRARYBOT_PG_CTL"]) + list(args)
    if args[0] == "start":
        command += ["-o", _server_options(command)]
    # The server started by pg_ctl inherits stdout/stderr: give it none, or this call never ends.
    subprocess.run(command, check=True, timeout=60, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _server_options(command: list[str]) -> str:
    """The options the server was started with (``pg_ctl start`` forgets them, ``restart`` does not):
    its port, socket directory and settings, read back from ``postmaster.opts``."""
    data_dir = command[command.index("-D") + 1] if "-D" in command else os.environ["PGDATA"]
    argv = shlex.split(Path(data_dir, "postmaster.opts").read_text())[1:]
    options: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "-D":
            skip = True
        else:
            options.append(arg)
    return " ".join(shlex.quote(o) for o in options)


@contextlib.asynccontextmanager
async def database_down(db: Database) -> AsyncIterator[str]:
    """The database is unreachable inside the block; yields how ("restart" or "simulated")."""
    if db.dialect == "postgresql" and os.environ.get("LIBRARYBOT_PG_CTL"):
        await asyncio.to_thread(_pg_ctl, "stop", "-m", "fast", "-w")
        try:
            yield "restart"
        finally:
            await asyncio.to_thread(_pg_ctl, "start", "-w")
        return
    engine = db.engine.sync_engine
    dbapi = engine.dialect.loaded_dbapi

    def refuse(*_args: Any) -> None:
        raise dbapi.OperationalError("connection refused (simulated outage)")

    event.listen(engine, "do_connect", refuse)
    await db.engine.dispose()  # the connections in the pool die with the server
    try:
        yield "simulated"
    finally:
        event.remove(engine, "do_connect", refuse)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def _health(env: EmbeddedBot) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{env.emulator.url}/healthz") as response:
        return response.status, await response.json()


async def test_the_bot_recovers_from_a_database_outage_without_manual_action(bot_env: EmbeddedBot) -> None:
    env, db = bot_env, bot_env.db
    await add_card(db, "R1001", "5678", "Wang Fang")
    await add_card(db, "R1002", "1111", "Li Lei")
    ann = Chat(env, 1)
    bob = Chat(env, 2)
    assert "card number" in texts(await ann.send("/login"))
    await bob.send("/start")
    status, report = await _health(env)
    assert status == 200 and report["database"] is True

    async with database_down(db) as how:
        # Everyone who writes during the outage gets one clear "try again", and nothing else.
        during_ann = await ann.send("R1001")
        during_bob = await bob.send("/login R1002 1111")
        carol = Chat(env, 3)
        during_carol = await carol.send("/start")
        for answer in (during_ann, during_bob, during_carol):
            assert [m["text"] for m in answer] == [TRY_AGAIN], (how, answer)
        status, report = await _health(env)
        assert status == 503 and report["database"] is False

    # Back without anybody touching the bot: the same people carry on where they were.
    for _ in range(50):
        status, report = await _health(env)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200 and report["database"] is True
    assert "PIN" in texts(await ann.send("R1001"))  # Ann is still at the card-number step
    assert "Your card is linked, Wang Fang" in texts(await ann.send("5678"))
    assert "Your card is linked, Li Lei" in texts(await bob.send("/login R1002 1111"))
    assert "Welcome" in texts(await carol.send("/start"))

    # Nothing half-written: no lock counted for the failed attempts, each person's row exists once.
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(LoginLock).where(LoginLock.failures > 0)) == 0
        linked = {u.telegram_id: u.reader_id for u in await s.scalars(select(User))}
        assert linked[1] is not None and linked[2] is not None and linked[3] is None
    # The outbox dispatcher recovered too.
    async with db.session() as s:
        await enqueue(s, 2, "common.cancelled", kind="test")
    pushed = Chat(env, 2)
    for _ in range(60):
        if any("Cancelled" in (m["text"] or "") for m in pushed.bot_messages()):
            break
        await asyncio.sleep(0.1)
    assert any("Cancelled" in (m["text"] or "") for m in pushed.bot_messages())
    for chat in (ann, bob, carol):
        for m in chat.bot_messages():
            assert ERROR not in (m["text"] or "") and "Traceback" not in (m["text"] or "")
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.kind == "test")) == 1


@contextlib.asynccontextmanager
async def write_lock_held_elsewhere(db: Database) -> AsyncIterator[None]:
    """Another process holds the database's write lock inside the block: SQLite's one writer lock
    (``BEGIN IMMEDIATE``), or on PostgreSQL an EXCLUSIVE lock on the users table (reads go on,
    every write to it waits)."""
    if db.dialect == "sqlite":
        other = sqlite3.connect(db.url.split("///", 1)[1], timeout=30, check_same_thread=False, isolation_level=None)
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(other.execute, "COMMIT")
            other.close()
        return
    import asyncpg

    conn = await asyncpg.connect(db.url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE users IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_a_busy_database_with_concurrent_writers_never_reaches_a_reader(bot_env: EmbeddedBot) -> None:
    """Another process holds the write lock for two seconds while thirty people write (new users,
    language changes) and read: everyone gets their normal answer once the lock is gone, and
    "database is locked" never reaches anybody (SQLite waits up to its busy timeout)."""
    env, db = bot_env, bot_env.db
    for uid in range(200, 215):
        await make_person(db, uid, "visitor")
    existing = [Chat(env, uid) for uid in range(200, 215)]
    for chat in existing:
        await chat.send("/language")
    newcomers = [Chat(env, uid) for uid in range(300, 315)]

    with captured_logs() as records:
        async with write_lock_held_elsewhere(db):
            work = [asyncio.create_task(c.press("English")) for c in existing]
            work += [asyncio.create_task(c.send("/start")) for c in newcomers]
            work += [asyncio.create_task(c.send("/hours")) for c in existing]
            await asyncio.sleep(2)
        answers = await asyncio.gather(*work)
    for answer in answers:
        text = texts(answer)
        assert text and TRY_AGAIN not in text and ERROR not in text, text
    assert not [r for r in records if "locked" in r.getMessage() or r.levelno >= logging.ERROR]
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(User).where(User.telegram_id >= 300)) == 15
        assert await s.scalar(select(func.count()).select_from(User).where(User.language == "en")) == 15
