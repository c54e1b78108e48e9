"""Service quality in the chat: a reader takes a satisfaction survey (one question a message, with
buttons, Back and Skip); staff read the results with /survey and their own month with /myratings;
admins read the monthly report with /quality [YYYY-MM] (with CSV and PDF buttons). Also the job that
closes ended surveys and sends the one reminder, and the day-of-last-use note ``survey send
--active-days`` reads.

Anonymity: the response token rides in the question's callback data (``sv:a:<token>:<step>:<value>``,
``sv:b:<token>:<step>`` Back, ``sv:k:<token>:<step>`` Skip); the store never keeps it beside the
person. While a written answer is awaited, the token is held in this process's memory only
(``bot_data``, which is never persisted); after a restart, Back or Skip on the last question picks
the survey up again. Other callback data: ``sv:s:<survey>`` Start, ``sv:r:<survey>`` results,
``sv:c:<survey>`` chart; ``q:csv:<YYYY-MM>`` and ``q:pdf:<YYYY-MM>`` the report's files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import re
from typing import Any

from telegram import InputFile, Message, Update
from telegram.constants import ParseMode
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bot.context import services, who
from bot.i18n import t
from bot.quality_render import myratings_text, report_pdf, report_text, survey_chart_png, survey_results_text
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, reply
from storage.people import Role
from storage.quality import month_of, monthly_report, parse_month, remember_staff, report_csv
from storage.surveys import (
    Answered,
    Position,
    Start,
    Step,
    all_surveys,
    close_ended,
    find_survey,
    finish,
    locate,
    note_activity,
    queue_reminders,
    start,
    survey_results,
    today_in,
)
from storage.surveys import answer as save_answer

log = logging.getLogger(__name__)

JOB_EVERY = dt.timedelta(minutes=30)
PENDING = "survey_text_answers"  # bot_data key: user id → (token, step) while a written answer is awaited
SEEN = "activity_seen"  # bot_data key: user id → the last day noted
TOKEN = r"[0-9a-f]{24}"


def _pending(context: ContextTypes.DEFAULT_TYPE | Application) -> dict[int, tuple[str, int]]:  # type: ignore[type-arg]
    found: dict[int, tuple[str, int]] = context.bot_data.setdefault(PENDING, {})
    return found


def _parts(update: Update) -> list[str]:
    data = update.callback_query.data if update.callback_query else ""
    return (data or "").split(":")


# --------------------------------------------------------------------------------------------------
# Taking a survey


def _question(lang: str, position: Position, token: str) -> tuple[str, list[list[Button]]]:
    """The text and buttons of the step ``position`` stands at."""
    step: Step | None = position.step
    assert step is not None and position.survey is not None
    if step.kind == "gap":
        hint = t(lang, f"quality.gap_{step.part}")
    else:
        hint = t(lang, f"quality.hint_{step.kind}")
    text = t(lang, "quality.survey_question", title=escape(position.survey.title()[lang]), number=step.number + 1,
             total=position.total, question=escape(step.text[lang]), hint=hint)
    rows: list[list[Button]] = []
    if step.kind == "choice":
        rows += [[(f"={choice[lang]}", f"sv:a:{token}:{step.number}:{i}")] for i, choice in enumerate(step.choices)]
    elif step.values():
        values = step.values()
        per_row = 6 if len(values) > 6 else len(values)
        for i in range(0, len(values), per_row):
            rows.append([(f"={v}", f"sv:a:{token}:{step.number}:{v}") for v in values[i:i + per_row]])
    nav: list[Button] = []
    if step.number > 0:
        nav.append(("quality.btn_back", f"sv:b:{token}:{step.number}"))
    nav.append(("quality.btn_skip", f"sv:k:{token}:{step.number}"))
    rows.append(nav)
    return text, rows


async def _show(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, position: Position, token: str, *, replace: bool) -> None:
    """Show the step (or the thanks after the last one): edit the pressed message, or send a new one."""
    user_id = update.effective_user.id if update.effective_user else 0
    pending = _pending(context)
    if position.step is None:
        svc = services(context)
        async with svc.db.session() as session:
            done = await finish(session, token, user_id, now=svc.now(), tz=svc.tz)
        pending.pop(user_id, None)
        key = {Answered.SAVED: "quality.survey_thanks", Answered.CLOSED: "quality.survey_closed"}.get(done, "quality.survey_already")
        if replace:
            await edit(update, context, key, lang=lang)
        else:
            await reply(update, context, key, lang=lang)
        return
    text, buttons = _question(lang, position, token)
    if position.step.kind == "text":
        pending[user_id] = (token, position.step.number)
    else:
        pending.pop(user_id, None)
    if replace:
        await edit(update, context, "quality.survey_raw", lang=lang, text=text, buttons=buttons)
    else:
        await reply(update, context, "quality.survey_raw", lang=lang, text=text, buttons=buttons)


def _refusal(outcome: Answered) -> str:
    return {Answered.CLOSED: "quality.survey_closed", Answered.DONE: "quality.survey_already",
            Answered.BAD: "quality.survey_bad"}.get(outcome, "quality.survey_unknown")


async def start_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Start (or start again): a new anonymous response, and its first question in a new message."""
    me = await who(update, context)
    parts = _parts(update)
    survey_id = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) < 2**63 else 0
    svc = services(context)
    async with svc.db.session() as session:
        begun = await start(session, survey_id, me.user_id, now=svc.now(), tz=svc.tz)
        position = await locate(session, begun.token, 0, now=svc.now(), tz=svc.tz) if begun.token else None
    if begun.outcome != Start.STARTED or position is None or begun.token is None:
        key = {Start.CLOSED: "quality.survey_closed", Start.FINISHED: "quality.survey_already"}.get(begun.outcome, "quality.survey_not_invited")
        await answer(update, context, key, alert=True, lang=me.lang)
        return
    await answer(update, context)
    await _show(update, context, me.lang, position, begun.token, replace=False)


async def step_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A value, Back or Skip on a question."""
    me = await who(update, context)
    parts = _parts(update)
    action, token, step = parts[1], parts[2], int(parts[3])
    svc = services(context)
    async with svc.db.session() as session:
        if action == "a":
            position = await save_answer(session, token, step, value=int(parts[4]), now=svc.now(), tz=svc.tz)
        else:
            position = await locate(session, token, step - 1 if action == "b" else step + 1, now=svc.now(), tz=svc.tz)
    if position.outcome != Answered.SAVED:
        await answer(update, context, _refusal(position.outcome), alert=True, lang=me.lang)
        return
    await answer(update, context)
    await _show(update, context, me.lang, position, token, replace=True)


class _AwaitingText(filters.MessageFilter):
    """Messages of people whose survey waits for a written answer (known in this process only)."""

    def __init__(self, app: Application) -> None:  # type: ignore[type-arg]
        super().__init__(name="survey_text")
        self.app = app

    def filter(self, message: Message) -> bool:
        return message.from_user is not None and message.from_user.id in _pending(self.app)


async def text_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A written answer: saved without the person; the next question in a new message."""
    me = await who(update, context)
    token, step = _pending(context)[me.user_id]
    words = update.message.text if update.message and update.message.text else ""
    svc = services(context)
    async with svc.db.session() as session:
        position = await save_answer(session, token, step, text=words, now=svc.now(), tz=svc.tz)
    if position.outcome == Answered.BAD:
        await reply(update, context, "quality.survey_text_empty", lang=me.lang)
        return
    if position.outcome != Answered.SAVED:
        _pending(context).pop(me.user_id, None)
        await reply(update, context, _refusal(position.outcome), lang=me.lang)
        return
    await _show(update, context, me.lang, position, token, replace=False)


# --------------------------------------------------------------------------------------------------
# Staff: /survey, /myratings; admins: /quality


@requires(Role.STAFF)
async def survey_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/survey: the surveys, newest first (a button each); /survey ID: that survey's results."""
    me = await who(update, context)
    svc = services(context)
    if context.args:
        await _results(update, context, me.lang, context.args[0], replace=False)
        return
    async with svc.db.session() as session:
        surveys = await all_surveys(session)
    if not surveys:
        await reply(update, context, "quality.surveys_none", lang=me.lang)
        return
    buttons = [[("=" + t(me.lang, "quality.survey_line", id=s.id, title=s.title()[me.lang], status=t(me.lang, f"quality.status_{s.status}"),
                                closes=s.closes_on.isoformat()), f"sv:r:{s.id}")] for s in surveys[:10]]
    await reply(update, context, "quality.surveys_list", lang=me.lang, buttons=buttons)


@requires(Role.STAFF)
async def results_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = await who(update, context)
    await answer(update, context)
    await _results(update, context, me.lang, _parts(update)[2], replace=True)


async def _results(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, ref: str, *, replace: bool) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        survey = await find_survey(session, ref)
        results = await survey_results(session, survey) if survey is not None else None
    if results is None:
        await reply(update, context, "quality.survey_unknown", lang=lang)
        return
    text = survey_results_text(results, lang)
    buttons = [[("quality.btn_chart", f"sv:c:{results.survey.id}")]]
    if replace:
        await edit(update, context, "quality.survey_raw", lang=lang, text=text, buttons=buttons)
    else:
        await reply(update, context, "quality.survey_raw", lang=lang, text=text, buttons=buttons)


@requires(Role.STAFF)
async def chart_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The survey's chart as a photo."""
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        survey = await find_survey(session, _parts(update)[2])
        results = await survey_results(session, survey) if survey is not None else None
    png = await asyncio.to_thread(survey_chart_png, results, me.lang) if results is not None else None
    await answer(update, context)
    if png is None or results is None or update.effective_chat is None:
        return
    await context.bot.send_photo(update.effective_chat.id, InputFile(io.BytesIO(png), filename="survey.png"),
                                 caption=t(me.lang, "quality.chart_caption", title=escape(results.survey.title()[me.lang])),
                                 parse_mode=ParseMode.HTML)


def _month(context: ContextTypes.DEFAULT_TYPE) -> tuple[int, int] | None:
    """The month asked for in the command's argument (this month without one); None when malformed."""
    svc = services(context)
    if not context.args:
        return month_of(svc.now(), svc.tz)
    try:
        return parse_month(context.args[0])
    except ValueError:
        return None


@requires(Role.STAFF)
async def myratings_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/myratings [YYYY-MM]: the staff member's own month beside the team median."""
    me = await who(update, context)
    month = _month(context)
    if month is None:
        await reply(update, context, "quality.bad_month", lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        report = await monthly_report(session, month, svc.tz)
    await reply(update, context, "quality.survey_raw", lang=me.lang, text=myratings_text(report, me.user_id, me.lang))


@requires(Role.ADMIN)
async def quality_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/quality [YYYY-MM]: the monthly report, with CSV and PDF."""
    me = await who(update, context)
    month = _month(context)
    if month is None:
        await reply(update, context, "quality.bad_month", lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        report = await monthly_report(session, month, svc.tz)
    buttons = [[("quality.btn_csv", f"q:csv:{report.label}"), ("quality.btn_pdf", f"q:pdf:{report.label}")]]
    await reply(update, context, "quality.survey_raw", lang=me.lang, text=report_text(report, me.lang), buttons=buttons)


@requires(Role.ADMIN)
async def report_file_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The report of a month as CSV or PDF."""
    me = await who(update, context)
    _, kind, month_text = _parts(update)
    svc = services(context)
    async with svc.db.session() as session:
        report = await monthly_report(session, parse_month(month_text), svc.tz)
    await answer(update, context)
    if update.effective_chat is None:
        return
    if kind == "csv":
        data, name = report_csv(report).encode("utf-8-sig"), f"quality-{report.label}.csv"
    else:
        data, name = await asyncio.to_thread(report_pdf, report), f"quality-{report.label}.pdf"
    await context.bot.send_document(update.effective_chat.id, InputFile(io.BytesIO(data), filename=name),
                                    caption=t(me.lang, "quality.report_caption", month=report.label))


# --------------------------------------------------------------------------------------------------
# Activity and the job


async def note_use(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Note the day a person used the bot (once a day per process), and leave a survey's written
    answer when they send a command instead."""
    user = update.effective_user
    if user is None:
        return
    message = update.message
    if message is not None and (message.text or "").startswith("/"):
        _pending(context).pop(user.id, None)
    svc = services(context)
    today = today_in(svc.now(), svc.tz)
    seen: dict[int, dt.date] = context.bot_data.setdefault(SEEN, {})
    if seen.get(user.id) == today:
        return
    async with svc.db.session() as session:
        await note_activity(session, user.id, today)
    seen[user.id] = today


async def surveys_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Close the surveys past their end date, queue the reminders that are due, and keep the staff's names."""
    svc = services(context)
    async with svc.db.session() as session:
        await remember_staff(session)  # names outlive a removal from the staff list
        closed = await close_ended(session, now=svc.now(), tz=svc.tz)
        reminded = await queue_reminders(session, now=svc.now(), tz=svc.tz)
    if closed or reminded:
        log.info("surveys: %d closed, %d reminders queued", closed, reminded)
        dispatcher = context.bot_data.get("dispatcher")
        if dispatcher is not None:
            dispatcher.wake()


def register(app: Application) -> None:  # type: ignore[type-arg]
    """The survey's buttons and written answers, /survey, /myratings, /quality, the report files,
    the activity note (group 99: after every feature, before the update is marked done) and the job."""
    step: Any = rf"^sv:(a:{TOKEN}:\d{{1,3}}:\d{{1,2}}|[bk]:{TOKEN}:\d{{1,3}})$"
    app.add_handler(CallbackQueryHandler(start_pressed, pattern=r"^sv:s:\d+$"))
    app.add_handler(CallbackQueryHandler(step_pressed, pattern=re.compile(step)))
    app.add_handler(CallbackQueryHandler(results_pressed, pattern=r"^sv:r:\d+$"))
    app.add_handler(CallbackQueryHandler(chart_pressed, pattern=r"^sv:c:\d+$"))
    app.add_handler(CallbackQueryHandler(report_file_pressed, pattern=r"^q:(csv|pdf):\d{4}-(0[1-9]|1[0-2])$"))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE & _AwaitingText(app), text_received))
    app.add_handler(CommandHandler("survey", survey_command))
    app.add_handler(CommandHandler("myratings", myratings_command))
    app.add_handler(CommandHandler("quality", quality_command))
    app.add_handler(TypeHandler(Update, note_use), group=99)
    if app.job_queue is not None:
        app.job_queue.run_repeating(surveys_job, interval=JOB_EVERY, first=30, name="quality.surveys")
