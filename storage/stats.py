"""Service statistics for a period: interlibrary loan (fill rate 请求满足率, turnaround 平均响应时间,
share of each kind 各类型文献请求占比, backlog, satisfaction) and, when the tickets module is
installed, complaints and feedback. Used by ``librarybot stats`` and by ``/stats``.

The period is a range of local dates, both included, applied to when a request was submitted;
the open backlog is always as of ``now``. A request is *filled* once it became available to the
reader (``available`` or ``completed``); the fill rate is filled / (filled + unfilled), cancelled
requests counting for neither.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import statistics
import tomllib
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage import csv_export
from storage.events import EventStats, event_stats
from storage.ill import CLOSED, FILLED, ORDER, IllKind, IllRequest, IllStatus
from storage.ill_exchange import PartnerFigures, partner_csv_rows, partner_figures, partner_text
from storage.policy import Policy

# Open requests by age (days since submission): (key, from, to) with ``to`` excluded.
BACKLOG_BUCKETS: list[tuple[str, float, float]] = [
    ("0-2d", 0, 2), ("2-7d", 2, 7), ("7-14d", 7, 14), ("14-30d", 14, 30), ("30d+", 30, float("inf")),
]
OUTCOMES = ("filled", "unfilled", "cancelled", "open")
MAX_WEEKS = 104  # the weekly series covers at most the last two years of the period


@dataclass(frozen=True)
class Week:
    """Requests submitted in one week (Monday to Sunday, local time), by what became of them."""

    start: dt.date
    filled: int = 0
    unfilled: int = 0
    cancelled: int = 0
    open: int = 0

    @property
    def total(self) -> int:
        return self.filled + self.unfilled + self.cancelled + self.open


@dataclass
class IllFigures:
    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    filled: int = 0
    unfilled: int = 0
    cancelled: int = 0
    turnaround_days: list[float] = field(default_factory=list)  # submission → available, per filled request
    backlog: dict[str, int] = field(default_factory=dict)  # open requests now, by age bucket
    ratings: list[int] = field(default_factory=list)
    weeks: list[Week] = field(default_factory=list)

    @property
    def fill_rate(self) -> float | None:
        decided = self.filled + self.unfilled
        return self.filled / decided if decided else None

    @property
    def kind_share(self) -> dict[str, float]:
        return {kind: (count / self.total if self.total else 0.0) for kind, count in self.by_kind.items()}

    @property
    def average_turnaround_days(self) -> float | None:
        return statistics.fmean(self.turnaround_days) if self.turnaround_days else None

    @property
    def median_turnaround_days(self) -> float | None:
        return statistics.median(self.turnaround_days) if self.turnaround_days else None

    @property
    def backlog_total(self) -> int:
        return sum(self.backlog.values())

    @property
    def average_rating(self) -> float | None:
        return statistics.fmean(self.ratings) if self.ratings else None


@dataclass
class StatsReport:
    """The figures of one period, printable as text (zh or en) or CSV."""

    since: dt.date | None
    until: dt.date | None
    generated_at: dt.datetime
    tz: ZoneInfo
    ill: IllFigures
    tickets: Any | None = None  # storage.tickets.TicketStats, when that module is installed
    events: EventStats | None = None  # events and programmes (#17)
    partners: list[PartnerFigures] = field(default_factory=list)  # per partner library, ISO 18626 (#22)
    reference: Any | None = None  # storage.reference.ReferenceStats (#16)

    def period_label(self, lang: str = "en") -> str:
        """The period in words: ``2026-11-01 – 2026-11-30``, or up to today when it has no start."""
        words = LABELS[lang if lang in LABELS else "en"]
        end = self.until.isoformat() if self.until else self.generated_at.astimezone(self.tz).date().isoformat()
        if self.since is None:
            return words["up_to"].format(end=end)
        return f"{self.since.isoformat()} – {end}"

    def to_text(self, lang: str = "en") -> str:
        """The report for people, in ``lang`` ("zh" or "en"), as plain text."""
        w = LABELS[lang if lang in LABELS else "en"]
        ill = self.ill
        c = w["colon"]
        lines = [f"{w['title']} · {self.period_label(lang)} ({self.tz.key})", "", w["ill"]]
        kinds = w["sep"].join(
            f"{w['kind_' + k]} {ill.by_kind.get(k, 0)} ({_pct(ill.kind_share.get(k, 0.0))})" for k in KINDS
        )
        lines.append(f"{w['requests']}{c}{ill.total}" + (f" — {kinds}" if ill.total else ""))
        if ill.total:
            statuses = w["sep"].join(f"{w['status_' + s]} {n}" for s, n in ill.by_status.items() if n)
            lines.append(f"{w['by_status']}{c}{statuses}")
        rate = ill.fill_rate
        lines.append(
            f"{w['fill_rate']}{c}"
            + (w["fill_detail"].format(rate=_pct(rate), filled=ill.filled, decided=ill.filled + ill.unfilled)
               if rate is not None else w["none"])
        )
        if ill.turnaround_days:
            lines.append(w["turnaround"].format(
                avg=_days(ill.average_turnaround_days), median=_days(ill.median_turnaround_days), n=len(ill.turnaround_days)
            ))
        else:
            lines.append(w["turnaround_none"])
        buckets = w["sep"].join(f"{w['age_' + key]} {ill.backlog.get(key, 0)}" for key, _, _ in BACKLOG_BUCKETS)
        lines.append(f"{w['backlog']}{c}{ill.backlog_total} — {buckets}")
        lines.append(_rating_line(w, ill.average_rating, len(ill.ratings)))
        if self.partners:
            lines += ["", *partner_text(self.partners, lang)]
        if self.tickets is not None:
            lines += ["", *self._ticket_lines(w)]
        if self.events is not None:
            lines += ["", *self.events.lines(lang)]
        if self.reference is not None:
            lines += ["", *self.reference.text_lines(lang)]
        return "\n".join(lines)

    def _ticket_lines(self, w: dict[str, str]) -> list[str]:
        tk = self.tickets
        c = w["colon"]
        by_category = dict(getattr(tk, "by_category", {}) or {})
        by_status = dict(getattr(tk, "by_status", {}) or {})
        lines = [w["tickets"], f"{w['tickets_total']}{c}{sum(by_category.values()) or sum(by_status.values())}"]
        if any(by_category.values()):
            lines.append(f"{w['by_category']}{c}" + w["sep"].join(
                f"{w.get('cat_' + k, k)} {n}"
                for k, n in sorted(by_category.items(), key=lambda kv: (-kv[1], kv[0])) if n
            ))
        if any(by_status.values()):
            lines.append(f"{w['by_status']}{c}" + w["sep"].join(f"{w.get('tstatus_' + k, k)} {n}" for k, n in by_status.items() if n))
        lines.append(w["first_response"].format(h=_hours(getattr(tk, "median_first_response_hours", None), w)))
        lines.append(w["resolution"].format(h=_hours(getattr(tk, "median_resolution_hours", None), w)))
        lines.append(f"{w['sla_breaches']}{c}{getattr(tk, 'sla_breaches', 0)}")
        lines.append(_rating_line(w, getattr(tk, "average_rating", None), int(getattr(tk, "ratings", 0) or 0)))
        return lines

    def to_csv(self) -> str:
        """The numbers, one per row: ``section,metric,key,value`` (rates as fractions, times in days/hours)."""
        out = io.StringIO()
        writer = csv_export.writer(out, lineterminator="\n")
        writer.writerow(["section", "metric", "key", "value"])
        ill = self.ill
        writer.writerow(["period", "since", "", self.since.isoformat() if self.since else ""])
        writer.writerow(["period", "until", "", self.until.isoformat() if self.until else ""])
        writer.writerow(["ill", "requests", "total", ill.total])
        for kind in KINDS:
            writer.writerow(["ill", "by_kind", kind, ill.by_kind.get(kind, 0)])
        for kind in KINDS:
            writer.writerow(["ill", "kind_share", kind, _num(ill.kind_share.get(kind, 0.0))])
        for status, count in ill.by_status.items():
            writer.writerow(["ill", "by_status", status, count])
        writer.writerow(["ill", "filled", "", ill.filled])
        writer.writerow(["ill", "unfilled", "", ill.unfilled])
        writer.writerow(["ill", "cancelled", "", ill.cancelled])
        writer.writerow(["ill", "fill_rate", "", _num(ill.fill_rate)])
        writer.writerow(["ill", "turnaround_days", "average", _num(ill.average_turnaround_days)])
        writer.writerow(["ill", "turnaround_days", "median", _num(ill.median_turnaround_days)])
        writer.writerow(["ill", "turnaround_days", "count", len(ill.turnaround_days)])
        for key, _, _ in BACKLOG_BUCKETS:
            writer.writerow(["ill", "backlog", key, ill.backlog.get(key, 0)])
        writer.writerow(["ill", "backlog", "total", ill.backlog_total])
        writer.writerow(["ill", "rating", "average", _num(ill.average_rating)])
        writer.writerow(["ill", "rating", "count", len(ill.ratings)])
        for week in ill.weeks:
            for outcome in OUTCOMES:
                writer.writerow(["ill", f"week_{outcome}", week.start.isoformat(), getattr(week, outcome)])
        writer.writerows(partner_csv_rows(self.partners))
        tk = self.tickets
        if tk is not None:
            for category, count in sorted((getattr(tk, "by_category", {}) or {}).items()):
                writer.writerow(["tickets", "by_category", category, count])
            for status, count in (getattr(tk, "by_status", {}) or {}).items():
                writer.writerow(["tickets", "by_status", status, count])
            writer.writerow(["tickets", "first_response_hours", "median", _num(getattr(tk, "median_first_response_hours", None))])
            writer.writerow(["tickets", "resolution_hours", "median", _num(getattr(tk, "median_resolution_hours", None))])
            writer.writerow(["tickets", "sla_breaches", "", getattr(tk, "sla_breaches", 0)])
            writer.writerow(["tickets", "rating", "average", _num(getattr(tk, "average_rating", None))])
            writer.writerow(["tickets", "rating", "count", getattr(tk, "ratings", 0)])
        if self.events is not None:
            writer.writerows(self.events.csv_rows())
        if self.reference is not None:
            writer.writerows(self.reference.csv_rows())
        return out.getvalue()


KINDS = (IllKind.LOAN.value, IllKind.COPY.value)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def _days(value: float | None) -> str:
    """Days with one decimal, rounded half up as people do by hand (3.25 → 3.3)."""
    if value is None:
        return "—"
    return str(Decimal(repr(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _hours(value: float | None, w: dict[str, str]) -> str:
    return w["none"] if value is None else w["hours"].format(v=f"{value:.1f}")


def _rating_line(w: dict[str, str], average: float | None, count: int) -> str:
    if average is None or not count:
        return f"{w['rating']}{w['colon']}{w['no_ratings']}"
    return f"{w['rating']}{w['colon']}" + w["rating_detail"].format(avg=f"{average:.2f}", n=count)


# The dates a period may name: wide enough for any library's history and plans, narrow enough that
# the day after and the time-zone shift of either end stay valid dates (0001-01-01 or 9999-12-31 overflow).
FIRST_DAY = dt.date(2000, 1, 1)
LAST_DAY = dt.date(2099, 12, 31)


class PeriodOutOfRange(ValueError):
    """A period naming a date before ``FIRST_DAY`` or after ``LAST_DAY``."""


def check_period(since: dt.date | None, until: dt.date | None) -> None:
    """Raise ``PeriodOutOfRange`` unless both ends lie between ``FIRST_DAY`` and ``LAST_DAY``."""
    for day in (since, until):
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise PeriodOutOfRange(f"{day.isoformat()} is outside {FIRST_DAY.isoformat()}…{LAST_DAY.isoformat()}")


def local_bounds(since: dt.date | None, until: dt.date | None, tz: ZoneInfo) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The period as UTC instants: from the start of ``since`` to the start of the day after ``until``."""
    start = dt.datetime.combine(since, dt.time(), tz).astimezone(dt.UTC) if since else None
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), tz).astimezone(dt.UTC) if until else None
    return start, end


def week_start(at: dt.datetime, tz: ZoneInfo) -> dt.date:
    """The Monday of the local week of ``at``."""
    day = at.astimezone(tz).date()
    return day - dt.timedelta(days=day.weekday())


def outcome_of(status: str) -> str:
    """What became of a request, for the weekly series: filled, unfilled, cancelled or open."""
    if status in FILLED:
        return "filled"
    if status == IllStatus.UNFILLED:
        return "unfilled"
    if status == IllStatus.CANCELLED:
        return "cancelled"
    return "open"


async def ill_figures(
    session: AsyncSession, since: dt.date | None, until: dt.date | None, tz: ZoneInfo, now: dt.datetime
) -> IllFigures:
    """The interlibrary loan figures of the period (backlog: as of ``now``)."""
    start, end = local_bounds(since, until, tz)
    query = select(
        IllRequest.kind, IllRequest.status, IllRequest.submitted_at, IllRequest.available_at, IllRequest.rating
    )
    if start is not None:
        query = query.where(IllRequest.submitted_at >= start)
    if end is not None:
        query = query.where(IllRequest.submitted_at < end)
    rows = (await session.execute(query)).all()

    figures = IllFigures(
        by_kind={k: 0 for k in KINDS},
        by_status={s.value: 0 for s in ORDER},
        backlog={key: 0 for key, _, _ in BACKLOG_BUCKETS},
    )
    weeks: dict[dt.date, dict[str, int]] = {}
    for kind, status, submitted_at, available_at, rating in rows:
        figures.total += 1
        figures.by_kind[kind] = figures.by_kind.get(kind, 0) + 1
        figures.by_status[status] = figures.by_status.get(status, 0) + 1
        outcome = outcome_of(status)
        if outcome == "filled":
            figures.filled += 1
            if available_at is not None:
                figures.turnaround_days.append((available_at - submitted_at).total_seconds() / 86400)
        elif outcome == "unfilled":
            figures.unfilled += 1
        elif outcome == "cancelled":
            figures.cancelled += 1
        if rating is not None and status == IllStatus.COMPLETED:
            figures.ratings.append(int(rating))
        counts = weeks.setdefault(week_start(submitted_at, tz), dict.fromkeys(OUTCOMES, 0))
        counts[outcome] += 1
    figures.weeks = _week_series(weeks, since, until, tz, now)

    open_rows = await session.scalars(
        select(IllRequest.submitted_at).where(IllRequest.status.not_in([s.value for s in CLOSED]))
    )
    for submitted_at in open_rows:
        age = (now - submitted_at).total_seconds() / 86400
        for key, low, high in BACKLOG_BUCKETS:
            if low <= age < high:
                figures.backlog[key] += 1
                break
        else:  # submitted "in the future" by a clock skew: the youngest bucket
            figures.backlog[BACKLOG_BUCKETS[0][0]] += 1
    return figures


def _week_series(
    weeks: dict[dt.date, dict[str, int]], since: dt.date | None, until: dt.date | None, tz: ZoneInfo, now: dt.datetime
) -> list[Week]:
    """Every week of the period in order, empty weeks included (the chart's axis has no gaps)."""
    if not weeks and (since is None or until is None):
        return []
    first = since - dt.timedelta(days=since.weekday()) if since else min(weeks)
    last_day = until or now.astimezone(tz).date()
    last = last_day - dt.timedelta(days=last_day.weekday())
    if weeks:
        last = max(last, max(weeks)) if until is None else last
    series: list[Week] = []
    monday = max(first, last - dt.timedelta(weeks=MAX_WEEKS - 1))
    while monday <= last:
        counts = weeks.get(monday, {})
        series.append(Week(monday, **{k: counts.get(k, 0) for k in OUTCOMES}))
        monday += dt.timedelta(weeks=1)
    return series


async def service_stats(
    session: AsyncSession, since: dt.date | None, until: dt.date | None, tz: ZoneInfo, now: dt.datetime,
    policy: Policy | None = None,
) -> StatsReport:
    """Every service figure for the period from ``since`` to ``until`` (local dates, both included);
    ``PeriodOutOfRange`` for a date outside ``FIRST_DAY``…``LAST_DAY``."""
    check_period(since, until)
    report = StatsReport(since, until, now, tz, await ill_figures(session, since, until, tz, now))
    report.events = await event_stats(session, *local_bounds(since, until, tz), now)
    if policy is not None:  # per partner library (names from the policy)
        report.partners = [
            f for f in await partner_figures(session, policy, *local_bounds(since, until, tz)) if f.borrowed or f.lent
        ]
    try:
        from storage.tickets import ticket_stats  # type: ignore[attr-defined]
    except ImportError:  # complaints are not installed in this build
        return report
    start, end = local_bounds(since, until, tz)
    report.tickets = await ticket_stats(session, start, end, now)
    from storage.reference import reference_stats  # the reference desk (#16)

    report.reference = await reference_stats(session, start, end)
    return report


LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Service statistics",
        "up_to": "up to {end}",
        "ill": "Interlibrary loan and document delivery",
        "requests": "Requests",
        "kind_loan": "book loans",
        "kind_copy": "article/chapter copies",
        "by_status": "By status",
        "status_submitted": "[[ill_submitted]]",
        "status_in_review": "[[ill_in_review]]",
        "status_requested": "[[ill_requested]]",
        "status_received": "[[ill_received]]",
        "status_available": "[[ill_available]]",
        "status_completed": "[[ill_completed]]",
        "status_unfilled": "[[ill_unfilled]]",
        "status_cancelled": "[[ill_cancelled]]",
        "fill_rate": "Fill rate",
        "fill_detail": "{rate} ({filled} filled of {decided} decided)",
        "none": "—",
        "turnaround": "[[turnaround]], submission to “[[ill_available]]”: average {avg} days, median {median} days (n = {n})",
        "turnaround_none": "[[turnaround]], submission to “[[ill_available]]”: — (no request filled yet)",
        "backlog": "Open backlog now, by age",
        "age_0-2d": "under 2 days",
        "age_2-7d": "2–7 days",
        "age_7-14d": "7–14 days",
        "age_14-30d": "14–30 days",
        "age_30d+": "over 30 days",
        "rating": "Satisfaction",
        "rating_detail": "{avg} / 5 (n = {n})",
        "no_ratings": "no ratings yet",
        "tickets": "[[tickets]]",
        "tickets_total": "Tickets",
        "by_category": "By category",
        "cat_service": "[[cat_service]]",
        "cat_environment": "[[cat_environment]]",
        "cat_facilities": "[[cat_facilities]]",
        "cat_collection": "[[cat_collection]]",
        "cat_digital": "[[cat_digital]]",
        "cat_suggestion": "[[cat_suggestion]]",
        "cat_other": "[[cat_other]]",
        "tstatus_new": "[[ticket_new]]",
        "tstatus_open": "[[ticket_open]]",
        "tstatus_waiting_on_reader": "[[ticket_waiting_on_reader]]",
        "tstatus_resolved": "[[ticket_resolved]]",
        "tstatus_closed": "[[ticket_closed]]",
        "first_response": "Median first response: {h}",
        "resolution": "Median resolution: {h}",
        "hours": "{v} hours",
        "sla_breaches": "First-response deadline missed",
        "sep": ", ",
        "colon": ": ",
    },
    "zh": {
        "title": "服务统计",
        "up_to": "截至 {end}",
        "ill": "馆际互借与文献传递",
        "requests": "请求总数",
        "kind_loan": "图书借阅",
        "kind_copy": "文献复制（文章/章节）",
        "by_status": "按状态",
        "status_submitted": "[[ill_submitted]]",
        "status_in_review": "[[ill_in_review]]",
        "status_requested": "[[ill_requested]]",
        "status_received": "[[ill_received]]",
        "status_available": "[[ill_available]]",
        "status_completed": "[[ill_completed]]",
        "status_unfilled": "[[ill_unfilled]]",
        "status_cancelled": "[[ill_cancelled]]",
        "fill_rate": "请求满足率",
        "fill_detail": "{rate}（已决 {decided} 件中满足 {filled} 件）",
        "none": "—",
        "turnaround": "[[turnaround]]（从提交到[[ill_available]]）：平均 {avg} 天，中位数 {median} 天（{n} 件）",
        "turnaround_none": "[[turnaround]]（从提交到[[ill_available]]）：—（尚无满足的请求）",
        "backlog": "当前未结请求（按等待时长）",
        "age_0-2d": "2 天内",
        "age_2-7d": "2–7 天",
        "age_7-14d": "7–14 天",
        "age_14-30d": "14–30 天",
        "age_30d+": "30 天以上",
        "rating": "满意度",
        "rating_detail": "{avg} / 5（{n} 个评分）",
        "no_ratings": "暂无评分",
        "tickets": "[[tickets]]",
        "tickets_total": "工单总数",
        "by_category": "按类别",
        "cat_service": "[[cat_service]]",
        "cat_environment": "[[cat_environment]]",
        "cat_facilities": "[[cat_facilities]]",
        "cat_collection": "[[cat_collection]]",
        "cat_digital": "[[cat_digital]]",
        "cat_suggestion": "[[cat_suggestion]]",
        "cat_other": "[[cat_other]]",
        "tstatus_new": "[[ticket_new]]",
        "tstatus_open": "[[ticket_open]]",
        "tstatus_waiting_on_reader": "[[ticket_waiting_on_reader]]",
        "tstatus_resolved": "[[ticket_resolved]]",
        "tstatus_closed": "[[ticket_closed]]",
        "first_response": "首次响应时间中位数：{h}",
        "resolution": "解决时间中位数：{h}",
        "hours": "{v} 小时",
        "sla_breaches": "超时未首次响应",
        "sep": "，",
        "colon": "：",
    },
}


# The statuses and terms above are the glossary's (bot/locales/glossary.toml, #20): the statistics
# name them as the rest of the bot does. It is data shared by every room, read here as a file.
_GLOSSARY: dict[str, dict[str, str]] = tomllib.loads(
    (Path(__file__).resolve().parents[1] / "bot" / "locales" / "glossary.toml").read_text(encoding="utf-8")
)


def _glossed(lang: str, text: str) -> str:
    return re.sub(r"\[\[(\w+)\]\]", lambda m: _GLOSSARY[m.group(1)][lang], text)


for _lang, _words in LABELS.items():
    for _key, _text in _words.items():
        _words[_key] = _glossed(_lang, _text)
