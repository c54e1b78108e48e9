"""Events and programmes (活动报名): events, registrations with a waiting list, reminders, check-in
codes, feedback, category subscriptions and the statistics.

Seats are counted on the event row (``seats_taken``) and taken with one conditional UPDATE
(``… WHERE capacity = 0 OR seats_taken < capacity``): of two readers taking the last seat at the
same moment exactly one gets it, on SQLite (writers are serialised) as on PostgreSQL (the second
UPDATE waits for the first's row lock and re-checks the condition). Whoever does not get a seat
joins the waiting list; a seat that frees (a cancellation, a larger capacity) goes to the first on
the list, who is told at once.

Every message to a person is an outbox row written in the same transaction as the change. The
reminders (24 hours and 2 hours before the start) and the feedback requests carry a ``dedupe_key``
naming the registration and the start time, so a restart or a second process never sends one
twice, and a new start time gets its own reminders.

Feedback ratings are stored with ``organiser_staff_id``, the staff member responsible for the event
at the time of the rating (for the per-staff quality reports).
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
import random
import secrets
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage import csv_export
from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue
from storage.people import StaffMember, User, reader_of
from storage.policy import Policy

CATEGORIES = ("lecture", "training", "exhibition", "culture", "children", "workshop", "reading", "other")
AUDIENCES = ("everyone", "readers")
CSV_COLUMNS = (
    "title_zh", "title_en", "description_zh", "description_en", "starts_at", "ends_at", "place",
    "capacity", "category", "audience", "registration_opens", "registration_closes",
)
REMINDERS = (("24h", dt.timedelta(hours=24)), ("2h", dt.timedelta(hours=2)))
CHECKIN_EARLY = dt.timedelta(hours=2)  # check-in opens this long before the start
FEEDBACK_WINDOW = dt.timedelta(days=7)  # feedback is asked for and accepted this long after the end
CODE_ALPHABET = "ACDEFGHJKMNPQRTUVWXY34679"  # no 0/O, 1/I/L, 2/Z, 5/S, 8/B: read aloud at the door
CODE_LENGTH = 6
ANNOUNCE_SPACING = dt.timedelta(seconds=1)  # new-event news to subscribers: a polite, steady trickle
MAX_TITLE = 200
MAX_DESCRIPTION = 2000
MAX_COMMENT = 1000


class EventStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    CANCELLED = "cancelled"


class RegStatus(enum.StrEnum):
    REGISTERED = "registered"  # has a seat
    WAITLISTED = "waitlisted"  # on the waiting list
    CANCELLED = "cancelled"  # by the reader, or with the event


# --------------------------------------------------------------------------------------------------
# Models


class Event(Base):
    """One programme: a lecture, a workshop, a story hour, an exhibition opening…"""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_status_starts", "status", "starts_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    title_zh: Mapped[str] = mapped_column(String(MAX_TITLE))
    title_en: Mapped[str] = mapped_column(String(MAX_TITLE))
    description_zh: Mapped[str] = mapped_column(Text, default="")
    description_en: Mapped[str] = mapped_column(Text, default="")
    starts_at: Mapped[dt.datetime]
    ends_at: Mapped[dt.datetime]
    place: Mapped[str] = mapped_column(String(128))  # a code of policy.library.places, or free text
    capacity: Mapped[int] = mapped_column(default=0)  # 0 = no limit
    seats_taken: Mapped[int] = mapped_column(default=0)
    category: Mapped[str] = mapped_column(String(32))
    audience: Mapped[str] = mapped_column(String(16), default="everyone")
    registration_opens: Mapped[dt.datetime | None]
    registration_closes: Mapped[dt.datetime | None]  # None: until the start
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.SCHEDULED)
    organiser_staff_id: Mapped[int | None] = mapped_column(index=True)  # the staff member responsible
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[dt.datetime | None]

    def title(self) -> dict[str, str]:
        return {"zh": self.title_zh or self.title_en, "en": self.title_en or self.title_zh}

    def description(self) -> dict[str, str]:
        return {"zh": self.description_zh or self.description_en, "en": self.description_en or self.description_zh}

    def seats_left(self) -> int | None:
        """Free seats; None for an event without a limit."""
        return None if self.capacity == 0 else max(0, self.capacity - self.seats_taken)


class EventRegistration(Base):
    """One person's place at an event (a seat or a place on the waiting list), with its check-in code."""

    __tablename__ = "event_registrations"
    __table_args__ = (
        UniqueConstraint("event_id", "telegram_id", name="uq_event_registrations_person"),
        Index("ix_event_registrations_queue", "event_id", "status", "queued_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    telegram_id: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(256), default="")  # for the staff's list of registrants
    status: Mapped[str] = mapped_column(String(16))
    code: Mapped[str] = mapped_column(String(16), unique=True)
    queued_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # order of the waiting list
    registered_at: Mapped[dt.datetime | None]  # when the seat was had (directly or by promotion)
    promoted_at: Mapped[dt.datetime | None]  # from the waiting list to a seat
    cancelled_at: Mapped[dt.datetime | None]
    checked_in_at: Mapped[dt.datetime | None]
    checked_in_by: Mapped[int | None]


class EventFeedback(Base):
    """An attendee's 1–5 rating of an event, with the staff member responsible for it."""

    __tablename__ = "event_feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    registration_id: Mapped[int] = mapped_column(ForeignKey("event_registrations.id", ondelete="CASCADE"), unique=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    organiser_staff_id: Mapped[int | None] = mapped_column(index=True)
    rating: Mapped[int]
    comment: Mapped[str | None] = mapped_column(Text)
    rated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class EventSubscription(Base):
    """A person who wants to hear about new events of a category."""

    __tablename__ = "event_subscriptions"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    category: Mapped[str] = mapped_column(String(32), primary_key=True)


# --------------------------------------------------------------------------------------------------
# Pure rules


def new_code(rng: random.Random | None = None) -> str:
    """A short check-in code such as ``K7QX3M`` (unambiguous letters and digits)."""
    pick = rng.choice if rng is not None else secrets.choice
    return "".join(pick(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(text: str) -> str:
    """A code as typed at the door (spaces, dashes, lower case) in its stored form."""
    return "".join(ch for ch in text.upper() if ch.isalnum())


class Closed(enum.StrEnum):
    NOT_YET = "not_yet"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    STARTED = "started"


def registration_closed(event: Event, now: dt.datetime) -> Closed | None:
    """Why nobody can register for ``event`` now (None when they can)."""
    if event.status == EventStatus.CANCELLED:
        return Closed.CANCELLED
    if now >= event.starts_at:
        return Closed.STARTED
    if event.registration_opens is not None and now < event.registration_opens:
        return Closed.NOT_YET
    if event.registration_closes is not None and now >= event.registration_closes:
        return Closed.CLOSED
    return None


def place_name(policy: Policy, code: str) -> dict[str, str] | str:
    """A place as a bilingual parameter (free text as it is)."""
    for place in policy.library.places:
        if place.code == code:
            return {"zh": place.name_zh, "en": place.name_en}
    return code


def local_time(when: dt.datetime, tz: ZoneInfo) -> str:
    """``2026-12-10 19:00`` in the library's time zone."""
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def when_text(event: Event, tz: ZoneInfo) -> str:
    """``2026-12-10 19:00–21:00`` (the end's date too when it is another day)."""
    start, end = event.starts_at.astimezone(tz), event.ends_at.astimezone(tz)
    tail = end.strftime("%H:%M") if end.date() == start.date() else end.strftime("%Y-%m-%d %H:%M")
    return f"{start.strftime('%Y-%m-%d %H:%M')}–{tail}"


def _ics_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\r\n", "\\n").replace("\n", "\\n")


def _fold(line: str) -> list[str]:
    """RFC 5545 line folding: at most 75 octets per line, continuation lines start with a space."""
    out: list[str] = []
    current = ""
    for ch in line:
        limit = 75 if not out else 74
        if len((current + ch).encode("utf-8")) > limit:
            out.append(current)
            current = ch
        else:
            current += ch
    out.append(current)
    return [out[0], *(" " + part for part in out[1:])]


def ics(event: Event, lang: str, place: str, *, host: str = "librarybot") -> bytes:
    """The event as an iCalendar file (RFC 5545) for the phone's calendar, in ``lang``."""
    stamp = "%Y%m%dT%H%M%SZ"
    title = event.title()[lang] if lang in ("zh", "en") else event.title_en
    lines = [
        "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//librarybot//events//EN", "CALSCALE:GREGORIAN", "METHOD:PUBLISH",
        "BEGIN:VEVENT",
        f"UID:event-{event.id}@{host}",
        f"DTSTAMP:{event.updated_at.astimezone(dt.UTC).strftime(stamp)}",
        f"DTSTART:{event.starts_at.astimezone(dt.UTC).strftime(stamp)}",
        f"DTEND:{event.ends_at.astimezone(dt.UTC).strftime(stamp)}",
        f"SUMMARY:{_ics_text(title)}",
        f"LOCATION:{_ics_text(place)}",
        f"DESCRIPTION:{_ics_text(event.description()[lang] if lang in ('zh', 'en') else event.description_en)}",
        "STATUS:" + ("CANCELLED" if event.status == EventStatus.CANCELLED else "CONFIRMED"),
        "END:VEVENT", "END:VCALENDAR",
    ]
    return ("\r\n".join(part for line in lines for part in _fold(line)) + "\r\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------
# Creating and changing events


class EventProblem(enum.StrEnum):
    NO_TITLE = "no_title"
    TITLE_TOO_LONG = "title_too_long"
    DESCRIPTION_TOO_LONG = "description_too_long"
    ENDS_BEFORE_START = "ends_before_start"
    BAD_CAPACITY = "bad_capacity"
    BAD_CATEGORY = "bad_category"
    BAD_AUDIENCE = "bad_audience"
    NO_PLACE = "no_place"
    BAD_WINDOW = "bad_window"


@dataclass
class EventDraft:
    """What an event is made of, before it is stored (from the chat or a CSV row)."""

    title_zh: str
    title_en: str
    starts_at: dt.datetime
    ends_at: dt.datetime
    place: str
    category: str
    description_zh: str = ""
    description_en: str = ""
    capacity: int = 0
    audience: str = "everyone"
    registration_opens: dt.datetime | None = None
    registration_closes: dt.datetime | None = None

    def problem(self) -> EventProblem | None:
        """What is wrong with the draft (None when it can be stored)."""
        if not (self.title_zh.strip() or self.title_en.strip()):
            return EventProblem.NO_TITLE
        if max(len(self.title_zh), len(self.title_en)) > MAX_TITLE:
            return EventProblem.TITLE_TOO_LONG
        if max(len(self.description_zh), len(self.description_en)) > MAX_DESCRIPTION:
            return EventProblem.DESCRIPTION_TOO_LONG
        if self.ends_at <= self.starts_at:
            return EventProblem.ENDS_BEFORE_START
        if self.capacity < 0:
            return EventProblem.BAD_CAPACITY
        if self.category not in CATEGORIES:
            return EventProblem.BAD_CATEGORY
        if self.audience not in AUDIENCES:
            return EventProblem.BAD_AUDIENCE
        if not self.place.strip():
            return EventProblem.NO_PLACE
        opens, closes = self.registration_opens, self.registration_closes
        if (opens and closes and opens >= closes) or (opens and opens >= self.starts_at) or (closes and closes > self.starts_at):
            return EventProblem.BAD_WINDOW
        return None


@dataclass(frozen=True)
class Created:
    event: Event | None = None
    problem: EventProblem | None = None
    announced: int = 0  # subscribers told


async def create_event(
    session: AsyncSession, draft: EventDraft, *, now: dt.datetime, tz: ZoneInfo, policy: Policy, organiser_staff_id: int | None = None
) -> Created:
    """Store a new event and tell the subscribers of its category (through the outbox, spaced out)."""
    problem = draft.problem()
    if problem is not None:
        return Created(problem=problem)
    event = Event(
        title_zh=draft.title_zh.strip(), title_en=draft.title_en.strip(),
        description_zh=draft.description_zh.strip(), description_en=draft.description_en.strip(),
        starts_at=draft.starts_at, ends_at=draft.ends_at, place=draft.place.strip(), capacity=draft.capacity,
        category=draft.category, audience=draft.audience, registration_opens=draft.registration_opens,
        registration_closes=draft.registration_closes, organiser_staff_id=organiser_staff_id,
        created_at=now, updated_at=now,
    )
    session.add(event)
    await session.flush()
    announced = await announce(session, event, now=now, tz=tz, policy=policy)
    return Created(event=event, announced=announced)


async def announce(session: AsyncSession, event: Event, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> int:
    """Queue the news of ``event`` to the subscribers of its category, one second apart, at bulk
    priority (a new event is never urgent); each subscriber at most once."""
    query = select(EventSubscription.telegram_id).where(EventSubscription.category == event.category)
    if event.audience == "readers":
        query = query.join(User, User.telegram_id == EventSubscription.telegram_id).where(User.reader_id.is_not(None))
    told = 0
    for telegram_id in sorted(await session.scalars(query)):
        queued = await enqueue(
            session, telegram_id, "events.push_new", _params(event, tz, policy), kind="event", priority=Priority.BULK,
            buttons=[[["events.btn_details", f"ev:d:{event.id}"]]], dedupe_key=f"ev:{event.id}:new:{telegram_id}",
            not_before=now + ANNOUNCE_SPACING * told,
        )
        told += queued is not None
    return told


def _params(event: Event, tz: ZoneInfo, policy: Policy) -> dict[str, Any]:
    return {"title": event.title(), "when": when_text(event, tz), "place": place_name(policy, event.place)}


async def get_event(session: AsyncSession, event_id: int) -> Event | None:
    """The event with this id, if any."""
    return await session.get(Event, event_id)


@dataclass(frozen=True)
class Changed:
    event: Event | None
    told: int = 0  # registrants told of the change


async def change_event(
    session: AsyncSession,
    event_id: int,
    *,
    now: dt.datetime,
    tz: ZoneInfo,
    policy: Policy,
    starts_at: dt.datetime | None = None,
    ends_at: dt.datetime | None = None,
    place: str | None = None,
    capacity: int | None = None,
) -> Changed:
    """Change an event's time, place or capacity. A new time or place is told to every registrant
    (and everyone waiting); a larger capacity gives the new seats to the waiting list."""
    event = await session.get(Event, event_id, with_for_update=True)
    if event is None or event.status != EventStatus.SCHEDULED:
        return Changed(None)
    new_start = starts_at or event.starts_at
    new_end = ends_at or (event.ends_at + (new_start - event.starts_at) if starts_at else event.ends_at)
    if new_end <= new_start or (capacity is not None and capacity < 0):
        return Changed(None)
    moved = new_start != event.starts_at or new_end != event.ends_at or (place is not None and place != event.place)
    event.starts_at, event.ends_at = new_start, new_end
    if event.registration_closes is not None and event.registration_closes > new_start:
        event.registration_closes = new_start
    if place is not None:
        event.place = place
    if capacity is not None:
        event.capacity = capacity
    event.updated_at = now
    await session.flush()
    told = 0
    if moved:
        for reg in await _active(session, event.id):
            await enqueue(
                session, reg.telegram_id, "events.push_changed", _params(event, tz, policy), kind="event",
                priority=Priority.NORMAL, buttons=[[["events.btn_details", f"ev:d:{event.id}"]]],
            )
            told += 1
    if capacity is not None:
        await fill_seats(session, event, now=now, tz=tz, policy=policy)
    return Changed(event, told)


async def cancel_event(session: AsyncSession, event_id: int, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> Changed:
    """Cancel an event and tell everyone registered or waiting; None when there is nothing to cancel."""
    done = await session.execute(
        update(Event)
        .where(Event.id == event_id, Event.status == EventStatus.SCHEDULED)
        .values(status=EventStatus.CANCELLED, cancelled_at=now, updated_at=now)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return Changed(None)
    event = await session.get(Event, event_id, populate_existing=True)
    assert event is not None
    told = 0
    for reg in await _active(session, event_id):
        reg.status, reg.cancelled_at = RegStatus.CANCELLED, now
        await enqueue(session, reg.telegram_id, "events.push_cancelled", _params(event, tz, policy), kind="event", priority=Priority.NORMAL)
        told += 1
    return Changed(event, told)


async def _active(session: AsyncSession, event_id: int) -> list[EventRegistration]:
    query = select(EventRegistration).where(
        EventRegistration.event_id == event_id,
        EventRegistration.status.in_((RegStatus.REGISTERED, RegStatus.WAITLISTED)),
    ).order_by(EventRegistration.id)
    return list(await session.scalars(query))


# --------------------------------------------------------------------------------------------------
# Listing


async def upcoming(session: AsyncSession, now: dt.datetime, category: str | None = None) -> list[Event]:
    """Events not yet ended and not cancelled, soonest first (optionally of one category)."""
    query = select(Event).where(Event.status == EventStatus.SCHEDULED, Event.ends_at > now)
    if category:
        query = query.where(Event.category == category)
    return list(await session.scalars(query.order_by(Event.starts_at, Event.id)))


async def all_events(session: AsyncSession) -> list[Event]:
    """Every event, soonest first (``librarybot events list``)."""
    return list(await session.scalars(select(Event).order_by(Event.starts_at, Event.id)))


async def registration_of(session: AsyncSession, event_id: int, telegram_id: int) -> EventRegistration | None:
    """The person's registration for the event (active or cancelled), if any."""
    return await session.scalar(
        select(EventRegistration).where(EventRegistration.event_id == event_id, EventRegistration.telegram_id == telegram_id)
    )


async def waiting_position(session: AsyncSession, reg: EventRegistration) -> int:
    """1 for the first on the waiting list."""
    ahead = await session.scalar(
        select(func.count()).select_from(EventRegistration).where(
            EventRegistration.event_id == reg.event_id,
            EventRegistration.status == RegStatus.WAITLISTED,
            or_(EventRegistration.queued_at < reg.queued_at,
                (EventRegistration.queued_at == reg.queued_at) & (EventRegistration.id < reg.id)),
        )
    )
    return int(ahead or 0) + 1


async def my_registrations(session: AsyncSession, telegram_id: int, now: dt.datetime) -> list[tuple[EventRegistration, Event]]:
    """The person's active registrations of events not yet ended, soonest first."""
    rows = await session.execute(
        select(EventRegistration, Event)
        .join(Event, Event.id == EventRegistration.event_id)
        .where(
            EventRegistration.telegram_id == telegram_id,
            EventRegistration.status.in_((RegStatus.REGISTERED, RegStatus.WAITLISTED)),
            Event.ends_at > now,
        )
        .order_by(Event.starts_at, Event.id)
    )
    return [(reg, event) for reg, event in rows]


async def registrants(session: AsyncSession, event_id: int) -> list[EventRegistration]:
    """Everyone registered or waiting (and who cancelled), for staff: seats first, then the waiting list."""
    rows = list(await session.scalars(select(EventRegistration).where(EventRegistration.event_id == event_id)))
    order = {RegStatus.REGISTERED: 0, RegStatus.WAITLISTED: 1, RegStatus.CANCELLED: 2}
    return sorted(rows, key=lambda r: (order[RegStatus(r.status)], r.queued_at, r.id))


def registrants_csv(event: Event, rows: Sequence[EventRegistration], tz: ZoneInfo) -> str:
    """The registrants of an event as CSV (for the door list and the organiser)."""
    out = io.StringIO()
    writer = csv_export.writer(out, lineterminator="\n")
    writer.writerow(["event_id", "title", "name", "telegram_id", "status", "code", "registered_at", "promoted", "checked_in_at"])
    for reg in rows:
        writer.writerow([
            event.id, event.title_zh or event.title_en, reg.name, reg.telegram_id, reg.status, reg.code,
            local_time(reg.registered_at, tz) if reg.registered_at else "",
            "yes" if reg.promoted_at else "", local_time(reg.checked_in_at, tz) if reg.checked_in_at else "",
        ])
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# Registering, cancelling, the waiting list


class Outcome(enum.StrEnum):
    REGISTERED = "registered"
    WAITLISTED = "waitlisted"
    ALREADY = "already"
    NOT_FOUND = "not_found"
    READERS_ONLY = "readers_only"
    NOT_YET = "not_yet"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    STARTED = "started"


@dataclass(frozen=True)
class Registration:
    outcome: Outcome
    registration: EventRegistration | None = None
    position: int | None = None  # on the waiting list


async def _take_seat(session: AsyncSession, event_id: int) -> bool:
    """Take one seat if one is free: the single statement that decides a race for the last seat."""
    taken = await session.execute(
        update(Event)
        .where(Event.id == event_id, Event.status == EventStatus.SCHEDULED,
               or_(Event.capacity == 0, Event.seats_taken < Event.capacity))
        .values(seats_taken=Event.seats_taken + 1)
        .execution_options(synchronize_session=False)
    )
    return bool(taken.rowcount == 1)  # type: ignore[attr-defined]


async def _free_seat(session: AsyncSession, event_id: int) -> None:
    await session.execute(
        update(Event).where(Event.id == event_id, Event.seats_taken > 0)
        .values(seats_taken=Event.seats_taken - 1).execution_options(synchronize_session=False)
    )


async def register(
    session: AsyncSession, event_id: int, telegram_id: int, *, name: str, is_reader: bool, now: dt.datetime
) -> Registration:
    """Register ``telegram_id`` for the event: a seat when one is free, otherwise the waiting list.

    One registration per person and event (a unique constraint: a double press registers once); a
    person who cancelled may register again, at the end of the queue. ``name`` is kept for the
    staff's door list (the name on the linked card replaces it).
    """
    event = await session.get(Event, event_id)
    if event is None:
        return Registration(Outcome.NOT_FOUND)
    if event.audience == "readers" and not is_reader:
        return Registration(Outcome.READERS_ONLY)
    closed = registration_closed(event, now)
    if closed is not None:
        return Registration(Outcome(closed.value))
    card = await reader_of(session, telegram_id)
    name = card.name if card is not None else name  # the door list shows the name on the card
    reg = await registration_of(session, event_id, telegram_id)
    if reg is not None and reg.status != RegStatus.CANCELLED:
        return Registration(Outcome.ALREADY, reg, await waiting_position(session, reg) if reg.status == RegStatus.WAITLISTED else None)
    if reg is None:
        reg = EventRegistration(event_id=event_id, telegram_id=telegram_id, name=name[:256], status=RegStatus.WAITLISTED,
                                code=new_code(), queued_at=now)
        try:
            async with session.begin_nested():
                session.add(reg)
        except IntegrityError:  # the same person's other press won, or (very rarely) a code collided
            session.expunge(reg)
            other = await registration_of(session, event_id, telegram_id)
            if other is not None:
                return Registration(Outcome.ALREADY, other)
            reg = EventRegistration(event_id=event_id, telegram_id=telegram_id, name=name[:256], status=RegStatus.WAITLISTED,
                                    code=new_code(), queued_at=now)
            session.add(reg)
            await session.flush()
    else:
        reg.status, reg.queued_at, reg.cancelled_at, reg.promoted_at, reg.registered_at = RegStatus.WAITLISTED, now, None, None, None
        reg.name = name[:256]
    if await _take_seat(session, event_id):
        reg.status, reg.registered_at = RegStatus.REGISTERED, now
        await session.flush()
        return Registration(Outcome.REGISTERED, reg)
    await session.flush()
    return Registration(Outcome.WAITLISTED, reg, await waiting_position(session, reg))


async def cancel_registration(
    session: AsyncSession, event_id: int, telegram_id: int, *, now: dt.datetime, tz: ZoneInfo, policy: Policy
) -> EventRegistration | None:
    """Cancel a person's registration (seat or waiting list); a freed seat goes to the first waiting,
    who is told at once. None when there was nothing to cancel."""
    reg = await registration_of(session, event_id, telegram_id)
    if reg is None:
        return None
    was = reg.status
    done = await session.execute(
        update(EventRegistration)
        .where(EventRegistration.id == reg.id, EventRegistration.status == was, EventRegistration.status != RegStatus.CANCELLED)
        .values(status=RegStatus.CANCELLED, cancelled_at=now)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    await session.refresh(reg)
    if was == RegStatus.REGISTERED:
        await _free_seat(session, event_id)
        event = await session.get(Event, event_id, populate_existing=True)
        if event is not None and event.status == EventStatus.SCHEDULED and now < event.starts_at:
            await fill_seats(session, event, now=now, tz=tz, policy=policy)
    return reg


async def fill_seats(session: AsyncSession, event: Event, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> list[EventRegistration]:
    """Give the free seats to the waiting list in order, telling each promoted person at once."""
    promoted: list[EventRegistration] = []
    while True:
        first = await session.scalar(
            select(EventRegistration)
            .where(EventRegistration.event_id == event.id, EventRegistration.status == RegStatus.WAITLISTED)
            .order_by(EventRegistration.queued_at, EventRegistration.id)
            .limit(1)
        )
        if first is None or not await _take_seat(session, event.id):
            break
        moved = await session.execute(
            update(EventRegistration)
            .where(EventRegistration.id == first.id, EventRegistration.status == RegStatus.WAITLISTED)
            .values(status=RegStatus.REGISTERED, promoted_at=now, registered_at=now)
            .execution_options(synchronize_session=False)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            await _free_seat(session, event.id)  # they left the list meanwhile: try the next one
            continue
        await session.refresh(first)
        await enqueue(
            session, first.telegram_id, "events.push_promoted", {**_params(event, tz, policy), "code": first.code},
            kind="event", priority=Priority.NORMAL, buttons=[[["events.btn_details", f"ev:d:{event.id}"]]],
        )
        promoted.append(first)
    await session.refresh(event)
    return promoted


# --------------------------------------------------------------------------------------------------
# Check-in


class CheckIn(enum.StrEnum):
    CHECKED_IN = "checked_in"
    ALREADY = "already"
    UNKNOWN = "unknown"
    NOT_REGISTERED = "not_registered"  # waiting list or cancelled
    EVENT_CANCELLED = "event_cancelled"
    TOO_EARLY = "too_early"
    OVER = "over"


@dataclass(frozen=True)
class CheckInResult:
    outcome: CheckIn
    registration: EventRegistration | None = None
    event: Event | None = None


async def check_in(session: AsyncSession, code: str, *, staff_id: int, now: dt.datetime) -> CheckInResult:
    """Mark the attendance of the registration with this code (from two hours before the start to the end)."""
    reg = await session.scalar(select(EventRegistration).where(EventRegistration.code == normalise_code(code)))
    if reg is None:
        return CheckInResult(CheckIn.UNKNOWN)
    event = await session.get(Event, reg.event_id)
    assert event is not None
    if event.status == EventStatus.CANCELLED:
        return CheckInResult(CheckIn.EVENT_CANCELLED, reg, event)
    if reg.status != RegStatus.REGISTERED:
        return CheckInResult(CheckIn.NOT_REGISTERED, reg, event)
    if reg.checked_in_at is not None:
        return CheckInResult(CheckIn.ALREADY, reg, event)
    if now < event.starts_at - CHECKIN_EARLY:
        return CheckInResult(CheckIn.TOO_EARLY, reg, event)
    if now > event.ends_at:
        return CheckInResult(CheckIn.OVER, reg, event)
    done = await session.execute(
        update(EventRegistration).where(EventRegistration.id == reg.id, EventRegistration.checked_in_at.is_(None))
        .values(checked_in_at=now, checked_in_by=staff_id).execution_options(synchronize_session=False)
    )
    await session.refresh(reg)
    return CheckInResult(CheckIn.CHECKED_IN if done.rowcount == 1 else CheckIn.ALREADY, reg, event)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Reminders and feedback requests (the job; idempotent)


async def queue_reminders(session: AsyncSession, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> int:
    """Queue the 24-hour and 2-hour reminders that are due; the number queued.

    A reminder is due from its moment until the start; only the latest due one is sent (someone who
    registers an hour before the start gets the 2-hour one, not both). The dedupe key holds the
    registration and the start time: sent once across restarts and processes, again after a move.
    """
    queued = 0
    horizon = now + max(delta for _, delta in REMINDERS)
    rows = await session.execute(
        select(EventRegistration, Event)
        .join(Event, Event.id == EventRegistration.event_id)
        .where(Event.status == EventStatus.SCHEDULED, Event.starts_at > now, Event.starts_at <= horizon,
               EventRegistration.status == RegStatus.REGISTERED)
        .order_by(Event.starts_at, EventRegistration.id)
    )
    for reg, event in rows:
        due = [(name, delta) for name, delta in REMINDERS if now >= event.starts_at - delta]
        name, _ = min(due, key=lambda item: item[1])
        stamp = int(event.starts_at.timestamp())
        done = await enqueue(
            session, reg.telegram_id, f"events.push_reminder_{name}", {**_params(event, tz, policy), "code": reg.code},
            kind="event", priority=Priority.NORMAL, dedupe_key=f"ev:{event.id}:rem{name}:{reg.id}:{stamp}",
            buttons=[[["events.btn_details", f"ev:d:{event.id}"]]],
        )
        queued += done is not None
    return queued


def rating_buttons(registration_id: int) -> list[list[list[Any]]]:
    """The 1–5 buttons of a feedback request (outbox button rows)."""
    return [[[f"={n} ★", f"ev:rate:{registration_id}:{n}"] for n in range(1, 6)]]


async def queue_feedback_requests(session: AsyncSession, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> int:
    """Ask each attendee of an event that ended (within the feedback window) for a rating, once."""
    rows = await session.execute(
        select(EventRegistration, Event)
        .join(Event, Event.id == EventRegistration.event_id)
        .where(Event.status == EventStatus.SCHEDULED, Event.ends_at <= now, Event.ends_at > now - FEEDBACK_WINDOW,
               EventRegistration.checked_in_at.is_not(None))
        .order_by(EventRegistration.id)
    )
    queued = 0
    for reg, event in rows:
        done = await enqueue(
            session, reg.telegram_id, "events.push_feedback", _params(event, tz, policy), kind="event",
            priority=Priority.BULK, dedupe_key=f"ev:{event.id}:fb:{reg.id}", buttons=rating_buttons(reg.id),
        )
        queued += done is not None
    return queued


class Rated(enum.StrEnum):
    SAVED = "saved"
    ALREADY = "already"
    NOT_ALLOWED = "not_allowed"  # not theirs, did not attend, or too late
    BAD = "bad"


async def rate(session: AsyncSession, registration_id: int, telegram_id: int, rating: int, *, now: dt.datetime) -> Rated:
    """Save an attendee's rating of the event, with the staff member responsible for it."""
    if not 1 <= rating <= 5:
        return Rated.BAD
    reg = await session.get(EventRegistration, registration_id)
    if reg is None or reg.telegram_id != telegram_id or reg.checked_in_at is None:
        return Rated.NOT_ALLOWED
    event = await session.get(Event, reg.event_id)
    if event is None or now < event.ends_at or now > event.ends_at + FEEDBACK_WINDOW:
        return Rated.NOT_ALLOWED
    try:
        async with session.begin_nested():
            session.add(EventFeedback(registration_id=reg.id, event_id=event.id, organiser_staff_id=event.organiser_staff_id,
                                      rating=rating, rated_at=now))
    except IntegrityError:
        return Rated.ALREADY
    return Rated.SAVED


async def add_comment(session: AsyncSession, registration_id: int, telegram_id: int, comment: str) -> bool:
    """Attach a comment to the person's rating (once; False when there is no rating of theirs)."""
    feedback = await session.scalar(
        select(EventFeedback).join(EventRegistration, EventRegistration.id == EventFeedback.registration_id)
        .where(EventFeedback.registration_id == registration_id, EventRegistration.telegram_id == telegram_id)
    )
    if feedback is None or feedback.comment:
        return False
    feedback.comment = comment.strip()[:MAX_COMMENT]
    return True


# --------------------------------------------------------------------------------------------------
# Subscriptions


async def subscriptions(session: AsyncSession, telegram_id: int) -> set[str]:
    """The categories the person hears about."""
    return set(await session.scalars(select(EventSubscription.category).where(EventSubscription.telegram_id == telegram_id)))


async def toggle_subscription(session: AsyncSession, telegram_id: int, category: str) -> bool | None:
    """Subscribe or unsubscribe; the new state (None for an unknown category)."""
    if category not in CATEGORIES:
        return None
    existing = await session.get(EventSubscription, (telegram_id, category))
    if existing is not None:
        await session.delete(existing)
        return False
    try:
        async with session.begin_nested():
            session.add(EventSubscription(telegram_id=telegram_id, category=category))
    except IntegrityError:
        pass
    return True


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """/forgetme: the person's subscriptions and comments go; their seats are given up (the reminder
    job hands them to the waiting list) and their registrations stay only as anonymous counts for
    the statistics (no Telegram id, no name)."""
    await session.execute(delete(EventSubscription).where(EventSubscription.telegram_id == telegram_id))
    mine = list(await session.scalars(select(EventRegistration).where(EventRegistration.telegram_id == telegram_id)))
    for reg in mine:
        if reg.status == RegStatus.REGISTERED and reg.checked_in_at is None:
            await _free_seat(session, reg.event_id)
        if reg.status != RegStatus.CANCELLED and reg.checked_in_at is None:
            reg.status, reg.cancelled_at = RegStatus.CANCELLED, utcnow()
        reg.telegram_id, reg.name = -reg.id, ""  # unique per event, and nobody's id
    if mine:
        await session.execute(
            update(EventFeedback).where(EventFeedback.registration_id.in_([r.id for r in mine])).values(comment=None)
        )


async def fill_free_seats(session: AsyncSession, *, now: dt.datetime, tz: ZoneInfo, policy: Policy) -> int:
    """Give every free seat of an event not yet started to its waiting list (after a /forgetme, or
    anything else that freed a seat without promoting); the number of people promoted."""
    waiting = select(EventRegistration.event_id).where(EventRegistration.status == RegStatus.WAITLISTED)
    events = await session.scalars(
        select(Event).where(Event.status == EventStatus.SCHEDULED, Event.starts_at > now, Event.id.in_(waiting),
                            or_(Event.capacity == 0, Event.seats_taken < Event.capacity))
    )
    promoted = 0
    for event in list(events):
        promoted += len(await fill_seats(session, event, now=now, tz=tz, policy=policy))
    return promoted


async def set_organiser(session: AsyncSession, event_id: int, staff_id: int) -> Event | None:
    """Make ``staff_id`` the staff member responsible for the event (its later ratings count for them)."""
    event = await session.get(Event, event_id)
    if event is None:
        return None
    event.organiser_staff_id = staff_id
    return event


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class EventStats:
    """The events of a period (by their start): registrations, attendance, no-shows, promotions, ratings."""

    events: int = 0
    cancelled_events: int = 0
    registrations: int = 0  # seats had, cancelled later or not
    waitlisted: int = 0  # joined the waiting list
    promotions: int = 0
    attended: int = 0
    no_shows: int = 0  # held a seat at an event that ended, never checked in
    ratings: list[int] = field(default_factory=list)

    @property
    def attendance_rate(self) -> float | None:
        expected = self.attended + self.no_shows
        return self.attended / expected if expected else None

    @property
    def no_show_rate(self) -> float | None:
        expected = self.attended + self.no_shows
        return self.no_shows / expected if expected else None

    @property
    def average_rating(self) -> float | None:
        return statistics.fmean(self.ratings) if self.ratings else None

    def lines(self, lang: str) -> list[str]:
        w = STATS_LABELS["zh" if lang == "zh" else "en"]

        def pct(value: float | None) -> str:
            return "—" if value is None else f"{value:.0%}"

        avg = "—" if self.average_rating is None else f"{self.average_rating:.2f} ({len(self.ratings)})"
        return [
            w["title"],
            f"{w['events']}: {self.events} ({w['cancelled']} {self.cancelled_events})",
            f"{w['registrations']}: {self.registrations}; {w['waitlisted']}: {self.waitlisted}; {w['promotions']}: {self.promotions}",
            f"{w['attendance']}: {pct(self.attendance_rate)}; {w['no_shows']}: {self.no_shows} ({pct(self.no_show_rate)})",
            f"{w['rating']}: {avg}",
        ]

    def csv_rows(self) -> list[list[Any]]:
        def num(value: float | None) -> str:
            return "" if value is None else f"{value:.4f}"

        return [
            ["events", "events", "", self.events],
            ["events", "cancelled", "", self.cancelled_events],
            ["events", "registrations", "", self.registrations],
            ["events", "waitlisted", "", self.waitlisted],
            ["events", "promotions", "", self.promotions],
            ["events", "attended", "", self.attended],
            ["events", "no_shows", "", self.no_shows],
            ["events", "attendance_rate", "", num(self.attendance_rate)],
            ["events", "no_show_rate", "", num(self.no_show_rate)],
            ["events", "rating", "average", num(self.average_rating)],
            ["events", "rating", "count", len(self.ratings)],
        ]


STATS_LABELS = {
    "en": {"title": "Events and programmes", "events": "Events", "cancelled": "cancelled", "registrations": "Registrations",
           "waitlisted": "joined the waiting list", "promotions": "promoted from the waiting list", "attendance": "Attendance",
           "no_shows": "No-shows", "rating": "Average rating"},
    "zh": {"title": "活动报名", "events": "活动数", "cancelled": "已取消", "registrations": "报名人次", "waitlisted": "候补人次",
           "promotions": "候补转正", "attendance": "到场率", "no_shows": "未到场", "rating": "平均评分"},
}


async def event_stats(session: AsyncSession, start: dt.datetime | None, end: dt.datetime | None, now: dt.datetime) -> EventStats:
    """The figures of the events starting in ``[start, end)`` (either bound may be open)."""
    query = select(Event)
    if start is not None:
        query = query.where(Event.starts_at >= start)
    if end is not None:
        query = query.where(Event.starts_at < end)
    events = list(await session.scalars(query))
    stats = EventStats()
    if not events:
        return stats
    by_id = {e.id: e for e in events}
    stats.events = sum(e.status == EventStatus.SCHEDULED for e in events)
    stats.cancelled_events = sum(e.status == EventStatus.CANCELLED for e in events)
    regs = await session.scalars(select(EventRegistration).where(EventRegistration.event_id.in_(list(by_id))))
    for reg in regs:
        event = by_id[reg.event_id]
        if reg.registered_at is not None:
            stats.registrations += 1
        if reg.registered_at is None or reg.promoted_at is not None:
            stats.waitlisted += 1
        stats.promotions += reg.promoted_at is not None
        if event.status == EventStatus.SCHEDULED and reg.status == RegStatus.REGISTERED and event.ends_at <= now:
            if reg.checked_in_at is not None:
                stats.attended += 1
            else:
                stats.no_shows += 1
    stats.ratings = [int(r) for r in await session.scalars(select(EventFeedback.rating).where(EventFeedback.event_id.in_(list(by_id))))]
    return stats


# --------------------------------------------------------------------------------------------------
# Import (``librarybot events import``)


@dataclass
class ImportReport:
    imported: int = 0
    skipped: list[str] = field(default_factory=list)  # "line N: reason"


def _moment(text: str, tz: ZoneInfo, *, required: bool) -> dt.datetime | None:
    text = text.strip()
    if not text:
        if required:
            raise ValueError("missing date-time")
        return None
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value.astimezone(dt.UTC)


def draft_from_row(row: dict[str, str], tz: ZoneInfo) -> EventDraft:
    """One CSV row as a draft; ValueError with the reason for a row that cannot be read."""
    try:
        capacity = int((row.get("capacity") or "0").strip() or "0")
    except ValueError:
        raise ValueError(f"capacity is not a number: {row.get('capacity')!r}") from None
    try:
        starts = _moment(row.get("starts_at") or "", tz, required=True)
        ends = _moment(row.get("ends_at") or "", tz, required=True)
        opens = _moment(row.get("registration_opens") or "", tz, required=False)
        closes = _moment(row.get("registration_closes") or "", tz, required=False)
    except ValueError as exc:
        raise ValueError(f"bad date-time (ISO, e.g. 2026-12-10T19:00): {exc}") from None
    assert starts is not None and ends is not None
    return EventDraft(
        title_zh=(row.get("title_zh") or "").strip(), title_en=(row.get("title_en") or "").strip(),
        description_zh=(row.get("description_zh") or "").strip(), description_en=(row.get("description_en") or "").strip(),
        starts_at=starts, ends_at=ends, place=(row.get("place") or "").strip(), capacity=capacity,
        category=(row.get("category") or "").strip().lower(), audience=(row.get("audience") or "everyone").strip().lower() or "everyone",
        registration_opens=opens, registration_closes=closes,
    )


async def import_events(session: AsyncSession, path: Path, *, tz: ZoneInfo, policy: Policy, now: dt.datetime) -> ImportReport:
    """Load events from a CSV file with the columns of ``CSV_COLUMNS``; a bad row is skipped with
    its reason, the others are stored (and announced to subscribers). ValueError for a file whose
    header is wrong."""
    report = ImportReport()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"missing columns: {', '.join(missing)} (expected {','.join(CSV_COLUMNS)})")
        for number, row in enumerate(reader, start=2):
            try:
                draft = draft_from_row(row, tz)
            except ValueError as exc:
                report.skipped.append(f"line {number}: {exc}")
                continue
            created = await create_event(session, draft, now=now, tz=tz, policy=policy)
            if created.problem is not None:
                report.skipped.append(f"line {number}: {created.problem.value.replace('_', ' ')}")
            else:
                report.imported += 1
    return report


# --------------------------------------------------------------------------------------------------
# Demo


async def seed_demo(session: AsyncSession, policy: Policy, now: dt.datetime, rng: random.Random, reader_ids: Iterable[int]) -> None:
    """Three sample events: a lecture, a children's story hour and a rare-book repair workshop."""
    tz = ZoneInfo("Asia/Shanghai")
    day = now.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)

    def at(days: int, hour: int, minute: int = 0) -> dt.datetime:
        return (day + dt.timedelta(days=days)).replace(hour=hour, minute=minute).astimezone(dt.UTC)

    drafts = [
        EventDraft(
            title_zh="讲座：宋代雕版印刷与书籍文化", title_en="Lecture: Song dynasty woodblock printing and book culture",
            description_zh="古籍部研究馆员主讲，介绍宋刻本的版式、纸墨与流传。", description_en="A rare-books curator on the layout, paper, ink and history of Song editions.",
            starts_at=at(3, 19), ends_at=at(3, 20, 30), place="3F", capacity=80, category="lecture",
        ),
        EventDraft(
            title_zh="周末亲子故事会", title_en="Children's story hour",
            description_zh="为 4–8 岁小朋友讲绘本故事，请家长陪同。", description_en="Picture-book stories for children aged 4–8; parents stay with them.",
            starts_at=at(5, 10), ends_at=at(5, 11), place="1F", capacity=20, category="children",
        ),
        EventDraft(
            title_zh="古籍修复体验工作坊", title_en="Rare-book repair workshop",
            description_zh="在修复师指导下体验古籍修补与线装。仅限持证读者。", description_en="Mend and sew a thread-bound book with our conservator. Card holders only.",
            starts_at=at(7, 14), ends_at=at(7, 16, 30), place="B1", capacity=2, category="workshop", audience="readers",
        ),
    ]
    organiser = await session.scalar(select(StaffMember.telegram_id).order_by(StaffMember.telegram_id).limit(1))
    made = []
    for draft in drafts:
        created = await create_event(session, draft, now=now, tz=tz, policy=policy, organiser_staff_id=organiser)
        assert created.event is not None, created.problem
        made.append(created.event)
    # The sample readers: everyone at the lecture; the workshop full, with the third on its waiting list.
    readers = list(reader_ids)
    for telegram_id in readers:
        await register(session, made[0].id, telegram_id, name="", is_reader=True, now=now)
    for telegram_id in readers[:3]:
        await register(session, made[2].id, telegram_id, name="", is_reader=True, now=now)
