"""Service statistics against figures computed by hand on a fixed data set; the text, CSV and the
command line; the tickets section when the tickets module offers ``ticket_stats``."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import sys
import types
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from storage.db import Database
from storage.ill import IllRequest
from storage.models import create_schema
from storage.stats import StatsReport, Week, local_bounds, service_stats

SH = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=SH).astimezone(dt.UTC)
SINCE, UNTIL = dt.date(2026, 11, 1), dt.date(2026, 11, 30)


def local(y: int, m: int, d: int, hh: int = 12, mm: int = 0) -> dt.datetime:
    return dt.datetime(y, m, d, hh, mm, tzinfo=SH).astimezone(dt.UTC)


# (kind, status, submitted, available, rating); numbered as in the hand computation below.
DATA = [
    ("loan", "completed", local(2026, 11, 2, 9), local(2026, 11, 6, 9), 5),  # 1: 4.0 days
    ("loan", "completed", local(2026, 11, 3, 10), local(2026, 11, 5, 22), 4),  # 2: 2.5 days
    ("copy", "available", local(2026, 11, 4, 8), local(2026, 11, 5, 8), None),  # 3: 1.0 day
    ("copy", "unfilled", local(2026, 11, 10), None, None),  # 4
    ("loan", "cancelled", local(2026, 11, 11), None, None),  # 5
    ("loan", "requested", local(2026, 11, 20), None, None),  # 6: open, 15 days old
    ("copy", "submitted", local(2026, 11, 30, 23, 30), None, None),  # 7: last half hour of the period
    ("loan", "completed", local(2026, 10, 31, 23, 30), local(2026, 11, 10, 23, 30), 1),  # 8: before the period
    ("copy", "submitted", local(2026, 12, 1, 0, 30), None, None),  # 9: after the period, open
    ("loan", "completed", local(2026, 11, 16, 9), local(2026, 11, 22, 9), None),  # 10: 6.0 days, not rated
    ("copy", "unfilled", local(2026, 11, 17), None, None),  # 11
]


async def load(db: Database) -> None:
    async with db.session() as s:
        for n, (kind, status, submitted, available, rating) in enumerate(DATA, start=1):
            s.add(IllRequest(
                form_token=f"f{n}", telegram_id=100 + n, kind=kind, title=f"Title {n}", status=status,
                submitted_at=submitted, updated_at=submitted, available_at=available, rating=rating,
                pickup_branch="main",
            ))


async def test_figures_of_a_month_match_the_hand_computation(db: Database) -> None:
    await load(db)
    async with db.session() as s:
        report = await service_stats(s, SINCE, UNTIL, SH, NOW)
    ill = report.ill
    # In the period: 1–7, 10, 11 (8 is the evening of Oct 31, 9 the early morning of Dec 1, local time).
    assert ill.total == 9
    assert ill.by_kind == {"loan": 5, "copy": 4}
    assert ill.by_status == {
        "submitted": 1, "in_review": 0, "requested": 1, "received": 0, "available": 1,
        "completed": 3, "unfilled": 2, "cancelled": 1,
    }
    assert (ill.filled, ill.unfilled, ill.cancelled) == (4, 2, 1)
    assert ill.fill_rate == pytest.approx(4 / 6)
    assert sorted(ill.turnaround_days) == pytest.approx([1.0, 2.5, 4.0, 6.0])
    assert ill.average_turnaround_days == pytest.approx(3.375)
    assert ill.median_turnaround_days == pytest.approx(3.25)
    assert ill.kind_share == pytest.approx({"loan": 5 / 9, "copy": 4 / 9})
    assert ill.average_rating == pytest.approx(4.5) and len(ill.ratings) == 2
    # Backlog now (Dec 5, noon): 3 (31 days, awaiting pick-up), 6 (15 days), 7 and 9 (4.5 days).
    assert ill.backlog == {"0-2d": 0, "2-7d": 2, "7-14d": 0, "14-30d": 1, "30d+": 1}
    assert ill.weeks == [
        Week(dt.date(2026, 10, 26)),
        Week(dt.date(2026, 11, 2), filled=3),
        Week(dt.date(2026, 11, 9), unfilled=1, cancelled=1),
        Week(dt.date(2026, 11, 16), filled=1, unfilled=1, open=1),
        Week(dt.date(2026, 11, 23)),
        Week(dt.date(2026, 11, 30), open=1),
    ]


async def test_open_period_covers_everything_and_empty_store_says_so(db: Database) -> None:
    async with db.session() as s:
        empty = await service_stats(s, None, None, SH, NOW)
    assert empty.ill.total == 0 and empty.ill.fill_rate is None and empty.ill.weeks == []
    text = empty.to_text("en")
    assert "Fill rate: —" in text and "no ratings yet" in text and "no request filled yet" in text
    await load(db)
    async with db.session() as s:
        report = await service_stats(s, None, None, SH, NOW)
    assert report.ill.total == len(DATA)
    assert report.ill.fill_rate == pytest.approx(5 / 7)
    assert report.ill.weeks[0].start == dt.date(2026, 10, 26) and report.ill.weeks[-1].start == dt.date(2026, 11, 30)
    assert sum(w.total for w in report.ill.weeks) == len(DATA)


async def test_text_and_csv(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "storage.tickets", None)  # as if complaints were not installed
    await load(db)
    async with db.session() as s:
        report = await service_stats(s, SINCE, UNTIL, SH, NOW)
    assert report.tickets is None
    en = report.to_text("en")
    assert "2026-11-01 – 2026-11-30 (Asia/Shanghai)" in en
    assert "Requests: 9 — book loans 5 (55.6%), article/chapter copies 4 (44.4%)" in en
    assert "Fill rate: 66.7% (4 filled of 6 decided)" in en
    assert "average 3.4 days, median 3.3 days (n = 4)" in en
    assert "Open backlog now, by age: 4 — under 2 days 0, 2–7 days 2" in en
    assert "Satisfaction: 4.50 / 5 (n = 2)" in en
    assert "Complaints" not in en
    zh = report.to_text("zh")
    assert "请求满足率：66.7%" in zh and "办理周期（从提交到可领取）" in zh and "平均响应时间" not in zh and "图书借阅 5 (55.6%)" in zh
    rows = list(csv.reader(io.StringIO(report.to_csv())))
    assert rows[0] == ["section", "metric", "key", "value"]
    values = {(r[0], r[1], r[2]): r[3] for r in rows[1:]}
    assert values[("ill", "requests", "total")] == "9"
    assert values[("ill", "fill_rate", "")] == "0.6667"
    assert values[("ill", "turnaround_days", "average")] == "3.375"
    assert values[("ill", "turnaround_days", "median")] == "3.25"
    assert values[("ill", "kind_share", "loan")] == "0.5556"
    assert values[("ill", "backlog", "total")] == "4"
    assert values[("ill", "rating", "average")] == "4.5"
    assert values[("ill", "week_filled", "2026-11-02")] == "3"
    assert values[("period", "since", "")] == "2026-11-01"


def test_both_languages_have_every_label() -> None:
    from storage.stats import LABELS

    assert set(LABELS["zh"]) == set(LABELS["en"])


def test_period_bounds_are_local_days() -> None:
    start, end = local_bounds(SINCE, UNTIL, SH)
    assert start == dt.datetime(2026, 10, 31, 16, 0, tzinfo=dt.UTC)
    assert end == dt.datetime(2026, 11, 30, 16, 0, tzinfo=dt.UTC)
    assert local_bounds(None, None, SH) == (None, None)


class FakeTicketStats:
    by_category = {"environment": 3, "service": 1}
    by_status = {"new": 1, "resolved": 3}
    median_first_response_hours = 2.5
    median_resolution_hours = 30.0
    sla_breaches = 1
    average_rating = 4.0
    ratings = 2


async def test_tickets_section_when_the_tickets_module_offers_it(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []

    async def ticket_stats(session: object, since: object, until: object, now: object) -> FakeTicketStats:
        calls.append((since, until, now))
        return FakeTicketStats()

    fake = types.ModuleType("storage.tickets")
    fake.ticket_stats = ticket_stats  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "storage.tickets", fake)
    async with db.session() as s:
        report = await service_stats(s, SINCE, UNTIL, SH, NOW)
    assert calls == [(*local_bounds(SINCE, UNTIL, SH), NOW)]
    en = report.to_text("en")
    assert "Complaints and feedback" in en and "Tickets: 4" in en
    assert "By category: Environment and noise 3, Service 1" in en
    assert "Median first response: 2.5 hours" in en and "First-response deadline missed: 1" in en
    assert "投诉与建议" in report.to_text("zh")
    values = {(r[0], r[1], r[2]): r[3] for r in csv.reader(io.StringIO(report.to_csv()))}
    assert values[("tickets", "by_category", "environment")] == "3"
    assert values[("tickets", "resolution_hours", "median")] == "30"
    assert values[("tickets", "sla_breaches", "")] == "1"


async def test_the_real_tickets_module_when_present(db: Database) -> None:
    async with db.session() as s:
        report = await service_stats(s, SINCE, UNTIL, SH, NOW)
    assert report.tickets is not None
    assert "Complaints and feedback" in report.to_text("en")
    assert "tickets,sla_breaches" in report.to_csv()


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"

    async def prepare() -> None:
        db = Database(url)
        await create_schema(db)
        await load(db)
        await db.dispose()

    asyncio.run(prepare())
    monkeypatch.chdir(tmp_path)  # no stray .env file
    monkeypatch.setenv("LIBRARYBOT_DATABASE_URL", url)
    monkeypatch.setenv("LIBRARYBOT_TIMEZONE", "Asia/Shanghai")
    monkeypatch.setitem(sys.modules, "storage.tickets", None)
    assert main(["stats", "--since", "2026-11-01", "--until", "2026-11-30", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert "ill,requests,total,9" in out and "ill,fill_rate,,0.6667" in out
    assert main(["stats", "--since", "2026-11-01", "--until", "2026-11-30"]) == 0
    assert "Fill rate: 66.7%" in capsys.readouterr().out
    assert main(["stats", "--since", "2026-02-30"]) == 1
    assert "not a date" in capsys.readouterr().err
    # Dates no library means used to overflow (OverflowError and a traceback, #13): one clear line.
    assert main(["stats", "--since", "0001-01-01", "--until", "9999-12-31"]) == 1
    err = capsys.readouterr().err
    assert "statistics cover dates from 2000-01-01 to 2099-12-31" in err and "统计只涵盖" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_a_period_beyond_sensible_dates_is_refused_not_overflowed(db: Database) -> None:
    from storage.stats import PeriodOutOfRange

    for since, until in ((dt.date(1, 1, 1), dt.date(9999, 12, 31)), (dt.date(1999, 12, 31), None), (None, dt.date(2100, 1, 1))):
        async with db.session() as s:
            with pytest.raises(PeriodOutOfRange):
                await service_stats(s, since, until, SH, NOW)
    async with db.session() as s:  # the widest period allowed works
        report = await service_stats(s, dt.date(2000, 1, 1), dt.date(2099, 12, 31), SH, NOW)
    assert report.to_csv().startswith("section,metric,key,value")


def test_the_command_refuses_dates_beyond_sensible_ones_in_both_languages() -> None:
    from bot.i18n import t
    from handlers.stats import parse_period

    assert parse_period(["0001-01-01", "9999-12-31"]) == "stats.out_of_range"
    assert parse_period(["2026-11-01", "9999-12-31"]) == "stats.out_of_range"
    assert parse_period(["2000-01-01", "2099-12-31"]) == (dt.date(2000, 1, 1), dt.date(2099, 12, 31))
    en = t("en", "stats.out_of_range", first="2000-01-01", last="2099-12-31", arg="0001-01-01 9999-12-31")
    zh = t("zh", "stats.out_of_range", first="2000-01-01", last="2099-12-31", arg="0001-01-01 9999-12-31")
    assert "from 2000-01-01 to 2099-12-31" in en and "2000-01-01 至 2099-12-31" in zh


def test_report_is_a_plain_dataclass() -> None:
    report = StatsReport(None, None, NOW, SH, __import__("storage.stats").stats.IllFigures())
    assert "Requests: 0" in report.to_text() and report.to_csv().startswith("section,metric,key,value")
