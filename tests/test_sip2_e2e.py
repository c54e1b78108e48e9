"""The library's own system behind the chat (LIBRARYBOT_ILS=sip2), end to end: the real bot over
HTTP through the emulator, a SIP2 server on loopback answering as the recorded Evergreen one did.
Readers log in, list loans, renew one and all, place and cancel a hold, get the daily digest from
the system's loans; wrong PINs, refusals, a slow and a dead server are answered as they should be,
and the staff chat hears once that the link went down and once that it came back."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from bot.emulator import Person
from storage.catalog import Item, Record
from storage.db import Database
from storage.ils_sip2 import PLACEHOLDER_PIN_HASH, Sip2Circulation
from storage.outbox import Delivery
from storage.people import Reader, User
from storage.sip2 import client as sip2_client
from storage.sip2.replay import ReplayServer
from tests.test_ils_sip2 import on_loan_recordings

DJ, MIKE, LIN, STAFF = 601, 602, 603, 9001
PERL = "1565921879"
# Days the recorded loan (due 2026-12-10) gets a digest: 3 days ahead, then 1, 7 and 14 days overdue.
DIGEST_DAYS = (dt.date(2026, 12, 7), dt.date(2026, 12, 11), dt.date(2026, 12, 17), dt.date(2026, 12, 24))
NOT_ANSWERING = "The library system is not answering, please try again in a few minutes."


def plain(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["plain"] or "" for m in messages if m["from_bot"])


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["plain"] or "")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ReplayServer]:
    srv = ReplayServer(on_loan_recordings(tmp_path))
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def env(db: Database, server: ReplayServer) -> AsyncIterator[EmbeddedBot]:
    """The bot with LIBRARYBOT_ILS=sip2 pointing at the replay server (settings by field name)."""
    bot = await EmbeddedBot.start(
        db, ils="sip2", sip2_host="127.0.0.1", sip2_port=server.port, sip2_user="scclient",
        sip2_password="clientpwd", sip2_institution="UWOLS", sip2_location="lib", sip2_timeout=0.5,
        sip2_heartbeat_seconds=0, sip2_rate=200,
    )
    circulation = bot.services.circulation
    assert isinstance(circulation, Sip2Circulation)
    circulation.probe_every = 0.1
    try:
        yield bot
    finally:
        await circulation.close()
        await bot.stop()


async def following(bot: EmbeddedBot, user_id: int, **kwargs: Any) -> Person:
    person = await bot.person(user_id, **kwargs)
    await person.__aenter__()
    return person


async def test_a_reader_logs_in_lists_and_renews(env: EmbeddedBot, server: ReplayServer) -> None:
    dj = await env.person(DJ)
    assert "do not match" in plain(await dj.send("/login djfiander 1111"))  # CQ N
    assert "do not match" in plain(await dj.send("/login nobody 0000"))  # BL N
    assert "Your card is linked, David J. Fiander." in plain(await dj.send("/login djfiander 6789"))
    async with env.db.session() as s:
        user = await s.get(User, DJ)
        reader = await s.scalar(select(Reader).where(Reader.card_number == "djfiander"))
        assert user is not None and reader is not None and user.reader_id == reader.id
        assert reader.pin_hash == PLACEHOLDER_PIN_HASH

    shown = await dj.send("/loans")
    text = plain(shown)
    assert "Your loans (1)" in text  # the server lists the loan twice: shown once
    assert "Perl 5 desktop reference" in text and f"Barcode {PERL} · due 2026-12-10" in text
    assert [b["text"] for row in shown[-1]["buttons"] for b in row] == ["🔄 Renew 1", "🔄 Renew all"]

    renewed = plain(await dj.press("🔄 Renew 1"))
    assert f"Renewed Perl 5 desktop reference ({PERL}). New due date: 2026-12-10." in renewed
    again = plain(await dj.press("🔄 Renew 1", message=shown[-1]))  # the same button, pressed twice
    assert "it was already renewed just now (due 2026-12-10)" in again
    old_list = plain(await dj.press("🔄 Renew all", message=shown[-1]))  # Renew all on the list from before
    assert "Renew all: 0 of 1 renewed" in old_list and "already renewed just now" in old_list
    assert server.count("29") == 1 and server.count("65") == 0

    env.move_clock(dt.timedelta(seconds=2))  # a list shown later than that renewal
    fresh = await dj.send("/loans")
    assert "Renewed 1 of ?" in plain(fresh)  # the renewals made here; the system's limit is its own
    everything = plain(await dj.press("🔄 Renew all", message=fresh[-1]))
    assert "Renew all: 1 of 1 renewed" in everything and f"Perl 5 desktop reference ({PERL}): due 2026-12-10" in everything
    assert server.count("65") == 1

    refused = plain(await dj.send("/renew 0440242746"))
    assert "Could not renew 0440242746: this item is not on loan to you" in refused
    assert "The library system says: Item not checked out to David J. Fiander" in refused

    # The daily digest asks the system for the loans (the bot's clock only moves forward).
    today = env.now().astimezone(env.settings.tz).date()
    days = [day for day in DIGEST_DAYS if day >= today]
    if days:
        env.move_clock(days[0] - today)
        watcher = await following(env, DJ)
        await env.run_jobs()
        digest = plain(await watcher.wait_for(containing("Library reminders")))
        assert f"Perl 5 desktop reference ({PERL})" in digest


async def test_a_hold_is_placed_and_cancelled_in_the_system(env: EmbeddedBot, server: ReplayServer) -> None:
    async with env.db.session() as s:  # the title as the local catalogue knows it
        record = Record(control_number="ctl-perl", title="Perl 5 desktop reference", isbns=[])
        s.add(record)
        await s.flush()
        s.add(Item(barcode=PERL, record_id=record.id, location="3F"))
    mike = await env.person(MIKE)
    assert "Mike Rylander" in plain(await mike.send("/login miker 6789"))

    start = await mike.send("/holds")
    asked = await mike.press_data(start[-1]["message_id"], f"hold:place:{record.id}")  # as on a search result
    assert "Where would you like to collect it?" in plain(asked)
    placed = plain(await mike.press("East Branch"))
    assert "Hold placed on Perl 5 desktop reference. You are number 1 in the queue" in placed
    sent = [r for r in server.received if r.startswith("15+")]
    assert len(sent) == 1 and "|AAmiker|" in sent[0] and f"|AB{PERL}|" in sent[0]

    holds = await mike.send("/holds")
    assert "Your holds (1)" in plain(holds) and "HASH(0x" in plain(holds)  # the recorded server's words
    await mike.press("✖️ Cancel 1", message=holds[-1])
    assert mike.last_callback_answer is not None and "Hold cancelled" in mike.last_callback_answer["text"]
    assert [r for r in server.received if r.startswith("15")][-1].startswith("15-")
    await mike.press_data(holds[-1]["message_id"], "hold:cancel:1565921879", expect=False)  # forged: not listed
    assert mike.last_callback_answer is not None and "not yours or no longer active" in mike.last_callback_answer["text"]
    assert sum(r.startswith("15-") for r in server.received) == 1

    server.respond_next_with("160N20261126    052910AAmiker|AB1565921879|AJPerl 5 desktop reference|AOUWOLS|"
                             "AFYou already have a hold on this title|")
    again = await mike.press_data(start[-1]["message_id"], f"hold:at:{record.id}:east")
    refused = plain(again)
    assert "Could not place a hold on Perl 5 desktop reference" in refused
    assert "The library system says: You already have a hold on this title" in refused


async def test_a_slow_then_dead_system(
    env: EmbeddedBot, server: ReplayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The renewal itself must be the slow request (not the 99 that checks an idle connection first).
    monkeypatch.setattr(sip2_client, "PROBE_AFTER_IDLE_SECONDS", 60.0)
    group = await following(env, STAFF, chat_id=STAFF_CHAT_ID)
    dj = await env.person(DJ)
    lin = await env.person(LIN, language_code="zh-hans")
    assert "David J. Fiander" in plain(await dj.send("/login djfiander 6789"))
    shown = await dj.send("/loans")

    # Slow: the renewal is asked once, the reader is told in time, and the same button never asks again.
    server.latency = 2.0
    await dj.press("🔄 Renew 1", message=shown[-1], expect=False)
    for _ in range(600):  # the answer comes after the 0.5 s timeout, later than the quiet period
        if dj.last_callback_answer is not None:
            break
        await asyncio.sleep(0.05)
    # "Not answering" (not the renewal the server confirms 2 s later): the bot gave up at its timeout.
    assert dj.last_callback_answer is not None and NOT_ANSWERING in dj.last_callback_answer["text"]
    server.latency = 0.0
    again = plain(await dj.press("🔄 Renew 1", message=shown[-1]))
    assert "already renewed just now" in again
    assert server.count("29") == 1

    down = plain(await group.wait_for(containing("127.0.0.1")))
    assert "SIP2" in down and "图书馆系统没有响应" in down  # the staff chat, in the library's language
    await until_alerts(env, ["sip2.link_down", "sip2.link_up"])  # the probe finds it answering again

    # Dead: every reader is told, in their language, within the timeout; the staff chat hears it once.
    await server.stop()
    assert NOT_ANSWERING in plain(await dj.send("/loans"))
    assert NOT_ANSWERING in plain(await dj.send("/renew all"))
    assert "图书馆系统暂时没有响应" in plain(await lin.send("/login miker 6789"))
    async with env.db.session() as s:
        assert await s.scalar(select(User.reader_id).where(User.telegram_id == LIN)) is None  # not linked
    await until_alerts(env, ["sip2.link_down", "sip2.link_up", "sip2.link_down"])  # once per outage

    revived = ReplayServer(on_loan_recordings(tmp_path), port=server.port)
    await revived.start()
    try:
        assert "Your loans (1)" in plain(await dj.send("/loans"))
        await until_alerts(env, ["sip2.link_down", "sip2.link_up", "sip2.link_down", "sip2.link_up"])
        await asyncio.sleep(0.3)
        await until_alerts(env, ["sip2.link_down", "sip2.link_up", "sip2.link_down", "sip2.link_up"])
    finally:
        await revived.stop()


async def until_alerts(bot: EmbeddedBot, expected: list[str]) -> None:
    """Wait until the staff chat's queued SIP2 alerts are ``expected`` (the outbox spaces messages to
    a group a few seconds apart, as Telegram requires, so the rows are checked rather than the chat)."""
    found: list[str] = []
    for _ in range(100):
        async with bot.db.session() as s:
            found = list(await s.scalars(
                select(Delivery.text_key)
                .where(Delivery.chat_id == STAFF_CHAT_ID, Delivery.text_key.like("sip2.%"))
                .order_by(Delivery.id)
            ))
        if found == expected:
            return
        await asyncio.sleep(0.05)
    assert found == expected


async def test_fines_from_the_system_are_shown_with_the_loans(env: EmbeddedBot, server: ReplayServer) -> None:
    """(#15) The fee on a loan (BV of its 18) beside it, even when it is not overdue, and the
    account's fee amount (BV, BH) below the list, as the local store shows fines."""
    dj = await env.person(DJ)
    assert "David J. Fiander" in plain(await dj.send("/login djfiander 6789"))
    stamp = "20261126    052910"
    server.respond_next_with(f"64              001{stamp}000000000001000000000000AOUWOLS|AAdjfiander|"
                             f"AEDavid J. Fiander|AU{PERL}|BHCNY|BV3.5|BLY|")
    server.respond_next_with(f"180402{'01'}{stamp}AB{PERL}|AJPerl 5 desktop reference|AH20991231    235900|"
                             "BV1.20|BHCNY|")
    text = plain(await dj.send("/loans"))
    assert f"Barcode {PERL} · due 2099-12-31 · fee ¥1.20" in text
    assert "You owe the library CNY 3.50 in fines and fees" in text
