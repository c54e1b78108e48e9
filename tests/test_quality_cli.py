"""``librarybot survey import|send|results`` and ``librarybot quality report`` on a real SQLite file:
text, CSV, the PNG chart and the PDF, and one-line errors for bad input."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.cli import main
from storage.db import Database, utcnow
from storage.people import Reader, Role, User, add_staff
from storage.quality import label, month_of
from storage.surveys import SurveyResponse, answer, find_survey, finish, start
from storage.tickets import Ticket

SURVEY = """
code = "winter"
title_zh = "冬季调查"
title_en = "Winter survey"
closes = "2099-01-31"
[[questions]]
kind = "likert"
text_zh = "满意吗？"
text_en = "Satisfied?"
[[questions]]
kind = "nps"
text_en = "Recommend us?"
"""


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.setenv("LIBRARYBOT_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("LIBRARYBOT_TIMEZONE", "Asia/Shanghai")
    monkeypatch.setenv("LIBRARYBOT_LANGUAGE", "en")
    assert main(["db", "upgrade"]) == 0
    return tmp_path


def _db(library: Path) -> Database:
    return Database(f"sqlite+aiosqlite:///{library / 'cli.db'}")


async def _readers_answer(library: Path) -> None:
    """Three readers."""
    db = _db(library)
    async with db.session() as s:
        for n in (1, 2, 3):
            s.add(Reader(id=n, card_number=f"C{n}", name=f"R{n}", pin_hash="x"))
        await s.flush()
        for n in (1, 2, 3):
            s.add(User(telegram_id=500 + n, first_name="R", reader_id=n))
    await db.dispose()


async def _answer(library: Path) -> None:
    """Two of the readers answer: (5, 10) and (3, 6)."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Asia/Shanghai")
    db = _db(library)
    now = utcnow()
    for telegram_id, likert, score in ((501, 5, 10), (502, 3, 6)):
        async with db.session() as s:
            survey = await find_survey(s, "winter")
            assert survey is not None
            begun = await start(s, survey.id, telegram_id, now=now, tz=tz)
            assert begun.token is not None
            await answer(s, begun.token, 0, value=likert, now=now, tz=tz)
            await answer(s, begun.token, 1, value=score, now=now, tz=tz)
            assert await finish(s, begun.token, telegram_id, now=now, tz=tz) == "saved"
    async with db.session() as s:
        assert len(list(await s.scalars(select(SurveyResponse)))) == 2
    await db.dispose()


def test_survey_import_send_and_results(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_readers_answer(library))
    path = library / "winter.toml"
    path.write_text(SURVEY, encoding="utf-8")
    assert main(["survey", "import", str(path)]) == 0
    assert "survey 1 (winter): 2 questions, open until 2099-01-31" in capsys.readouterr().out
    assert main(["survey", "send", "winter", "--sample", "2"]) == 0
    assert "2 invited of 3 not yet invited" in capsys.readouterr().out
    assert main(["survey", "send", "1", "--audience", "everyone"]) == 0
    assert "1 invited of 1 not yet invited" in capsys.readouterr().out
    # (the sample and the rest: all three readers are invited, each once)
    asyncio.run(_answer(library))

    assert main(["survey", "results", "winter"]) == 0
    out = capsys.readouterr().out
    assert "Invited 3, answered 2: response rate 67%" in out
    assert "mean 4.00 (95% CI" in out and "NPS 0 (mean 8.00" in out
    assert main(["survey", "results", "winter", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    mean = next(r for r in rows if r["key"] == "q1" and r["measure"] == "mean")
    assert (mean["n"], float(mean["value"])) == ("2", 4.0)
    low, high = float(mean["ci_low"]), float(mean["ci_high"])
    assert low == pytest.approx(4 - 12.706 * 2 ** 0.5 / 2 ** 0.5, abs=1e-3) and high == pytest.approx(4 + 12.706, abs=1e-3)
    assert float(next(r for r in rows if r["measure"] == "nps")["value"]) == 0  # numbers, not text
    assert main(["survey", "results", "winter", "--format", "png", "--out", str(library / "chart.png")]) == 0
    assert (library / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_survey_bad_input_fails_with_one_line(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["survey", "import", str(library / "missing.toml")]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = library / "bad.toml"
    bad.write_text("code = 'x'\ntitle_en = 'X'\ncloses = 2099-01-01\n[[questions]]\nkind = 'stars'\ntext_en = 'q'\n", encoding="utf-8")
    assert main(["survey", "import", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "question 1: kind must be one of likert, nps, choice, text, gap" in err and err.count("\n") == 1
    assert main(["survey", "send", "nope"]) == 1
    assert "no survey nope" in capsys.readouterr().err
    assert main(["survey", "results", "42"]) == 1
    assert main(["quality", "report", "--month", "2026-13"]) == 1
    assert "not a month" in capsys.readouterr().err


async def _ratings(library: Path) -> str:
    db = _db(library)
    now = utcnow()
    async with db.session() as s:
        s.add_all([User(telegram_id=9001, first_name="Na"), User(telegram_id=9002, first_name="Jie")])
        await add_staff(s, 9001, Role.STAFF, "Li Na")
        await add_staff(s, 9002, Role.STAFF, "Chen Jie")
        for n, rating in enumerate((5, 4, 5, 5, 4, 5)):
            s.add(Ticket(category="service" if n == 0 else "collection", text="words", requester_id=501, anonymous=n == 1,
                         status="closed", assignee_id=9001, created_at=now, respond_by=now + dt.timedelta(hours=24),
                         first_response_at=now + dt.timedelta(minutes=20), rating=rating))
        s.add(Ticket(category="collection", text="words", requester_id=502, status="closed", assignee_id=9002, created_at=now,
                     respond_by=now + dt.timedelta(hours=24), rating=2))
    await db.dispose()
    from zoneinfo import ZoneInfo

    return label(month_of(now, ZoneInfo("Asia/Shanghai")))


def test_quality_report_text_csv_and_pdf(library: Path, capsys: pytest.CaptureFixture[str]) -> None:
    month = asyncio.run(_ratings(library))
    assert main(["staff", "remove", "9002"]) == 0  # Chen Jie leaves: his month stays in the report, under his name
    capsys.readouterr()
    assert main(["quality", "report", "--month", month]) == 0
    out = capsys.readouterr().out
    assert f"Service quality report {month}" in out
    assert "Li Na: 6 · 4.67 (6) · 20 min · 1" in out and "Chen Jie (former staff): 1 · 2.00 (1)" in out
    assert "1. Li Na: 4.67 from 6 ratings" in out and "<b>" not in out
    assert main(["quality", "report", "--month", month, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    li = next(r for r in rows if r["section"] == "staff" and r["name"] == "Li Na")
    assert (li["interactions"], li["ratings"], li["average_rating"], li["first_response_minutes"], li["service_complaints"]) == ("6", "6", "4.67", "20", "1")
    assert [r["name"] for r in rows if r["section"] == "recognition"] == ["Li Na"]
    assert len([r for r in rows if r["section"] == "team"]) == 6
    out_path = library / "report.pdf"
    assert main(["quality", "report", "--month", month, "--format", "pdf", "--out", str(out_path)]) == 0
    pdf = out_path.read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") == 2
    if shutil.which("pdftoppm"):  # the pages render to images (the note says they were looked at by eye)
        subprocess.run(["pdftoppm", "-r", "30", "-png", str(out_path), str(library / "page")], check=True, timeout=120)
        assert sorted(p.name for p in library.glob("page-*.png")) == ["page-1.png", "page-2.png"]
