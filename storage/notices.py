"""The daily notice cycle (催还): one digest per reader, one for the staff chat.

Run each morning at ``policy.notices.time`` by the bot's job queue and by ``librarybot notices run
[--date D]``. For the day D it

1. expires holds not picked up in time (each copy passes to the next reader, who is told) and erases
   loan history older than ``loan_history_days``;
2. queues for every Telegram user linked to a card at most one digest, listing
   - loans due in exactly N days, for N in the reader's reminder days (``User.reminder_days``, chosen
     in /settings: 0 = off, 1, 3 or 7; together with every policy level ``due_soon_days`` closer than
     that, so the default 3 gives reminders 3 days and 1 day ahead),
   - loans exactly N days overdue, for N in ``overdue_levels`` (default 1, 7, 14),
   - holds waiting on the hold shelf; a hold alone triggers a digest when its pick-up deadline is
     within ``hold_expiry_warning_days`` (the reader was told the moment the copy arrived);
3. queues one digest for the staff chat: overdue loans per level (1–6, 7–13, 14+ days by default),
   the loans overdue at least ``staff_alert_days`` days, how many readers with loans the bot cannot
   reach, and a CSV of every overdue loan (nothing when no loan is overdue).

Telegram lets a bot write only to people who pressed Start and did not block it; a 403 marks the
user unreachable (``User.unreachable``, cleared when they write again), and from then on the cycle
skips them instead of queuing digests that would only be refused.

Every message carries a dedupe key (``digest:<day>:<reader>:<chat>``, ``staff-digest:<day>``) that the
outbox keeps unique, so a second run the same day, a restart in the middle, or two bot processes
running the cycle at once never queue the same notice twice.

Digests are composed of several catalogue messages, rendered here in both languages (``render`` is
``bot.i18n.t``, passed in by the caller because ``storage`` never imports ``bot``) and stored as a
bilingual parameter; the dispatcher picks the recipient's language at send time.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import time
import tracemalloc
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage import circulation as circ
from storage import csv_export
from storage.catalog import Item, Record
from storage.circulation import Hold, HoldStatus, Loan
from storage.db import Database, retry_busy, utcnow
from storage.outbox import Delivery, Priority, enqueue, enqueue_many
from storage.people import Reader, User
from storage.policy import Policy

Render = Callable[..., str]  # (lang, message id, **params) -> text: bot.i18n.t
LANGUAGES = ("zh", "en")
MAX_LINES = 15  # per section of a reader's digest; the rest is "… and N more" (Telegram caps a message)
CAPTION_LIMIT = 1000  # Telegram allows 1,024 characters in a document caption
BATCH = 1000  # digests queued per transaction


# With LIBRARYBOT_ILS=sip2 the loans live in the library's own system: its connector registers a
# source for the database it serves, and the cycle reads the linked readers' loans from it instead
# of the local loan rows (storage.ils_sip2.Sip2Circulation.notice_loans). Rows are
# (reader_id, due_at, barcode, item_type, title, card_number, reader_name, category).
LoanSource = Callable[[Sequence[int], dt.datetime], Awaitable[Sequence[tuple[Any, ...]]]]
_loan_sources: weakref.WeakKeyDictionary[Database, LoanSource] = weakref.WeakKeyDictionary()


def use_loan_source(db: Database, source: LoanSource) -> Callable[[], None]:
    """Let ``source(reader_ids, horizon)`` give the cycle its loans on ``db``; returns the undo."""
    _loan_sources[db] = source

    def undo() -> None:
        if _loan_sources.get(db) is source:
            del _loan_sources[db]

    return undo


@dataclass
class CycleReport:
    """What one run of the cycle did."""

    day: dt.date
    digests_queued: int = 0
    digests_already_sent: int = 0
    readers_notified: int = 0
    due_soon: int = 0
    overdue_notices: int = 0
    overdue_total: int = 0
    staff_digest: str = "no staff chat configured"
    holds_expired: int = 0
    loans_purged: int = 0
    skipped_unreachable: int = 0  # digests not queued: the reader never pressed Start or blocked the bot
    readers_unreachable: int = 0  # readers with loans whom the bot cannot reach (told in the staff digest)
    seconds: float = 0.0
    peak_memory_mb: float | None = None

    def lines(self) -> list[str]:
        return [
            f"notice cycle for {self.day.isoformat()}:",
            f"  reader digests queued: {self.digests_queued} (already queued earlier: {self.digests_already_sent})",
            f"  loans due soon reminded: {self.due_soon}; overdue notices: {self.overdue_notices}; overdue loans in all: {self.overdue_total}",
            f"  staff digest: {self.staff_digest}",
            f"  holds expired: {self.holds_expired}; returned loans erased from history: {self.loans_purged}",
            f"  readers the bot cannot reach (never pressed Start, or blocked it): {self.readers_unreachable} with loans;"
            f" digests not sent to them: {self.skipped_unreachable}",
            f"  took {self.seconds:.1f} s",
        ]


@dataclass
class _Entry:
    title: str
    barcode: str
    due: dt.date
    days: int  # until due (due soon) or overdue
    fine_cents: int = 0


@dataclass
class _ReaderNotices:
    due: list[_Entry] = field(default_factory=list)  # every open loan due within the longest window
    overdue_levels: list[_Entry] = field(default_factory=list)
    holds: list[tuple[str, dict[str, str], dt.date, bool]] = field(default_factory=list)  # title, pickup, deadline, expiring


def _both(render: Render, key: str, **params: Any) -> dict[str, str]:
    return {lang: render(lang, key, **params) for lang in LANGUAGES}


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


async def run_notice_cycle(
    db: Database,
    policy: Policy,
    day: dt.date,
    tz: ZoneInfo = circ.DEFAULT_TZ,
    *,
    render: Render,
    staff_chat_id: int | None = None,
    now: dt.datetime | None = None,
    measure_memory: bool = False,
) -> CycleReport:
    """Compute and queue every notice of ``day`` (idempotent; see the module's docstring).

    ``now`` is when holds expire and history is purged (the current time by default, whatever
    ``day`` is, so a rerun for an earlier day does not travel back in time).
    """
    started = time.perf_counter()
    if measure_memory:
        tracemalloc.start()
    now = now or utcnow()
    report = CycleReport(day)

    @retry_busy
    async def housekeeping() -> None:
        async with db.session() as s:
            report.holds_expired = await circ.expire_holds(s, policy, now, tz)
            report.loans_purged = await circ.purge_history(s, policy, now)

    await housekeeping()

    async with db.session() as s:
        users = (
            await s.execute(
                select(User.telegram_id, User.reader_id, User.reminder_days, User.unreachable)
                .where(User.reader_id.is_not(None))
            )
        ).all()
        ahead = max([0, *policy.notices.due_soon_days, *(r for _, _, r, _ in users)])
        horizon = circ.end_of_day(day + dt.timedelta(days=ahead), tz)
        source = _loan_sources.get(db)
        loans: Sequence[Any] = [] if source is not None else (
            await (await s.connection()).execute(  # plain rows, without the ORM's result machinery
                select(
                    Loan.reader_id, Loan.due_at, Item.barcode, Item.item_type, Record.title,
                    Reader.card_number, Reader.name, Reader.category,
                )
                .join(Item, Item.id == Loan.item_id)
                .join(Record, Record.id == Item.record_id)
                .join(Reader, Reader.id == Loan.reader_id)
                .where(Loan.returned_at.is_(None), Loan.due_at <= horizon)
                .order_by(Loan.due_at, Item.barcode)
            )
        ).all()
        holds = (
            await s.execute(
                select(Hold.reader_id, Hold.expires_at, Hold.pickup_branch, Record.title)
                .join(Record, Record.id == Hold.record_id)
                .where(Hold.status == HoldStatus.READY)
                .order_by(Hold.expires_at, Hold.id)
            )
        ).all()
        borrowers: set[int] = set() if source is not None else set(
            await s.scalars(select(Loan.reader_id).where(Loan.returned_at.is_(None)).distinct())
        )
    if source is not None:  # outside the session: the library's system may take a while
        loans = await source(sorted({r for _, r, _, _ in users if r is not None}), horizon)
        borrowers = {row[0] for row in loans}
    # Telegram lets a bot write only to people who pressed Start and did not block it (403
    # otherwise, which marks the user unreachable): those are skipped, and staff are told how many.
    reachable = {reader for _, reader, _, gone in users if not gone}
    report.readers_unreachable = len(borrowers - reachable)

    levels = set(policy.notices.overdue_levels)
    per_reader: dict[int, _ReaderNotices] = defaultdict(_ReaderNotices)
    overdue_rows: list[tuple[Any, ...]] = []
    due_days: dict[dt.datetime, dt.date] = {}  # loans share due times (the end of a day): one conversion each
    fines: dict[tuple[str, str, int], int] = {}
    for reader_id, due_at, barcode, item_type, title, card, name, category in loans:
        due_day = due_days.get(due_at)
        if due_day is None:
            due_day = due_days[due_at] = circ.local_date(due_at, tz)
        late = (day - due_day).days
        if late > 0:
            fine = fines.get((category, item_type, late))
            if fine is None:
                fine = fines[(category, item_type, late)] = circ.fine_cents(late, policy.loan_rules(category, item_type))
            overdue_rows.append((barcode, title, card, name, due_day, late, fine))
            if late in levels:
                per_reader[reader_id].overdue_levels.append(_Entry(title, barcode, due_day, late, fine))
        else:
            per_reader[reader_id].due.append(_Entry(title, barcode, due_day, -late))
    report.overdue_total = len(overdue_rows)
    warn = policy.notices.hold_expiry_warning_days
    for reader_id, expires_at, branch, title in holds:
        if expires_at is None:
            continue
        deadline = circ.local_date(expires_at, tz)
        if deadline < day:
            continue  # expired, or will be by the next run
        per_reader[reader_id].holds.append(
            (title, circ.branch_name(policy, branch), deadline, (deadline - day).days <= warn)
        )

    digests: list[tuple[int, str, list[_Entry], _ReaderNotices]] = []
    notified: set[int] = set()
    for chat_id, card_id, reminder_days, gone in users:
        notices = per_reader.get(card_id) if card_id is not None else None
        if notices is None or card_id is None:
            continue
        if gone:
            report.skipped_unreachable += 1
            continue
        ahead_days = circ.due_soon_days_for(reminder_days, policy)
        due_soon = [e for e in notices.due if e.days in ahead_days]
        triggered = due_soon or notices.overdue_levels or any(expiring for *_, expiring in notices.holds)
        if not triggered:
            continue
        key = f"digest:{day.isoformat()}:{card_id}:{chat_id}"
        notified.add(card_id)
        digests.append((chat_id, key, due_soon, notices))
    report.readers_notified = len(notified)

    already = await _queued_keys(db, [key for _, key, _, _ in digests])
    pending: list[tuple[int, str, dict[str, Any]]] = []
    for chat_id, key, due_soon, notices in digests:
        if key in already:
            report.digests_already_sent += 1
            continue
        report.due_soon += len(due_soon)
        report.overdue_notices += len(notices.overdue_levels)
        pending.append((chat_id, key, {"body": _reader_body(render, policy, due_soon, notices)}))

    for start in range(0, len(pending), BATCH):
        chunk = pending[start : start + BATCH]
        queued = await _queue_digests(db, chunk)
        report.digests_queued += queued
        report.digests_already_sent += len(chunk) - queued

    if staff_chat_id is not None and not overdue_rows:
        report.staff_digest = "nothing overdue, not sent"
    elif staff_chat_id is not None:
        report.staff_digest = await _staff_digest(
            db, policy, day, render, staff_chat_id, overdue_rows, report.readers_unreachable
        )

    report.seconds = time.perf_counter() - started
    if measure_memory:
        report.peak_memory_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return report


async def _queued_keys(db: Database, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` the outbox already has (looked up by its unique index, a batch at a time)."""
    found: set[str] = set()
    async with db.session() as s:
        for start in range(0, len(keys), BATCH):
            chunk = keys[start : start + BATCH]
            found.update(await s.scalars(select(Delivery.dedupe_key).where(Delivery.dedupe_key.in_(chunk))))
    return found


@retry_busy
async def _queue_digests(db: Database, chunk: Sequence[tuple[int, str, dict[str, Any]]]) -> int:
    """Queue a batch of reader digests (chat id, dedupe key, params) in one multi-row insert;
    returns how many were queued. Keys already in the outbox (another run queued them meanwhile)
    are left out; should one appear between that check and the insert, the batch is checked again."""
    async with db.session() as s:
        for _attempt in range(3):
            taken = set(
                await s.scalars(select(Delivery.dedupe_key).where(Delivery.dedupe_key.in_([k for _, k, _ in chunk])))
            )
            keys = {chat_id: key for chat_id, key, _ in chunk if key not in taken}
            bodies = {chat_id: params for chat_id, key, params in chunk if key not in taken}
            try:
                async with s.begin_nested():
                    return await enqueue_many(
                        s, list(keys), "loans.digest", bodies.__getitem__, kind="notice", priority=Priority.BULK,
                        buttons=[[["loans.btn_my_loans", "loans:show"]]], dedupe_keys=keys.__getitem__,
                    )
            except IntegrityError:
                continue
        queued = 0  # a run racing this one batch after batch: one row at a time, each in a savepoint
        for chat_id, key, params in chunk:
            row = await enqueue(
                s, chat_id, "loans.digest", params, kind="notice", priority=Priority.BULK,
                buttons=[[["loans.btn_my_loans", "loans:show"]]], dedupe_key=key,
            )
            queued += row is not None
        return queued


def _money(policy: Policy, cents: int) -> str:
    return f"{policy.circulation.currency}{circ.money(cents)}"


def _section(render: Render, lang: str, header: str, lines: list[str]) -> str:
    shown = lines[:MAX_LINES]
    if len(lines) > MAX_LINES:
        shown.append(render(lang, "loans.digest_more", count=len(lines) - MAX_LINES))
    return "\n".join([render(lang, header), *shown])


def _reader_body(
    render: Render, policy: Policy, due_soon: list[_Entry], notices: _ReaderNotices
) -> dict[str, str]:
    """The digest's sections (overdue, due soon, holds waiting) in both languages."""
    body: dict[str, str] = {}
    for lang in LANGUAGES:
        parts: list[str] = []
        if notices.overdue_levels:
            parts.append(_section(render, lang, "loans.digest_overdue_header", [
                render(lang, "loans.digest_overdue_line", title=_esc(e.title), barcode=_esc(e.barcode),
                       due=e.due.isoformat(), days=e.days, fine=_money(policy, e.fine_cents))
                for e in notices.overdue_levels
            ]))
        if due_soon:
            parts.append(_section(render, lang, "loans.digest_due_header", [
                render(lang, "loans.digest_due_line", title=_esc(e.title), barcode=_esc(e.barcode),
                       due=e.due.isoformat(), days=e.days)
                for e in due_soon
            ]))
        if notices.holds:
            parts.append(_section(render, lang, "loans.digest_holds_header", [
                render(lang, "loans.digest_hold_expiring_line" if expiring else "loans.digest_hold_line",
                       title=_esc(title), pickup=pickup[lang], deadline=deadline.isoformat())
                for title, pickup, deadline, expiring in notices.holds
            ]))
        body[lang] = "\n\n".join(parts)
    return body


def overdue_csv(rows: Sequence[tuple[Any, ...]], policy: Policy) -> bytes:
    """Every overdue loan as CSV (UTF-8 with a byte-order mark, so spreadsheet programs read Chinese)."""
    out = io.StringIO()
    writer = csv_export.writer(out)
    writer.writerow(["barcode", "title", "card_number", "reader_name", "due_date", "days_overdue", "fine"])
    for barcode, title, card, name, due, late, fine in sorted(rows, key=lambda r: (-r[5], r[2], r[0])):
        writer.writerow([barcode, title, card, name, due.isoformat(), late, str(circ.money(fine))])
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def level_bands(levels: Sequence[int]) -> list[tuple[int, int | None]]:
    """The overdue levels as bands: [1, 7, 14] gives 1–6, 7–13 and 14 or more days."""
    ordered = sorted(set(levels))
    return [(low, (ordered[i + 1] - 1) if i + 1 < len(ordered) else None) for i, low in enumerate(ordered)]


async def _staff_digest(
    db: Database,
    policy: Policy,
    day: dt.date,
    render: Render,
    staff_chat_id: int,
    overdue: list[tuple[Any, ...]],
    unreachable: int = 0,
) -> str:
    key = f"staff-digest:{day.isoformat()}"
    async with db.session() as s:
        if await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.dedupe_key == key)):
            return "already queued earlier"
    alert_days = policy.notices.staff_alert_days
    serious = sorted((r for r in overdue if r[5] >= alert_days), key=lambda r: (-r[5], r[2], r[0]))
    params: dict[str, Any] = {}
    for lang in LANGUAGES:
        bands = []
        for low, high in level_bands(policy.notices.overdue_levels):
            count = sum(1 for r in overdue if r[5] >= low and (high is None or r[5] <= high))
            key_name = "loans.staff_band_open" if high is None else "loans.staff_band"
            bands.append(render(lang, key_name, low=low, high=high, count=count))
        head = render(lang, "loans.staff_digest_head", day=day.isoformat(), total=len(overdue), bands="\n".join(bands),
                      days=alert_days, serious=len(serious))
        if unreachable:
            head += "\n" + render(lang, "reach.staff_digest_unreachable", count=unreachable)
        text = head
        for n, (barcode, title, card, name, _due, late, _fine) in enumerate(serious):  # rendered until full
            line = render(lang, "loans.staff_digest_line", title=_esc(_short(title)), barcode=_esc(barcode),
                          card=_esc(card), name=_esc(name), days=late)
            more = render(lang, "loans.staff_digest_more", count=len(serious) - n)
            if len(text) + len(line) + len(more) + 2 > CAPTION_LIMIT:
                text += "\n" + more
                break
            text += "\n" + line
        params[lang] = text
    async with db.session() as s:
        row = await enqueue(
            s, staff_chat_id, "loans.staff_digest", {"body": params}, kind="alert", priority=Priority.BULK,
            document=(f"overdue-{day.isoformat()}.csv", overdue_csv(overdue, policy)),
            dedupe_key=key,
        )
    return "queued" if row is not None else "already queued earlier"


REMINDER_CHOICES = (0, 1, 3, 7)  # /settings: off, or days ahead of the due date


async def reminder_days_of(session: AsyncSession, telegram_id: int) -> int:
    """How many days ahead the user wants due-date reminders (0: off)."""
    days = await session.scalar(select(User.reminder_days).where(User.telegram_id == telegram_id))
    return int(days if days is not None else 3)


async def set_reminder_days(session: AsyncSession, telegram_id: int, days: int) -> bool:
    """Save the user's choice; False for a value that is not offered (a forged button)."""
    if days not in REMINDER_CHOICES:
        return False
    result = await session.execute(update(User).where(User.telegram_id == telegram_id).values(reminder_days=days))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _short(title: str, limit: int = 40) -> str:
    return title if len(title) <= limit else title[: limit - 1] + "…"
