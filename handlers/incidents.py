"""Incidents in the building: /report (anyone; a guided conversation: kind, place, optional photo),
the staff's "I'm handling it" button, the escalation job when nobody takes a report, and /incidents
(duty officers: every incident with its delivery and acknowledgement report, and a CSV of the
recipients of each broadcast)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from telegram import InputFile, Update
from telegram.constants import ParseMode
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBUserWarning

from bot.context import services, who
from bot.dispatcher import render_text
from bot.i18n import language_for, t
from bot.roles import requires
from bot.ui import MAX_CAPTION, Button, answer, edit, escape, fit, paginate, parse_page, reply, trailing_id
from handlers.account import cancel_fallbacks
from storage.incidents import (
    MAX_CLOSE_NOTE,
    MAX_PLACE_TEXT,
    REPORT_KINDS,
    WHOLE_BUILDING,
    CloseOutcome,
    Incident,
    IncidentReport,
    IncidentState,
    TakeOutcome,
    UnknownPlace,
    close_report,
    escalate_overdue,
    incident_report,
    list_incidents,
    person_name,
    recipients_csv,
    report_incident,
    sent_alerts,
    take_incident,
)
from storage.people import Role
from storage.policy import Policy

log = logging.getLogger(__name__)

KIND, PLACE, PHOTO = "report:kind", "report:place", "report:photo"
CLOSE_NOTE = "incident:close_note"
CLOSING = "incident_closing"  # key of context.user_data: the reported incident being closed
DRAFT = "incident_report"  # key of context.user_data (persisted as JSON)
PER_PAGE = 8


# --- /report ----------------------------------------------------------------------------------------


def place_buttons(lang: str, policy: Policy, prefix: str, *, whole_building: bool = False) -> list[list[Button]]:
    """The floors and areas of the policy file as buttons, two per row (shared with /emergency)."""
    places: list[Button] = [("=" + (p.name_zh if lang == "zh" else p.name_en), f"{prefix}:{p.code}") for p in policy.library.places]
    if whole_building:
        places.append(("incidents.whole_building", f"{prefix}:{WHOLE_BUILDING}"))
    return [places[i : i + 2] for i in range(0, len(places), 2)]


async def report_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """/report: ask what is happening."""
    me = await who(update, context)
    context.user_data[DRAFT] = {}
    kinds: list[Button] = [(f"incidents.kind_{kind}", f"rep:k:{kind}") for kind in REPORT_KINDS]
    rows = [kinds[i : i + 2] for i in range(0, len(kinds), 2)] + [[("common.cancel", "rep:x")]]
    await reply(update, context, "incidents.ask_kind", lang=me.lang, buttons=rows)
    return KIND


async def report_kind(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The kind was chosen: ask where it is."""
    me = await who(update, context)
    kind = (update.callback_query.data or "").removeprefix("rep:k:")
    if kind not in REPORT_KINDS:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return KIND
    context.user_data[DRAFT] = {"kind": kind}
    await answer(update, context, lang=me.lang)
    policy = services(context).policy
    buttons = [*place_buttons(me.lang, policy, "rep:p"), [("common.cancel", "rep:x")]]
    await edit(update, context, "incidents.ask_place", lang=me.lang, buttons=buttons)
    return PLACE


async def report_place_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """A floor or area button: ask for a photo (a forged place code is refused)."""
    me = await who(update, context)
    code = (update.callback_query.data or "").removeprefix("rep:p:")
    if services(context).policy.place_name(code, me.lang) is None:
        await answer(update, context, "incidents.unknown_place", alert=True, lang=me.lang)
        return PLACE
    await answer(update, context, lang=me.lang)
    context.user_data.setdefault(DRAFT, {})["place_code"] = code
    await edit(update, context, "incidents.ask_photo", lang=me.lang, buttons=[[("incidents.btn_no_photo", "rep:n")]])
    return PHOTO


async def report_place_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The place typed as text: ask for a photo."""
    me = await who(update, context)
    text = " ".join((update.message.text or "").split())
    if not text:
        await reply(update, context, "incidents.unknown_place", lang=me.lang)
        return PLACE
    if len(text) > MAX_PLACE_TEXT:
        await reply(update, context, "incidents.place_too_long", lang=me.lang, limit=MAX_PLACE_TEXT)
        return PLACE
    context.user_data.setdefault(DRAFT, {})["place_text"] = text
    await reply(update, context, "incidents.ask_photo", lang=me.lang, buttons=[[("incidents.btn_no_photo", "rep:n")]])
    return PHOTO


async def report_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | str:
    """A photo: send the report with it."""
    photo = update.message.photo[-1].file_id if update.message.photo else None
    return await _submit(update, context, photo)


async def report_without_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | str:
    """"Send without photo": send the report."""
    await answer(update, context)
    return await _submit(update, context, None)


async def photo_expected(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """Something other than a photo at the photo step."""
    await reply(update, context, "incidents.photo_expected", buttons=[[("incidents.btn_no_photo", "rep:n")]])
    return PHOTO


async def report_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """The Cancel button of the report."""
    context.user_data.pop(DRAFT, None)
    await answer(update, context)
    await edit(update, context, "common.cancelled")
    return ConversationHandler.END


async def _submit(update: Update, context: ContextTypes.DEFAULT_TYPE, photo: str | None) -> int | str:
    me = await who(update, context)
    draft: dict[str, Any] = context.user_data.pop(DRAFT, None) or {}
    if draft.get("kind") not in REPORT_KINDS or not (draft.get("place_code") or draft.get("place_text")):
        await reply(update, context, "common.stale_button", lang=me.lang)
        return ConversationHandler.END
    svc = services(context)
    try:
        async with svc.db.session() as session:
            incident = await report_incident(
                session, kind=draft["kind"], place_code=draft.get("place_code"), place_text=draft.get("place_text"),
                photo_file_id=photo, reporter_id=me.user_id, reporter_name=update.effective_user.full_name,
                policy=svc.policy, now=svc.now(), tz=svc.tz, staff_chat_id=svc.settings.staff_chat_id,
            )
    except UnknownPlace:  # the policy file changed while the person was choosing
        context.user_data[DRAFT] = {"kind": draft["kind"]}
        await reply(update, context, "incidents.unknown_place", lang=me.lang)
        return PLACE
    log.info("incident %s reported (%s)", incident.id, incident.kind)
    await reply(update, context, "incidents.reported", lang=me.lang, id=incident.id)
    return ConversationHandler.END


# --- "I'm handling it" ---------------------------------------------------------------------------


@requires(Role.STAFF)
async def take(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A staff member takes a report: every alert about it shows who, and the reporter is told."""
    me = await who(update, context)
    incident_id = trailing_id(update.callback_query.data)
    if incident_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    svc = services(context)
    now = svc.now()
    async with svc.db.session() as session:
        name = await person_name(session, me.user_id)
        result = await take_incident(session, incident_id, me.user_id, name, now)
    incident = result.incident
    if result.outcome is TakeOutcome.NOT_FOUND or incident is None:
        await answer(update, context, "incidents.not_found", alert=True, lang=me.lang)
        return
    if result.outcome is TakeOutcome.CLOSED:
        await answer(update, context, "incidents.closed", alert=True, lang=me.lang, id=incident_id)
        return
    if result.outcome is TakeOutcome.ALREADY:
        await answer(update, context, "incidents.already_taken", alert=True, lang=me.lang, id=incident_id, name=escape(incident.handled_by_name or "?"))
        return
    log.info("incident %s taken by user %s", incident_id, me.user_id)
    await answer(update, context, "incidents.taken", lang=me.lang, id=incident_id)
    await _show_taken(context, incident, name)


async def _show_taken(context: ContextTypes.DEFAULT_TYPE, incident: Incident, name: str) -> None:
    """Edit every delivered alert about ``incident``: its button goes, "handled by …" is added."""
    svc = services(context)
    async with svc.db.session() as session:
        alerts = await sent_alerts(session, incident.id)
    since = (incident.handled_at or svc.now()).astimezone(svc.tz).strftime("%H:%M")
    for alert in alerts:
        lang = alert.language or language_for(alert.user_language, alert.telegram_language, svc.default_language)
        text = render_text(lang, alert.text_key, alert.params) + "\n\n" + t(lang, "incidents.handled_line", name=escape(name), time=since)
        try:
            if alert.photo:
                await context.bot.edit_message_caption(alert.chat_id, alert.message_id, caption=fit(text, MAX_CAPTION), parse_mode=ParseMode.HTML, reply_markup=None)
            else:
                await context.bot.edit_message_text(fit(text), alert.chat_id, alert.message_id, parse_mode=ParseMode.HTML, reply_markup=None)
        except TelegramError as exc:  # deleted by its reader, or too old to edit: the others still change
            log.info("could not mark an incident alert as taken: %s", exc)


async def escalate_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Every staff member is alerted privately about reports nobody took in time (idempotent)."""
    svc = services(context)
    async with svc.db.session() as session:
        escalated = await escalate_overdue(session, svc.now(), svc.policy.service.incident_ack_minutes, svc.policy, svc.tz)
    if escalated:
        log.info("escalated incidents %s to every staff member", escalated)


# --- /incidents ----------------------------------------------------------------------------------


def kind_label(lang: str, incident: Incident) -> str:
    area = "incidents.kind_" if incident.source == "report" else "broadcast.type_"
    return t(lang, f"{area}{incident.kind}")


def place_text(lang: str, policy: Policy, incident: Incident) -> str:
    if incident.place_code == WHOLE_BUILDING:
        return t(lang, "incidents.whole_building")
    if incident.place_code:
        return escape(policy.place_name(incident.place_code, lang) or incident.place_code)
    return escape(incident.place_text or "—")


def state_text(lang: str, incident: Incident) -> str:
    if incident.state == IncidentState.CLOSED:
        return t(lang, "incidents.state_closed")
    if incident.source == "emergency":
        return t(lang, "incidents.state_active")
    if incident.state == IncidentState.HANDLING:
        return t(lang, "incidents.state_handling", name=escape(incident.handled_by_name or "?"))
    return t(lang, "incidents.state_open")


@requires(Role.DUTY_OFFICER)
async def incidents_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/incidents: the list of incidents (drills apart), newest first."""
    await _show_list(update, context, drills=False, page=0)


@requires(Role.DUTY_OFFICER)
async def incidents_page(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A page of the list, of incidents or of drills."""
    data = update.callback_query.data or ""
    await answer(update, context)
    await _show_list(update, context, drills=data.startswith("incl:d"), page=parse_page(data))


async def _show_list(update: Update, context: ContextTypes.DEFAULT_TYPE, *, drills: bool, page: int) -> None:
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        items = await list_incidents(session, drills=drills)
    mode = "d" if drills else "r"
    toggle: list[Button] = [("incidents.btn_real", "incl:r:0") if drills else ("incidents.btn_drills", "incl:d:0")]
    if not items:
        key = "incidents.list_empty_drills" if drills else "incidents.list_empty"
        await _show(update, context, key, me.lang, [toggle])
        return
    chunk, nav = paginate(items, page, PER_PAGE, f"incl:{mode}")
    lines = [
        t(
            me.lang, "incidents.list_line", id=i.id, time=i.created_at.astimezone(svc.tz).strftime("%m-%d %H:%M"),
            kind=kind_label(me.lang, i), place=place_text(me.lang, svc.policy, i), state=state_text(me.lang, i),
        )
        for i in chunk
    ]
    numbers: list[Button] = [(f"=#{i.id}", f"incs:{i.id}") for i in chunk]
    rows = [numbers[n : n + 4] for n in range(0, len(numbers), 4)] + [nav, toggle]
    title = t(me.lang, "incidents.list_title_drills" if drills else "incidents.list_title")
    await _show(update, context, "=" + title + "\n\n" + "\n".join(lines), me.lang, rows)


async def _show(update: Update, context: ContextTypes.DEFAULT_TYPE, key: str, lang: str, rows: list[list[Button]]) -> None:
    """Show a message (``=``-prefixed text is literal): edit the pressed message, or send a new one."""
    literal = key.startswith("=")
    params = {"text": key[1:]} if literal else {}
    message_key = "incidents.literal" if literal else key
    if update.callback_query is not None:
        await edit(update, context, message_key, lang=lang, buttons=rows, **params)
    else:
        await reply(update, context, message_key, lang=lang, buttons=rows, **params)


@requires(Role.DUTY_OFFICER)
async def incident_show(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """One incident's report: who, where, state, and for each broadcast its delivery and answers."""
    me = await who(update, context)
    svc = services(context)
    try:
        incident_id = int((update.callback_query.data or "").split(":")[1])
    except (IndexError, ValueError):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        report = await incident_report(session, incident_id)
    if report is None:
        await answer(update, context, "incidents.not_found", alert=True, lang=me.lang)
        return
    await answer(update, context)
    text, rows = report_view(me.lang, svc.policy, svc.tz, report)
    await edit(update, context, "incidents.literal", lang=me.lang, buttons=rows, text=text)


def report_view(lang: str, policy: Policy, tz: Any, report: IncidentReport) -> tuple[str, list[list[Button]]]:
    """The text and buttons of an incident's report."""
    i = report.incident
    source = "drill" if i.drill else i.source
    parts = [
        t(
            lang, "incidents.report_head", id=i.id, source=t(lang, f"incidents.source_{source}"), kind=kind_label(lang, i),
            place=place_text(lang, policy, i), reporter=escape(i.reporter_name or "—"),
            time=i.created_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"), state=state_text(lang, i),
        )
    ]
    csv_buttons: list[Button] = []
    for item in report.broadcasts:
        b, s = item.broadcast, item.stats
        when = (b.confirmed_at or b.created_at).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
        parts.append(
            t(
                lang, "incidents.report_broadcast", purpose=t(lang, f"incidents.purpose_{b.purpose}"), bid=b.id,
                audience=t(lang, f"broadcast.aud_{b.audience}"), when=when, total=_number(lang, s.total), sent=_number(lang, s.sent),
                failed=_number(lang, s.failed), unreachable=_number(lang, s.unreachable), pending=_number(lang, s.pending),
                t90=duration(lang, s.time_to_90) if s.time_to_90 is not None else t(lang, "incidents.not_reached"),
            )
        )
        if b.purpose == "alert" and item.acks.recipients:
            a = item.acks
            parts.append(t(lang, "incidents.report_acks", received=a.received, safe=a.safe, help=a.help, unanswered=a.unanswered))
        csv_buttons.append(("=" + t(lang, "incidents.btn_csv", id=b.id), f"inccsv:{b.id}"))
    if i.close_note:
        parts.append(t(lang, "incidents.report_close_note", note=escape(i.close_note)))
    back: list[Button] = [("incidents.btn_back", "incl:d:0" if i.drill else "incl:r:0")]
    rows = [csv_buttons[n : n + 3] for n in range(0, len(csv_buttons), 3)]
    if i.source == "report" and i.state != IncidentState.CLOSED:
        rows.append([("incidents.btn_close", f"incc:{i.id}")])
    return "".join(parts), [*rows, back]


# --- closing a reported incident ---------------------------------------------------------------


@requires(Role.DUTY_OFFICER)
async def close_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Close with a note: ask what was found and done (the reporter will read it)."""
    me = await who(update, context)
    incident_id = trailing_id(update.callback_query.data)
    if incident_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return ConversationHandler.END
    context.user_data[CLOSING] = incident_id
    await answer(update, context, lang=me.lang)
    await reply(update, context, "incidents.ask_close_note", lang=me.lang, id=incident_id, limit=MAX_CLOSE_NOTE)
    return CLOSE_NOTE


@requires(Role.DUTY_OFFICER)
async def close_with_note(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The note: close the incident; the reporter is told."""
    me = await who(update, context)
    note = (update.message.text or "").strip()
    if not note or len(note) > MAX_CLOSE_NOTE:
        await reply(update, context, "incidents.ask_close_note", lang=me.lang, id=context.user_data.get(CLOSING, "?"), limit=MAX_CLOSE_NOTE)
        return CLOSE_NOTE
    incident_id = context.user_data.pop(CLOSING, None)
    if not isinstance(incident_id, int):
        await reply(update, context, "common.stale_button", lang=me.lang)
        return ConversationHandler.END
    svc = services(context)
    async with svc.db.session() as session:
        name = await person_name(session, me.user_id)
        outcome = await close_report(session, incident_id, me.user_id, name, note, svc.now())
    if outcome is CloseOutcome.NOT_FOUND:
        await reply(update, context, "incidents.not_found", lang=me.lang)
    elif outcome is CloseOutcome.ALREADY:
        await reply(update, context, "incidents.closed", lang=me.lang, id=incident_id)
    else:
        log.info("incident %s closed by user %s", incident_id, me.user_id)
        await reply(update, context, "incidents.closed_done", lang=me.lang, id=incident_id)
    return ConversationHandler.END


def _number(lang: str, value: int) -> str:
    """A count as each language writes it: "4,043" in English, "4043" in Chinese."""
    return f"{value:,}" if lang == "en" else str(value)


def duration(lang: str, value: Any) -> str:
    """A duration in words: "42 s", "4 min 52 s", "1 h 5 min"."""
    total = max(int(round(value.total_seconds())), 0)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return t(lang, "broadcast.dur_hm", h=hours, m=minutes)
    if minutes:
        return t(lang, "broadcast.dur_ms", m=minutes, s=seconds)
    return t(lang, "broadcast.dur_s", s=seconds)


@requires(Role.DUTY_OFFICER)
async def incident_csv(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The CSV of every recipient of a broadcast with their delivery and answer."""
    me = await who(update, context)
    svc = services(context)
    try:
        broadcast_id = int((update.callback_query.data or "").split(":")[1])
    except (IndexError, ValueError):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        data = await recipients_csv(session, broadcast_id, svc.tz)
    await answer(update, context)
    await context.bot.send_document(
        me.chat_id, InputFile(data, filename=f"broadcast-{broadcast_id}-recipients.csv"),
        caption=t(me.lang, "incidents.csv_caption", id=broadcast_id), parse_mode=ParseMode.HTML,
    )


def register(app: Application) -> None:  # type: ignore[type-arg]
    with warnings.catch_warnings():  # buttons inside a conversation are tracked per chat, as intended
        warnings.simplefilter("ignore", PTBUserWarning)
        app.add_handler(
            ConversationHandler(
                entry_points=[CommandHandler("report", report_start)],
                states={
                    KIND: [CallbackQueryHandler(report_kind, pattern=r"^rep:k:")],
                    PLACE: [
                        CallbackQueryHandler(report_place_button, pattern=r"^rep:p:"),
                        MessageHandler(filters.TEXT & ~filters.COMMAND, report_place_text),
                    ],
                    PHOTO: [
                        MessageHandler(filters.PHOTO, report_photo),
                        CallbackQueryHandler(report_without_photo, pattern=r"^rep:n$"),
                        MessageHandler(~filters.COMMAND, photo_expected),
                    ],
                },
                fallbacks=[*cancel_fallbacks(), CallbackQueryHandler(report_cancel, pattern=r"^rep:x$")],
                name="report",
                persistent=True,
                allow_reentry=True,
            )
        )
        app.add_handler(
            ConversationHandler(
                entry_points=[CallbackQueryHandler(close_start, pattern=r"^incc:\d+$")],
                states={CLOSE_NOTE: [MessageHandler(filters.TEXT & ~filters.COMMAND, close_with_note)]},
                fallbacks=cancel_fallbacks(),
                name="incident_close",
                persistent=True,
                allow_reentry=True,
            )
        )
    app.add_handler(CallbackQueryHandler(take, pattern=r"^inc:take:\d+$"))
    app.add_handler(CommandHandler("incidents", incidents_command))
    app.add_handler(CallbackQueryHandler(incidents_page, pattern=r"^incl:[rd]:\d+$"))
    app.add_handler(CallbackQueryHandler(incident_show, pattern=r"^incs:\d+$"))
    app.add_handler(CallbackQueryHandler(incident_csv, pattern=r"^inccsv:\d+$"))
    if app.job_queue is not None:
        app.job_queue.run_repeating(escalate_job, interval=30, first=15, name="incidents.escalate")
