"""Satisfaction surveys (满意度调查): TOML import, invitations through the outbox, the answers, one
reminder, closing at the end date, and the results with their statistics.

Anonymous for real. What is stored about a person is only that they were invited, whether they
were reminded, started and finished (``survey_invitations``). Their answers live in other tables
without any identity: ``survey_responses`` is keyed by a random token made with ``secrets`` (not
derived from the person, never stored beside them) and ``survey_answers`` hangs off that token. The
only dates are days (``invited_on``, ``started_on``, ``answered_on``), and no row has an
auto-increment number that could order answers against invitations. The token travels in the
callback data of the question's buttons, which stay in the person's chat on Telegram, so the survey
can be resumed from the last question without the store remembering whose it is.

Question kinds: ``likert`` (1–5), ``nps`` (0–10), ``choice`` (one of the listed options), ``text``
(a free answer) and ``gap`` (LibQUAL+: minimum, desired and perceived service, each 1–9). A survey
runs in steps: one per question, three for a gap question.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import math
import random
import secrets
import statistics
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Date, ForeignKey, Index, String, Text, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage import csv_export
from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue
from storage.people import StaffMember, User

KINDS = ("likert", "nps", "choice", "text", "gap")
GAP_PARTS = ("min", "des", "per")  # minimum, desired, perceived
SCALES = {"likert": (1, 5), "nps": (0, 10), "gap": (1, 9)}
AUDIENCES = ("readers", "everyone")
REMIND_AFTER = dt.timedelta(days=3)
INVITE_SPACING = dt.timedelta(seconds=1)  # invitations trickle out politely behind everything urgent
MAX_TEXT_ANSWER = 1000
MAX_CHOICES = 8
TOKEN_BYTES = 12


class SurveyStatus(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


# --------------------------------------------------------------------------------------------------
# Models


class Survey(Base):
    """One questionnaire, as imported from TOML."""

    __tablename__ = "surveys"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    title_zh: Mapped[str] = mapped_column(String(200))
    title_en: Mapped[str] = mapped_column(String(200))
    intro_zh: Mapped[str] = mapped_column(Text, default="")
    intro_en: Mapped[str] = mapped_column(Text, default="")
    questions: Mapped[list[Any]]
    closes_on: Mapped[dt.date] = mapped_column(Date)  # the last day answers are taken (library's time zone)
    status: Mapped[str] = mapped_column(String(16), default=SurveyStatus.OPEN)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def title(self) -> dict[str, str]:
        return {"zh": self.title_zh or self.title_en, "en": self.title_en or self.title_zh}

    def intro(self) -> dict[str, str]:
        return {"zh": self.intro_zh or self.intro_en, "en": self.intro_en or self.intro_zh}


class SurveyInvitation(Base):
    """That a person was invited (and reminded, started, finished): never what they answered."""

    __tablename__ = "survey_invitations"

    survey_id: Mapped[int] = mapped_column(ForeignKey("surveys.id", ondelete="CASCADE"), primary_key=True)
    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    invited_on: Mapped[dt.date] = mapped_column(Date)
    reminded: Mapped[bool] = mapped_column(default=False)
    started: Mapped[bool] = mapped_column(default=False)
    finished: Mapped[bool] = mapped_column(default=False)


class SurveyResponse(Base):
    """One anonymous set of answers, known only by a random token."""

    __tablename__ = "survey_responses"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    survey_id: Mapped[int] = mapped_column(ForeignKey("surveys.id", ondelete="CASCADE"), index=True)
    started_on: Mapped[dt.date] = mapped_column(Date)
    finished: Mapped[bool] = mapped_column(default=False)


class SurveyAnswer(Base):
    """One answer of a response (a gap question has three: minimum, desired, perceived)."""

    __tablename__ = "survey_answers"
    __table_args__ = (Index("ix_survey_answers_question", "question", "part"),)

    token: Mapped[str] = mapped_column(ForeignKey("survey_responses.token", ondelete="CASCADE"), primary_key=True)
    question: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # index in the survey
    part: Mapped[str] = mapped_column(String(8), primary_key=True)  # "" or min / des / per
    value: Mapped[int | None]
    text: Mapped[str | None] = mapped_column(Text)
    answered_on: Mapped[dt.date] = mapped_column(Date)


class UserActivity(Base):
    """The last day a person used the bot (for ``survey send --active-days``); a day, nothing finer."""

    __tablename__ = "user_activity"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    last_seen_on: Mapped[dt.date] = mapped_column(Date, index=True)


# --------------------------------------------------------------------------------------------------
# Statistics (pure)

# Student's t, two-sided 95 % (t at 0.975) for 1–30 degrees of freedom; beyond: 40, 60, 120, normal.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_975(df: int) -> float:
    """Student's t quantile for a two-sided 95 % interval with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("at least one degree of freedom")
    if df <= 30:
        return _T975[df - 1]
    for limit, value in ((40, 2.021), (60, 2.000), (120, 1.980)):
        if df <= limit:
            return value
    return 1.960


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % confidence interval (None bounds for fewer than two values)."""

    n: int
    mean: float | None
    low: float | None = None
    high: float | None = None


def mean_ci(values: Sequence[float]) -> Estimate:
    """The mean of ``values`` with a 95 % confidence interval from Student's t."""
    n = len(values)
    if n == 0:
        return Estimate(0, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(1, mean)
    half = t_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(n, mean, mean - half, mean + half)


def nps(values: Sequence[int]) -> float | None:
    """Net Promoter Score: % promoters (9–10) minus % detractors (0–6), from −100 to 100."""
    if not values:
        return None
    promoters = sum(1 for v in values if v >= 9)
    detractors = sum(1 for v in values if v <= 6)
    return 100.0 * (promoters - detractors) / len(values)


@dataclass(frozen=True)
class Gap:
    """LibQUAL+ gap scores of one question: adequacy = perceived − minimum, superiority = perceived − desired."""

    minimum: Estimate
    desired: Estimate
    perceived: Estimate
    adequacy: Estimate
    superiority: Estimate


def gap_scores(triples: Iterable[tuple[int | None, int | None, int | None]]) -> Gap:
    """Gap scores from (minimum, desired, perceived) per response; a difference uses only the
    responses that gave both of its parts."""
    rows = list(triples)
    minimum, desired, perceived = ([float(v) for r in rows if (v := r[i]) is not None] for i in range(3))
    adequacy = [float(p - m) for m, _, p in rows if m is not None and p is not None]
    superiority = [float(p - d) for _, d, p in rows if d is not None and p is not None]
    return Gap(mean_ci(minimum), mean_ci(desired), mean_ci(perceived), mean_ci(adequacy), mean_ci(superiority))


# --------------------------------------------------------------------------------------------------
# Import


class SurveyFileError(ValueError):
    """A survey file that cannot be imported; the message says why, in one line."""


def _bilingual(table: dict[str, Any], name: str, where: str, *, required: bool = True) -> tuple[str, str]:
    zh, en = str(table.get(f"{name}_zh", "") or "").strip(), str(table.get(f"{name}_en", "") or "").strip()
    if required and not (zh or en):
        raise SurveyFileError(f"{where}: {name}_zh or {name}_en is required")
    return zh or en, en or zh


def parse_survey(text: str) -> dict[str, Any]:
    """A survey file's content, checked: code, titles, intro, closing date and questions."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SurveyFileError(f"not valid TOML: {exc}") from None
    code = str(data.get("code", "")).strip()
    if not code or len(code) > 64 or not all(ch.isalnum() or ch in "-_." for ch in code):
        raise SurveyFileError("code: required, up to 64 letters, digits, '-', '_' or '.'")
    title_zh, title_en = _bilingual(data, "title", "survey")
    intro_zh, intro_en = _bilingual(data, "intro", "survey", required=False)
    closes = data.get("closes")
    if isinstance(closes, str):
        try:
            closes = dt.date.fromisoformat(closes)
        except ValueError:
            raise SurveyFileError("closes: a date such as 2026-12-31") from None
    if isinstance(closes, dt.datetime):
        closes = closes.date()
    if not isinstance(closes, dt.date):
        raise SurveyFileError("closes: a date such as 2026-12-31 is required")
    raw = data.get("questions")
    if not isinstance(raw, list) or not raw:
        raise SurveyFileError("questions: at least one [[questions]] table is required")
    questions = []
    for number, item in enumerate(raw, start=1):
        where = f"question {number}"
        if not isinstance(item, dict):
            raise SurveyFileError(f"{where}: must be a table")
        kind = str(item.get("kind", "")).strip()
        if kind not in KINDS:
            raise SurveyFileError(f"{where}: kind must be one of {', '.join(KINDS)}")
        zh, en = _bilingual(item, "text", where)
        question: dict[str, Any] = {"key": str(item.get("key") or f"q{number}"), "kind": kind, "text_zh": zh, "text_en": en}
        if kind == "choice":
            options_zh, options_en = item.get("options_zh") or item.get("options_en"), item.get("options_en") or item.get("options_zh")
            if not isinstance(options_zh, list) or not isinstance(options_en, list) or len(options_zh) != len(options_en):
                raise SurveyFileError(f"{where}: options_zh and options_en must be lists of the same length")
            if not 2 <= len(options_zh) <= MAX_CHOICES:
                raise SurveyFileError(f"{where}: between 2 and {MAX_CHOICES} options")
            question["options_zh"] = [str(o) for o in options_zh]
            question["options_en"] = [str(o) for o in options_en]
        questions.append(question)
    keys = [q["key"] for q in questions]
    if len(set(keys)) != len(keys):
        raise SurveyFileError("questions: every key must be different")
    return {"code": code, "title_zh": title_zh, "title_en": title_en, "intro_zh": intro_zh, "intro_en": intro_en,
            "closes_on": closes, "questions": questions}


async def import_survey(session: AsyncSession, path: Path) -> Survey:
    """Store the survey in ``path`` (TOML); re-importing a code that has not been sent updates it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SurveyFileError(f"cannot read {path}: {exc}") from None
    fields = parse_survey(text)
    survey = await session.scalar(select(Survey).where(Survey.code == fields["code"]))
    if survey is None:
        survey = Survey(**fields)
        session.add(survey)
    else:
        sent = await session.scalar(select(SurveyInvitation.telegram_id).where(SurveyInvitation.survey_id == survey.id).limit(1))
        if sent is not None:
            raise SurveyFileError(f"survey {fields['code']} was already sent; give the new version another code")
        for name, value in fields.items():
            setattr(survey, name, value)
        survey.status = SurveyStatus.OPEN
    await session.flush()
    return survey


async def find_survey(session: AsyncSession, ref: str | int) -> Survey | None:
    """A survey by its number or its code."""
    text = str(ref).strip()
    if text.isdigit():
        found = await session.get(Survey, int(text))
        if found is not None:
            return found
    return await session.scalar(select(Survey).where(Survey.code == text))


async def all_surveys(session: AsyncSession) -> list[Survey]:
    """Every survey, newest first."""
    return list(await session.scalars(select(Survey).order_by(Survey.id.desc())))


def today_in(now: dt.datetime, tz: ZoneInfo) -> dt.date:
    return now.astimezone(tz).date()


def is_open(survey: Survey, today: dt.date) -> bool:
    """Whether the survey still takes answers."""
    return survey.status == SurveyStatus.OPEN and today <= survey.closes_on


# --------------------------------------------------------------------------------------------------
# Sending


async def note_activity(session: AsyncSession, telegram_id: int, today: dt.date) -> None:
    """Remember that the person used the bot today (one row per person: the last day)."""
    row = await session.get(UserActivity, telegram_id)
    if row is None:
        session.add(UserActivity(telegram_id=telegram_id, last_seen_on=today))
    elif row.last_seen_on < today:
        row.last_seen_on = today


@dataclass(frozen=True)
class SendReport:
    eligible: int  # people who could be invited (not yet invited to this survey)
    invited: int  # invited now
    closed: bool = False


async def send_survey(
    session: AsyncSession,
    survey: Survey,
    *,
    now: dt.datetime,
    tz: ZoneInfo,
    audience: str = "readers",
    sample: int | None = None,
    active_days: int | None = None,
    rng: random.Random | None = None,
) -> SendReport:
    """Invite a random sample (or everyone) of the audience through the outbox, each person at
    most once per survey, one invitation a second at bulk priority. Staff and people who blocked
    the bot are left out; ``active_days`` keeps only people who used the bot that recently."""
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {AUDIENCES}")
    today = today_in(now, tz)
    if not is_open(survey, today):
        return SendReport(0, 0, closed=True)
    invited = select(SurveyInvitation.telegram_id).where(SurveyInvitation.survey_id == survey.id)
    query = select(User.telegram_id).where(
        User.unreachable.is_(False), User.telegram_id > 0, User.telegram_id.not_in(select(StaffMember.telegram_id)),
        User.telegram_id.not_in(invited),
    )
    if audience == "readers":
        query = query.where(User.reader_id.is_not(None))
    if active_days is not None:
        since = today - dt.timedelta(days=active_days)
        query = query.where(User.telegram_id.in_(select(UserActivity.telegram_id).where(UserActivity.last_seen_on >= since)))
    people = sorted(await session.scalars(query))
    chosen = people if sample is None or sample >= len(people) else sorted((rng or random.SystemRandom()).sample(people, sample))
    params = {"title": survey.title(), "intro": survey.intro(), "closes": survey.closes_on.isoformat(), "count": len(survey.questions)}
    for position, telegram_id in enumerate(chosen):
        session.add(SurveyInvitation(survey_id=survey.id, telegram_id=telegram_id, invited_on=today))
        await enqueue(
            session, telegram_id, "quality.survey_invite", params, kind="survey", priority=Priority.BULK,
            buttons=[[["quality.btn_start", f"sv:s:{survey.id}"]]], dedupe_key=f"sv:{survey.id}:inv:{telegram_id}",
            not_before=now + INVITE_SPACING * position,
        )
    await session.flush()
    return SendReport(len(people), len(chosen))


async def queue_reminders(session: AsyncSession, *, now: dt.datetime, tz: ZoneInfo) -> int:
    """Remind once, three days after the invitation, everyone who has not finished an open survey."""
    today = today_in(now, tz)
    due = today - dt.timedelta(days=REMIND_AFTER.days)
    rows = await session.execute(
        select(SurveyInvitation, Survey).join(Survey, Survey.id == SurveyInvitation.survey_id)
        .where(Survey.status == SurveyStatus.OPEN, Survey.closes_on >= today, SurveyInvitation.finished.is_(False),
               SurveyInvitation.reminded.is_(False), SurveyInvitation.invited_on <= due)
        .order_by(SurveyInvitation.survey_id, SurveyInvitation.telegram_id)
    )
    queued = 0
    for position, (invitation, survey) in enumerate(list(rows)):
        invitation.reminded = True
        done = await enqueue(
            session, invitation.telegram_id, "quality.survey_reminder",
            {"title": survey.title(), "closes": survey.closes_on.isoformat()}, kind="survey", priority=Priority.BULK,
            buttons=[[["quality.btn_start", f"sv:s:{survey.id}"]]],
            dedupe_key=f"sv:{survey.id}:rem:{invitation.telegram_id}", not_before=now + INVITE_SPACING * position,
        )
        queued += done is not None
    return queued


async def close_ended(session: AsyncSession, *, now: dt.datetime, tz: ZoneInfo) -> int:
    """Close every survey whose end date has passed; how many were closed."""
    result = await session.execute(
        update(Survey).where(Survey.status == SurveyStatus.OPEN, Survey.closes_on < today_in(now, tz))
        .values(status=SurveyStatus.CLOSED).execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Taking the survey


@dataclass(frozen=True)
class Step:
    """One screen of the survey: a question, or one part of a gap question."""

    number: int  # 0-based position among the steps
    question: int  # index of the question
    part: str  # "" or min / des / per
    kind: str
    text: dict[str, str]
    choices: list[dict[str, str]] = field(default_factory=list)  # the options of a choice question

    def values(self) -> list[int]:
        """The values of its buttons (empty for a text question)."""
        if self.kind == "choice":
            return list(range(len(self.choices)))
        if self.kind in SCALES:
            low, high = SCALES[self.kind]
            return list(range(low, high + 1))
        return []


def steps(survey: Survey) -> list[Step]:
    """Every screen of the survey in order."""
    out: list[Step] = []
    for index, q in enumerate(survey.questions):
        text = {"zh": q["text_zh"], "en": q["text_en"]}
        choices = [{"zh": zh, "en": en} for zh, en in zip(q.get("options_zh", []), q.get("options_en", []), strict=True)]
        for part in GAP_PARTS if q["kind"] == "gap" else ("",):
            out.append(Step(len(out), index, part, q["kind"], text, choices))
    return out


class Start(enum.StrEnum):
    STARTED = "started"
    NOT_INVITED = "not_invited"
    CLOSED = "closed"
    FINISHED = "finished"  # already answered: each person once


@dataclass(frozen=True)
class Started:
    outcome: Start
    token: str | None = None
    survey: Survey | None = None


async def start(session: AsyncSession, survey_id: int, telegram_id: int, *, now: dt.datetime, tz: ZoneInfo) -> Started:
    """Begin (or begin again) an invited person's answers: a new anonymous response and its token.

    Starting again leaves the earlier, unfinished response behind: only finished responses count.
    """
    survey = await session.get(Survey, survey_id)
    invitation = await session.get(SurveyInvitation, (survey_id, telegram_id))
    if survey is None or invitation is None:
        return Started(Start.NOT_INVITED)
    if invitation.finished:
        return Started(Start.FINISHED, survey=survey)
    today = today_in(now, tz)
    if not is_open(survey, today):
        return Started(Start.CLOSED, survey=survey)
    invitation.started = True
    token = secrets.token_hex(TOKEN_BYTES)  # random: nothing about the person goes into it
    session.add(SurveyResponse(token=token, survey_id=survey.id, started_on=today))
    await session.flush()
    return Started(Start.STARTED, token, survey)


class Answered(enum.StrEnum):
    SAVED = "saved"
    CLOSED = "closed"
    UNKNOWN = "unknown"  # no such response (a forged or mistyped token) or no such step
    DONE = "done"  # the response is already finished
    BAD = "bad"  # a value out of range


@dataclass(frozen=True)
class Position:
    """Where a response stands: its survey and the step to show."""

    outcome: Answered
    survey: Survey | None = None
    step: Step | None = None  # None after the last step
    total: int = 0


async def locate(session: AsyncSession, token: str, step: int, *, now: dt.datetime, tz: ZoneInfo) -> Position:
    """The survey of ``token`` and its step number ``step`` (clamped at 0), if it can still be answered."""
    response = await session.get(SurveyResponse, token)
    if response is None:
        return Position(Answered.UNKNOWN)
    survey = await session.get(Survey, response.survey_id)
    if survey is None:
        return Position(Answered.UNKNOWN)
    if response.finished:
        return Position(Answered.DONE, survey)
    if not is_open(survey, today_in(now, tz)):
        return Position(Answered.CLOSED, survey)
    every = steps(survey)
    step = max(0, step)
    return Position(Answered.SAVED, survey, every[step] if step < len(every) else None, len(every))


async def answer(
    session: AsyncSession, token: str, step: int, *, value: int | None = None, text: str | None = None,
    now: dt.datetime, tz: ZoneInfo,
) -> Position:
    """Save the answer to step ``step`` of the response (a button's value, or a text); the next step."""
    here = await locate(session, token, step, now=now, tz=tz)
    if here.outcome != Answered.SAVED:
        return here
    if here.step is None or here.step.number != step:
        return Position(Answered.UNKNOWN, here.survey)
    current = here.step
    if current.kind == "text":
        if text is None or not text.strip():
            return Position(Answered.BAD, here.survey, current, here.total)
        value, text = None, text.strip()[:MAX_TEXT_ANSWER]
    elif value is None or value not in current.values():
        return Position(Answered.BAD, here.survey, current, here.total)
    else:
        text = None
    existing = await session.get(SurveyAnswer, (token, current.question, current.part))
    today = today_in(now, tz)
    if existing is None:
        session.add(SurveyAnswer(token=token, question=current.question, part=current.part, value=value, text=text, answered_on=today))
    else:
        existing.value, existing.text, existing.answered_on = value, text, today
    await session.flush()
    return await locate(session, token, step + 1, now=now, tz=tz)


async def finish(session: AsyncSession, token: str, telegram_id: int, *, now: dt.datetime, tz: ZoneInfo) -> Answered:
    """Mark the response finished and the person's invitation answered (the two rows are not linked:
    the person's flag says only that they finished). A person finishes once."""
    response = await session.get(SurveyResponse, token, with_for_update=True)
    if response is None:
        return Answered.UNKNOWN
    if response.finished:
        return Answered.DONE
    survey = await session.get(Survey, response.survey_id)
    if survey is None or not is_open(survey, today_in(now, tz)):
        return Answered.CLOSED
    done = await session.execute(
        update(SurveyInvitation)
        .where(SurveyInvitation.survey_id == response.survey_id, SurveyInvitation.telegram_id == telegram_id,
               SurveyInvitation.finished.is_(False))
        .values(finished=True).execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return Answered.DONE
    response.finished = True
    return Answered.SAVED


async def forget_person(session: AsyncSession, telegram_id: int) -> None:
    """/forgetme: the person's invitations and activity day go (their anonymous answers were never theirs)."""
    await session.execute(delete(SurveyInvitation).where(SurveyInvitation.telegram_id == telegram_id))
    await session.execute(delete(UserActivity).where(UserActivity.telegram_id == telegram_id))


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class QuestionResult:
    index: int
    key: str
    kind: str
    text: dict[str, str]
    answered: int = 0
    estimate: Estimate | None = None  # likert, nps (mean)
    nps: float | None = None
    choices: list[tuple[dict[str, str], int]] = field(default_factory=list)
    gap: Gap | None = None
    texts: list[str] = field(default_factory=list)


@dataclass
class SurveyResults:
    survey: Survey
    invited: int
    finished: int
    questions: list[QuestionResult]

    @property
    def response_rate(self) -> float | None:
        return None if self.invited == 0 else self.finished / self.invited


async def survey_results(session: AsyncSession, survey: Survey) -> SurveyResults:
    """Response rate and, over the finished responses, every question's figures."""
    invitations = list(await session.scalars(select(SurveyInvitation).where(SurveyInvitation.survey_id == survey.id)))
    finished = select(SurveyResponse.token).where(SurveyResponse.survey_id == survey.id, SurveyResponse.finished.is_(True))
    answers = list(await session.scalars(select(SurveyAnswer).where(SurveyAnswer.token.in_(finished))))
    by_question: dict[int, list[SurveyAnswer]] = {}
    for a in answers:
        by_question.setdefault(a.question, []).append(a)
    results = []
    for index, q in enumerate(survey.questions):
        mine = by_question.get(index, [])
        result = QuestionResult(index, q["key"], q["kind"], {"zh": q["text_zh"], "en": q["text_en"]})
        values = [a.value for a in mine if a.value is not None]
        if q["kind"] in ("likert", "nps"):
            result.answered = len(values)
            result.estimate = mean_ci([float(v) for v in values])
            if q["kind"] == "nps":
                result.nps = nps(values)
        elif q["kind"] == "choice":
            result.answered = len(values)
            options = [{"zh": zh, "en": en} for zh, en in zip(q["options_zh"], q["options_en"], strict=True)]
            result.choices = [(option, values.count(i)) for i, option in enumerate(options)]
        elif q["kind"] == "text":
            result.texts = sorted(a.text for a in mine if a.text)  # sorted: no order to read anything from
            result.answered = len(result.texts)
        else:
            triples: dict[str, list[int | None]] = {}
            for a in mine:
                triples.setdefault(a.token, [None, None, None])[GAP_PARTS.index(a.part)] = a.value
            result.answered = len(triples)
            result.gap = gap_scores((t[0], t[1], t[2]) for t in triples.values())
        results.append(result)
    return SurveyResults(survey, len(invitations), sum(1 for i in invitations if i.finished), results)


def _number(value: float | None, digits: int) -> float | str:
    """A figure for the CSV as a number (a spreadsheet reads it as one; a negative gap stays a value)."""
    return "" if value is None else round(value, digits)


def results_csv(results: SurveyResults) -> str:
    """The results as CSV: one row per figure (question, measure, n, value, 95 % CI)."""
    out = io.StringIO()
    writer = csv_export.writer(out)
    writer.writerow(["survey", "question", "key", "kind", "measure", "n", "value", "ci_low", "ci_high", "text_zh", "text_en"])
    code = results.survey.code
    writer.writerow([code, "", "", "", "invited", results.invited, results.invited, "", "", "", ""])
    writer.writerow([code, "", "", "", "finished", results.finished, results.finished, "", "", "", ""])
    writer.writerow([code, "", "", "", "response_rate", results.invited, _number(results.response_rate, 4), "", "", "", ""])

    def row(q: QuestionResult, measure: str, e: Estimate | None = None, value: float | int | None = None, n: int | None = None) -> None:
        shown = _number(e.mean, 3) if e is not None else (value if isinstance(value, int) else _number(value, 3))
        writer.writerow([code, q.index + 1, q.key, q.kind, measure, e.n if e is not None else (n if n is not None else q.answered),
                         shown, _number(e.low, 3) if e else "", _number(e.high, 3) if e else "", q.text["zh"], q.text["en"]])

    for q in results.questions:
        if q.estimate is not None:
            row(q, "mean", q.estimate)
        if q.kind == "nps":
            row(q, "nps", value=q.nps)
        for option, count in q.choices:
            row(q, f"choice:{option['en']}", value=count)
        if q.gap is not None:
            for name in ("minimum", "desired", "perceived", "adequacy", "superiority"):
                row(q, name, getattr(q.gap, name))
        for text in q.texts:
            row(q, "text", value=None, n=1)
            writer.writerow([code, q.index + 1, q.key, q.kind, "answer", 1, text, "", "", "", ""])
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# Demo

DEMO_SURVEY = """
code = "demo-satisfaction"
title_zh = "读者满意度调查"
title_en = "Reader satisfaction survey"
intro_zh = "匿名填写，约 2 分钟。您的回答与您的身份不会关联保存。"
intro_en = "Anonymous, about 2 minutes. Your answers are never stored with who you are."
closes = "2099-12-31"

[[questions]]
key = "overall"
kind = "likert"
text_zh = "总体而言，您对图书馆的服务满意吗？"
text_en = "Overall, how satisfied are you with the library's service?"

[[questions]]
key = "recommend"
kind = "nps"
text_zh = "您有多大可能向朋友推荐本馆？"
text_en = "How likely are you to recommend the library to a friend?"

[[questions]]
key = "staff_help"
kind = "gap"
text_zh = "馆员乐于帮助读者"
text_en = "Staff who are willing to help readers"

[[questions]]
key = "visit"
kind = "choice"
text_zh = "您多久来一次图书馆？"
text_en = "How often do you visit the library?"
options_zh = ["每周", "每月", "很少"]
options_en = ["Every week", "Every month", "Rarely"]

[[questions]]
key = "improve"
kind = "text"
text_zh = "您希望我们改进什么？"
text_en = "What should we improve?"
"""


async def seed_demo(session: AsyncSession, policy: Any, now: dt.datetime, rng: random.Random, reader_ids: Iterable[int]) -> None:
    """A sample survey with a few dozen anonymous answers already in, and the sample readers invited."""
    fields = parse_survey(DEMO_SURVEY)
    survey = Survey(**fields)
    session.add(survey)
    await session.flush()
    today = now.date()
    for _ in range(40):
        token = secrets.token_hex(TOKEN_BYTES)
        session.add(SurveyResponse(token=token, survey_id=survey.id, started_on=today, finished=True))
        await session.flush()
        values: list[tuple[int, str, int | None, str | None]] = [
            (0, "", rng.choices((2, 3, 4, 5), (1, 3, 8, 6))[0], None),
            (1, "", rng.choices(range(11), (1, 1, 1, 1, 1, 2, 3, 5, 8, 8, 6))[0], None),
        ]
        low = rng.randint(4, 6)
        values += [(2, "min", low, None), (2, "des", rng.randint(low + 1, 9), None), (2, "per", rng.randint(low - 1, 8), None)]
        values.append((3, "", rng.choices((0, 1, 2), (4, 3, 2))[0], None))
        for question, part, value, text in values:
            session.add(SurveyAnswer(token=token, question=question, part=part, value=value, text=text, answered_on=today))
    for text in ("周末开放时间再长一些", "More quiet study seats, please", "自习室插座太少"):
        token = secrets.token_hex(TOKEN_BYTES)
        session.add(SurveyResponse(token=token, survey_id=survey.id, started_on=today, finished=True))
        await session.flush()
        session.add(SurveyAnswer(token=token, question=4, part="", value=None, text=text, answered_on=today))
    # Invitation flags as the sending would have left them (43 people answered out of 60 invited), for
    # demo people with ids nobody uses in the chat; the sample readers are invited by the demo's first run.
    for number in range(60):
        session.add(SurveyInvitation(survey_id=survey.id, telegram_id=-(100000 + number), invited_on=today, finished=number < 43,
                                     started=number < 43))


async def invite_demo_readers(session: AsyncSession, reader_ids: Iterable[int], now: dt.datetime) -> int:
    """``librarybot demo`` on its first run: the sample readers are invited to the sample survey
    (kept out of ``seed_demo``, so the tests that seed the demo library get no unasked messages)."""
    survey = await find_survey(session, "demo-satisfaction")
    if survey is None:
        return 0
    invited = 0
    for telegram_id in reader_ids:
        if await session.get(SurveyInvitation, (survey.id, telegram_id)) is not None:
            continue
        session.add(SurveyInvitation(survey_id=survey.id, telegram_id=telegram_id, invited_on=now.date()))
        await enqueue(session, telegram_id, "quality.survey_invite",
                      {"title": survey.title(), "intro": survey.intro(), "closes": survey.closes_on.isoformat(),
                       "count": len(survey.questions)}, kind="survey", priority=Priority.BULK,
                      buttons=[[["quality.btn_start", f"sv:s:{survey.id}"]]], dedupe_key=f"sv:{survey.id}:inv:{telegram_id}")
        invited += 1
    return invited
