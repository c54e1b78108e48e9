"""Renewals as a new reader met them (#20), end to end through the emulator: a loan is not renewed
twice within the policy's ``min_days_between_renewals`` (default one day), with its own reason, and
Renew all refreshes the list it was pressed under."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from bot.embedded import EmbeddedBot
from storage import circulation as circ
from storage.catalog import Item
from storage.circulation import Loan
from tests.test_loans_e2e import lend, plain, reader


async def _due(env: EmbeddedBot, barcode: str) -> dt.datetime:
    async with env.db.session() as s:
        due = await s.scalar(select(Loan.due_at).join(Item, Item.id == Loan.item_id).where(Item.barcode == barcode))
        assert due is not None
        return due


async def test_renew_all_refreshes_its_list_and_a_second_renewal_waits_a_day(bot_env: EmbeddedBot) -> None:
    now = bot_env.now()
    ann = await reader(bot_env.db, 801, "A0801", "Ann")
    await lend(bot_env.db, ann, "A-1", "First book", 5, now)
    await lend(bot_env.db, ann, "A-2", "Second book", 6, now)
    person = await bot_env.person(801)
    shown = await person.send("/loans")
    listing = shown[-1]
    assert "Renewed 0 of 2" in listing["plain"]
    await person.press("🔄 Renew all", message=listing)
    summary = [m for m in person.bot_messages() if "Renew all: 2 of 2 renewed" in (m["plain"] or "")]
    assert summary
    refreshed = [m for m in person.bot_messages() if m["message_id"] == listing["message_id"]][0]
    assert refreshed["plain"].count("Renewed 1 of 2") == 2  # the list under the button, not a stale one
    assert "it was already renewed within the last 1 day(s)" in refreshed["plain"]
    assert not [b for row in refreshed["buttons"] for b in row if "Renew" in b["text"]]

    due = await _due(bot_env, "A-1")
    bot_env.move_clock(dt.timedelta(minutes=2))
    again = plain(await person.send("/renew A-1"))
    tomorrow = (now + dt.timedelta(days=1)).astimezone(bot_env.services.tz).strftime("%Y-%m-%d")
    assert "it was already renewed within the last 1 day(s); you can renew it again from " + tomorrow in again
    assert await _due(bot_env, "A-1") == due  # not moved a second period out
    bot_env.move_clock(dt.timedelta(days=1))
    assert "Renewed First book (A-1)" in plain(await person.send("/renew A-1"))
    assert circ.local_date(await _due(bot_env, "A-1")) > circ.local_date(due)


async def test_in_chinese_the_reason_is_its_own(bot_env: EmbeddedBot) -> None:
    now = bot_env.now()
    ming = await reader(bot_env.db, 802, "M0802", "Ming")
    await lend(bot_env.db, ming, "M-1", "书", 5, now)
    person = await bot_env.person(802, language_code="zh")
    await person.send("/language")
    await person.press("中文")
    assert "已续借" in plain(await person.send("/renew M-1"))
    refused = plain(await person.send("/renew M-1"))
    assert "距上次续借不足 1 天" in refused and "起可以再次续借" in refused
