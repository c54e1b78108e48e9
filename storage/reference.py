"""The reference desk (参考咨询): the answer base (FAQ), matching a reader's question against it, the
queue of questions for a librarian, live conversations relayed through the outbox, desk duty, saved
replies, the end of a conversation (transcript, rating, READ effort, saving the answer) and the
desk's statistics.

A question's life: ``asked`` (answers from the answer base were offered) → ``answered`` (the reader
said one answers it) or ``queued`` (the reader asked a librarian, or nothing matched) → ``active``
(a librarian on duty took it: exactly one of two takers wins, the take is a conditional UPDATE) →
``closed`` (either side ended it). Everything either side says is a :class:`DeskMessage` row written
in the same transaction as the outbox row that relays it, so a restart loses nothing and relays
nothing twice (an update is processed once).

Matching (:class:`AnswerIndex`) folds text as the catalog search does (NFKC, traditional →
simplified, case, diacritics), maps library words in either language to shared concepts ("renew",
"续借", "extend my loan" → one concept), stems English words, splits Chinese into characters and
pairs, reads Chinese questions in pinyin (a question typed in pinyin finds them), corrects English
typos against the answer base's own words, and scores by how much of the question an entry covers
(words weighted by rarity) with rapidfuzz similarity as the tie-breaker.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import functools
import io
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rapidfuzz import fuzz, process
from sqlalchemy import ForeignKey, String, Text, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue
from storage.people import StaffMember, User
from storage.policy import Policy
from storage.search import PINYIN_SYLLABLES, fold, is_chinese_text, pinyin_of, pinyin_splits
from storage.tickets import clip

MAX_TEXT = 2000  # characters of one question or message
MAX_OFFERED = 3  # answers offered from the answer base
TRANSCRIPT_LINES = 12  # messages in the transcript the reader gets
MESSAGE_CLIP = 2500
CAPTION_CLIP = 500
DOCUMENT = "doc:"  # an outbox photo_file_id with this prefix is a document (see bot.dispatcher)
FAQ_COLUMNS = ("question_zh", "question_en", "answer_zh", "answer_en", "tags")
EFFORT = range(1, 7)  # the READ scale (Reference Effort Assessment Data), 1–6


class Status(enum.StrEnum):
    ASKED = "asked"  # answers from the answer base offered; the reader has not said yet
    ANSWERED = "answered"  # the answer base answered it
    QUEUED = "queued"  # waiting for a librarian
    ACTIVE = "active"  # a librarian took it
    CLOSED = "closed"  # ended by either side


OPEN = (Status.QUEUED.value, Status.ACTIVE.value)


# --------------------------------------------------------------------------------------------------
# Models


class FaqEntry(Base):
    """One entry of the answer base, in both languages (either half may be empty)."""

    __tablename__ = "reference_answers"

    id: Mapped[int] = mapped_column(primary_key=True)
    question_zh: Mapped[str] = mapped_column(Text, default="")
    question_en: Mapped[str] = mapped_column(Text, default="")
    answer_zh: Mapped[str] = mapped_column(Text, default="")
    answer_en: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[str] = mapped_column(String(256), default="")
    added_by: Mapped[int | None]  # the staff member who saved it from a conversation
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeskDuty(Base):
    """A staff member on desk duty: they get new questions with a Take button."""

    __tablename__ = "reference_duty"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    since: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeskConversation(Base):
    """One question and, when a librarian took it, the conversation about it.

    ``staff_id``, ``rating`` and ``rated_at`` attribute the reader's rating to the staff member who
    handled the conversation (the last one, after a hand-over).
    """

    __tablename__ = "reference_conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    reader_id: Mapped[int | None] = mapped_column(index=True)  # Telegram id; None once erased
    lang: Mapped[str] = mapped_column(String(8), default="zh")  # the question's language
    question: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=Status.ASKED, index=True)
    offered: Mapped[str] = mapped_column(String(64), default="")  # answer-base ids offered, "3,7,12"
    answered_by: Mapped[int | None]  # the answer-base entry that answered it
    staff_id: Mapped[int | None] = mapped_column(index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[dt.datetime | None]
    taken_at: Mapped[dt.datetime | None]
    first_answer_at: Mapped[dt.datetime | None]
    ended_at: Mapped[dt.datetime | None]
    ended_by: Mapped[str | None] = mapped_column(String(8))  # reader, staff
    wait_told_at: Mapped[dt.datetime | None]  # the reader was told when to expect an answer
    handovers: Mapped[int] = mapped_column(default=0)
    rating: Mapped[int | None]  # 1–5, the reader's
    rated_at: Mapped[dt.datetime | None]
    effort: Mapped[int | None]  # READ scale 1–6, the staff member's
    saved_entry_id: Mapped[int | None]


class DeskMessage(Base):
    """One message of a conversation: from the reader, from staff, or a staff member's internal note."""

    __tablename__ = "reference_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("reference_conversations.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    side: Mapped[str] = mapped_column(String(8))  # reader, staff, note
    author_id: Mapped[int | None]
    text: Mapped[str] = mapped_column(Text, default="")
    file_id: Mapped[str | None] = mapped_column(String(256))  # Telegram's file_id; never downloaded
    file_kind: Mapped[str | None] = mapped_column(String(16))  # photo, document, record
    record_id: Mapped[int | None]  # a catalog record the librarian shared
    delivery_id: Mapped[int | None]  # the outbox row that relayed it


class SavedReply(Base):
    """A reply staff send often ("We are open until 22:00 today…"), shared by the desk."""

    __tablename__ = "reference_saved_replies"

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    added_by: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------------------------------
# Matching


# Library words in both languages mapped to shared concepts (longest phrase wins). A concept is a
# token of its own, so "extend my loan", "renewal" and "续借" meet, in either language.
CONCEPTS: dict[str, tuple[str, ...]] = {
    "renew": ("renew", "renews", "renewal", "renewals", "renewing", "renewed", "extend", "extended", "extension",
              "keep longer", "keep it longer", "a bit longer", "more time", "续借", "续期", "延期", "延长借期", "再借", "再看几天", "多借几天"),
    "borrow": ("borrow", "borrows", "borrowed", "borrowing", "loan", "loans", "check out", "checkout", "checked out",
               "lend", "lends", "lent", "lending", "take out", "take home", "借书", "借阅", "外借", "借出", "借走", "借"),
    "return": ("return", "returns", "returned", "returning", "give back", "bring back", "drop off", "book drop", "drop box",
               "还书", "归还", "还回", "在总馆还", "能还"),
    "fine": ("fine", "fines", "late fee", "late fees", "penalty", "penalties", "罚款", "滞纳金", "逾期费", "超期费", "罚金"),
    "cost": ("cost", "costs", "price", "charge", "charges", "pay", "paying", "how much", "free of charge",
             "多少钱", "收费", "费用", "要钱", "付款", "缴费", "缴纳", "交钱"),
    "overdue": ("overdue", "late", "past due", "逾期", "超期", "过期", "晚还", "到期"),
    "card": ("library card", "card", "cards", "membership", "读者证", "借书证", "借书卡", "图书卡", "图书证", "借阅证", "一卡通", "校园卡", "读者卡", "卡"),
    "lost": ("lost", "lose", "losing", "missing", "misplaced", "can't find", "cant find", "丢失", "遗失", "丢了", "弄丢", "丢"),
    "damage": ("damage", "damaged", "spilled", "spill", "torn", "broke", "broken book", "损坏", "污损", "弄坏", "撕", "赔"),
    "forgot": ("forgot", "forget", "forgotten", "忘记", "忘了", "想不起"),
    "hold": ("hold", "holds", "reserve", "reserved", "reserving", "reservation", "place a hold", "预约", "预定", "预借"),
    "cancel": ("cancel", "cancelled", "no longer need", "withdraw", "取消", "撤销", "不想要"),
    "hours": ("opening hours", "hours", "open", "opening", "close", "closing", "closed", "what time",
              "开放时间", "开馆", "闭馆", "几点", "开门", "关门", "开不开", "开放"),
    "holiday": ("holiday", "holidays", "national day", "spring festival", "vacation", "节假日", "假日", "放假", "国庆", "春节", "假期"),
    "exam": ("exam", "exams", "finals", "exam week", "exam weeks", "考试", "期末", "考试周"),
    "wifi": ("wifi", "wi fi", "wireless", "internet", "get online", "network", "无线网", "无线", "网络", "上网", "连网"),
    "print": ("print", "printer", "printers", "printing", "打印", "打印机"),
    "copy": ("photocopy", "photocopier", "photocopiers", "copier", "make copies", "copies", "复印", "复印机"),
    "scan": ("scan", "scanner", "scanning", "digitise", "digitize", "扫描", "扫描仪"),
    "room": ("study room", "group room", "discussion room", "meeting room", "room", "rooms",
             "研讨室", "讨论室", "学习室", "研修间", "会议室", "房间"),
    "seat": ("seat", "seats", "desk", "desks", "座位", "占座", "选座", "位子", "座"),
    "password": ("password", "pin", "密码"),
    "ill": ("interlibrary", "inter library", "ill", "document delivery", "another library", "other library", "other libraries",
            "different university", "other universities", "馆际互借", "文献传递", "馆际", "其他图书馆", "别的图书馆", "外馆"),
    "eresource": ("database", "databases", "e resource", "e resources", "electronic resource", "electronic resources",
                  "e journal", "ejournal", "online journal", "off campus", "remote access", "from home", "vpn",
                  "数据库", "电子资源", "校外访问", "远程访问", "电子期刊", "在家"),
    "ebook": ("ebook", "ebooks", "e book", "e books", "electronic book", "read online", "kindle", "电子书", "在线看", "在线阅读"),
    "download": ("download", "downloads", "offline", "下载"),
    "mobile": ("mobile", "app", "tablet", "ipad", "smartphone", "手机", "平板", "公众号", "微信", "移动"),
    "subscribe": ("subscribe", "subscribes", "subscription", "subscriptions", "订购", "订阅"),
    "openaccess": ("open access", "free articles", "开放获取"),
    "food": ("food", "eat", "eating", "drink", "drinks", "snack", "snacks", "coffee", "tea", "咖啡", "零食", "饮食", "吃东西", "吃", "喝水", "饮料", "食物"),
    "cafe": ("cafe", "coffee shop", "buy a coffee", "咖啡厅", "咖啡馆", "卖咖啡"),
    "locker": ("locker", "lockers", "bag", "bags", "backpack", "存包", "储物柜", "寄存", "包"),
    "lostfound": ("lost and found", "left my", "left behind", "失物招领", "落下", "遗落", "落在", "失物"),
    "purchase": ("suggest a purchase", "recommend", "recommendation", "purchase", "buy", "order a book", "should get",
                 "荐购", "推荐购买", "推荐", "采购", "购买", "买"),
    "donate": ("donate", "donation", "donations", "donating", "give my books", "give my old books", "捐赠", "捐书", "赠书", "捐"),
    "visitor": ("visitor", "visitors", "guest", "outsider", "non student", "not a student", "community", "outside the university",
                "校外人员", "访客", "外来", "社会读者", "社会人士", "校外读者", "非本校"),
    "alumni": ("alumni", "alumnus", "graduated", "graduates", "校友", "毕业了"),
    "clearance": ("clearance", "outstanding loans", "leaving the university", "离校", "离校手续"),
    "thesis": ("thesis", "theses", "dissertation", "dissertations", "学位论文", "毕业论文", "硕士论文", "博士论文"),
    "citation": ("cite", "citation", "citations", "citing", "referencing", "reference style", "bibliography", "apa",
                 "引用", "参考文献", "文献格式"),
    "refsoftware": ("endnote", "zotero", "mendeley", "reference management", "文献管理"),
    "plagiarism": ("plagiarism", "similarity check", "duplicate check", "originality", "查重", "抄袭", "相似度"),
    "limit": ("how many", "limit", "maximum", "max", "quota", "几本", "多少本", "上限", "最多", "数量", "几次", "次数"),
    "period": ("how long", "loan period", "how many days", "多久", "多长时间", "借期", "几天", "期限", "多长"),
    "apply": ("apply", "application", "register", "registration", "sign up", "办理", "申请", "注册", "办卡", "办证", "办一张"),
    "access": ("wheelchair", "disability", "disabled", "accessible", "accessibility", "无障碍", "残障", "轮椅", "残疾"),
    "child": ("child", "children", "kid", "kids", "儿童", "少儿", "孩子", "小孩"),
    "charge_power": ("charging", "charger", "charge my", "socket", "sockets", "outlet", "outlets", "plug", "power",
                     "充电", "插座", "电源"),
    "journal": ("journal", "journals", "periodical", "periodicals", "magazine", "magazines", "newspaper", "newspapers",
                "期刊", "杂志", "报纸", "报刊"),
    "article": ("article", "articles", "paper", "papers", "论文", "文章"),
    "rare": ("rare book", "rare books", "ancient", "manuscript", "manuscripts", "special collection", "special collections",
             "古籍", "善本", "特藏", "手稿"),
    "selfservice": ("self checkout", "self service", "kiosk", "machine", "自助借还机", "自助", "机器"),
    "history": ("borrowing history", "reading history", "history", "borrowed before", "借阅记录", "借阅历史", "记录"),
    "parking": ("parking", "park my car", "car park", "park", "停车", "车位", "开车"),
    "photo": ("photograph", "photos", "photo", "take pictures", "camera", "拍照", "照相"),
    "noise": ("quiet", "noise", "noisy", "silent", "silence", "安静", "噪音", "吵"),
    "group": ("group", "groups", "team", "小组", "团队"),
    "pickup": ("pick up", "pickup", "collect", "取书", "领取", "去哪儿拿", "拿"),
    "phone": ("phone call", "phone calls", "phone", "call", "calls", "telephone", "电话", "打电话", "接电话"),
    "ask": ("ask a librarian", "librarian", "librarians", "help", "咨询", "馆员", "帮忙", "帮助"),
    "subject_librarian": ("subject librarian", "one to one", "appointment", "学科馆员", "预约咨询"),
    "training": ("workshop", "workshops", "training", "class", "classes", "course", "courses", "literacy", "讲座", "培训", "课程", "课", "信息素养"),
    "event": ("event", "events", "exhibition", "exhibitions", "what's on", "whats on", "活动", "展览", "讲座"),
    "venue": ("hold an event", "venue", "rent", "renting", "hire", "club meeting", "场地", "举办", "社团"),
    "complaint": ("complain", "complaint", "complaints", "feedback", "suggestion", "投诉", "建议", "意见"),
    "problem": ("broken", "not working", "doesn't work", "jammed", "out of order", "report a problem", "problem",
                "坏了", "报修", "故障", "不能用"),
    "account": ("account", "contact details", "personal details", "profile", "账户", "账号", "联系方式"),
    "update": ("update", "change", "changed", "修改", "更改", "换了", "改"),
    "privacy": ("privacy", "personal data", "personal information", "隐私", "个人信息", "被别人看到"),
    "delete": ("delete", "remove all", "close my account", "注销", "删除"),
    "catalog": ("catalog", "catalogue", "opac", "search the catalog", "have a certain book", "查书", "有没有这本书", "馆藏目录"),
    "computer": ("computer", "computers", "pc", "pcs", "电脑", "计算机"),
    "laptop": ("laptop", "laptops", "notebook computer", "notebooks computers", "笔记本电脑", "笔记本"),
    "dvd": ("dvd", "dvds", "film", "films", "movie", "movies", "光盘", "影碟", "电影"),
    "standard": ("standard", "standards", "patent", "patents", "标准", "国标", "专利"),
    "statistics": ("statistics", "census", "data set", "figures", "统计", "年鉴", "统计数据"),
    "emergency": ("fire", "emergency", "evacuate", "emergency exits", "火灾", "着火", "紧急", "撤离", "疏散"),
    "notify": ("notify", "notified", "notification", "remind", "reminder", "reminders", "提醒", "通知"),
    "friend": ("friend", "someone else", "someone else's", "another person", "别人", "同学", "朋友", "替"),
    "foreign": ("other languages", "foreign", "english books", "books in english", "外文", "原版", "英文"),
    "maker": ("makerspace", "3d printer", "3d printing", "创客", "3d打印"),
    "textbook": ("textbook", "textbooks", "course reserve", "course reserves", "on reserve", "professor",
                 "教材", "教参", "课本", "老师指定"),
    "newbook": ("new books", "new arrivals", "新书"),
    "toilet": ("toilet", "toilets", "restroom", "water fountain", "water bottle", "洗手间", "厕所", "饮水机", "热水"),
    "map": ("map", "maps", "地图"),
    "branch": ("branch", "branches", "分馆"),
}

_EN_STOP = frozenset(
    """a an the i me my mine you your yours we our us it its is are am was were be been being do does did
    can could would should will shall may might must to of in on at by for from with about into and or
    if so that this these those there here how what which who whom please hi hello thanks thank get got
    want wanted need needed like know tell some any just also still really way ok okay what whats have has
    use using allowed allow possible""".split()
)
_ZH_STOP_WORDS = (
    "怎么办", "为什么", "在哪", "会不会", "时候", "请问", "怎么", "怎样", "如何", "什么", "可以", "能否", "能不能", "可不可以", "是否", "一下", "需要", "哪里", "哪儿",
    "我们", "你们", "您好", "你好", "谢谢", "有没有", "是不是", "图书馆", "本馆", "进去", "进来", "带",
)
_ZH_STOP_CHARS = frozenset("的了吗呢吧啊呀我你您他她它是在有和与及或要想能会把被给对让这那就都也么个一些哪吗？?，,。.！!、")
_WORD = re.compile(r"[a-z0-9]+")
_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]+")


@functools.cache
def _concept_patterns() -> tuple[re.Pattern[str], dict[str, str], re.Pattern[str], dict[str, str]]:
    """One regex for the English phrases (on word boundaries) and one for the Chinese, longest first."""
    english: dict[str, str] = {}
    chinese: dict[str, str] = {}
    for concept, phrases in CONCEPTS.items():
        for phrase in phrases:
            folded = fold(phrase)
            (chinese if _HAN_RUN.search(folded) else english)[folded] = concept
    en = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(english, key=len, reverse=True)) + r")\b")
    zh = re.compile("|".join(re.escape(p) for p in sorted(chinese, key=len, reverse=True)))
    return en, english, zh, chinese


def _stem(word: str) -> str:
    """A light English stemmer: plurals and common verb endings ("renewing" → "renew")."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith("ss"):
                return word
            if suffix == "es" and not word[:-2].endswith(("s", "x", "ch", "sh")):
                continue
            return word[: -len(suffix)] + repl
    return word


def _clean(text: str) -> str:
    """Folded text with punctuation as spaces (hyphens and apostrophes join nothing), and a space
    between Chinese and Latin letters ("连wifi" → "连 wifi")."""
    clean = re.sub(r"[^\w\u3400-\u9fff]+", " ", fold(text).replace("'", "")).strip()
    return re.sub(r"(?<=[\u3400-\u9fff])(?=[a-z0-9])|(?<=[a-z0-9])(?=[\u3400-\u9fff])", " ", clean)


def _zh_tokens(run: str) -> list[str]:
    """Characters and character pairs of a Chinese run, without the filler characters."""
    for word in _ZH_STOP_WORDS:
        run = run.replace(word, " ")
    out: list[str] = []
    for piece in re.split(r"\s+", "".join(" " if c in _ZH_STOP_CHARS else c for c in run)):
        out.extend(piece)
        out.extend(piece[i : i + 2] for i in range(len(piece) - 1))
    return out


def features(text: str) -> list[str]:
    """The tokens of a question for matching: concepts (``#renew``), stemmed English words,
    Chinese characters and pairs; folded as the catalog search folds."""
    clean = _clean(text)
    en, en_map, zh, zh_map = _concept_patterns()
    out: list[str] = []
    clean = en.sub(lambda m: f" #{en_map[m.group(1)]} ", clean)
    clean = zh.sub(lambda m: f" #{zh_map[m.group(0)]} ", clean)
    for piece in clean.split():
        if piece.startswith("#"):
            out.append(piece)
            continue
        for run in _HAN_RUN.findall(piece):
            out.extend(_zh_tokens(run))
        out.extend(_stem(word) for word in _WORD.findall(piece) if word not in _EN_STOP)
    return out


def pinyin_features(text: str) -> list[str]:
    """Pinyin syllable pairs of a Chinese text ("续借" → ``p:xu_jie``), so pinyin questions find it."""
    syllables = pinyin_of(text).split()
    return [f"p:{a}_{b}" for a, b in zip(syllables, syllables[1:], strict=False)]


def query_pinyin_features(text: str) -> list[str]:
    """The pinyin pairs of a question typed in pinyin ("xujie", "xu jie zenme ban"); [] otherwise."""
    clean = _clean(text)
    if not clean or not clean.isascii():
        return []
    syllables: list[str] = []
    for word in clean.split():
        if word in PINYIN_SYLLABLES:
            syllables.append(word)
            continue
        splits = pinyin_splits(word, limit=1)
        if not splits:
            return []  # an English word: not pinyin
        syllables.extend(splits[0])
    return [f"p:{a}_{b}" for a, b in zip(syllables, syllables[1:], strict=False)]


def question_language(text: str) -> str:
    """``zh`` for a question with Chinese characters, ``en`` otherwise."""
    return "zh" if is_chinese_text(text) else "en"


@dataclass(frozen=True)
class Candidate:
    """An entry of the answer base as the index knows it."""

    id: int
    question_zh: str
    question_en: str
    tags: str = ""


@dataclass(frozen=True)
class Scored:
    entry_id: int
    score: float


@dataclass
class _Side:
    entry_id: int
    tokens: Counter[str]
    folded: str


class AnswerIndex:
    """The answer base held in memory for matching (a few thousand entries match in milliseconds)."""

    THRESHOLD = 0.26  # below this an entry is not offered (measured with bench/faq.py)

    def __init__(self, entries: Iterable[Candidate]) -> None:
        self.sides: list[_Side] = []
        df: Counter[str] = Counter()
        count = 0
        for entry in entries:
            count += 1
            seen: set[str] = set()
            tag_tokens = features(entry.tags.replace(",", " "))
            for question in (entry.question_zh, entry.question_en):
                if not question.strip():
                    continue
                tokens = Counter(features(question)) + Counter(tag_tokens)
                if _HAN_RUN.search(fold(question)):
                    tokens.update(pinyin_features(question))
                self.sides.append(_Side(entry.id, tokens, _clean(question)))
                seen.update(tokens)
            df.update(seen)
        self.size = count
        self.idf = {t: math.log((count + 1) / (n + 0.5)) + 0.1 for t, n in df.items()}
        # Words a typo is corrected to: the answer base's own, and the concepts' English words.
        words = {t: t for t in df if t.isascii() and t.isalpha() and len(t) >= 4}
        _, english, _, _ = _concept_patterns()
        words.update({w: f"#{c}" for w, c in english.items() if w.isalpha() and len(w) >= 4 and f"#{c}" in df})
        self.corrections = words
        self.vocabulary = sorted(words)
        self.default_idf = math.log(count + 1) + 0.1

    def _weight(self, token: str) -> float:
        # A word no entry has tells what the question is about as much as a rare word, but it cannot
        # tell entries apart: half weight, so that one such word does not hide a good match. A
        # single Chinese character says less than a pair or a concept: half weight too.
        weight = self.idf.get(token, self.default_idf / 2)
        return weight / 2 if len(token) == 1 and not token.isascii() else weight

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one index lives as long as its answer base)
    def _correction(self, word: str) -> str | None:
        """The answer base's own word closest to an unknown English word (a typo), if close enough."""
        if word in self.idf or len(word) < 4 or not word.isascii() or not word.isalpha():
            return None
        found = process.extractOne(word, self.vocabulary, scorer=fuzz.ratio, score_cutoff=75)
        return self.corrections[found[0]] if found else None

    def _query(self, text: str) -> list[tuple[str, float]]:
        """The question's tokens with their weights (a corrected typo counts a little less)."""
        out: list[tuple[str, float]] = []
        for token in dict.fromkeys(features(text)):
            fixed = self._correction(token)
            if fixed is not None:
                out.append((fixed, 0.8))
            else:
                out.append((token, 1.0))
        return out

    def match(self, text: str, limit: int = MAX_OFFERED) -> list[Scored]:
        """The best entries for a question, best first, each at most once; [] when nothing is close."""
        if not self.sides or not text.strip():
            return []
        readings = [self._query(text)]
        pinyin = query_pinyin_features(text)
        if pinyin:
            readings.append([(t, 1.0) for t in dict.fromkeys(pinyin)])
        folded = _clean(text)
        best: dict[int, float] = {}
        for query in readings:
            total = sum(self._weight(t) * w for t, w in query)
            if total <= 0:
                continue
            for side in self.sides:
                hit = sum(self._weight(t) * w for t, w in query if t in side.tokens)
                if hit <= 0:
                    continue
                side_total = sum(self._weight(t) for t in side.tokens) or 1.0
                score = 0.6 * hit / total + 0.2 * min(1.0, hit / side_total) + 0.2 * fuzz.token_set_ratio(folded, side.folded) / 100
                if score > best.get(side.entry_id, 0.0):
                    best[side.entry_id] = score
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
        return [Scored(i, s) for i, s in ranked[:limit] if s >= self.THRESHOLD]


_INDEX: dict[str, tuple[tuple[int, dt.datetime | None, int], AnswerIndex]] = {}


async def answer_index(session: AsyncSession) -> AnswerIndex:
    """The index of the answer base, rebuilt when an entry was added, changed or removed."""
    key = str(getattr(session.bind, "url", ""))  # one cached index per database
    stamp_row = (await session.execute(select(func.count(), func.max(FaqEntry.updated_at), func.max(FaqEntry.id)))).one()
    stamp = (int(stamp_row[0] or 0), stamp_row[1], int(stamp_row[2] or 0))
    cached = _INDEX.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    rows = await session.execute(select(FaqEntry.id, FaqEntry.question_zh, FaqEntry.question_en, FaqEntry.tags))
    index = AnswerIndex(Candidate(*row) for row in rows)
    _INDEX[key] = (stamp, index)
    return index


@dataclass(frozen=True)
class Offer:
    """An answer offered to a reader, in their question's language."""

    entry_id: int
    question: str
    answer: str


def in_language(entry: FaqEntry, lang: str) -> tuple[str, str]:
    """The entry's question and answer in ``lang``, the other language filling a missing half."""
    question = (entry.question_zh if lang == "zh" else entry.question_en) or entry.question_en or entry.question_zh
    answer = (entry.answer_zh if lang == "zh" else entry.answer_en) or entry.answer_en or entry.answer_zh
    return question, answer


async def find_answers(session: AsyncSession, question: str, limit: int = MAX_OFFERED) -> list[Offer]:
    """Up to ``limit`` answers from the answer base for a question, in the question's language."""
    index = await answer_index(session)
    lang = question_language(question)
    offers = []
    for scored in index.match(question, limit):
        entry = await session.get(FaqEntry, scored.entry_id)
        if entry is not None:
            q, a = in_language(entry, lang)
            offers.append(Offer(entry.id, q, a))
    return offers


# --------------------------------------------------------------------------------------------------
# The answer base: CSV import and export, entries added in the chat


class FaqError(ValueError):
    """The CSV file cannot be imported; the message says why in one line."""


@dataclass
class FaqImport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # "line 7: no question"


def _norm_question(text: str) -> str:
    return " ".join(_clean(text).split())


async def import_faq(session: AsyncSession, path: Path, now: dt.datetime) -> FaqImport:
    """Load the answer base from a CSV with columns ``question_zh,question_en,answer_zh,answer_en,tags``.

    A row whose question (in either language, compared folded) is already in the base updates that
    entry; a row without any question or without any answer is skipped with its line number.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FaqError(f"file not found: {path}") from None
    except OSError as exc:
        raise FaqError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FaqError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in FAQ_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise FaqError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(FAQ_COLUMNS)}")
    existing = list(await session.scalars(select(FaqEntry)))
    by_question: dict[str, FaqEntry] = {}
    for known in existing:
        for q in (known.question_zh, known.question_en):
            if q.strip():
                by_question.setdefault(_norm_question(q), known)
    result = FaqImport()
    for row in reader:
        line = reader.line_num
        values = {c: (row.get(c) or "").strip() for c in FAQ_COLUMNS}
        if not values["question_zh"] and not values["question_en"]:
            result.skipped.append(f"line {line}: no question")
            continue
        if not values["answer_zh"] and not values["answer_en"]:
            result.skipped.append(f"line {line}: no answer")
            continue
        if any(len(values[c]) > MAX_TEXT * 2 for c in FAQ_COLUMNS):
            result.skipped.append(f"line {line}: a field longer than {MAX_TEXT * 2} characters")
            continue
        keys = [_norm_question(values[c]) for c in ("question_zh", "question_en") if values[c]]
        entry: FaqEntry | None = next((by_question[k] for k in keys if k in by_question), None)
        if entry is None:
            entry = FaqEntry(**values, created_at=now, updated_at=now)
            session.add(entry)
            result.added += 1
        elif all(getattr(entry, c) == values[c] for c in FAQ_COLUMNS):
            result.unchanged += 1
            continue
        else:
            for c in FAQ_COLUMNS:
                setattr(entry, c, values[c])
            entry.updated_at = now
            result.updated += 1
        for k in keys:
            by_question[k] = entry
    await session.flush()
    return result


async def export_faq(session: AsyncSession) -> str:
    """The answer base as CSV (the import's columns), oldest entry first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FAQ_COLUMNS)
    for entry in await session.scalars(select(FaqEntry).order_by(FaqEntry.id)):
        writer.writerow([getattr(entry, c) for c in FAQ_COLUMNS])
    return out.getvalue()


async def add_entry(
    session: AsyncSession, question: str, answer: str, staff_id: int | None, now: dt.datetime, tags: str = ""
) -> FaqEntry:
    """Add a question and its answer in the question's language (the other half stays empty)."""
    lang = question_language(question)
    entry = FaqEntry(
        question_zh=question.strip() if lang == "zh" else "", question_en=question.strip() if lang == "en" else "",
        answer_zh=answer.strip() if lang == "zh" else "", answer_en=answer.strip() if lang == "en" else "",
        tags=tags, added_by=staff_id, created_at=now, updated_at=now,
    )
    session.add(entry)
    await session.flush()
    return entry


# --------------------------------------------------------------------------------------------------
# Desk hours


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def desk_open(policy: Policy, when: dt.datetime, tz: ZoneInfo) -> bool:
    """True when the reference desk is staffed at ``when`` by the policy's desk hours."""
    local = when.astimezone(tz)
    minute = local.hour * 60 + local.minute
    return any(
        local.isoweekday() in h.weekdays and _minutes(h.opens) <= minute < _minutes(h.closes)
        for h in policy.service.reference_hours
    )


def next_opening(policy: Policy, when: dt.datetime, tz: ZoneInfo) -> dt.datetime | None:
    """The next time the desk opens after ``when`` (None when the policy gives it no hours)."""
    local = when.astimezone(tz)
    best: dt.datetime | None = None
    for days_ahead in range(8):
        day = (local + dt.timedelta(days=days_ahead)).date()
        for h in policy.service.reference_hours:
            if day.isoweekday() not in h.weekdays:
                continue
            opens = dt.datetime.combine(day, dt.time(), tz) + dt.timedelta(minutes=_minutes(h.opens))
            if opens > local and (best is None or opens < best):
                best = opens
        if best is not None:
            return best
    return best


def expected_by(policy: Policy, when: dt.datetime, tz: ZoneInfo) -> dt.datetime | None:
    """When a reader whose question nobody has taken can expect an answer: now plus the waiting time
    while the desk is open, else its next opening plus the waiting time."""
    wait = dt.timedelta(minutes=policy.service.reference_wait_minutes)
    if desk_open(policy, when, tz):
        return when + wait
    opening = next_opening(policy, when, tz)
    return None if opening is None else opening + wait


# --------------------------------------------------------------------------------------------------
# Asking


class Outcome(enum.StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    TAKEN = "taken"  # another librarian took it first
    BUSY = "busy"  # the librarian is already in a conversation
    NOT_YOURS = "not_yours"
    FINISHED = "finished"  # closed: no more messages
    NOT_ON_DUTY = "not_on_duty"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    ALREADY = "already"  # already rated, tagged or saved
    BAD_VALUE = "bad_value"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    conversation: DeskConversation | None = None
    other: str = ""  # for TAKEN: who has it
    position: int = 0  # place in the queue
    expected: dt.datetime | None = None
    desk_open: bool = True


def text_problem(text: str, *, attachment: bool = False) -> Outcome | None:
    stripped = (text or "").strip()
    if not stripped and not attachment:
        return Outcome.EMPTY
    if len(stripped) > MAX_TEXT:
        return Outcome.TOO_LONG
    return None


async def open_conversation_of(session: AsyncSession, telegram_id: int) -> DeskConversation | None:
    """The reader's queued or active conversation, or the one the staff member is handling."""
    found = await session.scalar(
        select(DeskConversation)
        .where(DeskConversation.status.in_(OPEN))
        .where((DeskConversation.reader_id == telegram_id) | ((DeskConversation.staff_id == telegram_id) & (DeskConversation.status == Status.ACTIVE)))
        .order_by(DeskConversation.id.desc())
        .limit(1)
    )
    return found


async def ask(session: AsyncSession, reader_id: int, question: str, now: dt.datetime) -> tuple[DeskConversation, list[Offer]]:
    """Record a question and find answers for it in the answer base (the caller queues it for a
    librarian when there are none)."""
    offers = await find_answers(session, question)
    conversation = DeskConversation(
        reader_id=reader_id, lang=question_language(question), question=question.strip(), status=Status.ASKED,
        offered=",".join(str(o.entry_id) for o in offers), created_at=now,
    )
    session.add(conversation)
    await session.flush()
    return conversation, offers


async def answered_by_base(session: AsyncSession, conversation_id: int, reader_id: int, entry_id: int) -> Result:
    """The reader says an offered answer answers their question."""
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None or conversation.reader_id != reader_id:
        return Result(Outcome.NOT_FOUND)
    if str(entry_id) not in conversation.offered.split(","):
        return Result(Outcome.BAD_VALUE, conversation)
    done = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.status == Status.ASKED)
        .values(status=Status.ANSWERED, answered_by=entry_id)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(conversation)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.ALREADY, conversation)
    return Result(Outcome.OK, conversation)


async def on_duty(session: AsyncSession) -> list[int]:
    """The staff members on desk duty (former staff are left out)."""
    rows = await session.scalars(
        select(DeskDuty.telegram_id).join(StaffMember, StaffMember.telegram_id == DeskDuty.telegram_id).order_by(DeskDuty.since)
    )
    return list(rows)


async def is_on_duty(session: AsyncSession, staff_id: int) -> bool:
    return await session.get(DeskDuty, staff_id) is not None


async def set_duty(session: AsyncSession, staff_id: int, on: bool, now: dt.datetime) -> None:
    """Go on or off desk duty."""
    current = await session.get(DeskDuty, staff_id)
    if on and current is None:
        session.add(DeskDuty(telegram_id=staff_id, since=now))
    elif not on and current is not None:
        await session.delete(current)
    await session.flush()


async def queue(session: AsyncSession) -> list[DeskConversation]:
    """Questions waiting for a librarian, oldest first."""
    return list(await session.scalars(
        select(DeskConversation).where(DeskConversation.status == Status.QUEUED)
        .order_by(DeskConversation.queued_at, DeskConversation.id)
    ))


async def active_conversations(session: AsyncSession) -> list[DeskConversation]:
    return list(await session.scalars(
        select(DeskConversation).where(DeskConversation.status == Status.ACTIVE).order_by(DeskConversation.taken_at)
    ))


async def position_in_queue(session: AsyncSession, conversation: DeskConversation) -> int:
    """1 for the next question to be taken."""
    ahead = await session.scalar(
        select(func.count()).select_from(DeskConversation).where(
            DeskConversation.status == Status.QUEUED,
            (DeskConversation.queued_at < conversation.queued_at)
            | ((DeskConversation.queued_at == conversation.queued_at) & (DeskConversation.id < conversation.id)),
        )
    )
    return int(ahead or 0) + 1


async def expected_wait(session: AsyncSession, position: int, policy: Policy) -> dt.timedelta:
    """The expected wait of the question at ``position``: the median time to a take over the last 20
    taken questions (the policy's waiting time without history), per question ahead, shared among
    the librarians on duty."""
    rows = list(await session.execute(
        select(DeskConversation.queued_at, DeskConversation.taken_at)
        .where(DeskConversation.taken_at.is_not(None), DeskConversation.queued_at.is_not(None))
        .order_by(DeskConversation.taken_at.desc()).limit(20)
    ))
    waits = [(taken - queued).total_seconds() for queued, taken in rows if taken and queued]
    per_question = statistics.median(waits) if waits else policy.service.reference_wait_minutes * 60
    staff = max(1, len(await on_duty(session)))
    return dt.timedelta(seconds=max(60.0, per_question * position / staff))


def _take_button(conversation_id: int) -> list[list[list[Any]]]:
    return [[["reference.btn_take", f"rf:take:{conversation_id}"]]]


def staff_buttons(conversation_id: int) -> list[list[list[Any]]]:
    """What a librarian can do in a conversation besides writing."""
    return [
        [["reference.btn_note", f"rf:note:{conversation_id}"], ["reference.btn_saved", f"rf:saved:{conversation_id}"]],
        [["reference.btn_record", f"rf:rec:{conversation_id}"], ["reference.btn_handover", f"rf:hand:{conversation_id}"]],
        [["reference.btn_end", f"rf:end:{conversation_id}"]],
    ]


async def to_librarian(
    session: AsyncSession, conversation_id: int, reader_id: int, policy: Policy, now: dt.datetime, tz: ZoneInfo
) -> Result:
    """Queue the question for a librarian: the librarians on duty get it with a Take button; the
    reader learns their place in the queue and when to expect an answer."""
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None or conversation.reader_id != reader_id:
        return Result(Outcome.NOT_FOUND)
    other = await open_conversation_of(session, reader_id)
    if other is not None and other.id != conversation_id:
        return Result(Outcome.BUSY, other)
    done = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.status == Status.ASKED)
        .values(status=Status.QUEUED, queued_at=now)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(conversation)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.ALREADY, conversation)
    params = {"number": conversation.id, "question": clip(conversation.question, MESSAGE_CLIP), "language": {"zh": "中文", "en": "English"}[conversation.lang]}
    for staff_id in await on_duty(session):
        await enqueue(
            session, staff_id, "reference.staff_new", params, kind="reference", priority=Priority.ALERT,
            buttons=_take_button(conversation.id), dedupe_key=f"reference:{conversation.id}:new:{staff_id}",
        )
    position = await position_in_queue(session, conversation)
    is_open = desk_open(policy, now, tz)
    expected: dt.datetime | None
    if is_open:
        expected = now + await expected_wait(session, position, policy)
    else:
        expected = expected_by(policy, now, tz)
        conversation.wait_told_at = now  # told at once; the waiting job need not tell them again
    return Result(Outcome.OK, conversation, position=position, expected=expected, desk_open=is_open)


async def staff_name(session: AsyncSession, telegram_id: int | None) -> str:
    """How a librarian is named (to readers and colleagues)."""
    if telegram_id is None:
        return "—"
    member = await session.get(StaffMember, telegram_id)
    if member is not None and member.name:
        return member.name
    user = await session.get(User, telegram_id)
    return user.first_name if user is not None and user.first_name else str(telegram_id)


async def messages(session: AsyncSession, conversation_id: int, *, notes: bool = True) -> list[DeskMessage]:
    query = select(DeskMessage).where(DeskMessage.conversation_id == conversation_id)
    if not notes:
        query = query.where(DeskMessage.side != "note")
    return list(await session.scalars(query.order_by(DeskMessage.at, DeskMessage.id)))


def _attachment(message: DeskMessage) -> str:
    return {"photo": "📷", "document": "📄", "record": "📚"}.get(message.file_kind or "", "")


async def _history_text(session: AsyncSession, conversation: DeskConversation, labels: Labels, *, notes: bool) -> dict[str, str]:
    """The conversation so far as lines, in both languages (staff names for staff, "Librarian" for readers)."""
    rows = await messages(session, conversation.id, notes=notes)
    names = {m.author_id: await staff_name(session, m.author_id) for m in rows if m.side != "reader"}
    out: dict[str, str] = {}
    for lang in ("zh", "en"):
        lines = []
        for m in rows[-TRANSCRIPT_LINES:]:
            if m.side == "reader":
                who = _in(lang, labels.reader)
            elif notes:
                who = clip(names.get(m.author_id, "—"), 60) + (_in(lang, labels.note) if m.side == "note" else "")
            else:
                who = _in(lang, labels.librarian)
            lines.append(f"<b>{who}</b>: {clip(m.text, 300)}{' ' + _attachment(m) if _attachment(m) else ''}")
        out[lang] = "\n".join(lines)
    return out


@dataclass(frozen=True)
class Labels:
    """Bilingual words the store puts in pushed messages (they live in the bot's catalogue)."""

    reader: Mapping[str, str] | str = "Reader"
    librarian: Mapping[str, str] | str = "Librarian"
    note: Mapping[str, str] | str = " (note)"
    none: Mapping[str, str] | str = "—"


def _in(lang: str, value: Mapping[str, str] | str) -> str:
    return value.get(lang, "") if isinstance(value, Mapping) else value


async def take(session: AsyncSession, conversation_id: int, staff_id: int, now: dt.datetime, labels: Labels) -> Result:
    """A librarian takes a queued question. Of two pressing at once exactly one wins (a conditional
    ``UPDATE … WHERE status = 'queued'``); the other is told who has it. The winner gets the question
    with everything the reader added while waiting; the reader is told who is helping them."""
    busy = await session.scalar(
        select(DeskConversation.id).where(DeskConversation.staff_id == staff_id, DeskConversation.status == Status.ACTIVE)
    )
    if busy is not None and busy != conversation_id:
        return Result(Outcome.BUSY, await session.get(DeskConversation, busy))
    won = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.status == Status.QUEUED)
        .values(status=Status.ACTIVE, staff_id=staff_id, taken_at=now)
        .execution_options(synchronize_session=False)
    )
    conversation = await session.get(DeskConversation, conversation_id, populate_existing=True)
    if conversation is None:
        return Result(Outcome.NOT_FOUND)
    if not won.rowcount:  # type: ignore[attr-defined]
        if conversation.status == Status.ACTIVE:
            return Result(Outcome.TAKEN, conversation, other=await staff_name(session, conversation.staff_id))
        return Result(Outcome.FINISHED, conversation)
    await _send_card(session, conversation, staff_id, labels, "reference.taken_card")
    if conversation.reader_id is not None:
        await enqueue(
            session, conversation.reader_id, "reference.taken_to_reader",
            {"number": conversation.id, "name": clip(await staff_name(session, staff_id), 80)},
            kind="reference", priority=Priority.ALERT, dedupe_key=f"reference:{conversation.id}:taken:{staff_id}",
        )
    return Result(Outcome.OK, conversation)


async def _send_card(session: AsyncSession, conversation: DeskConversation, staff_id: int, labels: Labels, key: str) -> None:
    history = await _history_text(session, conversation, labels, notes=True)
    await enqueue(
        session, staff_id, key,
        {"number": conversation.id, "question": clip(conversation.question, 1500),
         "history": {lang: ("\n\n" + text if text else "") for lang, text in history.items()}},
        kind="reference", priority=Priority.ALERT, buttons=staff_buttons(conversation.id),
        dedupe_key=f"reference:{conversation.id}:card:{staff_id}:{conversation.handovers}",
    )


@dataclass(frozen=True)
class Attachment:
    """What comes with a relayed message: a photo or document (Telegram file_id) or a catalog record."""

    kind: str  # photo, document, record
    file_id: str | None = None
    record_id: int | None = None
    record_text: Mapping[str, str] | str = ""  # the record as the reader sees it, in both languages
    holdable: bool = False


async def relay(
    session: AsyncSession, conversation_id: int, sender_id: int, text: str, now: dt.datetime,
    *, attachment: Attachment | None = None, note: bool = False,
) -> Result:
    """Relay one message to the other side (or keep a staff member's internal note unsent).

    The message row and the outbox row that carries it are one transaction.
    """
    conversation = await session.get(DeskConversation, conversation_id, with_for_update=True)
    if conversation is None:
        return Result(Outcome.NOT_FOUND)
    if conversation.status not in OPEN:
        return Result(Outcome.FINISHED, conversation)
    from_reader = sender_id == conversation.reader_id
    if not from_reader and (conversation.status != Status.ACTIVE or conversation.staff_id != sender_id):
        return Result(Outcome.NOT_YOURS, conversation, other=await staff_name(session, conversation.staff_id))
    problem = text_problem(text, attachment=attachment is not None)
    if problem is not None:
        return Result(problem, conversation)
    text = text.strip()
    side = "reader" if from_reader else ("note" if note else "staff")
    delivery = None
    if side == "staff" and conversation.reader_id is not None:
        conversation.first_answer_at = conversation.first_answer_at or now
        delivery = await _relay_to(session, conversation, conversation.reader_id, "reference.to_reader", text, attachment,
                                   name=await staff_name(session, sender_id))
    elif side == "reader" and conversation.status == Status.ACTIVE and conversation.staff_id is not None:
        delivery = await _relay_to(session, conversation, conversation.staff_id, "reference.to_staff", text, attachment,
                                   buttons=[[["reference.btn_end", f"rf:end:{conversation.id}"]]])
    # A queued question's additions wait for whoever takes it: they see them on the card then.
    session.add(DeskMessage(
        conversation_id=conversation.id, at=now, side=side, author_id=sender_id, text=text,
        file_id=attachment.file_id if attachment else None, file_kind=attachment.kind if attachment else None,
        record_id=attachment.record_id if attachment else None, delivery_id=delivery.id if delivery else None,
    ))
    await session.flush()
    return Result(Outcome.OK, conversation)


async def _relay_to(
    session: AsyncSession, conversation: DeskConversation, chat_id: int, key: str, text: str,
    attachment: Attachment | None, *, name: str = "", buttons: list[list[list[Any]]] | None = None,
) -> Any:
    file_id = None
    if attachment is not None and attachment.kind == "photo":
        file_id = attachment.file_id
    elif attachment is not None and attachment.kind == "document" and attachment.file_id:
        file_id = DOCUMENT + attachment.file_id
    limit = CAPTION_CLIP if file_id else MESSAGE_CLIP
    params: dict[str, Any] = {"number": conversation.id, "name": clip(name, 80), "text": clip(text, limit)}
    if attachment is not None and attachment.kind == "record":
        key = "reference.record_to_reader"
        params["record"] = attachment.record_text
        if attachment.holdable and attachment.record_id is not None:
            buttons = [[["reference.btn_hold", f"hold:place:{attachment.record_id}"]]]
    return await enqueue(
        session, chat_id, key, params, kind="reference", priority=Priority.ALERT, buttons=buttons, photo_file_id=file_id,
    )


async def end(session: AsyncSession, conversation_id: int, by_id: int, now: dt.datetime, labels: Labels) -> Result:
    """End the conversation (either side, once): the reader gets a short transcript and rating
    buttons, the librarian the READ effort buttons and "Save to the answer base"."""
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None:
        return Result(Outcome.NOT_FOUND)
    by_reader = by_id == conversation.reader_id
    if not by_reader and conversation.staff_id != by_id:
        return Result(Outcome.NOT_YOURS, conversation)
    done = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.status.in_(OPEN))
        .values(status=Status.CLOSED, ended_at=now, ended_by="reader" if by_reader else "staff")
        .execution_options(synchronize_session=False)
    )
    await session.refresh(conversation)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.FINISHED, conversation)
    if conversation.reader_id is not None and conversation.taken_at is None:
        # Withdrawn before any librarian took it: nothing to rate.
        await enqueue(
            session, conversation.reader_id, "reference.withdrawn", {"number": conversation.id},
            kind="reference", dedupe_key=f"reference:{conversation.id}:ended:reader",
        )
    elif conversation.reader_id is not None:
        transcript = await _history_text(session, conversation, labels, notes=False)
        await enqueue(
            session, conversation.reader_id, "reference.ended_to_reader",
            {"number": conversation.id, "question": clip(conversation.question, 300),
             "transcript": {lang: text or _in(lang, labels.none) for lang, text in transcript.items()}},
            kind="reference", priority=Priority.ALERT,
            buttons=[[[f"={n} ★", f"rf:rate:{conversation.id}:{n}"] for n in range(1, 6)]],
            dedupe_key=f"reference:{conversation.id}:ended:reader",
        )
    if conversation.staff_id is not None:
        effort = [[[f"={n}", f"rf:effort:{conversation.id}:{n}"] for n in EFFORT]]
        await enqueue(
            session, conversation.staff_id, "reference.ended_to_staff",
            {"number": conversation.id, "by": {"t": "reference.by_reader" if by_reader else "reference.by_you"}},
            kind="reference", priority=Priority.ALERT,
            buttons=[*effort, [["reference.btn_save", f"rf:save:{conversation.id}"]]],
            dedupe_key=f"reference:{conversation.id}:ended:staff",
        )
    return Result(Outcome.OK, conversation)


async def rate(session: AsyncSession, conversation_id: int, reader_id: int, stars: int, now: dt.datetime) -> Result:
    """The reader rates the help 1–5, once; the rating is kept with the staff member who handled it."""
    if stars not in range(1, 6):
        return Result(Outcome.BAD_VALUE)
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None or conversation.reader_id != reader_id:
        return Result(Outcome.NOT_FOUND)
    done = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.status == Status.CLOSED, DeskConversation.rating.is_(None))
        .values(rating=stars, rated_at=now)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(conversation)
    if not done.rowcount:  # type: ignore[attr-defined]
        return Result(Outcome.ALREADY, conversation)
    if conversation.staff_id is not None:
        await enqueue(
            session, conversation.staff_id, "reference.rated_to_staff", {"number": conversation.id, "stars": "★" * stars},
            kind="reference", dedupe_key=f"reference:{conversation.id}:rated",
        )
    return Result(Outcome.OK, conversation)


async def set_effort(session: AsyncSession, conversation_id: int, staff_id: int, effort: int) -> Result:
    """The librarian tags the READ effort (1–6) of a conversation they handled (may be changed)."""
    if effort not in EFFORT:
        return Result(Outcome.BAD_VALUE)
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None:
        return Result(Outcome.NOT_FOUND)
    if conversation.staff_id != staff_id:
        return Result(Outcome.NOT_YOURS, conversation)
    conversation.effort = effort
    return Result(Outcome.OK, conversation)


async def answer_draft(session: AsyncSession, conversation_id: int, staff_id: int) -> tuple[Result, str]:
    """The answer a librarian gave in a conversation (their messages, joined), to save to the answer base."""
    conversation = await session.get(DeskConversation, conversation_id)
    if conversation is None:
        return Result(Outcome.NOT_FOUND), ""
    if conversation.staff_id != staff_id:
        return Result(Outcome.NOT_YOURS, conversation), ""
    if conversation.saved_entry_id is not None:
        return Result(Outcome.ALREADY, conversation), ""
    said = [m.text for m in await messages(session, conversation_id, notes=False) if m.side == "staff" and m.text]
    return Result(Outcome.OK, conversation), "\n".join(said)


async def save_answer(
    session: AsyncSession, conversation_id: int, staff_id: int, answer: str, now: dt.datetime
) -> Result:
    """Save the conversation's question with ``answer`` to the answer base (once per conversation)."""
    result, _ = await answer_draft(session, conversation_id, staff_id)
    conversation = result.conversation
    if result.outcome is not Outcome.OK or conversation is None:
        return result
    problem = text_problem(answer)
    if problem is not None:
        return Result(problem, conversation)
    entry = await add_entry(session, conversation.question, answer, staff_id, now)
    done = await session.execute(
        update(DeskConversation)
        .where(DeskConversation.id == conversation_id, DeskConversation.saved_entry_id.is_(None))
        .values(saved_entry_id=entry.id)
        .execution_options(synchronize_session=False)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        await session.delete(entry)
        return Result(Outcome.ALREADY, conversation)
    await session.refresh(conversation)
    return Result(Outcome.OK, conversation)


async def hand_over(
    session: AsyncSession, conversation_id: int, staff_id: int, colleague_id: int, labels: Labels
) -> Result:
    """Hand an active conversation to a colleague on duty who is not in a conversation: they get the
    card with the conversation so far; the reader is told who helps them now."""
    conversation = await session.get(DeskConversation, conversation_id, with_for_update=True)
    if conversation is None:
        return Result(Outcome.NOT_FOUND)
    if conversation.status != Status.ACTIVE:
        return Result(Outcome.FINISHED, conversation)
    if conversation.staff_id != staff_id:
        return Result(Outcome.NOT_YOURS, conversation)
    if colleague_id == staff_id or not await is_on_duty(session, colleague_id) or await session.get(StaffMember, colleague_id) is None:
        return Result(Outcome.NOT_ON_DUTY, conversation)
    busy = await session.scalar(
        select(DeskConversation.id).where(DeskConversation.staff_id == colleague_id, DeskConversation.status == Status.ACTIVE)
    )
    if busy is not None:
        return Result(Outcome.BUSY, conversation)
    conversation.staff_id = colleague_id
    conversation.handovers += 1
    await session.flush()
    name = await staff_name(session, colleague_id)
    await _send_card(session, conversation, colleague_id, labels, "reference.handed_card")
    if conversation.reader_id is not None:
        await enqueue(
            session, conversation.reader_id, "reference.handed_to_reader", {"number": conversation.id, "name": clip(name, 80)},
            kind="reference", priority=Priority.ALERT, dedupe_key=f"reference:{conversation.id}:handed:{conversation.handovers}",
        )
    return Result(Outcome.OK, conversation, other=name)


async def free_colleagues(session: AsyncSession, staff_id: int) -> list[tuple[int, str]]:
    """Colleagues on duty who are not in a conversation (whom a conversation can be handed to)."""
    busy = set(await session.scalars(select(DeskConversation.staff_id).where(DeskConversation.status == Status.ACTIVE)))
    return [(s, await staff_name(session, s)) for s in await on_duty(session) if s != staff_id and s not in busy]


async def saved_replies(session: AsyncSession) -> list[SavedReply]:
    return list(await session.scalars(select(SavedReply).order_by(SavedReply.id)))


async def add_saved_reply(session: AsyncSession, text: str, staff_id: int, now: dt.datetime) -> SavedReply | None:
    """Keep a reply for the desk to reuse (None for an empty or too long text)."""
    if text_problem(text) is not None:
        return None
    reply = SavedReply(text=text.strip(), added_by=staff_id, created_at=now)
    session.add(reply)
    await session.flush()
    return reply


# --------------------------------------------------------------------------------------------------
# Waiting too long


async def tell_waiting(session: AsyncSession, policy: Policy, now: dt.datetime, tz: ZoneInfo) -> int:
    """Tell each reader whose question nobody took within ``reference_wait_minutes`` when to expect an
    answer (once per question; a conditional UPDATE, so a second process tells nobody twice)."""
    cutoff = now - dt.timedelta(minutes=policy.service.reference_wait_minutes)
    waiting = list(await session.scalars(
        select(DeskConversation).where(
            DeskConversation.status == Status.QUEUED, DeskConversation.wait_told_at.is_(None),
            DeskConversation.queued_at <= cutoff,
        )
    ))
    told = 0
    for conversation in waiting:
        won = await session.execute(
            update(DeskConversation).where(DeskConversation.id == conversation.id, DeskConversation.wait_told_at.is_(None))
            .values(wait_told_at=now).execution_options(synchronize_session=False)
        )
        if not won.rowcount or conversation.reader_id is None:  # type: ignore[attr-defined]
            continue
        by = expected_by(policy, now, tz) if not desk_open(policy, now, tz) else None
        params: dict[str, Any] = {"number": conversation.id}
        if by is None:
            key = "reference.still_waiting"
            params["when"] = next_opening_text(policy, now, tz)
        else:
            key = "reference.still_waiting_closed"
            params["when"] = by.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        await enqueue(session, conversation.reader_id, key, params, kind="reference", dedupe_key=f"reference:{conversation.id}:wait")
        told += 1
    return told


def next_opening_text(policy: Policy, now: dt.datetime, tz: ZoneInfo) -> str:
    """When the desk closes today or opens next, as ``YYYY-MM-DD HH:MM`` ("—" without desk hours)."""
    opening = next_opening(policy, now, tz)
    return opening.astimezone(tz).strftime("%Y-%m-%d %H:%M") if opening else "—"


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class StaffFigures:
    staff_id: int
    name: str
    conversations: int
    ratings: int
    average_rating: float | None
    median_wait_minutes: float | None


@dataclass(frozen=True)
class ReferenceStats:
    """Questions asked in a period (``since`` inclusive, ``until`` exclusive, both optional)."""

    questions: int
    answered_by_base: int
    to_librarian: int
    closed: int
    median_wait_minutes: float | None  # queued → first answer from a librarian
    median_length_minutes: float | None  # taken → ended
    median_messages: float | None
    ratings: int
    average_rating: float | None
    effort: dict[int, int]
    per_staff: list[StaffFigures]

    @property
    def base_share(self) -> float | None:
        return self.answered_by_base / self.questions if self.questions else None

    def text_lines(self, lang: str) -> list[str]:
        """The desk's figures for ``/stats`` and ``librarybot stats``, in ``lang``."""
        w = STATS_LABELS["zh" if lang == "zh" else "en"]
        c = w["colon"]
        share = "—" if self.base_share is None else f"{self.base_share * 100:.1f}%"
        lines = [
            w["title"],
            f"{w['questions']}{c}{self.questions} — {w['by_base']} {self.answered_by_base} ({share}){w['sep']}{w['to_librarian']} {self.to_librarian}",
            f"{w['wait']}{c}{_minutes_text(self.median_wait_minutes, w)}",
            f"{w['length']}{c}{_minutes_text(self.median_length_minutes, w)}"
            + (w["messages"].format(n=f"{self.median_messages:g}") if self.median_messages is not None else ""),
            f"{w['rating']}{c}" + (w["rating_detail"].format(avg=f"{self.average_rating:.2f}", n=self.ratings)
                                  if self.average_rating is not None else w["none"]),
            f"{w['effort']}{c}" + (w["sep"].join(f"{k}: {v}" for k, v in sorted(self.effort.items()) if v) or w["none"]),
        ]
        for s in self.per_staff:
            rating = f"{s.average_rating:.2f} ({s.ratings})" if s.average_rating is not None else "—"
            lines.append(w["staff_line"].format(
                name=s.name, n=s.conversations, rating=rating, wait=_minutes_text(s.median_wait_minutes, w)
            ))
        return lines

    def csv_rows(self) -> list[list[Any]]:
        """The figures as ``section,metric,key,value`` rows (as ``StatsReport.to_csv``)."""
        def num(v: float | None) -> str:
            return "" if v is None else f"{v:.4f}".rstrip("0").rstrip(".")

        rows: list[list[Any]] = [
            ["reference", "questions", "total", self.questions],
            ["reference", "questions", "answered_by_base", self.answered_by_base],
            ["reference", "questions", "to_librarian", self.to_librarian],
            ["reference", "base_share", "", num(self.base_share)],
            ["reference", "wait_minutes", "median", num(self.median_wait_minutes)],
            ["reference", "length_minutes", "median", num(self.median_length_minutes)],
            ["reference", "messages", "median", num(self.median_messages)],
            ["reference", "rating", "average", num(self.average_rating)],
            ["reference", "rating", "count", self.ratings],
        ]
        rows += [["reference", "effort", str(k), v] for k, v in sorted(self.effort.items())]
        for s in self.per_staff:
            rows += [
                ["reference", "staff_conversations", s.name, s.conversations],
                ["reference", "staff_rating", s.name, num(s.average_rating)],
                ["reference", "staff_wait_minutes", s.name, num(s.median_wait_minutes)],
            ]
        return rows


def _minutes_text(value: float | None, w: Mapping[str, str]) -> str:
    return w["none"] if value is None else w["minutes"].format(v=f"{value:.1f}")


STATS_LABELS = {
    "en": {
        "title": "Reference desk (ask a librarian)", "questions": "Questions", "by_base": "answered by the answer base",
        "to_librarian": "to a librarian", "wait": "Median wait for a first answer", "length": "Median conversation length",
        "messages": " ({n} messages)", "rating": "Ratings", "rating_detail": "{avg} / 5 (n = {n})", "effort": "READ effort",
        "staff_line": "• {name}: {n} conversations, rating {rating}, median wait {wait}", "minutes": "{v} min",
        "none": "—", "sep": ", ", "colon": ": ",
    },
    "zh": {
        "title": "参考咨询（咨询馆员）", "questions": "咨询总数", "by_base": "由知识库解答",
        "to_librarian": "转人工", "wait": "首次回复等待时间中位数", "length": "对话时长中位数",
        "messages": "（{n} 条消息）", "rating": "评分", "rating_detail": "{avg} / 5（{n} 个评分）", "effort": "READ 工作量等级",
        "staff_line": "• {name}：{n} 次对话，评分 {rating}，等待中位数 {wait}", "minutes": "{v} 分钟",
        "none": "—", "sep": "，", "colon": "：",
    },
}


async def reference_stats(session: AsyncSession, since: dt.datetime | None, until: dt.datetime | None) -> ReferenceStats:
    """The desk's figures over the questions asked in ``[since, until)``."""
    query = select(DeskConversation)
    if since is not None:
        query = query.where(DeskConversation.created_at >= since)
    if until is not None:
        query = query.where(DeskConversation.created_at < until)
    rows = list(await session.scalars(query))
    counted = await session.execute(
        select(DeskMessage.conversation_id, func.count()).where(
            DeskMessage.conversation_id.in_([r.id for r in rows if r.taken_at]), DeskMessage.side != "note"
        ).group_by(DeskMessage.conversation_id)
    ) if rows else None
    counts: dict[int, int] = {int(cid): int(n) for cid, n in counted.all()} if counted is not None else {}

    def minutes(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
        return (b - a).total_seconds() / 60 if a is not None and b is not None else None

    waits = [m for r in rows if (m := minutes(r.queued_at, r.first_answer_at)) is not None]
    lengths = [m for r in rows if r.status == Status.CLOSED and (m := minutes(r.taken_at, r.ended_at)) is not None]
    taken = [r for r in rows if r.taken_at is not None]
    ratings = [r.rating for r in rows if r.rating is not None]
    effort = {k: 0 for k in EFFORT}
    for r in rows:
        if r.effort:
            effort[r.effort] += 1
    per_staff = []
    for staff_id in sorted({r.staff_id for r in taken if r.staff_id is not None}):
        mine = [r for r in taken if r.staff_id == staff_id]
        rated = [r.rating for r in mine if r.rating is not None]
        mine_waits = [m for r in mine if (m := minutes(r.queued_at, r.first_answer_at)) is not None]
        per_staff.append(StaffFigures(
            staff_id, await staff_name(session, staff_id), len(mine), len(rated),
            sum(rated) / len(rated) if rated else None, statistics.median(mine_waits) if mine_waits else None,
        ))
    return ReferenceStats(
        questions=len(rows),
        answered_by_base=sum(1 for r in rows if r.status == Status.ANSWERED),
        to_librarian=sum(1 for r in rows if r.queued_at is not None),
        closed=sum(1 for r in rows if r.status == Status.CLOSED),
        median_wait_minutes=statistics.median(waits) if waits else None,
        median_length_minutes=statistics.median(lengths) if lengths else None,
        median_messages=statistics.median([counts.get(r.id, 0) for r in taken]) if taken else None,
        ratings=len(ratings),
        average_rating=sum(ratings) / len(ratings) if ratings else None,
        effort=effort,
        per_staff=per_staff,
    )


# --------------------------------------------------------------------------------------------------
# Privacy and the demo


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """/forgetme: the reader's questions and transcripts are erased (texts, files, their id); the
    anonymous figures (times, rating, effort) stay for the statistics, and open ones are closed. As a
    staff member, they leave desk duty; the conversations they handled keep the figures only."""
    own = list(await session.scalars(select(DeskConversation.id).where(DeskConversation.reader_id == telegram_id)))
    if own:
        await session.execute(delete(DeskMessage).where(DeskMessage.conversation_id.in_(own)))
        await session.execute(
            update(DeskConversation).where(DeskConversation.id.in_(own), DeskConversation.status.in_(OPEN + (Status.ASKED.value,)))
            .values(status=Status.CLOSED, ended_at=utcnow(), ended_by="reader")
        )
        await session.execute(update(DeskConversation).where(DeskConversation.id.in_(own)).values(reader_id=None, question=""))
    await session.execute(update(DeskMessage).where(DeskMessage.author_id == telegram_id).values(author_id=None))
    await session.execute(delete(DeskDuty).where(DeskDuty.telegram_id == telegram_id))
    session.expire_all()


SAMPLE_FAQ = Path(__file__).parent / "reference_sample.csv"
DEMO_STAFF_ID = 9001
DEMO_SAVED_REPLIES = (
    "您好，我是参考咨询馆员，很高兴为您服务。Hello, I am the reference librarian on duty; happy to help.",
    "请稍等，我查一下馆藏。One moment please, I am checking the catalog.",
    "还有其他问题吗？Is there anything else I can help you with?",
)


async def seed_demo(
    session: AsyncSession, policy: Policy, now: dt.datetime, rng: random.Random, reader_user_ids: list[int]
) -> None:
    """The sample answer base, saved replies, the demo librarian on desk duty, and a few past
    conversations so that the statistics have figures."""
    await import_faq(session, SAMPLE_FAQ, now)
    for text in DEMO_SAVED_REPLIES:
        session.add(SavedReply(text=text, added_by=None, created_at=now))
    if await session.get(StaffMember, DEMO_STAFF_ID) is not None:
        await set_duty(session, DEMO_STAFF_ID, True, now)
    readers = reader_user_ids or [7000]
    past = [
        ("图书馆有没有《红楼梦》的英译本？", 5, 2, "有的：霍克思译本 The Story of the Stone 在三层外文书库，索书号 I242.4/C226。"),
        ("Can I get access to JSTOR from home?", 4, 3, "Yes: connect to the campus VPN first, then open JSTOR from the library's database list."),
    ]
    for index, (question, stars, effort, reply) in enumerate(past):
        asked = now - dt.timedelta(days=2 + index, hours=rng.randint(0, 5))
        conversation = DeskConversation(
            reader_id=readers[index % len(readers)], lang=question_language(question), question=question,
            status=Status.CLOSED, queued_at=asked, created_at=asked, staff_id=DEMO_STAFF_ID,
            taken_at=asked + dt.timedelta(minutes=3), first_answer_at=asked + dt.timedelta(minutes=4),
            ended_at=asked + dt.timedelta(minutes=15), ended_by="staff", rating=stars, rated_at=asked + dt.timedelta(minutes=16),
            effort=effort,
        )
        session.add(conversation)
        await session.flush()
        session.add(DeskMessage(conversation_id=conversation.id, at=asked + dt.timedelta(minutes=4), side="staff",
                                author_id=DEMO_STAFF_ID, text=reply))
    await session.flush()
