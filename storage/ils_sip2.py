"""The circulation interface over the library's own system, through SIP2 (``LIBRARYBOT_ILS=sip2``).

``Sip2Circulation`` implements ``storage.ils.CirculationService`` over a ``Sip2Pool``, so the chat
shows what the library's system (Koha, Evergreen, FOLIO, …) says, and the handlers do not change:

============================  ==============================================================
interface                     SIP2
============================  ==============================================================
``check_card``                63 Patron Information → BL (known) and CQ (PIN right); AE name
``loans``                     63 with the charged-items summary (paged), then 17 per loan
``renew`` / ``renew_all``     29 / 65 (never sent twice: see "Renewals" below)
``holds``                     63 hold and unavailable-hold summaries, 17 per hold
``place_hold``/``cancel_hold`` 15 with mode ``+`` / ``-``
``availability``              17 for every copy (local ``Item`` rows) of the titles on screen
============================  ==============================================================

What SIP2 cannot provide stays in the local store: the catalogue (a title's copies are the local
``Item`` rows), notice records, ILL and tickets. A SIP2 login creates or refreshes the local
``Reader`` row of the card (name from AE, expiry from the common PA extension, blocked from the
patron status) with the pin hash ``"!sip2"``, which no PIN ever matches, so ``User.reader_id``
works as with local cards. The reader's PIN is never kept: later requests leave AD out (an empty
AD is refused by Evergreen's and Koha's servers), so the SIP2 account must be allowed to act for
patrons without their password (the usual set-up of a self-check account).

Renewals. SIP2 does not say how often a loan was renewed. The bot keeps its own note of every
renewal it made (``PersistedState`` rows of kind ``sip2-renewal``, key ``<reader>:<n>:<barcode>``),
and shows that count on the list, so the Renew button carries it as the local store's does. A
press claims the note for ``n`` with an INSERT that only one press (in any process) can win
before the 29 is written; a second press of the same button answers ALREADY_RENEWED. A refused
renewal releases the claim; a renewal whose fate is unknown (the connection broke after the 29
was written) keeps it, so the same button never sends it again. Renew all sends one 65, unless
something was renewed since the list was shown (or the same button was pressed before): then
each remaining loan is renewed with its own 29 under the same rules. The notes of a loan go when
it is no longer on the reader's list.

Link alerts. The first request that cannot reach the system marks the link down; the first one
that succeeds marks it up. The state is kept in the database (kind ``sip2``, key ``link``, with an
outage number), and each change queues one message to the staff chat with the dedupe key
``sip2:link-down:<n>`` / ``sip2:link-up:<n>``, so several processes noticing the same outage say it
once. While the link is down a probe sends a 99 every ``probe_every`` seconds, so the staff hear
that it is back even when no reader asks.

Notices. The daily cycle (``storage.notices``) reads its loans from a source the service
registers for its database (``notices.use_loan_source``): ``notice_loans`` asks the system for
the linked readers' loans (63, then 17 per loan), at most ``LIBRARYBOT_SIP2_RATE`` requests a
second, instead of the local loan rows; nothing is copied into the local store. Holds ready for
pick-up are announced by the library's system itself (it knows when a copy reaches the shelf).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage import circulation as circ
from storage import notices
from storage.catalog import Item, Record
from storage.circulation import Hold, ItemStatus, Loan, RenewalRefused
from storage.db import Database, utcnow
from storage.ils import (
    AccountFines,
    Availability,
    CardCheck,
    CirculationUnavailable,
    CopyView,
    HoldOutcome,
    HoldRefused,
    HoldView,
    LoanView,
    RenewalOutcome,
)
from storage.outbox import Priority, enqueue
from storage.people import Reader, User
from storage.policy import Policy
from storage.sip2 import protocol as p
from storage.sip2.client import Sip2Config, Sip2Pool
from storage.sip2.errors import Sip2Error, Sip2LoginRefused, Sip2Unavailable
from storage.sip2.protocol import Sip2BadRequest
from storage.state import PersistedState, save_state

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The pin hash of a card row made by a SIP2 login: not an Argon2 hash, so no PIN ever matches it.
PLACEHOLDER_PIN_HASH = "!sip2"
#: Requests per second the daily notice cycle may send (``LIBRARYBOT_SIP2_RATE``).
DEFAULT_RATE = 10.0
#: Seconds between the 99s that look for the system's return while the link is down.
PROBE_EVERY = 30.0

# PersistedState kinds (the table is the store's small key-value room for state that must outlive
# a process): the link's state, the renewals made through the bot, Renew all presses, and what the
# system answered when a hold was placed (its queue position and pick-up place).
STATE, LINK = "sip2", "link"
RENEWALS = "sip2-renewal"
RENEW_ALL = "sip2-renew-all"
HOLDS = "sip2-hold"
NOTES_KEPT = dt.timedelta(days=2)  # Renew all presses older than this are forgotten

# SIP2 circulation statuses (18) as the local item statuses the chat knows, else a plain word.
ITEM_STATUSES: dict[int, str] = {
    1: "other",
    2: "on_order",
    3: ItemStatus.AVAILABLE,
    4: ItemStatus.ON_LOAN,
    5: ItemStatus.ON_LOAN,
    6: "in_process",
    7: ItemStatus.ON_LOAN,
    8: ItemStatus.ON_HOLD_SHELF,
    9: "reshelving",
    10: "in_transit",
    11: "claimed_returned",
    12: "lost",
    13: "missing",
}
READY_ON_SHELF = 8  # "waiting on hold shelf"
BLOCKING_FLAGS = ("renewal privileges denied", "charge privileges denied", "card reported lost")


def sip2_config(settings: Any) -> Sip2Config:
    """The SIP2 connection settings from ``bot.settings.Settings`` (``LIBRARYBOT_SIP2_*``); raises
    ``ValueError`` naming what is missing or wrong."""
    host = (getattr(settings, "sip2_host", "") or "").strip()
    if not host:
        raise ValueError("LIBRARYBOT_SIP2_HOST is not set: the host name of the library's SIP2 server")

    def secret(value: Any) -> str:
        if value is None:
            return ""
        return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)

    return Sip2Config(
        host=host,
        port=int(settings.sip2_port),
        user=(settings.sip2_user or "").strip(),
        password=secret(settings.sip2_password),
        institution=(settings.sip2_institution or "").strip(),
        location=(settings.sip2_location or "").strip(),
        tls=bool(settings.sip2_tls),
        encoding=(settings.sip2_encoding or "utf-8").strip() or "utf-8",
        error_detection=bool(settings.sip2_error_detection),
        timeout=float(settings.sip2_timeout),
        pool_size=int(settings.sip2_pool_size),
        heartbeat_seconds=float(settings.sip2_heartbeat_seconds),
        terminal_password=secret(settings.sip2_terminal_password),
        tls_verify=bool(settings.sip2_tls_verify),
        tls_ca_file=(settings.sip2_tls_ca_file or "").strip() or None,
    )


class _Pace:
    """Spaces requests at least ``1 / rate`` seconds apart (the notice cycle must not flood the system)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = asyncio.get_running_loop().time()
        start = max(now, self._next)
        self._next = start + self.interval  # reserved before sleeping: concurrent callers queue up
        if start > now:
            await asyncio.sleep(start - now)


async def _paced(pace: _Pace | None) -> None:
    if pace is not None:
        await pace.wait()


def _unique(values: Iterable[str]) -> list[str]:
    """Values in order without repeats or blanks (some servers list a loan twice)."""
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))


def _sendable(text: str) -> bool:
    """SIP2 cannot carry ``|`` or line ends inside a field; such input is refused before sending."""
    return not any(ch in text for ch in "|\r\n")


def _screen(messages: Sequence[str]) -> str | None:
    """The system's screen messages (AF) as one text, None when it said nothing."""
    text = " / ".join(m.strip() for m in messages if m and m.strip())
    return text or None


def _insert(session: AsyncSession) -> Any:
    bind = session.bind
    return pg_insert if bind is not None and bind.dialect.name == "postgresql" else sqlite_insert


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _from_iso(text: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text) if isinstance(text, str) and text else None
    except ValueError:
        return None


class Sip2Circulation:
    """``CirculationService`` over the library's SIP2 server (see the module docstring).

    ``clock`` is the bot's clock (UTC; the loans handler replaces it with the bot's, which tests
    move); SIP2 transaction dates are sent as the library's local time. ``staff_chat_id`` receives
    the link alerts; ``rate`` bounds the notice cycle's requests per second.
    """

    def __init__(
        self,
        db: Database,
        policy: Policy,
        config: Sip2Config,
        tz: ZoneInfo = circ.DEFAULT_TZ,
        clock: Callable[[], dt.datetime] = utcnow,
        *,
        staff_chat_id: int | None = None,
        rate: float = DEFAULT_RATE,
        probe_every: float = PROBE_EVERY,
        pool: Sip2Pool | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.config = config
        self.tz = tz
        self.clock = clock
        self.staff_chat_id = staff_chat_id
        self.rate = rate
        self.probe_every = probe_every
        self.pool = pool or Sip2Pool(config, clock=self._local_now)
        self._link_up: bool | None = None  # None: not known yet in this process
        self._probe: asyncio.Task[None] | None = None
        self._reader_locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._fines_seen: dict[int, AccountFines | None] = {}  # from the last loans(), for fines()
        self._drop_loan_source = notices.use_loan_source(db, self.notice_loans)

    @classmethod
    def from_settings(
        cls,
        db: Database,
        policy: Policy,
        tz: ZoneInfo,
        settings: Any,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> Sip2Circulation:
        """The service as ``LIBRARYBOT_ILS=sip2`` configures it."""
        return cls(
            db,
            policy,
            sip2_config(settings),
            tz,
            clock,
            staff_chat_id=getattr(settings, "staff_chat_id", None),
            rate=float(getattr(settings, "sip2_rate", DEFAULT_RATE) or DEFAULT_RATE),
        )

    async def close(self) -> None:
        """Stop the probe, close the connections, and give the notice cycle its local loans back."""
        self._drop_loan_source()
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        await self.pool.close()

    def _local_now(self) -> dt.datetime:
        return self.clock().astimezone(self.tz).replace(tzinfo=None)

    def _when(self, moment: dt.datetime | None) -> dt.datetime | None:
        """A SIP2 date (naive: the library's local time) as an aware UTC datetime."""
        if moment is None:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=self.tz)
        return moment.astimezone(dt.UTC)

    # -- talking to the system ------------------------------------------------------------------

    async def _ask(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run SIP2 work, keep the link's state, and turn failures into ``CirculationUnavailable``
        (its ``__cause__`` is the SIP2 exception, for callers that must know whether a request left)."""
        try:
            result = await work()
        except Sip2BadRequest:
            raise  # our input; callers check it before asking
        except (Sip2Unavailable, Sip2LoginRefused) as exc:
            await self._link_changed(False, str(exc))
            raise CirculationUnavailable(str(exc)) from exc
        except Sip2Error as exc:
            log.warning("SIP2: the library system's answer cannot be used: %s", exc)
            raise CirculationUnavailable(str(exc)) from exc
        await self._link_changed(True)
        return result

    async def _charged(self, card: str, pace: _Pace | None = None) -> tuple[p.PatronInfo, list[str]]:
        """63 with the charged-items summary, page after page while the server fills whole pages."""
        size = p.DEFAULT_ITEMS_PER_PAGE
        await _paced(pace)
        info = await self.pool.patron_information(card, "", summary="charged", start=1, end=size)
        barcodes = list(info.charged_items)
        count = info.charged_items_count or 0
        while barcodes and len(barcodes) < count and len(barcodes) % size == 0:
            await _paced(pace)
            page = await self.pool.patron_information(
                card, "", summary="charged", start=len(barcodes) + 1, end=len(barcodes) + size
            )
            if not page.charged_items:
                break
            barcodes += page.charged_items
        return info, _unique(barcodes)

    async def _items(self, barcodes: Sequence[str], pace: _Pace | None = None) -> list[p.ItemInfo]:
        """17 for each barcode, spread over the pool; the first failure is raised once all finished
        (a list with some loans silently missing would mislead)."""

        async def one(barcode: str) -> p.ItemInfo:
            await _paced(pace)
            return await self.pool.item_information(barcode)

        results = await asyncio.gather(*(one(b) for b in barcodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, p.ItemInfo)]

    async def _items_or_none(self, barcodes: Sequence[str]) -> dict[str, p.ItemInfo | None]:
        """17 for each barcode where a missing answer only costs a title or a date (after a renewal)."""
        try:
            items = await self._ask(lambda: self._items(barcodes))
        except CirculationUnavailable:
            return dict.fromkeys(barcodes)
        return dict(zip(barcodes, items, strict=True))

    # -- the local store ------------------------------------------------------------------------

    async def _reader(self, reader_id: int) -> Reader | None:
        async with self.db.session() as s:
            return await s.get(Reader, reader_id)

    async def _catalogue(self, barcodes: Iterable[str]) -> dict[str, tuple[str, str, int]]:
        """Title, item type and record id of the copies the local catalogue knows, by barcode."""
        wanted = list(set(barcodes))
        if not wanted:
            return {}
        async with self.db.session() as s:
            rows = (
                await s.execute(
                    select(Item.barcode, Record.title, Item.item_type, Record.id)
                    .join(Record, Record.id == Item.record_id)
                    .where(Item.barcode.in_(wanted))
                )
            ).all()
        return {barcode: (title, item_type, record_id) for barcode, title, item_type, record_id in rows}

    async def _remember_reader(self, card: str, name: str, expires_on: dt.date | None, blocked: bool) -> None:
        """Create or refresh the local card row of a reader the system knows."""
        for _ in range(2):  # a second login of the same card at the same moment may insert first
            try:
                async with self.db.session() as s:
                    reader = await s.scalar(select(Reader).where(Reader.card_number == card))
                    if reader is None:
                        s.add(Reader(card_number=card, name=name[:256], pin_hash=PLACEHOLDER_PIN_HASH,
                                     expires_on=expires_on, blocked=blocked))
                    else:
                        reader.name = name[:256]
                        reader.expires_on = expires_on
                        reader.blocked = blocked
                return
            except IntegrityError:
                continue

    async def _claim(self, kind: str, key: str, value: dict[str, Any]) -> bool:
        """Insert a note unless it exists; True for the one caller (of any process) that inserted it."""
        async with self.db.session() as s:
            stmt = _insert(s)(PersistedState).values(kind=kind, key=key, value=value, updated_at=utcnow())
            result = await s.execute(stmt.on_conflict_do_nothing(index_elements=["kind", "key"]))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def _note(self, kind: str, key: str, value: dict[str, Any] | None) -> None:
        async with self.db.session() as s:
            await save_state(s, kind, key, value)

    async def _notes(self, kind: str, reader_id: int) -> dict[str, dict[str, Any]]:
        """The notes of one kind about one reader, by the rest of their key."""
        prefix = f"{reader_id}:"
        async with self.db.session() as s:
            rows = (
                await s.execute(
                    select(PersistedState.key, PersistedState.value).where(
                        PersistedState.kind == kind, PersistedState.key.like(prefix + "%")
                    )
                )
            ).all()
        return {key[len(prefix):]: value for key, value in rows}

    async def _forget_notes(self, kind: str, reader_id: int, rests: Iterable[str]) -> None:
        keys = [f"{reader_id}:{rest}" for rest in rests]
        if keys:
            async with self.db.session() as s:
                await s.execute(delete(PersistedState).where(PersistedState.kind == kind, PersistedState.key.in_(keys)))

    async def _renewals(
        self, reader_id: int, notes: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """The renewals made through the bot, per barcode, oldest first."""
        by_barcode: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        if notes is None:
            notes = await self._notes(RENEWALS, reader_id)
        for rest, value in notes.items():
            n, _, barcode = rest.partition(":")
            if n.isdigit() and barcode:
                by_barcode[barcode].append((int(n), value))
        return {b: [v for _, v in sorted(notes, key=lambda x: x[0])] for b, notes in by_barcode.items()}

    # -- the link to the system -----------------------------------------------------------------

    async def _link_changed(self, up: bool, reason: str = "") -> None:
        if self._link_up is up:
            return
        self._link_up = up  # set before awaiting: concurrent failures report one outage
        if not up:
            log.warning("SIP2: the library system is not answering: %s", reason)
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._probe_until_up(), name="sip2-link-probe")
        await self._record_link(up, reason)

    async def _probe_until_up(self) -> None:
        while self._link_up is False:
            await asyncio.sleep(self.probe_every)
            try:
                await self.pool.sc_status()
            except Exception as exc:  # still down (or not usable): try again later
                log.info("SIP2: the library system is still not answering: %s", exc)
                continue
            await self._link_changed(True)

    async def _record_link(self, up: bool, reason: str) -> None:
        """Note the change in the database and tell the staff chat, once per outage for all processes."""
        now = self.clock()
        address = self.config.address
        try:
            async with self.db.session() as s:
                row = await s.get(PersistedState, (STATE, LINK))
                state: dict[str, Any] = dict(row.value) if row is not None else {}
                down, outage = bool(state.get("down")), int(state.get("outage", 0))
                if up != down:
                    return  # already known, here or by another process
                if up:
                    since = _from_iso(state.get("since"))
                    minutes = max(0, int((now - since).total_seconds() // 60)) if since else 0
                    await save_state(s, STATE, LINK, {"down": False, "outage": outage, "up_at": now.isoformat()})
                    log.warning("SIP2: the library system answers again (outage %d, %d min)", outage, minutes)
                    key, params = "sip2.link_up", {"address": html.escape(address), "minutes": minutes}
                else:
                    outage += 1
                    await save_state(s, STATE, LINK, {"down": True, "outage": outage, "since": now.isoformat()})
                    since_text = now.astimezone(self.tz).strftime("%Y-%m-%d %H:%M")
                    key = "sip2.link_down"
                    params = {"address": html.escape(address), "since": since_text,
                              "reason": html.escape(reason[:300], quote=False)}
                if self.staff_chat_id is not None:
                    await enqueue(
                        s, self.staff_chat_id, key, params, kind="alert", priority=Priority.ALERT,
                        dedupe_key=f"sip2:{'link-up' if up else 'link-down'}:{outage}",
                    )
        except Exception:  # the alert must never cost the reader their answer
            log.exception("SIP2: could not record the link's state")

    # -- CirculationService ---------------------------------------------------------------------

    async def check_card(self, card_number: str, pin: str) -> CardCheck:
        """63 with the PIN: valid when the system knows the card (BL) and says the PIN is right (CQ Y).
        A valid card's local row is created or refreshed. ``people.login`` calls this only once the
        attempt is counted, so a locked card is never asked about and guessing never reaches the system."""
        card = card_number.strip()[:64]
        if not card or not _sendable(card) or not _sendable(pin):
            return CardCheck(False, card)
        info = await self._ask(lambda: self.pool.patron_information(card, pin, summary=None, start=None))
        if info.valid_patron is False or info.valid_password is not True:
            return CardCheck(False, card)
        expiry = p.parse_timestamp(info.message.get("PA"))  # an extension Koha and Evergreen send
        expires_on = expiry.date() if expiry is not None else None
        blocked = any(flag in info.status_flags for flag in BLOCKING_FLAGS[1:])
        name = (info.name or "").strip() or card
        await self._remember_reader(card, name, expires_on, blocked)
        expired = expires_on is not None and expires_on < circ.local_date(self.clock(), self.tz)
        return CardCheck(True, card, name, expired=expired, blocked=blocked)

    async def loans(self, reader_id: int) -> list[LoanView]:
        reader = await self._reader(reader_id)
        if reader is None:
            return []
        card = reader.card_number

        async def fetch() -> tuple[p.PatronInfo, list[str], list[p.ItemInfo]]:
            info, barcodes = await self._charged(card)
            return info, barcodes, await self._items(barcodes)

        info, barcodes, items = await self._ask(fetch)
        self._fines_seen[reader_id] = await self._account_fines(card, info)
        local = await self._catalogue(barcodes)
        notes = await self._notes(RENEWALS, reader_id)
        renewals = await self._renewals(reader_id, notes)
        await self._forget_notes(RENEWALS, reader_id, [k for k in notes if k.partition(":")[2] not in barcodes])
        await self._forget_old_renew_all(reader_id)
        patron_refusal = RenewalRefused.CARD_BLOCKED if any(f in info.status_flags for f in BLOCKING_FLAGS) else None
        now = self.clock()
        views = []
        for barcode, item in zip(barcodes, items, strict=True):
            title, item_type, _ = local.get(barcode, ("", "book", 0))
            due = self._when(item.due_date)
            if due is None:
                log.warning("SIP2: no readable due date for a loan (%r); shown as due today", item.due_date_text)
                due = now
            late = circ.overdue_days(due, now, self.tz)
            refusal = patron_refusal or (RenewalRefused.ON_HOLD if (item.hold_queue_length or 0) > 0 else None)
            views.append(
                LoanView(
                    barcode=barcode,
                    title=item.title or title or barcode,
                    due_at=due,
                    overdue_days=late,
                    fine=self._fine(item, late, reader.category, item_type),
                    renewals=len(renewals.get(barcode, [])),
                    max_renewals=None,  # the system's rule; SIP2 does not tell it
                    renewable=refusal is None,
                    refusal=refusal,
                    currency=self.policy.circulation.currency,
                )
            )
        return sorted(views, key=lambda v: (v.due_at, v.barcode))

    async def fines(self, reader_id: int) -> AccountFines | None:
        """The fee amount (BV) and fine items (AV) the system keeps for the reader: from the list
        just read by ``loans`` when there is one, else asked now (63)."""
        if reader_id in self._fines_seen:
            return self._fines_seen.pop(reader_id)
        reader = await self._reader(reader_id)
        if reader is None:
            return None
        card = reader.card_number
        info = await self._ask(lambda: self.pool.patron_information(card, "", summary=None, start=None))
        return await self._account_fines(card, info)

    async def _account_fines(self, card: str, info: p.PatronInfo) -> AccountFines | None:
        """BV of a 64, and its fine items (a 63 with the fine summary) when it counts any."""
        total: Decimal | None = None
        if info.fee_amount and info.fee_amount.strip():
            try:
                total = Decimal(info.fee_amount.strip()).quantize(Decimal("0.01"))
            except InvalidOperation:
                log.warning("SIP2: a fee amount that is not a number: %r", info.fee_amount[:40])
        items: list[str] = []
        if info.fine_items_count:
            try:
                listed = await self._ask(
                    lambda: self.pool.patron_information(card, "", summary="fine", start=1, end=info.fine_items_count)
                )
                items = _unique(listed.fine_items)
            except CirculationUnavailable:
                items = []  # the total (if any) still stands; the list is a detail
        if not items and (total is None or total <= 0):
            return None
        currency = (info.currency or "").strip() or self.policy.circulation.currency
        return AccountFines(total if total is not None and total > 0 else None, currency, tuple(items))

    def _fine(self, item: p.ItemInfo, late: int, category: str, item_type: str) -> Decimal:
        """The system's fee on the item (BV) when it sends one, else the policy's estimate."""
        if item.fee_amount:
            try:
                return Decimal(item.fee_amount.strip()).quantize(Decimal("0.01"))
            except InvalidOperation:
                pass
        return circ.money(circ.fine_cents(late, self.policy.loan_rules(category, item_type)))

    async def renew(self, reader_id: int, barcode: str, *, expected_renewals: int | None = None) -> RenewalOutcome:
        barcode = barcode.strip()[:64]
        reader = await self._reader(reader_id)
        if reader is None or not barcode or not _sendable(barcode):
            return RenewalOutcome(barcode, "", False, None, RenewalRefused.NOT_ON_LOAN)
        async with self._reader_locks[reader_id]:
            done = (await self._renewals(reader_id)).get(barcode, [])
            if expected_renewals is not None and expected_renewals != len(done):
                return await self._already(barcode, done)
            return await self._renew_one(reader, barcode, len(done))

    async def _renew_one(self, reader: Reader, barcode: str, n: int) -> RenewalOutcome:
        """29 for one loan, once: the note ``<reader>:<n>:<barcode>`` is claimed before it is sent."""
        key = f"{n}:{barcode}"
        if not await self._claim(RENEWALS, f"{reader.id}:{key}", {"state": "pending", "at": _iso(self.clock())}):
            return await self._already(barcode, (await self._renewals(reader.id)).get(barcode, []))
        try:
            result = await self._ask(lambda: self.pool.renew(reader.card_number, "", barcode))
        except CirculationUnavailable as exc:
            await self._settle_unknown(RENEWALS, reader.id, key, exc)
            raise
        if not result.ok:
            await self._forget_notes(RENEWALS, reader.id, [key])
            return await self._refusal(reader, barcode, result)
        due = self._when(result.due_date)
        title = result.title or ""
        if due is None or not title:
            item = (await self._items_or_none([barcode]))[barcode]
            due = due or (self._when(item.due_date) if item else None)
            title = title or (item.title or "" if item else "")
        title = title or (await self._catalogue([barcode])).get(barcode, ("",))[0]
        await self._note(RENEWALS, f"{reader.id}:{key}",
                         {"state": "done", "at": _iso(self.clock()), "due": _iso(due), "title": title[:200]})
        log.info("SIP2 renewal of %s done", barcode)
        return RenewalOutcome(barcode, title, True, due, message=_screen(result.screen_messages))

    async def _settle_unknown(self, kind: str, reader_id: int, key: str, exc: CirculationUnavailable) -> None:
        """After a failed renewal: release the claim when the request never left, else keep it."""
        cause = exc.__cause__
        never_sent = isinstance(cause, Sip2LoginRefused) or (
            isinstance(cause, Sip2Unavailable) and not cause.may_have_reached_server
        )
        if never_sent:
            await self._forget_notes(kind, reader_id, [key])
        else:
            log.warning("SIP2: a renewal may or may not have been done (%s); it is not sent again", cause)
            await self._note(kind, f"{reader_id}:{key}", {"state": "unknown", "at": _iso(self.clock())})

    async def _already(self, barcode: str, done: list[dict[str, Any]]) -> RenewalOutcome:
        """ALREADY_RENEWED, with the due date the last renewal gave (or the system's current one)."""
        due = _from_iso(done[-1].get("due")) if done else None
        title = str(done[-1].get("title") or "") if done else ""
        if due is None:
            item = (await self._items_or_none([barcode]))[barcode]
            if item is not None and item.found:
                due, title = self._when(item.due_date), item.title or ""
        title = title or (await self._catalogue([barcode])).get(barcode, ("",))[0]
        return RenewalOutcome(barcode, title, False, due, RenewalRefused.ALREADY_RENEWED)

    async def _refusal(self, reader: Reader, barcode: str, result: p.RenewResult) -> RenewalOutcome:
        """A refused 29, with the reason told when the system's state shows it: not this reader's
        loan, a blocked card, fines over the limit, or other readers waiting for it. The system's
        own words (AF) go with it."""
        title = result.title or (await self._catalogue([barcode])).get(barcode, ("",))[0]
        reason: RenewalRefused | None = None
        details: dict[str, Any] = {}
        try:
            info, charged = await self._ask(lambda: self._charged(reader.card_number))
            if barcode not in charged:
                reason = RenewalRefused.NOT_ON_LOAN
            elif any(flag in info.status_flags for flag in BLOCKING_FLAGS):
                reason = RenewalRefused.CARD_BLOCKED
            elif "excessive outstanding fines" in info.status_flags and info.fee_amount and info.fee_limit:
                reason = RenewalRefused.FINES_TOO_HIGH
                details = {"fines": info.fee_amount.strip(), "limit": info.fee_limit.strip()}
            else:
                item = (await self._ask(lambda: self._items([barcode])))[0]
                title = title or item.title or ""
                if (item.hold_queue_length or 0) > 0:
                    reason = RenewalRefused.ON_HOLD
        except CirculationUnavailable:
            pass  # the refusal itself is certain; only its reason is not
        log.info("SIP2 renewal of %s refused (%s): %s", barcode, reason or "reason not told",
                 _screen(result.screen_messages) or "no message")
        return RenewalOutcome(barcode, title if reason != RenewalRefused.NOT_ON_LOAN else result.title or "",
                              False, None, reason, message=_screen(result.screen_messages), details=details)

    async def renew_all(self, reader_id: int, *, listed_at: dt.datetime | None = None) -> list[RenewalOutcome]:
        reader = await self._reader(reader_id)
        if reader is None:
            return []
        async with self._reader_locks[reader_id]:
            if listed_at is None:
                return await self._renew_all_at_once(reader, None)
            press = str(int(listed_at.timestamp()))
            first_press = await self._claim(RENEW_ALL, f"{reader_id}:{press}", {"state": "pending", "at": _iso(self.clock())})
            renewals = await self._renewals(reader_id)
            since = {
                barcode for barcode, notes in renewals.items()
                if any((_from_iso(n.get("at")) or listed_at) >= listed_at for n in notes)
            }
            if first_press and not since:
                return await self._renew_all_at_once(reader, press)
            # Loan by loan, each 29 guarded by its own note. When this button was pressed before
            # and its 65 may be in flight or may have been done, nothing is renewed again.
            previous = (await self._notes(RENEW_ALL, reader_id)).get(press, {})
            fate_unknown = not first_press and previous.get("state") in ("pending", "unknown")
            if first_press:
                await self._note(RENEW_ALL, f"{reader_id}:{press}", {"state": "each", "at": _iso(self.clock())})
            return await self._renew_each(reader, since, renewals, fate_unknown)

    async def _renew_each(
        self, reader: Reader, since: set[str], renewals: dict[str, list[dict[str, Any]]], fate_unknown: bool
    ) -> list[RenewalOutcome]:
        """Renew all, loan by loan: loans renewed since the list was shown (or all of them, when an
        earlier press of this button may have renewed them) answer ALREADY_RENEWED."""
        outcomes = []
        for view in await self.loans(reader.id):
            if view.barcode in since or fate_unknown:
                outcomes.append(RenewalOutcome(view.barcode, view.title, False, view.due_at, RenewalRefused.ALREADY_RENEWED))
            else:
                outcomes.append(await self._renew_one(reader, view.barcode, len(renewals.get(view.barcode, []))))
        return outcomes

    async def _renew_all_at_once(self, reader: Reader, press: str | None) -> list[RenewalOutcome]:
        """One 65; then a 17 per loan named in the answer, for titles and new due dates."""
        try:
            result = await self._ask(lambda: self.pool.renew_all(reader.card_number, ""))
        except CirculationUnavailable as exc:
            if press is not None:
                await self._settle_unknown(RENEW_ALL, reader.id, press, exc)
            raise
        if press is not None:
            await self._note(RENEW_ALL, f"{reader.id}:{press}", {"state": "done", "at": _iso(self.clock())})
        message = _screen(result.screen_messages)
        if not result.ok:
            # Refused as a whole (ok 0): nothing was renewed, whatever placeholders the item lists
            # hold (Evergreen sends BMARRAY(0x…) here). One outcome without a loan carries the
            # system's words.
            log.info("SIP2 renew all refused: %s", message or "no message")
            return [RenewalOutcome("", "", False, None, message=message)]
        # Only the reader's loans can have been renewed: anything else in the lists (placeholders
        # such as ARRAY(0x…), another reader's items) is not shown and gets no note.
        try:
            _, charged = await self._ask(lambda: self._charged(reader.card_number))
        except CirculationUnavailable:
            charged = []
        loans_now = set(charged)
        renewed = [b for b in _unique(result.renewed_items) if b in loans_now]
        refused = [b for b in _unique(result.unrenewed_items) if b not in renewed and b in loans_now]
        if result.renewed_count is not None and len(renewed) > result.renewed_count:
            # The count is the system's own word: never show more renewed than it says.
            refused = renewed[result.renewed_count :] + refused
            renewed = renewed[: result.renewed_count]
        if not renewed and not refused:
            if not result.renewed_count and not result.unrenewed_count:
                return [RenewalOutcome("", "", False, None, message=message)] if message else []
            # The counts without the lists: tell each loan as it now stands (and, when all were
            # renewed, note them, so this button does not renew them again).
            everything_renewed = not result.unrenewed_count
            views = await self.loans(reader.id)
            if everything_renewed:
                for v in views:
                    await self._claim(RENEWALS, f"{reader.id}:{v.renewals}:{v.barcode}",
                                      {"state": "done", "at": _iso(self.clock()), "due": _iso(v.due_at), "title": v.title[:200]})
            return [RenewalOutcome(v.barcode, v.title, everything_renewed, v.due_at if everything_renewed else None,
                                   message=message) for v in views]
        items = await self._items_or_none(renewed + refused)
        local = await self._catalogue(renewed + refused)
        done = await self._renewals(reader.id)
        outcomes = []
        for barcode in renewed + refused:
            item = items[barcode]
            title = (item.title if item else "") or local.get(barcode, ("",))[0]
            if barcode in renewed:
                due = self._when(item.due_date) if item else None
                n = len(done.get(barcode, []))
                await self._claim(RENEWALS, f"{reader.id}:{n}:{barcode}",
                                  {"state": "done", "at": _iso(self.clock()), "due": _iso(due), "title": title[:200]})
                outcomes.append(RenewalOutcome(barcode, title, True, due, message=message))
            else:
                held = item is not None and (item.hold_queue_length or 0) > 0
                outcomes.append(RenewalOutcome(barcode, title, False, None,
                                               RenewalRefused.ON_HOLD if held else None, message=message))
        log.info("SIP2 renew all: %d renewed, %d refused", len(renewed), len(refused))
        return outcomes

    async def _forget_old_renew_all(self, reader_id: int) -> None:
        cutoff = self.clock() - NOTES_KEPT
        presses = await self._notes(RENEW_ALL, reader_id)
        await self._forget_notes(
            RENEW_ALL, reader_id, [k for k, v in presses.items() if (_from_iso(v.get("at")) or cutoff) <= cutoff]
        )

    async def holds(self, reader_id: int) -> list[HoldView]:
        reader = await self._reader(reader_id)
        if reader is None:
            return []
        card = reader.card_number

        async def fetch() -> tuple[list[str], list[str], dict[str, p.ItemInfo | None]]:
            held = await self.pool.patron_information(card, "", summary="hold", start=1)
            waiting = await self.pool.patron_information(card, "", summary="unavailable", start=1)
            ids = _unique([*held.hold_items, *waiting.unavailable_hold_items])
            items = await asyncio.gather(*(self.pool.item_information(i) for i in ids), return_exceptions=True)
            return ids, _unique(waiting.unavailable_hold_items), {
                i: (r if isinstance(r, p.ItemInfo) and r.found else None) for i, r in zip(ids, items, strict=True)
            }

        ids, waiting, items = await self._ask(fetch)
        placed = await self._notes(HOLDS, reader_id)
        await self._forget_notes(HOLDS, reader_id, [k for k in placed if k not in ids])
        local = await self._catalogue(ids)
        now = self.clock()
        views = []
        for hold_id in ids:
            item = items[hold_id]
            note = placed.get(hold_id, {})
            ready = item is not None and item.circulation_status == READY_ON_SHELF and hold_id not in waiting
            position = int(note.get("position") or 1)
            title, _, record_id = local.get(hold_id, ("", "", 0))
            views.append(
                HoldView(
                    hold_id=hold_id,
                    record_id=record_id or None,
                    title=(item.title if item else "") or title or hold_id,
                    status="ready" if ready else "waiting",
                    position=0 if ready else position,
                    queue_length=max(position, item.hold_queue_length or 0) if item else position,
                    pickup=self._pickup(note.get("pickup") or (item.current_location if ready and item else "") or ""),
                    placed_at=_from_iso(note.get("at")) or now,
                    expires_at=self._when(item.hold_pickup_date) if ready and item else None,
                )
            )
        return sorted(views, key=lambda v: (v.status != "ready", v.position, v.placed_at))

    def _pickup(self, place: str) -> str | dict[str, str]:
        """A pick-up place: a branch of the policy by its code, else the system's text."""
        if any(b.code == place for b in self.policy.library.branches):
            return circ.branch_name(self.policy, place)
        return html.escape(place, quote=False)

    async def place_hold(self, reader_id: int, record_id: int, *, pickup_branch: str | None = None) -> HoldOutcome:
        """15 ``+`` on a copy of the title (the local catalogue's first copy): the system decides."""
        reader = await self._reader(reader_id)
        async with self.db.session() as s:
            record = await s.get(Record, record_id)
            barcodes = list(await s.scalars(select(Item.barcode).where(Item.record_id == record_id).order_by(Item.id)))
        if record is None or reader is None:
            return HoldOutcome(False, "", HoldRefused.UNKNOWN_RECORD)
        barcodes = [b for b in barcodes if _sendable(b)]
        if not barcodes:
            return HoldOutcome(False, record.title, HoldRefused.NOT_HOLDABLE)
        if pickup_branch not in {b.code for b in self.policy.library.branches}:
            pickup_branch = None
        barcode = barcodes[0]
        result = await self._ask(
            # BY 2: any copy of the title will do (the reader asked for the title, not this copy).
            lambda: self.pool.hold(reader.card_number, "", barcode, "+", pickup_location=pickup_branch, hold_type=2)
        )
        message = _screen(result.screen_messages)
        if not result.ok:
            return HoldOutcome(False, record.title, message=message)
        position = result.queue_position or 1
        await self._note(HOLDS, f"{reader_id}:{barcode}", {
            "position": position, "pickup": result.pickup_location or pickup_branch or "", "at": _iso(self.clock()),
        })
        return HoldOutcome(True, record.title, position=position, hold_id=barcode, message=message)

    async def cancel_hold(self, reader_id: int, hold_id: str) -> bool:
        """15 ``-``, only for a hold the system lists for this reader (a forged button finds none)."""
        reader = await self._reader(reader_id)
        if reader is None or not hold_id or not _sendable(hold_id):
            return False
        card = reader.card_number

        async def listed() -> bool:
            held = await self.pool.patron_information(card, "", summary="hold", start=1)
            waiting = await self.pool.patron_information(card, "", summary="unavailable", start=1)
            return hold_id in _unique([*held.hold_items, *waiting.unavailable_hold_items])

        if not await self._ask(listed):
            return False
        result = await self._ask(lambda: self.pool.hold(card, "", hold_id, "-"))
        if result.ok:
            await self._forget_notes(HOLDS, reader_id, [hold_id])
        return result.ok

    async def availability(self, record_ids: Sequence[int]) -> dict[int, Availability]:
        """The copies the local catalogue lists for each title, each as the system says it is now (17)."""
        ids = set(record_ids)
        if not ids:
            return {}
        async with self.db.session() as s:
            rows = list(
                await s.scalars(select(Item).where(Item.record_id.in_(ids)).order_by(Item.record_id, Item.id))
            )
        asked = [item.barcode for item in rows if _sendable(item.barcode)]
        try:
            answers = dict(zip(asked, await self._ask(lambda: self._items(asked)), strict=True)) if asked else {}
        except CirculationUnavailable as exc:
            # The catalogue's status may be stale: it is shown, marked as the catalogue's word.
            log.warning("SIP2: availability from the catalogue, the system did not answer: %s", exc)
            answers = {}
        stale: set[int] = set()
        copies: dict[int, list[CopyView]] = defaultdict(list)
        shelf: dict[int, int] = defaultdict(int)
        waiting: dict[int, int] = defaultdict(int)
        for item in rows:
            info = answers.get(item.barcode)
            if info is None or not info.found:  # the system does not know this copy: the catalogue's word
                status, due, location, call_number = item.status, None, item.location, item.call_number
                stale.add(item.record_id)
            else:
                status = ITEM_STATUSES.get(info.circulation_status or 1, "other")
                due = self._when(info.due_date)
                location = info.current_location or info.permanent_location or item.location
                call_number = info.call_number or item.call_number
                waiting[item.record_id] = max(waiting[item.record_id], info.hold_queue_length or 0)
            copies[item.record_id].append(CopyView(item.barcode, location, call_number, status, due))
            if status == ItemStatus.AVAILABLE and item.item_type not in self.policy.circulation.non_loanable_types:
                shelf[item.record_id] += 1
        return {
            rid: Availability(rid, len(found), shelf[rid], waiting[rid], tuple(found), from_catalogue=rid in stale)
            for rid, found in copies.items()
        }

    # -- the daily notice cycle -----------------------------------------------------------------

    async def notice_loans(self, reader_ids: Sequence[int], horizon: dt.datetime) -> list[tuple[Any, ...]]:
        """The loans of ``reader_ids`` due by ``horizon`` (overdue ones included), as the notice
        cycle's rows ``(reader_id, due_at, barcode, item_type, title, card, name, category)``.

        Asks the system (63, then 17 per loan) at most ``rate`` requests a second, a few readers at
        a time. A reader whose loans cannot be read is left out of today's digests (a rerun of the
        cycle picks them up; digests already queued are not queued twice); once the link is down
        the remaining readers are not asked.
        """
        async with self.db.session() as s:
            readers = list(await s.scalars(select(Reader).where(Reader.id.in_(set(reader_ids)))))
        pace = _Pace(self.rate)
        gate = asyncio.Semaphore(self.config.pool_size)
        skipped = 0

        async def one(reader: Reader) -> list[tuple[str, p.ItemInfo]]:
            nonlocal skipped
            async with gate:
                if self._link_up is False:
                    skipped += 1
                    return []
                card = reader.card_number

                async def fetch() -> list[tuple[str, p.ItemInfo]]:
                    _, barcodes = await self._charged(card, pace)
                    return list(zip(barcodes, await self._items(barcodes, pace), strict=True))

                try:
                    return await self._ask(fetch)
                except (CirculationUnavailable, Sip2BadRequest) as exc:
                    skipped += 1
                    log.warning("SIP2: the loans of reader %s could not be read for the notices: %s", reader.id, exc)
                    return []

        found = await asyncio.gather(*(one(r) for r in readers))
        local = await self._catalogue(barcode for loans in found for barcode, _ in loans)
        rows: list[tuple[Any, ...]] = []
        for reader, loans in zip(readers, found, strict=True):
            for barcode, item in loans:
                due = self._when(item.due_date)
                if due is None or due > horizon:
                    continue
                title, item_type, _ = local.get(barcode, ("", "book", 0))
                rows.append((reader.id, due, barcode, item_type, item.title or title or barcode,
                             reader.card_number, reader.name, reader.category))
        if skipped:
            log.warning("SIP2: %d of %d readers were not asked for the notices", skipped, len(readers))
        return sorted(rows, key=lambda r: (r[1], r[2]))


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """/forgetme: a card row that only a SIP2 login made (the name came from the library's system)
    goes with the bot's notes about it, unless another chat uses the card or local loans or holds
    refer to it. The library's system keeps its own record."""
    user = await session.get(User, telegram_id)
    if user is None or user.reader_id is None:
        return
    reader = await session.get(Reader, user.reader_id)
    if reader is None or reader.pin_hash != PLACEHOLDER_PIN_HASH:
        return
    users = await session.scalar(select(func.count()).select_from(User).where(User.reader_id == reader.id))
    loans = await session.scalar(select(func.count()).select_from(Loan).where(Loan.reader_id == reader.id))
    holds = await session.scalar(select(func.count()).select_from(Hold).where(Hold.reader_id == reader.id))
    if (users or 0) > 1 or loans or holds:
        return
    await session.execute(
        delete(PersistedState).where(
            PersistedState.kind.in_([RENEWALS, RENEW_ALL, HOLDS]), PersistedState.key.like(f"{reader.id}:%")
        )
    )
    user.reader_id = None
    await session.flush()
    await session.delete(reader)
