"""Circulation: loans, renewals and the holds queue, with the library's rules.

The rules (due dates, renewal, fines, notice levels) are pure functions of a loan, a reader's
standing, the policy and "now", so they are tested without a database. The store operations
(check out, return, renew, place and cancel a hold, expire holds, purge history) apply them in one
transaction each and write the notices they cause to the outbox in that same transaction.

Time: every timestamp is UTC; dates people see are dates in the library's time zone. A loan is due
at the end of its due date there (23:59:59 local), and it is overdue from the next local day on, so
"days overdue" counts whole local days after the due date.

Holds are title-level (on a record): a returned copy of the record goes to the first waiting hold
(oldest first) and waits on the hold shelf until the end of the pick-up deadline. A loan cannot be
renewed while another reader has a waiting hold on its record.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ForeignKey, Index, String, and_, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.catalog import Item, Record
from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue
from storage.people import Reader, User
from storage.policy import Circulation, Policy

DEFAULT_TZ = ZoneInfo("Asia/Shanghai")
END_OF_DAY = dt.time(23, 59, 59)


# --------------------------------------------------------------------------------------------------
# Models


class ItemStatus(enum.StrEnum):
    """Item statuses the circulation rules set; an import may also bring others (missing, lost, …)."""

    AVAILABLE = "available"
    ON_LOAN = "on_loan"
    ON_HOLD_SHELF = "on_hold_shelf"


class HoldStatus(enum.StrEnum):
    WAITING = "waiting"  # in the queue for the next returned copy
    READY = "ready"  # a copy waits on the hold shelf until ``expires_at``
    COLLECTED = "collected"  # the reader checked the copy out
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not picked up in time


ACTIVE_HOLD = (HoldStatus.WAITING.value, HoldStatus.READY.value)


class Loan(Base):
    """One copy lent to one reader. A returned loan keeps ``returned_at`` until the history purge."""

    __tablename__ = "loans"
    __table_args__ = (
        # One open loan per copy: a second checkout of the same copy fails here, even in a race.
        Index(
            "uq_loans_open_item",
            "item_id",
            unique=True,
            sqlite_where=text("returned_at IS NULL"),
            postgresql_where=text("returned_at IS NULL"),
        ),
        Index("ix_loans_open_due", "returned_at", "due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="CASCADE"), index=True)
    checked_out_at: Mapped[dt.datetime]
    due_at: Mapped[dt.datetime]
    renewals: Mapped[int] = mapped_column(default=0)
    renewed_at: Mapped[dt.datetime | None]
    returned_at: Mapped[dt.datetime | None]
    fine_cents: Mapped[int] = mapped_column(default=0)  # charged to the reader at return


class Hold(Base):
    """A reader's place in the queue for a title."""

    __tablename__ = "holds"
    __table_args__ = (
        # One active hold per reader and title: a double press of "Place hold" cannot queue twice.
        Index(
            "uq_holds_active_reader_record",
            "reader_id",
            "record_id",
            unique=True,
            sqlite_where=text("status IN ('waiting', 'ready')"),
            postgresql_where=text("status IN ('waiting', 'ready')"),
        ),
        Index("ix_holds_queue", "record_id", "status", "placed_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"))
    reader_id: Mapped[int] = mapped_column(ForeignKey("readers.id", ondelete="CASCADE"), index=True)
    pickup_branch: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default=HoldStatus.WAITING)
    placed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id", ondelete="SET NULL"))
    ready_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]  # pick-up deadline while READY
    closed_at: Mapped[dt.datetime | None]


# --------------------------------------------------------------------------------------------------
# Dates and money (pure)


def local_date(at: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> dt.date:
    """The calendar date of ``at`` in the library's time zone."""
    return at.astimezone(tz).date()


def end_of_day(day: dt.date, tz: ZoneInfo = DEFAULT_TZ) -> dt.datetime:
    """23:59:59 of ``day`` in the library's time zone, as a UTC timestamp (when loans fall due)."""
    return dt.datetime.combine(day, END_OF_DAY, tzinfo=tz).astimezone(dt.UTC)


def start_of_day(day: dt.date, tz: ZoneInfo = DEFAULT_TZ) -> dt.datetime:
    """Midnight starting ``day`` in the library's time zone, as a UTC timestamp."""
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=tz).astimezone(dt.UTC)


def due_at_after(start: dt.date, days: int, tz: ZoneInfo = DEFAULT_TZ) -> dt.datetime:
    """The due timestamp ``days`` calendar days after the local date ``start`` (end of that day)."""
    return end_of_day(start + dt.timedelta(days=days), tz)


def overdue_days(due_at: dt.datetime, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> int:
    """Whole local days since the due date (0 on the due date itself and before)."""
    return max(0, (local_date(now, tz) - local_date(due_at, tz)).days)


def days_until_due(due_at: dt.datetime, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> int:
    """Local days from today to the due date (negative once overdue)."""
    return (local_date(due_at, tz) - local_date(now, tz)).days


def to_cents(amount: float | Decimal | str) -> int:
    """A money amount (policy floats, CSV strings) as whole cents, rounded half up."""
    return int((Decimal(str(amount)) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def money(cents: int) -> Decimal:
    """Cents as a two-decimal amount."""
    return (Decimal(cents) / 100).quantize(Decimal("0.01"))


def fine_cents(days_overdue: int, rules: Circulation) -> int:
    """The fine accrued on a loan ``days_overdue`` days late."""
    return days_overdue * to_cents(rules.fine_per_day)


# --------------------------------------------------------------------------------------------------
# Renewal (pure)


class RenewalRefused(enum.StrEnum):
    """Why a renewal was refused. The first nine are the policy's reasons; the last two are what a
    person sees when the loan is not theirs (or no longer open) and when it was renewed just now."""

    ON_HOLD = "on_hold"
    LIMIT_REACHED = "limit_reached"
    OVERDUE_TOO_LONG = "overdue_too_long"
    FINES_TOO_HIGH = "fines_too_high"
    CARD_EXPIRED = "card_expired"
    CARD_BLOCKED = "card_blocked"
    NOT_RENEWABLE = "not_renewable"
    TOO_EARLY = "too_early"
    RENEWED_RECENTLY = "renewed_recently"  # the policy's minimum time between two renewals
    NOT_ON_LOAN = "not_on_loan"
    ALREADY_RENEWED = "already_renewed"


@dataclass(frozen=True)
class LoanTerms:
    """What the rules need to know about a loan."""

    due_at: dt.datetime
    renewals: int
    item_type: str
    returned_at: dt.datetime | None = None
    renewed_at: dt.datetime | None = None  # the last renewal


@dataclass(frozen=True)
class ReaderStanding:
    """What the rules need to know about a reader; ``fines_cents`` counts every outstanding fine,
    including those accruing on the reader's overdue loans (see ``outstanding_fines``)."""

    category: str
    expires_on: dt.date | None
    blocked: bool
    fines_cents: int = 0


@dataclass(frozen=True)
class RenewalResult:
    """The rules' answer: the new due date, or the reason for refusing (``reasons`` lists every
    reason that applies, most fundamental first; ``reason`` is the first). ``details`` holds the
    numbers a person needs to understand the refusal (e.g. renewals and max_renewals)."""

    ok: bool
    new_due_at: dt.datetime | None = None
    reason: RenewalRefused | None = None
    reasons: tuple[RenewalRefused, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


def card_expired(expires_on: dt.date | None, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> bool:
    """A card is valid through its expiry date (local) and expired from the next day."""
    return expires_on is not None and expires_on < local_date(now, tz)


def new_due_at(loan: LoanTerms, rules: Circulation, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> dt.datetime:
    """The due date a renewal gives: ``renewal_days`` after the due date (or after today when the
    policy says ``renew_from = "today"``). An overdue loan is renewed from today, so a renewal never
    gives a date already past; and a renewal never shortens a loan."""
    today = local_date(now, tz)
    due = local_date(loan.due_at, tz)
    base = today if rules.renew_from == "today" else max(due, today)
    proposed = due_at_after(base, rules.renewal_days, tz)
    return max(proposed, end_of_day(due, tz))


def renew(
    loan: LoanTerms,
    reader: ReaderStanding,
    policy: Policy,
    now: dt.datetime,
    *,
    tz: ZoneInfo = DEFAULT_TZ,
    held_for_another: bool = False,
) -> RenewalResult:
    """Decide a renewal of ``loan`` for ``reader`` at ``now``.

    ``held_for_another``: another reader waits for this title. The rules of the reader's category
    and the item's type apply (``policy.loan_rules``).
    """
    rules = policy.loan_rules(reader.category, loan.item_type)
    if loan.returned_at is not None:
        return RenewalResult(False, reason=RenewalRefused.NOT_ON_LOAN, reasons=(RenewalRefused.NOT_ON_LOAN,))
    late = overdue_days(loan.due_at, now, tz)
    fine_limit = to_cents(rules.fine_limit)
    checks: list[tuple[bool, RenewalRefused, dict[str, Any]]] = [
        (reader.blocked, RenewalRefused.CARD_BLOCKED, {}),
        (
            card_expired(reader.expires_on, now, tz),
            RenewalRefused.CARD_EXPIRED,
            {"expired_on": reader.expires_on.isoformat() if reader.expires_on else ""},
        ),
        (
            loan.item_type in rules.non_renewable_types or rules.max_renewals == 0,
            RenewalRefused.NOT_RENEWABLE,
            {"item_type": loan.item_type},
        ),
        (held_for_another, RenewalRefused.ON_HOLD, {}),
        (
            loan.renewals >= rules.max_renewals,
            RenewalRefused.LIMIT_REACHED,
            {"renewals": loan.renewals, "max_renewals": rules.max_renewals},
        ),
        (
            late > rules.overdue_block_days,
            RenewalRefused.OVERDUE_TOO_LONG,
            {"overdue_days": late, "limit_days": rules.overdue_block_days},
        ),
        (
            reader.fines_cents > fine_limit,
            RenewalRefused.FINES_TOO_HIGH,
            {"fines": str(money(reader.fines_cents)), "limit": str(money(fine_limit))},
        ),
        (
            rules.min_days_between_renewals > 0
            and loan.renewed_at is not None
            and now < loan.renewed_at + dt.timedelta(days=rules.min_days_between_renewals),
            RenewalRefused.RENEWED_RECENTLY,
            {
                "days": rules.min_days_between_renewals,
                "from": (loan.renewed_at + dt.timedelta(days=rules.min_days_between_renewals)).astimezone(tz).strftime("%Y-%m-%d %H:%M")
                if loan.renewed_at is not None else "",
            },
        ),
        (
            rules.min_days_before_due > 0 and days_until_due(loan.due_at, now, tz) > rules.min_days_before_due,
            RenewalRefused.TOO_EARLY,
            {
                "days": rules.min_days_before_due,
                "from": (local_date(loan.due_at, tz) - dt.timedelta(days=rules.min_days_before_due)).isoformat(),
            },
        ),
    ]
    refused = [(reason, details) for failed, reason, details in checks if failed]
    if refused:
        return RenewalResult(
            False, reason=refused[0][0], reasons=tuple(r for r, _ in refused), details=refused[0][1]
        )
    return RenewalResult(True, new_due_at=new_due_at(loan, rules, now, tz))


def outstanding_fines(
    reader_fines_cents: int,
    loans: Iterable[tuple[dt.datetime, str]],
    category: str,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo = DEFAULT_TZ,
) -> int:
    """Fines already charged plus those accruing on open loans, given as (due_at, item_type)."""
    total = reader_fines_cents
    for due, item_type in loans:
        total += fine_cents(overdue_days(due, now, tz), policy.loan_rules(category, item_type))
    return total


# --------------------------------------------------------------------------------------------------
# Checkout (pure)


class CheckoutRefused(enum.StrEnum):
    UNKNOWN_ITEM = "unknown_item"
    UNKNOWN_CARD = "unknown_card"
    CARD_BLOCKED = "card_blocked"
    CARD_EXPIRED = "card_expired"
    FINES_TOO_HIGH = "fines_too_high"
    NOT_LOANABLE = "not_loanable"  # item type (reference) or status (missing, lost, …)
    ALREADY_ON_LOAN = "already_on_loan"
    HELD_FOR_ANOTHER = "held_for_another"  # on the hold shelf for someone else


def may_check_out(
    reader: ReaderStanding,
    item_type: str,
    item_status: str,
    policy: Policy,
    now: dt.datetime,
    *,
    tz: ZoneInfo = DEFAULT_TZ,
    held_for_another: bool = False,
) -> CheckoutRefused | None:
    """None when ``reader`` may borrow the copy; otherwise the reason."""
    rules = policy.loan_rules(reader.category, item_type)
    if reader.blocked:
        return CheckoutRefused.CARD_BLOCKED
    if card_expired(reader.expires_on, now, tz):
        return CheckoutRefused.CARD_EXPIRED
    if item_type in rules.non_loanable_types:
        return CheckoutRefused.NOT_LOANABLE
    if item_status == ItemStatus.ON_LOAN:
        return CheckoutRefused.ALREADY_ON_LOAN
    if item_status == ItemStatus.ON_HOLD_SHELF and held_for_another:
        return CheckoutRefused.HELD_FOR_ANOTHER
    if item_status not in (ItemStatus.AVAILABLE, ItemStatus.ON_HOLD_SHELF):
        return CheckoutRefused.NOT_LOANABLE
    if reader.fines_cents > to_cents(rules.fine_limit):
        return CheckoutRefused.FINES_TOO_HIGH
    return None


def loan_due_at(
    category: str, item_type: str, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ
) -> dt.datetime:
    """When a loan made at ``now`` falls due: ``loan_days`` after today, at the end of that day."""
    return due_at_after(local_date(now, tz), policy.loan_rules(category, item_type).loan_days, tz)


# --------------------------------------------------------------------------------------------------
# Notice levels (pure)


def due_soon_days_for(reminder_days: int, policy: Policy) -> frozenset[int]:
    """The days before the due date on which a reader who chose ``reminder_days`` in /settings is
    reminded: that many days ahead, and every policy level (``due_soon_days``) closer than it.
    0 turns due-date reminders off (overdue notices still come)."""
    if reminder_days <= 0:
        return frozenset()
    return frozenset({reminder_days} | {d for d in policy.notices.due_soon_days if 0 < d <= reminder_days})


def hold_deadline(now: dt.datetime, policy: Policy, tz: ZoneInfo = DEFAULT_TZ) -> dt.datetime:
    """The pick-up deadline of a copy put on the hold shelf at ``now``."""
    return due_at_after(local_date(now, tz), policy.circulation.hold_shelf_days, tz)


# --------------------------------------------------------------------------------------------------
# Store operations


def standing(reader: Reader, fines: int | None = None) -> ReaderStanding:
    """The rules' view of a reader row (``fines`` overrides the charged fines with a computed total)."""
    return ReaderStanding(
        category=reader.category,
        expires_on=reader.expires_on,
        blocked=reader.blocked,
        fines_cents=reader.fines_cents if fines is None else fines,
    )


async def reader_fines(session: AsyncSession, reader: Reader, policy: Policy, now: dt.datetime, tz: ZoneInfo) -> int:
    """Everything the reader owes now, in cents: charged fines plus fines accruing on open loans."""
    rows = await session.execute(
        select(Loan.due_at, Item.item_type)
        .join(Item, Item.id == Loan.item_id)
        .where(Loan.reader_id == reader.id, Loan.returned_at.is_(None), Loan.due_at < now)
    )
    return outstanding_fines(reader.fines_cents, rows, reader.category, policy, now, tz)


async def held_by_others(session: AsyncSession, record_id: int, reader_id: int) -> bool:
    """True when another reader waits in the queue for this title."""
    found = await session.scalar(
        select(Hold.id)
        .where(Hold.record_id == record_id, Hold.status == HoldStatus.WAITING, Hold.reader_id != reader_id)
        .limit(1)
    )
    return found is not None


async def records_held_by_others(session: AsyncSession, record_ids: Sequence[int], reader_id: int) -> set[int]:
    """The titles among ``record_ids`` another reader waits for."""
    if not record_ids:
        return set()
    rows = await session.scalars(
        select(Hold.record_id)
        .where(Hold.record_id.in_(set(record_ids)), Hold.status == HoldStatus.WAITING, Hold.reader_id != reader_id)
        .distinct()
    )
    return set(rows)


async def linked_chats(session: AsyncSession, reader_id: int) -> list[int]:
    """The Telegram users linked to a card: where its notices go."""
    return list(await session.scalars(select(User.telegram_id).where(User.reader_id == reader_id)))


async def notify_reader(
    session: AsyncSession,
    reader_id: int,
    key: str,
    params: dict[str, Any],
    dedupe_key: str,
    *,
    priority: Priority = Priority.NORMAL,
    buttons: list[list[list[Any]]] | None = None,
) -> int:
    """Queue one message to every Telegram user linked to the card; how many were queued."""
    queued = 0
    for chat_id in await linked_chats(session, reader_id):
        row = await enqueue(
            session, chat_id, key, params, kind="notice", priority=priority, buttons=buttons,
            dedupe_key=f"{dedupe_key}:{chat_id}",
        )
        queued += row is not None
    return queued


def branch_name(policy: Policy, code: str) -> dict[str, str]:
    """A pick-up branch as a bilingual parameter (the code itself for an unknown branch)."""
    for branch in policy.library.branches:
        if branch.code == code:
            return {"zh": branch.name_zh, "en": branch.name_en}
    return {"zh": code, "en": code}


def default_branch(policy: Policy) -> str:
    return policy.library.branches[0].code if policy.library.branches else ""


@dataclass(frozen=True)
class LoanRow:
    """An open loan with what a reader sees of it."""

    loan: Loan
    item: Item
    record: Record


async def open_loans(session: AsyncSession, reader_id: int) -> list[LoanRow]:
    """The reader's open loans, earliest due first."""
    rows = await session.execute(
        select(Loan, Item, Record)
        .join(Item, Item.id == Loan.item_id)
        .join(Record, Record.id == Item.record_id)
        .where(Loan.reader_id == reader_id, Loan.returned_at.is_(None))
        .order_by(Loan.due_at, Loan.id)
    )
    return [LoanRow(loan, item, record) for loan, item, record in rows]


@dataclass(frozen=True)
class RenewalAttempt:
    """One renewal as the store carried it out."""

    barcode: str
    title: str
    result: RenewalResult


async def renew_loan(
    session: AsyncSession,
    reader_id: int,
    barcode: str,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo = DEFAULT_TZ,
    *,
    expected_renewals: int | None = None,
    listed_at: dt.datetime | None = None,
) -> RenewalAttempt:
    """Renew the reader's open loan of ``barcode``.

    A barcode that is not on this reader's card (someone else's, returned, unknown) is NOT_ON_LOAN,
    with no hint whose it is. ``expected_renewals`` (from the button pressed) and ``listed_at`` (when
    the list with "Renew all" was shown) make a second press answer ALREADY_RENEWED instead of
    renewing twice; the UPDATE is conditional on the renewal count read, so two presses processed at
    the same moment renew once.
    """
    barcode = barcode.strip()
    row = (
        await session.execute(
            select(Loan, Item, Record)
            .join(Item, Item.id == Loan.item_id)
            .join(Record, Record.id == Item.record_id)
            .where(Item.barcode == barcode, Loan.reader_id == reader_id, Loan.returned_at.is_(None))
        )
    ).first()
    if row is None:
        refused = RenewalResult(False, reason=RenewalRefused.NOT_ON_LOAN, reasons=(RenewalRefused.NOT_ON_LOAN,))
        return RenewalAttempt(barcode, "", refused)
    loan, item, record = row
    already = RenewalResult(
        False, new_due_at=loan.due_at, reason=RenewalRefused.ALREADY_RENEWED, reasons=(RenewalRefused.ALREADY_RENEWED,)
    )
    if (expected_renewals is not None and loan.renewals != expected_renewals) or (
        listed_at is not None and loan.renewed_at is not None and loan.renewed_at >= listed_at
    ):
        return RenewalAttempt(item.barcode, record.title, already)
    reader = await session.get(Reader, reader_id)
    assert reader is not None
    fines = await reader_fines(session, reader, policy, now, tz)
    result = renew(
        LoanTerms(loan.due_at, loan.renewals, item.item_type, renewed_at=loan.renewed_at),
        standing(reader, fines),
        policy,
        now,
        tz=tz,
        held_for_another=await held_by_others(session, record.id, reader_id),
    )
    if not result.ok:
        return RenewalAttempt(item.barcode, record.title, result)
    changed = await session.execute(
        update(Loan)
        .where(Loan.id == loan.id, Loan.renewals == loan.renewals, Loan.returned_at.is_(None))
        .values(due_at=result.new_due_at, renewals=Loan.renewals + 1, renewed_at=now)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        await session.refresh(loan)
        if loan.returned_at is not None:
            gone = RenewalResult(False, reason=RenewalRefused.NOT_ON_LOAN, reasons=(RenewalRefused.NOT_ON_LOAN,))
            return RenewalAttempt(item.barcode, record.title, gone)
        return RenewalAttempt(item.barcode, record.title, replace(already, new_due_at=loan.due_at))
    await session.refresh(loan)
    return RenewalAttempt(item.barcode, record.title, result)


async def renew_all(
    session: AsyncSession,
    reader_id: int,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo = DEFAULT_TZ,
    *,
    listed_at: dt.datetime | None = None,
) -> list[RenewalAttempt]:
    """Try to renew every open loan of the reader, earliest due first; one attempt per loan."""
    barcodes = [row.item.barcode for row in await open_loans(session, reader_id)]
    return [await renew_loan(session, reader_id, b, policy, now, tz, listed_at=listed_at) for b in barcodes]


_CHECKOUT_REFUSALS = {
    CheckoutRefused.UNKNOWN_ITEM: "no copy has this barcode",
    CheckoutRefused.UNKNOWN_CARD: "no card has this number",
    CheckoutRefused.CARD_BLOCKED: "the card is blocked",
    CheckoutRefused.CARD_EXPIRED: "the card has expired",
    CheckoutRefused.FINES_TOO_HIGH: "the reader's fines are above the limit",
    CheckoutRefused.NOT_LOANABLE: "this copy cannot be lent (item type or status)",
    CheckoutRefused.ALREADY_ON_LOAN: "this copy is already on loan",
    CheckoutRefused.HELD_FOR_ANOTHER: "this copy waits on the hold shelf for another reader",
}


@dataclass(frozen=True)
class CheckoutResult:
    ok: bool
    refused: CheckoutRefused | None = None
    barcode: str = ""
    title: str = ""
    due_at: dt.datetime | None = None
    loan_id: int | None = None
    due_date: dt.date | None = None  # in the library's time zone
    card_number: str = ""

    def describe(self) -> str:
        """One line for the desk (the CLI)."""
        if not self.ok:
            reason = _CHECKOUT_REFUSALS[self.refused] if self.refused else "refused"
            return f"checkout of {self.barcode} refused: {reason}"
        return f"{self.barcode} ({self.title}) lent to card {self.card_number}, due {self.due_date}"


async def checkout(
    session: AsyncSession, barcode: str, card_number: str, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ
) -> CheckoutResult:
    """Lend the copy ``barcode`` to the card ``card_number`` (the desk's checkout).

    A copy on the hold shelf can go only to the reader it waits for, and that hold is then collected;
    a waiting hold of the same reader on the title is collected too.
    """
    barcode, card_number = barcode.strip(), card_number.strip()
    item = await session.scalar(select(Item).where(Item.barcode == barcode))
    if item is None:
        return CheckoutResult(False, CheckoutRefused.UNKNOWN_ITEM, barcode)
    reader = await session.scalar(select(Reader).where(Reader.card_number == card_number))
    record = await session.get(Record, item.record_id)
    title = record.title if record else ""
    if reader is None:
        return CheckoutResult(False, CheckoutRefused.UNKNOWN_CARD, barcode, title)
    ready = await session.scalar(
        select(Hold).where(Hold.item_id == item.id, Hold.status == HoldStatus.READY)
    )
    fines = await reader_fines(session, reader, policy, now, tz)
    refused = may_check_out(
        standing(reader, fines),
        item.item_type,
        item.status,
        policy,
        now,
        tz=tz,
        held_for_another=ready is not None and ready.reader_id != reader.id,
    )
    if refused is not None:
        return CheckoutResult(False, refused, barcode, title)
    due = loan_due_at(reader.category, item.item_type, policy, now, tz)
    loan = Loan(item_id=item.id, reader_id=reader.id, checked_out_at=now, due_at=due)
    try:
        async with session.begin_nested():
            session.add(loan)
    except IntegrityError:
        return CheckoutResult(False, CheckoutRefused.ALREADY_ON_LOAN, barcode, title)
    item.status = ItemStatus.ON_LOAN
    # A copy of this title kept on the hold shelf for the reader is no longer needed by them.
    other_copy = await session.scalar(
        select(Hold.item_id).where(
            Hold.reader_id == reader.id,
            Hold.record_id == item.record_id,
            Hold.status == HoldStatus.READY,
            Hold.item_id != item.id,
        )
    )
    await session.execute(
        update(Hold)
        .where(
            Hold.reader_id == reader.id,
            Hold.record_id == item.record_id,
            Hold.status.in_(ACTIVE_HOLD),
        )
        .values(status=HoldStatus.COLLECTED, closed_at=now, item_id=item.id)
        .execution_options(synchronize_session=False)
    )
    await session.flush()
    if other_copy is not None:
        freed = await session.get(Item, other_copy)
        if freed is not None and freed.status == ItemStatus.ON_HOLD_SHELF:
            await fill_next_hold(session, freed, policy, now, tz)
    return CheckoutResult(True, None, barcode, title, due, loan.id, local_date(due, tz), card_number)


@dataclass(frozen=True)
class ReturnResult:
    ok: bool  # False: no open loan of this copy (unknown barcode, or already returned)
    barcode: str
    title: str = ""
    known_item: bool = True
    fine_cents: int = 0
    hold_filled_for: int | None = None  # reader id whose hold the copy now waits for
    hold_id: int | None = None
    hold_card: str = ""  # that reader's card number

    def describe(self) -> str:
        """One line for the desk (the CLI)."""
        if not self.known_item:
            return f"no copy has the barcode {self.barcode}"
        if not self.ok:
            return f"{self.barcode} ({self.title}) is not on loan"
        parts = [f"{self.barcode} ({self.title}) returned"]
        if self.fine_cents:
            parts.append(f"fine {money(self.fine_cents)} charged to the reader")
        if self.hold_filled_for is not None:
            parts.append(f"put it on the hold shelf for card {self.hold_card} (the reader has been told)")
        else:
            parts.append("back to the shelf")
        return "; ".join(parts)


async def checkin(
    session: AsyncSession,
    barcode: str,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo = DEFAULT_TZ,
) -> ReturnResult:
    """Check the copy ``barcode`` in: close its loan (charging any fine to the reader), then give it
    to the next waiting hold on its title and tell that reader at once, or shelve it."""
    barcode = barcode.strip()
    item = await session.scalar(select(Item).where(Item.barcode == barcode))
    if item is None:
        return ReturnResult(False, barcode, known_item=False)
    record = await session.get(Record, item.record_id)
    title = record.title if record else ""
    loan = await session.scalar(select(Loan).where(Loan.item_id == item.id, Loan.returned_at.is_(None)))
    if loan is None:
        return ReturnResult(False, barcode, title)
    closed = await session.execute(
        update(Loan)
        .where(Loan.id == loan.id, Loan.returned_at.is_(None))
        .values(returned_at=now)
        .execution_options(synchronize_session=False)
    )
    if closed.rowcount != 1:  # type: ignore[attr-defined]
        return ReturnResult(False, barcode, title)  # returned by someone else just now
    reader = await session.get(Reader, loan.reader_id)
    charged = 0
    if reader is not None:
        charged = fine_cents(overdue_days(loan.due_at, now, tz), policy.loan_rules(reader.category, item.item_type))
        if charged:
            await session.execute(
                update(Reader).where(Reader.id == reader.id).values(fines_cents=Reader.fines_cents + charged)
            )
            await session.execute(update(Loan).where(Loan.id == loan.id).values(fine_cents=charged))
    hold = await fill_next_hold(session, item, policy, now, tz)
    hold_reader = await session.get(Reader, hold.reader_id) if hold else None
    return ReturnResult(
        True, barcode, title, fine_cents=charged,
        hold_filled_for=hold.reader_id if hold else None, hold_id=hold.id if hold else None,
        hold_card=hold_reader.card_number if hold_reader else "",
    )


async def fill_next_hold(
    session: AsyncSession, item: Item, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ
) -> Hold | None:
    """Put ``item`` on the hold shelf for the first waiting reader of its title and tell them; with
    nobody waiting (or a copy that cannot be lent) it goes back on the shelf."""
    rules = policy.circulation
    if item.item_type in rules.non_loanable_types:
        item.status = ItemStatus.AVAILABLE
        await session.flush()
        return None
    queue = await session.scalars(
        select(Hold)
        .where(Hold.record_id == item.record_id, Hold.status == HoldStatus.WAITING)
        .order_by(Hold.placed_at, Hold.id)
        .limit(5)
    )
    for hold in list(queue):
        deadline = hold_deadline(now, policy, tz)
        taken = await session.execute(
            update(Hold)
            .where(Hold.id == hold.id, Hold.status == HoldStatus.WAITING)
            .values(status=HoldStatus.READY, item_id=item.id, ready_at=now, expires_at=deadline)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            continue  # cancelled or filled concurrently: try the next reader
        await session.refresh(hold)
        item.status = ItemStatus.ON_HOLD_SHELF
        await session.flush()
        record = await session.get(Record, item.record_id)
        await notify_reader(
            session,
            hold.reader_id,
            "loans.hold_ready_notice",
            {
                "title": html.escape(record.title if record else "", quote=False),
                "barcode": html.escape(item.barcode, quote=False),
                "pickup": branch_name(policy, hold.pickup_branch),
                "deadline": local_date(deadline, tz).isoformat(),
            },
            f"hold-ready:{hold.id}:{item.id}",
        )
        return hold
    item.status = ItemStatus.AVAILABLE
    await session.flush()
    return None


class HoldRefused(enum.StrEnum):
    UNKNOWN_RECORD = "unknown_record"
    CARD_BLOCKED = "card_blocked"
    CARD_EXPIRED = "card_expired"
    NOT_HOLDABLE = "not_holdable"  # no copy that could ever be lent
    COPY_AVAILABLE = "copy_available"  # a copy is on the shelf: take it
    ALREADY_ON_LOAN = "already_on_loan"  # the reader has this title already
    ALREADY_HELD = "already_held"


@dataclass(frozen=True)
class HoldPlaced:
    ok: bool
    refused: HoldRefused | None = None
    hold: Hold | None = None
    title: str = ""
    position: int = 0


async def queue_position(session: AsyncSession, hold: Hold) -> int:
    """1 for the next in line; 0 when the copy is already waiting on the hold shelf."""
    if hold.status != HoldStatus.WAITING:
        return 0
    ahead = await session.scalar(
        select(func.count())
        .select_from(Hold)
        .where(
            Hold.record_id == hold.record_id,
            Hold.status == HoldStatus.WAITING,
            (Hold.placed_at < hold.placed_at) | and_(Hold.placed_at == hold.placed_at, Hold.id < hold.id),
        )
    )
    return int(ahead or 0) + 1


async def place_hold(
    session: AsyncSession,
    reader_id: int,
    record_id: int,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo = DEFAULT_TZ,
    *,
    pickup_branch: str | None = None,
) -> HoldPlaced:
    """Queue the reader for the title ``record_id``.

    Borrowers of the title whose loans were renewable until now are told at once that they can no
    longer renew (the first hold by somebody else is what changes that).
    """
    record = await session.get(Record, record_id)
    reader = await session.get(Reader, reader_id)
    if record is None or reader is None:
        return HoldPlaced(False, HoldRefused.UNKNOWN_RECORD)
    if reader.blocked:
        return HoldPlaced(False, HoldRefused.CARD_BLOCKED, title=record.title)
    if card_expired(reader.expires_on, now, tz):
        return HoldPlaced(False, HoldRefused.CARD_EXPIRED, title=record.title)
    items = list(await session.scalars(select(Item).where(Item.record_id == record_id)))
    loanable = [i for i in items if i.item_type not in policy.loan_rules(reader.category, i.item_type).non_loanable_types]
    if not loanable:
        return HoldPlaced(False, HoldRefused.NOT_HOLDABLE, title=record.title)
    if any(i.status == ItemStatus.AVAILABLE for i in loanable):
        return HoldPlaced(False, HoldRefused.COPY_AVAILABLE, title=record.title)
    loans = list(
        await session.execute(
            select(Loan, Item)
            .join(Item, Item.id == Loan.item_id)
            .where(Item.record_id == record_id, Loan.returned_at.is_(None))
        )
    )
    if any(loan.reader_id == reader_id for loan, _ in loans):
        return HoldPlaced(False, HoldRefused.ALREADY_ON_LOAN, title=record.title)
    waiting_before = {
        r
        for r in await session.scalars(
            select(Hold.reader_id).where(Hold.record_id == record_id, Hold.status == HoldStatus.WAITING)
        )
    }
    hold = Hold(
        record_id=record_id,
        reader_id=reader_id,
        pickup_branch=pickup_branch or default_branch(policy),
        status=HoldStatus.WAITING,
        placed_at=now,
    )
    try:
        async with session.begin_nested():
            session.add(hold)
    except IntegrityError:
        return HoldPlaced(False, HoldRefused.ALREADY_HELD, title=record.title)
    for loan, item in loans:
        if waiting_before - {loan.reader_id}:
            continue  # somebody else was already waiting: the borrower could not renew anyway
        borrower = await session.get(Reader, loan.reader_id)
        if borrower is None:
            continue
        fines = await reader_fines(session, borrower, policy, now, tz)
        before = renew(LoanTerms(loan.due_at, loan.renewals, item.item_type, renewed_at=loan.renewed_at), standing(borrower, fines), policy, now, tz=tz)
        if not before.ok:
            continue  # not renewable for another reason: the hold changes nothing for them
        await notify_reader(
            session,
            loan.reader_id,
            "loans.hold_blocks_renewal",
            {
                "title": html.escape(record.title, quote=False),
                "barcode": html.escape(item.barcode, quote=False),
                "due": local_date(loan.due_at, tz).isoformat(),
            },
            f"hold-blocks:{loan.id}:{hold.id}",
        )
    return HoldPlaced(True, hold=hold, title=record.title, position=await queue_position(session, hold))


async def cancel_hold(session: AsyncSession, reader_id: int, hold_id: int, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> Hold | None:
    """Cancel the reader's own active hold; None when there is none with that id (or it is another
    reader's). A copy waiting on the hold shelf passes to the next reader."""
    hold = await session.scalar(
        select(Hold).where(Hold.id == hold_id, Hold.reader_id == reader_id, Hold.status.in_(ACTIVE_HOLD))
    )
    if hold is None:
        return None
    was_ready = hold.status == HoldStatus.READY
    changed = await session.execute(
        update(Hold)
        .where(Hold.id == hold.id, Hold.status == hold.status)
        .values(status=HoldStatus.CANCELLED, closed_at=now)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    await session.refresh(hold)
    if was_ready and hold.item_id is not None:
        item = await session.get(Item, hold.item_id)
        if item is not None and item.status == ItemStatus.ON_HOLD_SHELF:
            await fill_next_hold(session, item, policy, now, tz)
    return hold


async def expire_holds(session: AsyncSession, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ) -> int:
    """Close the holds not picked up by their deadline, tell those readers, and pass each copy on
    to the next reader in the queue; how many expired."""
    expired = list(
        await session.scalars(
            select(Hold).where(Hold.status == HoldStatus.READY, Hold.expires_at < now).order_by(Hold.id)
        )
    )
    count = 0
    for hold in expired:
        changed = await session.execute(
            update(Hold)
            .where(Hold.id == hold.id, Hold.status == HoldStatus.READY)
            .values(status=HoldStatus.EXPIRED, closed_at=now)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        count += 1
        record = await session.get(Record, hold.record_id)
        await notify_reader(
            session,
            hold.reader_id,
            "loans.hold_expired",
            {"title": html.escape(record.title if record else "", quote=False)},
            f"hold-expired:{hold.id}",
        )
        if hold.item_id is not None:
            item = await session.get(Item, hold.item_id)
            if item is not None and item.status == ItemStatus.ON_HOLD_SHELF:
                await fill_next_hold(session, item, policy, now, tz)
    return count


async def purge_history(session: AsyncSession, policy: Policy, now: dt.datetime) -> int:
    """Erase returned loans and closed holds older than ``loan_history_days``: the store keeps no
    reading history beyond what the policy allows. How many loans were erased."""
    cutoff = now - dt.timedelta(days=policy.circulation.loan_history_days)
    result = await session.execute(delete(Loan).where(Loan.returned_at.is_not(None), Loan.returned_at < cutoff))
    await session.execute(
        delete(Hold).where(Hold.status.not_in(ACTIVE_HOLD), Hold.closed_at.is_not(None), Hold.closed_at < cutoff)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
