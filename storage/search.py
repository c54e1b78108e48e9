"""Catalog search: the text folding and tokens shared by the index and the queries, the index inside
the database, and the search itself.

How it works, in three steps:

1. **Tokens, made in Python.** Every record gets three token strings (title, author, everything
   else), made by :func:`document_tokens`: text is folded (NFKC, traditional → simplified Chinese
   with OpenCC, case and diacritics removed), Latin-script words become tokens, runs of CJK
   characters become their characters and character pairs (so that every two-character word of a
   title is a token), Chinese text also yields its pinyin syllables (pypinyin) and romanised words
   of Chinese records are split into syllables ("Zhongguo" → "zhong guo"); ISBNs yield both their
   ISBN-13 and ISBN-10 forms. A query is tokenised the same way.
2. **Candidates, from the database.** The token strings are indexed by the database: an FTS5 table
   with the ``ascii`` tokenizer on SQLite (it splits on the spaces we put and nothing else), GIN
   indexes over ``array_to_tsvector`` of the same strings on PostgreSQL (no parser involved). Both
   answer the same boolean questions ("the title has all these tokens", "the record has all these
   tokens", and when nothing matches, "all but one of them") and candidates are ordered by the
   length of their title, then id, never by a database-specific rank, so both databases find the
   same records.
   Typos are corrected against the catalog's own vocabulary (table ``search_terms``), pinyin typed
   without spaces is split into syllables, very common words are left to the reranking.
3. **Reranking, in Python.** Exact titles first, then the query as a phrase in a title or an author,
   then every word in the title, then every word in the record, then the rest; within a class,
   rapidfuzz similarity of the query to the title decides.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import opencc
from pypinyin import Style, lazy_pinyin
from pypinyin.pinyin_dict import pinyin_dict
from pypinyin.style import convert as convert_style
from rapidfuzz import fuzz
from sqlalchemy import Connection, String, delete, select
from sqlalchemy import text as sql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from stdnum import isbn as stdnum_isbn
from stdnum import issn as stdnum_issn

from storage.catalog import Availability, Item, Record, availability
from storage.db import Base

# ---------------------------------------------------------------------------------------------
# Folding and tokens
# ---------------------------------------------------------------------------------------------

# Han ideographs (with extensions and compatibility ideographs), kana and Hangul: scripts written
# without spaces between words, indexed by characters and character pairs.
_CJK = (
    "\u3005\u3007\u3041-\u309f\u30a1-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f\uf900-\ufaff\U00020000-\U0003134f"
)
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_KANA = re.compile("[\u3041-\u309f\u30a1-\u30ff\u31f0-\u31ff]")
_HAS_CJK = re.compile(f"[{_CJK}]")
# A CJK run, or a word: letters and digits, possibly joined by apostrophes ("zhi'an", "o'brien").
_TOKEN = re.compile(f"(?P<cjk>[{_CJK}]+)|(?P<word>[^\\W_{_CJK}]+(?:'[^\\W_{_CJK}]+)*)")

# Letters that Unicode does not decompose into a base letter and a diacritic.
_LETTERS = str.maketrans(
    {
        "ø": "o",
        "đ": "d",
        "ð": "d",
        "ł": "l",
        "ħ": "h",
        "ı": "i",
        "ŀ": "l",
        "æ": "ae",
        "œ": "oe",
        "þ": "th",
        "ʻ": "'",  # romanisation marks (Wade-Giles, Korean, Arabic, Hebrew) count as apostrophes
        "ʼ": "'",
        "ʹ": "'",
        "ʾ": "'",
        "ʿ": "'",
        "’": "'",
        "‘": "'",
        "`": "'",
        "ʺ": "",
        "劵": "券",  # variant characters OpenCC leaves alone
        "\u3000": " ",
    }
)


@functools.cache
def _t2s() -> opencc.OpenCC:
    return opencc.OpenCC("t2s")


def fold(text: str) -> str:
    """``text`` folded for matching: NFKC, simplified Chinese, lower case, no diacritics.

    "Dvořák" → "dvorak", "國際公司理財" → "国际公司理财", full-width "ＡＢＣ" → "abc".
    """
    if text.isascii():
        return text.lower().replace("`", "'")
    text = unicodedata.normalize("NFKC", text)
    if _HAN.search(text):
        text = _t2s().convert(text)
    text = text.casefold().translate(_LETTERS)
    if not text.isascii():
        decomposed = unicodedata.normalize("NFKD", text)
        text = unicodedata.normalize(
            "NFC", "".join(c for c in decomposed if unicodedata.category(c)[0] != "M")
        ).translate(_LETTERS)
    return text


def words(text: str) -> str:
    """``text`` folded and reduced to its words and CJK runs, separated by single spaces.

    This is the form titles are compared in: "Ming dai zheng zhi zhi du /" → "ming dai zheng zhi
    zhi du", "明代政治制度 =" → "明代政治制度".
    """
    return " ".join(m.group().replace("'", "") for m in _TOKEN.finditer(fold(text)))


def compact(text: str) -> str:
    """A words-form text without its spaces ("ming dai" → "mingdai"), for spacing-blind comparison."""
    return text.replace(" ", "")


def is_chinese_text(text: str) -> bool:
    """True when ``text`` has Han characters and no kana (Japanese is not romanised as pinyin)."""
    return bool(_HAN.search(text)) and not _KANA.search(text)


def has_cjk(text: str) -> bool:
    """True when ``text`` has a character of a script written without spaces (Han, kana, Hangul)."""
    return bool(_HAS_CJK.search(text))


def _cjk_tokens(run: str) -> Iterator[str]:
    """A CJK run's characters and character pairs: "明代政治" → 明 代 政 治 明代 代政 政治."""
    yield from run
    for i in range(len(run) - 1):
        yield run[i : i + 2]


@functools.cache
def _readings() -> dict[str, tuple[str, ...]]:
    """Every toneless pinyin reading of every Han character pypinyin knows ("叶" → ye, xie)."""
    table: dict[str, tuple[str, ...]] = {}
    for code_point, readings in pinyin_dict.items():
        plain = (convert_style(r, Style.NORMAL, strict=False).replace("v", "u") for r in readings.split(","))
        table[chr(code_point)] = tuple(dict.fromkeys(fold(r) for r in plain if r.isalpha()))
    return table


def _pinyin_tokens(run: str) -> list[str]:
    """The pinyin syllables of a run of Han characters, every reading of each character (so that a
    polyphone is found by any of its readings)."""
    table = _readings()
    return [r for c in run for r in table.get(c, ())]


@functools.lru_cache(maxsize=65536)
def _pinyin(run: str) -> list[str]:
    """The pinyin syllables of a run of Han characters as read in context, toneless ("绿" → "lu")."""
    return [fold(s) for s in lazy_pinyin(run, v_to_u=True, errors="ignore") if s.isalpha()]


# The syllables of Mandarin pinyin (ü written u, as LoC romanisation folds to).
PINYIN_SYLLABLES = frozenset(
    """a ai an ang ao ba bai ban bang bao bei ben beng bi bian biao bie bin bing bo bu ca cai can cang
    cao ce cen ceng cha chai chan chang chao che chen cheng chi chong chou chu chua chuai chuan chuang
    chui chun chuo ci cong cou cu cuan cui cun cuo da dai dan dang dao de dei den deng di dia dian diao
    die ding diu dong dou du duan dui dun duo e ei en eng er fa fan fang fei fen feng fo fou fu ga gai
    gan gang gao ge gei gen geng gong gou gu gua guai guan guang gui gun guo ha hai han hang hao he hei
    hen heng hong hou hu hua huai huan huang hui hun huo ji jia jian jiang jiao jie jin jing jiong jiu
    ju juan jue jun ka kai kan kang kao ke ken keng kong kou ku kua kuai kuan kuang kui kun kuo la lai
    lan lang lao le lei leng li lia lian liang liao lie lin ling liu lo long lou lu luan lun luo lue lv
    lve ma mai man mang mao me mei men meng mi mian miao mie min ming miu mo mou mu na nai nan nang nao
    ne nei nen neng ni nian niang niao nie nin ning niu nong nou nu nuan nuo nue nv nve o ou pa pai
    pan pang pao pei pen peng pi pian piao pie pin ping po pou pu qi qia qian qiang qiao qie qin qing
    qiong qiu qu quan que qun ran rang rao re ren reng ri rong rou ru rua ruan rui run ruo sa sai san
    sang sao se sen seng sha shai shan shang shao she shei shen sheng shi shou shu shua shuai shuan
    shuang shui shun shuo si song sou su suan sui sun suo ta tai tan tang tao te teng ti tian tiao tie
    ting tong tou tu tuan tui tun tuo wa wai wan wang wei wen weng wo wu xi xia xian xiang xiao xie xin
    xing xiong xiu xu xuan xue xun ya yan yang yao ye yi yin ying yo yong you yu yuan yue yun za zai
    zan zang zao ze zei zen zeng zha zhai zhan zhang zhao zhe zhei zhen zheng zhi zhong zhou zhu zhua
    zhuai zhuan zhuang zhui zhun zhuo zi zong zou zu zuan zui zun zuo""".split()
)
_LONGEST_SYLLABLE = 6


def pinyin_splits(word: str, limit: int = 4) -> list[list[str]]:
    """The ways ``word`` divides into two or more pinyin syllables, fewest syllables first.

    "mingdaizhengzhizhidu" → [["ming", "dai", "zheng", "zhi", "zhi", "du"]]; "xian" → [["xi", "an"]]
    (the whole word is one syllable, which the caller already has); "history" → [].
    """
    if not word.isascii() or not word.isalpha() or len(word) < 3 or len(word) > 200:
        return []
    n = len(word)
    # ends[i]: the syllables that can start at position i and lead to the end of the word.
    reachable = [False] * (n + 1)
    reachable[n] = True
    for i in range(n - 1, -1, -1):
        reachable[i] = any(
            reachable[j] and word[i:j] in PINYIN_SYLLABLES
            for j in range(i + 1, min(n, i + _LONGEST_SYLLABLE) + 1)
        )
    if not reachable[0]:
        return []
    found: list[list[str]] = []

    def walk(i: int, path: list[str]) -> None:
        if len(found) >= limit * 4:
            return
        if i == n:
            if len(path) >= 2:
                found.append(list(path))
            return
        for j in range(min(n, i + _LONGEST_SYLLABLE), i, -1):  # longest syllable first
            if reachable[j] and word[i:j] in PINYIN_SYLLABLES:
                path.append(word[i:j])
                walk(j, path)
                path.pop()

    walk(0, [])
    found.sort(key=len)
    return found[:limit]


@functools.lru_cache(maxsize=65536)
def _syllables(word: str) -> tuple[str, ...]:
    """The syllables of a romanised word that is not a syllable itself ("zhongguo" → zhong guo)."""
    if word in PINYIN_SYLLABLES:
        return ()
    splits = pinyin_splits(word, limit=1)
    return tuple(splits[0]) if splits else ()


def _nearly_pinyin(word: str) -> list[list[str]]:
    """The syllables of a long romanised word with a typo or two: the division into syllables that
    leaves the fewest letters over, when that is at most one letter in eight ("mingdaizhengzhizhdu"
    → ming dai zheng zhi du). [] otherwise."""
    n = len(word)
    if n < 8 or n > 200 or not word.isascii() or not word.isalpha():
        return []
    # best[i]: (letters left over, syllables, the syllables) for word[i:]
    best: list[tuple[int, int, list[str]]] = [(0, 0, [])] * (n + 1)
    for i in range(n - 1, -1, -1):
        over, count, path = best[i + 1]
        choice = (over + 1, count, path)
        for j in range(i + 1, min(n, i + _LONGEST_SYLLABLE) + 1):
            if word[i:j] in PINYIN_SYLLABLES:
                o, c, p = best[j]
                if (o, c + 1) < choice[:2]:
                    choice = (o, c + 1, [word[i:j], *p])
        best[i] = choice
    over, count, path = best[0]
    return [path] if 0 < over <= n // 8 and count >= 2 else []


def text_tokens(text: str, *, pinyin: bool = False, syllables: bool = False) -> list[str]:
    """The index tokens of one text.

    Words become tokens (a word with apostrophes also yields its parts: "zhi'an" → zhian zhi an);
    CJK runs yield characters and character pairs. With ``pinyin``, Han text also yields its pinyin
    syllables; with ``syllables``, romanised words yield theirs ("zhongguo" → zhong guo).
    """
    out: list[str] = []
    for m in _TOKEN.finditer(fold(text)):
        run = m.group("cjk")
        if run is not None:
            out.extend(_cjk_tokens(run))
            if pinyin and _HAN.search(run):
                out.extend(_pinyin_tokens(run))
            continue
        word = m.group("word")
        if "'" in word:
            parts = word.split("'")
            out.append("".join(parts))
            out.extend(parts)
        else:
            out.append(word)
        if syllables:
            out.extend(_syllables(word.replace("'", "")))
    return out


def warm_up() -> None:
    """Build the tables tokenising needs (OpenCC, every reading of every Han character) now, e.g.
    once before forking worker processes rather than once in each."""
    _t2s()
    _readings()
    _pinyin("中文")


def pinyin_of(text: str) -> str:
    """The toneless pinyin of the Han characters of ``text``, syllables spaced ("" without Han)."""
    return " ".join(_pinyin(text)) if _HAN.search(text) else ""


def _isbn10_check(first9: str) -> str:
    digit = (11 - sum((10 - i) * int(d) for i, d in enumerate(first9)) % 11) % 11
    return "x" if digit == 10 else str(digit)


def _isbn13_check(first12: str) -> str:
    return str((10 - sum((3 if i % 2 else 1) * int(d) for i, d in enumerate(first12)) % 10) % 10)


def isbn_forms(value: str) -> list[str]:
    """The searchable forms of an ISBN: ISBN-13 and, where one exists, ISBN-10 ("957-11-1784-6" →
    ["9789571117843", "9571117846"]). An ISBN with a wrong check digit is kept as it is written;
    anything else gives []."""
    return list(_isbn_forms(value))  # an import asks twice per ISBN (mapping, then tokens)


@functools.lru_cache(maxsize=4096)
def _isbn_forms(value: str) -> tuple[str, ...]:
    return tuple(_uncached_isbn_forms(value))


def _uncached_isbn_forms(value: str) -> list[str]:
    try:
        code = stdnum_isbn.compact(value, convert=False).lower() if value else ""
    except Exception:
        return []
    if len(code) == 10 and code[:9].isdigit() and (code[9].isdigit() or code[9] == "x"):
        if stdnum_isbn.is_valid(code):
            isbn13 = "978" + code[:9]
            return [isbn13 + _isbn13_check(isbn13), code]
        return [code]
    if len(code) == 13 and code.isdigit():
        if stdnum_isbn.is_valid(code):
            if code.startswith("978"):
                return [code, code[3:12] + _isbn10_check(code[3:12])]
            return [code]
        return [code]
    return []


def normalise_isbn(value: str) -> str | None:
    """The ISBN-13 of a valid ISBN in any form (ISBN-10 or -13, any hyphenation), else None."""
    forms = isbn_forms(value)
    if forms and (len(forms) == 2 or forms[0].startswith("979")) and stdnum_isbn.is_valid(forms[0]):
        return forms[0]
    return None


def format_isbn(value: str) -> str:
    """An ISBN hyphenated for people ("9789571117843" → "978-957-11-1784-3"), or as given."""
    try:
        return stdnum_isbn.format(value, convert=False)
    except Exception:
        return value


def issn_form(value: str) -> str | None:
    """An ISSN without its hyphen, lower case ("0028-0836" → "00280836"), or None."""
    code = stdnum_issn.compact(value) if value else ""
    return code.lower() if re.fullmatch(r"\d{7}[\dxX]", code) else None


def _dedupe(tokens: Iterable[str]) -> str:
    return " ".join(dict.fromkeys(t for t in tokens if t))


def document_tokens(
    titles: Sequence[str],
    authors: Sequence[str],
    others: Sequence[str],
    *,
    romanised: Sequence[str] = (),
    isbns: Sequence[str] = (),
    issns: Sequence[str] = (),
    codes: Sequence[str] = (),
    chinese: bool = False,
) -> tuple[str, str, str]:
    """The three token strings of a record: title, author, and everything else.

    For a Chinese record (``chinese``), Han text yields pinyin and the romanised texts (titles,
    authors, ``romanised``: publisher, series) yield syllables. ``isbns`` and ``issns`` are indexed
    in every form a reader may type; ``codes`` (control number, call numbers, LCCN) as written and
    without their spaces and punctuation.
    """
    title = _dedupe(t for x in titles for t in text_tokens(x, pinyin=chinese, syllables=chinese))
    author = _dedupe(t for x in authors for t in text_tokens(x, pinyin=chinese, syllables=chinese))
    other: list[str] = [t for x in others for t in text_tokens(x, pinyin=chinese)]
    other.extend(t for x in romanised for t in text_tokens(x, pinyin=chinese, syllables=chinese))
    for value in isbns:
        other.extend(isbn_forms(value))
    for value in issns:
        form = issn_form(value)
        if form:
            other.append(form)
    for value in codes:
        other.extend(text_tokens(value))
        joined = compact(words(value))
        if joined:
            other.append(joined)
    return title, author, _dedupe(other)


def match_keys(forms: Sequence[str], *, chinese: bool = False) -> str:
    """The folded forms a query is compared with in the reranking, one per line; a Chinese record's
    Han forms also in pinyin ("明代政治制度" → "明代政治制度", "ming dai zheng zhi zhi du")."""
    keys: list[str] = []
    for form in forms:
        keys.append(words(form))
        if chinese:
            keys.append(pinyin_of(keys[-1]))
    return "\n".join(dict.fromkeys(k for k in keys if k))


# ---------------------------------------------------------------------------------------------
# The index inside the database
# ---------------------------------------------------------------------------------------------


class SearchTerm(Base):
    """The catalog's vocabulary: every indexed word and in how many records it occurs. Typos are
    corrected against it, and very common words are left to the reranking."""

    __tablename__ = "search_terms"

    __table_args__ = {"sqlite_with_rowid": False}

    term: Mapped[str] = mapped_column(String(48), primary_key=True)
    df: Mapped[int] = mapped_column(default=0)


_FTS_COLUMNS = "search_title, search_author, search_other"
# The same token strings on PostgreSQL: split on our spaces, no text-search parser involved.
PG_TITLE_VECTOR = "array_to_tsvector(array_remove(string_to_array(search_title, ' '), ''))"
PG_ALL_VECTOR = (
    "array_to_tsvector(array_remove(string_to_array("
    "search_title || ' ' || search_author || ' ' || search_other, ' '), ''))"
)

_SQLITE_INDEX = [
    f"""CREATE VIRTUAL TABLE IF NOT EXISTS records_fts USING fts5(
        {_FTS_COLUMNS}, content='records', content_rowid='id', tokenize='ascii', detail='column')""",
    f"""CREATE TRIGGER IF NOT EXISTS records_fts_insert AFTER INSERT ON records BEGIN
        INSERT INTO records_fts(rowid, {_FTS_COLUMNS})
        VALUES (new.id, new.search_title, new.search_author, new.search_other);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS records_fts_delete AFTER DELETE ON records BEGIN
        INSERT INTO records_fts(records_fts, rowid, {_FTS_COLUMNS})
        VALUES ('delete', old.id, old.search_title, old.search_author, old.search_other);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS records_fts_update
        AFTER UPDATE OF search_title, search_author, search_other ON records BEGIN
        INSERT INTO records_fts(records_fts, rowid, {_FTS_COLUMNS})
        VALUES ('delete', old.id, old.search_title, old.search_author, old.search_other);
        INSERT INTO records_fts(rowid, {_FTS_COLUMNS})
        VALUES (new.id, new.search_title, new.search_author, new.search_other);
    END""",
    "INSERT INTO records_fts(records_fts) VALUES ('rebuild')",
]
_SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS records_fts_insert",
    "DROP TRIGGER IF EXISTS records_fts_delete",
    "DROP TRIGGER IF EXISTS records_fts_update",
    "DROP TABLE IF EXISTS records_fts",
]
_PG_INDEX = [
    f"CREATE INDEX IF NOT EXISTS ix_records_search_title ON records USING gin (({PG_TITLE_VECTOR}))",
    f"CREATE INDEX IF NOT EXISTS ix_records_search_all ON records USING gin (({PG_ALL_VECTOR}))",
]
_PG_DROP = ["DROP INDEX IF EXISTS ix_records_search_title", "DROP INDEX IF EXISTS ix_records_search_all"]


# Revision 0009: the same vectors stored in generated columns, GIN-indexed (PostgreSQL only).
PG_TITLE_COLUMN, PG_ALL_COLUMN = "search_title_vector", "search_vector"
_PG_VECTORS = [
    *_PG_DROP,
    f"ALTER TABLE records ADD COLUMN IF NOT EXISTS {PG_TITLE_COLUMN} tsvector "
    f"GENERATED ALWAYS AS ({PG_TITLE_VECTOR}) STORED",
    f"ALTER TABLE records ADD COLUMN IF NOT EXISTS {PG_ALL_COLUMN} tsvector GENERATED ALWAYS AS ({PG_ALL_VECTOR}) STORED",
    f"CREATE INDEX IF NOT EXISTS ix_records_search_title ON records USING gin ({PG_TITLE_COLUMN})",
    f"CREATE INDEX IF NOT EXISTS ix_records_search_all ON records USING gin ({PG_ALL_COLUMN})",
]
_PG_VECTORS_DROP = [
    *_PG_DROP,
    f"ALTER TABLE records DROP COLUMN IF EXISTS {PG_TITLE_COLUMN}",
    f"ALTER TABLE records DROP COLUMN IF EXISTS {PG_ALL_COLUMN}",
    *_PG_INDEX,
]


def create_search_vectors(connection: Connection) -> None:
    """Store the search vectors in generated columns and index those (migration 0009; PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        for statement in _PG_VECTORS:
            connection.exec_driver_sql(statement)


def drop_search_vectors(connection: Connection) -> None:
    """Back to the expression indexes of migration 0002."""
    if connection.dialect.name == "postgresql":
        for statement in _PG_VECTORS_DROP:
            connection.exec_driver_sql(statement)


def create_search_index(connection: Connection) -> None:
    """Create the full-text index over the records' token strings (migration 0002): FTS5 and its
    triggers on SQLite, GIN expression indexes on PostgreSQL. Existing records are indexed."""
    statements = _SQLITE_INDEX if connection.dialect.name == "sqlite" else _PG_INDEX
    for statement in statements:
        connection.exec_driver_sql(statement)


def drop_search_index(connection: Connection) -> None:
    """Remove what :func:`create_search_index` made."""
    statements = _SQLITE_DROP if connection.dialect.name == "sqlite" else _PG_DROP
    for statement in statements:
        connection.exec_driver_sql(statement)


_NOT_A_TERM = re.compile(r"\d{5}|\D\d|\d\D")  # long numbers, and tokens mixing digits and letters


def in_vocabulary(token: str) -> bool:
    """Whether a token is counted in ``search_terms``: words and short numbers (years, volume
    numbers), not identifiers or call numbers."""
    return len(token) <= 48 and not _NOT_A_TERM.search(token)


def record_terms(search_title: str, search_author: str, search_other: str) -> set[str]:
    """The vocabulary terms of one record's token strings."""
    terms = set(search_title.split())
    terms.update(search_author.split())
    terms.update(search_other.split())
    return {t for t in terms if len(t) <= 48 and not _NOT_A_TERM.search(t)}


def _dialect(session: AsyncSession) -> str:
    bind = session.bind
    return bind.dialect.name if bind is not None else "sqlite"


async def update_vocabulary(session: AsyncSession, delta: Counter[str]) -> None:
    """Add ``delta`` (term → change in the number of records having it) to the vocabulary."""
    changes = {t: d for t, d in delta.items() if d}
    if not changes:
        return
    # One statement per batch, the terms passed as a single array/JSON parameter: an import adds
    # thousands of terms per batch, and one bound row each would cost more than the upsert itself.
    if _dialect(session) == "postgresql":
        statement = (
            "INSERT INTO search_terms (term, df) "
            "SELECT * FROM unnest(CAST(:terms AS text[]), CAST(:dfs AS bigint[])) "
            "ON CONFLICT (term) DO UPDATE SET df = search_terms.df + excluded.df"
        )
        params: dict[str, object] = {"terms": list(changes), "dfs": list(changes.values())}
    else:
        statement = (
            "INSERT INTO search_terms (term, df) SELECT key, value FROM json_each(:delta) WHERE true "
            "ON CONFLICT (term) DO UPDATE SET df = df + excluded.df"
        )
        params = {"delta": json.dumps(changes, ensure_ascii=False)}
    await session.execute(sql(statement), params)
    fewer = [t for t, d in changes.items() if d < 0]
    for start in range(0, len(fewer), 2000):
        chunk = fewer[start : start + 2000]
        await session.execute(delete(SearchTerm).where(SearchTerm.term.in_(chunk), SearchTerm.df <= 0))


async def rebuild_vocabulary(session: AsyncSession) -> int:
    """Recount the vocabulary from every record (a repair; imports keep it current). Returns its size."""
    await session.execute(delete(SearchTerm))
    counts: Counter[str] = Counter()
    result = await session.stream(select(Record.search_title, Record.search_author, Record.search_other))
    async for title, author, other in result:
        counts.update(record_terms(title, author, other))
    await update_vocabulary(session, counts)
    return len(counts)


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------

MAX_QUERY_CHARS = 300  # a longer query is cut here (a pasted paragraph is not a search)
MAX_GROUPS = 12  # at most this many words go to the database; the rest only rerank
CANDIDATES = 200  # records fetched per candidate query
ENOUGH = 50  # title matches that make the all-fields query unnecessary
MAX_RESULTS = 100  # results a search returns over all its pages
CLOSE = 90  # similarity to the query of a result from which no further typo is suspected
RARE = 1_000  # a known word in fewer records than this may still be a typo of a more frequent one
COMMON = 20_000  # a word in more records than this is left to the reranking (when rarer words exist)
_MIN_FUZZY, _MAX_FUZZY = 4, 24  # words shorter or longer than this are not corrected
_ALPHABETS = ("abcdefghijklmnopqrstuvwxyz", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя", "αβγδεζηθικλμνξοπρστυφχψω")


Alternative = tuple[str, ...]  # tokens that must all occur


@dataclass
class Group:
    """One word of a query and the token sets that satisfy it (the word itself, its pinyin
    syllables, its spelling corrections, the other form of an ISBN)."""

    word: str
    alternatives: list[Alternative]  # the word, its pinyin syllables, the forms of an ISBN
    fixes: list[Alternative] = field(default_factory=list)  # spelling corrections
    df: int = 0  # records having the word as typed (0: unknown to the catalog)
    identifier: bool = False

    @property
    def tokens(self) -> set[str]:
        return {t for alt in self.alternatives for t in alt}

    @property
    def matchable(self) -> bool:
        """False for a word no record has and nothing corrects."""
        return (
            self.identifier
            or self.df > 0
            or len(self.alternatives) > 1
            or bool(self.fixes)
            or not in_vocabulary(self.word)
        )

    @property
    def everything(self) -> list[Alternative]:
        return self.alternatives + self.fixes


@dataclass
class QueryPlan:
    """A query, folded and split into groups, ready for the database."""

    text: str  # the query in words form (folded)
    groups: list[Group]


def _fts_expression(groups: Sequence[Group], title_only: bool) -> str:
    def alt(a: Alternative) -> str:
        return f'"{a[0]}"' if len(a) == 1 else "(" + " AND ".join(f'"{t}"' for t in a) + ")"

    expr = " AND ".join("(" + " OR ".join(alt(a) for a in g.everything) + ")" for g in groups)
    return f"{{search_title}} : ({expr})" if title_only else expr


def _tsquery(groups: Sequence[Group]) -> str:
    def lexeme(t: str) -> str:
        return "'" + t.replace("\\", "\\\\").replace("'", "''") + "'"

    def alt(a: Alternative) -> str:
        inner = " & ".join(lexeme(t) for t in a)
        return inner if len(a) == 1 else f"({inner})"

    return " & ".join("(" + " | ".join(alt(a) for a in g.everything) + ")" for g in groups)


def _edits(word: str) -> set[str]:
    """Every string one deletion, transposition, substitution or insertion away from ``word``."""
    alphabet = next((a for a in _ALPHABETS if all(c in a for c in word)), "")
    if not alphabet:
        return set()
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    out = {a + b[1:] for a, b in splits if b}
    out |= {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    out |= {a + c + b[1:] for a, b in splits if b for c in alphabet}
    out |= {a + c + b for a, b in splits for c in alphabet}
    out.discard(word)
    return out


async def _frequencies(session: AsyncSession, terms: Iterable[str]) -> dict[str, int]:
    """The number of records having each term (terms no record has are left out)."""
    wanted = sorted({t for t in terms if in_vocabulary(t)})
    if not wanted:
        return {}
    # One parameter for the whole list: a typo's hundreds of neighbours cost one lookup each, not a
    # bound parameter each.
    if _dialect(session) == "postgresql":
        statement = "SELECT term, df FROM search_terms WHERE term = ANY(CAST(:terms AS text[]))"
        params: dict[str, object] = {"terms": wanted}
    else:
        statement = "SELECT term, df FROM search_terms WHERE term IN (SELECT value FROM json_each(:terms))"
        params = {"terms": json.dumps(wanted, ensure_ascii=False)}
    rows = await session.execute(sql(statement), params)
    return {term: df for term, df in rows.all()}


def _query_groups(query: str) -> tuple[str, list[Group]]:
    """The groups of a query before the vocabulary is consulted: identifiers, words, CJK pairs."""
    query = unicodedata.normalize("NFKC", query[:MAX_QUERY_CHARS])
    groups: list[Group] = []
    rest: list[str] = []
    for chunk in re.split(r"\s+", query):
        stripped = chunk.strip(".,;:()[]\"'")
        forms = isbn_forms(stripped) if re.fullmatch(r"[0-9Xx][0-9Xx-]{8,16}", stripped) else []
        issn = issn_form(stripped) if re.fullmatch(r"\d{4}-\d{3}[\dXx]", stripped) else None
        if forms:
            groups.append(Group(stripped, [(f,) for f in forms], identifier=True))
        elif issn and stdnum_issn.is_valid(issn):
            # "1930-1940" may be an ISSN or two years: either will do.
            groups.append(Group(stripped, [(issn,), tuple(stripped.split("-"))], identifier=True))
        elif fold(stripped) in ("isbn", "issn"):
            continue
        else:
            rest.append(chunk)
    text = " ".join(rest)
    for m in _TOKEN.finditer(fold(text)):
        run = m.group("cjk")
        if run is not None:
            if len(run) == 1:
                groups.append(Group(run, [(run,)]))
            else:
                groups.extend(Group(run[i : i + 2], [(run[i : i + 2],)]) for i in range(len(run) - 1))
            continue
        word = m.group("word").replace("'", "")
        parts = (
            re.findall(r"\d+|\D+", word)
            if word.isascii() and not word.isalpha() and not word.isdigit()
            else []
        )
        if len(parts) > 1 and any(p.isalpha() and (p in PINYIN_SYLLABLES or pinyin_splits(p)) for p in parts):
            groups.extend(Group(p, [(p,)]) for p in parts)  # "xianzhi1986" → xianzhi 1986: pinyin and a year
        else:
            groups.append(Group(word, [(word,)]))
    seen: set[str] = set()
    unique = [g for g in groups if not (g.word in seen or seen.add(g.word))]  # type: ignore[func-returns-value]
    return words(text), unique


def searchable(query: str) -> bool:
    """Whether ``query`` has anything to search for (a word, a CJK character, an ISBN), unlike
    punctuation or emoji alone."""
    return bool(_query_groups(query or "")[1])


async def plan_query(session: AsyncSession, query: str) -> QueryPlan:
    """Fold and split ``query``, look its words up in the catalog's vocabulary, and add the
    alternatives: pinyin syllables for a pinyin query, corrections for words the catalog lacks."""
    text, groups = _query_groups(query)
    if not groups:
        return QueryPlan(text, [])
    plain = [g for g in groups if not g.identifier and g.word.isascii() and g.word.isalpha()]
    splits = {g.word: pinyin_splits(g.word) or _nearly_pinyin(g.word) for g in plain}
    pinyin_query = bool(plain) and all(g.word in PINYIN_SYLLABLES or splits[g.word] for g in plain)
    if not pinyin_query:
        splits = {}
    lookup = {t for g in groups for t in g.tokens} | {s for ss in splits.values() for sp in ss for s in sp}
    df = await _frequencies(session, lookup)
    for g in groups:
        g.df = df.get(g.word, 0)
        for split in splits.get(g.word, []):
            if all(df.get(s) for s in split):
                g.alternatives.append(tuple(split))
    unknown = [
        g for g in groups if not g.identifier and g.df == 0 and len(g.alternatives) == 1 and _fuzzy(g.word)
    ]
    await _add_corrections(session, unknown)
    return QueryPlan(text, groups)


def _fuzzy(word: str) -> bool:
    """Whether a word may be spelling-corrected (long enough to guess, short enough to be a word)."""
    return _MIN_FUZZY <= len(word) <= _MAX_FUZZY


async def _add_corrections(
    session: AsyncSession, groups: Sequence[Group], per_word: int = 5, max_df: int | None = None
) -> None:
    """Add to each group the catalog words one edit away from it (the most frequent first; none in
    more than ``max_df`` records when given)."""
    edits = {g.word: _edits(g.word) for g in groups}
    df = await _frequencies(session, {e for es in edits.values() for e in es})
    if max_df is not None:
        df = {e: n for e, n in df.items() if n <= max_df}
    for g in groups:
        found = sorted((e for e in edits[g.word] if e in df), key=lambda e: (-df[e], e))[:per_word]
        known = set(g.everything)
        g.fixes.extend((e,) for e in found if (e,) not in known)


def _usable(groups: Sequence[Group]) -> list[Group]:
    """The groups worth asking the database about: not unknown words without alternatives, not
    very common words while rarer ones remain (they are left to the reranking), at most MAX_GROUPS."""
    usable = [g for g in groups if g.matchable]
    if not usable:
        return []
    usable.sort(key=lambda g: (0 if g.identifier else 1, g.df if g.df else 0, g.word))
    kept = usable[:2] + [g for g in usable[2:] if g.df <= COMMON]
    return kept[:MAX_GROUPS]


@dataclass
class _Candidate:
    id: int
    title_keys: list[str]
    author_keys: list[str]
    title_tokens: str  # " token token … ": membership by substring, cheaper than a set
    tokens: str  # title, author and the rest, likewise
    shown: tuple[str, str, str, str, str]  # title, title_latin, author, year, call_number
    match_class: int = 0  # _rank's class: 0 when the record lacks one of the query's words


async def _match(
    session: AsyncSession, groups: Sequence[Group], *, title_only: bool, limit: int = CANDIDATES
) -> list[int]:
    """Ids of records matching every group (in the title, or anywhere), shortest titles first."""
    if not groups:
        return []
    if _dialect(session) == "postgresql":
        vector = PG_TITLE_COLUMN if title_only else PG_ALL_COLUMN
        statement = (
            f"SELECT r.id FROM records r WHERE r.{vector} "
            "@@ CAST(:q AS tsquery) ORDER BY r.title_length, r.id LIMIT :k"
        )
        params: dict[str, object] = {"q": _tsquery(groups), "k": limit}
    else:
        statement = (
            "SELECT r.id FROM records r INDEXED BY ix_records_candidate_order WHERE r.id IN "
            "(SELECT rowid FROM records_fts WHERE records_fts MATCH :q) "
            "ORDER BY r.title_length, r.id LIMIT :k"
        )
        params = {"q": _fts_expression(groups, title_only), "k": limit}
    return list((await session.execute(sql(statement), params)).scalars().all())


async def _match_all_but_one(
    session: AsyncSession, groups: Sequence[Group], limit: int = CANDIDATES
) -> list[int]:
    """Ids of records matching all groups but one (any one): a wrong word forgiven."""
    if len(groups) < 2:
        return []
    found: dict[int, None] = {}
    for left_out in range(len(groups)):
        subset = [g for i, g in enumerate(groups) if i != left_out]
        found.update(dict.fromkeys(await _match(session, subset, title_only=False, limit=limit)))
    return list(found)


async def _candidates(session: AsyncSession, ids: Sequence[int]) -> list[_Candidate]:
    if not ids:
        return []
    rows = await session.execute(
        select(
            Record.id,
            Record.title_keys,
            Record.author_keys,
            Record.search_title,
            Record.search_author,
            Record.search_other,
            Record.title,
            Record.title_latin,
            Record.author,
            Record.year,
            Record.call_number,
        ).where(Record.id.in_(list(ids)))
    )
    return [
        _Candidate(
            id=r[0],
            title_keys=[k for k in r[1].split("\n") if k],
            author_keys=[k for k in r[2].split("\n") if k],
            title_tokens=f" {r[3]} ",
            tokens=f" {r[3]} {r[4]} {r[5]} ",
            shown=(r[6], r[7], r[8], r[9], r[10]),
        )
        for r in rows.all()
    ]


def _phrase_in(query: str, key: str) -> bool:
    if not query:
        return False
    if has_cjk(query):
        return query in key
    return f" {query} " in f" {key} "


def _satisfied(g: Group, tokens: str, *, fixes: bool) -> bool:
    return any(all(f" {t} " in tokens for t in a) for a in (g.everything if fixes else g.alternatives))


def _key_has(key: str, key_words: set[str], g: Group) -> bool:
    """Whether a title form has a query word (or one of its alternatives or corrections)."""
    for alternative in g.everything:
        if all((t in key) if has_cjk(t) else (t in key_words) for t in alternative):
            return True
    return False


def _rank(plan: QueryPlan, c: _Candidate) -> tuple[int, float]:
    """(match class, similarity) of a candidate. Classes: the ISBN/ISSN asked for 6, exact title 5,
    the query as a phrase of a title or an author 4, every word in the title 3, every word in the
    record 2, every word once spelling is corrected 1, the rest 0. Similarity: rapidfuzz's, of the
    query to the closest title form that has the query's words (spacing ignored for pinyin)."""
    q = plan.text
    qc = compact(q)
    groups = [g for g in plan.groups if g.matchable]
    if groups and all(g.identifier for g in groups):
        return (6, 100.0) if all(_satisfied(g, c.tokens, fixes=False) for g in groups) else (0, 0.0)
    words_of_query = [g for g in groups if not g.identifier]
    similarity = loose = 0.0
    exact = phrase = False
    for key in c.title_keys:
        kc = compact(key)
        if q == key or (qc and qc == kc):
            exact = True
        elif _phrase_in(q, key) or (len(qc) >= 6 and qc in kc):
            phrase = True
        score = max(fuzz.ratio(q, key), fuzz.ratio(qc, kc) - 2)
        loose = max(loose, score)
        key_words = set(key.split())
        if all(_key_has(key, key_words, g) for g in words_of_query):
            similarity = max(similarity, score)
    similarity = similarity or loose - 20
    if not exact and not phrase:
        for key in c.author_keys:
            if q == key or _phrase_in(q, key) or (len(qc) >= 6 and compact(key) == qc):
                phrase = True
                break
    if exact:
        return 5, similarity
    if phrase:
        return 4, similarity
    if groups and all(_satisfied(g, c.title_tokens, fixes=False) for g in groups):
        return 3, similarity
    both = " ".join(c.title_keys[:1] + c.author_keys[:1])
    if groups and all(_satisfied(g, c.tokens, fixes=False) for g in groups):
        return 2, max(similarity, float(fuzz.token_set_ratio(q, both)))
    if groups and all(_satisfied(g, c.tokens, fixes=True) for g in groups):
        return 1, max(similarity, float(fuzz.token_set_ratio(q, both)) - 10)
    return 0, max(similarity, float(fuzz.token_set_ratio(q, both)) - 20)


@dataclass(frozen=True)
class SearchHit:
    """One result: what the result list shows of a record, and its availability."""

    record_id: int
    title: str
    title_latin: str
    author: str
    year: str
    call_number: str
    availability: Availability


@dataclass(frozen=True)
class SearchPage:
    """One page of results. ``total`` counts the results over all pages (at most MAX_RESULTS)."""

    query: str
    hits: list[SearchHit]
    total: int
    offset: int
    limit: int
    matched_all: bool = True  # some result has every word of the query (False: only similar titles)

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.hits) < self.total


async def _ranked(session: AsyncSession, query: str) -> list[_Candidate]:
    """Every result of ``query`` (at most MAX_RESULTS), best first."""
    plan = await plan_query(session, query)
    groups = _usable(plan.groups)
    if not groups:
        return []
    identifiers = all(g.identifier for g in groups)
    found: dict[int, _Candidate] = {}

    async def take(ids: Sequence[int]) -> None:
        found.update((c.id, c) for c in await _candidates(session, [i for i in ids if i not in found]))

    if not identifiers:
        await take(await _match(session, groups, title_only=True))
    exact_title = any(_rank(plan, c)[0] == 5 for c in found.values())
    if len(found) < ENOUGH and not exact_title:
        await take(await _match(session, groups, title_only=False))
    best = max((_rank(plan, c) for c in found.values()), default=(0, 0.0))
    if not identifiers and best[0] < 3 and best[1] < CLOSE:
        # No title has every word, and nothing found is as close as a typo away: maybe a typo
        # made another, rarer real word ("horse thie", "boin in italia", "a fac in the water"); its
        # frequent neighbours are tried too, in the shortest titles.
        known = [
            g for g in groups
            if not g.identifier and not g.fixes and g.df < RARE and _MIN_FUZZY - 1 <= len(g.word) <= _MAX_FUZZY
        ]
        if known:
            await _add_corrections(session, known, per_word=24, max_df=COMMON)  # not "the" for "thie"
            if any(g.fixes for g in known):
                await take(await _match(session, groups, title_only=True, limit=ENOUGH))
                if not found:
                    await take(await _match(session, groups, title_only=False))
        if not found:
            await take(await _match_all_but_one(session, groups[:6]))
    ranks = {c.id: _rank(plan, c) for c in found.values()}
    for c in found.values():
        c.match_class = ranks[c.id][0]
    ranked = sorted(found.values(), key=lambda c: (*(-x for x in ranks[c.id]), c.id))
    return ranked[:MAX_RESULTS]


async def ranked_ids(session: AsyncSession, query: str) -> list[int]:
    """Every result of ``query`` (at most MAX_RESULTS record ids), best first."""
    return [c.id for c in await _ranked(session, query)]


async def search(session: AsyncSession, query: str, limit: int = 5, offset: int = 0) -> SearchPage:
    """Search the catalog: title, author, subject, series, publisher, ISBN/ISSN, in any script, in
    pinyin with or without spaces, with typos. Any text is a valid query (punctuation, operators of
    SQL or FTS syntax, emoji: they are folded away or matched as words, never interpreted)."""
    ranked = await _ranked(session, query or "")
    limit = max(1, min(limit, 50))
    offset = max(0, offset)
    page = ranked[offset : offset + limit]
    copies = await availability(session, [c.id for c in page])
    hits = []
    for c in page:
        title, title_latin, author, year, call_number = c.shown
        a = copies.get(c.id, Availability())
        hits.append(SearchHit(c.id, title, title_latin, author, year, a.call_number or call_number, a))
    matched_all = bool(ranked) and ranked[0].match_class > 0
    return SearchPage(query=query, hits=hits, total=len(ranked), offset=offset, limit=limit, matched_all=matched_all)


# ---------------------------------------------------------------------------------------------
# The details view
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """One copy as the details view shows it."""

    barcode: str
    location: str
    call_number: str
    status: str
    item_type: str
    due_at: dt.datetime | None = None  # when on loan


@dataclass(frozen=True)
class RecordDetails:
    """Everything the details view shows of a record: the description (original script first, its
    romanisation beside it), its identifiers, and every copy with location and status."""

    record_id: int
    control_number: str
    title: str
    title_latin: str
    author: str
    author_latin: str
    responsibility: str
    edition: str
    publication: str
    physical: str
    subjects: list[str]
    series: list[str]
    names: list[str]
    isbns: list[str]
    issns: list[str]
    call_number: str
    language: str
    year: str
    copies: list[Copy]
    availability: Availability


def _shown_isbn(value: str) -> str:
    code, _, qualifier = value.partition(" ")
    return f"{format_isbn(code)} {qualifier}".strip()


async def record_details(session: AsyncSession, record_id: int) -> RecordDetails | None:
    """The details view of a record, or None when there is no such record."""
    record = await session.get(Record, record_id)
    if record is None:
        return None
    d = record.details or {}
    items = (
        (
            await session.execute(
                select(Item).where(Item.record_id == record_id).order_by(Item.location, Item.barcode)
            )
        )
        .scalars()
        .all()
    )
    due = await _due_dates(session, [i.id for i in items])
    copies = [
        Copy(i.barcode, i.location, i.call_number or record.call_number, i.status, i.item_type, due.get(i.id))
        for i in items
    ]
    summary = (await availability(session, [record_id])).get(record_id, Availability())

    def text(key: str) -> str:
        value = d.get(key, "")
        latin = d.get(f"{key}_latin", "")
        return f"{value} ({latin})" if value and latin and latin != value else str(value or latin)

    return RecordDetails(
        record_id=record.id,
        control_number=record.control_number,
        title=record.title,
        title_latin=record.title_latin,
        author=record.author,
        author_latin=str(d.get("author_latin", "")),
        responsibility=text("responsibility"),
        edition=text("edition"),
        publication=text("publication"),
        physical=str(d.get("physical", "")),
        subjects=list(d.get("subjects", [])),
        series=list(d.get("series", [])),
        names=list(d.get("names", [])),
        isbns=[_shown_isbn(v) for v in d.get("isbns", [])],
        issns=list(d.get("issns", [])),
        call_number=record.call_number,
        language=record.language,
        year=record.year,
        copies=copies,
        availability=summary,
    )


async def _due_dates(session: AsyncSession, item_ids: list[int]) -> dict[int, dt.datetime]:
    """The due date of each copy on loan (none when this build has no circulation)."""
    if not item_ids:
        return {}
    try:
        from storage.circulation import Loan
    except ImportError:
        return {}
    rows = await session.execute(
        select(Loan.item_id, Loan.due_at).where(Loan.item_id.in_(item_ids), Loan.returned_at.is_(None))
    )
    return {item_id: due_at for item_id, due_at in rows.all()}
