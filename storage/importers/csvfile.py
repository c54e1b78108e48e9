"""Bibliographic records from CSV: ``title,author,isbn,publisher,year,subjects,call_number,language``.

Only ``title`` is required; ``subjects`` holds several headings separated by ``;`` or ``|``. A row is
keyed by its ISBN, or, without one, by its description (title, author, year, publisher).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import IO

from storage.importers import BibRecord, Skip
from storage.importers.marc import description_key, isbn_entries
from storage.search import is_chinese_text, normalise_isbn

COLUMNS = ("title", "author", "isbn", "publisher", "year", "subjects", "call_number", "language")


class CsvFormatError(ValueError):
    """The CSV file as a whole is unusable (no header with a title column)."""


def read_csv(stream: IO[bytes]) -> Iterator[tuple[int, BibRecord | Skip]]:
    """The records of a CSV catalog file with their line numbers; a row without a title is skipped."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    reader = csv.DictReader(text)
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    if "title" not in header:
        raise CsvFormatError("the CSV file has no 'title' column (expected: " + ",".join(COLUMNS) + ")")
    reader.fieldnames = header
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, Skip(reader.line_num, f"unreadable CSV line ({exc})")
            return
        line = reader.line_num
        values = {k: (v or "").strip() if isinstance(v, str) else "" for k, v in row.items() if k}
        if not any(values.values()):
            continue
        try:
            yield line, csv_record(values)
        except ValueError as exc:
            yield line, Skip(line, str(exc))


def csv_record(row: dict[str, str]) -> BibRecord:
    """One CSV row mapped to a BibRecord; ValueError when it has no title."""
    title = " ".join(row.get("title", "").split())
    if not title:
        raise ValueError("no title")
    author = " ".join(row.get("author", "").split())
    publisher = row.get("publisher", "")
    year = row.get("year", "")[:16]
    language = row.get("language", "")[:8].lower()
    call_number = row.get("call_number", "")[:128]
    raw_isbns = [v for v in row.get("isbn", "").replace("|", ";").replace(",", ";").split(";") if v.strip()]
    isbns, isbn_display = isbn_entries(raw_isbns)
    subjects = [s.strip() for s in row.get("subjects", "").replace("|", ";").split(";") if s.strip()]
    if isbns and normalise_isbn(isbns[0]):
        key, keyed_by = isbns[0], "isbn"
    else:
        key, keyed_by = description_key(title, author, year, publisher), "description"
    chinese = language in ("chi", "zho", "zh") or is_chinese_text(title + author)
    details = {
        "title": title,
        "author": author,
        "publication": ", ".join(x for x in (publisher, year) if x),
        "subjects": subjects,
        "isbns": isbn_display,
        "call_number": call_number,
        "language": language,
        "format": "csv",
    }
    return BibRecord(
        key=key,
        keyed_by=keyed_by,
        title=title,
        author=author,
        year=year,
        language=language,
        call_number=call_number,
        isbns=isbns,
        details={k: v for k, v in details.items() if v},
        titles=[title],
        authors=[author] if author else [],
        others=subjects,
        romanised_others=[publisher] if publisher else [],
        codes=[call_number] if call_number else [],
        title_forms=[title],
        author_forms=[author] if author else [],
        chinese=chinese,
        source_format="csv",
    )
