"""Loading catalog files into the store (``librarybot import catalog``), and the demo's copies.

Each record is upserted by its key: the control number (MARC 001), else its ISBN, else a key made
from its description. A record whose content did not change is not written at all, so importing
the same file twice changes nothing. Records are written in batches, one transaction per batch, with
``executemany`` inserts and updates; a batch the database refuses is retried record by record, so a
bad record is skipped with the database's reason and never half-applied.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import multiprocessing
import os
import random
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.catalog import ON_SHELF, Item, Record, RecordIdentifier
from storage.db import Database, utcnow
from storage.importers import FORMATS, BibRecord, Skip
from storage.importers.cnmarc import cnmarc_record
from storage.importers.csvfile import CsvFormatError, read_csv
from storage.importers.marc import (
    BadRecord,
    MarcRecord,
    marc21_record,
    parse_binary,
    read_binary,
    read_xml,
    split_records,
)
from storage.search import (
    document_tokens,
    issn_form,
    match_keys,
    record_terms,
    update_vocabulary,
    warm_up,
)

BATCH = 1000


class CatalogImportError(Exception):
    """The import cannot run at all (missing or unreadable file, unknown format); one-line message."""


@dataclass
class ImportReport:
    """What an import did: counts, and every skipped record as (file, position, reason)."""

    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    skips: list[tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return len(self.skips)

    @property
    def read(self) -> int:
        return self.imported + self.updated + self.unchanged + self.skipped

    def lines(self) -> list[str]:
        """The report as lines for the terminal: the counts, then one line per skipped record."""
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"imported {self.imported}, updated {self.updated}, unchanged {self.unchanged}, "
            f"skipped {self.skipped} ({self.read} records in {self.seconds:.1f} s, {rate:.0f} records/s)"
        ]
        out.extend(f"skipped {source} record {position}: {reason}" for source, position, reason in self.skips)
        return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _check(path: Path) -> None:
    if not path.exists():
        raise CatalogImportError(f"{path}: no such file")
    if path.is_dir():
        raise CatalogImportError(f"{path}: is a directory, not a catalog file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise CatalogImportError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _open(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it is gzip (recognised by content, not by name)."""
    with path.open("rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")  # type: ignore[return-value]


def detect_format(path: Path) -> str:
    """The format of a catalog file from its first bytes: marc21, marcxml, cnmarc or csv."""
    try:
        with _open(path) as f:
            head = f.read(65536)
    except (OSError, EOFError, zlib.error) as exc:
        raise CatalogImportError(f"{path}: cannot be read ({exc})") from exc
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"<"):
        low = head.lower()
        if b"nlc.cn" in low or b"cnmarc" in low or (b'tag="200"' in low and b'tag="245"' not in low):
            return "cnmarc"
        return "marcxml"
    if len(start) >= 24 and start[:5].isdigit():
        return "marc21"
    first_line = start.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
    if "title" in first_line and ("," in first_line or first_line.strip() == "title"):
        return "csv"
    raise CatalogImportError(
        f"{path}: not a catalog format this importer knows (MARC 21, MARCXML, CNMARC XML or CSV); "
        "name it with --format"
    )


def _map(record: MarcRecord, fmt: str, source_format: str) -> BibRecord:
    if fmt == "cnmarc" or (fmt == "auto" and not record.has("245") and record.has("200")):
        return cnmarc_record(record, "cnmarc")
    return marc21_record(record, source_format)


def read_file(path: Path, fmt: str = "auto") -> Iterator[tuple[int, BibRecord | Skip]]:
    """The records of one catalog file, in order, each read or skipped with its reason, with its
    position (the record's number in the file; for CSV, its line number)."""
    detected = detect_format(path) if fmt == "auto" else fmt
    if detected == "csv":
        with _open(path) as stream:
            try:
                yield from read_csv(stream)
            except CsvFormatError as exc:
                raise CatalogImportError(f"{path}: {exc}") from exc
        return
    if detected in ("marcxml", "cnmarc"):
        with _open(path) as stream:
            xml = stream.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")
    else:
        xml = False
    mapping = "auto" if fmt == "auto" else detected
    label = "marcxml" if detected == "marcxml" else "marc21"
    position = 0
    with _open(path) as stream:
        source = read_xml(stream) if xml else read_binary(stream)  # binary CNMARC too, with --format cnmarc
        try:
            for item in source:
                position = item.position if isinstance(item, Skip) else position + 1
                if isinstance(item, Skip):
                    yield position, item
                    continue
                try:
                    yield position, _map(item, mapping, label)
                except BadRecord as exc:
                    yield position, Skip(position, str(exc))
                except Exception as exc:  # a record the mapping cannot make sense of: skip it, go on
                    yield position, Skip(position, f"unreadable record ({type(exc).__name__}: {exc})"[:300])
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            yield (
                position + 1,
                Skip(position + 1, f"compressed file is damaged ({exc}); the rest was not read"),
            )


# ---------------------------------------------------------------------------------------------
# Storing
# ---------------------------------------------------------------------------------------------


_COLUMNS = {"title", "title_latin", "author", "call_number", "language", "format"}  # kept once, as columns


def record_row(b: BibRecord) -> dict[str, Any]:
    """The ``records`` row of a BibRecord: its columns, token strings, match keys and content hash."""
    search_title, search_author, search_other = document_tokens(
        b.titles,
        b.authors,
        b.others,
        romanised=b.romanised_others,
        isbns=b.isbns,
        issns=b.issns,
        codes=b.codes,
        chinese=b.chinese,
    )
    title_keys = match_keys(b.title_forms, chinese=b.chinese)
    row: dict[str, Any] = {
        "control_number": b.key[:64],
        "title": b.title,
        "title_latin": b.title_latin,
        "author": b.author,
        "year": b.year[:16],
        "isbns": b.isbns,
        "language": b.language[:8],
        "call_number": b.call_number[:128],
        "details": {k: v for k, v in b.details.items() if k not in _COLUMNS},
        "search_title": search_title,
        "search_author": search_author,
        "search_other": search_other,
        "title_keys": title_keys,
        "title_length": len(title_keys.split("\n", 1)[0]),
        "author_keys": match_keys(b.author_forms, chinese=b.chinese),
        "source_format": b.source_format,
    }
    row["source_hash"] = hashlib.sha1(
        json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return row


@dataclass
class _Pending:
    """A record ready to store: its row, how it is keyed, its identifiers (kind, value) and its
    vocabulary terms (counted here, in the worker process, not by the one that writes)."""

    source: str
    position: int
    row: dict[str, Any]
    keyed_by: str
    identifiers: list[tuple[str, str]]
    terms: list[str] = field(default_factory=list)


def prepare(source: str, position: int, item: BibRecord | Skip) -> _Pending | Skip:
    """A record read from a file made ready to store, or the reason it cannot be."""
    if isinstance(item, Skip):
        return item
    try:
        row = record_row(item)
    except Exception as exc:  # a record the indexer cannot digest: skip it, go on
        return Skip(position, f"cannot be indexed ({type(exc).__name__})")
    identifiers = [("isbn", v[:64]) for v in item.isbns]
    identifiers += [("issn", f) for f in sorted({issn_form(v) or "" for v in item.issns}) if f]
    if item.lccn:
        identifiers.append(("lccn", item.lccn.lower()[:64]))
    terms = list(record_terms(row["search_title"], row["search_author"], row["search_other"]))
    return _Pending(source, position, row, item.keyed_by, identifiers, terms)


def _identifiers(record_id: int, p: _Pending) -> list[dict[str, Any]]:
    return [{"record_id": record_id, "kind": kind, "value": value} for kind, value in p.identifiers]


def prepare_binary(source: str, chunks: list[tuple[int, bytes]], fmt: str) -> list[_Pending | Skip]:
    """Binary MARC records, parsed, mapped and tokenised (run in a worker process for big files)."""
    out: list[_Pending | Skip] = []
    for position, chunk in chunks:
        try:
            item: BibRecord | Skip = _map(parse_binary(chunk), fmt, "marc21")
        except BadRecord as exc:
            item = Skip(position, str(exc))
        except Exception as exc:  # a record the mapping cannot make sense of: skip it, go on
            item = Skip(position, f"unreadable record ({type(exc).__name__}: {exc})"[:300])
        out.append(prepare(source, position, item))
    return out


async def _existing(
    session: AsyncSession, batch: list[_Pending]
) -> dict[str, tuple[int, str, str, str, str]]:
    """Stored records the batch will update, by key: (id, hash, token strings)."""
    keys = [p.row["control_number"] for p in batch]
    columns = (Record.id, Record.source_hash, Record.search_title, Record.search_author, Record.search_other)
    found: dict[str, tuple[int, str, str, str, str]] = {}
    for start in range(0, len(keys), 500):
        rows = await session.execute(
            select(Record.control_number, *columns).where(
                Record.control_number.in_(keys[start : start + 500])
            )
        )
        found.update({r[0]: tuple(r[1:]) for r in rows.all()})  # type: ignore[misc]
    by_isbn = [p for p in batch if p.keyed_by == "isbn" and p.row["control_number"] not in found]
    if by_isbn:  # keyed by ISBN: the record of another source that has this ISBN is the one to update
        isbns = [p.row["control_number"] for p in by_isbn]
        rows = await session.execute(
            select(RecordIdentifier.value, *columns)
            .join(Record, Record.id == RecordIdentifier.record_id)
            .where(RecordIdentifier.kind == "isbn", RecordIdentifier.value.in_(isbns))
            .order_by(Record.id.desc())
        )
        found.update({r[0]: tuple(r[1:]) for r in rows.all()})  # type: ignore[misc]
    return found


async def _write(session: AsyncSession, batch: list[_Pending]) -> tuple[int, int, int]:
    """Upsert one batch in the caller's transaction; returns (imported, updated, unchanged)."""
    existing = await _existing(session, batch)
    now = utcnow()
    new = [p for p in batch if p.row["control_number"] not in existing]
    changed = [
        p
        for p in batch
        if p.row["control_number"] in existing
        and existing[p.row["control_number"]][1] != p.row["source_hash"]
    ]
    vocabulary: Counter[str] = Counter()
    identifiers: list[dict[str, Any]] = []
    if new:
        rows = [{**p.row, "updated_at": now} for p in new]
        await session.execute(insert(Record.__table__), rows)  # type: ignore[arg-type]
        keys = [p.row["control_number"] for p in new]
        ids = dict(
            (
                await session.execute(
                    select(Record.control_number, Record.id).where(Record.control_number.in_(keys))
                )
            ).all()
        )
        for p in new:
            identifiers += _identifiers(ids[p.row["control_number"]], p)
            vocabulary.update(p.terms)
    if changed:
        rows = []
        for p in changed:
            record_id, _hash, *old = existing[p.row["control_number"]]
            row = {k: v for k, v in p.row.items() if k != "control_number"}  # an ISBN match keeps its 001
            rows.append({**row, "id": record_id, "updated_at": now})
            identifiers += _identifiers(record_id, p)
            vocabulary.subtract(record_terms(*old))
            vocabulary.update(p.terms)
        await session.execute(update(Record), rows)
        await session.execute(
            delete(RecordIdentifier).where(RecordIdentifier.record_id.in_([r["id"] for r in rows]))
        )
    if identifiers:
        await session.execute(insert(RecordIdentifier.__table__), identifiers)  # type: ignore[arg-type]
    await update_vocabulary(session, vocabulary)
    return len(new), len(changed), len(batch) - len(new) - len(changed)


async def _flush(db: Database, batch: list[_Pending], report: ImportReport) -> None:
    if not batch:
        return
    try:
        async with db.session() as session:
            if db.dialect == "sqlite":  # the indexes of a big catalog do not fit SQLite's default 2 MB
                await session.execute(text(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}"))
            counts = await _write(session, batch)
    except SQLAlchemyError:
        # Find the record the database refuses: each alone, in its own transaction.
        counts = (0, 0, 0)
        for p in batch:
            try:
                async with db.session() as session:
                    one = await _write(session, [p])
                counts = tuple(a + b for a, b in zip(counts, one, strict=True))  # type: ignore[assignment]
            except SQLAlchemyError as exc:
                reason = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
                report.skips.append((p.source, p.position, f"refused by the database: {reason}"))
    report.imported += counts[0]
    report.updated += counts[1]
    report.unchanged += counts[2]
    batch.clear()


SQLITE_CACHE_KIB = 65536  # page cache of the importing connection

PARALLEL_FROM = 4_000_000  # bytes: binary MARC files from this size are parsed in worker processes


async def import_catalog(
    db: Database, paths: list[Path], fmt: str = "auto", progress: bool = True, *, workers: int | None = None
) -> ImportReport:
    """Import catalog files (MARC 21 binary or XML, CNMARC XML, CSV; gzip-compressed or not).

    Raises CatalogImportError before anything is written when a file is missing or unreadable or
    ``fmt`` is unknown; a broken record is skipped with its reason and the import goes on. Big binary
    MARC files are parsed and tokenised by ``workers`` processes (default: one per CPU, when there
    are several) while this one writes to the database.
    """
    if fmt not in FORMATS:
        raise CatalogImportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise CatalogImportError("no catalog file given")
    for path in paths:
        _check(path)
    formats = {path: (detect_format(path) if fmt == "auto" else fmt) for path in paths}
    report = ImportReport()
    started = time.monotonic()
    bar = _progress(progress)
    try:
        for path in paths:
            bar.set_description(f"{path.name} ({formats[path]})")
            store = _Store(db, report)
            count = workers if workers is not None else (os.cpu_count() or 1)
            binary = formats[path] == "marc21" or (formats[path] == "cnmarc" and not _is_xml(path))
            parallel = count > 1 and "fork" in multiprocessing.get_all_start_methods()
            if binary and parallel and (workers is not None or path.stat().st_size >= PARALLEL_FROM):
                await _import_parallel(path, fmt, count, store, bar)
            else:
                for position, item in read_file(path, fmt):
                    bar.update(1)
                    await store.add(prepare(path.name, position, item), path.name)
            await store.flush()
    finally:
        bar.close()
        report.seconds = time.monotonic() - started
    return report


class _Store:
    """Collects prepared records into batches and writes each batch (the later of two records with
    the same key wins)."""

    def __init__(self, db: Database, report: ImportReport) -> None:
        self.db = db
        self.report = report
        self.batch: list[_Pending] = []
        self.keys: set[str] = set()

    async def add(self, item: _Pending | Skip, source: str) -> None:
        if isinstance(item, Skip):
            self.report.skips.append((source, item.position, item.reason))
            return
        key = item.row["control_number"]
        if key in self.keys:
            await self.flush()
        self.keys.add(key)
        self.batch.append(item)
        if len(self.batch) >= BATCH:
            await self.flush()

    async def flush(self) -> None:
        await _flush(self.db, self.batch, self.report)
        self.keys.clear()


def _is_xml(path: Path) -> bool:
    with _open(path) as stream:
        return stream.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


async def _import_parallel(path: Path, fmt: str, workers: int, store: _Store, bar: Any) -> None:
    """Binary MARC: records are split here and parsed, mapped and tokenised in worker processes,
    in order, while this process writes the previous batches."""
    mapping = "auto" if fmt == "auto" else ("cnmarc" if fmt == "cnmarc" else "marc21")
    loop = asyncio.get_running_loop()
    # Fork: the workers run pure parsing code and need nothing of this process but its modules;
    # spawn would re-run the calling script's main module in every worker.
    context = multiprocessing.get_context("fork")
    warm_up()  # the tables every worker needs, built once here and shared by the fork
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[asyncio.Future[list[_Pending | Skip]]] = deque()

        async def take_one() -> None:
            results = await pending.popleft()
            bar.update(len(results))
            for item in results:
                await store.add(item, path.name)

        try:
            with _open(path) as stream:
                chunk: list[tuple[int, bytes]] = []
                for position, raw in enumerate(split_records(stream), start=1):
                    chunk.append((position, raw))
                    if len(chunk) >= BATCH:
                        pending.append(loop.run_in_executor(pool, prepare_binary, path.name, chunk, mapping))
                        chunk = []
                        while len(pending) > workers * 2:
                            await take_one()
                if chunk:
                    pending.append(loop.run_in_executor(pool, prepare_binary, path.name, chunk, mapping))
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            store.report.skips.append(
                (path.name, bar.n + 1, f"compressed file is damaged ({exc}); the rest was not read")
            )
        while pending:
            await take_one()


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_description(self, _text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit=" records", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# The demo's catalog and copies

DEMO_FILES = (
    "loc-books-sample-1000.mrc",
    "loc-books-chinese-slice.mrc",
    "loc-books-extra.mrc",
    "cnmarc-sru-sample-10.xml",
)


async def import_demo_catalog(db: Database, directory: Path) -> ImportReport:
    """Import the demo catalog shipped in ``directory`` (``bot/demo_data``), quietly."""
    return await import_catalog(
        db, [directory / name for name in DEMO_FILES if (directory / name).exists()], progress=False
    )


# ---------------------------------------------------------------------------------------------

# Where books stand, by the first letter of their Library of Congress or Chinese Library
# Classification call number: the building's places (storage.policy's default places), named in
# both languages as their signs are.
_SOCIAL = "三层 社会科学阅览区 · 3F Social Sciences reading area"
_SCIENCE = "二层 自然科学阅览区 · 2F Sciences reading area"
_STACKS = "地下一层 密集书库 · B1 Compact stacks"
_LOCATIONS = {
    **dict.fromkeys("BCDEFGHIJKLMNP", _SOCIAL),
    **dict.fromkeys("QRSTUVX", _SCIENCE),
    **dict.fromkeys("AZ", _STACKS),
}
_NEW_BOOKS = "一层 大厅与借还处 · 1F Lobby and circulation desk"
_OTHER_STATUSES = ("in_repair", "missing", "in_transit")


def demo_location(call_number: str) -> str:
    """The shelf of a call number in the demo library ("K249.2/…" → the 3F Social Sciences reading area)."""
    first = (call_number or "").strip()[:1].upper()
    return _LOCATIONS.get(first, _NEW_BOOKS)


async def seed_demo_items(session: AsyncSession, rng: random.Random, *, per_record: int = 3) -> int:
    """Give every record without copies one to ``per_record`` copies with realistic barcodes,
    locations, call numbers and statuses (mostly on the shelf; a few in repair, missing or in
    transit, and about one record in twelve with no copy on the shelf, so holds can be tried).
    Copies on loan are left to the circulation seed, which checks copies out. Returns the number of
    copies made; running it again adds none."""
    have = select(Item.record_id).distinct()
    records = (
        await session.execute(
            select(Record.id, Record.call_number).where(Record.id.not_in(have)).order_by(Record.id)
        )
    ).all()
    taken = {b for (b,) in (await session.execute(select(Item.barcode))).all()}
    next_barcode = 100001
    rows: list[dict[str, Any]] = []
    for record_id, call_number in records:
        copies = rng.choice([1, 1, 2, 2, 3, 3][: max(1, 2 * per_record)]) if per_record > 1 else 1
        none_on_shelf = rng.random() < 1 / 12
        shelf_call_number = (
            call_number or f"{rng.choice('ABDHKPQT')}{rng.randint(1, 999)}/{rng.randint(1, 99)}"
        )
        for copy in range(copies):
            while f"T{next_barcode:07d}" in taken:
                next_barcode += 1
            barcode = f"T{next_barcode:07d}"
            taken.add(barcode)
            if none_on_shelf:
                status = rng.choice(_OTHER_STATUSES)
            else:
                status = ON_SHELF if copy == 0 or rng.random() < 0.8 else rng.choice(_OTHER_STATUSES)
            rows.append(
                {
                    "barcode": barcode,
                    "record_id": record_id,
                    "location": demo_location(shelf_call_number),
                    "call_number": shelf_call_number[:128],
                    "item_type": "reference" if rng.random() < 0.03 else "book",
                    "status": status,
                }
            )
    for start in range(0, len(rows), 1000):
        await session.execute(insert(Item), rows[start : start + 1000])
    return len(rows)
