"""The reference desk end to end: the real bot over HTTP through the emulator — readers asking in
Chinese and English, answers from the answer base, the queue, two librarians pressing Take at once,
the conversation relayed both ways (text, photo, document, a catalog record), notes, saved replies,
hand-over, /end, the transcript, rating, READ effort, saving the answer, a restart in the middle, the
waiting notice, and the figures in /stats."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.embedded import EmbeddedBot
from bot.emulator import Person
from storage.catalog_import import import_demo_catalog
from storage.db import Database
from storage.outbox import Delivery
from storage.people import Reader, Role, User, add_staff
from storage.policy import DeskHours, Policy
from storage.reference import SAMPLE_FAQ, DeskConversation, DeskMessage, FaqEntry, import_faq, reference_stats
from tests.auxil.chat import relax_flood_control

READER, ZH_READER, STAFF, STAFF2 = 301, 302, 9001, 9003
DEMO = Path(__file__).resolve().parents[1] / "bot" / "demo_data"


def always_open() -> Policy:
    policy = Policy()
    policy.service.reference_hours = [DeskHours(weekdays=[1, 2, 3, 4, 5, 6, 7], opens="00:00", closes="24:00")]
    return policy


@pytest.fixture
async def desk(db: Database) -> AsyncIterator[EmbeddedBot]:
    """The bot with the desk open around the clock, the sample answer base, two librarians and two readers."""
    env = await EmbeddedBot.start(db, policy=always_open())
    async with env.db.session() as s:
        await import_faq(s, SAMPLE_FAQ, env.now())
        s.add(Reader(id=1, card_number="C0301", name="Wang Fang", pin_hash="x"))
        await s.flush()
        s.add(User(telegram_id=READER, first_name="Fang", telegram_language="en", reader_id=1))
        s.add(User(telegram_id=ZH_READER, first_name="明", telegram_language="zh-hans"))
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, STAFF2, Role.STAFF, "Chen Jie")
    try:
        yield env
    finally:
        await env.stop()


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join((m["text"] or m["caption"] or "") for m in messages if m["from_bot"])


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or m["caption"] or "")


async def latest(person: Person, fragment: str) -> dict[str, Any]:
    """The newest bot message containing ``fragment``: already there (a push may arrive while the
    person's own last action was answered), or the next one to come."""
    found = [m for m in person.bot_messages() if fragment in (m["text"] or m["caption"] or "")]
    return found[-1] if found else (await person.wait_for(containing(fragment)))[-1]


async def watch(env: EmbeddedBot, user_id: int, language_code: str = "en") -> Person:
    person = await env.person(user_id, language_code=language_code)
    await person.__aenter__()
    return person


async def conversation(env: EmbeddedBot, number: int) -> DeskConversation:
    async with env.db.session() as s:
        found = await s.get(DeskConversation, number)
        assert found is not None
        return found


async def count(env: EmbeddedBot, model: Any, *where: Any) -> int:
    async with env.db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_answer_base_in_both_languages_then_a_librarian_to_the_end(desk: EmbeddedBot) -> None:
    relax_flood_control(desk)
    li, chen = await watch(desk, STAFF), await watch(desk, STAFF2)
    for librarian in (li, chen):
        assert "on desk duty" in texts(await librarian.send("/desk"))
    ming = await watch(desk, ZH_READER, "zh-hans")
    relax_flood_control(desk)
    fang = await watch(desk, READER)

    # Chinese (in traditional characters) gets the Chinese answer; "this answers it" ends there.
    offered = texts(await ming.send("/ask 請問圖書怎麼續借？"))
    assert "如何续借图书" in offered and "续借" in offered and "renew" not in offered
    assert "很高兴" in texts(await ming.press("✅ 第 1 条解决了"))
    assert (await conversation(desk, 1)).status == "answered"

    # English, paraphrased: the English answer; the reader asks a librarian with the question written.
    offered = texts(await fang.send("/ask can i extend my loan for longer?"))
    assert "How do I renew my books?" in offered and "如何" not in offered
    queued = texts(await fang.press("🙋 Ask a librarian"))
    assert "Q2" in queued and "number 1 in the queue" in queued and "expected wait" in queued
    assert "Added to your question Q2" in texts(await fang.send("It is for my thesis"))

    # Both librarians on duty got it with Take; they press together: exactly one wins.
    alerts = [await latest(p, "New question Q2") for p in (li, chen)]
    await asyncio.gather(li.press("✋ Take", message=alerts[0]), chen.press("✋ Take", message=alerts[1]))
    answers = sorted([li.last_callback_answer["text"], chen.last_callback_answer["text"]])
    assert answers[0].startswith("Q2 is yours") and answers[1].startswith("Q2 was taken by")
    taken = await conversation(desk, 2)
    winner, loser = (li, chen) if taken.staff_id == STAFF else (chen, li)
    card = await latest(winner, "You took question Q2")
    assert "extend my loan" in card["text"] and "It is for my thesis" in card["text"]
    assert "has taken your question Q2" in (await latest(fang, "has taken"))["text"]

    # Relay both ways: text, a photo, a document.
    await winner.send("Yes: use /loans, then the Renew button.", expect=False)
    assert "💬" in (await latest(fang, "then the Renew button"))["text"]
    await fang.send_photo(caption="this screen?", expect=False)
    photo = await latest(winner, "this screen?")
    assert photo["photo"]
    await fang.send_document("due.pdf", b"%PDF-1.4 due dates", caption="my list", expect=False)
    document = await latest(winner, "my list")
    assert document["document"] and document["document"]["file_name"] == "due.pdf"

    # An internal note stays with the staff; a saved reply is sent like a message.
    await winner.press("📝 Internal note", message=card)
    assert "not sent to the reader" in texts(await winner.send("first-year student, explain holds too"))
    await winner.press("💾 Saved replies", message=card)
    saved = await latest(winner, "Saved replies")
    assert saved["buttons"][-1][0]["text"].startswith("➕")
    await winner.press("➕ Keep my last message as a saved reply", message=saved)
    assert "Kept as a saved reply" in winner.last_callback_answer["text"]
    await winner.press("💾 Saved replies", message=card)
    saved = await latest(winner, "Saved replies (1)")
    await winner.press(saved["buttons"][0][0]["callback_data"], message=saved)
    await fang.wait_for(lambda m: len([x for x in fang.bot_messages() if "then the Renew button" in (x["text"] or "")]) == 2)

    # A restart in the middle: nothing lost, nothing relayed twice.
    await desk.restart()
    await fang.send("Thanks! One more thing: can I renew twice?", expect=False)
    await winner.wait_for(containing("renew twice"))
    await asyncio.sleep(0.5)
    assert len([m for m in winner.bot_messages() if "renew twice" in (m["text"] or "")]) == 1
    await winner.send("Yes, up to 2 times.", expect=False)
    await fang.wait_for(containing("up to 2 times"))
    assert await count(desk, Delivery, Delivery.text_key == "reference.to_staff") == 3
    assert not [m for m in loser.bot_messages() if "renew twice" in (m["text"] or "")]

    # The reader ends it: a transcript without the note, and the rating; the librarian tags the
    # effort and saves the answer to the answer base.
    await fang.send("/end", expect=False)
    ended = await latest(fang, "has ended")
    assert "up to 2 times" in ended["text"] and "extend my loan" in ended["text"] and "first-year" not in ended["text"]
    assert "Librarian" in ended["text"] and "Li Na" not in ended["text"] and "Chen Jie" not in ended["text"]
    assert "You rated Q2 ★★★★★" in texts(await fang.press("5 ★", message=ended))
    await fang.press_data(ended["message_id"], "rf:rate:2:1")  # the buttons are gone; an old press is refused
    assert "already rated" in fang.last_callback_answer["text"]
    closing = await latest(winner, "The conversation Q2 has ended")
    assert "The reader ended it" in closing["text"]
    await winner.press("3", message=closing)
    assert "READ effort 3" in winner.last_callback_answer["text"]
    draft = texts(await winner.press("📥 Save the answer to the answer base", message=closing))
    assert "extend my loan" in draft and "up to 2 times" in draft
    assert "Saved to the answer base (entry 23)" in texts(await winner.press("Save as it is"))
    await latest(winner, "rated Q2 ★★★★★")

    done = await conversation(desk, 2)
    assert (done.status, done.rating, done.effort, done.staff_id, done.saved_entry_id) == ("closed", 5, 3, taken.staff_id, 23)
    assert done.rated_at is not None and done.first_answer_at is not None
    async with desk.db.session() as s:
        entry = await s.get(FaqEntry, 23)
        assert entry is not None and entry.question_en.startswith("can i extend") and "up to 2 times" in entry.answer_en

    # After the end, plain text is a catalog search again (not relayed).
    assert "Q2" not in texts(await fang.send("deep learning"))
    assert await count(desk, DeskMessage, DeskMessage.conversation_id == 2, DeskMessage.side == "reader") == 4

    # The figures: in /stats, per staff member.
    async with desk.db.session() as s:
        stats = await reference_stats(s, None, None)
    assert (stats.questions, stats.answered_by_base, stats.to_librarian, stats.ratings) == (2, 1, 1, 1)
    assert stats.effort[3] == 1 and [p.staff_id for p in stats.per_staff] == [taken.staff_id]
    report = texts(await li.send("/stats"))
    assert "Reference desk" in report and "answered by the answer base 1 (50.0%)" in report


async def test_waiting_hand_over_records_and_forged_buttons(desk: EmbeddedBot) -> None:
    relax_flood_control(desk)
    fang = await watch(desk, READER)
    # A bare /ask waits for the question; /cancel drops that step (the next text is a search).
    assert "What would you like to ask" in texts(await fang.send("/ask"))
    await fang.send("/cancel")
    assert "Q1" not in texts(await fang.send("deep learning"))
    assert await count(desk, DeskConversation) == 0
    # Nothing in the answer base: straight to the queue; nobody on duty takes it.
    await fang.send("/ask")
    queued = texts(await fang.send("Do you have the 1936 Shanghai telephone directory?"))
    assert "passing your question to a librarian" in queued and "Q1" in queued
    desk.move_clock(dt.timedelta(minutes=11))
    await desk.run_jobs()
    waiting = (await latest(fang, "No librarian has taken"))["text"]
    assert "Q1" in waiting and "stays in the queue" in waiting
    await desk.run_jobs()  # told once only
    assert await count(desk, Delivery, Delivery.text_key == "reference.still_waiting") == 1

    # A reader cannot take, and a forged Take for a librarian not on duty still works only once.
    mine = await fang.send("/desk")
    assert "only for library staff" in texts(mine)
    await fang.press_data(mine[-1]["message_id"], "rf:take:1")
    assert "only for library staff" in fang.last_callback_answer["text"]

    li, chen = await watch(desk, STAFF), await watch(desk, STAFF2)
    board = texts(await li.send("/desk"))
    assert "Q1" in board and "telephone directory" in board
    # A librarian adds an entry to the answer base in the chat: readers get it at once.
    await li.press("➕ Add to the answer base")
    assert "Now write the answer" in texts(await li.send("Where are the old telephone directories?"))
    assert "Saved to the answer base (entry 23)" in texts(await li.send("On B1, in the compact stacks, shelf 12."))
    ming = await watch(desk, ZH_READER, "zh-hans")
    assert "compact stacks" in texts(await ming.send("/ask where can I find old telephone directories"))
    await li.press("✋ Take Q1")
    card = await latest(li, "You took question Q1")
    await chen.send("/desk")

    # A catalog record shared from a search reaches the reader with Place hold.
    assert (await import_demo_catalog(desk.db, DEMO)).skipped == 0
    await li.press("📚 Share a catalog record", message=card)
    results = texts(await li.send("明代政治制度"))
    assert "明代政治制度" in results
    await li.press("Share 1")
    record = await latest(fang, "recommends")
    assert "明代政治制度" in record["text"]
    [hold] = [b["callback_data"] for row in record["buttons"] for b in row]
    assert hold.startswith("hold:place:")

    # Hand over to a colleague on duty: they get the conversation so far, the reader is told.
    await li.press("🔁 Hand over", message=card)
    await li.press("Chen Jie")
    handed = await latest(chen, "handed you question Q1")
    assert "telephone directory" in handed["text"] and "明代政治制度" in handed["text"]
    assert "now with librarian Chen Jie" in (await latest(fang, "Chen Jie"))["text"]
    await chen.send("The original is in our special collections.", expect=False)
    assert "special collections" in (await latest(fang, "special collections"))["text"]
    await chen.send_photo(caption="the catalogue card", expect=False)
    assert (await latest(fang, "the catalogue card"))["photo"]
    # Li Na's text is no longer relayed (it is a search for her now).
    await li.send("hello there", expect=False)
    await asyncio.sleep(0.5)
    assert not [m for m in fang.bot_messages() if "hello there" in (m["text"] or "")]

    # The librarian ends it; the reader's forged rating of someone else's conversation is refused.
    await chen.send("/end", expect=False)
    assert "You ended it" in (await latest(chen, "has ended"))["text"]
    await latest(fang, "has ended")
    other = await watch(desk, ZH_READER, "zh-hans")
    started = await other.send("/start")
    await other.press_data(started[-1]["message_id"], "rf:rate:1:1")
    assert (await conversation(desk, 1)).rating is None
    assert (await conversation(desk, 1)).handovers == 1


async def test_outside_desk_hours_the_reader_is_told_when(db: Database) -> None:
    policy = Policy()
    policy.service.reference_hours = []  # never staffed: the question waits, the reader is told
    env = await EmbeddedBot.start(db, policy=policy)
    try:
        fang = await watch(env, READER)
        told = texts(await fang.send("/ask Where can I find old maps of Beijing?"))
        assert "closed right now" in told and "stays there" in told
        env.move_clock(dt.timedelta(minutes=30))
        await env.run_jobs()
        assert await count(env, Delivery, Delivery.text_key.like("reference.still_waiting%")) == 0  # told already
        # Withdrawn before anybody took it: no rating asked for.
        await fang.send("/end", expect=False)
        assert "withdrew question Q1" in (await latest(fang, "withdrew"))["text"]
        assert (await conversation(env, 1)).status == "closed"
        assert await count(env, Delivery, Delivery.text_key == "reference.ended_to_reader") == 0
    finally:
        await env.stop()
