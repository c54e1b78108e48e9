"""Service quality end to end: the real bot over HTTP through the emulator. Readers take a survey in
the chat (buttons, Back, Skip, a written answer); every table of the database is then read to prove
no link between a person and their answers was stored; staff read the results with /survey and
their own month with /myratings (never a colleague's figures); /quality is for admins only, with
the CSV and the PDF; a removed staff member keeps their history in the report."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, select

from bot.embedded import EmbeddedBot
from bot.emulator import Person
from storage.db import Database
from storage.events import Event, EventFeedback, EventRegistration
from storage.ill import IllRequest
from storage.people import Reader, Role, User, add_staff, remove_staff
from storage.quality import label, month_of
from storage.surveys import (
    SurveyAnswer,
    SurveyInvitation,
    SurveyResponse,
    import_survey,
    send_survey,
    survey_results,
)
from storage.tickets import Ticket
from tests.auxil.chat import relax_flood_control

FANG, MING, STAFF, COLLEAGUE, ADMIN = 301, 302, 9001, 9002, 9003
FANG_WORDS = "Please open longer on weekends"

SURVEY = """
code = "autumn"
title_zh = "秋季满意度调查"
title_en = "Autumn satisfaction survey"
intro_en = "Two minutes."
closes = "2099-12-31"

[[questions]]
kind = "likert"
text_zh = "总体满意吗？"
text_en = "Overall satisfaction?"

[[questions]]
kind = "nps"
text_zh = "推荐本馆？"
text_en = "Recommend us?"

[[questions]]
kind = "choice"
text_zh = "多久来一次？"
text_en = "How often do you come?"
options_zh = ["每周", "很少"]
options_en = ["Weekly", "Rarely"]

[[questions]]
kind = "text"
text_zh = "建议？"
text_en = "Suggestions?"

[[questions]]
kind = "gap"
text_zh = "馆员乐于助人"
text_en = "Staff willing to help"
"""


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["plain"] or "" for m in messages if m["from_bot"])


async def watch(env: EmbeddedBot, user_id: int) -> Person:
    person = await env.person(user_id)
    await person.__aenter__()
    return person


async def readers_and_staff(env: EmbeddedBot) -> None:
    async with env.db.session() as s:
        s.add_all([Reader(id=1, card_number="C0301", name="Wang Fang", pin_hash="x"),
                   Reader(id=2, card_number="C0302", name="Li Ming", pin_hash="x")])
        await s.flush()
        s.add_all([User(telegram_id=FANG, first_name="Fang", telegram_language="en", reader_id=1),
                   User(telegram_id=MING, first_name="Ming", telegram_language="en", reader_id=2),
                   User(telegram_id=STAFF, first_name="Na", telegram_language="en"),
                   User(telegram_id=COLLEAGUE, first_name="Jie", telegram_language="en"),
                   User(telegram_id=ADMIN, first_name="Boss", telegram_language="en")])
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, COLLEAGUE, Role.STAFF, "Chen Jie")
        await add_staff(s, ADMIN, Role.ADMIN, "Director")
    env.emulator.started(FANG, MING, STAFF, COLLEAGUE, ADMIN)  # they pressed Start long ago
    relax_flood_control(env)


async def every_row(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table in the database (reflected: the models' tables and any other)."""
    metadata = MetaData()
    async with db.engine.connect() as conn:
        await conn.run_sync(metadata.reflect)
        return {name: [dict(row) for row in (await conn.execute(select(table))).mappings()]
                for name, table in metadata.tables.items()}


async def test_a_survey_in_the_chat_is_anonymous_for_real(bot_env: EmbeddedBot, tmp_path: Path) -> None:
    await readers_and_staff(bot_env)
    path = tmp_path / "survey.toml"
    path.write_text(SURVEY, encoding="utf-8")
    async with bot_env.db.session() as s:
        survey = await import_survey(s, path)
        sent = await send_survey(s, survey, now=bot_env.now(), tz=bot_env.settings.tz, audience="readers")
        again = await send_survey(s, survey, now=bot_env.now(), tz=bot_env.settings.tz, audience="readers")
    assert (sent.invited, sent.eligible) == (2, 2)  # the readers; staff are never invited
    assert again.invited == 0  # each person at most once
    fang, ming, staff = await watch(bot_env, FANG), await watch(bot_env, MING), await watch(bot_env, STAFF)
    await fang.wait_for(lambda m: "Autumn satisfaction survey" in (m["text"] or ""))
    await ming.wait_for(lambda m: "Autumn satisfaction survey" in (m["text"] or ""))

    # Fang answers everything, goes Back once to change an answer, and writes a suggestion.
    first = texts(await fang.press("▶️ Start the survey"))
    assert "1/7" in first and "Overall satisfaction?" in first and "very satisfied" in first
    assert "Recommend us?" in texts(await fang.press("4"))
    assert "How often do you come?" in texts(await fang.press("9"))
    assert "Suggestions?" in texts(await fang.press("Weekly"))
    gap = texts(await fang.send(FANG_WORDS))
    assert "Staff willing to help" in gap and "minimum" in gap and "5/7" in gap
    assert "want" in texts(await fang.press("5"))
    assert "get" in texts(await fang.press("9"))
    assert "want" in texts(await fang.press("‹ Back"))  # back to "desired": 9 becomes 7
    await fang.press("7")
    assert "Thank you" in texts(await fang.press("6"))
    tokens = {re.match(r"sv:[abk]:([0-9a-f]+):", b["callback_data"]).group(1)  # type: ignore[union-attr]
              for m in fang.bot_messages() for row in m["buttons"] for b in row
              if b.get("callback_data", "").startswith(("sv:a:", "sv:b:", "sv:k:"))}
    assert len(tokens) == 1
    fang_token = tokens.pop()

    # Three days later the job reminds Ming (not Fang, who finished), once.
    bot_env.move_clock(dt.timedelta(days=3, hours=1))
    await bot_env.run_jobs()
    await ming.wait_for(lambda m: "A reminder" in (m["plain"] or ""))
    await bot_env.run_jobs()
    assert sum("A reminder" in (m["plain"] or "") for m in ming.bot_messages()) == 1
    assert not any("A reminder" in (m["plain"] or "") for m in fang.bot_messages())

    # Ming answers the first question and skips the rest (the written one too).
    await ming.press("▶️ Start the survey")
    await ming.press("2")
    for _ in range(6):
        await ming.press("Skip ›")
    assert "Thank you" in texts([ming.bot_messages()[-1]])
    # Nobody answers twice: Start again is refused; an answer pressed after the end is refused.
    await fang.press("▶️ Start the survey", expect=False)
    assert "already answered" in (fang.last_callback_answer or {}).get("text", "")
    last = fang.bot_messages()[-1]["message_id"]
    await fang.press_data(last, f"sv:a:{fang_token}:0:1", expect=False)  # Fang's own token, after the end
    assert "already answered" in (fang.last_callback_answer or {}).get("text", "")
    await fang.press_data(last, f"sv:a:{'0' * 24}:0:1", expect=False)  # a forged token
    assert "no longer valid" in (fang.last_callback_answer or {}).get("text", "")

    async with bot_env.db.session() as s:
        results = await survey_results(s, survey)
    assert (results.invited, results.finished) == (2, 2)
    likert, nps, choice, written, gap_result = results.questions
    assert likert.estimate is not None and likert.estimate.n == 2 and likert.estimate.mean == 3.0
    assert nps.nps == 100.0 and nps.answered == 1
    assert choice.choices[0][1] == 1 and written.texts == [FANG_WORDS]
    assert gap_result.gap is not None and gap_result.gap.adequacy.mean == 1.0 and gap_result.gap.superiority.mean == -1.0

    # The anonymity proof: read every table. Fang's id (and card) and Fang's answers never share a row;
    # the token that groups Fang's answers is nowhere but in the anonymous tables; dates are days.
    rows = await every_row(bot_env.db)
    for table, content in rows.items():
        for row in content:
            values = [str(v) for v in row.values() if v is not None]
            flat = " ".join(values)
            identifies = str(FANG) in values or "C0301" in flat or any(str(v) == str(FANG) for v in row.values())
            has_answer = fang_token in flat or FANG_WORDS in flat
            assert not (identifies and has_answer), (table, row)
            if fang_token in flat:
                assert table in ("survey_responses", "survey_answers"), (table, row)
            if FANG_WORDS in flat:
                assert table == "survey_answers", (table, row)
    assert set(rows["survey_answers"][0]) == {"token", "question", "part", "value", "text", "answered_on"}
    assert set(rows["survey_responses"][0]) == {"token", "survey_id", "started_on", "finished"}
    assert set(rows["survey_invitations"][0]) == {"survey_id", "telegram_id", "invited_on", "reminded", "started", "finished"}
    for table, column in (("survey_answers", "answered_on"), ("survey_responses", "started_on"), ("survey_invitations", "invited_on")):
        assert all(isinstance(r[column], (dt.date, str)) and len(str(r[column])) == 10 for r in rows[table])  # a day, no time
    async with bot_env.db.session() as s:
        flags = {i.telegram_id: (i.started, i.finished) for i in await s.scalars(select(SurveyInvitation))}
        assert flags == {FANG: (True, True), MING: (True, True)}
        assert len(list(await s.scalars(select(SurveyResponse)))) == 2
        assert {a.token for a in await s.scalars(select(SurveyAnswer))} >= {fang_token}

    # Staff read the results and the chart; a reader cannot.
    listing = await staff.send("/survey")
    assert "Surveys" in texts(listing)
    shown = texts(await staff.press("#1 Autumn satisfaction survey (open, until 2099-12-31)"))
    assert "response rate 100%" in shown and "NPS 100" in shown and "adequacy 1.00" in shown and "superiority -1.00" in shown
    chart = await staff.press("📊 Chart")
    assert any(m.get("photo") for m in chart) or await staff.wait_for(lambda m: bool(m.get("photo")))
    assert "only for library staff" in texts(await fang.send("/survey"))


async def add_ratings(env: EmbeddedBot) -> dt.datetime:
    """Six rated tickets (one anonymous) and an ILL request for Li Na; three low ratings and a
    service complaint for Chen Jie, and an event he organised."""
    now = env.now()
    async with env.db.session() as s:
        for n, rating in enumerate((5, 5, 4, 5, 5, 4)):
            s.add(Ticket(category="collection", text="private words", anonymous=n == 0, requester_id=FANG, requester_name="Wang Fang",
                         status="closed", assignee_id=STAFF, created_at=now, respond_by=now + dt.timedelta(hours=24),
                         first_response_at=now + dt.timedelta(minutes=30), rating=rating))
        for rating, category in ((2, "service"), (3, "environment")):
            s.add(Ticket(category=category, text="more private words", requester_id=MING, status="closed", assignee_id=COLLEAGUE,
                         created_at=now, respond_by=now + dt.timedelta(hours=24), first_response_at=now + dt.timedelta(hours=3),
                         rating=rating))
        s.add(IllRequest(form_token="q18", telegram_id=FANG, kind="Loan", title="A book", status="completed", handled_by=STAFF,
                         submitted_at=now, rating=5, rated_at=now))
        event = Event(title_zh="讲座", title_en="Talk", starts_at=now - dt.timedelta(hours=3), ends_at=now - dt.timedelta(hours=2),
                      place="3F", category="lecture", organiser_staff_id=COLLEAGUE)
        s.add(event)
        await s.flush()
        reg = EventRegistration(event_id=event.id, telegram_id=MING, status="registered", code="QQQQQQ", checked_in_at=event.starts_at)
        s.add(reg)
        await s.flush()
        s.add(EventFeedback(registration_id=reg.id, event_id=event.id, organiser_staff_id=COLLEAGUE, rating=3, rated_at=now))
    return now


async def test_myratings_shows_only_my_own_figures_and_quality_is_for_admins(bot_env: EmbeddedBot) -> None:
    await readers_and_staff(bot_env)
    now = await add_ratings(bot_env)
    month = label(month_of(now, bot_env.settings.tz))
    staff, colleague, admin, fang = [await watch(bot_env, i) for i in (STAFF, COLLEAGUE, ADMIN, FANG)]

    mine = texts(await staff.send(f"/myratings {month}"))
    # Li Na: 6 tickets + 1 ILL request, average 33/7 = 4.71; the team median of two staff is beside it.
    assert "Interactions: 7" in mine and "Average rating: 4.71 from 7 ratings" in mine and "30 min" in mine
    assert "team median 3.69" in mine  # median of 4.71 and 2.67
    assert "Chen Jie" not in mine and "2.67" not in mine and "Wang Fang" not in mine
    his = texts(await colleague.send(f"/myratings {month}"))
    assert "Average rating: 2.67 from 3 ratings" in his and "Complaints about service: 1" in his and "Li Na" not in his and "4.71" not in his

    # /quality is for admins only.
    assert "Li Na" not in texts(await staff.send("/quality"))
    assert "Li Na" not in texts(await fang.send("/quality"))
    assert "YYYY-MM" in texts(await admin.send("/quality 2026-13"))

    # Chen Jie leaves the staff: his history stays in the report, marked as a former staff member
    # (under the name the staff list gave him, which the bot's job keeps).
    await bot_env.run_jobs()
    async with bot_env.db.session() as s:
        assert await remove_staff(s, COLLEAGUE)
    report = texts(await admin.send(f"/quality {month}"))
    assert "Li Na: 7 · 4.71 (7) · 30 min · 0" in report
    assert "Chen Jie (former staff): 3 · 2.67 (3) · 180 min · 1" in report
    assert "Recognition" in report and "1. Li Na: 4.71 from 7 ratings" in report and "2. " not in report.split("Recognition")[1]
    assert "Wang Fang" not in report and "private words" not in report  # never the readers, even of anonymous tickets
    csv_file = await admin.press("📄 CSV")
    document = next((m for m in csv_file if m.get("document")), None) or (await admin.wait_for(lambda m: bool(m.get("document"))))[-1]
    assert document["document"]["file_name"] == f"quality-{month}.csv"
    pdf = await admin.press("📑 PDF", timeout=60)
    document = next((m for m in pdf if m.get("document")), None) or (await admin.wait_for(lambda m: bool(m.get("document")), timeout=60))[-1]
    assert document["document"]["file_name"] == f"quality-{month}.pdf"
    # A forged report button from a staff member is refused.
    await staff.send("/myratings")
    await staff.press_data(staff.bot_messages()[-1]["message_id"], f"q:pdf:{month}", expect=False)
    assert "only for" in (staff.last_callback_answer or {}).get("text", "")


async def test_the_demo_has_a_survey_to_take_and_ratings_to_read(bot_env: EmbeddedBot) -> None:
    from bot.demo import ADMIN_ID, STAFF_ID
    from storage.surveys import invite_demo_readers
    from tests.auxil.people import seed_library

    await seed_library(bot_env.db, bot_env.policy)
    async with bot_env.db.session() as s:  # as `librarybot demo` does on its first run
        assert await invite_demo_readers(s, [8001, 8002], bot_env.now()) == 2
    bot_env.emulator.started(8001, 8002, STAFF_ID, ADMIN_ID)  # the demo's people, as `librarybot demo` marks them
    relax_flood_control(bot_env)
    reader, staff, admin = [await watch(bot_env, i) for i in (8001, STAFF_ID, ADMIN_ID)]
    # The invitation went out in Chinese (the demo's readers'); the people here then write in English.
    def invitation(m: dict[str, Any]) -> bool:
        return "读者满意度调查" in (m["plain"] or "")

    if not any(invitation(m) for m in reader.bot_messages()):  # it may have arrived before we looked
        await reader.wait_for(invitation, timeout=30)
    assert "1/7" in texts(await reader.press("▶️ 开始答题"))
    mine = texts(await staff.send("/myratings"))
    assert "Average rating:" in mine and "team median" in mine and "Wang Fang" not in mine and "Chen Jie" not in mine
    report = texts(await admin.send("/quality"))
    assert "Li Na" in report and "Wang Fang" in report and "Chen Jie (former staff)" in report and "Recognition" in report
    results = texts(await staff.send("/survey demo-satisfaction"))
    assert "answered 43" in results and "NPS" in results and "adequacy" in results
