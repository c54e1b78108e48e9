"""Emergency notices for duty officers: /emergency and /drill (type → place → the policy's bilingual
template, editable → audience → preview in both languages → a confirmation naming the count),
/allclear, the live progress message, and the staff's "Received / I'm safe / Need help" buttons
with the reminder job.

The confirmation buttons (``bc:go:<draft>``, ``bc:no:<draft>``) are handled outside the
conversation: the draft lives in the store, so a press is checked there (role, author, still a
draft) whenever and however often it comes, and a second press finds the notice already sent.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import logging
import re
import warnings
from typing import Any

from telegram import Message, Update
from telegram.constants import ParseMode
from telegram.error import BadRequest, TelegramError
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
from bot.i18n import LANGUAGES, language_for, t
from bot.roles import requires
from bot.ui import MAX_TEXT, Button, answer, edit, escape, fit, keyboard, reply, trailing_id
from handlers.account import cancel_fallbacks
from handlers.incidents import duration, place_buttons
from storage.incidents import (
    ACK_CODES,
    AUDIENCES,
    EMERGENCY_TYPES,
    MAX_PLACE_TEXT,
    WHOLE_BUILDING,
    AckOutcome,
    Broadcast,
    BroadcastState,
    ConfirmOutcome,
    DeliveryStats,
    UnknownPlace,
    ack_buttons,
    acknowledge,
    audience_counts,
    cancel_draft,
    claim_progress_update,
    confirm_broadcast,
    delivery_stats,
    draft_allclear,
    draft_broadcast,
    finish_broadcast,
    help_place,
    language_of,
    open_emergencies,
    remind_unanswered,
    sending_broadcasts,
    set_progress_message,
    template_text,
    update_draft_text,
)
from storage.people import Role

log = logging.getLogger(__name__)

TYPE, PLACE, TEXT, EDIT, AUDIENCE = "emergency:type", "emergency:place", "emergency:text", "emergency:edit", "emergency:audience"
ALLCLEAR_EDIT = "allclear:edit"
ALLCLEAR = "allclear_edit"  # key of context.user_data: the all-clear draft and language being edited, and what was edited
DRAFT = "emergency_draft"  # key of context.user_data (persisted as JSON)
PROGRESS_EVERY = 3.0  # seconds; the progress message is edited at most this often


def utf16_len(text: str) -> int:
    """Telegram counts text length in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


@functools.cache
def text_limit() -> int:
    """The longest notice text that still fits one message with the drill mark and the staff line."""
    overhead = 0
    for lang in LANGUAGES:
        for key in ("broadcast.message", "broadcast.message_staff"):
            shell = t(lang, key, drill=t(lang, "broadcast.drill_mark"), text="")
            overhead = max(overhead, utf16_len(html.unescape(re.sub(r"<[^>]+>", "", shell))))
    return MAX_TEXT - overhead


def number(lang: str, value: int) -> str:
    """A count as each language writes it: "4,043" in English, "4043" in Chinese."""
    return f"{value:,}" if lang == "en" else str(value)


def _drill(lang: str, drill: bool) -> str:
    return t(lang, "broadcast.drill_mark") + " " if drill else ""


def _type_label(lang: str, emergency_type: str, purpose: str = "alert") -> str:
    label = t(lang, f"broadcast.type_{emergency_type}")
    return t(lang, "common.label_value", label=t(lang, "broadcast.type_allclear"), value=label) if purpose == "allclear" else label


def _template_marks(lang: str, edited: list[str], *, note: bool = True) -> dict[str, str]:
    """When only one language was edited, the other is marked as still the template (the readers of
    that language would not read what was changed), with a note asking to edit it too."""
    marks = {"mark_zh": "", "mark_en": "", "note": ""}
    if len(set(edited)) == 1:
        other = "en" if edited[0] == "zh" else "zh"
        marks[f"mark_{other}"] = t(lang, "broadcast.template_mark")
        if note:
            marks["note"] = t(lang, f"broadcast.note_other_template_{other}")
    return marks


async def _present(
    update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, key: str, zh: str, en: str,
    buttons: list[list[Button]], *, replace: bool = False, **params: Any,
) -> None:
    """A message showing both texts; when together they exceed one message, each text goes first on
    its own and the message refers to them."""
    text = t(lang, key, zh=escape(zh), en=escape(en), **params)
    if utf16_len(html.unescape(re.sub(r"<[^>]+>", "", text))) > MAX_TEXT:
        for part in (zh, en):
            await reply(update, context, "incidents.literal", lang=lang, text=escape(part))
        zh, en, replace = "↑", "↑", False
    if replace and update.callback_query is not None:
        await edit(update, context, key, lang=lang, buttons=buttons, zh=escape(zh), en=escape(en), **params)
    else:
        await reply(update, context, key, lang=lang, buttons=buttons, zh=escape(zh), en=escape(en), **params)


# --- /emergency and /drill -------------------------------------------------------------------------


@requires(Role.DUTY_OFFICER)
async def emergency_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """/emergency: ask what is happening."""
    return await _start(update, context, drill=False)


@requires(Role.DUTY_OFFICER)
async def drill_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """/drill: the same steps, every message marked as a drill."""
    return await _start(update, context, drill=True)


async def _start(update: Update, context: ContextTypes.DEFAULT_TYPE, *, drill: bool) -> str:
    me = await who(update, context)
    context.user_data[DRAFT] = {"drill": drill}
    types: list[Button] = [(f"broadcast.type_{kind}", f"em:t:{kind}") for kind in EMERGENCY_TYPES]
    rows = [types[i : i + 2] for i in range(0, len(types), 2)] + [[("common.cancel", "em:x")]]
    key = "broadcast.ask_type_drill" if drill else "broadcast.ask_type"
    await reply(update, context, key, lang=me.lang, buttons=rows, drill=t(me.lang, "broadcast.drill_mark"))
    return TYPE


@requires(Role.DUTY_OFFICER)
async def chose_type(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The type was chosen: ask where."""
    me = await who(update, context)
    kind = (update.callback_query.data or "").removeprefix("em:t:")
    draft = context.user_data.get(DRAFT)
    if kind not in EMERGENCY_TYPES or draft is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return TYPE
    draft["type"] = kind
    await answer(update, context, lang=me.lang)
    buttons = [*place_buttons(me.lang, services(context).policy, "em:p", whole_building=True), [("common.cancel", "em:x")]]
    await edit(update, context, "broadcast.ask_place", lang=me.lang, buttons=buttons)
    return PLACE


@requires(Role.DUTY_OFFICER)
async def chose_place(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """A place button: fill in the template and show it."""
    me = await who(update, context)
    code = (update.callback_query.data or "").removeprefix("em:p:")
    draft = context.user_data.get(DRAFT)
    if draft is None or "type" not in draft:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return PLACE
    if code != WHOLE_BUILDING and services(context).policy.place_name(code, me.lang) is None:
        await answer(update, context, "incidents.unknown_place", alert=True, lang=me.lang)
        return PLACE
    await answer(update, context, lang=me.lang)
    draft.update(place_code=code, place_text=None)
    return await _fill_and_show(update, context, me.lang, draft)


@requires(Role.DUTY_OFFICER)
async def typed_place(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The place typed as text: fill in the template and show it."""
    me = await who(update, context)
    draft = context.user_data.get(DRAFT)
    text = " ".join((update.message.text or "").split())
    if draft is None or "type" not in draft:
        await reply(update, context, "common.stale_button", lang=me.lang)
        return PLACE
    if not text or len(text) > MAX_PLACE_TEXT:
        await reply(update, context, "incidents.place_too_long", lang=me.lang, limit=MAX_PLACE_TEXT)
        return PLACE
    draft.update(place_code=None, place_text=text)
    return await _fill_and_show(update, context, me.lang, draft)


async def _fill_and_show(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, draft: dict[str, Any]) -> str:
    svc = services(context)
    draft["zh"], draft["en"] = template_text(svc.policy, draft["type"], draft.get("place_code"), draft.get("place_text"), svc.now(), svc.tz)
    await _show_draft(update, context, lang, draft, replace=update.callback_query is not None)
    return TEXT


async def _show_draft(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, draft: dict[str, Any], *, replace: bool) -> None:
    buttons: list[list[Button]] = [
        [("broadcast.btn_use", "em:use")],
        [("broadcast.btn_edit_zh", "em:ez"), ("broadcast.btn_edit_en", "em:ee")],
        [("common.cancel", "em:x")],
    ]
    await _present(update, context, lang, "broadcast.draft", draft["zh"], draft["en"], buttons, replace=replace,
                   drill=_drill(lang, draft["drill"]), **_template_marks(lang, draft.get("edited", [])))


@requires(Role.DUTY_OFFICER)
async def text_action(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """Use the text as it is (then choose the audience), or edit one language."""
    me = await who(update, context)
    action = (update.callback_query.data or "").removeprefix("em:")
    draft = context.user_data.get(DRAFT)
    if draft is None or "zh" not in draft:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return TEXT
    await answer(update, context, lang=me.lang)
    if action in ("ez", "ee"):
        draft["editing"] = "zh" if action == "ez" else "en"
        await reply(update, context, f"broadcast.ask_text_{draft['editing']}", lang=me.lang, limit=number(me.lang, text_limit()))
        return EDIT
    for text in (draft["zh"], draft["en"]):  # a policy template may be long too
        if utf16_len(text) > text_limit():
            await reply(update, context, "broadcast.text_too_long", lang=me.lang, length=number(me.lang, utf16_len(text)), limit=number(me.lang, text_limit()))
            return TEXT
    async with services(context).db.session() as session:
        counts = await audience_counts(session)
    rows: list[list[Button]] = [
        [("=" + t(me.lang, f"broadcast.btn_aud_{audience}", count=number(me.lang, counts[audience])), f"em:a:{audience}")]
        for audience in AUDIENCES
    ]
    await edit(update, context, "broadcast.ask_audience", lang=me.lang, buttons=[*rows, [("common.cancel", "em:x")]])
    return AUDIENCE


@requires(Role.DUTY_OFFICER)
async def edited_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The new text of one language: checked (empty, too long), then shown with the other."""
    me = await who(update, context)
    draft = context.user_data.get(DRAFT)
    if draft is None or draft.get("editing") not in LANGUAGES:
        await reply(update, context, "common.stale_button", lang=me.lang)
        return TEXT
    text = (update.message.text or "").strip()
    if not text:
        await reply(update, context, "broadcast.text_empty", lang=me.lang)
        return EDIT
    if utf16_len(text) > text_limit():
        await reply(update, context, "broadcast.text_too_long", lang=me.lang, length=number(me.lang, utf16_len(text)), limit=number(me.lang, text_limit()))
        return EDIT
    editing = draft.pop("editing")
    draft[editing] = text
    draft["edited"] = sorted({*draft.get("edited", []), editing})
    await _show_draft(update, context, me.lang, draft, replace=False)
    return TEXT


async def text_expected(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo or sticker where the text of the notice was expected."""
    await reply(update, context, "broadcast.text_empty")


@requires(Role.DUTY_OFFICER)
async def chose_audience(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | str:
    """The audience: store the draft and show the preview with the confirmation naming the count."""
    me = await who(update, context)
    audience = (update.callback_query.data or "").removeprefix("em:a:")
    draft = context.user_data.get(DRAFT)
    if audience not in AUDIENCES or draft is None or "zh" not in draft:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return AUDIENCE
    svc = services(context)
    try:
        async with svc.db.session() as session:
            broadcast = await draft_broadcast(
                session, emergency_type=draft["type"], drill=draft["drill"], place_code=draft.get("place_code"),
                place_text=draft.get("place_text"), audience=audience, text_zh=draft["zh"], text_en=draft["en"],
                created_by=me.user_id, now=svc.now(), policy=svc.policy,
            )
    except UnknownPlace:
        await answer(update, context, "incidents.unknown_place", alert=True, lang=me.lang)
        return ConversationHandler.END
    await answer(update, context, lang=me.lang)
    marks = _template_marks(me.lang, draft.get("edited", []), note=False)
    context.user_data.pop(DRAFT, None)
    if broadcast.recipients == 0:
        async with svc.db.session() as session:
            await cancel_draft(session, broadcast.id, me.user_id)
        await edit(update, context, "broadcast.nobody", lang=me.lang)
        return ConversationHandler.END
    await _preview(update, context, me.lang, broadcast, marks)
    return ConversationHandler.END


async def _preview(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, broadcast: Broadcast, marks: dict[str, str]) -> None:
    count = number(lang, broadcast.recipients)
    confirm_key = "broadcast.btn_confirm_drill" if broadcast.drill else "broadcast.btn_confirm"
    buttons: list[list[Button]] = [
        [("=" + t(lang, confirm_key, count=count), f"bc:go:{broadcast.id}")],
        [("common.cancel", f"bc:no:{broadcast.id}")],
    ]
    await _present(
        update, context, lang, "broadcast.preview", broadcast.text_zh, broadcast.text_en, buttons, replace=True,
        drill=_drill(lang, broadcast.drill), audience=t(lang, f"broadcast.aud_{broadcast.audience}"), count=count, **marks,
    )


async def cancel_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """The Cancel button during the steps."""
    context.user_data.pop(DRAFT, None)
    await answer(update, context)
    await edit(update, context, "broadcast.cancelled")
    return ConversationHandler.END


# --- confirmation and progress -------------------------------------------------------------------


@requires(Role.DUTY_OFFICER)
async def confirm(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Send the draft (once: a second press, or a press in another process, finds it sent)."""
    me = await who(update, context)
    broadcast_id = trailing_id(update.callback_query.data)
    if broadcast_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        result = await confirm_broadcast(session, broadcast_id, me.user_id, svc.now())
    broadcast = result.broadcast
    if result.outcome is ConfirmOutcome.NOT_FOUND or broadcast is None:
        await answer(update, context, "broadcast.draft_gone", alert=True, lang=me.lang)
        return
    if result.outcome is ConfirmOutcome.NOT_YOURS:
        await answer(update, context, "broadcast.not_yours", alert=True, lang=me.lang)
        return
    if result.outcome is ConfirmOutcome.ALREADY:
        key = "broadcast.already_sent" if broadcast.state != BroadcastState.CANCELLED else "broadcast.draft_gone"
        await answer(update, context, key, alert=True, lang=me.lang, id=broadcast.id)
        return
    if result.outcome is ConfirmOutcome.INCIDENT_CLOSED:
        await answer(update, context, "broadcast.allclear_closed", alert=True, lang=me.lang)
        return
    log.info("broadcast %s confirmed by user %s: %d recipients", broadcast.id, me.user_id, broadcast.recipients)
    await answer(update, context, lang=me.lang)
    try:
        await update.callback_query.edit_message_reply_markup(reply_markup=None)
    except TelegramError:
        pass  # the preview keeps its buttons; a second press finds the notice sent
    text = progress_text(me.lang, broadcast, DeliveryStats(total=broadcast.recipients, queued=broadcast.recipients), None)
    message = await reply(update, context, "incidents.literal", lang=me.lang, text=text)
    async with svc.db.session() as session:
        await set_progress_message(session, broadcast.id, message.chat_id, message.message_id)


def progress_text(lang: str, broadcast: Broadcast, stats: DeliveryStats, elapsed: Any) -> str:
    """The duty officer's progress message: live counts, rate and ETA; the summary once done."""
    params = {
        "drill": _drill(lang, broadcast.drill), "id": broadcast.id,
        "type": _type_label(lang, broadcast.emergency_type, broadcast.purpose), "sent": number(lang, stats.sent),
        "total": number(lang, max(stats.total, broadcast.recipients)), "failed": number(lang, stats.failed),
        "unreachable": number(lang, stats.unreachable),
    }
    if elapsed is not None:
        t90 = duration(lang, stats.time_to_90) if stats.time_to_90 is not None else t(lang, "incidents.not_reached")
        return t(lang, "broadcast.progress_done", elapsed=duration(lang, elapsed), t90=t90, **params)
    eta = stats.eta
    return t(
        lang, "broadcast.progress", pending=number(lang, stats.pending), rate=f"{stats.rate:.1f}",
        eta=duration(lang, eta) if eta is not None else t(lang, "broadcast.eta_unknown"), **params,
    )


async def progress_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Update each sending broadcast's progress message (at most every 3 s, one process at a time)."""
    svc = services(context)
    now = svc.now()
    async with svc.db.session() as session:
        active = await sending_broadcasts(session)
    for broadcast in active:
        confirmed = broadcast.confirmed_at or now
        if broadcast.progress_message_id is None and (now - confirmed).total_seconds() < 30:
            continue  # the confirmation is still writing its progress message
        async with svc.db.session() as session:
            if not await claim_progress_update(session, broadcast.id, now, dt.timedelta(seconds=PROGRESS_EVERY)):
                continue
            stats = await delivery_stats(session, broadcast, now)
            finished = stats.pending == 0 and await finish_broadcast(session, broadcast.id, now)
            chosen, telegram = await language_of(session, broadcast.created_by) if broadcast.created_by else (None, None)
        if finished:
            log.info("broadcast %s finished: %d sent, %d failed, %d unreachable", broadcast.id, stats.sent, stats.failed, stats.unreachable)
        if broadcast.progress_chat_id is None or broadcast.progress_message_id is None:
            continue
        lang = language_for(chosen, telegram, svc.default_language)
        elapsed = ((stats.last_sent_at or now) - confirmed) if finished else None
        text = progress_text(lang, broadcast, stats, elapsed)
        try:
            await context.bot.edit_message_text(
                text, broadcast.progress_chat_id, broadcast.progress_message_id, parse_mode=ParseMode.HTML,
            )
        except BadRequest as exc:
            if "message to edit not found" in exc.message.lower():
                await _repost_progress(context, broadcast, text)
            elif "not modified" not in exc.message.lower():
                log.info("could not update the progress of broadcast %s: %s", broadcast.id, exc.message)
        except TelegramError as exc:
            log.info("could not update the progress of broadcast %s: %s", broadcast.id, exc)


async def _repost_progress(context: ContextTypes.DEFAULT_TYPE, broadcast: Broadcast, text: str) -> None:
    """The duty officer deleted the progress message: post it again and keep the new one up to date."""
    assert broadcast.progress_chat_id is not None
    try:
        message = await context.bot.send_message(broadcast.progress_chat_id, text, parse_mode=ParseMode.HTML)
    except TelegramError as exc:
        log.info("could not post the progress of broadcast %s again: %s", broadcast.id, exc)
        return
    async with services(context).db.session() as session:
        await set_progress_message(session, broadcast.id, message.chat_id, message.message_id)


@requires(Role.DUTY_OFFICER)
async def cancel_confirmation(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Cancel under a preview: the draft is dropped, nothing is sent."""
    me = await who(update, context)
    broadcast_id = trailing_id(update.callback_query.data) or 0
    async with services(context).db.session() as session:
        dropped = await cancel_draft(session, broadcast_id, me.user_id)
    if not dropped:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await edit(update, context, "broadcast.cancelled", lang=me.lang)


# --- /allclear -----------------------------------------------------------------------------------


@requires(Role.DUTY_OFFICER)
async def allclear_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/allclear: the follow-up to the same audience, which closes the incident."""
    me = await who(update, context)
    async with services(context).db.session() as session:
        active = await open_emergencies(session)
    if not active:
        await reply(update, context, "broadcast.allclear_none", lang=me.lang)
        return
    if len(active) == 1:
        await _allclear_preview(update, context, me.lang, active[0].id)
        return
    rows: list[list[Button]] = [
        [("=" + f"#{i.id} {_drill(me.lang, i.drill)}{t(me.lang, f'broadcast.type_{i.kind}')}", f"clr:{i.id}")] for i in active[:10]
    ]
    await reply(update, context, "broadcast.allclear_choose", lang=me.lang, buttons=rows)


@requires(Role.DUTY_OFFICER)
async def allclear_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """One of several open emergencies was chosen."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    try:
        incident_id = int((update.callback_query.data or "").split(":")[1])
    except (IndexError, ValueError):
        incident_id = 0
    await _allclear_preview(update, context, me.lang, incident_id)


async def _allclear_preview(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, incident_id: int) -> None:
    svc = services(context)
    me = await who(update, context)
    async with svc.db.session() as session:
        broadcast = await draft_allclear(session, incident_id, me.user_id, svc.now(), svc.policy, svc.tz)
    if broadcast is None:
        await reply(update, context, "broadcast.allclear_closed", lang=lang)
        return
    await _show_allclear(update, context, lang, broadcast, [])


async def _show_allclear(
    update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, broadcast: Broadcast, edited: list[str]
) -> None:
    """The all-clear's preview: both texts (each editable) and the confirmation naming the count."""
    count = number(lang, broadcast.recipients)
    buttons: list[list[Button]] = [
        [("=" + t(lang, "broadcast.btn_allclear_confirm", count=count), f"bc:go:{broadcast.id}")],
        [("broadcast.btn_edit_zh", f"bc:ez:{broadcast.id}"), ("broadcast.btn_edit_en", f"bc:ee:{broadcast.id}")],
        [("common.cancel", f"bc:no:{broadcast.id}")],
    ]
    assert broadcast.incident_id is not None
    await _present(
        update, context, lang, "broadcast.allclear_preview", broadcast.text_zh, broadcast.text_en, buttons,
        drill=_drill(lang, broadcast.drill), incident=broadcast.incident_id,
        type=t(lang, f"broadcast.type_{broadcast.emergency_type}"), count=count, **_template_marks(lang, edited),
    )


@requires(Role.DUTY_OFFICER)
async def allclear_edit(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Edit one language of the all-clear draft: ask for the new text."""
    me = await who(update, context)
    data = update.callback_query.data or ""
    broadcast_id, editing = trailing_id(data), "zh" if data.startswith("bc:ez:") else "en"
    if broadcast_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return ConversationHandler.END
    state = context.user_data.get(ALLCLEAR) or {}
    edited = state.get("edited", []) if state.get("id") == broadcast_id else []
    context.user_data[ALLCLEAR] = {"id": broadcast_id, "editing": editing, "edited": edited}
    await answer(update, context, lang=me.lang)
    await reply(update, context, f"broadcast.ask_text_{editing}", lang=me.lang, limit=number(me.lang, text_limit()))
    return ALLCLEAR_EDIT


@requires(Role.DUTY_OFFICER)
async def allclear_edited(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The all-clear's new text in one language: stored in the draft, and the preview shown again."""
    me = await who(update, context)
    state = context.user_data.get(ALLCLEAR) or {}
    text = (update.message.text or "").strip()
    if not text:
        await reply(update, context, "broadcast.text_empty", lang=me.lang)
        return ALLCLEAR_EDIT
    if utf16_len(text) > text_limit():
        await reply(update, context, "broadcast.text_too_long", lang=me.lang, length=number(me.lang, utf16_len(text)), limit=number(me.lang, text_limit()))
        return ALLCLEAR_EDIT
    svc = services(context)
    async with svc.db.session() as session:
        changed = await update_draft_text(session, int(state.get("id", 0)), me.user_id, state.get("editing", "en"), text)
        broadcast = await session.get(Broadcast, int(state.get("id", 0))) if changed else None
    if broadcast is None:
        context.user_data.pop(ALLCLEAR, None)
        await reply(update, context, "broadcast.draft_gone", lang=me.lang)
        return ConversationHandler.END
    state["edited"] = sorted({*state.get("edited", []), state.get("editing", "en")})
    context.user_data[ALLCLEAR] = state
    await _show_allclear(update, context, me.lang, broadcast, state["edited"])
    return ConversationHandler.END


# --- acknowledgements ----------------------------------------------------------------------------


async def acknowledge_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Received / I'm safe / Need help, from a staff recipient (anyone else is told it is not for them)."""
    me = await who(update, context)
    try:
        _, bid, code = (update.callback_query.data or "").split(":")
        broadcast_id, status = int(bid), ACK_CODES[code]
    except (ValueError, KeyError):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        result = await acknowledge(session, broadcast_id, me.user_id, status, svc.now())
    if result.outcome is not AckOutcome.RECORDED:
        await answer(update, context, "broadcast.ack_not_recipient", alert=True, lang=me.lang)
        return
    await _mark_answer(update, context, me.lang, result.broadcast, status)
    if status != "help":
        await answer(update, context, f"broadcast.ack_{status}", lang=me.lang)
        return
    log.warning("staff member %s needs help (broadcast %s)", me.user_id, broadcast_id)
    await answer(update, context, lang=me.lang)
    places = place_buttons(me.lang, svc.policy, f"ackp:{broadcast_id}")
    await reply(update, context, "broadcast.ack_help" if result.alerted else "broadcast.ack_help_again", lang=me.lang, buttons=places)


async def _mark_answer(
    update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, broadcast: Broadcast | None, status: str
) -> None:
    """The staff member's copy of the notice shows their answer and its time; the buttons stay, as an
    answer may change (safe at first, then in need of help)."""
    query = update.callback_query
    if broadcast is None or query is None or not isinstance(query.message, Message):
        return
    svc = services(context)
    text = t(lang, "broadcast.message_staff", drill=t(lang, "broadcast.drill_mark") if broadcast.drill else "",
             text=escape(broadcast.text_zh if lang == "zh" else broadcast.text_en))
    text += t(lang, "broadcast.ack_line", answer=t(lang, f"broadcast.btn_{status}"),
              time=svc.now().astimezone(svc.tz).strftime("%H:%M"))
    buttons = [[(key, data) for key, data in row] for row in ack_buttons(broadcast.id)]
    try:
        await query.edit_message_text(fit(text), parse_mode=ParseMode.HTML, reply_markup=keyboard(lang, buttons))
    except TelegramError as exc:  # too old to edit, or deleted: the answer is recorded all the same
        log.info("could not show the answer on broadcast %s: %s", broadcast.id, exc)


async def help_place_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Where a staff member who needs help is: the duty officers are told at once."""
    me = await who(update, context)
    try:
        _, bid, code = (update.callback_query.data or "").split(":", 2)
        broadcast_id = int(bid)
    except ValueError:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    svc = services(context)
    try:
        async with svc.db.session() as session:
            told = await help_place(session, broadcast_id, me.user_id, code, svc.policy)
    except UnknownPlace:
        await answer(update, context, "incidents.unknown_place", alert=True, lang=me.lang)
        return
    if not told:
        await answer(update, context, "broadcast.ack_not_recipient", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await edit(update, context, "broadcast.help_place_sent", lang=me.lang, place=escape(svc.policy.place_name(code, me.lang) or code))


async def remind_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Remind once the staff who have not answered within ``ack_minutes``; list them to the duty officers."""
    svc = services(context)
    async with svc.db.session() as session:
        handled = await remind_unanswered(session, svc.now(), svc.policy.service.ack_minutes)
    if handled:
        log.info("reminded the silent staff of broadcasts %s", handled)


def register(app: Application) -> None:  # type: ignore[type-arg]
    text = filters.TEXT & ~filters.COMMAND
    with warnings.catch_warnings():  # buttons inside a conversation are tracked per chat, as intended
        warnings.simplefilter("ignore", PTBUserWarning)
        app.add_handler(
            ConversationHandler(
                entry_points=[CommandHandler("emergency", emergency_command), CommandHandler("drill", drill_command)],
                states={
                    TYPE: [CallbackQueryHandler(chose_type, pattern=r"^em:t:")],
                    PLACE: [CallbackQueryHandler(chose_place, pattern=r"^em:p:"), MessageHandler(text, typed_place)],
                    TEXT: [CallbackQueryHandler(text_action, pattern=r"^em:(use|ez|ee)$")],
                    EDIT: [MessageHandler(text, edited_text), MessageHandler(~filters.COMMAND, text_expected)],
                    AUDIENCE: [CallbackQueryHandler(chose_audience, pattern=r"^em:a:")],
                },
                fallbacks=[*cancel_fallbacks(), CallbackQueryHandler(cancel_button, pattern=r"^em:x$")],
                name="emergency",
                persistent=True,
                allow_reentry=True,
            )
        )
        app.add_handler(
            ConversationHandler(
                entry_points=[CallbackQueryHandler(allclear_edit, pattern=r"^bc:e[ze]:\d+$")],
                states={ALLCLEAR_EDIT: [MessageHandler(text, allclear_edited)]},
                fallbacks=cancel_fallbacks(),
                name="allclear_edit",
                persistent=True,
                allow_reentry=True,
            )
        )
    app.add_handler(CallbackQueryHandler(confirm, pattern=r"^bc:go:\d+$"))
    app.add_handler(CallbackQueryHandler(cancel_confirmation, pattern=r"^bc:no:\d+$"))
    app.add_handler(CommandHandler("allclear", allclear_command))
    app.add_handler(CallbackQueryHandler(allclear_chosen, pattern=r"^clr:\d+$"))
    app.add_handler(CallbackQueryHandler(acknowledge_button, pattern=r"^ack:\d+:[rsh]$"))
    app.add_handler(CallbackQueryHandler(help_place_button, pattern=r"^ackp:\d+:"))
    if app.job_queue is not None:
        app.job_queue.run_repeating(progress_job, interval=PROGRESS_EVERY, first=1, name="broadcast.progress")
        app.job_queue.run_repeating(remind_job, interval=30, first=20, name="broadcast.remind")
