"""Service quality per staff member (读者评价、激励): every interaction a reader can rate, counted for
the staff member who handled it, and the monthly report.

Each source is one small function returning ``Interaction`` rows for a period:

- tickets: the staff member who claimed the ticket (``assignee_id``); its rating; first response
  from the ticket's creation; a ticket of category ``service`` is a complaint about service. The
  reader of an anonymous ticket is never read: only the staff side of the row.
- ILL requests: the staff member who handled the request (``handled_by``) and its rating.
- events: each attendee's rating (``event_feedback``) for the organising staff member.
- reference-desk conversations (``reference_conversations``: ``staff_id``, ``rating``, ``taken_at``,
  ``first_answer_at``, ``created_at``): read with plain SQL, and skipped when the table is absent.

Interactions are grouped by the staff member's Telegram id, not by the staff table, so a member
removed with ``staff remove`` keeps their history; their name is kept in ``staff_history``
(copied before the removal, and by every report and the survey job), else taken from the chat.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import statistics
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage import csv_export
from storage.db import Base, utcnow
from storage.events import Event, EventFeedback
from storage.ill import IllRequest
from storage.people import Role, StaffMember, User, add_staff
from storage.reference import DeskConversation
from storage.tickets import Ticket

RECOGNITION_MIN_RATINGS = 5
RECOGNITION_SIZE = 3
TREND_MONTHS = 6
COMPLAINT_CATEGORY = "service"
DEMO_ADMIN_ID = 9003  # the demo's admin persona (bot/demo.py)


class StaffRecord(Base):
    """The name a staff member had on the staff list, kept after they leave it (for the report)."""

    __tablename__ = "staff_history"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(256), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


async def remember_staff(session: AsyncSession, telegram_id: int | None = None) -> None:
    """Copy the staff list's names (or one member's) into the history, before anyone leaves it."""
    query = select(StaffMember)
    if telegram_id is not None:
        query = query.where(StaffMember.telegram_id == telegram_id)
    for member in await session.scalars(query):
        record = await session.get(StaffRecord, member.telegram_id)
        if record is None:
            session.add(StaffRecord(telegram_id=member.telegram_id, name=member.name))
        elif member.name and record.name != member.name:
            record.name, record.updated_at = member.name, utcnow()
    await session.flush()


@dataclass(frozen=True)
class Interaction:
    """One thing a staff member did for a reader, with the reader's rating if they gave one."""

    source: str  # ticket, ill, event, reference
    staff_id: int
    at: dt.datetime  # when it happened (the month it counts in)
    rating: int | None = None
    first_response: dt.timedelta | None = None
    complaint: bool = False


# --------------------------------------------------------------------------------------------------
# Sources


async def ticket_interactions(session: AsyncSession, start: dt.datetime, end: dt.datetime) -> list[Interaction]:
    """Tickets created in [start, end) and claimed by a staff member (never who wrote them)."""
    rows = await session.execute(
        select(Ticket.assignee_id, Ticket.created_at, Ticket.rating, Ticket.first_response_at, Ticket.category)
        .where(Ticket.assignee_id.is_not(None), Ticket.created_at >= start, Ticket.created_at < end)
    )
    return [
        Interaction("ticket", int(staff or 0), created, rating, first - created if first is not None else None, category == COMPLAINT_CATEGORY)
        for staff, created, rating, first, category in rows
    ]


async def ill_interactions(session: AsyncSession, start: dt.datetime, end: dt.datetime) -> list[Interaction]:
    """ILL requests submitted in [start, end) and handled by a staff member."""
    rows = await session.execute(
        select(IllRequest.handled_by, IllRequest.submitted_at, IllRequest.rating)
        .where(IllRequest.handled_by.is_not(None), IllRequest.submitted_at >= start, IllRequest.submitted_at < end)
    )
    return [Interaction("ill", int(staff or 0), at, rating) for staff, at, rating in rows]


async def event_interactions(session: AsyncSession, start: dt.datetime, end: dt.datetime) -> list[Interaction]:
    """Attendees' ratings given in [start, end), for the event's organiser."""
    rows = await session.execute(
        select(EventFeedback.organiser_staff_id, EventFeedback.rated_at, EventFeedback.rating)
        .where(EventFeedback.organiser_staff_id.is_not(None), EventFeedback.rated_at >= start, EventFeedback.rated_at < end)
    )
    return [Interaction("event", int(staff or 0), at, rating) for staff, at, rating in rows]


async def reference_interactions(session: AsyncSession, start: dt.datetime, end: dt.datetime) -> list[Interaction]:
    """Reference-desk conversations opened in [start, end) and taken by a staff member; first
    response from the moment they took it."""
    c = DeskConversation
    rows = await session.execute(
        select(c.staff_id, c.created_at, c.rating, c.taken_at, c.first_answer_at)
        .where(c.staff_id.is_not(None), c.created_at >= start, c.created_at < end)
    )
    return [
        Interaction("reference", int(staff or 0), at, rating, first - taken if first is not None and taken is not None else None)
        for staff, at, rating, taken, first in rows
    ]


Source = Callable[[AsyncSession, dt.datetime, dt.datetime], Awaitable[list[Interaction]]]
SOURCES: tuple[Source, ...] = (ticket_interactions, ill_interactions, event_interactions, reference_interactions)


async def interactions(session: AsyncSession, start: dt.datetime, end: dt.datetime) -> list[Interaction]:
    """Every interaction of every source in [start, end)."""
    found: list[Interaction] = []
    for source in SOURCES:
        found += await source(session, start, end)
    return found


# --------------------------------------------------------------------------------------------------
# Months


def parse_month(value: str) -> tuple[int, int]:
    """``2026-11`` as (2026, 11); ValueError for anything else."""
    year, _, month = value.strip().partition("-")
    if len(year) != 4 or not year.isdigit() or not month.isdigit() or not 1 <= int(month) <= 12:
        raise ValueError(f"not a month (YYYY-MM): {value!r}")
    return int(year), int(month)


def month_of(moment: dt.datetime, tz: ZoneInfo) -> tuple[int, int]:
    local = moment.astimezone(tz)
    return local.year, local.month


def shift(month: tuple[int, int], by: int) -> tuple[int, int]:
    index = month[0] * 12 + month[1] - 1 + by
    return index // 12, index % 12 + 1


def month_bounds(month: tuple[int, int], tz: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The month's first moment and the next month's, in UTC (the month as the library lives it)."""
    nxt = shift(month, 1)
    start = dt.datetime(month[0], month[1], 1, tzinfo=tz).astimezone(dt.UTC)
    return start, dt.datetime(nxt[0], nxt[1], 1, tzinfo=tz).astimezone(dt.UTC)


def label(month: tuple[int, int]) -> str:
    return f"{month[0]:04d}-{month[1]:02d}"


# --------------------------------------------------------------------------------------------------
# Figures


def median_duration(values: Sequence[dt.timedelta]) -> dt.timedelta | None:
    """The median of durations (None for none)."""
    if not values:
        return None
    return dt.timedelta(seconds=statistics.median(v.total_seconds() for v in values))


@dataclass
class Figures:
    """One staff member's (or the team's) figures for a period."""

    staff_id: int | None
    name: str = ""
    former: bool = False  # no longer on the staff
    interactions: int = 0
    ratings: int = 0
    average: float | None = None
    first_response: dt.timedelta | None = None  # median
    complaints: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


def figures(staff_id: int | None, rows: Sequence[Interaction]) -> Figures:
    """Counts, average rating, median first response and complaints of ``rows``."""
    ratings = [r.rating for r in rows if r.rating is not None]
    responses = [r.first_response for r in rows if r.first_response is not None]
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r.source] = by_source.get(r.source, 0) + 1
    return Figures(
        staff_id, interactions=len(rows), ratings=len(ratings), average=statistics.fmean(ratings) if ratings else None,
        first_response=median_duration(responses),
        complaints=sum(1 for r in rows if r.complaint), by_source=by_source,
    )


@dataclass
class TeamMedian:
    """The median staff member: the median of each member's own figures (nobody's own figures)."""

    members: int
    interactions: float | None
    average: float | None
    first_response: dt.timedelta | None


def team_median(staff: Sequence[Figures]) -> TeamMedian:
    averages = [f.average for f in staff if f.average is not None]
    responses = [f.first_response for f in staff if f.first_response is not None]
    return TeamMedian(
        len(staff), statistics.median([f.interactions for f in staff]) if staff else None,
        statistics.median(averages) if averages else None, median_duration(responses),
    )


def recognition(staff: Sequence[Figures], *, minimum: int = RECOGNITION_MIN_RATINGS, size: int = RECOGNITION_SIZE) -> list[Figures]:
    """The best-rated staff members with at least ``minimum`` ratings (ties: more ratings first)."""
    eligible = [f for f in staff if f.ratings >= minimum and f.average is not None]
    return sorted(eligible, key=lambda f: (-(f.average or 0), -f.ratings, f.staff_id or 0))[:size]


@dataclass
class QualityReport:
    month: tuple[int, int]
    staff: list[Figures]  # this month, by name
    team: Figures  # this month, everyone together
    median: TeamMedian
    trend: list[tuple[tuple[int, int], Figures]]  # the team, month by month, oldest first (ending with this month)
    recognition: list[Figures]

    @property
    def label(self) -> str:
        return label(self.month)

    def of(self, staff_id: int) -> Figures:
        """One staff member's figures (empty when they did nothing this month)."""
        return next((f for f in self.staff if f.staff_id == staff_id), Figures(staff_id))


async def staff_names(session: AsyncSession, ids: Iterable[int]) -> dict[int, tuple[str, bool]]:
    """Name and "former staff" flag of each id: the staff list's name, else the chat name, else the id."""
    wanted = set(ids)
    if not wanted:
        return {}
    members = {m.telegram_id: m.name for m in await session.scalars(select(StaffMember).where(StaffMember.telegram_id.in_(wanted)))}
    history = {r.telegram_id: r.name for r in await session.scalars(select(StaffRecord).where(StaffRecord.telegram_id.in_(wanted)))}
    users = {u.telegram_id: u.first_name for u in await session.scalars(select(User).where(User.telegram_id.in_(wanted)))}
    return {i: (members.get(i) or history.get(i) or users.get(i) or f"#{i}", i not in members) for i in wanted}


async def monthly_report(session: AsyncSession, month: tuple[int, int], tz: ZoneInfo, *, months: int = TREND_MONTHS) -> QualityReport:
    """The report of ``month``: per staff member, the team, the trend of the last ``months`` months
    and the recognition list."""
    first = shift(month, -(months - 1))
    start, _ = month_bounds(first, tz)
    _, end = month_bounds(month, tz)
    rows = await interactions(session, start, end)
    by_month: dict[tuple[int, int], list[Interaction]] = {}
    for r in rows:
        by_month.setdefault(month_of(r.at, tz), []).append(r)
    this = by_month.get(month, [])
    per_staff: dict[int, list[Interaction]] = {}
    for r in this:
        per_staff.setdefault(r.staff_id, []).append(r)
    names = await staff_names(session, per_staff)
    staff = []
    for staff_id, mine in per_staff.items():
        f = figures(staff_id, mine)
        f.name, f.former = names[staff_id]
        staff.append(f)
    staff.sort(key=lambda f: (f.name.lower(), f.staff_id or 0))
    trend = [(m, figures(None, by_month.get(m, []))) for m in (shift(first, i) for i in range(months))]
    return QualityReport(month, staff, figures(None, this), team_median(staff), trend, recognition(staff))


def minutes(delta: dt.timedelta | None) -> str:
    """A duration in whole minutes, for reports ("" when unknown)."""
    return "" if delta is None else str(round(delta.total_seconds() / 60))


def report_csv(report: QualityReport) -> str:
    """The report as CSV: one row per staff member, then the team by month, then the recognition list."""
    out = io.StringIO()
    w = csv_export.writer(out)
    w.writerow(["section", "month", "staff_id", "name", "former_staff", "interactions", "ratings", "average_rating",
                "first_response_minutes", "service_complaints", "tickets", "ill", "events", "reference"])

    def row(section: str, month: tuple[int, int], f: Figures) -> None:
        w.writerow([section, label(month), f.staff_id or "", f.name, "yes" if f.former else "", f.interactions, f.ratings,
                    "" if f.average is None else f"{f.average:.2f}", minutes(f.first_response), f.complaints,
                    *(f.by_source.get(s, 0) for s in ("ticket", "ill", "event", "reference"))])

    for f in report.staff:
        row("staff", report.month, f)
    for m, f in report.trend:
        row("team", m, f)
    for f in report.recognition:
        row("recognition", report.month, f)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# Demo


async def seed_demo(session: AsyncSession, policy: Any, now: dt.datetime, rng: random.Random, reader_ids: Iterable[int]) -> None:
    """A month of sample ratings: tickets handled and rated by the demo staff (and two colleagues),
    and ratings of an event that took place, so /quality and /myratings show something real."""
    from storage.events import EventRegistration, RegStatus

    colleagues = {9001: "Li Na (staff)", 9101: "Wang Fang", 9102: "Chen Jie", DEMO_ADMIN_ID: "Sun Wei (admin)"}
    for telegram_id, name in colleagues.items():
        if await session.get(User, telegram_id) is None:
            session.add(User(telegram_id=telegram_id, first_name=name.split(" (")[0], telegram_language="zh"))
    await session.flush()
    # Colleagues who handled tickets (Chen Jie has since left the staff), and the admin who reads the report.
    for telegram_id, role in ((9101, Role.STAFF), (DEMO_ADMIN_ID, Role.ADMIN)):
        if await session.get(StaffMember, telegram_id) is None:
            await add_staff(session, telegram_id, role, colleagues[telegram_id])
    categories = ("service", "environment", "facilities", "collection", "digital", "suggestion")
    weights = {9001: (4, 5, 5, 5, 3), 9101: (3, 4, 4, 5, 5), 9102: (2, 3, 4, 4, 5)}
    tz = ZoneInfo("Asia/Shanghai")
    this_month = month_of(now, tz)
    for back in range(TREND_MONTHS - 1, -1, -1):  # the trend's months, and this month so far
        start, end = month_bounds(shift(this_month, -back), tz)
        span = (min(end, now) - start).total_seconds()
        for staff_id, choices in weights.items():
            for _ in range(rng.randint(8, 12)):
                created = start + dt.timedelta(seconds=rng.uniform(0, span * 0.9))
                first = created + dt.timedelta(minutes=rng.randint(5, 240))
                session.add(Ticket(
                    category=rng.choice(categories), text="(demo)", anonymous=rng.random() < 0.2, requester_id=None,
                    status="closed", assignee_id=staff_id, created_at=created, respond_by=created + dt.timedelta(hours=24),
                    claimed_at=first, first_response_at=first, resolved_at=first, closed_at=first, closed_reason="rated",
                    rating=rng.choice(choices),
                ))
    ended = max(now - dt.timedelta(days=10), month_bounds(this_month, tz)[0] + dt.timedelta(hours=3))
    event = Event(title_zh="读书会：《红楼梦》", title_en="Reading circle: Dream of the Red Chamber", place="3F", category="reading",
                  starts_at=ended - dt.timedelta(hours=2), ends_at=ended, capacity=0, organiser_staff_id=9001,
                  created_at=ended - dt.timedelta(days=20), updated_at=ended - dt.timedelta(days=20))
    session.add(event)
    await session.flush()
    for number in range(8):
        reg = EventRegistration(event_id=event.id, telegram_id=-(200000 + number), status=RegStatus.REGISTERED,
                                code=f"DEMO{number:02d}", registered_at=event.created_at, checked_in_at=event.starts_at)
        session.add(reg)
        await session.flush()
        session.add(EventFeedback(registration_id=reg.id, event_id=event.id, organiser_staff_id=9001,
                                  rating=rng.choice((4, 5, 5)), rated_at=ended + dt.timedelta(hours=1)))
