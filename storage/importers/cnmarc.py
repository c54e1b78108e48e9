"""The CNMARC (and UNIMARC) mapping: 001, 010 ISBN, 011 ISSN, 100 dates, 101 language, 200 title
and responsibility, 205 edition, 210 publication, 215 physical description, 225/410 series,
606/600/601/607 subjects, 690 Chinese Library Classification, 700–712 names, 905 call number.

CNMARC puts the pinyin of a heading in upper-case subfields (200 ``$A``, 701 ``$A``…): it is indexed
as the record's own romanisation, beside the pinyin pypinyin makes, because the two disagree on
polyphones (one record romanises 叶震 as "Xie Zhen").
"""

from __future__ import annotations

import re

from storage.importers import BibRecord
from storage.importers.marc import BadRecord, DataField, MarcRecord, clean, description_key, isbn_entries
from storage.search import is_chinese_text, issn_form, normalise_isbn


def _texts(f: DataField | None, codes: str, sep: str = " ") -> str:
    return clean(f.text(codes, sep)) if f is not None else ""


def _title(f: DataField, main: str, rest: str) -> str:
    """200 $a (repeated for works without a collective title) with $e other title, $h/$i parts."""
    parts: list[str] = []
    for code, value in f.subfields:
        value = value.strip()
        if not value:
            continue
        if code == main:
            parts.append(("; " if parts else "") + value)
        elif code in rest:
            parts.append((" : " if code.lower() == "e" else ". ") + value)
    return clean("".join(parts))


def _name(f: DataField, latin: bool = False) -> str:
    """A 70X/71X heading: $a entry element, $b rest of the name ($A/$B the pinyin)."""
    a, b = ("A", "B") if latin else ("a", "b")
    entry = f.first(a).strip()
    rest = f.first(b).strip().lstrip(", ")
    if not entry:
        return ""
    return clean(f"{entry}, {rest}" if rest else entry)


def cnmarc_record(record: MarcRecord, source_format: str) -> BibRecord:
    """A CNMARC/UNIMARC record mapped to a BibRecord; BadRecord when it has no title (200 $a)."""
    f200 = record.first("200")
    if f200 is None or not f200.first("a").strip():
        raise BadRecord("no title (200 $a)")
    title = _title(f200, "a", "ehi")
    title_latin = _title(f200, "A", "EHI")
    main = clean(f200.first("a"))
    main_latin = clean(f200.first("A"))
    responsibility = clean(" ; ".join(v.strip() for v in f200.values("fg") if v.strip()))
    responsibility_latin = clean(" ; ".join(v.strip() for v in f200.values("FG") if v.strip()))

    names = record.all("700", "701", "702", "710", "711", "712")
    author = _name(names[0]) if names else ""
    author_latin = _name(names[0], latin=True) if names else ""

    f100 = record.first("100")
    coded = f100.first("a") if f100 else ""
    year = coded[9:13] if len(coded) >= 13 and coded[9:13].isdigit() else ""
    f210 = record.first("210")
    if not year and f210 is not None:
        m = re.search(r"\b(1[0-9]{3}|20[0-9]{2})\b", f210.text("d"))
        year = m.group(1) if m else ""
    f101 = record.first("101")
    language = f101.first("a")[:3] if f101 else ""

    place = _texts(f210, "a")
    publisher = _texts(f210, "c")
    publication = " : ".join(x for x in (place, publisher) if x)
    date = _texts(f210, "d")
    if date:
        publication = f"{publication}, {date}" if publication else date
    f215 = record.first("215")
    physical = " ; ".join(x for x in (_texts(f215, "ac", " : "), _texts(f215, "d")) if x) if f215 else ""
    edition = _texts(record.first("205"), "ab")

    subjects: list[str] = []
    subject_texts: list[str] = []
    for f in record.all("600", "601", "602", "604", "605", "606", "607", "610"):
        heading = clean(f.text("abcdfjxyz", " -- "))
        if heading:
            subjects.append(heading)
            subject_texts.append(heading)
            subject_texts.append(f.text("ABXYZ"))
    series: list[str] = []
    series_texts: list[str] = []
    for f in record.all("225", "410"):
        text = clean(f.text("aehiv"))
        if text and text not in series:
            series.append(text)
            series_texts.extend((text, f.text("A")))

    isbns, isbn_display = isbn_entries([v for f in record.all("010") for v in f.values("a")])
    issns = [v for f in record.all("011") for v in f.values("a") if issn_form(v)]

    clc = record.first("690")
    classification = clc.first("a").strip() if clc else ""
    holding = record.first("905")
    call_number = ""
    if holding is not None:
        call_number = holding.first("s").strip() or "/".join(
            x for x in (holding.first("d"), holding.first("e")) if x
        )
    if not call_number:
        local = record.first("090")
        call_number = (local.first("u") or local.text("ab", "/")) if local else ""
    call_number = call_number or classification

    titles = [title, title_latin, f200.text("A")]
    for f in record.all("500", "510", "512", "517", "532", "540", "541"):
        titles.extend((f.text("aehi"), f.text("AEHI")))
    authors = [responsibility, responsibility_latin]
    shown_names: list[str] = []
    for f in names[:12]:
        name, latin = _name(f), _name(f, latin=True)
        authors.extend((name, latin))
        if name:
            shown_names.append(f"{name} ({latin})" if latin else name)

    control = record.control.get("001", "").strip()
    if control:
        key, keyed_by = control, "control"
    elif isbns and normalise_isbn(isbns[0]):
        key, keyed_by = isbns[0], "isbn"
    else:
        key, keyed_by = description_key(title, author, year, publisher), "description"
    chinese = language in ("chi", "zho") or (not language and is_chinese_text(title))
    details = {
        "title": title,
        "title_latin": title_latin,
        "responsibility": responsibility,
        "responsibility_latin": responsibility_latin,
        "author": author,
        "author_latin": author_latin,
        "names": shown_names,
        "edition": edition,
        "publication": publication,
        "physical": physical,
        "subjects": subjects,
        "series": series,
        "isbns": isbn_display,
        "issns": issns,
        "call_number": call_number,
        "classification": classification,
        "language": language,
        "format": source_format,
    }
    return BibRecord(
        key=key,
        keyed_by=keyed_by,
        title=title,
        title_latin=title_latin,
        author=author,
        year=year,
        language=language,
        call_number=call_number,
        isbns=isbns,
        issns=issns,
        details={k: v for k, v in details.items() if v},
        titles=[t for t in titles if t],
        authors=[a for a in authors if a],
        others=subject_texts + [publisher, place],
        romanised_others=series_texts,
        codes=[c for c in (control, call_number, classification) if c],
        title_forms=[t for t in (main, main_latin, title, title_latin) if t],
        author_forms=[a for a in (author, author_latin) if a],
        chinese=chinese,
        source_format=source_format,
    )
