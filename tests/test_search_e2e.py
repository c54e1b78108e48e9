"""Catalog search end to end: the real bot over HTTP through the emulator, on the demo catalog, as
a visitor and a reader would search — in Chinese, English and pinyin, with typos and ISBNs, paging,
opening a record, placing a hold, asking for an interlibrary loan when nothing is found — and as
someone pressing forged buttons."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot.embedded import EmbeddedBot
from storage.catalog import Item, Record
from storage.catalog_import import import_demo_catalog, seed_demo_items
from storage.db import Database
from tests.auxil.chat import relax_flood_control
from tests.auxil.people import make_person

DEMO = Path(__file__).resolve().parents[1] / "bot" / "demo_data"
VISITOR, READER, LIN = 7301, 7302, 7303


def bot_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["plain"] or "" for m in messages if m["from_bot"])


def buttons(message: dict[str, Any]) -> dict[str, str]:
    return {b["text"]: b.get("callback_data", "") for row in message["buttons"] for b in row}


async def catalog(db: Database) -> None:
    report = await import_demo_catalog(db, DEMO)
    assert report.skipped == 0
    async with db.session() as s:
        await seed_demo_items(s, random.Random(11))


async def test_reader_queries_through_the_bot(bot_env: EmbeddedBot, db: Database) -> None:
    await catalog(db)
    relax_flood_control(bot_env)  # one person asks thirty questions in a few seconds here
    async with await bot_env.person(VISITOR, language_code="en") as visitor:
        [found] = await visitor.send("/search 明代政治制度")
        first = found["plain"].split("\n\n")[1]
        assert first.startswith("1. 明代政治制度") and "Ming dai zheng zhi zhi du" in first
        assert "張治安 · 1999" in first
        assert "on shelf" in first and "call number DS753 .Z444 1999" in first
        assert "📖 1" in buttons(found)

        expectations = {
            "国际公司理财": "國際公司理財",  # plain text, simplified for a traditional record
            "/search mingdaizhengzhizhidu": "明代政治制度",
            "/search ming dai zheng zhi": "明代政治制度",
            "/search Zhang Zhian": "明代政治制度",
            "/search histroy of chna": "The history of China",
            "/search 9571117846": "明代政治制度",
            "/search 978-957-11-1784-3": "明代政治制度",
            "Dvorak": "Antonín Dvořák",
        }
        for query, title in expectations.items():
            answer = bot_text(await visitor.send(query))
            top_five = answer.split("\n\n")[1:6]
            assert any(title in hit for hit in top_five), (query, answer[:400])

        # Paging: Next edits the list in place, Prev comes back.
        [listing] = await visitor.send("/search history")
        assert "results 1–5 of" in listing["plain"]
        [second] = await visitor.press("Next ›", message=listing)
        assert second["message_id"] == listing["message_id"] and "results 6–10 of" in second["plain"]
        [back] = await visitor.press("‹ Prev", message=second)
        assert "results 1–5 of" in back["plain"]
        await visitor.send("/search china")  # a newer search: the older list still pages its own
        [again] = await visitor.press("Next ›", message=listing)
        assert again["plain"].startswith("🔎 history: results 6–10")

        # Details: the full record and every copy.
        [found] = await visitor.send("/search 9571117846")
        [details] = await visitor.press("📖 1", message=found)
        text = details["plain"]
        assert text.startswith("明代政治制度\nMing dai zheng zhi zhi du")
        for fragment in (
            "Author: 張治安 (Zhang, Zhi'an)",
            "Edition: 初版 (Chu ban)",
            "Published: 台北市",
            "ISBN: 957-11-1784-6",
            "Call number: DS753 .Z444 1999",
            "Subjects: China -- History",
            "Copies: ",
            "• T",
        ):
            assert fragment in text, fragment
        assert not any(data.startswith("hold:") for data in buttons(details).values())  # a visitor: no hold

        # Nothing found: an ILL request, prefilled with the query.
        [nothing] = await visitor.send("/search zzqxj vvqk")
        assert "Nothing in the catalog matches" in nothing["plain"]
        assert buttons(nothing) == {"Request by interlibrary loan": "ill:new"}
        assert bot_env.app.user_data[VISITOR]["ill_prefill"] == "zzqxj vvqk"

        # Forged buttons get a clear answer, and nothing breaks.
        await visitor.press_data(found["message_id"], "search:rec:999999999", expect=False)
        assert "does not exist" in (visitor.last_callback_answer or {}).get("text", "")
        await visitor.press_data(found["message_id"], "search:rec:abc", expect=False)
        assert "does not exist" in (visitor.last_callback_answer or {}).get("text", "")
        for query in (
            "/search '; DROP TABLE records; --",
            '/search "*NEAR',
            "/search 😀",
            "!!!",
            "/search " + "x" * 2000,
        ):
            assert await visitor.send(query)  # answered, one way or another
        for nothing_to_look_for in ("/search", "/search ?!", "😀"):
            [usage] = await visitor.send(nothing_to_look_for)
            assert "What are you looking for?" in usage["plain"]
        assert "明代政治制度" in bot_text(await visitor.send("明代政治制度"))  # the catalog is still there


async def test_a_reader_can_hold_a_title_with_no_copy_on_the_shelf(
    bot_env: EmbeddedBot, db: Database
) -> None:
    await catalog(db)
    await make_person(db, READER, "reader")
    async with db.session() as s:
        ming = await s.scalar(select(Record).where(Record.control_number == "00049916"))
        assert ming is not None
        for item in (await s.execute(select(Item).where(Item.record_id == ming.id))).scalars():
            item.status = "on_loan"
        record_id = ming.id
    async with await bot_env.person(READER, language_code="en") as reader:
        [found] = await reader.send("/search 明代政治制度")
        assert "None of" in found["plain"] and "on shelf" in found["plain"]
        assert buttons(found).get("Hold 1") == f"hold:place:{record_id}"
        [details] = await reader.press("📖 1", message=found)
        assert buttons(details).get("Place a hold") == f"hold:place:{record_id}"
        assert "on loan" in details["plain"]
    async with await bot_env.person(VISITOR, language_code="en") as visitor:
        [found] = await visitor.send("/search 明代政治制度")
        assert "Hold 1" not in buttons(found)


async def test_in_chinese(bot_env: EmbeddedBot, db: Database) -> None:
    await catalog(db)
    async with await bot_env.person(LIN, language_code="zh-hans") as lin:
        [found] = await lin.send("/search 國際公司理財")
        assert "：共 1 条" in found["plain"] and "第 1–1 条" not in found["plain"]  # #20
        assert "1 册，在架" in found["plain"] and "索书号" in found["plain"]
        [details] = await lin.press("📖 1", message=found)
        assert "馆藏复本" in details["plain"] and "丛书：國際工程管理系列叢書" in details["plain"]


async def test_copies_as_the_library_system_sees_them(bot_env: EmbeddedBot, db: Database) -> None:
    """With SIP2, the copies' status comes from the library's own system, live."""
    from storage.ils import Availability as Live
    from storage.ils import CirculationUnavailable, CopyView

    await catalog(db)

    class LibrarySystem:
        down = False

        async def availability(self, record_ids: list[int]) -> dict[int, Live]:
            if self.down:
                raise CirculationUnavailable("no answer")
            copies = (
                CopyView("X1", "2F Reading Room", "K249.2/Z1", "available"),
                CopyView("X2", "2F Reading Room", "K249.2/Z1", "on_order"),
            )
            return {i: Live(i, 2, 1, 0, copies) for i in record_ids}

    svc = bot_env.services
    saved = (svc.circulation, svc.settings)
    system = LibrarySystem()
    svc.circulation, svc.settings = system, svc.settings.model_copy(update={"ils": "sip2"})
    try:
        async with await bot_env.person(LIN + 1, language_code="en") as reader:
            [found] = await reader.send("/search 9571117846")
            assert "1 of 2 on shelf, 2F Reading Room, call number K249.2/Z1" in found["plain"]
            [details] = await reader.press("📖 1", message=found)
            assert "• X2 — 2F Reading Room — K249.2/Z1 — on order" in details["plain"]
            system.down = True  # the system does not answer: the catalogue's own copies are shown
            [found] = await reader.send("/search 9571117846")
            assert "call number DS753 .Z444 1999" in found["plain"]
    finally:
        svc.circulation, svc.settings = saved
