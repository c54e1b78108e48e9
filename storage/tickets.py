"""Complaints and feedback: tickets, the messages exchanged on them and their events, with the status
rules and the service level (SLA) the library promises.

A ticket moves ``new → open → waiting_on_reader ⇄ open → resolved → closed``: a staff member claims a
new ticket (exactly one wins a race: the claim is a conditional UPDATE), staff replies put it in
``waiting_on_reader``, the reader's answer puts it back to ``open``, a closing message resolves it,
and the reader's rating (or ``ticket_autoclose_days`` without one) closes it.

The promise is kept per ticket: ``respond_by`` is fixed when the ticket is filed (``filed + the
policy's ticket_first_response_hours``), so statistics over past tickets need no policy and a
policy change never rewrites history. The first response is the first staff message to the reader
(a reply, or the closing message). A ticket still unanswered at ``respond_by`` is escalated to the
staff chat once.

Anonymous tickets keep the requester's Telegram id (replies must reach them) but nothing that
identifies them is ever put in a message to staff.

Every message to a person is an outbox row written in the same transaction as the change. Names
the store cannot know (the categories in both languages) are handed in as :class:`Labels` by the bot.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
import random
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow
from storage.outbox import Delivery, DeliveryState, Priority, enqueue
from storage.people import StaffMember, User, reader_of
from storage.policy import Policy

CATEGORIES = ("service", "environment", "facilities", "collection", "digital", "suggestion", "other")
MAX_TEXT = 2000  # characters of one ticket text or message
DAY = dt.timedelta(days=1)

# Clipping of people's texts inside pushed messages: a photo caption is limited to 1,024 characters.
CAPTION_CLIP = 500
MESSAGE_CLIP = 2500


class TicketStatus(enum.StrEnum):
    NEW = "new"  # filed, nobody has claimed it
    OPEN = "open"  # claimed; the staff member owes an answer
    WAITING = "waiting_on_reader"  # staff answered; the reader may answer back
    RESOLVED = "resolved"  # closed by staff with a message; waits for the reader's rating
    CLOSED = "closed"  # rated, or closed automatically


ACTIVE = (TicketStatus.NEW.value, TicketStatus.OPEN.value, TicketStatus.WAITING.value)

TRANSITIONS: dict[TicketStatus, frozenset[TicketStatus]] = {
    TicketStatus.NEW: frozenset({TicketStatus.OPEN}),
    TicketStatus.OPEN: frozenset({TicketStatus.WAITING, TicketStatus.RESOLVED}),
    TicketStatus.WAITING: frozenset({TicketStatus.OPEN, TicketStatus.RESOLVED}),
    TicketStatus.RESOLVED: frozenset({TicketStatus.CLOSED}),
    TicketStatus.CLOSED: frozenset(),
}


def can_move(current: str, target: str) -> bool:
    """True when the status rules allow ``current → target``."""
    return TicketStatus(target) in TRANSITIONS[TicketStatus(current)]


# --------------------------------------------------------------------------------------------------
# Models


class Ticket(Base):
    """One complaint, suggestion or word of praise, and where it stands."""

    __tablename__ = "tickets"
    __table_args__ = (
        Index("ix_tickets_requester_created", "requester_id", "created_at"),
        Index("ix_tickets_status_respond_by", "status", "respond_by"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text, default="")
    photo_file_id: Mapped[str | None] = mapped_column(String(256))  # Telegram's file_id; never downloaded
    place: Mapped[str | None] = mapped_column(String(32))  # a code of policy.library.places
    anonymous: Mapped[bool] = mapped_column(default=False)
    # Who filed it (None once they erased their data). Kept for anonymous tickets too: replies must
    # reach them; it is never shown to staff.
    requester_id: Mapped[int | None]
    requester_name: Mapped[str] = mapped_column(String(256), default="")
    requester_card: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(24), default=TicketStatus.NEW)
    assignee_id: Mapped[int | None] = mapped_column(index=True)  # the staff member who claimed it
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    respond_by: Mapped[dt.datetime]  # the promised first response
    claimed_at: Mapped[dt.datetime | None]
    first_response_at: Mapped[dt.datetime | None]
    resolved_at: Mapped[dt.datetime | None]
    closed_at: Mapped[dt.datetime | None]
    closed_reason: Mapped[str | None] = mapped_column(String(16))  # rated, auto, forgotten
    escalated_at: Mapped[dt.datetime | None]  # set once, when the staff chat was told it is late
    rating: Mapped[int | None]  # 1–5
    rating_comment: Mapped[str | None] = mapped_column(Text)

    @property
    def number(self) -> str:
        return ticket_number(self.id)


class TicketMessage(Base):
    """One message of the conversation on a ticket, after the ticket's own text."""

    __tablename__ = "ticket_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    from_staff: Mapped[bool] = mapped_column(default=False)
    author_id: Mapped[int | None]
    text: Mapped[str] = mapped_column(Text, default="")
    photo_file_id: Mapped[str | None] = mapped_column(String(256))
    # The outbox row that carried it: its state tells whether it reached the other side. The message
    # itself is kept whatever happens to the delivery (a reader who blocked the bot).
    delivery_id: Mapped[int | None]


class TicketEvent(Base):
    """What happened to a ticket, when and by whom (the audit trail)."""

    __tablename__ = "ticket_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(24))  # filed, claimed, replied, answered, resolved, rated, …
    actor_id: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(24))  # the status after the event


class TicketWatcher(Base):
    """A staff member who wants every new ticket in their private chat too."""

    __tablename__ = "ticket_watchers"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


# --------------------------------------------------------------------------------------------------
# Pure rules


def ticket_number(ticket_id: int) -> str:
    """The number people see: ``T-000123``."""
    return f"T-{ticket_id:06d}"


def parse_ticket_number(text: str) -> int | None:
    """The id behind ``T-000123``, ``t123`` or ``123``; None for anything else."""
    match = re.fullmatch(r"(?:T-?)?(\d{1,12})", text.strip(), re.IGNORECASE)
    return int(match.group(1)) or None if match else None


class TextProblem(enum.StrEnum):
    EMPTY = "empty"
    TOO_LONG = "too_long"
    NO_WORDS = "no_words"  # only emoji, signs or punctuation: nothing staff could act on


def text_problem(text: str | None, *, photo: bool = False, words: bool = False) -> TextProblem | None:
    """Why a ticket text or message cannot be taken (None when it can). A photo may stand alone.

    ``words``: the text must hold at least one letter or digit (any script), as a new ticket's must."""
    stripped = (text or "").strip()
    if not stripped and not photo:
        return TextProblem.EMPTY
    if len(stripped) > MAX_TEXT:
        return TextProblem.TOO_LONG
    if words and stripped and not any(ch.isalnum() for ch in stripped):
        return TextProblem.NO_WORDS
    return None


def respond_by(filed_at: dt.datetime, policy: Policy) -> dt.datetime:
    """When the first response is due for a ticket filed at ``filed_at``."""
    return filed_at + dt.timedelta(hours=policy.service.ticket_first_response_hours)


def is_late(ticket: Ticket, now: dt.datetime) -> bool:
    """True when the ticket still waits for its first response past the promised time."""
    return ticket.first_response_at is None and ticket.status in ACTIVE and now >= ticket.respond_by


def sla_breached(ticket: Ticket, now: dt.datetime) -> bool:
    """True when the first response came (or, still missing, will come) after ``respond_by``."""
    answered = ticket.first_response_at
    if answered is None:
        return ticket.status in ACTIVE and now > ticket.respond_by
    return answered > ticket.respond_by


def hours(delta: dt.timedelta) -> float:
    return delta.total_seconds() / 3600


def clip(text: str, limit: int) -> str:
    """``text`` escaped for Telegram's HTML, cut so that the escaped text is at most ``limit`` long.

    Cutting after escaping could split an entity (``&am…``) and make Telegram refuse the message.
    """
    out: list[str] = []
    used = 0
    for ch in text:
        piece = html.escape(ch, quote=False)
        if used + len(piece) > limit - 1:
            out.append("…")
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


def queue_order(ticket: Ticket, now: dt.datetime) -> tuple[int, int, dt.datetime, int]:
    """Sort key of the staff queue: late tickets first, then new, open, waiting; oldest first."""
    rank = {TicketStatus.NEW: 0, TicketStatus.OPEN: 1, TicketStatus.WAITING: 2}.get(TicketStatus(ticket.status), 3)
    return (0 if is_late(ticket, now) else 1, rank, ticket.created_at, ticket.id)


@dataclass(frozen=True)
class Labels:
    """Bilingual names the store cannot know (they live in the bot's translation catalogue)."""

    categories: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    anonymous: Mapping[str, str] | str = "—"
    no_place: Mapping[str, str] | str = "—"

    def category(self, code: str) -> Mapping[str, str] | str:
        return self.categories.get(code, code)


def place_label(policy: Policy, code: str | None, labels: Labels) -> Mapping[str, str] | str:
    """A place as a bilingual parameter (the code itself for a place no longer in the policy)."""
    if not code:
        return labels.no_place
    for place in policy.library.places:
        if place.code == code:
            return {"zh": place.name_zh, "en": place.name_en}
    return code


# --------------------------------------------------------------------------------------------------
# Reading


async def get_ticket(session: AsyncSession, ticket_id: int) -> Ticket | None:
    """The ticket with this id, if any."""
    return await session.get(Ticket, ticket_id)


async def filed_today(session: AsyncSession, requester_id: int, now: dt.datetime) -> int:
    """How many tickets this person filed in the last 24 hours (the daily limit's window)."""
    count = await session.scalar(
        select(func.count()).select_from(Ticket).where(Ticket.requester_id == requester_id, Ticket.created_at > now - DAY)
    )
    return int(count or 0)


async def may_file(session: AsyncSession, requester_id: int, policy: Policy, now: dt.datetime) -> bool:
    """False when the person reached ``tickets_per_day`` in the last 24 hours."""
    return await filed_today(session, requester_id, now) < policy.service.tickets_per_day


async def reader_tickets(session: AsyncSession, requester_id: int) -> list[Ticket]:
    """The person's own tickets, newest first."""
    query = select(Ticket).where(Ticket.requester_id == requester_id).order_by(Ticket.created_at.desc(), Ticket.id.desc())
    return list(await session.scalars(query))


async def staff_queue(session: AsyncSession, now: dt.datetime) -> list[Ticket]:
    """Every ticket staff still owe something: late first, then new, open and waiting."""
    rows = list(await session.scalars(select(Ticket).where(Ticket.status.in_(ACTIVE))))
    return sorted(rows, key=lambda t: queue_order(t, now))


@dataclass(frozen=True)
class HistoryEntry:
    message: TicketMessage
    delivered: bool | None  # None while still queued; False when it could not be delivered


async def history(session: AsyncSession, ticket_id: int) -> list[HistoryEntry]:
    """The conversation on a ticket, oldest first, with whether each message reached the other side."""
    rows = await session.execute(
        select(TicketMessage, Delivery.state)
        .outerjoin(Delivery, Delivery.id == TicketMessage.delivery_id)
        .where(TicketMessage.ticket_id == ticket_id)
        .order_by(TicketMessage.at, TicketMessage.id)
    )
    entries = []
    for message, state in rows:
        # No outbox row: never relayed (an addition to a new ticket), or erased with its recipient's data.
        delivered = None if state in (None, DeliveryState.QUEUED, DeliveryState.SENDING) else state == DeliveryState.SENT
        entries.append(HistoryEntry(message, delivered))
    return entries


async def staff_name(session: AsyncSession, telegram_id: int | None) -> str:
    """How a staff member is named to colleagues."""
    if telegram_id is None:
        return "—"
    member = await session.get(StaffMember, telegram_id)
    if member is not None and member.name:
        return member.name
    user = await session.get(User, telegram_id)
    return user.first_name if user is not None and user.first_name else str(telegram_id)


async def is_unreachable(session: AsyncSession, telegram_id: int | None) -> bool:
    """True when the person blocked the bot (the dispatcher marked them)."""
    if telegram_id is None:
        return True
    user = await session.get(User, telegram_id)
    return bool(user is not None and user.unreachable)


# --------------------------------------------------------------------------------------------------
# Messages to people


def _who(ticket: Ticket, labels: Labels) -> Mapping[str, str] | str:
    """The requester as staff may see them: nothing at all for an anonymous ticket."""
    if ticket.anonymous or ticket.requester_id is None:
        return labels.anonymous
    name = clip(ticket.requester_name or "?", 80)
    return f"{name} ({clip(ticket.requester_card, 40)})" if ticket.requester_card else name


def staff_card(ticket: Ticket, policy: Policy, labels: Labels, *, limit: int = MESSAGE_CLIP) -> dict[str, Any]:
    """Parameters of the ``tickets.staff_*`` messages describing a ticket to staff."""
    return {
        "number": ticket.number,
        "category": labels.category(ticket.category),
        "place": place_label(policy, ticket.place, labels),
        "who": _who(ticket, labels),
        "text": clip(ticket.text, limit),
    }


async def _staff_recipients(session: AsyncSession, staff_chat_id: int | None) -> list[int]:
    """The staff chat and every staff member watching new tickets (former staff are skipped)."""
    watchers = await session.scalars(
        select(TicketWatcher.telegram_id).join(StaffMember, StaffMember.telegram_id == TicketWatcher.telegram_id)
    )
    chats = [staff_chat_id] if staff_chat_id is not None else []
    return chats + sorted(set(watchers))


def _claim_button(ticket_id: int) -> list[list[list[Any]]]:
    return [[["tickets.btn_claim", f"tk:claim:{ticket_id}"]]]


def _staff_buttons(ticket_id: int) -> list[list[list[Any]]]:
    return [[["tickets.btn_reply", f"tk:reply:{ticket_id}"], ["tickets.btn_resolve", f"tk:resolve:{ticket_id}"]]]


def _reader_reply_button(ticket_id: int) -> list[list[list[Any]]]:
    return [[["tickets.btn_reply", f"tk:reply:{ticket_id}"]]]


def rating_buttons(ticket_id: int) -> list[list[list[Any]]]:
    return [[[f"={n} ★", f"tk:rate:{ticket_id}:{n}"] for n in range(1, 6)]]


async def _event(session: AsyncSession, ticket: Ticket, kind: str, actor_id: int | None, now: dt.datetime) -> None:
    session.add(TicketEvent(ticket_id=ticket.id, at=now, kind=kind, actor_id=actor_id, status=ticket.status))


# --------------------------------------------------------------------------------------------------
# Filing


class FileRefused(enum.StrEnum):
    BAD_CATEGORY = "bad_category"
    BAD_PLACE = "bad_place"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    DAILY_LIMIT = "daily_limit"


@dataclass(frozen=True)
class Filed:
    ticket: Ticket | None = None
    refused: FileRefused | None = None


async def file_ticket(
    session: AsyncSession,
    requester_id: int,
    category: str,
    text: str,
    *,
    policy: Policy,
    now: dt.datetime,
    staff_chat_id: int | None,
    labels: Labels,
    photo_file_id: str | None = None,
    place: str | None = None,
    anonymous: bool = False,
) -> Filed:
    """File a ticket for ``requester_id`` and alert the staff chat and the watching staff at once.

    The requester's name and card are copied from their linked card (or their Telegram name), so the
    staff see who wrote a named ticket; for an anonymous one they are never put in a staff message.
    """
    if category not in CATEGORIES:
        return Filed(refused=FileRefused.BAD_CATEGORY)
    if place and place not in {p.code for p in policy.library.places}:
        return Filed(refused=FileRefused.BAD_PLACE)
    problem = text_problem(text, words=True)
    if problem is not None:
        return Filed(refused=FileRefused.TOO_LONG if problem is TextProblem.TOO_LONG else FileRefused.EMPTY)
    if not await may_file(session, requester_id, policy, now):
        return Filed(refused=FileRefused.DAILY_LIMIT)
    reader = await reader_of(session, requester_id)
    user = await session.get(User, requester_id)
    ticket = Ticket(
        category=category,
        text=text.strip(),
        photo_file_id=photo_file_id,
        place=place or None,
        anonymous=anonymous,
        requester_id=requester_id,
        requester_name=(reader.name if reader else (user.first_name if user else ""))[:256],
        requester_card=reader.card_number if reader else None,
        status=TicketStatus.NEW,
        created_at=now,
        respond_by=respond_by(now, policy),
    )
    session.add(ticket)
    await session.flush()
    await _event(session, ticket, "filed", requester_id, now)
    photo = ticket.photo_file_id
    params = staff_card(ticket, policy, labels, limit=CAPTION_CLIP if photo else MESSAGE_CLIP)
    params["hours"] = f"{policy.service.ticket_first_response_hours:g}"
    for chat_id in await _staff_recipients(session, staff_chat_id):
        await enqueue(
            session, chat_id, "tickets.staff_new", params, kind="ticket", priority=Priority.ALERT,
            buttons=_claim_button(ticket.id), photo_file_id=photo, dedupe_key=f"ticket:{ticket.id}:new:{chat_id}",
        )
    return Filed(ticket=ticket)


# --------------------------------------------------------------------------------------------------
# Claiming, replying, resolving


class Outcome(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    TAKEN = "taken"  # somebody else claimed it first
    NOT_YOURS = "not_yours"  # neither its requester nor the staff member on it
    NOT_CLAIMED = "not_claimed"  # staff must claim a new ticket before answering it
    FINISHED = "finished"  # resolved or closed: no more messages
    EMPTY = "empty"
    TOO_LONG = "too_long"
    BAD_RATING = "bad_rating"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    ticket: Ticket | None = None
    other: str = ""  # for TAKEN: who has it
    unreachable: bool = False  # the recipient blocked the bot: the message is kept, not delivered


async def claim(session: AsyncSession, ticket_id: int, staff_id: int, now: dt.datetime) -> Result:
    """Claim a new ticket for ``staff_id``. Of two staff claiming at once exactly one wins: the claim
    is a conditional ``UPDATE … WHERE status = 'new'``, and the other is told who has it."""
    won = await session.execute(
        update(Ticket)
        .where(Ticket.id == ticket_id, Ticket.status == TicketStatus.NEW)
        .values(status=TicketStatus.OPEN, assignee_id=staff_id, claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    ticket = await session.get(Ticket, ticket_id, populate_existing=True)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if not won.rowcount:  # type: ignore[attr-defined]
        if ticket.status not in ACTIVE:
            return Result(Outcome.FINISHED, ticket)
        return Result(Outcome.TAKEN, ticket, other=await staff_name(session, ticket.assignee_id))
    await _event(session, ticket, "claimed", staff_id, now)
    if ticket.requester_id is not None:
        await enqueue(
            session, ticket.requester_id, "tickets.claimed_to_reader", {"number": ticket.number},
            kind="ticket", dedupe_key=f"ticket:{ticket.id}:claimed",
        )
    return Result(Outcome.OK, ticket)


async def queue_card(session: AsyncSession, ticket: Ticket, staff_id: int, policy: Policy, labels: Labels) -> None:
    """Send the claimed ticket to the staff member's private chat, with Reply and Resolve buttons
    (they may have claimed it in the staff chat, where the conversation does not happen)."""
    photo = ticket.photo_file_id
    await enqueue(
        session, staff_id, "tickets.claimed_card", staff_card(ticket, policy, labels, limit=CAPTION_CLIP if photo else MESSAGE_CLIP),
        kind="ticket", priority=Priority.ALERT, buttons=_staff_buttons(ticket.id), photo_file_id=photo,
        dedupe_key=f"ticket:{ticket.id}:card:{staff_id}",
    )


def _on_ticket(ticket: Ticket, staff_id: int) -> bool:
    """The staff member may answer: it is theirs, or its owner is gone (erased their data)."""
    return ticket.assignee_id in (staff_id, None)


def _message_problem(text: str, photo: str | None) -> Outcome | None:
    problem = text_problem(text, photo=photo is not None)
    return None if problem is None else Outcome.EMPTY if problem is TextProblem.EMPTY else Outcome.TOO_LONG


async def staff_reply(
    session: AsyncSession, ticket_id: int, staff_id: int, text: str, now: dt.datetime, *, photo_file_id: str | None = None
) -> Result:
    """The staff member on the ticket answers the reader; the ticket then waits on the reader."""
    ticket = await session.get(Ticket, ticket_id, with_for_update=True)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if ticket.status == TicketStatus.NEW:
        return Result(Outcome.NOT_CLAIMED, ticket)
    if ticket.status not in ACTIVE or ticket.requester_id is None:
        return Result(Outcome.FINISHED, ticket)
    if not _on_ticket(ticket, staff_id):
        return Result(Outcome.NOT_YOURS, ticket, other=await staff_name(session, ticket.assignee_id))
    problem = _message_problem(text, photo_file_id)
    if problem is not None:
        return Result(problem, ticket)
    ticket.assignee_id = staff_id
    ticket.status = TicketStatus.WAITING
    ticket.first_response_at = ticket.first_response_at or now
    delivery = await enqueue(
        session, ticket.requester_id, "tickets.reply_to_reader",
        {"number": ticket.number, "text": clip(text.strip(), CAPTION_CLIP if photo_file_id else MESSAGE_CLIP)},
        kind="ticket", priority=Priority.ALERT, buttons=_reader_reply_button(ticket.id), photo_file_id=photo_file_id,
    )
    session.add(TicketMessage(
        ticket_id=ticket.id, at=now, from_staff=True, author_id=staff_id, text=text.strip(),
        photo_file_id=photo_file_id, delivery_id=delivery.id if delivery else None,
    ))
    await _event(session, ticket, "replied", staff_id, now)
    return Result(Outcome.OK, ticket, unreachable=await is_unreachable(session, ticket.requester_id))


async def reader_reply(
    session: AsyncSession,
    ticket_id: int,
    requester_id: int,
    text: str,
    now: dt.datetime,
    *,
    labels: Labels,
    staff_chat_id: int | None,
    photo_file_id: str | None = None,
) -> Result:
    """The reader answers on their ticket; it reaches the staff member on it (the staff chat when
    nobody is), and the ticket is ``open`` again. Anonymity is kept in what staff receive."""
    ticket = await session.get(Ticket, ticket_id, with_for_update=True)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if ticket.requester_id is None or ticket.requester_id != requester_id:
        return Result(Outcome.NOT_YOURS, ticket)
    if ticket.status not in ACTIVE:
        return Result(Outcome.FINISHED, ticket)
    problem = _message_problem(text, photo_file_id)
    if problem is not None:
        return Result(problem, ticket)
    if ticket.status == TicketStatus.WAITING:
        ticket.status = TicketStatus.OPEN
    target = ticket.assignee_id if ticket.assignee_id is not None else staff_chat_id
    delivery = None
    if ticket.status != TicketStatus.NEW and target is not None:
        # A new ticket's additions wait for whoever claims it: they see the whole conversation then.
        delivery = await enqueue(
            session, target, "tickets.reply_to_staff",
            {"number": ticket.number, "who": _who(ticket, labels),
             "text": clip(text.strip(), CAPTION_CLIP if photo_file_id else MESSAGE_CLIP)},
            kind="ticket", priority=Priority.ALERT, buttons=_staff_buttons(ticket.id), photo_file_id=photo_file_id,
        )
    session.add(TicketMessage(
        ticket_id=ticket.id, at=now, from_staff=False, author_id=requester_id, text=text.strip(),
        photo_file_id=photo_file_id, delivery_id=delivery.id if delivery else None,
    ))
    await _event(session, ticket, "answered", requester_id, now)
    return Result(Outcome.OK, ticket, unreachable=target is not None and target > 0 and await is_unreachable(session, target))


async def resolve(session: AsyncSession, ticket_id: int, staff_id: int, text: str, now: dt.datetime) -> Result:
    """Resolve the ticket with a closing message to the reader, who is asked to rate the service.

    The closing message counts as the first response when nothing was said before.
    """
    ticket = await session.get(Ticket, ticket_id, with_for_update=True)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if ticket.status == TicketStatus.NEW:
        return Result(Outcome.NOT_CLAIMED, ticket)
    if ticket.status not in ACTIVE:
        return Result(Outcome.FINISHED, ticket)
    if not _on_ticket(ticket, staff_id):
        return Result(Outcome.NOT_YOURS, ticket, other=await staff_name(session, ticket.assignee_id))
    problem = _message_problem(text, None)
    if problem is not None:
        return Result(problem, ticket)
    # Conditional, so a double press cannot resolve twice (nor send two closing messages).
    done = await session.execute(
        update(Ticket)
        .where(Ticket.id == ticket_id, Ticket.status.in_([TicketStatus.OPEN, TicketStatus.WAITING]))
        .values(
            status=TicketStatus.RESOLVED, resolved_at=now, assignee_id=staff_id,
            first_response_at=ticket.first_response_at or now,
        )
        .execution_options(synchronize_session=False)
    )
    await session.refresh(ticket)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.FINISHED, ticket)
    delivery = None
    if ticket.requester_id is not None:
        delivery = await enqueue(
            session, ticket.requester_id, "tickets.resolved_to_reader",
            {"number": ticket.number, "text": clip(text.strip(), MESSAGE_CLIP)},
            kind="ticket", priority=Priority.ALERT, buttons=rating_buttons(ticket.id),
        )
    session.add(TicketMessage(
        ticket_id=ticket.id, at=now, from_staff=True, author_id=staff_id, text=text.strip(),
        delivery_id=delivery.id if delivery else None,
    ))
    await _event(session, ticket, "resolved", staff_id, now)
    return Result(Outcome.OK, ticket, unreachable=await is_unreachable(session, ticket.requester_id))


async def rate(session: AsyncSession, ticket_id: int, requester_id: int, stars: int, now: dt.datetime) -> Result:
    """The reader rates the service 1–5: a resolved ticket is closed; a ticket closed automatically
    before they rated still takes its first rating."""
    if not 1 <= stars <= 5:
        return Result(Outcome.BAD_RATING)
    ticket = await session.get(Ticket, ticket_id)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if ticket.requester_id is None or ticket.requester_id != requester_id:
        return Result(Outcome.NOT_YOURS, ticket)
    done = await session.execute(
        update(Ticket)
        .where(
            Ticket.id == ticket_id,
            Ticket.rating.is_(None),
            (Ticket.status == TicketStatus.RESOLVED) | (Ticket.status == TicketStatus.CLOSED),
        )
        .values(
            rating=stars, status=TicketStatus.CLOSED, closed_at=ticket.closed_at or now,
            closed_reason=ticket.closed_reason or "rated",
        )
        .execution_options(synchronize_session=False)
    )
    await session.refresh(ticket)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.FINISHED, ticket)
    await _event(session, ticket, "rated", requester_id, now)
    if ticket.assignee_id is not None:
        await enqueue(
            session, ticket.assignee_id, "tickets.rated_to_staff", {"number": ticket.number, "stars": "★" * stars},
            kind="ticket", dedupe_key=f"ticket:{ticket.id}:rated",
        )
    return Result(Outcome.OK, ticket)


async def add_rating_comment(session: AsyncSession, ticket_id: int, requester_id: int, comment: str) -> Result:
    """The optional comment that goes with the rating (once)."""
    ticket = await session.get(Ticket, ticket_id)
    if ticket is None:
        return Result(Outcome.NOT_FOUND)
    if ticket.requester_id != requester_id or ticket.rating is None:
        return Result(Outcome.NOT_YOURS, ticket)
    if ticket.rating_comment:
        return Result(Outcome.FINISHED, ticket)
    problem = _message_problem(comment, None)
    if problem is not None:
        return Result(problem, ticket)
    ticket.rating_comment = comment.strip()
    return Result(Outcome.OK, ticket)


# --------------------------------------------------------------------------------------------------
# Scheduled jobs


@dataclass(frozen=True)
class Late:
    ticket: Ticket
    late_by: dt.timedelta


# (with hours, minutes only, "late by") in each language: the escalation is written here, for both
_LATE_WORDS = {"zh": ("{h} 小时 {m} 分钟", "{m} 分钟", "超时 {t}"), "en": ("{h} h {m} min", "{m} min", "{t} late")}


def late_by_words(delta: dt.timedelta, lang: str, *, said: bool = False) -> str:
    """A lateness in words, in ``lang``: "6 小时 33 分钟", "6 h 33 min" (``said``: "超时 …", "… late")."""
    minutes = max(0, int(delta.total_seconds() // 60))
    with_hours, minutes_only, late = _LATE_WORDS["zh" if lang == "zh" else "en"]
    text = (with_hours if minutes >= 60 else minutes_only).format(h=minutes // 60, m=minutes % 60)
    return late.format(t=text) if said else text


def late_by_text(delta: dt.timedelta) -> str:
    """A lateness as ``h:mm`` (the same in both languages)."""
    minutes = max(0, int(delta.total_seconds() // 60))
    return f"{minutes // 60}:{minutes % 60:02d}"


async def escalate_late(
    session: AsyncSession, now: dt.datetime, staff_chat_id: int | None, labels: Labels, *, limit: int = 30
) -> list[Late]:
    """Tell the staff chat which tickets passed their first-response time unanswered, and by how much.

    Each ticket is escalated once: it is marked by a conditional UPDATE, so a second run, or a second
    bot process running the job at the same moment, finds nothing left to escalate. Without a staff
    chat the watching staff are told instead.
    """
    candidates = list(await session.scalars(
        select(Ticket)
        .where(
            Ticket.status.in_(ACTIVE), Ticket.first_response_at.is_(None),
            Ticket.escalated_at.is_(None), Ticket.respond_by <= now,
        )
        .order_by(Ticket.respond_by, Ticket.id)
    ))
    late: list[Late] = []
    for ticket in candidates:
        won = await session.execute(
            update(Ticket).where(Ticket.id == ticket.id, Ticket.escalated_at.is_(None)).values(escalated_at=now)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount:  # type: ignore[attr-defined]
            ticket.escalated_at = now
            await _event(session, ticket, "escalated", None, now)
            late.append(Late(ticket, now - ticket.respond_by))
    if not late:
        return late
    chats = [staff_chat_id] if staff_chat_id is not None else await _staff_recipients(session, None)
    owners = {item.ticket.assignee_id: await staff_name(session, item.ticket.assignee_id) for item in late}
    for start in range(0, len(late), limit):
        chunk = late[start : start + limit]
        lines = {
            lang: "\n".join(
                f"• {item.ticket.number} · {_in(lang, labels.category(item.ticket.category))} · {late_by_words(item.late_by, lang, said=True)}"
                + (f" · {clip(owners[item.ticket.assignee_id], 60)}" if item.ticket.assignee_id else "")
                for item in chunk
            )
            for lang in ("zh", "en")
        }
        unclaimed = [item.ticket for item in chunk if item.ticket.status == TicketStatus.NEW][:24]
        buttons = [
            [[f"=✋ {t.number}", f"tk:claim:{t.id}"] for t in unclaimed[i : i + 3]] for i in range(0, len(unclaimed), 3)
        ]
        for chat_id in chats:
            await enqueue(
                session, chat_id, "tickets.escalation", {"count": len(chunk), "lines": lines},
                kind="ticket", priority=Priority.ALERT, buttons=buttons or None,
                dedupe_key=f"ticket-escalation:{chunk[0].ticket.id}:{chunk[-1].ticket.id}:{now.isoformat()}:{chat_id}",
            )
    return late


def _in(lang: str, value: Mapping[str, str] | str) -> str:
    return value.get(lang, "") if isinstance(value, Mapping) else value


async def autoclose(session: AsyncSession, policy: Policy, now: dt.datetime) -> int:
    """Close the resolved tickets nobody rated within ``ticket_autoclose_days``; how many were closed."""
    cutoff = now - dt.timedelta(days=policy.service.ticket_autoclose_days)
    due = list(await session.scalars(
        select(Ticket).where(Ticket.status == TicketStatus.RESOLVED, Ticket.resolved_at <= cutoff)
    ))
    closed = 0
    for ticket in due:
        done = await session.execute(
            update(Ticket).where(Ticket.id == ticket.id, Ticket.status == TicketStatus.RESOLVED)
            .values(status=TicketStatus.CLOSED, closed_at=now, closed_reason="auto")
            .execution_options(synchronize_session=False)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            ticket.status = TicketStatus.CLOSED
            await _event(session, ticket, "closed", None, now)
            closed += 1
    return closed


# --------------------------------------------------------------------------------------------------
# Watching new tickets


async def is_watching(session: AsyncSession, staff_id: int) -> bool:
    return await session.get(TicketWatcher, staff_id) is not None


async def set_watching(session: AsyncSession, staff_id: int, on: bool) -> None:
    """Start or stop sending new tickets to this staff member's private chat."""
    current = await session.get(TicketWatcher, staff_id)
    if on and current is None:
        session.add(TicketWatcher(telegram_id=staff_id))
    elif not on and current is not None:
        await session.delete(current)
    await session.flush()


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class TicketStats:
    """Tickets filed in a period (``since`` inclusive, ``until`` exclusive, both optional)."""

    by_category: dict[str, int]
    by_status: dict[str, int]
    median_first_response_hours: float | None
    median_resolution_hours: float | None
    sla_breaches: int  # first response later than promised (or still missing past the promise at ``now``)
    average_rating: float | None
    ratings: int

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


async def ticket_stats(
    session: AsyncSession, since: dt.datetime | None, until: dt.datetime | None, now: dt.datetime
) -> TicketStats:
    """Service statistics of the tickets filed in ``[since, until)``.

    First response: filed → first staff message; resolution: filed → resolved. Every category and
    status appears in the counts, with 0 when none.
    """
    query = select(Ticket)
    if since is not None:
        query = query.where(Ticket.created_at >= since)
    if until is not None:
        query = query.where(Ticket.created_at < until)
    tickets = list(await session.scalars(query))
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_status = {status.value: 0 for status in TicketStatus}
    for ticket in tickets:
        by_category[ticket.category] = by_category.get(ticket.category, 0) + 1
        by_status[ticket.status] = by_status.get(ticket.status, 0) + 1
    first = [hours(t.first_response_at - t.created_at) for t in tickets if t.first_response_at is not None]
    resolution = [hours(t.resolved_at - t.created_at) for t in tickets if t.resolved_at is not None]
    ratings = [t.rating for t in tickets if t.rating is not None]
    return TicketStats(
        by_category=by_category,
        by_status=by_status,
        median_first_response_hours=statistics.median(first) if first else None,
        median_resolution_hours=statistics.median(resolution) if resolution else None,
        sla_breaches=sum(sla_breached(t, now) for t in tickets),
        average_rating=sum(ratings) / len(ratings) if ratings else None,
        ratings=len(ratings),
    )


# --------------------------------------------------------------------------------------------------
# Privacy and the demo


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """/forgetme: the person's tickets lose every trace of them (texts, photos, name, card, id) but
    keep category, times and rating for the statistics; open ones are closed, since no answer could
    reach them any more. As a staff member, their id leaves the tickets they worked on."""
    own = list(await session.scalars(select(Ticket.id).where(Ticket.requester_id == telegram_id)))
    if own:
        await session.execute(
            update(TicketMessage).where(TicketMessage.ticket_id.in_(own)).values(text="", photo_file_id=None, author_id=None)
        )
        await session.execute(
            update(Ticket).where(Ticket.id.in_(own), Ticket.status.in_(ACTIVE + (TicketStatus.RESOLVED.value,)))
            .values(status=TicketStatus.CLOSED, closed_at=utcnow(), closed_reason="forgotten")
        )
        await session.execute(
            update(Ticket).where(Ticket.id.in_(own)).values(
                requester_id=None, requester_name="", requester_card=None, text="", photo_file_id=None, rating_comment=None,
            )
        )
    await session.execute(update(TicketMessage).where(TicketMessage.author_id == telegram_id).values(author_id=None))
    await session.execute(update(TicketEvent).where(TicketEvent.actor_id == telegram_id).values(actor_id=None))
    await session.execute(update(Ticket).where(Ticket.assignee_id == telegram_id).values(assignee_id=None))
    await session.execute(delete(TicketWatcher).where(TicketWatcher.telegram_id == telegram_id))
    session.expire_all()


DEMO_STAFF_ID = 9001

_DEMO = [
    # category, place, anonymous, hours ago, status, text
    ("environment", "3F", False, 30, "new", "三层阅览区晚上很吵，有人一直打电话。"),
    ("facilities", "4F", True, 2, "new", "Two sockets at the study room window desks do not work."),
    ("digital", None, False, 20, "open", "无法在校外访问电子数据库，提示 IP 不在范围内。"),
    ("collection", "B1", False, 50, "waiting_on_reader", "Please buy more copies of 'Deep Learning' (Goodfellow)."),
    ("service", "1F", False, 72, "resolved", "借还处排队太久，只开了一个窗口。"),
    ("suggestion", None, False, 200, "closed", "The new self-checkout machines are great, thank you!"),
    ("other", "2F", True, 300, "closed", "二层饮水机没有热水。"),
]


async def seed_demo(
    session: AsyncSession, policy: Policy, now: dt.datetime, rng: random.Random, reader_user_ids: list[int]
) -> None:
    """Sample tickets in every state, filed by the demo readers and worked by the demo staff member."""
    requesters = reader_user_ids or [7000]
    for index, (category, place, anonymous, ago, status, text) in enumerate(_DEMO):
        requester = requesters[index % len(requesters)]
        filed = now - dt.timedelta(hours=ago, minutes=rng.randint(0, 50))
        reader = await reader_of(session, requester)
        user = await session.get(User, requester)
        ticket = Ticket(
            category=category, text=text, place=place, anonymous=anonymous, requester_id=requester,
            requester_name=reader.name if reader else (user.first_name if user else "Guest"),
            requester_card=reader.card_number if reader else None,
            status=status, created_at=filed, respond_by=respond_by(filed, policy),
        )
        session.add(ticket)
        await session.flush()
        session.add(TicketEvent(ticket_id=ticket.id, at=filed, kind="filed", actor_id=requester, status="new"))
        if status == "new":
            if ago >= policy.service.ticket_first_response_hours:
                ticket.escalated_at = ticket.respond_by
            continue
        ticket.assignee_id = DEMO_STAFF_ID
        ticket.claimed_at = filed + dt.timedelta(hours=1)
        session.add(TicketEvent(ticket_id=ticket.id, at=ticket.claimed_at, kind="claimed", actor_id=DEMO_STAFF_ID, status="open"))
        if status == "open":
            session.add(TicketMessage(ticket_id=ticket.id, at=filed + dt.timedelta(hours=2), author_id=requester,
                                      text="我用的是校园 VPN，也不行。"))
            continue
        answered = filed + dt.timedelta(hours=rng.choice([3, 6, 30]))
        ticket.first_response_at = answered
        session.add(TicketMessage(ticket_id=ticket.id, at=answered, from_staff=True, author_id=DEMO_STAFF_ID,
                                  text="感谢反馈，我们正在处理。Thank you, we are looking into it."))
        if status == "waiting_on_reader":
            continue
        ticket.resolved_at = answered + dt.timedelta(hours=rng.randint(2, 20))
        session.add(TicketMessage(ticket_id=ticket.id, at=ticket.resolved_at, from_staff=True, author_id=DEMO_STAFF_ID,
                                  text="已处理完毕。It has been taken care of."))
        if status == "closed":
            ticket.closed_at = ticket.resolved_at + dt.timedelta(hours=5)
            ticket.rating = rng.choice([4, 5]) if index % 2 else None
            ticket.closed_reason = "rated" if ticket.rating else "auto"
    if await session.get(StaffMember, DEMO_STAFF_ID) is not None and not await is_watching(session, DEMO_STAFF_ID):
        session.add(TicketWatcher(telegram_id=DEMO_STAFF_ID))
    await session.flush()

