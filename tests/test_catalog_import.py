"""Catalog import: real MARC 21 (binary, XML, MARC-8, UTF-8), CNMARC, CSV and broken files; the
idempotent upsert, whole records only, the demo's copies, and looking records up by any key."""

from __future__ import annotations

import gzip
import itertools
import random
from pathlib import Path

import pymarc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from storage.catalog import ON_SHELF, Item, Record, RecordIdentifier, availability, find_record
from storage.catalog_import import (
    CatalogImportError,
    ImportReport,
    _flush,
    _Pending,
    detect_format,
    import_catalog,
    import_demo_catalog,
    prepare,
    read_file,
    record_row,
    seed_demo_items,
)
from storage.db import Database
from storage.importers import Skip
from storage.importers.marc import BadRecord, parse_binary, read_xml
from storage.search import SearchTerm

DEMO = Path(__file__).resolve().parents[1] / "bot" / "demo_data"
CHINESE_SLICE = DEMO / "loc-books-chinese-slice.mrc"
SAMPLE = DEMO / "loc-books-sample-1000.mrc"  # the same bytes as shared/data/catalog/…
CNMARC = DEMO / "cnmarc-sru-sample-10.xml"
BROKEN = Path(__file__).resolve().parent / "data" / "broken"  # pymarc's test files


async def count(db: Database, model: type) -> int:
    async with db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def record(db: Database, control_number: str) -> Record:
    async with db.session() as s:
        found = await s.scalar(select(Record).where(Record.control_number == control_number))
    assert found is not None, control_number
    return found


async def test_sample_imports_completely_and_a_rerun_changes_nothing(db: Database) -> None:
    sample = SAMPLE
    first = await import_catalog(db, [sample], progress=False)
    assert (first.imported, first.updated, first.unchanged, first.skipped) == (1000, 0, 0, 0)
    assert first.lines()[0].startswith("imported 1000, updated 0, unchanged 0, skipped 0")
    async with db.session() as s:
        before = {
            r.control_number: (r.source_hash, r.updated_at)
            for r in (await s.execute(select(Record))).scalars()
        }
        vocabulary = dict((await s.execute(select(SearchTerm.term, SearchTerm.df))).all())
        identifiers = await s.scalar(select(func.count()).select_from(RecordIdentifier))

    again = await import_catalog(db, [sample], progress=False)
    assert (again.imported, again.updated, again.unchanged, again.skipped) == (0, 0, 1000, 0)
    async with db.session() as s:
        after = {
            r.control_number: (r.source_hash, r.updated_at)
            for r in (await s.execute(select(Record))).scalars()
        }
        assert dict((await s.execute(select(SearchTerm.term, SearchTerm.df))).all()) == vocabulary
        assert await s.scalar(select(func.count()).select_from(RecordIdentifier)) == identifiers
    assert after == before  # not even a timestamp moved


async def test_original_script_fields_are_linked_and_shown_first(db: Database) -> None:
    report = await import_catalog(db, [CHINESE_SLICE], progress=False)
    assert report.imported == 1006 and report.skipped == 0

    ming = await record(db, "00049916")
    assert ming.title == "明代政治制度"  # 880 linked to 245, original script first
    assert ming.title_latin == "Ming dai zheng zhi zhi du"
    assert ming.author == "張治安"
    assert ming.details["author_latin"] == "Zhang, Zhi'an"
    assert ming.details["responsibility"] == "張治安著"  # catalogued in 880 $b after "/": not title
    assert ming.details["publication"] == "台北市 : 五南圖書出版有限公司, 民國88 [1999]"
    assert ming.details["publication_latin"].startswith("Taibei Shi : Wu nan tu shu chu ban you xian gong si")
    assert ming.details["edition"] == "初版"
    assert ming.year == "1999" and ming.language == "chi"
    assert ming.isbns == ["9789571117843"]
    assert ming.call_number == "DS753 .Z444 1999"
    assert "China -- History -- Ming dynasty, 1368-1644" in ming.details["subjects"]

    finance = await record(db, "00049917")
    assert finance.title == "國際公司理財 = International finance"
    assert finance.details["responsibility"] == "王碩豪主編 ; 陸繼雄審訂"
    assert finance.details["series"] == [
        "國際工程管理系列叢書 ; 8 (Guo ji gong cheng guan li xi lie cong shu ; 8)"
    ]


async def test_cnmarc_sru_response(db: Database) -> None:
    path = CNMARC
    assert detect_format(path) == "cnmarc"
    report = await import_catalog(db, [path], progress=False)
    assert (report.imported, report.skipped) == (10, 0)
    first = await record(db, "990002180740203961")
    assert first.title == "'94中国发展报告"
    assert first.title_latin == "'94Zhong Guo Fa Zhan Bao Gao"
    assert first.author == "叶震"
    assert first.isbns == ["9787503717444"]
    assert first.year == "1994" and first.language == "chi"
    assert first.call_number == "F124/26"
    assert first.details["classification"] == "F124"
    assert first.details["subjects"] == ["经济发展 -- 概况 -- 中国 -- 1994"]
    assert first.details["publication"] == "北京 : 中国统计出版社, 1994"
    assert "叶震 (Xie Zhen)" in first.details["names"]  # the record's own (wrong) romanisation, kept


async def test_broken_files_never_abort_and_say_why(db: Database) -> None:
    broken = sorted(
        p for p in BROKEN.iterdir() if not p.name.startswith("LICENSE")
    )
    report = await import_catalog(db, broken, progress=False)
    reasons = {(source, position): reason for source, position, reason in report.skips}
    assert reasons[("bad_records.mrc", 2)] == "base address in the leader exceeds the record"
    assert reasons[("bad_records.mrc", 4)] == "invalid directory"
    assert reasons[("bad_records.mrc", 9)] == "record is shorter than its leader says"
    assert {p for s, p in reasons if s == "1251.dat"} == {
        1,
        2,
        3,
        4,
        5,
        6,
    }  # cp1251 is neither MARC-8 nor UTF-8
    assert all(r == "text is neither MARC-8 nor UTF-8" for (s, _), r in reasons.items() if s == "1251.dat")
    assert report.imported >= 9  # every readable record is in
    for line in report.lines()[1:]:
        assert line.startswith("skipped ") and " record " in line
    asimov = await record(db, "IT\\ICCU\\ANA\\0019370")  # binary UNIMARC, recognised by its fields
    assert asimov.title == "L'altra faccia della spirale"  # the non-sorting marks are gone
    assert asimov.author == "Asimov, Isaac"
    marc8 = await record(db, "17091269")  # a MARC-8 record: diacritics decoded
    assert marc8.title.startswith("Amateur media")


def _utf8_record(leader_coding: str) -> bytes:
    rec = pymarc.Record(force_utf8=True)
    rec.add_field(pymarc.Field(tag="001", data="lies-1"))
    rec.add_field(
        pymarc.Field(
            tag="245",
            indicators=pymarc.Indicators("1", "0"),
            subfields=[pymarc.Subfield("a", "Dvořák : Život a dílo /"), pymarc.Subfield("c", "Šourek.")],
        )
    )
    data = bytearray(rec.as_marc())
    data[9] = ord(leader_coding)
    return bytes(data)


def test_a_leader_that_says_marc8_on_utf8_data_is_read_as_utf8() -> None:
    parsed = parse_binary(_utf8_record(" "))
    assert parsed.first("245").first("a") == "Dvořák : Život a dílo /"
    assert parse_binary(_utf8_record("a")).first("245").first("c") == "Šourek."


def test_invalid_utf8_is_a_skip_with_a_reason() -> None:
    data = _utf8_record("a").replace("ř".encode(), b"\xff\xfe")
    with pytest.raises(BadRecord, match="invalid UTF-8"):
        parse_binary(data)


async def test_marcxml_and_gzip(db: Database, tmp_path: Path) -> None:
    sample = SAMPLE
    with sample.open("rb") as f:
        records = [r for _, r in zip(range(20), pymarc.MARCReader(f, to_unicode=True), strict=False)]
    xml = tmp_path / "export.xml"
    xml.write_bytes(
        b"".join([pymarc.record_to_xml(r, namespace=True) for r in records]).join(
            [
                b'<?xml version="1.0" encoding="UTF-8"?><collection xmlns="http://www.loc.gov/MARC21/slim">',
                b"</collection>",
            ]
        )
    )
    assert detect_format(xml) == "marcxml"
    report = await import_catalog(db, [xml], progress=False)
    assert (report.imported, report.skipped) == (20, 0)
    compressed = tmp_path / "export.mrc.gz"
    compressed.write_bytes(gzip.compress(sample.read_bytes()))
    assert detect_format(compressed) == "marc21"
    report = await import_catalog(db, [compressed], progress=False)
    assert report.imported == 980 and report.updated == 20  # same records, now from binary MARC
    assert await count(db, Record) == 1000


async def test_xml_that_is_not_well_formed_ends_with_one_skip(db: Database, tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(
        '<collection xmlns="http://www.loc.gov/MARC21/slim"><record><leader>00000nam a2200000 a 4500</leader>'
        '<controlfield tag="001">x1</controlfield><datafield tag="245" ind1="0" ind2="0">'
        '<subfield code="a">First</subfield></datafield></record><record><leader>',
        encoding="utf-8",
    )
    report = await import_catalog(db, [bad], progress=False)
    assert report.imported == 1
    assert report.skips[0][0] == "bad.xml" and "not well-formed" in report.skips[0][2]


async def test_csv(db: Database, tmp_path: Path) -> None:
    path = tmp_path / "list.csv"
    path.write_text(
        "title,author,isbn,publisher,year,subjects,call_number,language\n"
        "明代政治制度,張治安,957-11-1784-6,五南圖書,1999,明代;政治制度,K248.2/12,chi\n"
        ",Nobody,,,,,,\n"
        'Field guide to birds,"Peterson, Roger Tory",,Houghton Mifflin,1980,Birds,QL681 .P45,eng\n',
        encoding="utf-8",
    )
    assert detect_format(path) == "csv"
    report = await import_catalog(db, [path], progress=False)
    assert (report.imported, report.skipped) == (2, 1)
    assert report.skips == [("list.csv", 3, "no title")]
    again = await import_catalog(db, [path], progress=False)
    assert (again.imported, again.updated, again.unchanged) == (0, 0, 2)
    async with db.session() as s:
        ming = await find_record(s, "9571117846")
        assert ming is not None and ming.control_number == "9789571117843"  # keyed by its ISBN
        assert ming.call_number == "K248.2/12" and ming.details["subjects"] == ["明代", "政治制度"]
        birds = await find_record(s, "Field guide to birds")
        assert birds is None  # not a key; a description key is made for it instead
        assert (
            await s.scalar(
                select(func.count()).select_from(Record).where(Record.control_number.like("desc:%"))
            )
            == 1
        )


async def test_a_csv_row_keyed_by_isbn_updates_the_record_with_that_isbn(
    db: Database, tmp_path: Path
) -> None:
    await import_catalog(db, [CHINESE_SLICE], progress=False)
    path = tmp_path / "fix.csv"
    path.write_text(
        "title,author,isbn,call_number\n明代政治制度,張治安,978-957-11-1784-3,K248.2/Z1\n", encoding="utf-8"
    )
    report = await import_catalog(db, [path], progress=False)
    assert (report.imported, report.updated) == (0, 1)
    ming = await record(db, "00049916")  # keeps its control number
    assert ming.call_number == "K248.2/Z1"
    assert await count(db, Record) == 1006


async def test_errors_for_the_whole_command(db: Database, tmp_path: Path) -> None:
    with pytest.raises(CatalogImportError, match=r"nope\.mrc: no such file"):
        await import_catalog(db, [tmp_path / "nope.mrc"], progress=False)
    with pytest.raises(CatalogImportError, match="unknown format 'ris'"):
        await import_catalog(db, [CHINESE_SLICE], fmt="ris", progress=False)
    junk = tmp_path / "notes.txt"
    junk.write_text("just some notes\n", encoding="utf-8")
    with pytest.raises(CatalogImportError, match="not a catalog format"):
        await import_catalog(db, [junk], progress=False)
    with pytest.raises(CatalogImportError, match="is a directory"):
        await import_catalog(db, [tmp_path], progress=False)
    for exc in (CatalogImportError("x"),):
        assert "\n" not in str(exc)
    assert await count(db, Record) == 0


async def test_a_record_the_database_refuses_is_skipped_whole(db: Database) -> None:
    good = [
        prepare("slice.mrc", position, item)
        for position, item in itertools.islice(read_file(CHINESE_SLICE), 3)
    ]
    assert all(isinstance(p, _Pending) for p in good)
    bad = good[1]
    assert isinstance(bad, _Pending)
    bad.row["title"] = None  # NOT NULL: the database refuses this one, and only this one
    report = ImportReport()
    await _flush(db, list(good), report)  # type: ignore[arg-type]
    assert report.imported == 2
    assert [(s, p) for s, p, _ in report.skips] == [("slice.mrc", 2)]
    assert report.skips[0][2].startswith("refused by the database")
    async with db.session() as s:
        numbers = set((await s.execute(select(Record.control_number))).scalars())
        assert bad.row["control_number"] not in numbers and len(numbers) == 2
        stored = await s.scalar(select(func.count()).select_from(RecordIdentifier))
    assert stored == sum(len(p.identifiers) for p in good if p is not bad)  # type: ignore[union-attr]


async def test_parallel_parsing_stores_the_same_records(db: Database, tmp_path: Path) -> None:
    report = await import_catalog(db, [CHINESE_SLICE], progress=False, workers=2)
    assert report.imported == 1006
    async with db.session() as s:
        stored = dict((await s.execute(select(Record.control_number, Record.source_hash))).all())
    expected = {
        item.row["control_number"]: item.row["source_hash"]
        for position, raw in read_file(CHINESE_SLICE)
        if isinstance(item := prepare("x", position, raw), _Pending)
    }
    assert stored == expected


async def test_demo_catalog_and_copies(db: Database) -> None:
    report = await import_demo_catalog(db, DEMO)
    assert report.skipped == 0 and report.imported > 2000
    async with db.session() as s:
        made = await seed_demo_items(s, random.Random(1))
    assert made > 2000
    async with db.session() as s:
        assert await seed_demo_items(s, random.Random(1)) == 0  # every record has its copies already
        ming = await find_record(s, "978-957-11-1784-3")
        assert ming is not None
        copies = (await s.execute(select(Item).where(Item.record_id == ming.id))).scalars().all()
        assert copies and all(c.location and c.call_number == "DS753 .Z444 1999" for c in copies)
        assert {c.status for c in (await s.execute(select(Item))).scalars()} <= {
            ON_SHELF,
            "in_repair",
            "missing",
            "in_transit",
        }
        ids = list((await s.execute(select(Record.id).limit(200))).scalars())
        summary = await availability(s, ids)
        assert set(summary) == set(ids)
        assert any(a.holdable for a in summary.values()) and any(a.on_shelf for a in summary.values())
        for a in summary.values():
            assert 0 <= a.on_shelf <= a.total and a.location


async def test_find_record_by_any_key(db: Database) -> None:
    await import_catalog(db, [CHINESE_SLICE], progress=False)
    async with db.session() as s:
        for key in (
            "00049916",
            "9571117846",
            "957-11-1784-6",
            "978-957-11-1784-3",
            "9789571117843",
            " 9571117846 ",
        ):
            found = await find_record(s, key)
            assert found is not None and found.title == "明代政治制度", key
        assert await find_record(s, "0000000000") is None
        assert await find_record(s, "") is None
        assert await find_record(s, "x" * 500) is None


def test_record_rows_are_deterministic() -> None:
    rows = [record_row(item) for _, item in read_file(CHINESE_SLICE) if not isinstance(item, Skip)]
    again = [record_row(item) for _, item in read_file(CHINESE_SLICE) if not isinstance(item, Skip)]
    assert [r["source_hash"] for r in rows] == [r["source_hash"] for r in again]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_any_bytes_are_a_record_or_a_reason(data: bytes) -> None:
    try:
        parse_binary(data)
    except BadRecord as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_xml_never_raise(data: bytes) -> None:
    import io

    for item in read_xml(io.BytesIO(b"<collection>" + data)):
        assert item is not None
