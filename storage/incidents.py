"""Incidents and emergency broadcasts: reports from anyone in the building, their escalation to the
staff, the duty officer's broadcasts (real or drill, and the all-clear), delivery reports and the
staff's acknowledgements.

The rules, in the order things happen:

* ``report_incident`` records a report and alerts the duty officers and the staff chat with an
  "I'm handling it" button; ``take_incident`` lets exactly one staff member take it (and tells the
  reporter); ``escalate_overdue`` alerts every staff member privately when nobody took it in time.
* ``draft_broadcast`` / ``draft_allclear`` prepare a broadcast with its recipient count;
  ``confirm_broadcast`` turns one draft into deliveries exactly once (a second press finds it sent),
  in one multi-row insert, and opens (or, for an all-clear, closes) the incident.
* ``acknowledge`` records a staff recipient's "Received / I'm safe / Need help"; "Need help" alerts
  the duty officers at once; ``remind_unanswered`` reminds the silent ones once and lists them to the
  duty officers.
* ``delivery_stats``, ``incident_report`` and ``recipients_csv`` are the delivery reports.

Scheduled rules are idempotent across processes: each is a conditional UPDATE on a state column
that only one process can win, and every message it queues has a dedupe key.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
import io
import math
import random
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Boolean, ForeignKey, Index, String, Text, delete, func, insert, select, union, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage import csv_export
from storage.db import Base
from storage.outbox import Delivery, DeliveryState, Priority, enqueue, enqueue_many
from storage.people import Role, StaffMember, User, staff_ids
from storage.policy import Policy

REPORT_KINDS = ("fire", "medical", "water", "power", "security", "other")
EMERGENCY_TYPES = ("fire", "flood", "earthquake", "power", "weather", "security", "evacuation", "other")
AUDIENCES = ("all", "readers", "staff")
WHOLE_BUILDING = "*"  # the place code of "the whole building"
MAX_PLACE_TEXT = 200
ACK_CODES = {"r": "received", "s": "safe", "h": "help"}


class IncidentState(enum.StrEnum):
    OPEN = "open"  # reported and not taken yet; for an emergency: until the all-clear
    HANDLING = "handling"  # a staff member took the report
    CLOSED = "closed"


class BroadcastState(enum.StrEnum):
    DRAFT = "draft"
    SENDING = "sending"
    DONE = "done"  # nothing left to send
    CANCELLED = "cancelled"


class Incident(Base):
    """Something that happened in the building: a report by anyone, or an emergency a duty officer
    announced (``source``); a drill is an emergency exercise, kept apart in reports."""

    __tablename__ = "incidents"
    __table_args__ = (Index("ix_incidents_open", "state", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # "report" or "emergency"
    kind: Mapped[str] = mapped_column(String(32))  # a REPORT_KIND or an EMERGENCY_TYPE
    drill: Mapped[bool] = mapped_column(Boolean, default=False)
    place_code: Mapped[str | None] = mapped_column(String(32))
    place_text: Mapped[str | None] = mapped_column(String(MAX_PLACE_TEXT))
    photo_file_id: Mapped[str | None] = mapped_column(String(256))
    reporter_id: Mapped[int | None]  # telegram id of the reporter or the duty officer
    reporter_name: Mapped[str | None] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default=IncidentState.OPEN)
    handled_by: Mapped[int | None]
    handled_by_name: Mapped[str | None] = mapped_column(String(256))
    handled_at: Mapped[dt.datetime | None]
    escalated_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    closed_at: Mapped[dt.datetime | None]
    close_note: Mapped[str | None] = mapped_column(Text)  # a reported incident: what the duty officer found and did


class Broadcast(Base):
    """One emergency message to an audience (``purpose`` "alert"), or the all-clear that follows it."""

    __tablename__ = "broadcasts"

    id: Mapped[int] = mapped_column(primary_key=True)
    incident_id: Mapped[int | None] = mapped_column(
        ForeignKey("incidents.id", ondelete="CASCADE"), index=True
    )
    purpose: Mapped[str] = mapped_column(String(16), default="alert")  # "alert" or "allclear"
    emergency_type: Mapped[str] = mapped_column(String(32))
    drill: Mapped[bool] = mapped_column(Boolean, default=False)
    place_code: Mapped[str | None] = mapped_column(String(32))
    place_text: Mapped[str | None] = mapped_column(String(MAX_PLACE_TEXT))
    audience: Mapped[str] = mapped_column(String(16))  # AUDIENCES, or "same" for an all-clear
    text_zh: Mapped[str] = mapped_column(Text)
    text_en: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=BroadcastState.DRAFT, index=True)
    created_by: Mapped[int | None]
    created_at: Mapped[dt.datetime]
    confirmed_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    recipients: Mapped[int] = mapped_column(default=0)
    progress_chat_id: Mapped[int | None]
    progress_message_id: Mapped[int | None]
    progress_at: Mapped[dt.datetime | None]
    reminded_at: Mapped[dt.datetime | None]


class Acknowledgement(Base):
    """A staff recipient's answer to an emergency broadcast (no status yet = not answered)."""

    __tablename__ = "acknowledgements"
    __table_args__ = (Index("ux_ack_broadcast_staff", "broadcast_id", "staff_id", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    broadcast_id: Mapped[int] = mapped_column(ForeignKey("broadcasts.id", ondelete="CASCADE"))
    staff_id: Mapped[int]
    status: Mapped[str | None] = mapped_column(String(16))  # received, safe, help
    place_code: Mapped[str | None] = mapped_column(String(32))  # where a person needing help is
    answered_at: Mapped[dt.datetime | None]


class UnknownPlace(ValueError):
    """A place code that is not in the policy file."""


# --- places and texts -----------------------------------------------------------------------------


def place_label(policy: Policy, code: str | None, text: str | None) -> dict[str, str] | str:
    """A place for a message parameter: bilingual for a known code, the typed text (escaped) otherwise."""
    if code == WHOLE_BUILDING:
        return {"t": "incidents.whole_building"}  # type: ignore[return-value]
    if code:
        zh, en = policy.place_name(code, "zh"), policy.place_name(code, "en")
        if zh is None or en is None:
            return html.escape(code, quote=False)
        return {"zh": html.escape(zh, quote=False), "en": html.escape(en, quote=False)}
    return html.escape(text or "—", quote=False)


def check_place(policy: Policy, code: str | None, text: str | None) -> tuple[str | None, str | None]:
    """A valid (code, free text) pair; raises ``UnknownPlace`` for a code not in the policy."""
    if code is not None:
        if code != WHOLE_BUILDING and policy.place_name(code, "en") is None:
            raise UnknownPlace(code)
        return code, None
    cleaned = " ".join((text or "").split())[:MAX_PLACE_TEXT]
    return None, cleaned or None


def template_text(
    policy: Policy,
    emergency_type: str,
    place_code: str | None,
    place_text: str | None,
    now: dt.datetime,
    tz: ZoneInfo,
) -> tuple[str, str]:
    """The policy's bilingual template for ``emergency_type`` with the place and time filled in."""
    template = policy.templates.get(emergency_type) or policy.templates["other"]
    hhmm = now.astimezone(tz).strftime("%H:%M")
    texts = []
    for lang, source in (("zh", template.zh), ("en", template.en)):
        if place_code == WHOLE_BUILDING:
            place = policy.library.name_zh if lang == "zh" else policy.library.name_en
        elif place_code:
            place = policy.place_name(place_code, lang) or place_code
        else:
            place = place_text or ""
        # Plain replacement: a policy template may contain other braces.
        texts.append(source.replace("{place}", place).replace("{time}", hhmm))
    return texts[0], texts[1]


def _local_time(now: dt.datetime, tz: ZoneInfo) -> str:
    return now.astimezone(tz).strftime("%H:%M")


async def person_name(session: AsyncSession, telegram_id: int) -> str:
    """How a person is named to the staff: their staff name, else their Telegram first name."""
    member = await session.get(StaffMember, telegram_id)
    if member is not None and member.name:
        return member.name
    user = await session.get(User, telegram_id)
    if user is not None and user.first_name:
        return user.first_name
    return str(telegram_id)


# --- reports --------------------------------------------------------------------------------------


async def report_incident(
    session: AsyncSession,
    *,
    kind: str,
    place_code: str | None,
    place_text: str | None,
    photo_file_id: str | None,
    reporter_id: int,
    reporter_name: str,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo,
    staff_chat_id: int | None,
) -> Incident:
    """Record a report and alert the duty officers and the staff chat at once."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown incident kind {kind!r}")
    place_code, place_text = check_place(policy, place_code, place_text)
    incident = Incident(
        source="report",
        kind=kind,
        place_code=place_code,
        place_text=place_text,
        photo_file_id=photo_file_id,
        reporter_id=reporter_id,
        reporter_name=reporter_name[:256],
        state=IncidentState.OPEN,
        created_at=now,
    )
    session.add(incident)
    await session.flush()
    params = _alert_params(incident, policy, tz)
    buttons = [[["incidents.btn_take", f"inc:take:{incident.id}"]]]
    for uid in await staff_ids(session, Role.DUTY_OFFICER):
        await enqueue(
            session,
            uid,
            "incidents.alert",
            params,
            kind="alert",
            priority=Priority.ALERT,
            buttons=buttons,
            photo_file_id=photo_file_id,
            dedupe_key=f"inc:{incident.id}:alert:{uid}",
        )
    if staff_chat_id is not None:
        await enqueue(
            session,
            staff_chat_id,
            "incidents.alert",
            params,
            kind="alert",
            priority=Priority.ALERT,
            buttons=buttons,
            photo_file_id=photo_file_id,
            dedupe_key=f"inc:{incident.id}:alert:chat",
        )
    return incident


def _alert_params(incident: Incident, policy: Policy, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "id": incident.id,
        "kind": {"t": f"incidents.kind_{incident.kind}"},
        "place": place_label(policy, incident.place_code, incident.place_text),
        "reporter": html.escape(incident.reporter_name or "—", quote=False),
        "time": _local_time(incident.created_at, tz),
    }


class TakeOutcome(enum.Enum):
    TAKEN = "taken"
    ALREADY = "already"  # someone else was first
    CLOSED = "closed"
    NOT_FOUND = "not_found"


@dataclass
class TakeResult:
    outcome: TakeOutcome
    incident: Incident | None = None


async def take_incident(
    session: AsyncSession, incident_id: int, staff_id: int, staff_name: str, now: dt.datetime
) -> TakeResult:
    """The staff member takes the report, if nobody was first; the reporter is told."""
    won = await session.execute(
        update(Incident)
        .where(
            (Incident.id == incident_id)
            & (Incident.source == "report")
            & (Incident.state == IncidentState.OPEN)
            & Incident.handled_by.is_(None)
        )
        .values(
            state=IncidentState.HANDLING,
            handled_by=staff_id,
            handled_by_name=staff_name[:256],
            handled_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    incident = await session.get(Incident, incident_id, populate_existing=True)
    if incident is None or incident.source != "report":
        return TakeResult(TakeOutcome.NOT_FOUND)
    if _rowcount(won) == 1:
        if incident.reporter_id is not None and incident.reporter_id != staff_id:
            await enqueue(
                session,
                incident.reporter_id,
                "incidents.reporter_taken",
                {
                    "id": incident.id,
                    "name": html.escape(staff_name, quote=False),
                    "kind": {"t": f"incidents.kind_{incident.kind}"},
                },
                kind="alert",
                priority=Priority.ALERT,
                dedupe_key=f"inc:{incident.id}:taken",
            )
        return TakeResult(TakeOutcome.TAKEN, incident)
    if incident.state == IncidentState.CLOSED:
        return TakeResult(TakeOutcome.CLOSED, incident)
    return TakeResult(TakeOutcome.ALREADY, incident)


MAX_CLOSE_NOTE = 1000


class CloseOutcome(enum.Enum):
    CLOSED = "closed"
    ALREADY = "already"  # closed before
    NOT_FOUND = "not_found"  # no such reported incident (an emergency ends with its all-clear)


async def close_report(
    session: AsyncSession, incident_id: int, staff_id: int, staff_name: str, note: str, now: dt.datetime
) -> CloseOutcome:
    """A duty officer closes a reported incident with a note; the reporter is told, with the note.

    Whoever closes it becomes its handler when nobody had taken it. Closing twice is refused."""
    incident = await session.get(Incident, incident_id)
    if incident is None or incident.source != "report":
        return CloseOutcome.NOT_FOUND
    won = await session.execute(
        update(Incident)
        .where((Incident.id == incident_id) & (Incident.state != IncidentState.CLOSED))
        .values(
            state=IncidentState.CLOSED, closed_at=now, close_note=note[:MAX_CLOSE_NOTE],
            handled_by=func.coalesce(Incident.handled_by, staff_id),
            handled_by_name=func.coalesce(Incident.handled_by_name, staff_name[:256]),
            handled_at=func.coalesce(Incident.handled_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(won) != 1:
        return CloseOutcome.ALREADY
    await session.refresh(incident)
    if incident.reporter_id is not None and incident.reporter_id != staff_id:
        await enqueue(
            session,
            incident.reporter_id,
            "incidents.reporter_closed",
            {
                "id": incident.id,
                "kind": {"t": f"incidents.kind_{incident.kind}"},
                "note": html.escape(note[:MAX_CLOSE_NOTE], quote=False),
            },
            kind="alert",
            priority=Priority.ALERT,
            dedupe_key=f"inc:{incident.id}:closed",
        )
    return CloseOutcome.CLOSED


@dataclass(frozen=True)
class SentAlert:
    """An alert already delivered, to be edited when the incident is taken."""

    chat_id: int
    message_id: int
    language: str | None  # forced language, else the person's choice / Telegram's
    user_language: str | None
    telegram_language: str | None
    photo: bool
    text_key: str
    params: dict[str, Any]


async def sent_alerts(session: AsyncSession, incident_id: int) -> list[SentAlert]:
    """The alerts about a report that reached their chat (to show who took it)."""
    rows = await session.execute(
        select(
            Delivery.chat_id,
            Delivery.telegram_message_id,
            Delivery.language,
            User.language,
            User.telegram_language,
            Delivery.photo_file_id,
            Delivery.text_key,
            Delivery.params,
        )
        .outerjoin(User, User.telegram_id == Delivery.chat_id)
        .where(
            (
                Delivery.dedupe_key.like(f"inc:{incident_id}:alert:%")
                | Delivery.dedupe_key.like(f"inc:{incident_id}:esc:%")
            )
            & Delivery.telegram_message_id.is_not(None)
        )
    )
    return [
        SentAlert(c, m, lang, ul, tl, bool(p), key, params or {})
        for c, m, lang, ul, tl, p, key, params in rows
    ]


async def language_of(session: AsyncSession, telegram_id: int) -> tuple[str | None, str | None]:
    """A person's chosen language and Telegram's, to render a message outside an update."""
    user = await session.get(User, telegram_id)
    return (user.language, user.telegram_language) if user is not None else (None, None)


async def escalate_overdue(
    session: AsyncSession, now: dt.datetime, minutes: float, policy: Policy, tz: ZoneInfo
) -> list[int]:
    """Alert every staff member privately about reports nobody took within ``minutes``; their ids.

    Safe to run in several processes at once: each report is escalated by the one that sets
    ``escalated_at``, and each alert has a dedupe key.
    """
    cutoff = now - dt.timedelta(minutes=minutes)
    due = list(
        await session.scalars(
            select(Incident.id).where(
                (Incident.source == "report")
                & (Incident.state == IncidentState.OPEN)
                & Incident.handled_by.is_(None)
                & Incident.escalated_at.is_(None)
                & (Incident.created_at <= cutoff)
            )
        )
    )
    escalated: list[int] = []
    staff = await staff_ids(session, Role.STAFF)
    for incident_id in due:
        won = await session.execute(
            update(Incident)
            .where(
                (Incident.id == incident_id) & Incident.escalated_at.is_(None) & Incident.handled_by.is_(None)
            )
            .values(escalated_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(won) != 1:
            continue
        incident = await session.get(Incident, incident_id, populate_existing=True)
        assert incident is not None
        params = {**_alert_params(incident, policy, tz), "minutes": _minutes(minutes)}
        for uid in staff:
            await enqueue(
                session,
                uid,
                "incidents.escalation",
                params,
                kind="alert",
                priority=Priority.ALERT,
                buttons=[[["incidents.btn_take", f"inc:take:{incident_id}"]]],
                photo_file_id=incident.photo_file_id,
                dedupe_key=f"inc:{incident_id}:esc:{uid}",
            )
        escalated.append(incident_id)
    return escalated


def _minutes(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- broadcasts -----------------------------------------------------------------------------------


def _audience_query(audience: str) -> Any:
    if audience == "readers":
        return select(User.telegram_id).where(User.reader_id.is_not(None))
    if audience == "staff":
        return select(StaffMember.telegram_id)
    if audience == "all":
        return union(select(User.telegram_id), select(StaffMember.telegram_id))
    raise ValueError(f"unknown audience {audience!r}")


async def audience_ids(session: AsyncSession, audience: str) -> list[int]:
    """The private chats an audience is: everyone who started the bot (and the staff), readers with a
    linked card, or the staff."""
    return sorted({int(uid) for uid in await session.scalars(_audience_query(audience)) if uid and uid > 0})


async def audience_counts(session: AsyncSession) -> dict[str, int]:
    """How many people each audience reaches, for the buttons."""
    return {audience: len(await audience_ids(session, audience)) for audience in AUDIENCES}


async def draft_broadcast(
    session: AsyncSession,
    *,
    emergency_type: str,
    drill: bool,
    place_code: str | None,
    place_text: str | None,
    audience: str,
    text_zh: str,
    text_en: str,
    created_by: int,
    now: dt.datetime,
    policy: Policy,
) -> Broadcast:
    """A broadcast ready for the duty officer's confirmation, with its recipient count."""
    if emergency_type not in EMERGENCY_TYPES:
        raise ValueError(f"unknown emergency type {emergency_type!r}")
    place_code, place_text = check_place(policy, place_code, place_text)
    broadcast = Broadcast(
        purpose="alert",
        emergency_type=emergency_type,
        drill=drill,
        place_code=place_code,
        place_text=place_text,
        audience=audience,
        text_zh=text_zh,
        text_en=text_en,
        state=BroadcastState.DRAFT,
        created_by=created_by,
        created_at=now,
        recipients=len(await audience_ids(session, audience)),
    )
    session.add(broadcast)
    await session.flush()
    return broadcast


async def open_emergencies(session: AsyncSession) -> list[Incident]:
    """Emergencies (and drills) announced and not yet given the all-clear, newest first."""
    return list(
        await session.scalars(
            select(Incident)
            .where((Incident.source == "emergency") & (Incident.state != IncidentState.CLOSED))
            .order_by(Incident.id.desc())
        )
    )


async def _incident_recipients(session: AsyncSession, incident_id: int) -> list[int]:
    rows = await session.scalars(
        select(Delivery.chat_id)
        .join(Broadcast, Broadcast.id == Delivery.broadcast_id)
        .where((Broadcast.incident_id == incident_id) & (Broadcast.purpose == "alert"))
        .distinct()
    )
    return sorted(set(rows))


async def draft_allclear(
    session: AsyncSession, incident_id: int, created_by: int, now: dt.datetime, policy: Policy, tz: ZoneInfo
) -> Broadcast | None:
    """The all-clear for an open emergency, to the people its alerts went to; None if it is not open."""
    incident = await session.get(Incident, incident_id)
    if incident is None or incident.source != "emergency" or incident.state == IncidentState.CLOSED:
        return None
    text_zh, text_en = template_text(policy, "allclear", incident.place_code, incident.place_text, now, tz)
    broadcast = Broadcast(
        incident_id=incident.id,
        purpose="allclear",
        emergency_type=incident.kind,
        drill=incident.drill,
        place_code=incident.place_code,
        place_text=incident.place_text,
        audience="same",
        text_zh=text_zh,
        text_en=text_en,
        state=BroadcastState.DRAFT,
        created_by=created_by,
        created_at=now,
        recipients=len(await _incident_recipients(session, incident.id)),
    )
    session.add(broadcast)
    await session.flush()
    return broadcast


async def update_draft_text(
    session: AsyncSession, broadcast_id: int, user_id: int, lang: str, text: str
) -> bool:
    """Replace one language of a draft's text (its author only, while it is a draft)."""
    column = Broadcast.text_zh if lang == "zh" else Broadcast.text_en
    result = await session.execute(
        update(Broadcast)
        .where(
            (Broadcast.id == broadcast_id)
            & (Broadcast.created_by == user_id)
            & (Broadcast.state == BroadcastState.DRAFT)
        )
        .values({column: text})
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def cancel_draft(session: AsyncSession, broadcast_id: int, user_id: int) -> bool:
    """Drop a draft nobody confirmed."""
    result = await session.execute(
        update(Broadcast)
        .where(
            (Broadcast.id == broadcast_id)
            & (Broadcast.created_by == user_id)
            & (Broadcast.state == BroadcastState.DRAFT)
        )
        .values(state=BroadcastState.CANCELLED)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


class ConfirmOutcome(enum.Enum):
    SENT = "sent"
    ALREADY = "already"  # confirmed before (a second press), or cancelled
    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"
    INCIDENT_CLOSED = "incident_closed"  # an all-clear for an emergency already closed


@dataclass
class ConfirmResult:
    outcome: ConfirmOutcome
    broadcast: Broadcast | None = None


def ack_buttons(broadcast_id: int) -> list[list[list[str]]]:
    return [
        [
            ["broadcast.btn_received", f"ack:{broadcast_id}:r"],
            ["broadcast.btn_safe", f"ack:{broadcast_id}:s"],
            ["broadcast.btn_help", f"ack:{broadcast_id}:h"],
        ]
    ]


async def confirm_broadcast(
    session: AsyncSession, broadcast_id: int, user_id: int, now: dt.datetime
) -> ConfirmResult:
    """Send a draft: exactly once, however often and by however many processes it is confirmed.

    The recipients are counted again now; every delivery row is written in one multi-row insert in
    this transaction, with the staff's acknowledgement rows. An alert opens its incident, an
    all-clear closes it.
    """
    broadcast = await session.get(Broadcast, broadcast_id)
    if broadcast is None:
        return ConfirmResult(ConfirmOutcome.NOT_FOUND)
    if broadcast.created_by != user_id:
        return ConfirmResult(ConfirmOutcome.NOT_YOURS, broadcast)
    won = await session.execute(
        update(Broadcast)
        .where((Broadcast.id == broadcast_id) & (Broadcast.state == BroadcastState.DRAFT))
        .values(state=BroadcastState.SENDING, confirmed_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(won) != 1:
        await session.refresh(broadcast)
        return ConfirmResult(ConfirmOutcome.ALREADY, broadcast)
    await session.refresh(broadcast)
    if broadcast.purpose == "allclear":
        assert broadcast.incident_id is not None
        closed = await session.execute(
            update(Incident)
            .where((Incident.id == broadcast.incident_id) & (Incident.state != IncidentState.CLOSED))
            .values(state=IncidentState.CLOSED, closed_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(closed) != 1:
            broadcast.state = BroadcastState.CANCELLED
            return ConfirmResult(ConfirmOutcome.INCIDENT_CLOSED, broadcast)
        recipients = await _incident_recipients(session, broadcast.incident_id)
    else:
        incident = Incident(
            source="emergency",
            kind=broadcast.emergency_type,
            drill=broadcast.drill,
            place_code=broadcast.place_code,
            place_text=broadcast.place_text,
            reporter_id=user_id,
            reporter_name=await person_name(session, user_id),
            state=IncidentState.OPEN,
            created_at=now,
        )
        session.add(incident)
        await session.flush()
        broadcast.incident_id = incident.id
        recipients = await audience_ids(session, broadcast.audience)
    staff = set(await session.scalars(select(StaffMember.telegram_id)))
    params = {
        "id": broadcast.id,
        "drill": {"t": "broadcast.drill_mark"} if broadcast.drill else "",
        "text": {
            "zh": html.escape(broadcast.text_zh, quote=False),
            "en": html.escape(broadcast.text_en, quote=False),
        },
    }
    staff_recipients = [uid for uid in recipients if uid in staff]
    others = [uid for uid in recipients if uid not in staff]
    common = {
        "kind": "broadcast",
        "priority": Priority.EMERGENCY,
        "broadcast_id": broadcast.id,
        "dedupe_prefix": f"bc:{broadcast.id}:",
        "not_before": now,
    }
    await enqueue_many(session, others, "broadcast.message", params, **common)  # type: ignore[arg-type]
    if broadcast.purpose == "alert":
        await enqueue_many(
            session,
            staff_recipients,
            "broadcast.message_staff",
            params,
            buttons=ack_buttons(broadcast.id),
            **common,  # type: ignore[arg-type]
        )
        if staff_recipients:
            await session.execute(
                insert(Acknowledgement),
                [{"broadcast_id": broadcast.id, "staff_id": uid} for uid in staff_recipients],
            )
    else:
        await enqueue_many(session, staff_recipients, "broadcast.message", params, **common)  # type: ignore[arg-type]
    broadcast.recipients = len(recipients)
    if not recipients:
        broadcast.state = BroadcastState.DONE
        broadcast.finished_at = now
    await session.flush()
    return ConfirmResult(ConfirmOutcome.SENT, broadcast)


async def set_progress_message(
    session: AsyncSession, broadcast_id: int, chat_id: int, message_id: int
) -> None:
    """Remember the duty officer's progress message, which the progress job keeps up to date."""
    await session.execute(
        update(Broadcast)
        .where(Broadcast.id == broadcast_id)
        .values(progress_chat_id=chat_id, progress_message_id=message_id)
    )


@dataclass
class DeliveryStats:
    """Where a broadcast's deliveries are."""

    total: int = 0
    sent: int = 0
    queued: int = 0
    sending: int = 0
    failed: int = 0
    unreachable: int = 0
    rate: float = 0.0  # messages per second lately
    time_to_90: dt.timedelta | None = None
    last_sent_at: dt.datetime | None = None

    @property
    def pending(self) -> int:
        return self.queued + self.sending

    @property
    def eta(self) -> dt.timedelta | None:
        if self.pending == 0:
            return dt.timedelta()
        return dt.timedelta(seconds=self.pending / self.rate) if self.rate > 0 else None


async def delivery_stats(
    session: AsyncSession, broadcast: Broadcast, now: dt.datetime | None = None
) -> DeliveryStats:
    """Counts by state, the recent sending rate and the time until 90 % of recipients had it."""
    stats = DeliveryStats()
    for state, count in await session.execute(
        select(Delivery.state, func.count())
        .where(Delivery.broadcast_id == broadcast.id)
        .group_by(Delivery.state)
    ):
        setattr(stats, str(state), int(count))
        stats.total += int(count)
    started = broadcast.confirmed_at
    if started is None or stats.sent == 0:
        return stats
    stats.last_sent_at = await session.scalar(
        select(func.max(Delivery.sent_at)).where(
            (Delivery.broadcast_id == broadcast.id) & (Delivery.state == DeliveryState.SENT)
        )
    )
    if now is not None:
        window = min(10.0, max((now - started).total_seconds(), 0.001))
        recent = await session.scalar(
            select(func.count()).where(
                (Delivery.broadcast_id == broadcast.id)
                & (Delivery.state == DeliveryState.SENT)
                & (Delivery.sent_at >= now - dt.timedelta(seconds=window))
            )
        )
        stats.rate = int(recent or 0) / window
    needed = math.ceil(0.9 * stats.total)
    if needed and stats.sent >= needed:
        at = await session.scalar(
            select(Delivery.sent_at)
            .where((Delivery.broadcast_id == broadcast.id) & (Delivery.state == DeliveryState.SENT))
            .order_by(Delivery.sent_at, Delivery.id)
            .offset(needed - 1)
            .limit(1)
        )
        if at is not None:
            stats.time_to_90 = max(at - started, dt.timedelta())
    return stats


async def sending_broadcasts(session: AsyncSession) -> list[Broadcast]:
    """Broadcasts confirmed and not finished."""
    return list(
        await session.scalars(
            select(Broadcast).where(Broadcast.state == BroadcastState.SENDING).order_by(Broadcast.id)
        )
    )


async def claim_progress_update(
    session: AsyncSession, broadcast_id: int, now: dt.datetime, every: dt.timedelta = dt.timedelta(seconds=3)
) -> bool:
    """True for the one caller that may update the progress message now (at most every ``every``)."""
    result = await session.execute(
        update(Broadcast)
        .where(
            (Broadcast.id == broadcast_id)
            & (
                Broadcast.progress_at.is_(None)
                | (Broadcast.progress_at <= now - every)
                | (Broadcast.progress_at > now)
            )
        )
        .values(progress_at=now)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def finish_broadcast(session: AsyncSession, broadcast_id: int, now: dt.datetime) -> bool:
    """Mark a broadcast done when nothing is left to send; True for the caller that did it."""
    pending = await session.scalar(
        select(func.count()).where(
            (Delivery.broadcast_id == broadcast_id)
            & Delivery.state.in_([DeliveryState.QUEUED, DeliveryState.SENDING])
        )
    )
    if pending:
        return False
    result = await session.execute(
        update(Broadcast)
        .where((Broadcast.id == broadcast_id) & (Broadcast.state == BroadcastState.SENDING))
        .values(state=BroadcastState.DONE, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


# --- acknowledgements -----------------------------------------------------------------------------


class AckOutcome(enum.Enum):
    RECORDED = "recorded"
    NOT_RECIPIENT = "not_recipient"
    NOT_FOUND = "not_found"


@dataclass
class AckResult:
    outcome: AckOutcome
    broadcast: Broadcast | None = None
    alerted: bool = False  # "Need help" reached the duty officers with this press


async def _duty_officers(session: AsyncSession, broadcast: Broadcast) -> list[int]:
    ids = set(await staff_ids(session, Role.DUTY_OFFICER))
    if broadcast.created_by:
        ids.add(broadcast.created_by)
    return sorted(ids)


async def acknowledge(
    session: AsyncSession, broadcast_id: int, staff_id: int, status: str, now: dt.datetime
) -> AckResult:
    """Record a staff recipient's answer; "help" alerts the duty officers at once (once per person)."""
    if status not in ACK_CODES.values():
        raise ValueError(f"unknown acknowledgement {status!r}")
    broadcast = await session.get(Broadcast, broadcast_id)
    if broadcast is None:
        return AckResult(AckOutcome.NOT_FOUND)
    result = await session.execute(
        update(Acknowledgement)
        .where((Acknowledgement.broadcast_id == broadcast_id) & (Acknowledgement.staff_id == staff_id))
        .values(status=status, answered_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return AckResult(AckOutcome.NOT_RECIPIENT, broadcast)
    alerted = False
    if status == "help":
        name = html.escape(await person_name(session, staff_id), quote=False)
        for uid in await _duty_officers(session, broadcast):
            row = await enqueue(
                session,
                uid,
                "broadcast.help_alert",
                {
                    "id": broadcast_id,
                    "name": name,
                    "user_id": staff_id,
                    "drill": {"t": "broadcast.drill_mark"} if broadcast.drill else "",
                },
                kind="alert",
                priority=Priority.EMERGENCY,
                dedupe_key=f"ack:{broadcast_id}:{staff_id}:help:{uid}",
            )
            alerted = alerted or row is not None
    return AckResult(AckOutcome.RECORDED, broadcast, alerted)


async def help_place(
    session: AsyncSession, broadcast_id: int, staff_id: int, place_code: str, policy: Policy
) -> bool:
    """Tell the duty officers where a person who needs help is; False if they did not ask for help."""
    check_place(policy, place_code, None)
    broadcast = await session.get(Broadcast, broadcast_id)
    if broadcast is None:
        return False
    result = await session.execute(
        update(Acknowledgement)
        .where(
            (Acknowledgement.broadcast_id == broadcast_id)
            & (Acknowledgement.staff_id == staff_id)
            & (Acknowledgement.status == "help")
        )
        .values(place_code=place_code)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return False
    name = html.escape(await person_name(session, staff_id), quote=False)
    for uid in await _duty_officers(session, broadcast):
        await enqueue(
            session,
            uid,
            "broadcast.help_place",
            {
                "id": broadcast_id,
                "name": name,
                "user_id": staff_id,
                "place": place_label(policy, place_code, None),
                "drill": {"t": "broadcast.drill_mark"} if broadcast.drill else "",
            },
            kind="alert",
            priority=Priority.EMERGENCY,
            dedupe_key=f"ack:{broadcast_id}:{staff_id}:place:{place_code}:{uid}",
        )
    return True


@dataclass
class AckStats:
    recipients: int = 0
    received: int = 0
    safe: int = 0
    help: int = 0

    @property
    def unanswered(self) -> int:
        return self.recipients - self.received - self.safe - self.help


async def ack_stats(session: AsyncSession, broadcast_id: int) -> AckStats:
    stats = AckStats()
    for status, count in await session.execute(
        select(Acknowledgement.status, func.count())
        .where(Acknowledgement.broadcast_id == broadcast_id)
        .group_by(Acknowledgement.status)
    ):
        stats.recipients += int(count)
        if status:
            setattr(stats, status, int(count))
    return stats


async def remind_unanswered(session: AsyncSession, now: dt.datetime, minutes: float) -> list[int]:
    """Remind, once, the staff who have not answered a broadcast within ``minutes``, and list them to
    the duty officers; the broadcasts handled. Safe to run in several processes at once."""
    cutoff = now - dt.timedelta(minutes=minutes)
    due = list(
        await session.scalars(
            select(Broadcast.id)
            .join(Incident, Incident.id == Broadcast.incident_id)
            .where(
                (Broadcast.purpose == "alert")
                & Broadcast.state.in_([BroadcastState.SENDING, BroadcastState.DONE])
                & Broadcast.reminded_at.is_(None)
                & (Broadcast.confirmed_at <= cutoff)
                & (Incident.state != IncidentState.CLOSED)
            )
        )
    )
    handled: list[int] = []
    for broadcast_id in due:
        won = await session.execute(
            update(Broadcast)
            .where((Broadcast.id == broadcast_id) & Broadcast.reminded_at.is_(None))
            .values(reminded_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(won) != 1:
            continue
        handled.append(broadcast_id)
        broadcast = await session.get(Broadcast, broadcast_id)
        assert broadcast is not None
        silent = list(
            await session.scalars(
                select(Acknowledgement.staff_id)
                .where((Acknowledgement.broadcast_id == broadcast_id) & Acknowledgement.status.is_(None))
                .order_by(Acknowledgement.staff_id)
            )
        )
        if not silent:
            continue
        drill = {"t": "broadcast.drill_mark"} if broadcast.drill else ""
        for uid in silent:
            await enqueue(
                session,
                uid,
                "broadcast.ack_reminder",
                {"id": broadcast_id, "drill": drill},
                kind="alert",
                priority=Priority.EMERGENCY,
                buttons=ack_buttons(broadcast_id),
                dedupe_key=f"bc:{broadcast_id}:remind:{uid}",
            )
        names = [html.escape(await person_name(session, uid), quote=False) for uid in silent]
        listing = "\n".join(f"• {name}" for name in names[:50]) + (
            f"\n… +{len(names) - 50}" if len(names) > 50 else ""
        )
        for uid in await _duty_officers(session, broadcast):
            await enqueue(
                session,
                uid,
                "broadcast.unanswered",
                {
                    "id": broadcast_id,
                    "count": len(silent),
                    "names": listing,
                    "minutes": _minutes(minutes),
                    "drill": drill,
                },
                kind="alert",
                priority=Priority.EMERGENCY,
                dedupe_key=f"bc:{broadcast_id}:unanswered:{uid}",
            )
    return handled


# --- reports --------------------------------------------------------------------------------------


@dataclass
class BroadcastReport:
    broadcast: Broadcast
    stats: DeliveryStats
    acks: AckStats


@dataclass
class IncidentReport:
    incident: Incident
    broadcasts: list[BroadcastReport] = field(default_factory=list)


async def list_incidents(session: AsyncSession, *, drills: bool, limit: int = 100) -> list[Incident]:
    """Incidents, newest first: reports and real emergencies, or (``drills``) the drills alone."""
    query = select(Incident).where(Incident.drill.is_(drills)).order_by(Incident.id.desc()).limit(limit)
    return list(await session.scalars(query))


async def incident_report(session: AsyncSession, incident_id: int) -> IncidentReport | None:
    """An incident with the delivery and acknowledgement report of each of its broadcasts."""
    incident = await session.get(Incident, incident_id)
    if incident is None:
        return None
    report = IncidentReport(incident)
    for broadcast in await session.scalars(
        select(Broadcast)
        .where(
            (Broadcast.incident_id == incident_id)
            & Broadcast.state.in_([BroadcastState.SENDING, BroadcastState.DONE])
        )
        .order_by(Broadcast.id)
    ):
        report.broadcasts.append(
            BroadcastReport(
                broadcast, await delivery_stats(session, broadcast), await ack_stats(session, broadcast.id)
            )
        )
    return report


async def recipients_csv(session: AsyncSession, broadcast_id: int, tz: ZoneInfo) -> bytes:
    """Every recipient of a broadcast with their delivery and acknowledgement status (UTF-8 with BOM,
    so spreadsheet programs read the Chinese names)."""
    rows = await session.execute(
        select(
            Delivery.chat_id,
            User.first_name,
            StaffMember.name,
            Delivery.state,
            Delivery.attempts,
            Delivery.last_error,
            Delivery.sent_at,
            Acknowledgement.status,
            Acknowledgement.answered_at,
            Acknowledgement.place_code,
        )
        .outerjoin(User, User.telegram_id == Delivery.chat_id)
        .outerjoin(StaffMember, StaffMember.telegram_id == Delivery.chat_id)
        .outerjoin(
            Acknowledgement,
            (Acknowledgement.broadcast_id == Delivery.broadcast_id)
            & (Acknowledgement.staff_id == Delivery.chat_id),
        )
        .where(Delivery.broadcast_id == broadcast_id)
        .order_by(Delivery.id)
    )
    out = io.StringIO()
    writer = csv_export.writer(out)
    writer.writerow(
        [
            "telegram_id",
            "name",
            "staff",
            "delivery",
            "attempts",
            "error",
            "sent_at",
            "acknowledgement",
            "answered_at",
            "help_place",
        ]
    )

    def local(value: dt.datetime | None) -> str:
        return value.astimezone(tz).isoformat(timespec="seconds") if value else ""

    for chat_id, first_name, staff_name, state, attempts, error, sent_at, status, answered_at, place in rows:
        writer.writerow(
            [
                chat_id,
                staff_name or first_name or "",
                "yes" if staff_name is not None else "",
                state,
                attempts,
                error or "",
                local(sent_at),
                status or "",
                local(answered_at),
                place or "",
            ]
        )
    return ("\ufeff" + out.getvalue()).encode("utf-8")


async def broadcasts_of(session: AsyncSession, incident_id: int) -> list[Broadcast]:
    return list(
        await session.scalars(
            select(Broadcast).where(Broadcast.incident_id == incident_id).order_by(Broadcast.id)
        )
    )


# --- privacy and demo -----------------------------------------------------------------------------


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """Erase a person from incidents (the incident itself stays, as the library's safety record):
    their id and name, the place they typed and their photo go, and so do their name and words in
    the alerts already sent to the staff about them."""
    names = {await person_name(session, telegram_id)}
    names |= set(
        await session.scalars(select(Incident.reporter_name).where(Incident.reporter_id == telegram_id))
    )
    names |= set(
        await session.scalars(select(Incident.handled_by_name).where(Incident.handled_by == telegram_id))
    )
    names = {n for n in names if n and len(n) >= 2 and n != str(telegram_id)}
    reported = list(await session.scalars(select(Incident).where(Incident.reporter_id == telegram_id)))
    typed_places = {incident.id for incident in reported if incident.place_text}
    for incident in reported:
        incident.reporter_id = incident.reporter_name = None
        incident.place_text = "—" if incident.place_text else None
        incident.photo_file_id = None
    await session.execute(
        update(Incident)
        .where(Incident.handled_by == telegram_id)
        .values(handled_by=None, handled_by_name=None)
    )
    await session.execute(
        update(Broadcast).where(Broadcast.created_by == telegram_id).values(created_by=None)
    )
    await session.execute(delete(Acknowledgement).where(Acknowledgement.staff_id == telegram_id))
    # The staff's copies of alerts: about their reports, their "need help", who handled a report.
    about = select(Delivery).where(
        (Delivery.kind == "alert")
        & (
            Delivery.dedupe_key.like("inc:%")
            | Delivery.dedupe_key.like("ack:%")
            | Delivery.dedupe_key.like("bc:%")
        )
    )
    for row in await session.scalars(about):
        incident_id = _incident_of(row.dedupe_key or "")
        params = _scrub(row.params or {}, names, telegram_id)
        if incident_id in typed_places and "place" in params:
            params["place"] = "—"
        if params != row.params:
            row.params = params
            row.photo_file_id = None if incident_id in {i.id for i in reported} else row.photo_file_id
    await session.flush()


def _incident_of(dedupe_key: str) -> int | None:
    parts = dedupe_key.split(":")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "inc" and parts[1].isdigit() else None


def _scrub(value: Any, names: set[str], telegram_id: int) -> Any:
    """``value`` with every mention of ``names`` (plain or HTML-escaped) and the id replaced."""
    if isinstance(value, dict):
        return {k: _scrub(v, names, telegram_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, names, telegram_id) for v in value]
    if isinstance(value, str):
        for name in sorted(names, key=len, reverse=True):
            value = value.replace(html.escape(name, quote=False), "—").replace(name, "—")
        return value.replace(str(telegram_id), "0") if str(telegram_id) in value else value
    if isinstance(value, int) and not isinstance(value, bool) and value == telegram_id:
        return 0
    return value


async def seed_demo(
    session: AsyncSession, policy: Policy, now: dt.datetime, rng: random.Random, reader_user_ids: list[int]
) -> None:
    """A handled report, and a finished drill with its delivery and acknowledgement report."""
    staff_id, duty_id = 9001, 9002
    earlier = now - dt.timedelta(days=2)
    places: list[str | None] = [p.code for p in policy.library.places] or [None]
    session.add(
        Incident(
            source="report",
            kind="water",
            place_code=places[min(1, len(places) - 1)],
            reporter_id=None,
            reporter_name="—",
            state=IncidentState.CLOSED,
            handled_by=staff_id,
            handled_by_name="Li Na",
            handled_at=earlier + dt.timedelta(minutes=3),
            created_at=earlier,
            closed_at=earlier + dt.timedelta(hours=1),
        )
    )
    drill_at = now - dt.timedelta(days=1)
    incident = Incident(
        source="emergency",
        kind="fire",
        drill=True,
        place_code=places[0],
        reporter_id=duty_id,
        reporter_name="Zhao Lei",
        state=IncidentState.CLOSED,
        created_at=drill_at,
        closed_at=drill_at + dt.timedelta(minutes=20),
    )
    session.add(incident)
    await session.flush()
    zh, en = template_text(policy, "fire", places[0], None, drill_at, ZoneInfo("Asia/Shanghai"))
    recipients = [*reader_user_ids, staff_id, duty_id]
    broadcast = Broadcast(
        incident_id=incident.id,
        purpose="alert",
        emergency_type="fire",
        drill=True,
        place_code=places[0],
        audience="all",
        text_zh=zh,
        text_en=en,
        state=BroadcastState.DONE,
        created_by=duty_id,
        created_at=drill_at,
        confirmed_at=drill_at,
        finished_at=drill_at + dt.timedelta(seconds=len(recipients)),
        recipients=len(recipients),
    )
    session.add(broadcast)
    await session.flush()
    for n, uid in enumerate(recipients):
        session.add(
            Delivery(
                chat_id=uid,
                kind="broadcast",
                priority=int(Priority.EMERGENCY),
                text_key="broadcast.message",
                params={
                    "drill": {"t": "broadcast.drill_mark"},
                    "text": {"zh": zh, "en": en},
                    "id": broadcast.id,
                },
                broadcast_id=broadcast.id,
                state=DeliveryState.SENT,
                attempts=1,
                not_before=drill_at,
                created_at=drill_at,
                sent_at=drill_at + dt.timedelta(seconds=n * 0.05 + rng.random() * 0.05),
                dedupe_key=f"bc:{broadcast.id}:{uid}",
            )
        )
    session.add(
        Acknowledgement(
            broadcast_id=broadcast.id,
            staff_id=staff_id,
            status="safe",
            answered_at=drill_at + dt.timedelta(minutes=2),
        )
    )
    session.add(
        Acknowledgement(
            broadcast_id=broadcast.id,
            staff_id=duty_id,
            status="received",
            answered_at=drill_at + dt.timedelta(minutes=1),
        )
    )


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
