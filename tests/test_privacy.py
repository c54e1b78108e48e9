"""Privacy: what reaches the logs, and what /forgetme leaves behind.

Logs: the bot in webhook mode, with logging set up exactly as ``librarybot run`` does it
(``bot.logs.configure_logging`` with the token and the webhook secret), goes through every
conversation at DEBUG and at INFO, and the log output is scanned for the PINs, the bot token, the
webhook secret and the texts the readers typed: none may appear in any record, at any level. A shorter run of the real ``librarybot run`` process at DEBUG
checks the same on everything the process writes.

/forgetme: a person uses every conversation, then erases themselves; afterwards no row of any table
(every table of ``Base.metadata``) mentions their Telegram id or first name. The exception, by
choice: the library's own records of the card — the reader record, its loans and holds — which are
the library's circulation data, not data of the chat (the card is only unlinked). They hold no
Telegram id anyway.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from telegram.ext import Application

from bot.embedded import TOKEN, EmbeddedBot
from bot.emulator import Emulator, Person
from bot.logs import FORMAT, configure_logging
from bot.runner import _serve_webhook, start_bot, stop_bot
from bot.settings import Settings
from storage.db import Base, Database
from storage.policy import Policy
from tests.auxil.chat import Chat, conversation_entry_commands, relax_flood_control, walk
from tests.auxil.people import add_card, seed_library
from tests.auxil.subprocess_bot import BotProcess, free_port

SECRET = "Webhook-Secret-For-Privacy-Test-42"
PIN_A, PIN_B, PIN_WRONG = "918273", "564738", "102938"
LIBRARY_RECORDS = {"readers", "loans", "holds"}  # the library's circulation records: kept, see above
RECORD = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def records(log: str) -> list[tuple[str, str]]:
    """(level, text) of every log record (a traceback belongs to the record above it)."""
    found: list[tuple[str, str]] = []
    for line in log.splitlines():
        match = RECORD.match(line)
        if match:
            found.append((match.group(1), line))
        elif found:
            found[-1] = (found[-1][0], found[-1][1] + "\n" + line)
        else:
            found.append(("OTHER", line))
    return found


def assert_clean(log: str, said: list[str]) -> None:
    """No PIN, secret or typed text at any level (DEBUG included, #13); the token nowhere."""
    secrets = {"a PIN": [PIN_A, PIN_B, PIN_WRONG], "the webhook secret": [SECRET], "a reader's text": said}
    for level, text in records(log):
        assert TOKEN not in text and TOKEN.split(":")[1] not in text, f"the token is in a {level} record"
        for what, values in secrets.items():
            for value in values:
                assert not re.search(rf"(?<!\d){re.escape(value)}(?!\d)", text), f"{what} in a {level} record: {text[:300]}"


@contextlib.contextmanager
def logging_as_librarybot_run(level: str) -> Iterator[io.StringIO]:
    """Root logging configured by ``configure_logging`` (as ``librarybot run`` does), into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    configure_logging(level, [TOKEN, SECRET])  # adds the redacting filter to every root handler
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@dataclass
class WebhookBot:
    """What ``tests.auxil.chat.Chat`` needs: the emulator and the running application."""

    emulator: Emulator
    app: Application  # type: ignore[type-arg]


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(token=TOKEN)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_logs_never_show_pins_token_secret_or_what_readers_wrote(db: Database, emulator: Emulator, level: str) -> None:
    await add_card(db, "P1001", PIN_A, "Ann Reader")
    await add_card(db, "P1002", PIN_B, "Bob Reader")
    port = free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db.url, telegram_api_url=emulator.base_url,
        webhook_url=f"http://127.0.0.1:{port}/webhook", webhook_secret=SECRET, listen=f"127.0.0.1:{port}",
    )
    said: list[str] = []
    with logging_as_librarybot_run(level) as buffer:
        app = await start_bot(settings, db, Policy(), TOKEN, poll=False)
        runner = await _serve_webhook(app, settings)  # registers the webhook with its secret
        env: Any = WebhookBot(emulator, app)
        relax_flood_control(env)
        try:
            ann, bob = Chat(env, 41, first_name="Ann"), Chat(env, 42, first_name="Bob", language_code="zh")
            await ann.send("/start")
            await ann.send(f"/login P1001 {PIN_WRONG}")
            await ann.send("/login")
            await ann.send("P1001")
            await ann.send(PIN_A)
            await bob.send(f"/login P1002 {PIN_B}")
            for who, chat in (("A", ann), ("B", bob)):
                for n, command in enumerate(conversation_entry_commands(env)):
                    if command != "login":
                        await walk(chat, command, lambda step, n=n, who=who: said.append(
                            f"Privateword{who}{n:02d}{step} 私密留言{n:02d}{step}") or said[-1])
                said.append(f"Searchword{who} 私密检索{who}")
                await chat.send(said[-1])  # a plain message: a catalog search
        finally:
            await runner.cleanup()
            await stop_bot(app)
        log = buffer.getvalue()
    assert "setWebhook" in log or level == "INFO"
    assert len(said) > 10
    assert_clean(log, said)


async def test_the_real_process_never_logs_the_token_or_secrets(db: Database, emulator: Emulator, tmp_path: Path) -> None:
    """``librarybot run --webhook`` at DEBUG: a login and a message; the whole output is scanned."""
    await add_card(db, "P1001", PIN_A, "Ann Reader")
    bot = BotProcess(db.url, emulator.base_url, tmp_path / "bot.log", webhook_port=free_port(),
                     webhook_secret=SECRET, log_level="DEBUG")
    emulator.set_webhook_targets([bot.webhook_url], secret_token=SECRET)
    await bot.start()
    said = ["Privatewordprocess 私密留言"]
    ann = Person(emulator.base_url, 41, "Ann", "en", quiet=0.15)
    try:
        await ann.send("/login")
        await ann.send("P1001")
        await ann.send(PIN_A)
        await ann.send(f"/login P1001 {PIN_WRONG}")
        await ann.send(said[0], expect=False)
    finally:
        await ann.close()
        assert await bot.terminate() == 0
    log = bot.log()
    assert "setWebhook" in log and "getMe" in log  # DEBUG really was on
    assert_clean(log, said)


async def test_forgetme_leaves_nothing_of_the_person_in_any_table(bot_env: EmbeddedBot) -> None:
    await seed_library(bot_env.db, bot_env.policy)  # a library with staff, other readers, tickets, requests
    relax_flood_control(bot_env)
    uid, name = 777_000_123, "Zebulonia"
    me = Chat(bot_env, uid, first_name=name, language_code="en")
    await me.send("/start")
    await me.send("/login D0001 1234")  # a demo card: loans, holds
    await me.send("/language")
    await me.press("English")
    for n, command in enumerate(conversation_entry_commands(bot_env)):
        if command != "login":
            await walk(me, command, lambda step, n=n: f"{name} writes {n}.{step}: the heating is broken")
    for command in ("settings", "loans", "holds", "requests", "tickets", "privacy"):
        await me.send(f"/{command}")
    await me.send(f"{name} searches for something")
    await me.send("/forgetme")
    assert "erased" in "\n".join(m["text"] for m in await me.press("forget:yes"))

    mentions = []
    async with bot_env.db.session() as s:
        for table in Base.metadata.sorted_tables:
            if table.name in LIBRARY_RECORDS:
                continue
            for row in (await s.execute(select(table))).mappings():
                for column, value in row.items():
                    rendered = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else value
                    if value == uid or isinstance(rendered, str) and (name in rendered or str(uid) in rendered):
                        mentions.append((table.name, column, str(value)[:400]))
    assert not mentions, mentions


async def test_forgetme_in_the_middle_of_a_conversation_ends_it(bot_env: EmbeddedBot) -> None:
    """Whatever conversation a person is in when they erase themselves, it is over: what they type
    next is not taken as its next step, and nothing of it is stored again."""
    from storage.state import PersistedState

    await seed_library(bot_env.db, bot_env.policy)
    relax_flood_control(bot_env)
    for n, command in enumerate(conversation_entry_commands(bot_env)):
        uid = 880_000 + n
        me = Chat(bot_env, uid, language_code="en")
        await me.send("/start")
        await me.send(f"/{command}")
        first = next(iter(me.buttons()), None)
        if first is not None:
            await me.press_data(first[0], first[2])
        await me.send("/forgetme")
        await me.press("forget:yes")
        await me.send("Something typed after forgetting")
        async with bot_env.db.session() as s:
            rows = [r.key for r in await s.scalars(select(PersistedState).where(PersistedState.kind.like("conversation:%")))
                    if str(uid) in r.key]  # (the new message may be a search, whose query is kept: that is new)
        assert not rows, (command, rows)
