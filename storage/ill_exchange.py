"""Interlibrary loan with partner libraries (合作馆) over ISO 18626: the library as a borrower (a
reader's request goes to the partners in rota order) and as a lender (a partner's request reaches the
staff queue), the durable queue of outgoing messages, the record of incoming ones, and the figures
per partner.

As a borrower::

    Send to partners → request to partner 1 ─ Unfilled → request to partner 2 ─ … ─ all declined → unfilled
                          ↓ WillSupply / ExpectToSupply (staff told)
                          ↓ Loaned / CopyCompleted (the reader told it is on its way)
    staff "received" → Received;  staff "returned to partner" → ShippedReturn;  LoanCompleted → completed
    the reader cancels → Cancel; the partner's answer (Cancelled, or answerYesNo N) decides

As a lender: a partner's ``request`` becomes a :class:`LendingRequest`; staff answer Will supply,
Loaned (CopyCompleted for a copy) or Unfilled with a reason; the partner's ShippedReturn lets staff
complete it (LoanCompleted).

Outgoing messages are rows (:class:`PartnerMessage`) written in the same transaction as the change
that causes them, sent by ``bot.ill_exchange`` in order per request, retried with backoff while a
partner is down. Incoming messages are remembered (:class:`PartnerInbox`) by their content, so one
delivered twice changes the request once and is answered the same way both times.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ForeignKey, String, Text, UniqueConstraint, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage import iso18626 as iso
from storage.db import Base, utcnow
from storage.ill import CLOSED, IllEvent, IllKind, IllRequest, IllStatus, move_request
from storage.outbox import Priority, enqueue
from storage.policy import IllPartner, Policy

log = logging.getLogger(__name__)
S = IllStatus


# -------------------------------------------------------------------------------------------------
# Models


class PartnerAttempt(Base):
    """One partner library asked for one of the library's requests (the rota, as it went)."""

    __tablename__ = "ill_partner_attempts"
    __table_args__ = (UniqueConstraint("request_id", "agency_id", name="uq_ill_partner_attempts_request_agency"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("ill_requests.id", ondelete="CASCADE"), index=True)
    agency_id: Mapped[str] = mapped_column(String(128), index=True)
    position: Mapped[int] = mapped_column(default=0)  # 1 for the first partner asked, …
    # asked, supplying (WillSupply/ExpectToSupply), shipped (Loaned/CopyCompleted), returned,
    # completed, declined (Unfilled), cancelled
    state: Mapped[str] = mapped_column(String(16), default="asked")
    partner_status: Mapped[str] = mapped_column(String(32), default="")  # the last ISO 18626 status received
    reason: Mapped[str] = mapped_column(String(300), default="")  # reasonUnfilled (and note) when declined
    asked_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    answered_at: Mapped[dt.datetime | None]
    shipped_at: Mapped[dt.datetime | None]
    cancel_asked_at: Mapped[dt.datetime | None]
    closed_at: Mapped[dt.datetime | None]


class PartnerMessage(Base):
    """One outgoing ISO 18626 message: the durable queue the sender works through."""

    __tablename__ = "ill_partner_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    agency_id: Mapped[str] = mapped_column(String(128), index=True)
    conversation: Mapped[str] = mapped_column(String(300), index=True)  # messages of one request go in order
    kind: Mapped[str] = mapped_column(String(40))
    summary: Mapped[str] = mapped_column(String(64), default="")  # status or action, for the logs and the staff
    body: Mapped[str] = mapped_column(Text)
    dedupe_key: Mapped[str] = mapped_column(String(300), unique=True)
    state: Mapped[str] = mapped_column(String(8), default="pending", index=True)  # pending, sent, failed
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    last_error: Mapped[str] = mapped_column(String(300), default="")


class PartnerInbox(Base):
    """An incoming message already processed, by a digest of what it says, and the answer it got."""

    __tablename__ = "ill_partner_inbox"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    answer: Mapped[str] = mapped_column(Text, default="")


class LendingRequest(Base):
    """A partner library's request to borrow from (or get a copy from) this library."""

    __tablename__ = "ill_lending_requests"
    __table_args__ = (UniqueConstraint("agency_id", "their_request_id", name="uq_ill_lending_requests_their_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    agency_id: Mapped[str] = mapped_column(String(128), index=True)  # the requesting partner
    their_request_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(8))  # loan or copy
    title: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(Text, default="")
    component: Mapped[str] = mapped_column(Text, default="")  # for copies: the article or chapter
    pages: Mapped[str] = mapped_column(String(64), default="")
    identifier: Mapped[str] = mapped_column(String(300), default="")
    need_before: Mapped[dt.date | None]
    note: Mapped[str] = mapped_column(Text, default="")
    # received, will_supply, loaned (or copy sent), unfilled, returned (shipped back), completed, cancelled
    state: Mapped[str] = mapped_column(String(16), default="received", index=True)
    reason: Mapped[str] = mapped_column(String(64), default="")
    handled_by: Mapped[int | None]
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    answered_at: Mapped[dt.datetime | None]
    shipped_at: Mapped[dt.datetime | None]
    closed_at: Mapped[dt.datetime | None]

    @property
    def number(self) -> str:
        return f"LEND-{self.id:06d}"


# -------------------------------------------------------------------------------------------------
# Who is who


ACTIVE = frozenset({"asked", "supplying", "shipped", "returned"})  # a partner still working on it
# Reasons staff give when the library cannot supply (ISO 18626 leaves reasonUnfilled open; these are
# the values ReShare and the ISO 18626 implementers' register use).
LENDING_REASONS = ("NotHeld", "NotAvailableForILL", "NotOnShelf", "PolicyProblem", "Other")


def partner_label(partner: IllPartner | None, agency_id: str = "") -> dict[str, str]:
    """A partner's name as a bilingual parameter (its agency id when it is no longer listed)."""
    if partner is None:
        return {"zh": agency_id, "en": agency_id}
    return {"zh": partner.name_zh, "en": partner.name_en}


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def _request_id_of(number: str) -> int | None:
    match = re.fullmatch(r"ILL-(\d{1,12})", number.strip())
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Identity:
    """This library on the wire, its partners, and where its staff hear of things."""

    agency: iso.AgencyId
    policy: Policy
    staff_chat_id: int | None = None


# -------------------------------------------------------------------------------------------------
# The outgoing queue


async def _queue(
    session: AsyncSession,
    partner: IllPartner,
    message: iso.Request | iso.SupplyingAgencyMessage | iso.RequestingAgencyMessage,
    *,
    conversation: str,
    dedupe_key: str,
    summary: str,
    now: dt.datetime,
) -> PartnerMessage | None:
    """Queue one message to ``partner`` (built and checked against the schema now); None if queued before."""
    body = iso.to_xml(message).decode("utf-8")
    row = PartnerMessage(
        agency_id=partner.agency_id, conversation=conversation, kind=message.kind.value, summary=summary,
        body=body, dedupe_key=dedupe_key[:300], next_attempt_at=now, created_at=now,
    )
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return None
    return row


async def due_messages(session: AsyncSession, now: dt.datetime, limit: int = 20) -> list[PartnerMessage]:
    """Pending messages whose time has come, oldest first, and only the first pending message of each
    conversation (a Cancel never overtakes the request it cancels)."""
    pending = list(await session.scalars(
        select(PartnerMessage).where(PartnerMessage.state == "pending").order_by(PartnerMessage.id).limit(500)
    ))
    seen: set[str] = set()
    due: list[PartnerMessage] = []
    for row in pending:
        if row.conversation in seen:
            continue
        seen.add(row.conversation)
        leased = row.lease_until is not None and row.lease_until > now
        if row.next_attempt_at <= now and not leased:
            due.append(row)
        if len(due) >= limit:
            break
    return due


async def lease(session: AsyncSession, message_id: int, now: dt.datetime, seconds: float = 120) -> bool:
    """Take one message for sending (one sender wins, even across processes)."""
    taken = await session.execute(
        update(PartnerMessage)
        .where(
            PartnerMessage.id == message_id, PartnerMessage.state == "pending",
            or_(PartnerMessage.lease_until.is_(None), PartnerMessage.lease_until <= now),
        )
        .values(lease_until=now + dt.timedelta(seconds=seconds))
    )
    return bool(taken.rowcount)  # type: ignore[attr-defined]


async def release(session: AsyncSession, message_ids: Sequence[int]) -> None:
    """Give leased messages back to the queue unsent (the sender is stopping)."""
    if message_ids:
        await session.execute(
            update(PartnerMessage).where(PartnerMessage.id.in_(list(message_ids)), PartnerMessage.state == "pending")
            .values(lease_until=None)
        )


async def mark_sent(session: AsyncSession, message_id: int, now: dt.datetime) -> None:
    """The partner confirmed the message."""
    await session.execute(
        update(PartnerMessage).where(PartnerMessage.id == message_id)
        .values(state="sent", sent_at=now, lease_until=None, last_error="")
    )


BACKOFF_BASE = dt.timedelta(seconds=30)
BACKOFF_CAP = dt.timedelta(hours=1)
ALERT_AFTER = 5  # failed attempts before the staff hear that a partner is unreachable


def backoff(attempts: int) -> dt.timedelta:
    """How long to wait after the ``attempts``-th failure: 30 s, 1 min, 2 min, … up to an hour."""
    return min(BACKOFF_BASE * (2 ** max(0, attempts - 1)), BACKOFF_CAP)


async def retry_later(
    session: AsyncSession, message: PartnerMessage, error: str, now: dt.datetime, identity: Identity
) -> dt.datetime:
    """The partner did not answer (or not in ISO 18626): try again after a backoff; the staff hear of it
    once, after a few failures."""
    attempts = message.attempts + 1
    when = now + backoff(attempts)
    await session.execute(
        update(PartnerMessage).where(PartnerMessage.id == message.id)
        .values(attempts=attempts, next_attempt_at=when, lease_until=None, last_error=error[:300])
    )
    if attempts == ALERT_AFTER and identity.staff_chat_id is not None:
        partner = identity.policy.ill.partner(message.agency_id)
        await enqueue(
            session, identity.staff_chat_id, "ill_partners.staff_partner_down",
            {"partner": partner_label(partner, message.agency_id), "attempts": attempts},
            kind="ill", priority=Priority.ALERT, dedupe_key=f"illx:down:{message.id}",
        )
    return when


async def mark_refused(
    session: AsyncSession, message: PartnerMessage, answer: iso.Confirmation, now: dt.datetime, identity: Identity
) -> None:
    """The partner answered ERROR: sending it again would not help; the staff are told why."""
    error = f"{answer.error_type or ''}: {answer.error_value}"[:300]
    await session.execute(
        update(PartnerMessage).where(PartnerMessage.id == message.id)
        .values(state="failed", lease_until=None, last_error=error, attempts=message.attempts + 1)
    )
    if identity.staff_chat_id is not None:
        partner = identity.policy.ill.partner(message.agency_id)
        await enqueue(
            session, identity.staff_chat_id, "ill_partners.staff_message_refused",
            {"partner": partner_label(partner, message.agency_id), "message": _esc(message.summary or message.kind),
             "conversation": _esc(message.conversation.rpartition("|")[2]), "error": _esc(error)},
            kind="ill", priority=Priority.ALERT, dedupe_key=f"illx:refused:{message.id}",
        )


async def queue_counts(session: AsyncSession) -> dict[str, int]:
    """Outgoing messages by state (for the health report and the tests)."""
    rows = await session.execute(select(PartnerMessage.state, PartnerMessage.id))
    counts: dict[str, int] = {}
    for state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    return counts


# -------------------------------------------------------------------------------------------------
# Borrowing: sending a reader's request to the partners


@dataclass(frozen=True)
class SendResult:
    refusal: str | None  # None, or ill_partners.refused_<value>: no_partners, not_found, stale, closed, all_asked
    request: IllRequest | None = None
    partner: IllPartner | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None


def _citation(request: IllRequest) -> iso.Citation:
    ids = [(code, value) for code, value in (("ISBN", request.isbn), ("ISSN", request.issn), ("DOI", request.doi)) if value]
    if request.kind == IllKind.COPY:
        return iso.Citation(
            title=request.journal, title_of_component=request.title, author_of_component=request.author,
            volume=request.volume, issue=request.issue, pages=request.pages, identifiers=ids,
            publisher=request.publisher, publication_date=request.year,
        )
    return iso.Citation(
        title=request.title, author=request.author, identifiers=ids, publisher=request.publisher,
        publication_date=request.year,
    )


def _header(identity: Identity, partner: IllPartner, request_id: str, now: dt.datetime, *, lending: bool = False) -> iso.Header:
    other = iso.AgencyId.parse(partner.agency_id)
    if lending:  # the partner asks, this library supplies
        return iso.Header(supplying=identity.agency, requesting=other, requesting_request_id=request_id, timestamp=now)
    return iso.Header(supplying=other, requesting=identity.agency, requesting_request_id=request_id, timestamp=now)


def _partner_name(partner: IllPartner) -> str:
    return f"{partner.name_zh} {partner.name_en}" if partner.name_zh != partner.name_en else partner.name_en


async def attempts_of(session: AsyncSession, request_id: int) -> list[PartnerAttempt]:
    """The partners asked for a request, in the order they were asked."""
    query = select(PartnerAttempt).where(PartnerAttempt.request_id == request_id).order_by(PartnerAttempt.position)
    return list(await session.scalars(query))


async def current_attempt(session: AsyncSession, request_id: int) -> PartnerAttempt | None:
    """The partner working on a request now, if any."""
    for attempt in reversed(await attempts_of(session, request_id)):
        if attempt.state in ACTIVE:
            return attempt
    return None


async def cancellable_with_partner(session: AsyncSession, request_ids: Sequence[int]) -> set[int]:
    """Of these requests, those a partner has but not yet sent: the reader may ask to cancel them."""
    if not request_ids:
        return set()
    query = select(PartnerAttempt.request_id).join(IllRequest, IllRequest.id == PartnerAttempt.request_id).where(
        PartnerAttempt.request_id.in_(list(request_ids)), PartnerAttempt.state.in_(("asked", "supplying")),
        PartnerAttempt.cancel_asked_at.is_(None), IllRequest.status == S.REQUESTED.value,
    )
    return set(await session.scalars(query))


async def _ask(
    session: AsyncSession, request: IllRequest, partner: IllPartner, position: int, identity: Identity, now: dt.datetime
) -> None:
    session.add(PartnerAttempt(request_id=request.id, agency_id=partner.agency_id, position=position, asked_at=now))
    message = iso.Request(
        header=_header(identity, partner, request.number, now),
        citation=_citation(request),
        service_type="Copy" if request.kind == IllKind.COPY else "Loan",
        request_type=request.request_type or "New",
        need_before=request.need_before,
        copyright_compliance=request.copyright_compliance,
        delivery_address=request.pickup_branch,
    )
    await _queue(
        session, partner, message, conversation=f"borrow|{partner.agency_id}|{request.number}",
        dedupe_key=f"borrow|{partner.agency_id}|{request.number}|request", summary="request", now=now,
    )


async def send_to_partners(
    session: AsyncSession, request_id: int, *, actor: int, expected: IllStatus | None, identity: Identity, now: dt.datetime
) -> SendResult:
    """"Send to partners": ask the first partner (in rota order) not asked before; the request becomes
    ``requested`` from it (the reader is told, as for any partner)."""
    partners = identity.policy.ill.partners
    if not partners:
        return SendResult("no_partners")
    request = await session.get(IllRequest, request_id, populate_existing=True)
    if request is None:
        return SendResult("not_found")
    if expected is not None and request.state != expected:
        return SendResult("stale", request)
    if request.state not in (S.SUBMITTED, S.IN_REVIEW):
        return SendResult("closed" if request.state in CLOSED else "stale", request)
    asked = {a.agency_id for a in await attempts_of(session, request.id)}
    partner = next((p for p in partners if p.agency_id not in asked), None)
    if partner is None:
        return SendResult("all_asked", request)
    if request.state == S.SUBMITTED:
        moved = await move_request(
            session, request.id, S.IN_REVIEW, actor=actor, staff=True, now=now, policy=identity.policy,
            expected=S.SUBMITTED, staff_chat_id=identity.staff_chat_id,
        )
        if not moved.ok:
            return SendResult("stale", request)
    moved = await move_request(
        session, request.id, S.REQUESTED, actor=actor, staff=True, now=now, policy=identity.policy,
        expected=S.IN_REVIEW, partner=_partner_name(partner), staff_chat_id=identity.staff_chat_id,
    )
    if not moved.ok:
        return SendResult("stale", request)
    await _ask(session, request, partner, len(asked) + 1, identity, now)
    log.info("ILL request %s sent to partner %s", request.number, partner.agency_id)
    return SendResult(None, moved.request, partner)


async def _next_partner(session: AsyncSession, request: IllRequest, identity: Identity, now: dt.datetime) -> None:
    """The partner declined: ask the next one, or (when every partner has declined) the request is unfilled."""
    attempts = await attempts_of(session, request.id)
    asked = {a.agency_id for a in attempts}
    partner = next((p for p in identity.policy.ill.partners if p.agency_id not in asked), None)
    params: dict[str, Any] = {"number": request.number, "title": _esc(request.title[:200])}
    if partner is not None:
        name = _partner_name(partner)
        await session.execute(update(IllRequest).where(IllRequest.id == request.id).values(partner=name, updated_at=now))
        session.add(IllEvent(
            request_id=request.id, at=now, actor=None, actor_role="system", from_status=S.REQUESTED.value,
            to_status=S.REQUESTED.value, detail=name[:256],
        ))
        await _ask(session, request, partner, len(attempts) + 1, identity, now)
        if identity.staff_chat_id is not None:
            await enqueue(
                session, identity.staff_chat_id, "ill_partners.staff_next_partner",
                params | {"partner": partner_label(partner)}, kind="ill", priority=Priority.ALERT,
                dedupe_key=f"illx:next:{request.id}:{partner.agency_id}",
            )
        return
    reasons = "; ".join(
        f"{_partner_name(p) if (p := identity.policy.ill.partner(a.agency_id)) else a.agency_id}: {a.reason or '—'}"
        for a in attempts if a.state == "declined"
    )
    moved = await move_request(
        session, request.id, S.UNFILLED, actor=request.handled_by or 0, staff=True, now=now, policy=identity.policy,
        expected=S.REQUESTED, reason="not_available", staff_chat_id=identity.staff_chat_id,
    )
    if moved.ok and identity.staff_chat_id is not None:
        await enqueue(
            session, identity.staff_chat_id, "ill_partners.staff_all_declined", params | {"reasons": _esc(reasons)},
            kind="ill", priority=Priority.ALERT, dedupe_key=f"illx:alldeclined:{request.id}",
        )


async def _tell_reader(session: AsyncSession, request: IllRequest, key: str, params: dict[str, Any], tag: str) -> None:
    if request.telegram_id is not None:
        await enqueue(
            session, request.telegram_id, key, params, kind="ill",
            dedupe_key=f"illx:{request.id}:{tag}:{request.telegram_id}",
        )


async def _tell_staff(session: AsyncSession, identity: Identity, key: str, params: dict[str, Any], tag: str) -> None:
    if identity.staff_chat_id is not None:
        await enqueue(
            session, identity.staff_chat_id, key, params, kind="ill", priority=Priority.ALERT, dedupe_key=f"illx:{tag}",
        )


async def _on_supplying_message(
    session: AsyncSession, message: iso.SupplyingAgencyMessage, partner: IllPartner, identity: Identity, now: dt.datetime
) -> iso.InvalidMessage | None:
    """A partner's answer about one of the library's requests."""
    request_id = _request_id_of(message.header.requesting_request_id)
    request = await session.get(IllRequest, request_id, populate_existing=True) if request_id else None
    attempt = None
    if request is not None:
        attempt = await session.scalar(select(PartnerAttempt).where(
            PartnerAttempt.request_id == request.id, PartnerAttempt.agency_id == partner.agency_id
        ))
    if request is None or attempt is None:
        return iso.InvalidMessage(
            iso.ErrorType.UNRECOGNISED_DATA_VALUE, f"requestingAgencyRequestId: {message.header.requesting_request_id}"
        )
    status = message.status
    attempt.partner_status = status
    attempt.answered_at = attempt.answered_at or now
    label = partner_label(partner)
    params: dict[str, Any] = {
        "number": request.number, "title": _esc(request.title[:200]), "partner": label, "status": status,
        "note": _esc(message.note[:300]) or "—",
    }
    tag = f"{attempt.id}:{status}:{message.reason_for_message}"
    if attempt.state not in ACTIVE:  # a late word from a partner that is no longer asked: noted for staff only
        await _tell_staff(session, identity, "ill_partners.staff_partner_status", params, f"late:{tag}")
        return None
    if message.reason_for_message == "CancelResponse" or (status == "Cancelled" and attempt.cancel_asked_at):
        if status == "Cancelled" and message.answer_yes_no != "N":
            await _cancelled_by_partner(session, request, attempt, identity, now, params)
            return None
        attempt.cancel_asked_at = None  # refused: the status that came with the answer still counts
        await _tell_reader(session, request, "ill_partners.notice_cancel_refused", params, "cancelrefused")
        await _tell_staff(session, identity, "ill_partners.staff_cancel_refused", params, tag)
    if status in ("ExpectToSupply", "WillSupply"):
        attempt.state = "supplying" if attempt.state == "asked" else attempt.state
        await _tell_staff(session, identity, f"ill_partners.staff_{'will' if status == 'WillSupply' else 'expect'}_supply",
                          params, tag)
    elif status == "Unfilled":
        attempt.state, attempt.closed_at = "declined", now
        attempt.reason = " — ".join(x for x in (message.reason_unfilled, message.note) if x)[:300]
        if request.state == S.REQUESTED:
            await _next_partner(session, request, identity, now)
    elif status in ("Loaned", "CopyCompleted"):
        if attempt.state in ("asked", "supplying"):
            attempt.state, attempt.shipped_at = "shipped", now
            kind = "copy" if status == "CopyCompleted" else "loan"
            await _tell_reader(session, request, f"ill_partners.notice_on_its_way_{kind}", params, "shipped")
            await _tell_staff(session, identity, "ill_partners.staff_shipped", params, tag)
    elif status in ("LoanCompleted", "CompletedWithoutReturn"):
        attempt.state, attempt.closed_at = "completed", now
        if request.state == S.AVAILABLE:
            await move_request(
                session, request.id, S.COMPLETED, actor=request.handled_by or 0, staff=True, now=now,
                policy=identity.policy, expected=S.AVAILABLE, staff_chat_id=identity.staff_chat_id,
            )
        await _tell_staff(session, identity, "ill_partners.staff_loan_completed", params, tag)
    elif status == "Cancelled":  # cancelled by the partner unasked: as good as declined
        attempt.state, attempt.closed_at = "declined", now
        attempt.reason = message.note[:300] or "Cancelled"
        if request.state == S.REQUESTED:
            await _next_partner(session, request, identity, now)
    else:  # RequestReceived, Overdue, Recalled, RetryPossible: staff see it, nothing moves
        if status != "RequestReceived":
            await _tell_staff(session, identity, "ill_partners.staff_partner_status", params, tag)
    return None


async def _cancelled_by_partner(
    session: AsyncSession, request: IllRequest, attempt: PartnerAttempt, identity: Identity, now: dt.datetime,
    params: dict[str, Any],
) -> None:
    """The partner agreed to cancel: the request is cancelled (the only way out of ``requested`` to it)."""
    attempt.state, attempt.closed_at = "cancelled", now
    moved = await session.execute(
        update(IllRequest).where(IllRequest.id == request.id, IllRequest.status == S.REQUESTED.value)
        .values(status=S.CANCELLED.value, updated_at=now, closed_at=now)
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        return
    session.add(IllEvent(
        request_id=request.id, at=now, actor=None, actor_role="system", from_status=S.REQUESTED.value,
        to_status=S.CANCELLED.value, detail=attempt.agency_id[:256],
    ))
    await _tell_reader(session, request, "ill_partners.notice_cancelled", params, "cancelled")
    await _tell_staff(session, identity, "ill_partners.staff_cancelled", params, f"cancelled:{request.id}")


async def after_staff_move(
    session: AsyncSession, request: IllRequest, target: IllStatus, identity: Identity, now: dt.datetime
) -> bool:
    """Tell the partner supplying a request what staff just did: ``received`` sends Received; staff
    giving up on a request the partner has not sent yet (``unfilled``) sends Cancel, so the partner
    stops looking for it. True when a message was queued."""
    if target not in (S.RECEIVED, S.UNFILLED):
        return False
    attempt = await current_attempt(session, request.id)
    partner = identity.policy.ill.partner(attempt.agency_id) if attempt is not None else None
    if attempt is None or partner is None:
        return False
    if target == S.UNFILLED:
        if attempt.state not in ("asked", "supplying"):
            return False
        attempt.state, attempt.closed_at, attempt.cancel_asked_at = "cancelled", now, now
        return await _requesting_message(session, request, partner, "Cancel", identity, now) is not None
    return await _requesting_message(session, request, partner, "Received", identity, now) is not None


async def _requesting_message(
    session: AsyncSession, request: IllRequest, partner: IllPartner, action: str, identity: Identity, now: dt.datetime
) -> PartnerMessage | None:
    message = iso.RequestingAgencyMessage(header=_header(identity, partner, request.number, now), action=action)
    return await _queue(
        session, partner, message, conversation=f"borrow|{partner.agency_id}|{request.number}",
        dedupe_key=f"borrow|{partner.agency_id}|{request.number}|{action}", summary=action, now=now,
    )


async def return_to_partner(
    session: AsyncSession, request_id: int, identity: Identity, now: dt.datetime
) -> str | None:
    """Staff sent the book back: ShippedReturn to the partner. None when done, else why not
    (``ill_partners.refused_<value>``)."""
    request = await session.get(IllRequest, request_id, populate_existing=True)
    if request is None:
        return "not_found"
    attempt = await current_attempt(session, request.id)
    partner = identity.policy.ill.partner(attempt.agency_id) if attempt is not None else None
    if attempt is None or partner is None or attempt.state != "shipped" or request.kind != IllKind.LOAN:
        return "not_on_loan"
    if request.state not in (S.RECEIVED, S.AVAILABLE):
        return "stale"
    attempt.state = "returned"
    await _requesting_message(session, request, partner, "ShippedReturn", identity, now)
    return None


async def ask_partner_to_cancel(
    session: AsyncSession, request_id: int, identity: Identity, now: dt.datetime
) -> bool:
    """The reader cancels a request a partner already has: Cancel goes to the partner, whose answer
    decides. False when no partner is working on it (or it is already on its way)."""
    request = await session.get(IllRequest, request_id, populate_existing=True)
    if request is None or request.state != S.REQUESTED:
        return False
    attempt = await current_attempt(session, request.id)
    partner = identity.policy.ill.partner(attempt.agency_id) if attempt is not None else None
    if attempt is None or partner is None or attempt.state not in ("asked", "supplying"):
        return False
    attempt.cancel_asked_at = now
    await _requesting_message(session, request, partner, "Cancel", identity, now)
    session.add(IllEvent(
        request_id=request.id, at=now, actor=request.telegram_id, actor_role="reader", from_status=S.REQUESTED.value,
        to_status=S.REQUESTED.value, detail="Cancel",
    ))
    return True


# -------------------------------------------------------------------------------------------------
# Lending: partners' requests to this library


LENDING_MOVES: dict[str, frozenset[str]] = {
    "received": frozenset({"will_supply", "loaned", "unfilled", "cancelled"}),
    "will_supply": frozenset({"loaned", "unfilled", "cancelled"}),
    "loaned": frozenset({"returned", "completed"}),
    "returned": frozenset({"completed"}),
}


def lending_buttons(lending: LendingRequest) -> list[list[list[Any]]]:
    """The staff's answers to a lending request that is ``state``, as outbox rows."""
    row: list[list[Any]] = []
    moves = LENDING_MOVES.get(lending.state, frozenset())
    if "will_supply" in moves:
        row.append(["ill_partners.btn_will_supply", f"illlw:{lending.id}:{lending.state}"])
    if "loaned" in moves:
        row.append([f"ill_partners.btn_shipped_{lending.kind}", f"illll:{lending.id}:{lending.state}"])
    if "unfilled" in moves:
        row.append(["ill_partners.btn_lend_unfilled", f"illlu:{lending.id}:{lending.state}"])
    if "completed" in moves and lending.kind == IllKind.LOAN:
        row.append(["ill_partners.btn_lend_completed", f"illlc:{lending.id}:{lending.state}"])
    return [row] if row else []


def lending_params(lending: LendingRequest, policy: Policy) -> dict[str, Any]:
    """The parameters of a lending request's staff card (``ill_partners.staff_lending``)."""
    return {
        "number": lending.number,
        "partner": partner_label(policy.ill.partner(lending.agency_id), lending.agency_id),
        "their_id": _esc(lending.their_request_id),
        "kind": {"zh": "复制" if lending.kind == IllKind.COPY else "借书", "en": lending.kind},
        "title": _esc(lending.title[:300]) or "—",
        "author": _esc(lending.author[:200]) or "—",
        "component": _esc(lending.component[:300]) or "—",
        "identifier": _esc(lending.identifier) or "—",
        "need_before": lending.need_before.isoformat() if lending.need_before else "—",
        "note": _esc(lending.note[:500]) or "—",
        "state": lending.state,
        "reason": _esc(lending.reason) or "—",
    }


async def _on_request(
    session: AsyncSession, message: iso.Request, partner: IllPartner, identity: Identity, now: dt.datetime
) -> iso.InvalidMessage | None:
    """A partner asks to borrow: the request reaches the staff queue."""
    their_id = message.header.requesting_request_id
    if not their_id:
        return iso.InvalidMessage(iso.ErrorType.UNRECOGNISED_DATA_VALUE, "requestingAgencyRequestId")
    existing = await session.scalar(select(LendingRequest).where(
        LendingRequest.agency_id == partner.agency_id, LendingRequest.their_request_id == their_id[:128]
    ))
    if existing is not None:  # asked again (Retry, Reminder): the same request, nothing new
        return None
    c = message.citation
    copy = message.service_type == "Copy"
    lending = LendingRequest(
        agency_id=partner.agency_id, their_request_id=their_id[:128], kind=IllKind.COPY if copy else IllKind.LOAN,
        title=c.title, author=c.author or c.author_of_component, component=c.title_of_component, pages=c.pages[:64],
        identifier=", ".join(f"{code} {value}" for code, value in c.identifiers)[:300],
        need_before=message.need_before, note=message.note, received_at=now,
    )
    session.add(lending)
    await session.flush()
    if identity.staff_chat_id is not None:
        await enqueue(
            session, identity.staff_chat_id, "ill_partners.staff_lending_new", lending_params(lending, identity.policy),
            kind="ill", priority=Priority.ALERT, buttons=lending_buttons(lending), dedupe_key=f"illx:lend:{lending.id}",
        )
    log.info("lending request %s from partner %s", lending.number, partner.agency_id)
    return None


async def _supplying_message(
    session: AsyncSession, lending: LendingRequest, partner: IllPartner, *, status: str, reason_for_message: str,
    identity: Identity, now: dt.datetime, reason_unfilled: str = "", answer: str = "", tag: str = "",
) -> None:
    message = iso.SupplyingAgencyMessage(
        header=_header(identity, partner, lending.their_request_id, now, lending=True),
        reason_for_message=reason_for_message, status=status, last_change=now, reason_unfilled=reason_unfilled,
        answer_yes_no=answer,
    )
    await _queue(
        session, partner, message, conversation=f"lend|{partner.agency_id}|{lending.their_request_id}",
        dedupe_key=f"lend|{partner.agency_id}|{lending.their_request_id}|{status}|{tag or reason_for_message}",
        summary=status, now=now,
    )


async def _on_requesting_message(
    session: AsyncSession, message: iso.RequestingAgencyMessage, partner: IllPartner, identity: Identity, now: dt.datetime
) -> iso.InvalidMessage | None:
    """The borrowing partner tells what it did with what the library lent (or asks to cancel)."""
    lending = await session.scalar(select(LendingRequest).where(
        LendingRequest.agency_id == partner.agency_id,
        LendingRequest.their_request_id == message.header.requesting_request_id[:128],
    ))
    if lending is None:
        return iso.InvalidMessage(
            iso.ErrorType.UNRECOGNISED_DATA_VALUE, f"requestingAgencyRequestId: {message.header.requesting_request_id}"
        )
    params = lending_params(lending, identity.policy) | {"action": message.action}
    action = message.action
    if action == "Cancel":
        if lending.state in ("received", "will_supply"):
            lending.state, lending.closed_at = "cancelled", now
            await _supplying_message(session, lending, partner, status="Cancelled", reason_for_message="CancelResponse",
                                     answer="Y", identity=identity, now=now)
        else:
            status = "CopyCompleted" if lending.kind == IllKind.COPY else "Loaned"
            await _supplying_message(session, lending, partner, status=status, reason_for_message="CancelResponse",
                                     answer="N", identity=identity, now=now, tag="cancel-no")
        params["state"] = lending.state
        await _tell_staff(session, identity, "ill_partners.staff_lending_action", params, f"lendact:{lending.id}:{action}")
    elif action == "ShippedReturn":
        if lending.state == "loaned":
            lending.state = "returned"
            if identity.staff_chat_id is not None:
                await enqueue(
                    session, identity.staff_chat_id, "ill_partners.staff_lending_returned", params, kind="ill",
                    priority=Priority.ALERT, buttons=lending_buttons(lending), dedupe_key=f"illx:lendret:{lending.id}",
                )
    elif action in ("Received", "Notification"):
        await _tell_staff(session, identity, "ill_partners.staff_lending_action", params, f"lendact:{lending.id}:{action}")
    elif action == "StatusRequest":
        status = {"received": "RequestReceived", "will_supply": "WillSupply", "unfilled": "Unfilled",
                  "cancelled": "Cancelled", "completed": "LoanCompleted"}.get(
            lending.state, "CopyCompleted" if lending.kind == IllKind.COPY else "Loaned")
        await _supplying_message(session, lending, partner, status=status, reason_for_message="StatusRequestResponse",
                                 identity=identity, now=now, tag=f"status-{now.isoformat()}")
    else:  # Renew, ShippedForward: not offered by this library
        return iso.InvalidMessage(iso.ErrorType.UNSUPPORTED_ACTION_TYPE, action)
    return None


@dataclass(frozen=True)
class LendingResult:
    refusal: str | None  # None, or ill_partners.refused_<value>: not_found, stale, bad_reason
    lending: LendingRequest | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None


async def answer_lending(
    session: AsyncSession, lending_id: int, target: str, *, actor: int, expected: str, identity: Identity,
    now: dt.datetime, reason: str = "",
) -> LendingResult:
    """Staff answer a partner's request: ``will_supply``, ``loaned`` (the copy sent, for a copy),
    ``unfilled`` (with a reason of :data:`LENDING_REASONS`) or ``completed`` (the book is back); the
    partner is sent the matching supplyingAgencyMessage."""
    lending = await session.get(LendingRequest, lending_id, populate_existing=True)
    if lending is None:
        return LendingResult("not_found")
    if lending.state != expected or target not in LENDING_MOVES.get(lending.state, frozenset()):
        return LendingResult("stale", lending)
    if target == "unfilled" and reason not in LENDING_REASONS:
        return LendingResult("bad_reason", lending)
    partner = identity.policy.ill.partner(lending.agency_id)
    if partner is None:
        return LendingResult("no_partners", lending)
    values: dict[str, Any] = {"state": target, "handled_by": lending.handled_by or actor}
    values["answered_at"] = lending.answered_at or now
    if target == "loaned":
        values["shipped_at"] = now
    if target in ("unfilled", "completed"):
        values["closed_at"] = now
    if target == "unfilled":
        values["reason"] = reason
    moved = await session.execute(
        update(LendingRequest).where(LendingRequest.id == lending.id, LendingRequest.state == expected).values(**values)
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        return LendingResult("stale", lending)
    await session.refresh(lending)
    first = expected == "received"
    response = "RequestResponse" if first else "StatusChange"
    if target == "will_supply":
        status = "WillSupply"
    elif target == "loaned":
        status = "CopyCompleted" if lending.kind == IllKind.COPY else "Loaned"
    elif target == "unfilled":
        status = "Unfilled"
    else:
        status = "LoanCompleted"
    await _supplying_message(session, lending, partner, status=status, reason_for_message=response,
                             reason_unfilled=reason, identity=identity, now=now)
    return LendingResult(None, lending)


async def lending_queue(session: AsyncSession) -> list[LendingRequest]:
    """Lending requests still waiting for the library, oldest first."""
    query = (
        select(LendingRequest).where(LendingRequest.state.in_(("received", "will_supply", "loaned", "returned")))
        .order_by(LendingRequest.received_at, LendingRequest.id)
    )
    return list(await session.scalars(query))


async def get_lending(session: AsyncSession, lending_id: int) -> LendingRequest | None:
    """One lending request by id."""
    return await session.get(LendingRequest, lending_id, populate_existing=True)


# -------------------------------------------------------------------------------------------------
# Incoming messages


def _digest(data: bytes, message: iso.Message) -> str:
    """What makes a message this message: a repeat delivery has the same digest; a new one does not."""
    if isinstance(message, iso.Confirmation):
        return hashlib.sha256(data).hexdigest()
    header = message.header
    parts = [message.kind.value, str(header.supplying), str(header.requesting), header.requesting_request_id,
             header.timestamp.isoformat()]
    if isinstance(message, iso.SupplyingAgencyMessage):
        parts += [message.reason_for_message, message.status, message.answer_yes_no, message.reason_unfilled, message.note]
    elif isinstance(message, iso.RequestingAgencyMessage):
        parts += [message.action, message.note]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


async def handle_incoming(session: AsyncSession, data: bytes, identity: Identity, now: dt.datetime) -> bytes:
    """Process one message a partner POSTed and return the confirmation to answer with (always a valid
    ISO 18626 message: ERROR with BadlyFormedMessage, UnrecognisedDataValue … when it cannot be used)."""
    try:
        message = iso.parse(data)
    except iso.InvalidMessage as error:
        log.info("ISO 18626 message refused: %s", error.error_type)
        return iso.to_xml(iso.confirm(None, now, kind=error.kind, error=error))
    if isinstance(message, iso.Confirmation):  # confirmations answer our POSTs; they are never POSTed to us
        unexpected = iso.InvalidMessage(iso.ErrorType.UNRECOGNISED_DATA_ELEMENT, message.kind.value)
        return iso.to_xml(iso.confirm(None, now, error=unexpected))
    ours, theirs = (
        (message.header.requesting, message.header.supplying) if isinstance(message, iso.SupplyingAgencyMessage)
        else (message.header.supplying, message.header.requesting)
    )
    partner = identity.policy.ill.partner(str(theirs))
    problem: iso.InvalidMessage | None = None
    if str(ours) != str(identity.agency):
        side = "requestingAgencyId" if isinstance(message, iso.SupplyingAgencyMessage) else "supplyingAgencyId"
        problem = iso.InvalidMessage(iso.ErrorType.UNRECOGNISED_DATA_VALUE, f"{side}: {ours}")
    elif partner is None:
        side = "supplyingAgencyId" if isinstance(message, iso.SupplyingAgencyMessage) else "requestingAgencyId"
        problem = iso.InvalidMessage(iso.ErrorType.UNRECOGNISED_DATA_VALUE, f"{side}: {theirs}")
    if problem is not None or partner is None:
        return iso.to_xml(iso.confirm(message, now, error=problem))
    key = _digest(data, message)
    seen = await session.get(PartnerInbox, key)
    if seen is not None and seen.answer:
        log.info("ISO 18626 %s from %s delivered again: answered as before", message.kind, partner.agency_id)
        return seen.answer.encode("utf-8")
    inbox = PartnerInbox(key=key, kind=message.kind.value, received_at=now)
    try:
        async with session.begin_nested():
            session.add(inbox)
    except IntegrityError:  # the same message, being processed by a concurrent delivery
        return iso.to_xml(iso.confirm(message, now))
    if isinstance(message, iso.SupplyingAgencyMessage):
        problem = await _on_supplying_message(session, message, partner, identity, now)
    elif isinstance(message, iso.Request):
        problem = await _on_request(session, message, partner, identity, now)
    else:
        problem = await _on_requesting_message(session, message, partner, identity, now)
    answer = iso.to_xml(iso.confirm(message, now, error=problem))
    if problem is not None:
        await session.delete(inbox)  # an error changes nothing: a corrected repeat is processed
    else:
        inbox.answer = answer.decode("utf-8")
    log.info("ISO 18626 %s from %s: %s", message.kind, partner.agency_id, "OK" if problem is None else problem.error_type)
    return answer


# -------------------------------------------------------------------------------------------------
# Figures per partner


@dataclass
class PartnerFigures:
    """One partner's figures for a period, as borrower (the library asked it) and as lender."""

    agency_id: str
    name: dict[str, str]
    borrowed: int = 0  # the library's requests sent to this partner
    borrowed_filled: int = 0
    borrowed_declined: int = 0
    borrowed_days: list[float] = field(default_factory=list)  # asked → Loaned/CopyCompleted
    lent: int = 0  # this partner's requests to the library
    lent_filled: int = 0
    lent_unfilled: int = 0
    lent_days: list[float] = field(default_factory=list)  # received → shipped

    @property
    def borrowed_fill_rate(self) -> float | None:
        decided = self.borrowed_filled + self.borrowed_declined
        return self.borrowed_filled / decided if decided else None

    @property
    def lent_fill_rate(self) -> float | None:
        decided = self.lent_filled + self.lent_unfilled
        return self.lent_filled / decided if decided else None

    @property
    def borrowed_turnaround_days(self) -> float | None:
        return statistics.fmean(self.borrowed_days) if self.borrowed_days else None

    @property
    def lent_turnaround_days(self) -> float | None:
        return statistics.fmean(self.lent_days) if self.lent_days else None


def _days(start: dt.datetime, end: dt.datetime) -> float:
    return max(0.0, (end - start).total_seconds() / 86400)


async def partner_figures(
    session: AsyncSession, policy: Policy, start: dt.datetime | None, end: dt.datetime | None
) -> list[PartnerFigures]:
    """Requests, fill rate and turnaround per partner for requests made from ``start`` to before ``end``
    (UTC; None = unbounded), in rota order, then partners no longer listed."""
    figures: dict[str, PartnerFigures] = {
        p.agency_id: PartnerFigures(p.agency_id, partner_label(p)) for p in policy.ill.partners
    }

    def of(agency_id: str) -> PartnerFigures:
        if agency_id not in figures:
            figures[agency_id] = PartnerFigures(agency_id, partner_label(None, agency_id))
        return figures[agency_id]

    asked = select(PartnerAttempt)
    lent = select(LendingRequest)
    if start is not None:
        asked = asked.where(PartnerAttempt.asked_at >= start)
        lent = lent.where(LendingRequest.received_at >= start)
    if end is not None:
        asked = asked.where(PartnerAttempt.asked_at < end)
        lent = lent.where(LendingRequest.received_at < end)
    for attempt in await session.scalars(asked):
        f = of(attempt.agency_id)
        f.borrowed += 1
        if attempt.shipped_at is not None:
            f.borrowed_filled += 1
            f.borrowed_days.append(_days(attempt.asked_at, attempt.shipped_at))
        elif attempt.state == "declined":
            f.borrowed_declined += 1
    for lending in await session.scalars(lent):
        f = of(lending.agency_id)
        f.lent += 1
        if lending.shipped_at is not None:
            f.lent_filled += 1
            f.lent_days.append(_days(lending.received_at, lending.shipped_at))
        elif lending.state == "unfilled":
            f.lent_unfilled += 1
    return list(figures.values())


def identity_of(agency_id: str | None, policy: Policy, staff_chat_id: int | None) -> Identity | None:
    """The library's identity on the wire, or None when no agency id is configured (no exchange)."""
    if not agency_id:
        return None
    return Identity(iso.AgencyId.parse(agency_id), policy, staff_chat_id)


def names_of(agency_ids: Sequence[str], policy: Policy) -> dict[str, dict[str, str]]:
    """Partners' names by agency id, bilingual."""
    return {a: partner_label(policy.ill.partner(a), a) for a in agency_ids}


PARTNER_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Partner libraries (ISO 18626)",
        "line": "{name} ({agency}) — as borrower: {borrowed} requests, fill rate {b_rate}, turnaround {b_days}; "
                "as lender: {lent} requests, fill rate {l_rate}, turnaround {l_days}",
        "days": "{d:.1f} days",
        "none": "—",
    },
    "zh": {
        "title": "合作馆（ISO 18626）",
        "line": "{name}（{agency}）— 本馆借入：请求 {borrowed} 件，满足率 {b_rate}，平均响应时间 {b_days}；"
                "本馆借出：请求 {lent} 件，满足率 {l_rate}，平均响应时间 {l_days}",
        "days": "{d:.1f} 天",
        "none": "—",
    },
}


def partner_text(figures: Sequence[PartnerFigures], lang: str) -> list[str]:
    """The per-partner lines of the statistics report (none when there are no partners)."""
    if not figures:
        return []
    w = PARTNER_LABELS[lang if lang in PARTNER_LABELS else "en"]

    def rate(value: float | None, filled: int, decided: int) -> str:
        return f"{value * 100:.0f}% ({filled}/{decided})" if value is not None else w["none"]

    def days(value: float | None) -> str:
        return w["days"].format(d=value) if value is not None else w["none"]

    lines = [w["title"]]
    for f in figures:
        lines.append(w["line"].format(
            name=f.name.get(lang, f.name.get("en", f.agency_id)), agency=f.agency_id, borrowed=f.borrowed,
            b_rate=rate(f.borrowed_fill_rate, f.borrowed_filled, f.borrowed_filled + f.borrowed_declined),
            b_days=days(f.borrowed_turnaround_days), lent=f.lent,
            l_rate=rate(f.lent_fill_rate, f.lent_filled, f.lent_filled + f.lent_unfilled),
            l_days=days(f.lent_turnaround_days),
        ))
    return lines


def partner_csv_rows(figures: Sequence[PartnerFigures]) -> list[list[Any]]:
    """The per-partner rows of the statistics CSV: ``partners,<metric>,<agency id>,<value>``."""

    def num(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    rows: list[list[Any]] = []
    for f in figures:
        rows += [
            ["partners", "borrowed_requests", f.agency_id, f.borrowed],
            ["partners", "borrowed_filled", f.agency_id, f.borrowed_filled],
            ["partners", "borrowed_fill_rate", f.agency_id, num(f.borrowed_fill_rate)],
            ["partners", "borrowed_turnaround_days", f.agency_id, num(f.borrowed_turnaround_days)],
            ["partners", "lent_requests", f.agency_id, f.lent],
            ["partners", "lent_filled", f.agency_id, f.lent_filled],
            ["partners", "lent_fill_rate", f.agency_id, num(f.lent_fill_rate)],
            ["partners", "lent_turnaround_days", f.agency_id, num(f.lent_turnaround_days)],
        ]
    return rows
