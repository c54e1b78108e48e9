"""Catalog search over the demo catalog (real LoC records, English and Chinese, and CNMARC): the
reader's queries of issue #3, the ranking rules, every field, bad input, and the details view.

The catalog is imported once for the module (SQLite, or PostgreSQL with LIBRARYBOT_TEST_DATABASE_URL:
the same assertions hold on both)."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.catalog_import import import_catalog, import_demo_catalog, seed_demo_items
from storage.db import Database
from storage.models import create_schema
from storage.search import (
    _fts_expression,
    _query_groups,
    _tsquery,
    document_tokens,
    fold,
    pinyin_splits,
    ranked_ids,
    record_details,
    search,
    text_tokens,
    words,
)
from tests.conftest import _drop_database, _fresh_database

DEMO = Path(__file__).resolve().parents[1] / "bot" / "demo_data"
in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the catalog is shared by the module

MING = "00049916"  # 明代政治制度 / 張治安 (Zhang Zhi'an), ISBN 957-11-1784-6
FINANCE = "00049917"  # 國際公司理財 = International finance (traditional characters)
WRIGHT = "00057661"  # The history of China
DVORAK = "00354124"  # Antonín Dvořák, 1841-1904 : life and work
CN94 = "990002180740203961"  # CNMARC: '94中国发展报告, 叶震 romanised "Xie Zhen"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def catalog(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    db = await _fresh_database(tmp_path_factory.mktemp("search"))
    await create_schema(db)
    report = await import_demo_catalog(db, DEMO)
    assert report.skipped == 0
    async with db.session() as s:
        await seed_demo_items(s, random.Random(3))
    try:
        yield db
    finally:
        await _drop_database(db)


async def numbers(db: Database, query: str, limit: int = 5) -> list[str]:
    """The control numbers of the first results of ``query``."""
    from sqlalchemy import select

    from storage.catalog import Record

    async with db.session() as s:
        page = await search(s, query, limit=limit)
        ids = [h.record_id for h in page.hits]
        found = dict(
            (await s.execute(select(Record.id, Record.control_number).where(Record.id.in_(ids)))).all()
        )
    return [found[i] for i in ids]


@in_module_loop
@pytest.mark.parametrize(
    ("query", "expected", "first"),
    [
        ("明代政治制度", MING, True),
        ("國際公司理財", FINANCE, True),
        ("国际公司理财", FINANCE, True),  # simplified query, traditional record
        ("mingdaizhengzhizhidu", MING, True),  # pinyin without spaces
        ("ming dai zheng zhi", MING, True),
        ("Ming Dai Zheng Zhi Zhi Du", MING, True),
        ("Zhang Zhian", MING, False),
        ("張治安", MING, True),
        ("histroy of chna", WRIGHT, True),  # two typos
        ("The history of China", WRIGHT, True),
        ("9571117846", MING, True),  # ISBN-10
        ("978-957-11-1784-3", MING, True),  # ISBN-13, hyphenated
        ("9789571117843", MING, True),
        ("957-11-1784-6", MING, True),
        ("ISBN 9571117846", MING, True),
        ("Dvorak", DVORAK, True),  # diacritic folding
        ("DVOŘÁK", DVORAK, True),
        ("antonin dvorak life and work", DVORAK, True),
        ("叶震", CN94, False),  # CNMARC person
        ("Ye Zhen", CN94, False),  # pypinyin's reading
        ("Xie Zhen", CN94, False),  # the record's own (wrong) romanisation
    ],
)
async def test_reader_queries(catalog: Database, query: str, expected: str, first: bool) -> None:
    found = await numbers(catalog, query)
    assert expected in found, (query, found)
    if first:
        assert found[0] == expected, (query, found)


@in_module_loop
async def test_two_character_chinese_words_match(catalog: Database) -> None:
    async with catalog.session() as s:
        page = await search(s, "政治", limit=50)
    assert page.total > 1
    assert all("政治" in fold(h.title) for h in page.hits[:5])
    assert MING in await numbers(catalog, "政治", limit=50)


@in_module_loop
async def test_subject_series_publisher_and_call_number(catalog: Database) -> None:
    assert MING in await numbers(catalog, "Ming dynasty politics and government", limit=10)  # subjects
    assert FINANCE in await numbers(catalog, "国际工程管理系列丛书")  # series, simplified for traditional
    assert FINANCE in await numbers(catalog, "Guo ji gong cheng guan li xi lie cong shu")  # romanised series
    assert MING in await numbers(catalog, "五南图书出版", limit=10)  # publisher
    assert MING in await numbers(catalog, "Wu nan tu shu chu ban", limit=10)
    assert MING in await numbers(catalog, "DS753")  # call number


@in_module_loop
async def test_issn(catalog: Database, tmp_path: Path) -> None:
    path = tmp_path / "serial.xml"
    path.write_text(
        '<collection xmlns="http://www.loc.gov/MARC21/slim"><record><leader>00000cas a2200000 a 4500</leader>'
        '<controlfield tag="001">serial-1</controlfield>'
        '<datafield tag="022" ind1=" " ind2=" "><subfield code="a">0028-0836</subfield></datafield>'
        '<datafield tag="245" ind1="0" ind2="0"><subfield code="a">Nature.</subfield></datafield>'
        "</record></collection>",
        encoding="utf-8",
    )
    await import_catalog(catalog, [path], progress=False)
    assert (await numbers(catalog, "0028-0836"))[0] == "serial-1"
    assert "serial-1" in await numbers(catalog, "nature")


@in_module_loop
async def test_exact_title_ranks_before_titles_that_contain_it(catalog: Database) -> None:
    async with catalog.session() as s:
        page = await search(s, "china", limit=10)
    titles = [words(h.title) for h in page.hits]
    exact = [i for i, t in enumerate(titles) if t == "china"]
    assert not exact or exact[0] == 0


@in_module_loop
async def test_results_page_consistently(catalog: Database) -> None:
    async with catalog.session() as s:
        ids = await ranked_ids(s, "history")
        pages = [await search(s, "history", limit=5, offset=o) for o in (0, 5, 10)]
    assert [h.record_id for p in pages for h in p.hits] == ids[:15]
    assert pages[0].total == len(ids) and pages[0].has_more
    for hit in pages[0].hits:
        assert hit.title and hit.availability.total >= 1 and hit.call_number


@in_module_loop
@pytest.mark.parametrize(
    "query",
    [
        "",
        "   ",
        "!!!",
        "。，、？",
        '"',
        '"unterminated',
        "*",
        "a*",
        "NEAR",
        "NEAR(a b)",
        "history NOT china",
        "{search_title}: x",
        "title:china",
        "'; DROP TABLE records; --",
        "' OR 1=1 --",
        "\\",
        "😀",
        "📚 history 📚",
        "x" * 2000,
        "中" * 2000,
        " ".join(["history"] * 400),
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        "\x00\x01\x1f",
        "ming2 dai4",
    ],
)
async def test_any_query_answers_normally(catalog: Database, query: str) -> None:
    async with catalog.session() as s:
        page = await search(s, query)
    assert page.total >= len(page.hits) >= 0
    assert page.query == query


@in_module_loop
async def test_punctuation_only_finds_nothing(catalog: Database) -> None:
    async with catalog.session() as s:
        assert (await search(s, "?!.,;:")).total == 0


@in_module_loop
async def test_details(catalog: Database) -> None:
    async with catalog.session() as s:
        ming_id = (await search(s, "9571117846")).hits[0].record_id
        details = await record_details(s, ming_id)
        assert details is not None
        assert details.title == "明代政治制度" and details.title_latin == "Ming dai zheng zhi zhi du"
        assert details.author == "張治安" and details.author_latin == "Zhang, Zhi'an"
        assert details.responsibility == "張治安著 (Zhang Zhi'an zhu)"
        assert details.edition == "初版 (Chu ban)"
        assert details.publication.startswith("台北市 : 五南圖書出版有限公司, 民國88 [1999] (Taibei Shi")
        assert details.physical == "1, 395, 4 p. : ill. ; 22 cm"
        assert details.isbns == ["957-11-1784-6"]
        assert details.call_number == "DS753 .Z444 1999"
        assert details.subjects and details.copies
        assert details.availability.total == len(details.copies)
        for copy in details.copies:
            assert copy.barcode and copy.location and copy.status and copy.call_number
        assert await record_details(s, 10**9) is None


# ---------------------------------------------------------------------------------------------
# The tokens (no database)


def test_folding() -> None:
    assert fold("Dvořák") == "dvorak"
    assert fold("國際公司理財") == "国际公司理财"
    assert fold("ＡＢＣ　１２３") == "abc 123"
    assert fold("Ærø Łódź Straße") == "aero lodz strasse"
    assert words("Ming dai zheng zhi zhi du /") == "ming dai zheng zhi zhi du"
    assert words("Zhang, Zhi'an.") == "zhang zhian"


def test_tokens() -> None:
    assert text_tokens("明代政治") == ["明", "代", "政", "治", "明代", "代政", "政治"]
    assert "zhian" in text_tokens("Zhang, Zhi'an") and "an" in text_tokens("Zhang, Zhi'an")
    assert {"ye", "xie", "zhen"} <= set(text_tokens("叶震", pinyin=True))  # every reading of a polyphone
    assert {"zhong", "guo"} <= set(text_tokens("Zhongguo", syllables=True))
    title, author, other = document_tokens(
        ["明代政治制度"], ["張治安"], [], isbns=["9571117846"], chinese=True
    )
    assert "政治" in title.split() and "ming" in title.split()
    assert "张治" in author.split()
    assert {"9789571117843", "9571117846"} <= set(other.split())


def test_pinyin_splits() -> None:
    assert pinyin_splits("mingdaizhengzhizhidu") == [["ming", "dai", "zheng", "zhi", "zhi", "du"]]
    assert ["xi", "an"] in pinyin_splits("xian")
    assert pinyin_splits("history") == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_text_makes_a_query_both_databases_accept(text: str) -> None:
    """Whatever a person types, the FTS5 expression and the tsquery are made of quoted tokens only."""
    _, groups = _query_groups(text)
    for g in groups:
        for alternative in g.everything:
            for token in alternative:
                assert token and '"' not in token and "'" not in token and not any(c.isspace() for c in token)
    if groups:
        expression = _fts_expression(groups, title_only=True)
        connection = _fts_connection()
        connection.execute("SELECT rowid FROM t WHERE t MATCH ?", (expression,)).fetchall()
        assert _tsquery(groups).count("(") == _tsquery(groups).count(")")


_CONNECTION: sqlite3.Connection | None = None


def _fts_connection() -> sqlite3.Connection:
    global _CONNECTION
    if _CONNECTION is None:
        _CONNECTION = sqlite3.connect(":memory:")
        _CONNECTION.execute(
            "CREATE VIRTUAL TABLE t USING fts5(search_title, search_author, search_other, tokenize='ascii')"
        )
        _CONNECTION.execute("INSERT INTO t VALUES ('history china 政治', 'zhang', 'x')")
    return _CONNECTION


@in_module_loop
@pytest.mark.skipif(
    not os.environ.get("LIBRARYBOT_TEST_DATABASE_URL"), reason="compares PostgreSQL with SQLite"
)
async def test_the_same_results_on_both_databases(catalog: Database, tmp_path: Path) -> None:
    lite = Database(f"sqlite+aiosqlite:///{tmp_path / 'same.db'}")
    await create_schema(lite)
    await import_demo_catalog(lite, DEMO)
    queries = [
        "history",
        "china",
        "明代政治制度",
        "政治",
        "ming dai",
        "Zhang Zhian",
        "histroy of chna",
        "war",
        "中国 经济",
        "9571117846",
        "Dvorak",
        "smith",
        "the",
        "guo ji",
        "xi an",
        "fa zhan bao gao",
    ]
    try:
        for query in queries:
            assert await numbers(catalog, query, limit=20) == await numbers(lite, query, limit=20), query
    finally:
        await lite.dispose()


async def test_a_typo_that_makes_another_real_word_is_still_corrected(db: Database, tmp_path: Path) -> None:
    # "thie" is a word of the catalog (a rare one) and its frequent neighbours ("the", "this",
    # "then", "they", "tie") outnumber "thief": the title meant is found all the same, first.
    lines = ["title,author", "Horse thief,", "Thie family papers,"]
    lines += [f"{w} {n} {w},Smith" for n in range(3) for w in ("the", "this", "then", "they", "tie", "thin")]
    lines += [f"Horse {w},Doe" for w in ("the", "this", "then", "they", "tie", "thin")]
    path = tmp_path / "typos.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = await import_catalog(db, [path], progress=False)
    assert report.skipped == 0
    async with db.session() as s:
        hits = (await search(s, "horse thie")).hits
        assert hits[0].title == "Horse thief", [h.title for h in hits]
        # A query whose words a record has, as typed, is not second-guessed.
        assert [h.title for h in (await search(s, "thie family")).hits] == ["Thie family papers"]
