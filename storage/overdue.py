"""The overdue loans staff ask for (``/overdue``): most overdue first, with the reader, the days
overdue and the fine, filtered by branch and by a minimum number of days overdue.

An item belongs to a branch when its location names the branch: its code (``east``), or its
Chinese or English name (``东区分馆``, ``East Branch``), anywhere in the location, case ignored.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage import circulation as circ
from storage import csv_export
from storage.catalog import Item, Record
from storage.circulation import Loan
from storage.people import Reader
from storage.policy import Branch, Policy


@dataclass(frozen=True)
class OverdueLoan:
    barcode: str
    title: str
    card: str
    name: str
    location: str
    due_on: dt.date
    days: int
    fine_cents: int


def find_branch(policy: Policy, text: str) -> Branch | None:
    """The branch named by its code or either of its names (case ignored); None if none is."""
    wanted = text.strip().casefold()
    for branch in policy.library.branches:
        if wanted in (branch.code.casefold(), branch.name_zh.casefold(), branch.name_en.casefold()):
            return branch
    return None


def in_branch(location: str, branch: Branch) -> bool:
    """True when an item's location names ``branch``."""
    where = location.casefold()
    return any(name.casefold() in where for name in (branch.code, branch.name_zh, branch.name_en) if name)


async def overdue_loans(
    session: AsyncSession,
    policy: Policy,
    now: dt.datetime,
    tz: ZoneInfo,
    *,
    branch: Branch | None = None,
    min_days: int = 1,
) -> list[OverdueLoan]:
    """Open loans overdue at least ``min_days`` days (at least one), most overdue first, then by
    card and barcode; in ``branch`` only when given."""
    min_days = max(1, min_days)
    # Due before the end of the local day ``min_days`` ago: overdue by that many days or more.
    cutoff = circ.end_of_day(circ.local_date(now, tz) - dt.timedelta(days=min_days), tz)
    rows = await session.execute(
        select(Item.barcode, Item.location, Item.item_type, Record.title, Reader.card_number, Reader.name,
               Reader.category, Loan.due_at)
        .join(Item, Item.id == Loan.item_id)
        .join(Record, Record.id == Item.record_id)
        .join(Reader, Reader.id == Loan.reader_id)
        .where(Loan.returned_at.is_(None), Loan.due_at <= cutoff)
    )
    found = []
    for barcode, location, item_type, title, card, name, category, due_at in rows:
        if branch is not None and not in_branch(location or "", branch):
            continue
        days = circ.overdue_days(due_at, now, tz)
        if days < min_days:
            continue
        fine = circ.fine_cents(days, policy.loan_rules(category, item_type))
        found.append(OverdueLoan(barcode, title or "", card, name or "", location or "", circ.local_date(due_at, tz), days, fine))
    found.sort(key=lambda o: (-o.days, o.card, o.barcode))
    return found


def overdue_csv(loans: Sequence[OverdueLoan]) -> bytes:
    """The list as CSV (UTF-8 with a byte-order mark, so spreadsheet programs read Chinese)."""
    out = io.StringIO()
    writer = csv_export.writer(out)
    writer.writerow(["barcode", "title", "card_number", "name", "location", "due_on", "days_overdue", "fine"])
    for o in loans:
        writer.writerow([o.barcode, o.title, o.card, o.name, o.location, o.due_on.isoformat(), o.days, str(circ.money(o.fine_cents))])
    return ("\ufeff" + out.getvalue()).encode("utf-8")
