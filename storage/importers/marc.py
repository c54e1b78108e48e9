"""MARC records from files (ISO 2709 binary with pymarc, MARCXML and CNMARC XML with a streaming XML
parser) into one plain structure, and the MARC 21 mapping to :class:`BibRecord`.

Binary files are split on the record terminator (0x1D) rather than trusted record lengths, so one
record with a wrong length costs that record only. Text is decoded per record: UTF-8 when the leader
says so, MARC-8 otherwise, and UTF-8 anyway when a MARC-8 leader sits on UTF-8 data (the
``force_utf8`` fallback for leaders that lie); a record that is neither is skipped with its reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import unicodedata
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Protocol

import pymarc
from pymarc.marc8 import marc8_to_unicode

from storage.importers import BibRecord, Skip
from storage.search import is_chinese_text, isbn_forms, issn_form, normalise_isbn, words

END_OF_RECORD = b"\x1d"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # control characters, incl. the NSB/NSE non-sorting marks
_TEXT_SUBFIELDS_SKIPPED = set("0123456789")  # $6 linkage, $0/$1 URIs, $2 sources, $5, $8 …


@dataclass
class DataField:
    tag: str
    ind1: str
    ind2: str
    subfields: list[tuple[str, str]]

    def first(self, code: str) -> str:
        """The first subfield ``code`` ("" when there is none)."""
        for c, v in self.subfields:
            if c == code:
                return v
        return ""

    def values(self, codes: str) -> list[str]:
        return [v for c, v in self.subfields if c in codes]

    def text(self, codes: str, sep: str = " ") -> str:
        """The subfields in ``codes``, in field order, joined by ``sep`` (no space before a comma)."""
        out = ""
        for c, v in self.subfields:
            v = v.strip()
            if c not in codes or not v:
                continue
            out += v if not out else (v if v[0] in ",;" and sep == " " else sep + v)
        return out


@dataclass
class MarcRecord:
    """A MARC record of any flavour: leader, control fields (first occurrence) and data fields."""

    leader: str = ""
    control: dict[str, str] = field(default_factory=dict)
    fields: list[DataField] = field(default_factory=list)

    def all(self, *tags: str) -> list[DataField]:
        return [f for f in self.fields if f.tag in tags]

    def first(self, *tags: str) -> DataField | None:
        for f in self.fields:
            if f.tag in tags:
                return f
        return None

    def has(self, tag: str) -> bool:
        return any(f.tag == tag for f in self.fields)


class BadRecord(ValueError):
    """A record that cannot be read; the message says why, for the import report."""


# ---------------------------------------------------------------------------------------------
# Binary ISO 2709
# ---------------------------------------------------------------------------------------------


class Readable(Protocol):
    """A binary stream: a file, a gzip file, BytesIO."""

    def read(self, size: int = -1, /) -> bytes: ...


def split_records(stream: Readable, block: int = 1 << 20) -> Iterator[bytes]:
    """The records of a binary MARC stream, each ending with 0x1D (a trailing piece without one is
    yielded as it is, and fails to parse)."""
    rest = b""
    while True:
        data = stream.read(block)
        if not data:
            break
        rest += data
        pieces = rest.split(END_OF_RECORD)
        rest = pieces.pop()
        for piece in pieces:
            piece = piece.lstrip(b"\r\n\t ")
            if piece:
                yield piece + END_OF_RECORD
    rest = rest.strip()
    if rest:
        yield rest


def _describe(exc: BaseException) -> str:
    names = {
        "BaseAddressInvalid": "base address in the leader exceeds the record",
        "BaseAddressNotFound": "no base address in the leader",
        "RecordDirectoryInvalid": "invalid directory",
        "RecordLeaderInvalid": "invalid leader",
        "TruncatedRecord": "record is shorter than its leader says",
        "NoFieldsFound": "record has no fields",
        "EndOfRecordNotFound": "no end-of-record mark",
    }
    name = type(exc).__name__
    if name in names:
        return names[name]
    if isinstance(exc, UnicodeDecodeError):
        return "leader or directory is not ASCII"
    if isinstance(exc, ValueError):
        return "invalid number in the leader or directory"
    return f"unreadable record ({name})"


def _marc8(data: bytes) -> str:
    """MARC-8 bytes as text; BadRecord when they hold characters MARC-8 does not have."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink):  # pymarc reports bad characters on stderr
            text = marc8_to_unicode(data, hide_utf8_warnings=False)
    except (UnicodeDecodeError, IndexError, TypeError, KeyError) as exc:
        raise BadRecord("text is neither MARC-8 nor UTF-8") from exc
    if sink.getvalue():
        raise BadRecord("text is neither MARC-8 nor UTF-8")
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def _ascii(data: bytes) -> str:
    return _CONTROL.sub("", data.decode("ascii"))


def _utf8(data: bytes) -> str:
    text = data.decode("utf-8")
    return _CONTROL.sub("", unicodedata.normalize("NFC", text)) if not text.isascii() else text


def parse_binary(chunk: bytes) -> MarcRecord:
    """One ISO 2709 record, decoded; BadRecord (with the reason) when it cannot be read."""
    if len(chunk) < 25:
        raise BadRecord("record too short to be MARC")
    if not chunk[:5].isdigit():
        raise BadRecord("record length in the leader is not a number")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = pymarc.Record(chunk, to_unicode=False)
    except Exception as exc:  # pymarc raises many kinds; every one means this record is unreadable
        raise BadRecord(_describe(exc)) from exc
    leader = str(raw.leader)
    pieces: list[bytes] = []
    for f in raw.fields:
        if f.control_field:
            pieces.append(f.data if isinstance(f.data, bytes) else str(f.data).encode())
        else:
            pieces.extend(
                s.value if isinstance(s.value, bytes) else str(s.value).encode() for s in f.subfields
            )
    everything = b"\x1f".join(pieces)
    decode: Callable[[bytes], str]
    if everything.isascii():
        decode = _ascii
    else:
        utf8_ok = True
        try:
            everything.decode("utf-8")
        except UnicodeDecodeError:
            utf8_ok = False
        if utf8_ok:  # the leader says UTF-8, or it says MARC-8 but the data is UTF-8 (force_utf8)
            decode = _utf8
        elif leader[9:10] == "a":
            try:
                _marc8(everything)  # a leader claiming UTF-8 on MARC-8 data
            except BadRecord:
                raise BadRecord("invalid UTF-8") from None
            decode = _marc8
        else:
            decode = _marc8
    record = MarcRecord(leader=leader)
    for f in raw.fields:
        if f.control_field:
            data = f.data if isinstance(f.data, bytes) else str(f.data).encode()
            record.control.setdefault(f.tag, data.decode("utf-8", "replace"))
        else:
            subfields = [
                (s.code, decode(s.value if isinstance(s.value, bytes) else str(s.value).encode()))
                for s in f.subfields
            ]
            record.fields.append(DataField(f.tag, f.indicator1 or " ", f.indicator2 or " ", subfields))
    return record


def read_binary(stream: Readable) -> Iterator[MarcRecord | Skip]:
    """The records of a binary MARC file, or the reason each unreadable one was skipped."""
    pymarc_log = logging.getLogger("pymarc")
    level = pymarc_log.level
    pymarc_log.setLevel(logging.ERROR)  # "missing indicators" and the like: the record is still read
    try:
        for position, chunk in enumerate(split_records(stream), start=1):
            try:
                yield parse_binary(chunk)
            except BadRecord as exc:
                yield Skip(position, str(exc))
    finally:
        pymarc_log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# XML: MARCXML, CNMARC XML, SRU responses
# ---------------------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _element_record(elem: ET.Element) -> MarcRecord:
    record = MarcRecord()
    for child in elem:
        name = _local(child.tag)
        if name == "leader":
            record.leader = (child.text or "").strip("\n")
        elif name == "controlfield":
            record.control.setdefault(child.get("tag", ""), child.text or "")
        elif name == "datafield":
            subfields = [
                (s.get("code", "") or " ", s.text or "") for s in child if _local(s.tag) == "subfield"
            ]
            record.fields.append(
                DataField(
                    child.get("tag", ""),
                    (child.get("ind1") or " ")[:1],
                    (child.get("ind2") or " ")[:1],
                    subfields,
                )
            )
    return record


def read_xml(stream: IO[bytes]) -> Iterator[MarcRecord | Skip]:
    """The MARC records of an XML file (MARCXML collection, CNMARC XML, an SRU response, also with
    string-packed records). XML that is not well-formed ends the file with one skip line."""
    position = 0
    try:
        for _event, elem in ET.iterparse(stream, events=("end",)):
            name = _local(elem.tag)
            if name == "record" and any(
                _local(c.tag) in ("leader", "controlfield", "datafield") for c in elem
            ):
                position += 1
                yield _element_record(elem)
                elem.clear()
            elif name == "recordData" and len(elem) == 0 and "<" in (elem.text or ""):
                try:  # SRU recordPacking "string": the record is escaped text
                    inner = ET.fromstring((elem.text or "").strip())
                except ET.ParseError:
                    position += 1
                    yield Skip(position, "record in the SRU response is not well-formed XML")
                    continue
                for rec in inner.iter():
                    if _local(rec.tag) == "record":
                        position += 1
                        yield _element_record(rec)
                        break
    except ET.ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        yield Skip(
            position + 1,
            f"XML is not well-formed at line {line}, column {column}; the rest of the file was not read",
        )


# ---------------------------------------------------------------------------------------------
# MARC 21 mapping
# ---------------------------------------------------------------------------------------------

_ISBN_VALUE = re.compile(r"^([0-9Xx][0-9Xx\- ]{8,16}[0-9Xx])\s*(.*)$")
_TRAILING = re.compile(r"[\s/:;,=+]+$")


def clean(text: str) -> str:
    """A heading without its ISBD punctuation: "Ming dai zheng zhi zhi du /" → "Ming dai zheng zhi zhi du"."""
    text = " ".join(text.split())
    text = _TRAILING.sub("", text)
    if (
        text.endswith(".")
        and not text.endswith("..")
        and not re.search(r"(\b\w|\s[A-Z][a-z]?|\b[A-Z]\.\w)\.$", text)
    ):
        text = text[:-1].rstrip()
    return _TRAILING.sub("", text)


def _linked(record: MarcRecord) -> dict[tuple[str, str], DataField]:
    """880 fields by (tag, occurrence) of the romanised field they go with ("245", "02")."""
    out: dict[tuple[str, str], DataField] = {}
    for f in record.all("880"):
        link = f.first("6")
        if len(link) >= 3:
            out.setdefault((link[:3], link[4:6] if link[3:4] == "-" else ""), f)
    return out


def _original(f: DataField, linked: dict[tuple[str, str], DataField]) -> DataField | None:
    link = f.first("6")
    if link.startswith("880-") and len(link) >= 6:
        return linked.get((f.tag, link[4:6]))
    return None


def _pair(
    f: DataField | None, linked: dict[tuple[str, str], DataField], codes: str, sep: str = " "
) -> tuple[str, str]:
    """(original script, romanised) texts of a field; the first is "" when there is no 880."""
    if f is None:
        return "", ""
    latin = clean(f.text(codes, sep))
    orig = _original(f, linked)
    return (clean(orig.text(codes, sep)) if orig is not None else ""), latin


def _title_statement(f: DataField) -> tuple[str, str]:
    """(title, statement of responsibility) of a 245: $a $b $n $p until a subfield ends with "/",
    which ISBD puts before the responsibility (some records carry it in $b instead of $c)."""
    title: list[str] = []
    responsibility: list[str] = []
    target = title
    for code, value in f.subfields:
        value = value.strip()
        if not value:
            continue
        if code == "c" or (target is responsibility and code not in "6"):
            responsibility.append(value)
        elif code in "abnp" and target is title:
            head, slash, tail = value.partition(" / ")
            if slash and code != "a":  # "International finance / Wang Shuohao zhu bian" in one $b
                title.append(head)
                responsibility.append(tail)
                target = responsibility
                continue
            title.append(value)
            if value.endswith("/"):
                target = responsibility
    return clean(" ".join(title)), clean(" ".join(responsibility))


def _heading(f: DataField, codes: str = "abcdtvxyz") -> str:
    parts: list[str] = []
    for c, v in f.subfields:
        if c not in codes or not v.strip():
            continue
        v = clean(v)
        if parts and c in "vxyz":
            parts.append("-- " + v)
        else:
            parts.append(v)
    return " ".join(parts)


def _year(*texts: str) -> str:
    for text in texts:
        m = re.search(r"\b(1[0-9]{3}|20[0-9]{2})\b", text or "")
        if m:
            return m.group(1)
    return ""


def isbn_entries(values: list[str]) -> tuple[list[str], list[str]]:
    """(normalised ISBN-13s, ISBNs as written with their qualifiers) of 020 $a / 010 $a values."""
    normalised: list[str] = []
    shown: list[str] = []
    for value in values:
        m = _ISBN_VALUE.match(value.strip())
        if not m:
            continue
        code, qualifier = m.group(1).strip(), m.group(2).strip()
        forms = isbn_forms(code)
        if not forms:
            continue
        normalised.append(forms[0])
        shown.append(f"{code} {qualifier}".strip())
    return list(dict.fromkeys(normalised)), list(dict.fromkeys(shown))


def description_key(title: str, author: str, year: str, publisher: str) -> str:
    """A stable key for a record with neither control number nor ISBN, from its description."""
    digest = hashlib.sha1(
        "\x1f".join(words(x) for x in (title, author, year, publisher)).encode()
    ).hexdigest()
    return "desc:" + digest[:20]


def marc21_record(record: MarcRecord, source_format: str) -> BibRecord:
    """A MARC 21 record mapped to a BibRecord; BadRecord when it has no title."""
    linked = _linked(record)
    f245 = record.first("245")
    if f245 is None:
        raise BadRecord("no title (245)")
    title_latin, resp_latin = _title_statement(f245)
    orig245 = _original(f245, linked)
    title_orig, resp_orig = _title_statement(orig245) if orig245 is not None else ("", "")
    main_orig, main_latin = _pair(f245, linked, "a")
    if not (title_orig or title_latin):
        raise BadRecord("empty title (245)")

    author_field = record.first("100", "110", "111")
    author_codes = "abcdq"
    author_orig, author_latin = _pair(author_field, linked, author_codes)
    added = record.all("700", "710", "711")
    if not author_orig and not author_latin and added:
        author_orig, author_latin = _pair(added[0], linked, author_codes)

    edition_orig, edition_latin = _pair(record.first("250"), linked, "ab")
    pub_field = record.first("260") or next((f for f in record.all("264") if f.ind2 in ("1", " ")), None)
    pub_orig, pub_latin = _pair(pub_field, linked, "abc")
    publisher_orig, publisher_latin = _pair(pub_field, linked, "b")

    date008 = record.control.get("008", "")
    year = date008[7:11] if len(date008) >= 11 and date008[7:11].isdigit() else ""
    if not year and pub_field is not None:
        year = _year(pub_field.text("c"))
    language = date008[35:38].strip() if len(date008) >= 38 else ""
    if not language or not language.isalpha():
        f041 = record.first("041")
        language = f041.first("a")[:3] if f041 else ""

    f300 = record.first("300")
    physical = clean(f300.text("abce")) if f300 is not None else ""

    subjects: list[str] = []
    subject_texts: list[str] = []
    for f in record.all("600", "610", "611", "630", "648", "650", "651", "653", "655"):
        heading = _heading(f)
        orig = _original(f, linked)
        if heading:
            subjects.append(_heading(orig) + f" ({heading})" if orig is not None else heading)
            subject_texts.append(heading)
            if orig is not None:
                subject_texts.append(_heading(orig))

    series: list[str] = []
    series_texts: list[str] = []
    seen_series: set[str] = set()
    for f in record.all("490", "440", "800", "810", "811", "830"):
        series_orig, series_latin = _pair(
            f, linked, "atv" if f.tag in ("440", "490", "830") else "abcdqtv", " "
        )
        if series_latin and series_latin not in seen_series:
            seen_series.add(series_latin)
            series.append(f"{series_orig} ({series_latin})" if series_orig else series_latin)
            series_texts.extend(x for x in (series_orig, series_latin) if x)

    isbns, isbn_display = isbn_entries([v for f in record.all("020") for v in f.values("a")])
    issns = [v for f in record.all("022") for v in f.values("a") if issn_form(v)]
    f010 = record.first("010")
    lccn = "".join(f010.first("a").split()) if f010 is not None else ""

    call_field = record.first("050", "090", "099", "055", "060", "082", "084")
    call_number = call_field.text("ab") if call_field is not None else ""
    code_values = [record.control.get("001", "").strip(), lccn] + [
        f.text("ab") for f in record.all("050", "055", "060", "082", "084", "090", "099")
    ]

    titles = [title_orig, title_latin]
    for f in record.all("246", "240", "130", "730", "740"):
        titles.extend(_pair(f, linked, "abnp"))
    authors = [author_orig, author_latin, resp_orig, resp_latin]
    names: list[str] = []
    for f in added[:12]:
        name_orig, name_latin = _pair(f, linked, author_codes)
        authors.extend((name_orig, name_latin))
        if name_latin:
            names.append(f"{name_orig} ({name_latin})" if name_orig else name_latin)

    chinese = language in ("chi", "zho") or (not language and is_chinese_text(title_orig))
    display_title = title_orig or title_latin
    display_author = author_orig or author_latin

    control = record.control.get("001", "").strip()
    if control:
        key, keyed_by = control, "control"
    elif isbns and normalise_isbn(isbns[0]):
        key, keyed_by = isbns[0], "isbn"
    else:
        key, keyed_by = description_key(title_latin, author_latin, year, publisher_latin), "description"

    details = {
        "title": display_title,
        "title_latin": title_latin if title_orig else "",
        "responsibility": resp_orig or resp_latin,
        "responsibility_latin": resp_latin if resp_orig else "",
        "author": display_author,
        "author_latin": author_latin if author_orig else "",
        "names": names,
        "edition": edition_orig or edition_latin,
        "edition_latin": edition_latin if edition_orig else "",
        "publication": pub_orig or pub_latin,
        "publication_latin": pub_latin if pub_orig else "",
        "physical": physical,
        "subjects": subjects,
        "series": series,
        "isbns": isbn_display,
        "issns": issns,
        "call_number": call_number,
        "language": language,
        "format": source_format,
    }
    author_forms = [a for a in (author_orig, author_latin) if a]
    if author_field is not None and author_field.tag == "100" and "," in author_latin:
        surname, _, forename = author_latin.partition(",")
        author_forms.append(f"{forename.strip()} {surname.strip()}")
    return BibRecord(
        key=key,
        keyed_by=keyed_by,
        title=display_title,
        title_latin=title_latin if title_orig else "",
        author=display_author,
        year=year,
        language=language,
        call_number=call_number,
        isbns=isbns,
        issns=issns,
        lccn=lccn,
        details={k: v for k, v in details.items() if v},
        titles=[t for t in titles if t],
        authors=[a for a in authors if a],
        others=subject_texts + [publisher_orig],
        romanised_others=series_texts + [publisher_latin],
        codes=[c for c in code_values if c],
        title_forms=[t for t in (main_orig, main_latin, title_orig, title_latin) if t],
        author_forms=author_forms,
        chinese=chinese,
        source_format=source_format,
    )
