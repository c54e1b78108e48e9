"""Importing readers, items and loans from CSV (``librarybot import readers|items|loans``), and the
demo's sample readers with loans in every interesting state.

Every import applies each good row in its own savepoint and names each bad row with its line number
and the reason (missing columns, bad dates, unknown barcodes or cards, duplicates), so one broken
line never stops the rest and no row is ever half-applied. Each physical line is one row: a quote
left open (a stray ``"``) or too many fields make that line unreadable, and only that line is
skipped. A file whose header lacks a required column is refused as a whole (``CircImportError``).

Readers (``card_number,name,pin,category,expires_on``): upsert on the card number; the PIN is
hashed on import and never stored in clear; an empty PIN keeps the card's current PIN (a new card
needs one); an empty category is "adult"; an empty expiry date means the card does not expire.

Items (``barcode,record_id,location,call_number,item_type,status``): upsert on the barcode;
``record_id`` is the record's control number or one of its ISBNs (any form). The statuses
``on_loan`` and ``on_hold_shelf`` belong to the circulation store: a copy with an open loan or
waiting on the hold shelf keeps its status whatever the file says.

Loans (``barcode,card_number,checked_out_at,due_at,renewals``): the file is the library system's
list of the loans open now (a snapshot). A loan in the file is created, or updated when its due date
or renewal count changed; a copy lent to another card is moved to it. An open loan whose copy the
file does not mention at all is returned — exactly as ``librarybot circ return`` would, so a copy
somebody waits for goes on the hold shelf and that reader is told. A copy named only on bad lines is
left alone, and a file without a single loan line returns nothing. A loans file with any line that
cannot be read at all (a stray quote, too many fields) is refused whole, naming the lines: the loan
on it might be one still out. Dates are ISO 8601: a bare date (``2025-03-10``) is a date in the
library's time zone (due at the end of that day); a time without a zone is local time.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import String, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage import catalog
from storage import circulation as circ
from storage.catalog import Item, Record
from storage.circulation import DEFAULT_TZ, Hold, HoldStatus, ItemStatus, Loan
from storage.db import Database, utcnow
from storage.people import Reader, User, hash_pin
from storage.policy import Policy

READER_COLUMNS = ("card_number", "name", "pin", "category", "expires_on")
ITEM_COLUMNS = ("barcode", "record_id", "location", "call_number", "item_type", "status")
LOAN_COLUMNS = ("barcode", "card_number", "checked_out_at", "due_at", "renewals")
BATCH = 500


class CircImportError(ValueError):
    """The file cannot be imported at all (missing, unreadable, or its header lacks a column)."""


class BadRow(ValueError):
    """One line cannot be applied; the message says why."""


@dataclass
class ImportReport:
    """What an import did, line by line where something was wrong."""

    kind: str
    path: str = ""
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    returned: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    @property
    def applied(self) -> int:
        return self.created + self.updated + self.unchanged

    def skip(self, line: int, reason: str) -> None:
        self.skipped.append((line, reason))

    def lines(self) -> list[str]:
        """A summary line, then one line per skipped row."""
        counts = f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged"
        if self.kind == "loans":
            counts += f", {self.returned} returned"
        out = [f"{self.kind} from {self.path}: {counts}, {len(self.skipped)} skipped"]
        out += [f"  line {line}: {reason}" for line, reason in self.skipped]
        return out


# --------------------------------------------------------------------------------------------------
# Reading and checking fields


UNREADABLE = "__unreadable__"  # the key marking a line the CSV itself cannot be read from


def _fields(line: str) -> list[str]:
    """The fields of one physical line; ``BadRow`` when its quotes do not pair up on the line."""
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise BadRow('a quoted field is not closed on this line (a stray ")') from None
        raise BadRow(f"the line cannot be read as CSV ({exc})") from None


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data line; the header must name every ``required`` column.

    Each physical line is one row, read on its own: a quoted field never runs on into the next
    lines (one stray ``"`` would otherwise swallow every row up to the next quote). A line whose
    quotes do not pair up, or with more fields than the header, is yielded with an error under
    ``UNREADABLE``; one with fewer fields names the missing columns.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CircImportError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise CircImportError(f"{path}: not UTF-8 text") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not lines or not lines[0].strip():
        raise CircImportError(f"{path}: empty file")
    try:
        header = [h.strip().lower() for h in _fields(lines[0])]
    except BadRow as exc:
        raise CircImportError(f"{path}: line 1 (the header): {exc}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise CircImportError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(required)})")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            values = _fields(line)
        except BadRow as exc:
            yield number, {UNREADABLE: str(exc)}
            continue
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header):
            yield number, {UNREADABLE: f"{len(values)} fields where the header has {len(header)}"}
            continue
        row = {name: (values[i].strip() if i < len(values) else None) for i, name in enumerate(header)}
        absent = [c for c in required if row.get(c) is None]
        if absent:
            partial = {k: v for k, v in row.items() if v is not None}
            yield number, {**partial, "__error__": f"missing column(s) {', '.join(absent)}"}
            continue
        yield number, {k: v for k, v in row.items() if v is not None}


def _check_rows(row: dict[str, str]) -> None:
    if UNREADABLE in row:
        raise BadRow(row[UNREADABLE])
    if "__error__" in row:
        raise BadRow(row["__error__"])


def _text(row: dict[str, str], column: str, limit: int, *, required: bool = False) -> str:
    value = row.get(column, "")
    if required and not value:
        raise BadRow(f"empty {column}")
    if len(value) > limit:
        raise BadRow(f"{column} longer than {limit} characters")
    return value


def _date(value: str, column: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise BadRow(f"bad date in {column}: {value!r} (expected YYYY-MM-DD)") from None


def _moment(value: str, column: str, tz: ZoneInfo, *, end_of_day: bool) -> dt.datetime:
    """An ISO date or date-time; a bare date is the start (or end) of that day in ``tz``."""
    if len(value) == 10:
        day = _date(value, column)
        return circ.end_of_day(day, tz) if end_of_day else circ.start_of_day(day, tz)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise BadRow(f"bad date in {column}: {value!r} (expected ISO 8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.astimezone(dt.UTC)


# --------------------------------------------------------------------------------------------------
# Readers


async def import_readers(
    db: Database,
    path: Path | str,
    *,
    policy: Policy | None = None,
    now: dt.datetime | None = None,
    staff_chat_id: int | None = None,
    tz: ZoneInfo = DEFAULT_TZ,
) -> ImportReport:
    """Load library cards from CSV (see the module's docstring for the rules)."""
    path = Path(path)
    report = ImportReport("readers", str(path))
    parsed: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    for line, row in _rows(path, READER_COLUMNS):
        try:
            _check_rows(row)
            card = _text(row, "card_number", 64, required=True)
            if card in seen:
                raise BadRow(f"card {card} appears twice in the file")
            fields: dict[str, Any] = {
                "card_number": card,
                "name": _text(row, "name", 256, required=True),
                "pin": _text(row, "pin", 64),
                "category": _text(row, "category", 64) or "adult",
                "expires_on": _date(row["expires_on"], "expires_on") if row.get("expires_on") else None,
            }
            seen.add(card)
            parsed.append((line, fields))
        except BadRow as exc:
            report.skip(line, str(exc))
    # Hashing (Argon2id, ~20 ms each) runs on every core; the clear PIN is dropped right after.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        loop = asyncio.get_running_loop()
        hashes = await asyncio.gather(
            *(loop.run_in_executor(pool, hash_pin, f["pin"]) if f["pin"] else _none() for _, f in parsed)
        )
    for (_, fields), pin_hash in zip(parsed, hashes, strict=True):
        fields["pin_hash"] = pin_hash
        del fields["pin"]
    for start in range(0, len(parsed), BATCH):
        async with db.session() as session:
            for line, fields in parsed[start : start + BATCH]:
                try:
                    async with session.begin_nested():
                        outcome = await _upsert_reader(session, fields)
                    setattr(report, outcome, getattr(report, outcome) + 1)
                except BadRow as exc:
                    report.skip(line, str(exc))
    report.skipped.sort()
    return report


async def _none() -> None:
    return None


async def _upsert_reader(session: AsyncSession, fields: dict[str, Any]) -> str:
    reader = await session.scalar(select(Reader).where(Reader.card_number == fields["card_number"]))
    if reader is None:
        if fields["pin_hash"] is None:
            raise BadRow(f"card {fields['card_number']} is new and has no PIN")
        session.add(Reader(**fields))
        return "created"
    changed = False
    for name in ("name", "category", "expires_on"):
        if getattr(reader, name) != fields[name]:
            setattr(reader, name, fields[name])
            changed = True
    if fields["pin_hash"] is not None:
        reader.pin_hash = fields["pin_hash"]
        changed = True
    return "updated" if changed else "unchanged"


# --------------------------------------------------------------------------------------------------
# Items


async def _find_record(session: AsyncSession, key: str) -> Record | None:
    finder = getattr(catalog, "find_record", None)  # the catalog's own lookup, when it has one
    if finder is not None:
        found: Record | None = await finder(session, key)
        if found is not None:
            return found
    record = await session.scalar(select(Record).where(Record.control_number == key))
    if record is not None:
        return record
    digits = "".join(ch for ch in key if ch.isdigit() or ch in "xX")
    for candidate in {digits, _isbn13(digits)} - {""}:
        hit = await session.scalar(
            select(Record).where(cast(Record.isbns, String).like(f'%"{candidate}"%')).limit(1)
        )
        if hit is not None:
            return hit
    return None


def _isbn13(digits: str) -> str:
    if len(digits) != 10:
        return ""
    core = "978" + digits[:9]
    check = (10 - sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(core)) % 10) % 10
    return core + str(check)


async def import_items(
    db: Database,
    path: Path | str,
    *,
    policy: Policy | None = None,
    now: dt.datetime | None = None,
    staff_chat_id: int | None = None,
    tz: ZoneInfo = DEFAULT_TZ,
) -> ImportReport:
    """Load copies from CSV (see the module's docstring for the rules)."""
    path = Path(path)
    report = ImportReport("items", str(path))
    rows = list(_rows(path, ITEM_COLUMNS))
    seen: set[str] = set()
    records: dict[str, int | None] = {}
    for start in range(0, len(rows), BATCH):
        async with db.session() as session:
            for line, row in rows[start : start + BATCH]:
                try:
                    _check_rows(row)
                    barcode = _text(row, "barcode", 64, required=True)
                    if barcode in seen:
                        raise BadRow(f"barcode {barcode} appears twice in the file")
                    key = _text(row, "record_id", 64, required=True)
                    if key not in records:
                        found = await _find_record(session, key)
                        records[key] = found.id if found else None
                    record_id = records[key]
                    if record_id is None:
                        raise BadRow(f"unknown record {key} (no control number or ISBN matches)")
                    status = (_text(row, "status", 32) or ItemStatus.AVAILABLE).lower().replace(" ", "_")
                    fields = {
                        "barcode": barcode,
                        "record_id": record_id,
                        "location": _text(row, "location", 256),
                        "call_number": _text(row, "call_number", 128),
                        "item_type": (_text(row, "item_type", 32) or "book").lower(),
                        "status": status,
                    }
                    async with session.begin_nested():
                        outcome = await _upsert_item(session, fields)
                    seen.add(barcode)
                    setattr(report, outcome, getattr(report, outcome) + 1)
                except BadRow as exc:
                    report.skip(line, str(exc))
    return report


async def _upsert_item(session: AsyncSession, fields: dict[str, Any]) -> str:
    item = await session.scalar(select(Item).where(Item.barcode == fields["barcode"]))
    if not fields["call_number"]:
        record = await session.get(Record, fields["record_id"])
        fields["call_number"] = record.call_number if record else ""
    if item is None:
        if fields["status"] in (ItemStatus.ON_LOAN, ItemStatus.ON_HOLD_SHELF):
            fields["status"] = ItemStatus.AVAILABLE  # those come from loans and holds, not from this file
        session.add(Item(**fields))
        await session.flush()
        return "created"
    busy = await session.scalar(select(Loan.id).where(Loan.item_id == item.id, Loan.returned_at.is_(None)))
    ready = await session.scalar(select(Hold.id).where(Hold.item_id == item.id, Hold.status == HoldStatus.READY))
    if busy is not None or ready is not None or fields["status"] in (ItemStatus.ON_LOAN, ItemStatus.ON_HOLD_SHELF):
        fields["status"] = item.status
    changed = False
    for name, value in fields.items():
        if getattr(item, name) != value:
            setattr(item, name, value)
            changed = True
    return "updated" if changed else "unchanged"


# --------------------------------------------------------------------------------------------------
# Loans


async def import_loans(
    db: Database,
    path: Path | str,
    *,
    policy: Policy | None = None,
    now: dt.datetime | None = None,
    staff_chat_id: int | None = None,
    tz: ZoneInfo = DEFAULT_TZ,
) -> ImportReport:
    """Bring the open loans in line with the library system's list (see the module's docstring)."""
    path = Path(path)
    policy = policy or Policy()
    now = now or utcnow()
    report = ImportReport("loans", str(path))
    rows = list(_rows(path, LOAN_COLUMNS))
    unreadable = [(line, row[UNREADABLE]) for line, row in rows if UNREADABLE in row]
    if unreadable:
        # The file lists every open loan: a line we cannot read may be a loan still out, which
        # would be "returned" (and its copy promised to the next reader). Nothing is applied.
        named = "; ".join(f"line {line}: {reason}" for line, reason in unreadable[:10])
        more = f" (and {len(unreadable) - 10} more lines)" if len(unreadable) > 10 else ""
        raise CircImportError(f"{path}: refused, nothing changed: {named}{more}")
    mentioned: set[str] = {row["barcode"] for _, row in rows if row.get("barcode")}
    listed: set[str] = set()
    for start in range(0, len(rows), BATCH):
        async with db.session() as session:
            for line, row in rows[start : start + BATCH]:
                try:
                    _check_rows(row)
                    barcode = _text(row, "barcode", 64, required=True)
                    if barcode in listed:
                        raise BadRow(f"barcode {barcode} appears twice in the file")
                    card = _text(row, "card_number", 64, required=True)
                    due = _moment(_text(row, "due_at", 40, required=True), "due_at", tz, end_of_day=True)
                    out = row.get("checked_out_at", "")
                    checked_out = _moment(out, "checked_out_at", tz, end_of_day=False) if out else now
                    if checked_out > due:
                        raise BadRow("checked_out_at is after due_at")
                    try:
                        renewals = int(row.get("renewals") or 0)
                    except ValueError:
                        raise BadRow(f"renewals is not a whole number: {row['renewals']!r}") from None
                    if renewals < 0:
                        raise BadRow("renewals is negative")
                    async with session.begin_nested():
                        outcome = await _upsert_loan(
                            session, barcode, card, checked_out, due, renewals, policy, now, tz
                        )
                    listed.add(barcode)
                    setattr(report, outcome, getattr(report, outcome) + 1)
                except BadRow as exc:
                    report.skip(line, str(exc))
    if not rows:
        return report  # an empty list is far more likely a broken export than a day with no loans
    async with db.session() as session:
        gone = list(
            await session.scalars(
                select(Item.barcode)
                .join(Loan, Loan.item_id == Item.id)
                .where(Loan.returned_at.is_(None))
                .order_by(Item.barcode)
            )
        )
    for barcode in gone:
        if barcode in mentioned:
            continue
        async with db.session() as session:
            result = await circ.checkin(session, barcode, policy, now, tz)
        report.returned += result.ok
    return report


async def _upsert_loan(
    session: AsyncSession,
    barcode: str,
    card: str,
    checked_out: dt.datetime,
    due: dt.datetime,
    renewals: int,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo,
) -> str:
    item = await session.scalar(select(Item).where(Item.barcode == barcode))
    if item is None:
        raise BadRow(f"unknown barcode {barcode}")
    reader = await session.scalar(select(Reader).where(Reader.card_number == card))
    if reader is None:
        raise BadRow(f"unknown card {card}")
    loan = await session.scalar(select(Loan).where(Loan.item_id == item.id, Loan.returned_at.is_(None)))
    if loan is not None and loan.reader_id == reader.id:
        if loan.due_at == due and loan.renewals == renewals:
            return "unchanged"
        loan.due_at, loan.renewals = due, renewals
        return "updated"
    if loan is not None:
        # Lent to another card in the library system: the earlier loan ended without coming back here.
        loan.returned_at = now
        await session.flush()
    session.add(Loan(item_id=item.id, reader_id=reader.id, checked_out_at=checked_out, due_at=due, renewals=renewals))
    ready = await session.scalar(select(Hold).where(Hold.item_id == item.id, Hold.status == HoldStatus.READY))
    if ready is not None and ready.reader_id != reader.id:
        # The copy left the hold shelf with someone else: its reader goes back to the queue.
        ready.status, ready.item_id, ready.ready_at, ready.expires_at = HoldStatus.WAITING, None, None, None
    freed: list[int] = []
    for hold in await session.scalars(
        select(Hold).where(
            Hold.reader_id == reader.id, Hold.record_id == item.record_id, Hold.status.in_(circ.ACTIVE_HOLD)
        )
    ):
        if hold.status == HoldStatus.READY and hold.item_id not in (None, item.id):
            freed.append(hold.item_id)  # type: ignore[arg-type]
        hold.status, hold.closed_at = HoldStatus.COLLECTED, now
    item.status = ItemStatus.ON_LOAN
    await session.flush()
    for item_id in freed:
        other = await session.get(Item, item_id)
        if other is not None and other.status == ItemStatus.ON_HOLD_SHELF:
            await circ.fill_next_hold(session, other, policy, now, tz)
    return "created" if loan is None else "updated"


# --------------------------------------------------------------------------------------------------
# The demo's sample readers


@dataclass(frozen=True)
class DemoCard:
    """A sample card the demo prints, and the demo persona (Telegram user) already linked to it."""

    card_number: str
    pin: str
    name: str
    telegram_id: int | None
    note: str
    note_zh: str = ""


DEMO_READERS = (
    # card, PIN, name, category, telegram id, note, note in Chinese
    ("D0001", "1234", "Wang Xiaoming 王小明", "adult", 8001,
     "loans due in 1 and 3 days, one overdue, one renewed to its limit, one on hold for D0002, one not renewable; a hold ready to collect",
     "借阅 1 天和 3 天后到期、一册逾期、一册已续借到上限、一册被 D0002 预约、一册不可续借；一项预约待取"),
    ("D0002", "2345", "Emma Clark", "student", 8002,
     "waits for a book D0001 has; one loan overdue 1 day; one due in a week",
     "正在等待 D0001 借走的一本书；一册逾期 1 天；一册一周后到期"),
    ("D0003", "3456", "Zhang Wei 张伟", "adult", 8003,
     "overdue 14 and 35 days, fines above the limit",
     "逾期 14 天和 35 天，罚款超过上限"),
    ("D0004", "4567", "Chen Jing 陈静", "adult", None,
     "card expired (renewals refused); not linked, try /login D0004 4567",
     "读者证已过期（不能续借）；未绑定，可试 /login D0004 4567"),
)


async def _demo_items(session: AsyncSession, needed: int) -> list[Item]:
    """``needed`` copies on the shelf, each the only copy of its title (created when missing)."""
    single = (
        select(Item.record_id).group_by(Item.record_id).having(func.count(Item.id) == 1).scalar_subquery()
    )
    items = list(
        await session.scalars(
            select(Item)
            .where(Item.status == ItemStatus.AVAILABLE, Item.item_type == "book", Item.record_id.in_(single))
            .order_by(Item.id)
            .limit(needed)
        )
    )
    if len(items) < needed:
        bare = list(
            await session.scalars(
                select(Record)
                .where(~select(Item.id).where(Item.record_id == Record.id).exists())
                .order_by(Record.id)
                .limit(needed - len(items))
            )
        )
        titles = iter(_DEMO_TITLES)
        while len(bare) < needed - len(items):
            name = next(titles, f"Sample book {len(bare) + 1}")
            record = Record(control_number=f"demo-{len(bare) + 1:03d}", title=name, isbns=[])
            session.add(record)
            await session.flush()
            bare.append(record)
        for n, record in enumerate(bare, start=1):
            item = Item(
                barcode=f"DEMO{n:04d}", record_id=record.id, location="3F", call_number=record.call_number or "",
            )
            session.add(item)
            items.append(item)
        await session.flush()
    return items


_DEMO_TITLES = (
    "红楼梦", "The Art of Computer Programming", "活着", "A Brief History of Time", "围城", "Dune", "三体",
    "Pride and Prejudice", "西游记", "The Old Man and the Sea", "平凡的世界", "Moby-Dick",
)


async def seed_demo_circulation(
    session: AsyncSession, policy: Policy, now: dt.datetime, tz: ZoneInfo = DEFAULT_TZ
) -> list[DemoCard]:
    """Sample readers with loans in every interesting state, over the copies that exist (call it
    after the catalog is seeded): due in 3 and 1 days, overdue 1, 7, 14 and 35 days, renewed to
    the limit, on hold for another reader, not renewable, a hold waiting on the shelf and about to
    expire, fines above the limit and an expired card. Idempotent: a second call changes nothing."""
    cards = [DemoCard(c, p, n, t, note, zh) for c, p, n, _cat, t, note, zh in DEMO_READERS]
    if await session.scalar(select(Reader.id).where(Reader.card_number == DEMO_READERS[0][0])) is not None:
        return cards
    today = circ.local_date(now, tz)
    readers: dict[str, Reader] = {}
    for card, pin, name, category, telegram_id, _note, _zh in DEMO_READERS:
        expires = today - dt.timedelta(days=3) if card == "D0004" else today + dt.timedelta(days=365)
        reader = Reader(card_number=card, name=name, pin_hash=hash_pin(pin), category=category, expires_on=expires)
        session.add(reader)
        await session.flush()
        readers[card] = reader
        if telegram_id is not None:
            user = await session.get(User, telegram_id)
            if user is None:
                session.add(User(telegram_id=telegram_id, first_name=name.split()[0], reader_id=reader.id))
            else:
                user.reader_id = reader.id
    readers["D0003"].fines_cents = 800
    # (card, days until due (negative: overdue), renewals, item type or None)
    plan: list[tuple[str, int, int, str | None]] = [
        ("D0001", 3, 0, None),
        ("D0001", 1, 0, None),
        ("D0001", 5, 2, None),  # renewed to its limit
        ("D0001", 10, 0, None),  # D0002 waits for it
        ("D0001", -7, 0, None),
        ("D0001", 2, 0, "reserve"),  # not renewable
        ("D0002", -1, 0, None),
        ("D0002", 7, 1, None),
        ("D0003", -14, 1, None),
        ("D0003", -35, 0, None),
        ("D0004", 3, 0, None),
    ]
    items = await _demo_items(session, len(plan) + 1)
    loan_days = policy.circulation.loan_days
    for (card, days, renewals, item_type), item in zip(plan, items, strict=False):
        due_day = today + dt.timedelta(days=days)
        lent = circ.start_of_day(due_day - dt.timedelta(days=loan_days * (renewals + 1)), tz) + dt.timedelta(hours=10)
        session.add(
            Loan(item_id=item.id, reader_id=readers[card].id, checked_out_at=min(lent, now),
                 due_at=circ.end_of_day(due_day, tz), renewals=renewals,
                 # renewed when the previous period ran out (not today: the policy's minimum between
                 # renewals would keep the demo's renewable loans from being renewed, #20)
                 renewed_at=min(lent + dt.timedelta(days=loan_days * renewals), now) if renewals else None)
        )
        item.status = ItemStatus.ON_LOAN
        if item_type:
            item.item_type = item_type
    held = items[3]
    session.add(Hold(record_id=held.record_id, reader_id=readers["D0002"].id, pickup_branch=circ.default_branch(policy),
                     status=HoldStatus.WAITING, placed_at=now - dt.timedelta(days=1)))
    shelf = items[len(plan)]
    shelf.status = ItemStatus.ON_HOLD_SHELF
    ready_since = now - dt.timedelta(days=policy.circulation.hold_shelf_days - 1)
    session.add(Hold(record_id=shelf.record_id, reader_id=readers["D0001"].id, pickup_branch=circ.default_branch(policy),
                     status=HoldStatus.READY, placed_at=ready_since - dt.timedelta(days=3), item_id=shelf.id,
                     ready_at=ready_since, expires_at=circ.end_of_day(today + dt.timedelta(days=1), tz)))
    await session.flush()
    return cards

