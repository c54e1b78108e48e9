"""``/overdue`` end to end: the real bot against the emulator, as staff paging through the overdue
loans (most overdue first, reader, card, days and fine), filtering by branch and days, getting the
CSV; readers and visitors are refused, forged buttons too."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import urllib.request
from decimal import Decimal

from bot.embedded import EmbeddedBot
from storage import circulation as circ
from storage.catalog import Item, Record
from storage.circulation import Loan
from storage.people import Reader, Role, add_staff
from tests.auxil.chat import Chat, texts
from tests.auxil.people import make_person
from tests.circ_helpers import pin_hash

STAFF, READER, VISITOR = 9201, 9202, 9203


async def lend(env: EmbeddedBot, reader_id: int, barcode: str, title: str, days_late: int, location: str) -> None:
    now = env.now()
    async with env.db.session() as s:
        record = Record(control_number=f"ctl-{barcode}", title=title, isbns=[])
        s.add(record)
        await s.flush()
        item = Item(barcode=barcode, record_id=record.id, status="on_loan", location=location)
        s.add(item)
        await s.flush()
        due = circ.end_of_day(circ.local_date(now) - dt.timedelta(days=days_late))
        s.add(Loan(item_id=item.id, reader_id=reader_id, checked_out_at=now - dt.timedelta(days=60), due_at=due, renewals=0))


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (the emulator, on loopback)
        data: bytes = answer.read()
        return data


async def library(env: EmbeddedBot) -> None:
    """Two readers, 14 overdue loans (1–14 days) split between the branches, and 2 not yet due."""
    async with env.db.session() as s:
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        ann = Reader(card_number="C-ANN", name="Ann Lee", pin_hash=pin_hash())
        bob = Reader(card_number="C-BOB", name="王小明", pin_hash=pin_hash())
        s.add_all([ann, bob])
        await s.flush()
        ids = (ann.id, bob.id)
    for n in range(1, 15):
        where = "East Branch 2F" if n % 2 else "Main Library 3F"
        await lend(env, ids[n % 2], f"B{n:03d}", f"Title {n}", n, where)
    await lend(env, ids[0], "B100", "Not due yet", -3, "Main Library 3F")
    await lend(env, ids[1], "B101", "Due today", 0, "Main Library 3F")
    await make_person(env.db, READER, "reader")
    await make_person(env.db, VISITOR, "visitor")


async def test_staff_page_filter_and_export_the_overdue_loans(bot_env: EmbeddedBot) -> None:
    env = bot_env
    await library(env)
    staff = Chat(env, STAFF)

    first = (await staff.send("/overdue"))[-1]
    lines = [line for line in first["plain"].splitlines() if line.startswith("•")]
    assert "Overdue loans · all branches · 1+ days overdue: 14" in first["plain"]
    assert [line.split(" · ")[1] for line in lines] == [f"B{n:03d}" for n in range(14, 4, -1)]  # most overdue first
    assert lines[0].startswith("• 14 d · B014 · Title 14")
    assert "Ann Lee (card C-ANN) · fine ¥" in first["plain"] and "王小明 (card C-BOB)" in first["plain"]
    assert "Not due yet" not in first["plain"] and "Due today" not in first["plain"]
    assert [b["text"] for b in first["buttons"][0]] == ["1/2", "Next ›"]

    second = (await staff.press("Next ›"))[-1]
    assert [line.split(" · ")[1] for line in second["plain"].splitlines() if line.startswith("•")] == ["B004", "B003", "B002", "B001"]
    assert second["message_id"] == first["message_id"]  # the same message, edited

    east = (await staff.send("/overdue east 7"))[-1]["plain"]
    assert "East Branch · 7+ days overdue: 4" in east
    assert [line.split(" · ")[1] for line in east.splitlines() if line.startswith("•")] == ["B013", "B011", "B009", "B007"]
    assert "2 d" not in east

    exported = await staff.send("/overdue 10 csv")
    document = exported[-1]["document"]
    assert document is not None and document["file_name"].endswith("-all-10d.csv")
    assert env.emulator.url is not None
    body = await asyncio.to_thread(download, env.emulator.url + document["url"])
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
    assert [r["barcode"] for r in rows] == ["B014", "B013", "B012", "B011", "B010"]
    assert rows[0]["name"] == "Ann Lee" and rows[0]["days_overdue"] == "14" and rows[0]["card_number"] == "C-ANN"
    assert rows[1]["name"] == "王小明" and Decimal(rows[1]["fine"]) > Decimal(rows[4]["fine"]) > 0

    # The CSV button of a page gives the same list as a file.
    await staff.send("/overdue main")
    from_button = await staff.press("📄 CSV")
    assert from_button[-1]["document"]["file_name"].endswith("-main-1d.csv")

    assert "between 1 and" in texts(await staff.send("/overdue 0"))
    assert "I don't know that branch. Branches: main, east" in texts(await staff.send("/overdue north"))
    assert "No loans are overdue 30 days or more" in texts(await staff.send("/overdue 30"))


async def test_readers_and_visitors_are_refused_even_with_forged_buttons(bot_env: EmbeddedBot) -> None:
    env = bot_env
    await library(env)
    staff = Chat(env, STAFF)
    page = (await staff.send("/overdue"))[-1]
    for uid in (READER, VISITOR):
        person = Chat(env, uid)
        refused = await person.send("/overdue")
        assert "only for library staff" in texts(refused) and "C-ANN" not in texts(refused)
        await person.send("/start")
        await person.press_data(page["message_id"], "ovd:p:-:1:1")
        await person.press_data(page["message_id"], "ovd:csv:-:1")
        assert all("only for library staff" in a["text"] for a in person.callback_answers()[-2:])
        assert not [m for m in person.bot_messages() if m["document"] or "C-ANN" in (m["text"] or "")]
    # Forged filters from staff are refused as stale, not run.
    await staff.press_data(page["message_id"], "ovd:p:nowhere:1:0")
    assert "no longer valid" in staff.callback_answers()[-1]["text"]
