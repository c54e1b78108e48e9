"""The reference desk's rules without Telegram: matching (paraphrase, word order, typos, traditional
characters, pinyin, either language), desk hours, the answer base's CSV import and export (also
through ``librarybot faq``), the take race, relaying, erasure, and the statistics."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from storage.db import Database
from storage.outbox import Delivery
from storage.people import Role, add_staff
from storage.policy import DeskHours, Policy
from storage.privacy import forget_person
from storage.reference import (
    SAMPLE_FAQ,
    AnswerIndex,
    Candidate,
    DeskConversation,
    DeskMessage,
    FaqEntry,
    FaqError,
    Labels,
    Outcome,
    ask,
    desk_open,
    end,
    expected_by,
    export_faq,
    find_answers,
    import_faq,
    next_opening,
    rate,
    reference_stats,
    relay,
    set_duty,
    take,
    to_librarian,
)

ROOT = Path(__file__).resolve().parents[1]
TZ = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2026, 12, 2, 3, 0, tzinfo=dt.UTC)  # a Wednesday, 11:00 in Shanghai


def sample_index() -> tuple[AnswerIndex, list[dict[str, str]]]:
    rows = list(csv.DictReader(SAMPLE_FAQ.open(encoding="utf-8")))
    return AnswerIndex(Candidate(i, r["question_zh"], r["question_en"], r["tags"]) for i, r in enumerate(rows, 1)), rows


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("How do I renew my books?", "How do I renew my books?"),  # as written
        ("can I extend my loan?", "How do I renew my books?"),  # paraphrase
        ("books renew how", "How do I renew my books?"),  # word order
        ("how do I renwe my boks", "How do I renew my books?"),  # typos
        ("怎么续借图书", "How do I renew my books?"),  # Chinese
        ("圖書怎麼續借", "How do I renew my books?"),  # traditional characters
        ("xujie", "How do I renew my books?"),  # pinyin without spaces
        ("tu shu xu jie", "How do I renew my books?"),  # pinyin with spaces
        ("借书卡丢了怎么办", "I lost my library card. What should I do?"),
        ("how much do I pay for late books", "What happens if my book is overdue? How much is the fine?"),
        ("what time do you close on sunday", "What are the library's opening hours?"),
        ("is there wireless internet", "Is there Wi-Fi in the library? How do I connect?"),
        ("可以带咖啡进去吗", "Can I eat or drink in the library?"),
        ("can I borrow it from another library", "Can I get a book the library does not have?"),
    ],
)
def test_matching_finds_the_entry(question: str, expected: str) -> None:
    index, rows = sample_index()
    found = index.match(question)
    assert found, question
    assert rows[found[0].entry_id - 1]["question_en"] == expected


def test_matching_offers_nothing_for_an_unrelated_question() -> None:
    index, _ = sample_index()
    assert index.match("what is the weather like in Paris tomorrow") == []
    assert index.match("") == [] and index.match("?!") == []
    assert len(index.match("library card")) <= 3


async def test_answers_come_in_the_question_language(db: Database) -> None:
    async with db.session() as s:
        await import_faq(s, SAMPLE_FAQ, NOW)
        [zh, *_] = await find_answers(s, "怎么续借")
        [en, *_] = await find_answers(s, "renew my books")
    assert zh.question == "如何续借图书？" and "续借" in zh.answer
    assert en.question == "How do I renew my books?" and "Renew" in en.answer


def test_desk_hours_and_when_to_expect_an_answer() -> None:
    policy = Policy()  # Monday–Friday 08:30–21:00, weekends 09:00–17:00
    assert desk_open(policy, NOW, TZ)
    late_wednesday = dt.datetime(2026, 12, 2, 22, 30, tzinfo=TZ)
    assert not desk_open(policy, late_wednesday, TZ)
    assert next_opening(policy, late_wednesday, TZ) == dt.datetime(2026, 12, 3, 8, 30, tzinfo=TZ)
    friday_night = dt.datetime(2026, 12, 4, 21, 0, tzinfo=TZ)
    assert next_opening(policy, friday_night, TZ) == dt.datetime(2026, 12, 5, 9, 0, tzinfo=TZ)
    assert expected_by(policy, friday_night, TZ) == dt.datetime(2026, 12, 5, 9, 10, tzinfo=TZ)
    assert expected_by(policy, NOW, TZ) == NOW + dt.timedelta(minutes=10)
    policy.service.reference_hours = [DeskHours(weekdays=[1, 2, 3, 4, 5, 6, 7], opens="00:00", closes="24:00")]
    assert desk_open(policy, late_wednesday, TZ)
    policy.service.reference_hours = []
    assert next_opening(policy, NOW, TZ) is None and expected_by(policy, NOW, TZ) is None


async def test_import_updates_by_question_and_export_round_trips(db: Database, tmp_path: Path) -> None:
    async with db.session() as s:
        first = await import_faq(s, SAMPLE_FAQ, NOW)
        again = await import_faq(s, SAMPLE_FAQ, NOW)
    assert (first.added, first.updated, first.skipped) == (22, 0, [])
    assert (again.added, again.updated, again.unchanged) == (0, 0, 22)
    changed = tmp_path / "changed.csv"
    changed.write_text(
        "question_zh,question_en,answer_zh,answer_en,tags\n"
        ",How do I renew my books?,,Use /loans.,renew\n"  # the English question alone finds the entry
        "新问题？,,新的回答。,,\n"
        ",,no question,,\n"
        "只有问题,,,,\n",
        encoding="utf-8",
    )
    async with db.session() as s:
        result = await import_faq(s, changed, NOW)
        text = await export_faq(s)
        total = await s.scalar(select(func.count()).select_from(FaqEntry))
    assert (result.added, result.updated) == (1, 1)
    assert result.skipped == ["line 4: no question", "line 5: no answer"]
    assert total == 23
    rows = list(csv.DictReader(text.splitlines()))
    assert rows[0]["answer_en"] == "Use /loans." and rows[0]["question_zh"] == "" and rows[-1]["question_zh"] == "新问题？"
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n", encoding="utf-8")
    async with db.session() as s:
        with pytest.raises(FaqError, match="missing column"):
            await import_faq(s, bad, NOW)
        with pytest.raises(FaqError, match="not found"):
            await import_faq(s, tmp_path / "nope.csv", NOW)


def test_librarybot_faq_import_and_export(db: Database, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    env.update(PYTHONPATH=str(ROOT), LIBRARYBOT_DATABASE_URL=db.url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, env=env, timeout=120)

    imported = cli("faq", "import", str(SAMPLE_FAQ))
    assert imported.returncode == 0 and "added 22, updated 0" in imported.stdout
    assert "added 0, updated 0, unchanged 22" in cli("faq", "import", str(SAMPLE_FAQ)).stdout
    out = tmp_path / "faq.csv"
    exported = cli("faq", "export", str(out))
    assert exported.returncode == 0 and "exported 22 entries" in exported.stdout
    assert out.read_text(encoding="utf-8").splitlines()[0] == "question_zh,question_en,answer_zh,answer_en,tags"
    missing = cli("faq", "import", str(tmp_path / "missing.csv"))
    assert missing.returncode == 1 and "file not found" in missing.stderr and "Traceback" not in missing.stderr
    stats = cli("stats")
    assert stats.returncode == 0 and "Reference desk" in stats.stdout
    assert "reference,questions,total,0" in cli("stats", "--format", "csv").stdout


async def _queued(db: Database, reader: int, question: str, policy: Policy) -> int:
    async with db.session() as s:
        conversation, _ = await ask(s, reader, question, NOW)
        result = await to_librarian(s, conversation.id, reader, policy, NOW, TZ)
        assert result.outcome is Outcome.OK
        return conversation.id


async def test_one_of_two_takers_wins_and_the_conversation_is_relayed(db: Database) -> None:
    policy = Policy()
    async with db.session() as s:
        await add_staff(s, 1, Role.STAFF, "Li")
        await add_staff(s, 2, Role.STAFF, "Chen")
        await set_duty(s, 1, True, NOW)
        await set_duty(s, 2, True, NOW)
    number = await _queued(db, 100, "Do you have maps of old Beijing?", policy)

    async def take_as(staff: int) -> Outcome:
        async with db.session() as s:
            return (await take(s, number, staff, NOW, Labels())).outcome

    outcomes = await asyncio.gather(take_as(1), take_as(2))
    assert sorted(outcomes) == sorted([Outcome.OK, Outcome.TAKEN])
    async with db.session() as s:
        taken = await s.get(DeskConversation, number)
        assert taken is not None and taken.status == "active"
        winner = taken.staff_id
        assert winner in (1, 2)
        loser = 3 - winner
        assert (await relay(s, number, loser, "I can help", NOW)).outcome is Outcome.NOT_YOURS
        assert (await relay(s, number, winner, "Yes, on 3F.", NOW)).outcome is Outcome.OK
        assert (await relay(s, number, 100, "Thanks", NOW)).outcome is Outcome.OK
        assert (await relay(s, number, winner, "   ", NOW)).outcome is Outcome.EMPTY
        assert (await end(s, number, 100, NOW + dt.timedelta(minutes=5), Labels())).outcome is Outcome.OK
        assert (await end(s, number, winner, NOW, Labels())).outcome is Outcome.FINISHED
        assert (await relay(s, number, 100, "late", NOW)).outcome is Outcome.FINISHED
        assert (await rate(s, number, 100, 4, NOW)).outcome is Outcome.OK
        assert (await rate(s, number, 100, 5, NOW)).outcome is Outcome.ALREADY
        assert (await rate(s, number, 999, 5, NOW)).outcome is Outcome.NOT_FOUND
        keys = [d.text_key for d in await s.scalars(select(Delivery).order_by(Delivery.id))]
        stats = await reference_stats(s, None, None)
    assert keys.count("reference.staff_new") == 2 and keys.count("reference.to_reader") == 1
    assert keys.count("reference.to_staff") == 1 and keys.count("reference.ended_to_reader") == 1
    assert (stats.questions, stats.ratings, stats.average_rating, stats.median_wait_minutes) == (1, 1, 4.0, 0.0)
    assert stats.per_staff[0].staff_id == winner and stats.median_length_minutes == 5.0


async def test_forgetme_erases_the_transcripts_and_keeps_anonymous_figures(db: Database) -> None:
    number = await _queued(db, 100, "My secret question about my thesis", Policy())
    async with db.session() as s:
        await add_staff(s, 1, Role.STAFF, "Li")
        await take(s, number, 1, NOW, Labels())
        await relay(s, number, 100, "my student number is 12345", NOW)
        await end(s, number, 1, NOW, Labels())
        await rate(s, number, 100, 5, NOW)
    async with db.session() as s:
        await forget_person(s, 100)
    async with db.session() as s:
        kept = await s.get(DeskConversation, number)
        left = await s.scalar(select(func.count()).select_from(DeskMessage))
        stats = await reference_stats(s, None, None)
    assert kept is not None and kept.reader_id is None and kept.question == "" and left == 0
    assert kept.rating == 5 and kept.staff_id == 1 and stats.questions == 1 and stats.ratings == 1
