"""The bibliographic store: records (one per title/edition) and their copies (items)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow


class Record(Base):
    """A bibliographic record, keyed by its control number (MARC 001) or, lacking one, its ISBN."""

    __tablename__ = "records"

    id: Mapped[int] = mapped_column(primary_key=True)
    control_number: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(Text)  # original script first when the record has one
    author: Mapped[str] = mapped_column(Text, default="")
    year: Mapped[str] = mapped_column(String(16), default="")
    isbns: Mapped[list[Any]] = mapped_column(default=list)  # normalised ISBN-13s
    language: Mapped[str] = mapped_column(String(8), default="")
    call_number: Mapped[str] = mapped_column(String(128), default="")
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the full record for the details view
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Item(Base):
    """One physical copy of a record."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    barcode: Mapped[str] = mapped_column(String(64), unique=True)
    record_id: Mapped[int] = mapped_column(ForeignKey("records.id", ondelete="CASCADE"), index=True)
    location: Mapped[str] = mapped_column(String(256), default="")
    call_number: Mapped[str] = mapped_column(String(128), default="")
    item_type: Mapped[str] = mapped_column(String(32), default="book")
    status: Mapped[str] = mapped_column(String(32), default="available")  # available, on_loan, on_hold_shelf, …
