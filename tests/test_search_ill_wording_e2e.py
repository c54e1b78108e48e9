"""Search and interlibrary loan as a new reader met them (#20), end to end through the emulator on
the demo catalog: when no title has all the words asked for, the bot says so and offers the ILL
button above the closest titles; the ILL form's "we already hold it" check folds simplified and
traditional Chinese as the search does; the staff's ILL toast says "updated", not "done"."""

from __future__ import annotations

from typing import Any

from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from storage.db import Database
from storage.people import Reader, Role, User, add_staff
from tests.auxil.chat import relax_flood_control
from tests.test_ill_e2e import arrived, quick_loan, tap
from tests.test_search_e2e import catalog

READER, STAFF = 7401, 9001


def labels(message: dict[str, Any]) -> list[list[str]]:
    return [[b["text"] for b in row] for row in message["buttons"]]


async def test_no_title_with_every_word_says_so_and_offers_ill_first(bot_env: EmbeddedBot, db: Database) -> None:
    await catalog(db)
    relax_flood_control(bot_env)
    async with await bot_env.person(READER, language_code="en") as ann:
        [found] = await ann.send("Deep learning Goodfellow")
        assert "No title in the catalogue has all the words of Deep learning Goodfellow" in found["plain"]
        assert labels(found)[0] == ["Request by interlibrary loan"]
        assert "results 1–" in found["plain"]  # the closest titles are still shown, below
        [history] = await ann.send("history of China")
        assert "No title in the catalogue has all the words" not in history["plain"]
        assert "Request by interlibrary loan" not in [b for row in labels(history) for b in row]
        # the ILL button starts the form with the query as the title
        await ann.send("/language")
        await ann.press("中文")
        [zh] = await ann.send("Deep learning Goodfellow")
        assert "馆藏中没有同时包含 Deep learning Goodfellow 全部检索词的书" in zh["plain"]
        assert labels(zh)[0] == ["申请馆际互借"]


async def test_the_ill_holding_check_folds_traditional_and_simplified(bot_env: EmbeddedBot, db: Database) -> None:
    await catalog(db)
    async with db.session() as s:
        s.add(Reader(id=1, card_number="C7401", name="Wang Fang", pin_hash="x"))
        await s.flush()
        s.add(User(telegram_id=READER, first_name="Fang", telegram_language="en", reader_id=1))
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        s.add(User(telegram_id=STAFF, first_name="Li Na", telegram_language="zh"))
    relax_flood_control(bot_env)
    fang = await bot_env.person(READER)
    await fang.__aenter__()
    fang.quiet = 0.2
    await fang.send("/ill")
    await tap(fang, "📖 Loan of a book")
    await fang.send("台湾大地震")  # the record is 台灣大地震
    await tap(fang, "Skip ›")  # author
    shown = "\n".join(m["text"] or "" for m in await tap(fang, "Skip ›"))  # identifier: then the check
    assert "already has this title" in shown and "台灣大地震" in shown
    await fang.send("/cancel")

    # A request the library really lacks, moved by a Chinese-speaking staff member: the toast says 已更新.
    assert "ILL-000001" in await quick_loan(fang, "A book nobody has")
    group = await bot_env.person(STAFF, chat_id=STAFF_CHAT_ID, language_code="zh")
    await group.__aenter__()
    alert = await arrived(group, lambda m: "ILL-000001" in (m["text"] or ""))
    await group.press_data(alert["message_id"], "illmv:1:submitted:in_review", expect=False)
    toast = (group.last_callback_answer or {}).get("text", "")
    assert toast.startswith("已更新：当前状态为") and "已完成" not in toast, toast
