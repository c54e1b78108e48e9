"""The bibliographic store: records (one per title/edition), their identifiers, and their copies (items).

A record keeps what the search results and the details view show (title in original script first,
its romanisation, author, year, the full description in ``details``) and the token strings the
search index is built from (see :mod:`storage.search`). Identifiers (ISBN-13, ISSN, LCCN) have a
table of their own so that any form of an ISBN finds its record.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow

# The item status of a copy a reader can take from the shelf (the circulation rules set the others:
# on_loan, on_hold_shelf; an import may bring more: missing, lost, in_repair, …).
ON_SHELF = "available"


class Record(Base):
    """A bibliographic record, keyed by its control number (MARC 001) or, lacking one, its ISBN."""

    __tablename__ = "records"
    # Covers the search's candidate ordering, so that it does not read whole records (SQLite).
    __table_args__ = (Index("ix_records_candidate_order", "id", "title_length"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    control_number: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(Text)  # original script first when the record has one
    title_latin: Mapped[str] = mapped_column(Text, default="")  # the romanised title, when different
    author: Mapped[str] = mapped_column(Text, default="")
    year: Mapped[str] = mapped_column(String(16), default="")
    isbns: Mapped[list[Any]] = mapped_column(default=list)  # normalised ISBN-13s
    language: Mapped[str] = mapped_column(String(8), default="")
    call_number: Mapped[str] = mapped_column(String(128), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the full record for the details view
    # The search index's input (storage.search): space-separated tokens per field, and the folded
    # title and author forms the reranking compares a query with (one per line).
    search_title: Mapped[str] = mapped_column(Text, default="")
    search_author: Mapped[str] = mapped_column(Text, default="")
    search_other: Mapped[str] = mapped_column(Text, default="")
    title_keys: Mapped[str] = mapped_column(Text, default="")
    author_keys: Mapped[str] = mapped_column(Text, default="")
    title_length: Mapped[int] = mapped_column(default=0)  # of the main title: candidates come shortest first
    source_format: Mapped[str] = mapped_column(String(16), default="")
    source_hash: Mapped[str] = mapped_column(String(40), default="")  # unchanged on re-import: no write
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class RecordIdentifier(Base):
    """A standard number of a record: ``isbn`` (ISBN-13, or as written when invalid), ``issn``, ``lccn``."""

    __tablename__ = "record_identifiers"
    __table_args__ = (Index("ix_record_identifiers_value", "value", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[str] = mapped_column(String(64))


class Item(Base):
    """One physical copy of a record."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    barcode: Mapped[str] = mapped_column(String(64), unique=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"), index=True)
    location: Mapped[str] = mapped_column(String(256), default="")
    call_number: Mapped[str] = mapped_column(String(128), default="")
    item_type: Mapped[str] = mapped_column(String(32), default="book")
    status: Mapped[str] = mapped_column(
        String(32), default="available"
    )  # available, on_loan, on_hold_shelf, …


@dataclass(frozen=True)
class Availability:
    """How many copies of a record there are, how many are on the shelf, and where to find one."""

    total: int = 0
    on_shelf: int = 0
    location: str = ""  # where a copy on the shelf is (else where the copies belong)
    call_number: str = ""
    from_catalogue: bool = False  # with the library's system: its live status could not be read

    @property
    def holdable(self) -> bool:
        """True when the library has copies but none is on the shelf: a reader may place a hold."""
        return self.total > 0 and self.on_shelf == 0


async def find_record(session: AsyncSession, record_key: str) -> Record | None:
    """The record whose control number is ``record_key``, or which has that ISBN (ISBN-10 or -13, any
    hyphenation), ISSN or LCCN; None when there is none. The oldest record wins a shared ISBN."""
    from storage.search import isbn_forms, issn_form, normalise_isbn

    key = (record_key or "").strip()
    if not key or len(key) > 64:
        return None
    record = await session.scalar(select(Record).where(Record.control_number == key))
    if record is not None:
        return record
    values: list[tuple[str, str]] = []
    isbn13 = normalise_isbn(key)
    if isbn13:
        values.append(("isbn", isbn13))
    else:
        values.extend(("isbn", form) for form in isbn_forms(key)[:1])
    issn = issn_form(key)
    if issn:
        values.append(("issn", issn))
    values.append(("lccn", "".join(key.split()).lower()))
    for kind, value in values:
        record_id = await session.scalar(
            select(RecordIdentifier.record_id)
            .where(RecordIdentifier.value == value, RecordIdentifier.kind == kind)
            .order_by(RecordIdentifier.record_id)
            .limit(1)
        )
        if record_id is not None:
            return await session.get(Record, record_id)
    return None


async def availability(session: AsyncSession, record_ids: Iterable[int]) -> dict[int, Availability]:
    """The availability of each record in ``record_ids`` (a record without copies gets ``Availability()``)."""
    ids = sorted(set(record_ids))
    if not ids:
        return {}
    rows = (
        await session.execute(
            select(Item.record_id, Item.status, Item.location, Item.call_number, func.count())
            .where(Item.record_id.in_(ids))
            .group_by(Item.record_id, Item.status, Item.location, Item.call_number)
        )
    ).all()
    groups: dict[int, list[tuple[str, str, str, int]]] = {}
    for record_id, status, location, call_number, count in rows:
        groups.setdefault(record_id, []).append((status, location or "", call_number or "", count))
    result: dict[int, Availability] = {}
    for record_id in ids:
        copies = groups.get(record_id, [])
        if not copies:
            result[record_id] = Availability()
            continue
        shelf = sorted((c for c in copies if c[0] == ON_SHELF), key=lambda c: (-c[3], c[1], c[2]))
        best = shelf[0] if shelf else sorted(copies, key=lambda c: (-c[3], c[1], c[2]))[0]
        result[record_id] = Availability(
            total=sum(c[3] for c in copies),
            on_shelf=sum(c[3] for c in shelf),
            location=best[1],
            call_number=best[2],
        )
    return result
