"""Benchmark: catalog search on the 250,000-record Library of Congress file, in SQLite.

    python bench/search.py [--limit N] [--per-type 100] [--db PATH] [--seed 7] [--pg URL]

Imports the records (``--limit N``: N records spread over the file, for a quick check) into a SQLite file
(``--db PATH`` keeps it, and a later run with the same path reuses it without importing), then builds
queries from the data (``--per-type`` of each type; records are drawn with a fixed seed):

- ``exact``: a record's main title, as written;
- ``typo``: the same with one or two typos (a letter deleted, inserted, replaced or two swapped, in
  different words of four letters or more; half the queries have one typo, half two);
- ``author+word``: the main author's surname and the rarest word of the title;
- ``isbn``: the record's ISBN in its other form (ISBN-10 for ISBN-13 and back), hyphenated or not;
- ``simplified``: the simplified-Chinese form of a title catalogued in traditional characters;
- ``pinyin``: a Chinese record's romanised title without spaces ("mingdaizhengzhizhidu").

Each query runs through ``storage.search.search`` (five results, one session per query, as the bot
does) and through a plain SQL ``LIKE '%query%'`` over title, romanised title, author and ISBNs, in
the same run. A query is answered when one of the first five results is the record it was made
from, or a record with the same main title (the same work catalogued twice; for ISBNs: a record
with that ISBN). Printed per type: latency p50/p95/p99 and recall@5 for both, plus the import time
and the database size. Targets (PRODUCT.md §6): p95 ≤ 50 ms and recall@5 ≥ 0.95 for every type.

Before importing, one pymarc process iterates the same file with Unicode decoding: the floor any
import is compared with, printed beside it. With ``--pg postgresql+asyncpg://…/DB`` (a database of
your own; the catalog is imported into it when it is empty, and kept) the same queries also run on
PostgreSQL, with the number whose five results are the same as on SQLite.

Recorded 2026-12-04 after #21 (load average 3.9; the import at 3.0–4.9): import 162 s against a
floor of 26.5 s (6.1×); SQLite p50/p95/p99 2.1/7.8/14.8 ms, recall@5 1.000 on every type (worst
p95: typo 14.9 ms); PostgreSQL 3.1/11.8/27.9 ms, recall@5 1.000, 600 of 600 queries with the same
five results as SQLite; LIKE p95 217 ms, recall@5 0.215.

Last recorded before #21 (2026-11-26, 2 CPUs shared with other work, load average 2.7–4; 100 queries a type):
import of 250,000 records 176 s (1,420 records/s, none skipped), database 406 MB.

    query type     search engine: p50   p95   p99 rec@5 | LIKE: p50    p95    p99 rec@5  (ms)
    exact                         3.3   5.6   7.9 1.000 |     191.9  244.3  296.2 0.990
    typo                          6.9  11.7  14.9 1.000 |     180.9  192.7  200.6 0.000
    author+word                   3.8   6.6  11.0 1.000 |     179.3  202.6  213.2 0.000
    isbn                          2.5   4.3   6.5 1.000 |     179.3  333.9  434.3 0.290
    simplified                    3.2   4.7   6.3 1.000 |     187.0  207.2  356.7 0.000
    pinyin                        5.2  12.2  18.1 1.000 |     176.3  192.6  203.8 0.010
    all                           3.7   9.5  13.5 1.000 |     183.2  246.3  356.2 0.215
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, or_, select  # noqa: E402

from storage.catalog import Record  # noqa: E402
from storage.catalog_import import import_catalog  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.importers.marc import split_records  # noqa: E402
from storage.models import create_schema  # noqa: E402
from storage.search import SearchTerm, compact, format_isbn, search, words  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalog" / "loc-books-250k.mrc.gz"
TYPES = ("exact", "typo", "author+word", "isbn", "simplified", "pinyin")


@dataclass
class Query:
    kind: str
    text: str
    target: int
    relevant: Callable[[Record], bool]


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    hits: int = 0

    def add(self, ms: float, hit: bool) -> None:
        self.latencies.append(ms)
        self.hits += hit

    def row(self) -> str:
        if not self.latencies:
            return f"{'-':>7} {'-':>7} {'-':>7} {'-':>6}"
        q = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return f"{q[49]:7.1f} {q[94]:7.1f} {q[98]:7.1f} {self.hits / len(self.latencies):6.3f}"


def main_title(title: str) -> str:
    """The main title of a display title: before the subtitle, parallel title or responsibility."""
    for sep in (" : ", " = ", " / ", " ; ", ". "):
        title = title.split(sep, 1)[0]
    return title.strip()


def typo(word: str, rng: random.Random) -> str:
    """``word`` with one typing error, never in its first letter."""
    i = rng.randrange(1, len(word))
    kind = rng.choice(("delete", "insert", "replace", "swap"))
    letters = "abcdefghijklmnopqrstuvwxyz"
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    if kind == "insert":
        return word[:i] + rng.choice(letters) + word[i:]
    if kind == "swap" and i < len(word) - 1 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + rng.choice([c for c in letters if c != word[i].lower()]) + word[i + 1 :]


def same_title(title: str) -> Callable[[Record], bool]:
    key = words(title)
    return lambda r: key in r.title_keys.split("\n")


def same_work(surname: str, title: str) -> Callable[[Record], bool]:
    return lambda r: title in r.title_keys.split("\n") and surname in words(r.author)


def has_isbn(isbn13: str) -> Callable[[Record], bool]:
    return lambda r: isbn13 in (r.isbns or [])


def same_compact_title(text: str) -> Callable[[Record], bool]:
    return lambda r: any(compact(x) == text for x in r.title_keys.split("\n"))


async def build_queries(db: Database, per_type: int, seed: int) -> list[Query]:
    """``per_type`` queries of every type, from records drawn with ``seed``."""
    rng = random.Random(seed)
    async with db.session() as s:
        columns = (Record.id, Record.title, Record.title_latin, Record.author, Record.isbns, Record.language)
        rows = list((await s.execute(select(*columns))).all())
        df = dict((await s.execute(select(SearchTerm.term, SearchTerm.df))).all())
    rng.shuffle(rows)
    queries: list[Query] = []
    counts = dict.fromkeys(TYPES, 0)

    def want(kind: str) -> bool:
        return counts[kind] < per_type

    def add(kind: str, text: str, target: int, relevant: Callable[[Record], bool]) -> None:
        counts[kind] += 1
        queries.append(Query(kind, text, target, relevant))

    from opencc import OpenCC

    t2s = OpenCC("t2s")
    for rid, title, title_latin, author, isbns, language in rows:
        latin_title = main_title(title_latin or title)
        if want("exact") and not title_latin and 3 <= len(main_title(title)) <= 80:
            add("exact", main_title(title), rid, same_title(main_title(title)))
            continue
        latin_words = [w for w in latin_title.split() if len(w) >= 4 and w.isalpha() and w.isascii()]
        if want("typo") and not title_latin and latin_title.isascii() and len(latin_words) >= 2:
            chosen = rng.sample(latin_words, 1 if counts["typo"] % 2 == 0 else 2)
            text = latin_title
            for w in chosen:
                text = text.replace(w, typo(w, rng), 1)
            if text != latin_title:
                add("typo", text, rid, same_title(latin_title))
                continue
        if want("author+word") and author and "," in author and author.isascii() and not title_latin:
            surname = author.split(",", 1)[0].strip()
            candidates = [w for w in words(main_title(title)).split() if len(w) >= 4 and w.isalpha()]
            if surname and candidates:
                word = min(candidates, key=lambda w: (df.get(w, 0), w))
                add(
                    "author+word",
                    f"{surname} {word}",
                    rid,
                    same_work(words(surname), words(main_title(title))),
                )
                continue
        if want("isbn") and isbns and isbns[0].startswith("978") and len(isbns[0]) == 13:
            isbn13 = isbns[0]
            from stdnum import isbn as stdnum_isbn

            isbn10 = stdnum_isbn.to_isbn10(isbn13)
            form = isbn10 if rng.random() < 0.5 else isbn13
            text = format_isbn(form) if rng.random() < 0.5 else form
            add("isbn", text, rid, has_isbn(isbn13))
            continue
        main = main_title(title)
        if want("simplified") and title_latin and t2s.convert(main) != main and len(main) >= 2:
            simplified = t2s.convert(main)
            add("simplified", simplified, rid, same_title(main))
            continue
        if want("pinyin") and language == "chi" and title_latin and latin_title.isascii():
            text = compact(words(latin_title))
            if len(text) >= 4:
                add("pinyin", text, rid, same_compact_title(text))
                continue
        if all(not want(k) for k in TYPES):
            break
    return queries


async def like_baseline(db: Database, text: str) -> list[int]:
    """The plain SQL baseline: the query as one ``LIKE '%…%'`` pattern over a few columns."""
    pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    async with db.session() as s:
        columns = (
            Record.title,
            Record.title_latin,
            Record.author,
            func.cast(Record.isbns, Record.title.type),
        )
        stmt = (
            select(Record.id)
            .where(or_(*(c.like(pattern, escape="\\") for c in columns)))
            .order_by(Record.id)
            .limit(5)
        )
        return list((await s.execute(stmt)).scalars().all())


async def engine(db: Database, text: str) -> list[int]:
    async with db.session() as s:
        page = await search(s, text, limit=5)
    return [h.record_id for h in page.hits]


async def measure(
    db: Database, queries: list[Query], run: Callable[[Database, str], Awaitable[list[int]]]
) -> tuple[dict[str, Result], list[Query]]:
    """Latency and recall@5 per query type, and the queries not answered."""
    results = {k: Result() for k in TYPES}
    misses: list[Query] = []
    for q in queries:
        started = time.perf_counter()
        ids = await run(db, q.text)
        ms = (time.perf_counter() - started) * 1000
        hit = q.target in ids
        if not hit and ids:
            async with db.session() as s:
                found = (await s.execute(select(Record).where(Record.id.in_(ids)))).scalars().all()
            hit = any(q.relevant(r) for r in found)
        results[q.kind].add(ms, hit)
        if not hit:
            misses.append(q)
    return results, misses


async def top_keys(db: Database, queries: list[Query]) -> list[list[str]]:
    """The control numbers of each query's first five results (record ids differ between stores)."""
    out = []
    for q in queries:
        ids = await engine(db, q.text)
        async with db.session() as s:
            keys = dict((await s.execute(select(Record.id, Record.control_number).where(Record.id.in_(ids)))).all())
        out.append([keys[i] for i in ids])
    return out


async def postgresql(url: str, data: Path, sqlite: Database, queries: list[Query]) -> list[str]:
    """The same queries on PostgreSQL (the catalog imported first when its database is empty):
    latency and recall per type, and how many queries have the same five results as on SQLite."""
    pg = Database(url)
    await create_schema(pg)
    lines = []
    async with pg.session() as s:
        present = await s.scalar(select(func.count()).select_from(Record))
    if not present:
        started = time.perf_counter()
        report = await import_catalog(pg, [data], progress=sys.stderr.isatty())
        lines.append(f"PostgreSQL import: {report.lines()[0]} (bench: {time.perf_counter() - started:.0f} s)")
    async with sqlite.session() as s:
        control = dict((await s.execute(select(Record.id, Record.control_number))).all())
    async with pg.session() as s:
        pg_id = {c: i for i, c in (await s.execute(select(Record.id, Record.control_number))).all()}
    pg_queries = [Query(q.kind, q.text, pg_id.get(control[q.target], -1), q.relevant) for q in queries]
    await engine(pg, "warm up")
    results, _ = await measure(pg, pg_queries, engine)
    same = sum(a == b for a, b in zip(await top_keys(sqlite, queries), await top_keys(pg, queries), strict=True))
    await pg.dispose()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines.append(f"PostgreSQL ({len(pg_id):,} records), load average {load}; same five results as SQLite: "
                 f"{same} of {len(queries)} queries")
    total = Result()
    for kind in TYPES:
        total.latencies += results[kind].latencies
        total.hits += results[kind].hits
        lines.append(f"{kind:14} {len(results[kind].latencies):>3} {results[kind].row()}")
    lines.append(f"{'all':14} {len(total.latencies):>3} {total.row()}")
    return lines


def pymarc_floor(source: Path) -> tuple[int, float]:
    """The floor of any import: one process merely iterating the file with pymarc, decoding every
    record to Unicode (no mapping, no tokens, no database). Returns (records, seconds)."""
    import pymarc

    started = time.perf_counter()
    count = 0
    with gzip.open(source, "rb") if source.suffix == ".gz" else source.open("rb") as f:
        for _record in pymarc.MARCReader(f, to_unicode=True, utf8_handling="replace"):
            count += 1
    return count, time.perf_counter() - started


def slice_of(source: Path, limit: int, directory: Path) -> Path:
    """``limit`` records spread evenly over ``source`` (every k-th), bytes unchanged, in a file of
    their own: a slice with some of every kind of record (the Chinese ones are not at the start)."""
    with gzip.open(source, "rb") as f:
        total = sum(1 for _ in split_records(f))
    step = max(1, total // limit)
    out = directory / f"slice-{limit}.mrc"
    with gzip.open(source, "rb") as f, out.open("wb") as w:
        for n, chunk in enumerate(split_records(f)):
            if n % step == 0 and n // step < limit:
                w.write(chunk)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=0, help="import only N records, spread over the file")
    parser.add_argument("--per-type", type=int, default=100, help="queries of each type")
    parser.add_argument("--db", type=Path, help="SQLite file to keep (reused when it already holds records)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pg",
        help="also PostgreSQL: a postgresql+asyncpg URL of a database of your own (the catalog is imported "
        "into it when it holds no records, and kept)",
    )
    parser.add_argument(
        "--show-misses", action="store_true", help="list the queries the engine did not answer"
    )
    args = parser.parse_args()
    if not args.db and not args.data.exists():
        sys.exit(f"bench/search.py: the catalog {args.data} is missing; it comes from the project's shared "
                 "data set (../shared/data/catalog beside the repository), or pass --data PATH")

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    path = args.db or tmp / "search.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await create_schema(db)
    async with db.session() as s:
        present = await s.scalar(select(func.count()).select_from(Record))
    import_seconds = None
    floor: tuple[int, float] | None = None
    if not present:
        source = slice_of(args.data, args.limit, tmp) if args.limit else args.data
        floor = pymarc_floor(source)
        import_load = os.getloadavg()[0]
        started = time.perf_counter()
        report = await import_catalog(db, [source], progress=sys.stderr.isatty())
        import_seconds = time.perf_counter() - started
        print("\n".join(report.lines()[:5]))
        print(
            f"import {import_seconds:.1f} s against the floor of {floor[1]:.1f} s (one pymarc process iterating "
            f"the {floor[0]:,} records with Unicode decoding, measured just before): "
            f"{import_seconds / floor[1]:.2f}× the floor; load average {import_load:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end"
        )
        async with db.session() as s:
            present = await s.scalar(select(func.count()).select_from(Record))
    async with db.engine.connect() as conn:
        await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(os.path.getsize(p) for p in (str(path), f"{path}-wal") if os.path.exists(p))

    queries = await build_queries(db, args.per_type, args.seed)
    await engine(db, "warm up")  # first-query costs (OpenCC, pypinyin tables) are not search latency
    ours, misses = await measure(db, queries, engine)
    like, _ = await measure(db, queries, like_baseline)
    pg_lines = await postgresql(args.pg, args.data, db, queries) if args.pg else []

    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"records: {present:,}   queries: {len(queries)}   database: {size / 1e6:.0f} MB", end="")
    if import_seconds:
        print(f"   import: {import_seconds:.0f} s ({(present or 0) / import_seconds:.0f} records/s)")
    else:
        print("   (reused)")
    print()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load} (other work on the machine slows every figure)"
    )
    print(f"{'':14} {'search engine':^31} | {'SQL LIKE baseline':^31}")
    print(
        f"{'query type':14} {'n':>3} {'p50':>7} {'p95':>7} {'p99':>7} {'rec@5':>6} | {'p50':>7} {'p95':>7} {'p99':>7} {'rec@5':>6}  (ms)"
    )
    total_ours, total_like = Result(), Result()
    for kind in TYPES:
        r = ours[kind]
        total_ours.latencies += r.latencies
        total_ours.hits += r.hits
        total_like.latencies += like[kind].latencies
        total_like.hits += like[kind].hits
        print(f"{kind:14} {len(r.latencies):>3} {r.row()} | {like[kind].row()}")
    print(f"{'all':14} {len(total_ours.latencies):>3} {total_ours.row()} | {total_like.row()}")
    for line in pg_lines:
        print(line)
    if args.show_misses:
        for q in misses:
            print(f"missed {q.kind}: {q.text!r} (record {q.target})")
    await db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
