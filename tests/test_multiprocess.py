"""Several bot processes behind one database.

On PostgreSQL two ``librarybot run --webhook`` processes share one stream of updates (the emulator
hands each update to the next process in turn, as a load balancer without affinity would, so one
conversation's steps alternate between them); on SQLite the same stream runs against one process. Every update is processed once — even a copy delivered to both
processes at the same moment — the outbox is sent once, and the scheduled jobs (daily notices, SLA
escalation, acknowledgement reminders: whatever the features register) run once when every process
runs them at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from bot.embedded import STAFF_CHAT_ID, TOKEN
from bot.emulator import Emulator, Person
from bot.runner import start_bot, stop_bot
from bot.settings import Settings
from storage.db import Database
from storage.outbox import Delivery, DeliveryState, enqueue
from storage.policy import Policy
from storage.state import ProcessedUpdate
from tests.auxil.people import add_card, seed_library
from tests.auxil.subprocess_bot import BotProcess, free_port

SECRET = "multi-process-secret-0123456789"
HOURS = "Sample Library"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(token=TOKEN)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


def bot_answers(emulator: Emulator, chat_id: int, needle: str) -> int:
    return sum(1 for m in emulator.chat_messages(chat_id) if m["from_bot"] and needle in (m["text"] or ""))


def raw_hours_update(update_id: int, user_id: int) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": 50_000 + update_id % 10_000, "date": int(time.time()), "text": "/hours",
            "entities": [{"type": "bot_command", "offset": 0, "length": 6}],
            "chat": {"id": user_id, "type": "private", "first_name": "Multi"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Multi", "language_code": "en"},
        },
    }


async def said(person: Person, action: Any, needle: str, timeout: float = 15) -> None:  # noqa: ASYNC109
    """Do ``action`` and wait until the bot shows ``needle`` once more in the chat (a new message or an edit)."""
    def count() -> int:
        return sum(1 for m in person.messages() if m["from_bot"] and needle in (m["text"] or ""))

    before = count()
    await action
    deadline = time.monotonic() + timeout
    while count() <= before:
        assert time.monotonic() < deadline, f"{person.user_id}: no {needle!r}"
        await asyncio.sleep(0.05)


async def one_reader(person: Person, card: tuple[str, str] | None) -> None:
    """One person's part of the stream, in order: a conversation, a button, commands."""
    await said(person, person.send("/start"), "Welcome")
    await said(person, person.send("/hours"), HOURS)
    await said(person, person.send("/language"), "Choose your language")
    await said(person, person.press("English"), "I will speak English")
    if card is not None:
        await said(person, person.send("/login"), "card number")
        await said(person, person.send(card[0]), "PIN")
        await said(person, person.send(card[1]), "Your card is linked")
    await said(person, person.send("/help"), "What I can do")


async def test_one_stream_through_every_process_is_processed_exactly_once(
    db: Database, emulator: Emulator, tmp_path: Path
) -> None:
    processes = 2 if db.dialect == "postgresql" else 1
    bots = [
        BotProcess(db.url, emulator.base_url, tmp_path / f"bot{i}.log", webhook_port=free_port(), webhook_secret=SECRET)
        for i in range(processes)
    ]
    # Each update goes to the next process in turn, as behind a load balancer without affinity: the
    # steps of one conversation alternate between the processes.
    emulator.set_webhook_targets([b.webhook_url for b in bots], secret_token=SECRET, sticky=False)
    cards = {}
    for n in range(6):
        await add_card(db, f"M{n:04d}", f"{n:04d}", f"Multi Reader {n}")
        cards[1000 + n] = (f"M{n:04d}", f"{n:04d}")
    for bot in bots:
        await bot.start()
    async with aiohttp.ClientSession() as http:
        people = [Person(emulator.base_url, uid, f"P{uid}", "en", session=http, quiet=0.15) for uid in range(1000, 1014)]
        try:
            await asyncio.gather(*(one_reader(p, cards.get(p.user_id)) for p in people))

            # Copies of one update reaching every process at the same moment (Telegram retrying
            # while a slow process still works on the first copy): one answer each.
            duplicated = [raw_hours_update(990_000 + k, 1000 + k) for k in range(10)]

            async def post(url: str, update: dict[str, Any]) -> int:
                headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
                async with http.post(url, data=json.dumps(update), headers=headers) as response:
                    return response.status

            statuses = await asyncio.gather(*(post(b.webhook_url, u) for u in duplicated for b in bots for _ in range(2)))
            assert set(statuses) == {200}

            # The outbox, drained by every process's dispatcher: each row sent once.
            async with db.session() as s:
                for p in people:
                    for n in range(2):
                        await enqueue(s, p.user_id, "common.cancelled", kind="multi", dedupe_key=f"multi-{p.user_id}-{n}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with db.session() as s:
                    left = await s.scalar(select(func.count()).select_from(Delivery).where(
                        Delivery.kind == "multi", Delivery.state != DeliveryState.SENT))
                if not left:
                    break
                await asyncio.sleep(0.2)
            assert not left
            await asyncio.sleep(1)  # a second send, if any, would arrive now
        finally:
            for p in people:
                await p.close()
            for bot in bots:
                bot.kill()
    for k in range(10):
        assert bot_answers(emulator, 1000 + k, HOURS) == 2, k  # the stream's /hours and the duplicated one
    for uid in range(1000, 1014):
        assert bot_answers(emulator, uid, "Welcome to the library") == 1
        assert bot_answers(emulator, uid, "Cancelled") == 2
        if uid in cards:
            assert bot_answers(emulator, uid, "Your card is linked") == 1
    async with db.session() as s:
        claimed = await s.scalar(select(func.count()).select_from(ProcessedUpdate).where(ProcessedUpdate.update_id >= 990_000))
        assert claimed == 10
    for bot in bots:
        assert "Traceback" not in bot.log() and " ERROR " not in bot.log(), bot.log()[-3000:]


async def test_scheduled_jobs_and_the_outbox_run_once_when_every_process_runs_them(
    db: Database, emulator: Emulator
) -> None:
    """Two bot applications, each with its own connection pool (as two processes have), run every
    scheduled job at the same moment, twice over; the store's dedupe keys and claims make each
    notice, escalation and reminder exist once, and the two outbox dispatchers send each once."""
    policy = Policy()
    await seed_library(db, policy)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db.url, telegram_api_url=emulator.base_url, staff_chat_id=STAFF_CHAT_ID, language="zh",
    )
    dbs = [Database(db.url), Database(db.url)]
    apps = [await start_bot(settings, d, policy, TOKEN, poll=False) for d in dbs]
    try:
        async with db.session() as s:
            before = await s.scalar(select(func.max(Delivery.id))) or 0
        for app in apps:  # a few days on: reminders, escalations and overdue notices are due
            app.bot_data["services"].clock_offset = dt.timedelta(days=3)
        names = sorted(job.name for job in apps[0].job_queue.jobs())
        for _ in range(2):
            for name in names:
                await asyncio.gather(*(
                    job.run(app) for app in apps for job in app.job_queue.jobs() if job.name == name
                ))
        async with db.session() as s:
            rows = list(await s.scalars(select(Delivery).where(Delivery.id > before)))
        made = collections.Counter(
            (r.chat_id, r.text_key, json.dumps(r.params, sort_keys=True, default=str)) for r in rows
        )
        assert made and max(made.values()) == 1, [k for k, n in made.items() if n > 1]
        # Everything queued (the seed's and the jobs') is delivered once by the two dispatchers.
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            async with db.session() as s:
                left = await s.scalar(select(func.count()).select_from(Delivery).where(
                    Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING])))
            if not left:
                break
            await asyncio.sleep(0.2)
        assert not left, names
        await asyncio.sleep(1)
        async with db.session() as s:
            sent = collections.Counter(
                chat_id for chat_id in await s.scalars(select(Delivery.chat_id).where(
                    Delivery.state == DeliveryState.SENT, Delivery.telegram_message_id.is_not(None)))  # not the demo's history
            )
        for chat_id, count in sent.items():
            delivered = [m for m in emulator.chat_messages(chat_id) if m["from_bot"]]
            assert len(delivered) == count, (chat_id, len(delivered), count)
    finally:
        for app in apps:
            await stop_bot(app)
