"""The circulation operations the chat needs, behind one small interface.

``CirculationService`` is what handlers call: a reader's loans and holds, renew, renew all, place
and cancel a hold, check a card and PIN, and copy availability. Its results are plain dataclasses,
so a connector to the library's own system (SIP2) can implement it without the handlers changing.
``LocalCirculation`` is the first implementation, over this product's own store.

Readers are named by ``reader_id``, the local card row every logged-in user is linked to (a SIP2
connector looks the card number up from it). When the library system cannot be reached an
implementation raises ``CirculationUnavailable``, and the handlers say "please try again in a few
minutes"; nothing was changed then.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, TypeVar, runtime_checkable
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError

from storage import circulation as circ
from storage.catalog import Item, Record
from storage.circulation import HoldRefused, HoldStatus, ItemStatus, Loan, RenewalAttempt, RenewalRefused
from storage.db import Database, retry_busy, utcnow
from storage.people import Reader, pin_matches
from storage.policy import Policy

T = TypeVar("T")

__all__ = [
    "AccountFines",
    "Availability",
    "CardCheck",
    "CirculationService",
    "CirculationUnavailable",
    "CopyView",
    "HoldOutcome",
    "HoldRefused",
    "HoldView",
    "LoanView",
    "LocalCirculation",
    "RenewalOutcome",
    "RenewalRefused",
    "make_circulation_service",
]


class CirculationUnavailable(Exception):
    """The library system is not answering; the person should try again in a few minutes."""


@dataclass(frozen=True)
class LoanView:
    """One loan as the reader sees it. ``renewable`` is a hint (the renewal itself decides);
    ``refusal`` says why not when it is known in advance."""

    barcode: str
    title: str
    due_at: dt.datetime
    overdue_days: int
    fine: Decimal
    renewals: int
    max_renewals: int | None
    renewable: bool
    refusal: RenewalRefused | None = None
    currency: str = ""
    refusal_details: dict[str, Any] = field(default_factory=dict)  # the numbers that explain ``refusal``


@dataclass(frozen=True)
class RenewalOutcome:
    """What became of one renewal. ``reason`` is None when ``ok``; ``message`` is the library
    system's own text (a SIP2 screen message), None from the local store; ``details`` holds the
    numbers that explain a refusal (renewals, max_renewals, overdue_days, limit_days, fines, limit,
    expired_on, days, from)."""

    barcode: str
    title: str
    ok: bool
    new_due_at: dt.datetime | None
    reason: RenewalRefused | None = None
    message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HoldView:
    """One of the reader's holds: ``status`` is "waiting" (``position`` in a queue of
    ``queue_length``) or "ready" (on the hold shelf at ``pickup`` until ``expires_at``).
    ``pickup`` is a bilingual ``{"zh", "en"}`` dict or plain text."""

    hold_id: str
    record_id: int | None
    title: str
    status: str
    position: int
    queue_length: int
    pickup: str | dict[str, str]
    placed_at: dt.datetime
    expires_at: dt.datetime | None = None


@dataclass(frozen=True)
class HoldOutcome:
    ok: bool
    title: str
    refused: HoldRefused | None = None
    position: int = 0
    hold_id: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class CardCheck:
    """Whether a card number and PIN are right, and the card's standing."""

    valid: bool
    card_number: str
    name: str = ""
    expired: bool = False
    blocked: bool = False


@dataclass(frozen=True)
class CopyView:
    barcode: str
    location: str
    call_number: str
    status: str
    due_at: dt.datetime | None = None


@dataclass(frozen=True)
class Availability:
    """The copies of one title: how many, how many on the shelf, and the queue."""

    record_id: int
    total: int
    on_shelf: int
    holds_waiting: int
    copies: tuple[CopyView, ...] = ()
    from_catalogue: bool = False  # some copies' status is the catalogue's, not the system's word now

    @property
    def holdable(self) -> bool:
        """A reader may place a hold: there are copies, and none is on the shelf."""
        return self.total > 0 and self.on_shelf == 0


@dataclass(frozen=True)
class AccountFines:
    """What the library's system says the reader owes beyond each loan's own fine: ``total`` (its
    fee amount, None when it does not say) and ``items`` (its fine items, as it words them)."""

    total: Decimal | None
    currency: str
    items: tuple[str, ...] = ()


@runtime_checkable
class CirculationService(Protocol):
    """Circulation as the chat needs it; every method may raise ``CirculationUnavailable``."""

    async def check_card(self, card_number: str, pin: str) -> CardCheck:
        """Whether ``pin`` is the PIN of ``card_number`` (no lockout here: ``people.login`` keeps it)."""
        ...

    async def loans(self, reader_id: int) -> list[LoanView]:
        """The reader's open loans, earliest due first."""
        ...

    async def holds(self, reader_id: int) -> list[HoldView]:
        """The reader's active holds: ready ones first, then by place in the queue."""
        ...

    async def renew(self, reader_id: int, barcode: str, *, expected_renewals: int | None = None) -> RenewalOutcome:
        """Renew one loan. ``expected_renewals`` is the count shown on the button pressed: when the
        loan was renewed since, the answer is ALREADY_RENEWED instead of a second renewal."""
        ...

    async def renew_all(self, reader_id: int, *, listed_at: dt.datetime | None = None) -> list[RenewalOutcome]:
        """Renew every loan, one outcome each; loans renewed after ``listed_at`` (when the list with
        the Renew all button was shown) answer ALREADY_RENEWED."""
        ...

    async def place_hold(self, reader_id: int, record_id: int, *, pickup_branch: str | None = None) -> HoldOutcome:
        """Queue the reader for a title."""
        ...

    async def cancel_hold(self, reader_id: int, hold_id: str) -> bool:
        """Cancel one of the reader's own holds; False when there is no such active hold."""
        ...

    async def availability(self, record_ids: Sequence[int]) -> dict[int, Availability]:
        """Copies and queue of each title (titles without copies are left out)."""
        ...

    async def fines(self, reader_id: int) -> AccountFines | None:
        """The reader's fines as the library's system keeps them; None when there is nothing more
        to say than each loan's fine (the local store)."""
        ...


_UNAVAILABLE = (OperationalError, InterfaceError, OSError, ConnectionError, TimeoutError)


class LocalCirculation:
    """``CirculationService`` over the local store (loans kept with ``librarybot circ`` and imports)."""

    def __init__(
        self,
        db: Database,
        policy: Policy,
        tz: ZoneInfo = circ.DEFAULT_TZ,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.db = db
        self.policy = policy
        self.tz = tz
        self.clock = clock  # the bot's clock, so tests that move time move circulation too

    async def _run(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await retry_busy(work)()
        except _UNAVAILABLE as exc:
            raise CirculationUnavailable(str(exc)) from exc

    async def check_card(self, card_number: str, pin: str) -> CardCheck:
        card_number = card_number.strip()

        async def work() -> CardCheck:
            async with self.db.session() as s:
                reader = await s.scalar(select(Reader).where(Reader.card_number == card_number))
            if reader is None or not pin_matches(reader.pin_hash, pin):
                return CardCheck(False, card_number)
            return CardCheck(
                True,
                card_number,
                reader.name,
                expired=circ.card_expired(reader.expires_on, self.clock(), self.tz),
                blocked=reader.blocked,
            )

        return await self._run(work)

    async def loans(self, reader_id: int) -> list[LoanView]:
        async def work() -> list[LoanView]:
            now = self.clock()
            async with self.db.session() as s:
                reader = await s.get(Reader, reader_id)
                if reader is None:
                    return []
                rows = await circ.open_loans(s, reader_id)
                held = await circ.records_held_by_others(s, [r.record.id for r in rows], reader_id)
            fines = circ.outstanding_fines(
                reader.fines_cents, [(r.loan.due_at, r.item.item_type) for r in rows], reader.category,
                self.policy, now, self.tz,
            )
            views = []
            for row in rows:
                rules = self.policy.loan_rules(reader.category, row.item.item_type)
                late = circ.overdue_days(row.loan.due_at, now, self.tz)
                result = circ.renew(
                    circ.LoanTerms(row.loan.due_at, row.loan.renewals, row.item.item_type, renewed_at=row.loan.renewed_at),
                    circ.standing(reader, fines),
                    self.policy,
                    now,
                    tz=self.tz,
                    held_for_another=row.record.id in held,
                )
                views.append(
                    LoanView(
                        barcode=row.item.barcode,
                        title=row.record.title,
                        due_at=row.loan.due_at,
                        overdue_days=late,
                        fine=circ.money(circ.fine_cents(late, rules)),
                        renewals=row.loan.renewals,
                        max_renewals=rules.max_renewals,
                        renewable=result.ok,
                        refusal=result.reason,
                        currency=self.policy.circulation.currency,
                        refusal_details=dict(result.details),
                    )
                )
            return views

        return await self._run(work)

    async def holds(self, reader_id: int) -> list[HoldView]:
        async def work() -> list[HoldView]:
            async with self.db.session() as s:
                rows = (
                    await s.execute(
                        select(circ.Hold, Record.title)
                        .join(Record, Record.id == circ.Hold.record_id)
                        .where(circ.Hold.reader_id == reader_id, circ.Hold.status.in_(circ.ACTIVE_HOLD))
                        .order_by(circ.Hold.placed_at, circ.Hold.id)
                    )
                ).all()
                record_ids = {hold.record_id for hold, _ in rows}
                queues = dict(
                    (
                        await s.execute(
                            select(circ.Hold.record_id, func.count())
                            .where(circ.Hold.record_id.in_(record_ids), circ.Hold.status == HoldStatus.WAITING)
                            .group_by(circ.Hold.record_id)
                        )
                    ).all()
                ) if record_ids else {}
                views = [
                    HoldView(
                        hold_id=str(hold.id),
                        record_id=hold.record_id,
                        title=title,
                        status=hold.status,
                        position=await circ.queue_position(s, hold),
                        queue_length=int(queues.get(hold.record_id, 0)),
                        pickup=circ.branch_name(self.policy, hold.pickup_branch),
                        placed_at=hold.placed_at,
                        expires_at=hold.expires_at if hold.status == HoldStatus.READY else None,
                    )
                    for hold, title in rows
                ]
            return sorted(views, key=lambda v: (v.status != HoldStatus.READY, v.position, v.placed_at))

        return await self._run(work)

    @staticmethod
    def _outcome(attempt: RenewalAttempt) -> RenewalOutcome:
        result = attempt.result
        return RenewalOutcome(
            barcode=attempt.barcode,
            title=attempt.title,
            ok=result.ok,
            new_due_at=result.new_due_at,
            reason=result.reason,
            message=None,
            details=dict(result.details),
        )

    async def renew(self, reader_id: int, barcode: str, *, expected_renewals: int | None = None) -> RenewalOutcome:
        async def work() -> RenewalOutcome:
            async with self.db.session() as s:
                attempt = await circ.renew_loan(
                    s, reader_id, barcode, self.policy, self.clock(), self.tz, expected_renewals=expected_renewals
                )
            return self._outcome(attempt)

        return await self._run(work)

    async def renew_all(self, reader_id: int, *, listed_at: dt.datetime | None = None) -> list[RenewalOutcome]:
        async def work() -> list[RenewalOutcome]:
            async with self.db.session() as s:
                attempts = await circ.renew_all(s, reader_id, self.policy, self.clock(), self.tz, listed_at=listed_at)
            return [self._outcome(a) for a in attempts]

        return await self._run(work)

    async def place_hold(self, reader_id: int, record_id: int, *, pickup_branch: str | None = None) -> HoldOutcome:
        if pickup_branch is not None and pickup_branch not in {b.code for b in self.policy.library.branches}:
            pickup_branch = None

        async def work() -> HoldOutcome:
            async with self.db.session() as s:
                placed = await circ.place_hold(
                    s, reader_id, record_id, self.policy, self.clock(), self.tz, pickup_branch=pickup_branch
                )
            return HoldOutcome(
                ok=placed.ok,
                title=placed.title,
                refused=placed.refused,
                position=placed.position,
                hold_id=str(placed.hold.id) if placed.hold is not None else None,
            )

        return await self._run(work)

    async def cancel_hold(self, reader_id: int, hold_id: str) -> bool:
        try:
            number = int(hold_id)
        except ValueError:
            return False

        async def work() -> bool:
            async with self.db.session() as s:
                hold = await circ.cancel_hold(s, reader_id, number, self.policy, self.clock(), self.tz)
            return hold is not None

        return await self._run(work)

    async def availability(self, record_ids: Sequence[int]) -> dict[int, Availability]:
        ids = set(record_ids)
        if not ids:
            return {}

        async def work() -> dict[int, Availability]:
            async with self.db.session() as s:
                rows = (
                    await s.execute(
                        select(Item, Loan.due_at)
                        .outerjoin(Loan, (Loan.item_id == Item.id) & Loan.returned_at.is_(None))
                        .where(Item.record_id.in_(ids))
                        .order_by(Item.record_id, Item.id)
                    )
                ).all()
                waiting = Counter(
                    dict(
                        (
                            await s.execute(
                                select(circ.Hold.record_id, func.count())
                                .where(circ.Hold.record_id.in_(ids), circ.Hold.status == HoldStatus.WAITING)
                                .group_by(circ.Hold.record_id)
                            )
                        ).all()
                    )
                )
            copies: dict[int, list[CopyView]] = defaultdict(list)
            shelf: Counter[int] = Counter()
            for item, due in rows:
                copies[item.record_id].append(CopyView(item.barcode, item.location, item.call_number, item.status, due))
                if item.status == ItemStatus.AVAILABLE and item.item_type not in self.policy.circulation.non_loanable_types:
                    shelf[item.record_id] += 1
            return {
                rid: Availability(rid, len(found), shelf[rid], int(waiting[rid]), tuple(found))
                for rid, found in copies.items()
            }

        return await self._run(work)

    async def fines(self, reader_id: int) -> AccountFines | None:
        """Each loan's fine is on the list already; the local store keeps no other account."""
        return None


def sip2_config(settings: Any = None) -> Any:
    """The connection settings of the library's SIP2 server (``LIBRARYBOT_SIP2_*``): from the bot's
    settings through the SIP2 connector when it is installed, else from the environment.
    ``ValueError`` names what is missing or wrong."""
    if settings is not None:
        try:
            from storage.ils_sip2 import sip2_config as from_settings  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            pass
        else:
            return from_settings(settings)
    from storage.sip2.client import Sip2Config

    return Sip2Config.from_env()


def make_circulation_service(
    kind: str,
    db: Database,
    policy: Policy,
    tz: ZoneInfo,
    settings: Any = None,
    *,
    clock: Callable[[], dt.datetime] | None = None,
) -> CirculationService:
    """The service named by ``LIBRARYBOT_ILS``: "local" (this store) or "sip2" (the library's own
    system through ``storage.ils_sip2.Sip2Circulation``, which implements ``CirculationService``;
    the handlers do not change)."""
    kind = (kind or "local").strip().lower()
    if kind == "local":
        return LocalCirculation(db, policy, tz, clock or utcnow)
    if kind == "sip2":
        try:
            from storage.ils_sip2 import Sip2Circulation  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ValueError("LIBRARYBOT_ILS=sip2, but this build has no SIP2 connector") from None
        service: CirculationService = Sip2Circulation.from_settings(db, policy, tz, settings, clock or utcnow)
        return service
    raise ValueError(f"LIBRARYBOT_ILS must be local or sip2, not {kind!r}")
