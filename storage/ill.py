"""Interlibrary loan and document delivery (馆际互借 / 文献传递): the request, its history, the state
machine, the checks on what a reader types, and every notice a status change causes.

A request carries what an ISO 18626 ``Request`` message needs (request type, service type, the
citation and its identifiers, need-before date, pick-up location, copyright compliance), so staff
can pass it on to a partner library unchanged (:func:`iso18626_request`).

The state machine::

    submitted → in_review → requested (from a partner) → received → available → completed
        ↘ unfilled (with a reason): from submitted, in_review or requested
        ↘ cancelled: from submitted or in_review (by the reader, or by staff for them)

Statuses only move forward, so "the status is still what the button showed" is enough to know that
nobody moved the request in between (:class:`Refusal.STALE`); the move itself is a conditional
UPDATE, so two staff members pressing at once cannot both succeed.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ForeignKey, String, Text, cast, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from stdnum import isbn as stdnum_isbn
from stdnum import issn as stdnum_issn
from stdnum.exceptions import InvalidChecksum, ValidationError

from storage.catalog import Item, Record
from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue
from storage.people import Reader, StaffMember, User
from storage.policy import Policy

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------
# Statuses and the state machine


class IllKind(enum.StrEnum):
    """The ISO 18626 service type: a returnable loan, or a copy the reader keeps."""

    LOAN = "loan"  # loan of a book
    COPY = "copy"  # copy of an article or a chapter


class IllStatus(enum.StrEnum):
    SUBMITTED = "submitted"
    IN_REVIEW = "in_review"
    REQUESTED = "requested"  # asked of a named partner library
    RECEIVED = "received"  # arrived from the partner
    AVAILABLE = "available"  # ready for pick-up, or delivered electronically
    COMPLETED = "completed"
    UNFILLED = "unfilled"
    CANCELLED = "cancelled"


S = IllStatus
TRANSITIONS: dict[IllStatus, frozenset[IllStatus]] = {
    S.SUBMITTED: frozenset({S.IN_REVIEW, S.UNFILLED, S.CANCELLED}),
    S.IN_REVIEW: frozenset({S.REQUESTED, S.UNFILLED, S.CANCELLED}),
    S.REQUESTED: frozenset({S.RECEIVED, S.UNFILLED}),
    S.RECEIVED: frozenset({S.AVAILABLE}),
    S.AVAILABLE: frozenset({S.COMPLETED}),
    S.COMPLETED: frozenset(),
    S.UNFILLED: frozenset(),
    S.CANCELLED: frozenset(),
}
ORDER = list(IllStatus)
CLOSED = frozenset({S.COMPLETED, S.UNFILLED, S.CANCELLED})
OPEN = frozenset(set(IllStatus) - CLOSED)
CANCELLABLE = frozenset({S.SUBMITTED, S.IN_REVIEW})
FILLED = frozenset({S.AVAILABLE, S.COMPLETED})  # the library got it for the reader

# Why a request could not be filled; each has its reader notice ``ill.notice_unfilled_<reason>``.
UNFILLED_REASONS = ("not_available", "not_in_time", "copyright", "cost", "held_locally", "citation", "other")


class Refusal(enum.StrEnum):
    """Why a move was refused; each has the message ``ill.refused_<value>``."""

    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"  # a reader acting on someone else's request
    STAFF_ONLY = "staff_only"  # a reader trying a move only staff make
    STALE = "stale"  # somebody moved it since the button was shown
    SAME = "same"  # it already has that status
    CLOSED = "closed"  # completed, unfilled or cancelled: nothing moves it any more
    TOO_LATE_TO_CANCEL = "too_late_to_cancel"  # already requested from a partner
    NOT_ALLOWED = "not_allowed"  # skips a step or goes backwards
    NEEDS_PARTNER = "needs_partner"
    NEEDS_REASON = "needs_reason"


def check_transition(current: IllStatus, target: IllStatus) -> Refusal | None:
    """None when a request that is ``current`` may become ``target``; otherwise why not."""
    if target in TRANSITIONS[current]:
        return None
    if current == target:
        return Refusal.SAME
    if current in CLOSED:
        return Refusal.CLOSED
    if target == S.CANCELLED:
        return Refusal.TOO_LATE_TO_CANCEL
    return Refusal.NOT_ALLOWED


def staff_next_steps(status: IllStatus) -> list[IllStatus]:
    """The moves staff are offered as buttons for a request that is ``status``, in order."""
    return [s for s in ORDER if s in TRANSITIONS[status] and s != S.CANCELLED]


# -------------------------------------------------------------------------------------------------
# Models


class IllRequest(Base):
    """One interlibrary loan or document delivery request of a reader."""

    __tablename__ = "ill_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The form the request came from: pressing Submit twice finds the request made the first time.
    form_token: Mapped[str] = mapped_column(String(64), unique=True)
    telegram_id: Mapped[int | None] = mapped_column(index=True)  # who asked (notices go here)
    reader_id: Mapped[int | None] = mapped_column(index=True)  # their card, when linked
    request_type: Mapped[str] = mapped_column(String(16), default="New")  # ISO 18626 RequestType
    kind: Mapped[str] = mapped_column(String(8))  # ISO 18626 ServiceType (Loan / Copy)
    title: Mapped[str] = mapped_column(Text)  # the book, or the article or chapter
    author: Mapped[str] = mapped_column(Text, default="")
    isbn: Mapped[str] = mapped_column(String(17), default="")  # ISBN-13, compact
    issn: Mapped[str] = mapped_column(String(9), default="")  # NNNN-NNNN
    doi: Mapped[str] = mapped_column(String(256), default="")
    journal: Mapped[str] = mapped_column(Text, default="")  # copies: the journal or the book holding the chapter
    volume: Mapped[str] = mapped_column(String(32), default="")
    issue: Mapped[str] = mapped_column(String(32), default="")
    pages: Mapped[str] = mapped_column(String(64), default="")
    publisher: Mapped[str] = mapped_column(Text, default="")
    year: Mapped[str] = mapped_column(String(8), default="")
    need_before: Mapped[dt.date | None]
    pickup_branch: Mapped[str] = mapped_column(String(32), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    copyright_compliance: Mapped[str] = mapped_column(String(32), default="")  # ISO 18626 CopyrightCompliance
    copyright_accepted_at: Mapped[dt.datetime | None]
    holding_record_id: Mapped[int | None]  # the library's own record the reader was shown, if any
    status: Mapped[str] = mapped_column(String(16), default=S.SUBMITTED, index=True)
    partner: Mapped[str] = mapped_column(String(256), default="")  # the supplying library
    unfilled_reason: Mapped[str] = mapped_column(String(32), default="")
    handled_by: Mapped[int | None]  # the staff member who took it
    submitted_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    available_at: Mapped[dt.datetime | None]
    closed_at: Mapped[dt.datetime | None]
    rating: Mapped[int | None]  # 1–5, given by the reader after completion
    rated_at: Mapped[dt.datetime | None]

    @property
    def number(self) -> str:
        return request_number(self.id)

    @property
    def state(self) -> IllStatus:
        return IllStatus(self.status)

    @property
    def identifier(self) -> str:
        """The request's ISBN, ISSN or DOI as a person would read it ('' when none was given)."""
        if self.isbn:
            return "ISBN " + format_isbn(self.isbn)
        if self.issn:
            return "ISSN " + self.issn
        if self.doi:
            return "DOI " + self.doi
        return ""


class IllEvent(Base):
    """One step of a request's history: who moved it, when, from what to what."""

    __tablename__ = "ill_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("ill_requests.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[int | None]  # Telegram id; None for the system or an erased reader
    actor_role: Mapped[str] = mapped_column(String(16), default="reader")  # reader, staff
    from_status: Mapped[str | None] = mapped_column(String(16))  # None when the request was made
    to_status: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(String(256), default="")  # the partner, or the reason code


class IllWatcher(Base):
    """A staff member who asked to hear of every new request privately (not only in the staff chat)."""

    __tablename__ = "ill_watchers"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    since: Mapped[dt.datetime] = mapped_column(default=utcnow)


def request_number(request_id: int) -> str:
    """How people quote a request: ``ILL-000042``."""
    return f"ILL-{request_id:06d}"


# -------------------------------------------------------------------------------------------------
# Checking what a reader types


LIMITS = {
    "title": 500, "author": 300, "journal": 300, "publisher": 200, "volume": 20, "issue": 20,
    "pages": 40, "note": 1000, "partner": 200,
}
SKIP_WORDS = frozenset({"-", "—", "skip", "/skip", "none", "跳过", "无", "没有"})


@dataclass(frozen=True)
class Invalid:
    """Why an answer was refused: the message ``ill.invalid_<code>`` with ``params``."""

    code: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Identifier:
    scheme: str  # isbn, issn or doi
    value: str  # ISBN-13 compact, ISSN NNNN-NNNN, or the DOI as 10.NNNN/…


def is_skip(text: str) -> bool:
    """True when the answer means "nothing to give here"."""
    return text.strip().casefold() in SKIP_WORDS


def clean_text(text: str, field_name: str) -> str | Invalid:
    """One line of text for ``field_name``: control characters removed, spaces collapsed, limited."""
    limit = LIMITS[field_name]
    keep_lines = field_name == "note"
    chars = (
        ch if ch == "\n" and keep_lines else " " if unicodedata.category(ch)[0] in "CZ" else ch
        for ch in text
    )
    cleaned = "".join(chars)
    if keep_lines:
        cleaned = "\n".join(" ".join(line.split()) for line in cleaned.split("\n")).strip()
    else:
        cleaned = " ".join(cleaned.split())
    if not cleaned:
        return Invalid("empty")
    if len(cleaned) > limit:
        return Invalid("too_long", {"limit": limit, "length": len(cleaned)})
    return cleaned


_DOI = re.compile(r"^10\.\d{4,9}/\S+$")
_DOI_PREFIX = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:\s*|doi\s+)", re.IGNORECASE)
_LABEL = re.compile(r"^(isbn|issn)(?:-1[03])?\s*:?\s*", re.IGNORECASE)


def parse_identifier(text: str) -> Identifier | Invalid:
    """An ISBN (-10 or -13, hyphens or not), an ISSN or a DOI, checked; otherwise what is wrong.

    A wrong check digit is named as such, so the reader looks for the typo rather than the format.
    """
    raw = text.strip()
    label = ""
    match = _LABEL.match(raw)
    if match:
        label = match.group(1).lower()
        raw = raw[match.end() :]
    doi = _DOI_PREFIX.sub("", raw).strip()
    if not label and (doi.startswith("10.") or doi != raw):
        if _DOI.match(doi) and len(doi) <= 256:
            return Identifier("doi", doi)
        return Invalid("bad_doi")
    compact = re.sub(r"[\s\-‐‑–—]", "", raw).upper()
    if not re.fullmatch(r"[0-9X]+", compact):
        return Invalid("bad_identifier")
    if label == "issn" or (not label and len(compact) == 8):
        try:
            return Identifier("issn", stdnum_issn.format(stdnum_issn.validate(compact)))
        except InvalidChecksum:
            return Invalid("bad_check_digit", {"scheme": "ISSN"})
        except ValidationError:
            return Invalid("bad_issn")
    try:
        return Identifier("isbn", stdnum_isbn.to_isbn13(stdnum_isbn.validate(compact)))
    except InvalidChecksum:
        return Invalid("bad_check_digit", {"scheme": "ISBN"})
    except ValidationError:
        return Invalid("bad_isbn" if label == "isbn" or len(compact) in (10, 13) else "bad_identifier")


def format_isbn(value: str) -> str:
    """An ISBN with its hyphens, when the ranges are known."""
    try:
        return str(stdnum_isbn.format(value))
    except ValidationError:
        return value


_DATE = re.compile(r"^(\d{4})\s*[-/.年]\s*(\d{1,2})\s*[-/.月]\s*(\d{1,2})\s*日?$")
MAX_NEED_AHEAD = dt.timedelta(days=3 * 365)


def parse_need_by(text: str, today: dt.date) -> dt.date | Invalid:
    """A needed-by date (2026-03-05, 2026/3/5, 2026年3月5日), today or later and within three years."""
    match = _DATE.match(text.strip())
    if not match:
        return Invalid("bad_date_format")
    try:
        day = dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return Invalid("no_such_date", {"date": text.strip()[:20]})
    if day < today:
        return Invalid("date_in_past", {"today": today.isoformat()})
    if day - today > MAX_NEED_AHEAD:
        return Invalid("date_too_far")
    return day


def parse_year(text: str, today: dt.date) -> str | Invalid:
    """A year of publication (four digits, 年 allowed), not after next year."""
    value = text.strip().removesuffix("年").strip()
    if not re.fullmatch(r"\d{4}", value) or not 1000 <= int(value) <= today.year + 1:
        return Invalid("bad_year", {"max": today.year + 1})
    return value


_PAGE = r"(?:\d+|[ivxlcdm]+)"
_PAGES = re.compile(rf"^{_PAGE}(?:\s*-\s*{_PAGE})?(?:\s*,\s*{_PAGE}(?:\s*-\s*{_PAGE})?)*$", re.IGNORECASE)


def parse_pages(text: str) -> str | Invalid:
    """Pages: ``45-67``, ``pp. 45–67``, ``12, 14-20`` or roman numerals; normalised to ``45-67``."""
    value = re.sub(r"^(?:pp?\.?|pages?|页码?|第)\s*", "", text.strip(), flags=re.IGNORECASE).rstrip("页 ")
    value = re.sub(r"[‐‑–—~～至]", "-", value)
    if len(value) > LIMITS["pages"] or not _PAGES.match(value):
        return Invalid("bad_pages")
    return re.sub(r"\s*-\s*", "-", re.sub(r"\s*,\s*", ", ", value))


def parse_short(text: str, field_name: str) -> str | Invalid:
    """A volume or issue: short, on one line."""
    return clean_text(text, field_name)


# -------------------------------------------------------------------------------------------------
# The form (kept in the reader's user_data as plain JSON while they fill it in)


FORM_FIELDS = (
    "kind", "title", "author", "isbn", "issn", "doi", "journal", "volume", "issue", "pages",
    "publisher", "year", "need_before", "pickup_branch", "note", "copyright",
)
REQUIRED: dict[str, tuple[str, ...]] = {
    IllKind.LOAN: ("kind", "title", "pickup_branch"),
    IllKind.COPY: ("kind", "title", "journal", "pages", "pickup_branch", "copyright"),
}


def missing_fields(form: Mapping[str, Any], policy: Policy | None = None, today: dt.date | None = None) -> list[str]:
    """The required fields the form lacks (or holds a value no longer acceptable), in form order."""
    kind = form.get("kind")
    if kind not in (IllKind.LOAN, IllKind.COPY):
        return ["kind"]
    missing = [name for name in REQUIRED[kind] if not form.get(name)]
    if policy is not None and form.get("pickup_branch") and form["pickup_branch"] not in {
        b.code for b in policy.library.branches
    }:
        missing.append("pickup_branch")
    need = form.get("need_before")
    if need and today is not None:
        try:
            if dt.date.fromisoformat(need) < today:
                missing.append("need_before")
        except ValueError:
            missing.append("need_before")
    return [name for name in FORM_FIELDS if name in missing]


def norm_title(text: str) -> str:
    """A title folded for comparison: case, width, punctuation and spacing ignored."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if ch.isalnum())


# -------------------------------------------------------------------------------------------------
# Submission


@dataclass(frozen=True)
class SubmitResult:
    request: IllRequest | None
    created: bool  # False: this form had been submitted already (``request`` is that one)
    missing: list[str] = field(default_factory=list)


async def submit_request(
    session: AsyncSession,
    form: Mapping[str, Any],
    *,
    token: str,
    telegram_id: int,
    reader_id: int | None,
    now: dt.datetime,
    policy: Policy,
    today: dt.date,
    staff_chat_id: int | None,
) -> SubmitResult:
    """Make the request from a filled form, once per form ``token``, and alert the staff.

    A form missing a required field (a forged or stale Submit) makes nothing and says what is missing.
    """
    existing = await session.scalar(select(IllRequest).where(IllRequest.form_token == token))
    if existing is not None:
        return SubmitResult(existing, created=False)
    missing = missing_fields(form, policy, today)
    if missing:
        return SubmitResult(None, created=False, missing=missing)
    need = form.get("need_before")
    request = IllRequest(
        form_token=token,
        telegram_id=telegram_id,
        reader_id=reader_id,
        kind=form["kind"],
        title=form["title"],
        author=form.get("author") or "",
        isbn=form.get("isbn") or "",
        issn=form.get("issn") or "",
        doi=form.get("doi") or "",
        journal=form.get("journal") or "" if form["kind"] == IllKind.COPY else "",
        volume=form.get("volume") or "" if form["kind"] == IllKind.COPY else "",
        issue=form.get("issue") or "" if form["kind"] == IllKind.COPY else "",
        pages=form.get("pages") or "" if form["kind"] == IllKind.COPY else "",
        publisher=form.get("publisher") or "",
        year=form.get("year") or "",
        need_before=dt.date.fromisoformat(need) if need else None,
        pickup_branch=form["pickup_branch"],
        note=form.get("note") or "",
        copyright_compliance="reader-declaration" if form["kind"] == IllKind.COPY else "",
        copyright_accepted_at=now if form["kind"] == IllKind.COPY else None,
        holding_record_id=form.get("holding_record_id"),
        status=S.SUBMITTED,
        submitted_at=now,
        updated_at=now,
    )
    try:
        async with session.begin_nested():  # a second Submit racing this one hits the unique token
            session.add(request)
    except IntegrityError:
        existing = await session.scalar(select(IllRequest).where(IllRequest.form_token == token))
        return SubmitResult(existing, created=False)
    session.add(IllEvent(request_id=request.id, at=now, actor=telegram_id, actor_role="reader", to_status=S.SUBMITTED))
    await _alert_staff_new(session, request, policy, staff_chat_id)
    log.info("ILL request %s submitted", request.number)
    return SubmitResult(request, created=True)


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def branch_name(policy: Policy, code: str) -> dict[str, str]:
    """A pick-up branch as a bilingual parameter (the code itself for a branch no longer listed)."""
    for branch in policy.library.branches:
        if branch.code == code:
            return {"zh": branch.name_zh, "en": branch.name_en}
    return {"zh": code, "en": code}


async def requester_label(session: AsyncSession, request: IllRequest) -> str:
    """The reader behind a request as staff see it: name and card (escaped), or the Telegram id."""
    if request.reader_id is not None:
        reader = await session.get(Reader, request.reader_id)
        if reader is not None:
            return f"{_esc(reader.name)} ({_esc(reader.card_number)})"
    if request.telegram_id is not None:
        user = await session.get(User, request.telegram_id)
        name = _esc(user.first_name) if user is not None and user.first_name else ""
        return f"{name} (Telegram {request.telegram_id})".strip()
    return "—"


def staff_params(request: IllRequest, policy: Policy, requester: str) -> dict[str, Any]:
    """The parameters of the staff card of a request (``ill.staff_card_loan`` / ``_copy``)."""
    return {
        "number": request.number,
        "title": _esc(request.title),
        "author": _esc(request.author) or "—",
        "identifier": _esc(request.identifier) or "—",
        "journal": _esc(request.journal) or "—",
        "volume": _esc(request.volume) or "—",
        "issue": _esc(request.issue) or "—",
        "pages": _esc(request.pages) or "—",
        "publisher": _esc(request.publisher) or "—",
        "year": _esc(request.year) or "—",
        "need_before": request.need_before.isoformat() if request.need_before else "—",
        "branch": branch_name(policy, request.pickup_branch),
        "note": _esc(request.note) or "—",
        "requester": requester,
        "partner": _esc(request.partner) or "—",
        "submitted": request.submitted_at.strftime("%Y-%m-%d %H:%M UTC"),
    }


def staff_buttons(request: IllRequest) -> list[list[list[Any]]]:
    """The buttons that move a request on, as outbox rows (label key, callback data)."""
    status = request.state
    row: list[list[Any]] = []
    for target in staff_next_steps(status):
        if target == S.REQUESTED:
            row.append(["ill.btn_requested", f"illpt:{request.id}:{status}"])
        elif target == S.UNFILLED:
            row.append(["ill.btn_unfilled", f"illun:{request.id}:{status}"])
        else:
            row.append([f"ill.btn_{target}", f"illmv:{request.id}:{status}:{target}"])
    return [row] if row else []


async def _alert_staff_new(session: AsyncSession, request: IllRequest, policy: Policy, staff_chat_id: int | None) -> None:
    params = staff_params(request, policy, await requester_label(session, request))
    key = f"ill.staff_new_{request.kind}"
    buttons = staff_buttons(request)
    targets = [staff_chat_id] if staff_chat_id is not None else []
    targets += [w for w in await watchers(session) if w != request.telegram_id]
    for chat_id in targets:
        await enqueue(
            session, chat_id, key, params, kind="ill", priority=Priority.ALERT, buttons=buttons,
            dedupe_key=f"ill:{request.id}:new:{chat_id}",
        )


# -------------------------------------------------------------------------------------------------
# Moving a request on


@dataclass(frozen=True)
class MoveResult:
    refusal: Refusal | None
    request: IllRequest | None
    previous: IllStatus | None = None  # the status before the move (or the current one when refused)

    @property
    def ok(self) -> bool:
        return self.refusal is None


def owns(request: IllRequest, telegram_id: int, reader_id: int | None) -> bool:
    """True when the person made the request (or holds the card it was made with)."""
    return request.telegram_id == telegram_id or (reader_id is not None and request.reader_id == reader_id)


async def move_request(
    session: AsyncSession,
    request_id: int,
    target: IllStatus,
    *,
    actor: int,
    staff: bool,
    now: dt.datetime,
    policy: Policy,
    expected: IllStatus | None = None,
    reader_id: int | None = None,
    partner: str = "",
    reason: str = "",
    staff_chat_id: int | None = None,
) -> MoveResult:
    """Move a request to ``target`` for ``actor``, record who did it and when, and notify the reader.

    ``expected`` is the status the person saw (the button's): if the request moved since, the move
    is refused as STALE rather than applied on top of somebody else's. A reader (``staff=False``) may
    only cancel their own request. ``partner`` is required for ``requested``, ``reason`` (one of
    :data:`UNFILLED_REASONS`) for ``unfilled``.
    """
    request = await session.get(IllRequest, request_id, populate_existing=True)
    if request is None:
        return MoveResult(Refusal.NOT_FOUND, None)
    current = request.state
    if not staff:
        if not owns(request, actor, reader_id):
            return MoveResult(Refusal.NOT_YOURS, None)
        if target != S.CANCELLED:
            return MoveResult(Refusal.STAFF_ONLY, request, current)
    if expected is not None and expected != current:
        return MoveResult(Refusal.STALE, request, current)
    refusal = check_transition(current, target)
    if refusal is not None:
        return MoveResult(refusal, request, current)
    partner = " ".join(partner.split())[: LIMITS["partner"]]
    if target == S.REQUESTED and not partner:
        return MoveResult(Refusal.NEEDS_PARTNER, request, current)
    if target == S.UNFILLED and reason not in UNFILLED_REASONS:
        return MoveResult(Refusal.NEEDS_REASON, request, current)

    values: dict[str, Any] = {"status": target.value, "updated_at": now}
    if target == S.IN_REVIEW or (staff and request.handled_by is None):
        values["handled_by"] = actor
    if target == S.REQUESTED:
        values["partner"] = partner
    if target == S.UNFILLED:
        values["unfilled_reason"] = reason
    if target == S.AVAILABLE:
        values["available_at"] = now
    if target in CLOSED:
        values["closed_at"] = now
    # Conditional on the status read above: of two people pressing at once, one wins.
    moved = await session.execute(
        update(IllRequest).where(IllRequest.id == request_id, IllRequest.status == current.value).values(**values)
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        await session.refresh(request)
        return MoveResult(Refusal.STALE, request, request.state)
    await session.refresh(request)
    detail = partner if target == S.REQUESTED else reason if target == S.UNFILLED else ""
    session.add(IllEvent(
        request_id=request.id, at=now, actor=actor, actor_role="staff" if staff else "reader",
        from_status=current.value, to_status=target.value, detail=detail,
    ))
    await _notify(session, request, actor, policy, staff_chat_id)
    log.info("ILL request %s: %s → %s", request.number, current, target)
    return MoveResult(None, request, current)


async def _notify(
    session: AsyncSession, request: IllRequest, actor: int, policy: Policy, staff_chat_id: int | None
) -> None:
    """Tell the reader of the change in their language; tell the staff when the reader cancelled."""
    status = request.state
    params: dict[str, Any] = {
        "number": request.number,
        "title": _esc(request.title[:200]),
        "partner": _esc(request.partner),
        "branch": branch_name(policy, request.pickup_branch),
    }
    buttons = None
    key = f"ill.notice_{status}"
    if status == S.AVAILABLE:
        key = f"ill.notice_available_{request.kind}"
    elif status == S.UNFILLED:
        key = f"ill.notice_unfilled_{request.unfilled_reason}"
    elif status == S.COMPLETED:
        buttons = [[[f"={n}", f"illrt:{request.id}:{n}"] for n in range(1, 6)]]
    by_reader = actor == request.telegram_id
    if request.telegram_id is not None and not (status == S.CANCELLED and by_reader):
        await enqueue(
            session, request.telegram_id, key, params, kind="ill", buttons=buttons,
            dedupe_key=f"ill:{request.id}:{status}:{request.telegram_id}",
        )
    if status == S.CANCELLED and by_reader:
        chats = {c for c in (staff_chat_id, request.handled_by) if c is not None}
        for chat_id in chats:
            await enqueue(
                session, chat_id, "ill.staff_cancelled", params, kind="ill", priority=Priority.ALERT,
                dedupe_key=f"ill:{request.id}:cancelled:{chat_id}",
            )


# -------------------------------------------------------------------------------------------------
# Rating


class RateOutcome(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"
    NOT_COMPLETED = "not_completed"
    ALREADY = "already"
    INVALID = "invalid"


async def rate_request(
    session: AsyncSession, request_id: int, telegram_id: int, reader_id: int | None, rating: int, now: dt.datetime
) -> RateOutcome:
    """Record the reader's 1–5 rating of a completed request, once."""
    if not 1 <= rating <= 5:
        return RateOutcome.INVALID
    request = await session.get(IllRequest, request_id)
    if request is None:
        return RateOutcome.NOT_FOUND
    if not owns(request, telegram_id, reader_id):
        return RateOutcome.NOT_YOURS
    if request.state != S.COMPLETED:
        return RateOutcome.NOT_COMPLETED
    done = await session.execute(
        update(IllRequest).where(IllRequest.id == request_id, IllRequest.rating.is_(None)).values(rating=rating, rated_at=now)
    )
    return RateOutcome.OK if done.rowcount else RateOutcome.ALREADY  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------------------
# Lists and look-ups


async def get_request(session: AsyncSession, request_id: int) -> IllRequest | None:
    """One request by id."""
    return await session.get(IllRequest, request_id, populate_existing=True)


async def requests_of(session: AsyncSession, telegram_id: int, reader_id: int | None) -> list[IllRequest]:
    """A reader's requests, newest first (made in this chat, or with their card)."""
    mine = IllRequest.telegram_id == telegram_id
    if reader_id is not None:
        mine = mine | (IllRequest.reader_id == reader_id)
    return list(await session.scalars(select(IllRequest).where(mine).order_by(IllRequest.submitted_at.desc(), IllRequest.id.desc())))


async def request_by_token(session: AsyncSession, token: str) -> IllRequest | None:
    """The request a form made, if it was submitted."""
    return await session.scalar(select(IllRequest).where(IllRequest.form_token == token[:64]))


async def recent_partners(session: AsyncSession, limit: int = 5) -> list[str]:
    """The partner libraries asked most recently, for quick buttons."""
    last = func.max(IllRequest.updated_at)
    query = (
        select(IllRequest.partner).where(IllRequest.partner != "").group_by(IllRequest.partner)
        .order_by(last.desc()).limit(limit)
    )
    return list(await session.scalars(query))


async def open_queue(session: AsyncSession, status: IllStatus | None = None) -> list[IllRequest]:
    """Open requests (or those of one status), oldest first: the staff queue."""
    wanted = [status.value] if status is not None else [s.value for s in ORDER if s in OPEN]
    query = select(IllRequest).where(IllRequest.status.in_(wanted)).order_by(IllRequest.submitted_at, IllRequest.id)
    return list(await session.scalars(query))


async def open_duplicates(
    session: AsyncSession, form: Mapping[str, Any], telegram_id: int, reader_id: int | None
) -> list[IllRequest]:
    """The reader's open requests for the same thing: same ISBN/ISSN/DOI, or same kind and title."""
    same: list[IllRequest] = []
    title = norm_title(form.get("title") or "")
    for request in await requests_of(session, telegram_id, reader_id):
        if request.state not in OPEN:
            continue
        same_id = any(form.get(k) and form.get(k) == getattr(request, k) for k in ("isbn", "doi"))
        same_id = same_id or (
            form.get("kind") == IllKind.LOAN == request.kind and bool(form.get("issn")) and form.get("issn") == request.issn
        )
        same_title = bool(title) and request.kind == form.get("kind") and norm_title(request.title) == title
        if same_id or same_title:
            same.append(request)
    return same


async def history(session: AsyncSession, request_id: int) -> list[IllEvent]:
    """The events of a request, oldest first."""
    query = select(IllEvent).where(IllEvent.request_id == request_id).order_by(IllEvent.at, IllEvent.id)
    return list(await session.scalars(query))


async def staff_names(session: AsyncSession, ids: Sequence[int | None]) -> dict[int, str]:
    """Names of staff members by Telegram id (for "moved by …")."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    rows = await session.execute(select(StaffMember.telegram_id, StaffMember.name).where(StaffMember.telegram_id.in_(wanted)))
    return {uid: name or str(uid) for uid, name in rows}


async def watchers(session: AsyncSession) -> list[int]:
    """Staff who hear of every new request privately."""
    return list(await session.scalars(select(IllWatcher.telegram_id).order_by(IllWatcher.telegram_id)))


async def set_watching(session: AsyncSession, telegram_id: int, on: bool, now: dt.datetime) -> None:
    """Start or stop telling one staff member of every new request."""
    present = await session.get(IllWatcher, telegram_id)
    if on and present is None:
        session.add(IllWatcher(telegram_id=telegram_id, since=now))
    elif not on and present is not None:
        await session.delete(present)


# -------------------------------------------------------------------------------------------------
# Does the library hold it already?  (An adapter over the catalog module, which may not offer
# ``find_record`` / ``storage.search.search`` in every build: the plain tables are the fallback.)


@dataclass(frozen=True)
class Holding:
    record_id: int
    title: str
    author: str
    year: str
    call_number: str
    copies: int
    on_shelf: int


async def find_holding(session: AsyncSession, *, isbn: str = "", title: str = "", author: str = "") -> Holding | None:
    """The library's own record of this ISBN, or of this exact title (and author, when given)."""
    try:
        async with session.begin_nested():  # a failure is rolled back to here, the session stays usable
            record_id = await _record_by_isbn(session, isbn) if isbn else None
            if record_id is None and title:
                record_id = await _record_by_title(session, title, author)
    except Exception:  # the check is advice: a failing catalog look-up must not stop the request
        log.exception("catalog look-up failed while checking an ILL request against the holdings")
        return None
    record = await session.get(Record, record_id) if record_id is not None else None
    if record is None:
        return None
    statuses = list(await session.scalars(select(Item.status).where(Item.record_id == record.id)))
    return Holding(
        record_id=record.id, title=record.title, author=record.author or "", year=record.year or "",
        call_number=record.call_number or "", copies=len(statuses),
        on_shelf=sum(1 for s in statuses if s == "available"),
    )


def _catalog_function(module: str, name: str) -> Any:
    """``module.name`` when this build has it (the catalog and its search are another module's)."""
    try:
        return getattr(__import__(module, fromlist=[name]), name, None)
    except ImportError:
        return None


def _record_id(found: Any) -> int | None:
    """The record id of whatever the catalog answered: a record, a search hit, or nothing."""
    found = getattr(found, "record", found)
    value = getattr(found, "id", None) if not hasattr(found, "record_id") else found.record_id
    return value if isinstance(value, int) else None


async def _record_by_isbn(session: AsyncSession, isbn: str) -> int | None:
    find_record = _catalog_function("storage.catalog", "find_record")
    if find_record is not None:
        return _record_id(await find_record(session, isbn))
    # Without the catalog's identifier index: ISBNs are a JSON list of ISBN-13s in the record.
    query = select(Record.id).where(cast(Record.isbns, String).like(f'%"{isbn}"%')).limit(1)
    return await session.scalar(query)


async def _record_by_title(session: AsyncSession, title: str, author: str) -> int | None:
    wanted = norm_title(title)
    if len(wanted) < 2:
        return None
    search = _catalog_function("storage.search", "search")
    candidates: list[Any]
    if search is not None:
        found = await search(session, title, limit=5)
        candidates = list(getattr(found, "hits", found) or [])
    else:  # without the search index: titles starting with the words given
        candidates = list(await session.scalars(
            select(Record).where(func.lower(Record.title).like(title.strip().lower()[:200] + "%")).limit(10)
        ))
    # The search's folding (simplified/traditional, diacritics): 台湾 is the title 台灣 (#20).
    folding: Any = _catalog_function("storage.search", "fold") or str
    wanted = norm_title(folding(title))
    for hit in candidates:
        hit = getattr(hit, "record", hit)
        # A subtitle or statement of responsibility after " : " or " / " still counts as the same title.
        full = getattr(hit, "title", "") or ""
        if wanted not in (norm_title(folding(full)), norm_title(folding(re.split(r"\s[:：/=]\s?|：", full)[0]))):
            continue
        recorded = getattr(hit, "author", "") or ""
        if author and recorded and not _same_author(folding(author), folding(recorded)):
            continue
        record_id = _record_id(hit)
        if record_id is not None:
            return record_id
    return None


def _same_author(given: str, recorded: str) -> bool:
    a, b = norm_title(given), norm_title(recorded)
    return bool(a) and bool(b) and (a in b or b in a)


# -------------------------------------------------------------------------------------------------
# ISO 18626


def iso18626_request(request: IllRequest, requesting_agency: str = "") -> dict[str, Any]:
    """The request as the fields of an ISO 18626 ``Request`` message (for a partner library)."""
    copy = request.kind == IllKind.COPY
    ids = [
        {"BibliographicItemIdentifierCode": code, "BibliographicItemIdentifier": value}
        for code, value in (("ISBN", request.isbn), ("ISSN", request.issn), ("DOI", request.doi))
        if value
    ]
    biblio: dict[str, Any] = {"BibliographicItemId": ids}
    if copy:
        biblio |= {
            "Title": request.journal, "TitleOfComponent": request.title, "AuthorOfComponent": request.author,
            "Volume": request.volume, "Issue": request.issue, "PagesRequested": request.pages,
        }
    else:
        biblio |= {"Title": request.title, "Author": request.author}
    return {
        "Header": {
            "RequestingAgencyId": requesting_agency,
            "RequestingAgencyRequestId": request.number,
            "Timestamp": request.submitted_at.isoformat(),
        },
        "BibliographicInfo": biblio,
        "PublicationInfo": {"Publisher": request.publisher, "PublicationDate": request.year},
        "ServiceInfo": {
            "RequestType": request.request_type,
            "ServiceType": "Copy" if copy else "Loan",
            "NeedBeforeDate": request.need_before.isoformat() if request.need_before else None,
            "CopyrightCompliance": request.copyright_compliance or None,
            "Note": request.note,
        },
        "RequestedDeliveryInfo": {"Address": {"PhysicalAddress": {"Line1": request.pickup_branch}}},
    }


# -------------------------------------------------------------------------------------------------
# Privacy and the demo


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """Erase a reader's link to their requests (/forgetme).

    The requests themselves stay as anonymous rows, because a partner library may still be lending
    the book and the statistics count them; what ties them to the person (chat, card, note) goes.
    """
    mine = select(IllRequest.id).where(IllRequest.telegram_id == telegram_id)
    await session.execute(
        update(IllEvent).where(IllEvent.request_id.in_(mine), IllEvent.actor == telegram_id).values(actor=None)
    )
    await session.execute(
        update(IllRequest).where(IllRequest.telegram_id == telegram_id).values(telegram_id=None, reader_id=None, note="")
    )
    await session.execute(delete(IllWatcher).where(IllWatcher.telegram_id == telegram_id))


DEMO_STAFF_ID = 9001

_DEMO: list[tuple[str, str, str, dict[str, str], list[IllStatus], int, dict[str, Any]]] = [
    # kind, title, author, identifier fields, path of statuses, days ago submitted, extra
    ("loan", "乡土中国", "费孝通", {}, [S.SUBMITTED], 1, {}),
    ("copy", "Attention is all you need", "Vaswani, A. et al.",
     {"doi": "10.48550/arXiv.1706.03762", "journal": "Advances in Neural Information Processing Systems",
      "volume": "30", "pages": "5998-6008"}, [S.SUBMITTED, S.IN_REVIEW], 3, {}),
    ("loan", "The Structure of Scientific Revolutions", "Thomas S. Kuhn", {"isbn": "9780226458083"},
     [S.SUBMITTED, S.IN_REVIEW, S.REQUESTED], 9, {"partner": "北京大学图书馆 Peking University Library"}),
    ("loan", "Orientalism", "Edward W. Said", {"isbn": "9780394740676"},
     [S.SUBMITTED, S.IN_REVIEW, S.REQUESTED, S.RECEIVED, S.AVAILABLE], 16, {"partner": "清华大学图书馆 Tsinghua University Library"}),
    ("copy", "On the electrodynamics of moving bodies", "A. Einstein",
     {"journal": "Annalen der Physik", "volume": "17", "issue": "10", "pages": "891-921", "issn": "0003-3804"},
     [S.SUBMITTED, S.IN_REVIEW, S.REQUESTED, S.RECEIVED, S.AVAILABLE, S.COMPLETED], 30, {"partner": "CALIS 文献传递", "rating": 5}),
    ("loan", "万历十五年", "黄仁宇", {"isbn": "9787108009821"}, [S.SUBMITTED, S.IN_REVIEW, S.UNFILLED], 24,
     {"reason": "held_locally"}),
    ("copy", "A chapter on urban libraries", "Li Hua",
     {"journal": "Library Trends", "volume": "61", "issue": "2", "pages": "300-320", "issn": "0024-2594"},
     [S.SUBMITTED, S.CANCELLED], 12, {}),
]


async def seed_demo(session: AsyncSession, policy: Policy, now: dt.datetime, rng: Any, reader_user_ids: list[int]) -> None:
    """Sample requests in every state, spread over the last month, for the demo readers."""
    if await session.scalar(select(func.count()).select_from(IllRequest)):
        return
    users = reader_user_ids or [None]  # type: ignore[list-item]
    branch = policy.library.branches[0].code if policy.library.branches else ""
    for index, (kind, title, author, ids, path, days_ago, extra) in enumerate(_DEMO):
        uid = users[index % len(users)]
        reader_id = None
        if uid is not None:
            user = await session.get(User, uid)
            reader_id = user.reader_id if user is not None else None
        at = now - dt.timedelta(days=days_ago, hours=rng.randint(0, 8))
        request = IllRequest(
            form_token=f"demo-{index}", telegram_id=uid, reader_id=reader_id, kind=kind, title=title, author=author,
            isbn=ids.get("isbn", ""), issn=ids.get("issn", ""), doi=ids.get("doi", ""), journal=ids.get("journal", ""),
            volume=ids.get("volume", ""), issue=ids.get("issue", ""), pages=ids.get("pages", ""),
            need_before=(now + dt.timedelta(days=30)).date(), pickup_branch=branch,
            copyright_compliance="reader-declaration" if kind == IllKind.COPY else "",
            copyright_accepted_at=at if kind == IllKind.COPY else None,
            status=path[-1], submitted_at=at, updated_at=at,
        )
        session.add(request)
        await session.flush()
        previous: IllStatus | None = None
        for step, status in enumerate(path):
            when = at + dt.timedelta(days=step * 2, hours=step)
            staff = status not in (S.SUBMITTED, S.CANCELLED)
            detail = extra.get("partner", "") if status == S.REQUESTED else extra.get("reason", "") if status == S.UNFILLED else ""
            session.add(IllEvent(
                request_id=request.id, at=when, actor=DEMO_STAFF_ID if staff else uid,
                actor_role="staff" if staff else "reader", from_status=previous, to_status=status, detail=detail,
            ))
            previous = status
            request.updated_at = when
            if status == S.IN_REVIEW:
                request.handled_by = DEMO_STAFF_ID
            if status == S.REQUESTED:
                request.partner = extra["partner"]
            if status == S.AVAILABLE:
                request.available_at = when
            if status == S.UNFILLED:
                request.unfilled_reason = extra["reason"]
            if status in CLOSED:
                request.closed_at = when
        if "rating" in extra:
            request.rating = extra["rating"]
            request.rated_at = request.closed_at
    await session.flush()
