"""Service-quality rules without Telegram: the statistics (confidence intervals, NPS, gap scores),
survey files, sending (sample, audience, active days, once each), the one reminder, closing at the
end date, and the per-staff sources (the reference desk's table when present, and when absent)."""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from storage.db import Database
from storage.outbox import Delivery
from storage.people import Reader, Role, User, add_staff
from storage.quality import (
    Figures,
    figures,
    month_bounds,
    monthly_report,
    parse_month,
    recognition,
    reference_interactions,
    team_median,
)
from storage.reference import DeskConversation
from storage.surveys import (
    SurveyFileError,
    SurveyInvitation,
    close_ended,
    find_survey,
    gap_scores,
    import_survey,
    mean_ci,
    note_activity,
    nps,
    parse_survey,
    queue_reminders,
    send_survey,
    start,
    t_975,
)

TZ = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2031, 3, 10, 2, 0, tzinfo=dt.UTC)  # a fixed moment: 10:00 in Shanghai

SURVEY = """
code = "spring"
title_en = "Spring survey"
closes = 2031-03-20
[[questions]]
kind = "likert"
text_en = "Happy?"
"""


def test_mean_with_a_95_percent_confidence_interval() -> None:
    e = mean_ci([1, 2, 3, 4, 5])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(4) · s / √n
    assert e.n == 5 and e.mean == 3.0
    assert e.low == pytest.approx(3 - half) and e.high == pytest.approx(3 + half)
    assert mean_ci([4, 4, 4]).low == 4.0 == mean_ci([4, 4, 4]).high  # no spread, no width
    assert mean_ci([3]) == mean_ci([3]).__class__(1, 3.0)  # one answer: a mean, no interval
    assert mean_ci([]).mean is None
    assert t_975(1) == 12.706 and t_975(30) == 2.042 and t_975(50) == 2.000 and t_975(10_000) == 1.960
    # Wider with fewer answers, narrower with more of the same answers.
    assert (mean_ci([2, 4] * 50).high or 0) - (mean_ci([2, 4] * 50).low or 0) < (mean_ci([2, 4]).high or 0) - (mean_ci([2, 4]).low or 0)


def test_net_promoter_score() -> None:
    assert nps([10, 10, 9, 5]) == 50.0  # 75 % promoters − 25 % detractors
    assert nps([10, 9, 8, 7, 6, 0]) == 0.0  # passives (7–8) count only in the total
    assert nps([0, 3, 6]) == -100.0
    assert nps([]) is None


def test_gap_scores_adequacy_and_superiority() -> None:
    gap = gap_scores([(5, 8, 6), (4, 7, 7), (6, 9, None), (None, 8, 5)])
    assert gap.minimum.mean == 5.0 and gap.desired.mean == 8.0 and gap.perceived.mean == 6.0
    assert gap.adequacy.n == 2 and gap.adequacy.mean == 2.0  # perceived − minimum: 1 and 3
    assert gap.superiority.n == 3 and gap.superiority.mean == pytest.approx((-2 + 0 - 3) / 3)  # perceived − desired
    assert gap.adequacy.low is not None and gap.adequacy.low < 2.0 < (gap.adequacy.high or 0)


def test_survey_files_are_checked_with_one_line_reasons() -> None:
    assert parse_survey(SURVEY)["closes_on"] == dt.date(2031, 3, 20)
    for broken, reason in (
        ("title_en = 'x'\ncloses = 2031-01-01\n[[questions]]\nkind='likert'\ntext_en='q'", "code"),
        ("code='a'\ncloses = 2031-01-01\n[[questions]]\nkind='likert'\ntext_en='q'", "title"),
        ("code='a'\ntitle_en='x'\n[[questions]]\nkind='likert'\ntext_en='q'", "closes"),
        ("code='a'\ntitle_en='x'\ncloses = 2031-01-01", "questions"),
        ("code='a'\ntitle_en='x'\ncloses = 2031-01-01\n[[questions]]\nkind='stars'\ntext_en='q'", "kind must be one of"),
        ("code='a'\ntitle_en='x'\ncloses = 2031-01-01\n[[questions]]\nkind='choice'\ntext_en='q'\noptions_en=['only']", "between 2"),
        ("code='a'\ntitle_en='x'\ncloses = 2031-01-01\n[[questions]]\nkind='likert'", "text_zh or text_en"),
        ("code = [", "not valid TOML"),
    ):
        with pytest.raises(SurveyFileError, match=reason) as caught:
            parse_survey(broken)
        assert "\n" not in str(caught.value)


async def people(db: Database) -> None:
    async with db.session() as s:
        for n in range(1, 7):
            s.add(Reader(id=n, card_number=f"C{n}", name=f"R{n}", pin_hash="x"))
        await s.flush()
        for n in range(1, 7):
            s.add(User(telegram_id=100 + n, first_name="R", reader_id=n))
        s.add_all([User(telegram_id=200, first_name="Visitor"), User(telegram_id=201, first_name="Gone", unreachable=True),
                   User(telegram_id=9001, first_name="Staff", reader_id=None)])
        await add_staff(s, 9001, Role.STAFF, "Li Na")
        for n in (1, 2, 3):
            await note_activity(s, 100 + n, NOW.astimezone(TZ).date() - dt.timedelta(days=n * 10))


async def test_sending_samples_once_each_remind_once_and_close(db: Database, tmp_path: Path) -> None:
    await people(db)
    path = tmp_path / "s.toml"
    path.write_text(SURVEY, encoding="utf-8")
    async with db.session() as s:
        survey = await import_survey(s, path)
        # Active in the last 15 days: only reader 101 (seen 10 days ago).
        recent = await send_survey(s, survey, now=NOW, tz=TZ, active_days=15)
        assert (recent.eligible, recent.invited) == (1, 1)
        sample = await send_survey(s, survey, now=NOW, tz=TZ, sample=2, rng=random.Random(1))
        assert (sample.eligible, sample.invited) == (5, 2)
        rest = await send_survey(s, survey, now=NOW, tz=TZ, audience="everyone")
        assert (rest.eligible, rest.invited) == (4, 4)  # 3 readers left and the visitor; never staff or the unreachable
        assert (await send_survey(s, survey, now=NOW, tz=TZ, audience="everyone")).invited == 0
        invited = set(await s.scalars(select(SurveyInvitation.telegram_id)))
        assert invited == {101, 102, 103, 104, 105, 106, 200}
        spacing = sorted(await s.scalars(select(Delivery.not_before).where(Delivery.text_key == "quality.survey_invite")))
        assert spacing[-1] - spacing[0] >= dt.timedelta(seconds=3)  # a polite trickle, not a burst
        # Re-importing a survey that was sent is refused.
        with pytest.raises(SurveyFileError, match="already sent"):
            await import_survey(s, path)
        # One finishes its answers... well, starts: a reminder still goes to everyone who has not finished.
        assert (await start(s, survey.id, 101, now=NOW, tz=TZ)).token is not None
        assert await queue_reminders(s, now=NOW + dt.timedelta(days=2), tz=TZ) == 0
        assert await queue_reminders(s, now=NOW + dt.timedelta(days=3), tz=TZ) == 7
        assert await queue_reminders(s, now=NOW + dt.timedelta(days=4), tz=TZ) == 0  # once
        reminders = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.text_key == "quality.survey_reminder"))
        assert reminders == 7
        # Closed after its end date: no more starting, no more sending.
        assert await close_ended(s, now=dt.datetime(2031, 3, 20, 15, 0, tzinfo=dt.UTC), tz=TZ) == 0  # 23:00 on the last day
        assert await close_ended(s, now=dt.datetime(2031, 3, 20, 16, 0, tzinfo=dt.UTC), tz=TZ) == 1  # midnight
        assert (await start(s, survey.id, 102, now=dt.datetime(2031, 3, 21, tzinfo=dt.UTC), tz=TZ)).outcome == "closed"
        await s.refresh(survey)
        assert survey.status == "closed" and (await send_survey(s, survey, now=NOW, tz=TZ)).closed
        assert (await find_survey(s, "spring")) is survey and (await find_survey(s, str(survey.id))) is survey


def test_figures_median_and_recognition() -> None:
    def member(staff_id: int, average: float | None, ratings: int, interactions: int = 10) -> Figures:
        return Figures(staff_id, f"S{staff_id}", interactions=interactions, ratings=ratings, average=average)

    staff = [member(1, 4.9, 4), member(2, 4.5, 5), member(3, 4.8, 12), member(4, None, 0, 2), member(5, 4.5, 9)]
    assert [f.staff_id for f in recognition(staff)] == [3, 5, 2]  # at least 5 ratings; ties: more ratings first
    median = team_median(staff)
    assert median.members == 5 and median.interactions == 10 and median.average == pytest.approx(4.65)
    assert figures(1, []).average is None


async def test_the_reference_desk_source_counts_taken_conversations(db: Database) -> None:
    start, end = month_bounds(parse_month("2031-03"), TZ)
    at = lambda text: dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)  # noqa: E731
    async with db.session() as s:
        assert await reference_interactions(s, start, end) == []
        s.add_all([
            DeskConversation(staff_id=9001, rating=5, rated_at=at("2031-03-10 03:00"), taken_at=at("2031-03-10 02:05"),
                             first_answer_at=at("2031-03-10 02:09"), created_at=at("2031-03-10 02:00")),
            DeskConversation(staff_id=9001, taken_at=at("2031-03-11 02:00"), created_at=at("2031-03-11 01:00")),
            DeskConversation(staff_id=9002, rating=2, rated_at=at("2031-02-10 03:00"), created_at=at("2031-02-10 02:00")),
            DeskConversation(created_at=at("2031-03-12 02:00")),  # never taken: nobody's
        ])
    async with db.session() as s:
        found = await reference_interactions(s, start, end)
        assert sorted((i.staff_id, i.rating or 0) for i in found) == [(9001, 0), (9001, 5)]
        assert [i.first_response for i in found if i.rating == 5] == [dt.timedelta(minutes=4)]
        report = await monthly_report(s, (2031, 3), TZ)
        assert report.of(9001).interactions == 2 and report.of(9001).by_source == {"reference": 2}
        assert dict((m, f.ratings) for m, f in report.trend)[(2031, 2)] == 1
