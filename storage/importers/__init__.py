"""Readers of bibliographic files: each turns a file into :class:`BibRecord` values or :class:`Skip`
reasons, one per record, in file order. They never touch the database (``storage.catalog_import``
stores what they read).

- :mod:`storage.importers.marc`: MARC 21 binary (ISO 2709, UTF-8 or MARC-8, read with pymarc) and
  MARCXML, plus the MARC 21 field mapping (245/100/260/264/020/650/880 …);
- :mod:`storage.importers.cnmarc`: the CNMARC/UNIMARC mapping (010/200/210/606/690/701 with pinyin
  subfields), for CNMARC XML (also inside an SRU response) and binary UNIMARC;
- :mod:`storage.importers.csvfile`: CSV with ``title,author,isbn,publisher,year,subjects,call_number,language``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMATS = ("auto", "marc21", "marcxml", "cnmarc", "csv")


@dataclass
class BibRecord:
    """One bibliographic record as read from a file, before it is indexed and stored.

    ``titles``, ``authors``, ``others`` and ``romanised_others`` are the texts the search index is
    made of; ``title_forms`` and ``author_forms`` are what the reranking compares a query with.
    """

    key: str  # control number (001), else the ISBN-13, else a key derived from the description
    keyed_by: str  # "control", "isbn" or "description"
    title: str
    title_latin: str = ""
    author: str = ""
    year: str = ""
    language: str = ""
    call_number: str = ""
    isbns: list[str] = field(default_factory=list)  # ISBN-13s (as written when the check digit is wrong)
    issns: list[str] = field(default_factory=list)
    lccn: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    titles: list[str] = field(default_factory=list)
    authors: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    romanised_others: list[str] = field(default_factory=list)  # publisher, series: romanised in LoC records
    codes: list[str] = field(default_factory=list)  # control number, call numbers
    title_forms: list[str] = field(default_factory=list)
    author_forms: list[str] = field(default_factory=list)
    chinese: bool = False
    source_format: str = ""


@dataclass(frozen=True)
class Skip:
    """A record that was not imported, and why (``position`` is the record's number in its file, or a
    CSV line number)."""

    position: int
    reason: str
