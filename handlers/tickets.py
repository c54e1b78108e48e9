"""Complaints and feedback: /complain and /feedback (a guided ticket), /tickets (the reader's own
tickets, or the staff queue), claiming, the conversation between the reader and the staff member on
the ticket, resolution and rating, and the escalation and auto-close jobs.

Reply UX: every relayed message carries a "Reply" button (``tk:reply:<id>``) that starts a one-step
conversation for whoever pressed it — the reader of the ticket, or the staff member on it; who may
answer is decided from the presser, never from the button. Staff get "Reply" and "Resolve" on the
ticket card; the reader gets 1–5 rating buttons with the closing message.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import warnings
from typing import Any

from telegram import Message, Update
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

from bot.context import Who, services, who
from bot.i18n import both, t
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, paginate, parse_page, reply
from handlers.account import cancel_fallbacks
from storage.people import Role
from storage.tickets import (
    ACTIVE,
    CATEGORIES,
    MAX_TEXT,
    FileRefused,
    Labels,
    Outcome,
    Result,
    TextProblem,
    Ticket,
    TicketStatus,
    add_rating_comment,
    autoclose,
    claim,
    clip,
    escalate_late,
    file_ticket,
    get_ticket,
    history,
    is_late,
    is_watching,
    late_by_words,
    may_file,
    parse_ticket_number,
    place_label,
    queue_card,
    rate,
    reader_reply,
    reader_tickets,
    resolve,
    set_watching,
    staff_name,
    staff_queue,
    staff_reply,
    text_problem,
)

log = logging.getLogger(__name__)

CATEGORY, TEXT, PHOTO, PLACE, ANON = "tickets:category", "tickets:text", "tickets:photo", "tickets:place", "tickets:anon"
REPLY, RESOLVE, COMMENT = "tickets:reply", "tickets:resolve", "tickets:comment"
DRAFT, TARGET = "ticket_draft", "ticket_target"  # keys of context.user_data (persisted as JSON)
PER_PAGE = 8
HISTORY_SHOWN = 8
ESCALATE_EVERY = dt.timedelta(minutes=5)
AUTOCLOSE_EVERY = dt.timedelta(hours=1)
STEP_TIMEOUT = dt.timedelta(hours=1)


@functools.cache
def labels() -> Labels:
    """The names the store needs in both languages, from the catalogue."""
    return Labels(
        categories={code: both(f"tickets.cat_{code}") for code in CATEGORIES},
        anonymous=both("tickets.anonymous"),
        no_place=both("tickets.no_place"),
    )


def _wake(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Deliver what was just queued now rather than at the dispatcher's next poll."""
    dispatcher = context.bot_data.get("dispatcher")
    if dispatcher is not None:
        dispatcher.wake()


def _arg(data: str | None, index: int) -> int | None:
    """The integer at ``index`` of callback data ``tk:verb:arg:…`` (None when absent or forged)."""
    parts = (data or "").split(":")
    try:
        return int(parts[index])
    except (IndexError, ValueError):
        return None


def _local(when: dt.datetime, context: ContextTypes.DEFAULT_TYPE, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return when.astimezone(services(context).tz).strftime(fmt)


def _incoming(message: Message) -> tuple[str, str | None]:
    """The text (or caption) and the largest photo's file_id of a message."""
    photo = message.photo[-1].file_id if message.photo else None
    return (message.text or message.caption or ""), photo


# --------------------------------------------------------------------------------------------------
# Filing: /complain → category → text → photo → place → anonymity


async def complain(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """/complain or /feedback: refuse past the daily limit, else ask for the category."""
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        allowed = await may_file(session, me.user_id, svc.policy, svc.now())
    if not allowed:
        await reply(update, context, "tickets.daily_limit", lang=me.lang, limit=svc.policy.service.tickets_per_day)
        return ConversationHandler.END
    context.user_data[DRAFT] = {}
    context.user_data.pop(TARGET, None)
    rows = [[(f"tickets.cat_{c}", f"tk:cat:{c}") for c in CATEGORIES[i : i + 2]] for i in range(0, len(CATEGORIES), 2)]
    await reply(update, context, "tickets.ask_category", buttons=rows, lang=me.lang)
    return CATEGORY


async def category_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """Keep the category and ask for the text."""
    me = await who(update, context)
    code = (update.callback_query.data or "").removeprefix("tk:cat:")
    draft = context.user_data.get(DRAFT)
    if code not in CATEGORIES or draft is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return None
    draft["category"] = code
    await answer(update, context, lang=me.lang)
    await edit(update, context, "tickets.ask_text", lang=me.lang, category=t(me.lang, f"tickets.cat_{code}"), limit=MAX_TEXT)
    return TEXT


async def choose_category_first(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Something typed while the category buttons wait."""
    await reply(update, context, "tickets.choose_category_first")


async def text_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """Check the text; then ask for a photo (unless one came already) or the place."""
    return await _take_text(update, context, update.message.text or "")


async def photo_instead_of_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """A photo where the text was expected: its caption is the text; without one, keep the photo and ask."""
    text, photo = _incoming(update.message)
    draft = context.user_data.setdefault(DRAFT, {})
    draft["photo"] = photo
    if not text.strip():
        await reply(update, context, "tickets.photo_kept_need_text", limit=MAX_TEXT)
        return None
    return await _take_text(update, context, text)


async def _take_text(update: Update, context: ContextTypes.DEFAULT_TYPE, text: str) -> str | None:
    draft = context.user_data.get(DRAFT)
    if draft is None or "category" not in draft:
        await reply(update, context, "tickets.draft_lost")
        return ConversationHandler.END  # type: ignore[return-value]
    if not await _text_ok(update, context, text, words=True):
        return None
    draft["text"] = text.strip()
    if draft.get("photo"):
        return await _ask_place(update, context)
    await reply(update, context, "tickets.ask_photo", buttons=[[("tickets.btn_skip_photo", "tk:nophoto")]])
    return PHOTO


async def _text_ok(
    update: Update, context: ContextTypes.DEFAULT_TYPE, text: str, *, photo: bool = False, words: bool = False
) -> bool:
    """Answer an empty, wordless or too long text with the rule it breaks; True when the text is fine."""
    problem = text_problem(text, photo=photo, words=words)
    if problem is None:
        return True
    if problem is TextProblem.EMPTY:
        await reply(update, context, "tickets.empty")
    elif problem is TextProblem.NO_WORDS:
        await reply(update, context, "tickets.no_words")
    else:
        await reply(update, context, "tickets.too_long", length=len(text.strip()), limit=MAX_TEXT)
    return False


async def text_expected(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A sticker, file or voice message where words are needed."""
    await reply(update, context, "tickets.text_expected")


async def photo_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """Keep the photo (a caption is added to the text when it still fits) and ask for the place."""
    caption, photo = _incoming(update.message)
    draft = context.user_data.get(DRAFT)
    if draft is None or "text" not in draft:
        await reply(update, context, "tickets.draft_lost")
        return ConversationHandler.END  # type: ignore[return-value]
    if caption.strip():
        combined = f"{draft['text']}\n{caption.strip()}"
        if not await _text_ok(update, context, combined):
            return None
        draft["text"] = combined
    draft["photo"] = photo
    return await _ask_place(update, context)


async def text_at_photo_step(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """Words typed where a photo was asked for: added to the description (said so), and the photo
    still asked for."""
    draft = context.user_data.get(DRAFT)
    if draft is None or "text" not in draft:
        await reply(update, context, "tickets.draft_lost")
        return ConversationHandler.END  # type: ignore[return-value]
    added = (update.message.text or "").strip()
    combined = f"{draft['text']}\n{added}"
    if not await _text_ok(update, context, combined):
        return None
    draft["text"] = combined
    await reply(update, context, "tickets.text_added", buttons=[[("tickets.btn_skip_photo", "tk:nophoto")]])
    return None


async def skip_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """No photo: ask for the place."""
    await answer(update, context)
    return await _ask_place(update, context)


async def photo_expected(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Anything but a photo at the photo step."""
    await reply(update, context, "tickets.photo_expected", buttons=[[("tickets.btn_skip_photo", "tk:nophoto")]])


async def _ask_place(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = await who(update, context)
    places = services(context).policy.library.places
    rows: list[list[Button]] = [
        [("=" + (p.name_zh if me.lang == "zh" else p.name_en), f"tk:place:{p.code}")] for p in places
    ]
    rows.append([("tickets.btn_no_place", "tk:place:-")])
    await reply(update, context, "tickets.ask_place", buttons=rows, lang=me.lang)
    return PLACE


async def place_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """Keep the place and ask whether to stay anonymous."""
    me = await who(update, context)
    code = (update.callback_query.data or "").removeprefix("tk:place:")
    draft = context.user_data.get(DRAFT)
    known = {p.code for p in services(context).policy.library.places}
    if draft is None or (code != "-" and code not in known):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return None
    draft["place"] = None if code == "-" else code
    await answer(update, context, lang=me.lang)
    await edit(
        update, context, "tickets.ask_anonymous", lang=me.lang,
        buttons=[[("tickets.btn_named", "tk:anon:0"), ("tickets.btn_anonymous", "tk:anon:1")]],
    )
    return ANON


async def choose_place_first(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Something typed while the place buttons wait."""
    await reply(update, context, "tickets.choose_place_first")


async def anonymity_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | None:
    """File the ticket, alert the staff, and give the reader its number."""
    me = await who(update, context)
    svc = services(context)
    draft = context.user_data.get(DRAFT)
    if draft is None or "text" not in draft or update.callback_query.data not in ("tk:anon:0", "tk:anon:1"):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return None
    anonymous = update.callback_query.data == "tk:anon:1"
    async with svc.db.session() as session:
        filed = await file_ticket(
            session, me.user_id, draft.get("category", ""), draft["text"], policy=svc.policy, now=svc.now(),
            staff_chat_id=svc.settings.staff_chat_id, labels=labels(), photo_file_id=draft.get("photo"),
            place=draft.get("place"), anonymous=anonymous,
        )
    context.user_data.pop(DRAFT, None)
    await answer(update, context, lang=me.lang)
    if filed.ticket is None:
        if filed.refused is FileRefused.DAILY_LIMIT:
            await edit(update, context, "tickets.daily_limit", lang=me.lang, limit=svc.policy.service.tickets_per_day)
        else:
            await edit(update, context, "tickets.draft_lost", lang=me.lang)
        return ConversationHandler.END
    _wake(context)
    log.info("ticket %s filed (%s)", filed.ticket.number, filed.ticket.category)
    hours = f"{svc.policy.service.ticket_first_response_hours:g}"
    key = "tickets.filed_anonymous" if anonymous else "tickets.filed"
    await edit(update, context, key, lang=me.lang, number=filed.ticket.number, hours=hours)
    return ConversationHandler.END


async def choose_anonymity_first(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Something typed while the anonymity buttons wait."""
    await reply(update, context, "tickets.choose_anonymous_first")


# --------------------------------------------------------------------------------------------------
# Claiming (outside the conversation: pressed in the staff chat or a staff member's private chat)


@requires(Role.STAFF)
async def claim_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Claim a new ticket: exactly one of two racing staff wins; the ticket card goes to their private chat."""
    me = await who(update, context)
    svc = services(context)
    ticket_id = _arg(update.callback_query.data, 2)
    if ticket_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        result = await claim(session, ticket_id, me.user_id, svc.now())
        if result.outcome is Outcome.OK and result.ticket is not None:
            await queue_card(session, result.ticket, me.user_id, svc.policy, labels())
        name = await staff_name(session, me.user_id)
    ticket = result.ticket
    if result.outcome is Outcome.OK and ticket is not None:
        _wake(context)
        log.info("ticket %s claimed by staff %s", ticket.number, me.user_id)
        await answer(update, context, "tickets.claimed_you", lang=me.lang, number=ticket.number)
        await edit(update, context, "tickets.claimed_here", lang=me.lang, number=ticket.number, name=escape(name))
    elif result.outcome is Outcome.TAKEN and ticket is not None:
        await answer(update, context, "tickets.claim_taken", alert=True, lang=me.lang, number=ticket.number, name=result.other)
    elif result.outcome is Outcome.FINISHED and ticket is not None:
        await answer(update, context, "tickets.finished", alert=True, lang=me.lang, number=ticket.number)
    else:
        await answer(update, context, "tickets.not_found", alert=True, lang=me.lang)


# --------------------------------------------------------------------------------------------------
# The conversation on a ticket: Reply (reader or staff), Resolve (staff), rating and comment


async def reply_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """"Reply" on a ticket: decide from the presser whether they answer as its reader or as staff."""
    me = await who(update, context)
    svc = services(context)
    ticket_id = _arg(update.callback_query.data, 2)
    async with svc.db.session() as session:
        ticket = await get_ticket(session, ticket_id) if ticket_id is not None else None
        owner = await staff_name(session, ticket.assignee_id) if ticket is not None and ticket.assignee_id else ""
    side = _side(ticket, me)
    refusal = _refusal(ticket, me, side, owner, resolving=False)
    if refusal is not None or ticket is None:
        await _refuse(update, context, me, refusal or ("tickets.not_found", {}))
        return None
    context.user_data.pop(DRAFT, None)
    context.user_data[TARGET] = {"id": ticket.id, "as": side}
    await answer(update, context, lang=me.lang)
    key = "tickets.ask_reply_staff" if side == "staff" else "tickets.ask_reply_reader"
    await reply(update, context, key, lang=me.lang, number=ticket.number)
    return REPLY


def _side(ticket: Ticket | None, me: Who) -> str | None:
    """Whether ``me`` acts on the ticket as its reader or as staff (None: neither)."""
    if ticket is None:
        return None
    if me.is_staff and ticket.requester_id != me.user_id:
        return "staff"
    if ticket.requester_id == me.user_id:
        return "reader"
    return None


def _refusal(
    ticket: Ticket | None, me: Who, side: str | None, owner: str, *, resolving: bool
) -> tuple[str, dict[str, Any]] | None:
    """Why ``me`` may not answer (or resolve) the ticket now; None when they may."""
    if ticket is None:
        return "tickets.not_found", {}
    number = ticket.number
    if side is None or (resolving and side != "staff"):
        return ("common.not_allowed", {}) if resolving else ("tickets.not_your_ticket", {})
    if not me.private:
        return "tickets.private_only", {}
    if ticket.status not in ACTIVE:
        return "tickets.finished", {"number": number}
    if side == "staff" and ticket.status == TicketStatus.NEW:
        return "tickets.not_claimed", {"number": number}
    if side == "staff" and ticket.assignee_id not in (me.user_id, None):
        return "tickets.not_yours", {"number": number, "name": owner}
    return None


async def _refuse(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, refusal: tuple[str, dict[str, Any]]) -> None:
    key, params = refusal
    await answer(update, context, key, alert=True, lang=me.lang, **params)


async def reply_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | None:
    """Relay the answer through the outbox to the other side of the ticket."""
    me = await who(update, context)
    svc = services(context)
    target = context.user_data.get(TARGET) or {}
    ticket_id = target.get("id")
    if not isinstance(ticket_id, int):
        await reply(update, context, "tickets.draft_lost", lang=me.lang)
        return ConversationHandler.END
    text, photo = _incoming(update.message)
    if not await _text_ok(update, context, text, photo=photo is not None):
        return None
    async with svc.db.session() as session:
        if target.get("as") == "staff" and me.is_staff:
            result = await staff_reply(session, ticket_id, me.user_id, text, svc.now(), photo_file_id=photo)
        else:
            result = await reader_reply(
                session, ticket_id, me.user_id, text, svc.now(), labels=labels(),
                staff_chat_id=svc.settings.staff_chat_id, photo_file_id=photo,
            )
    context.user_data.pop(TARGET, None)
    if result.outcome is Outcome.OK and result.ticket is not None:
        _wake(context)
        sent = "tickets.reply_sent_staff" if target.get("as") == "staff" else "tickets.reply_sent_reader"
        await reply(update, context, sent, lang=me.lang, number=result.ticket.number)
        if result.unreachable and target.get("as") == "staff":
            await reply(update, context, "tickets.reader_unreachable", lang=me.lang)
        return ConversationHandler.END
    await _outcome_message(update, context, me, result)
    return ConversationHandler.END


async def _outcome_message(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, result: Result) -> None:
    """Tell the person why their message was not taken."""
    number = result.ticket.number if result.ticket is not None else ""
    choices: dict[Outcome, tuple[str, dict[str, Any]]] = {
        Outcome.FINISHED: ("tickets.finished", {"number": number}),
        Outcome.NOT_CLAIMED: ("tickets.not_claimed", {"number": number}),
        Outcome.NOT_YOURS: (
            ("tickets.not_yours", {"number": number, "name": escape(result.other)}) if me.is_staff
            else ("tickets.not_your_ticket", {})
        ),
    }
    key, params = choices.get(result.outcome, ("tickets.not_found", {}))
    await reply(update, context, key, lang=me.lang, **params)


async def resolve_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """"Resolve" on a ticket card: ask the staff member on it for the closing message."""
    me = await who(update, context)
    svc = services(context)
    ticket_id = _arg(update.callback_query.data, 2)
    async with svc.db.session() as session:
        ticket = await get_ticket(session, ticket_id) if ticket_id is not None else None
        owner = await staff_name(session, ticket.assignee_id) if ticket is not None and ticket.assignee_id else ""
    side = _side(ticket, me) if me.is_staff else None
    refusal = _refusal(ticket, me, side, owner, resolving=True)
    if refusal is not None or ticket is None:
        await _refuse(update, context, me, refusal or ("tickets.not_found", {}))
        return None
    context.user_data.pop(DRAFT, None)
    context.user_data[TARGET] = {"id": ticket.id, "as": "resolve"}
    await answer(update, context, lang=me.lang)
    await reply(update, context, "tickets.ask_resolution", lang=me.lang, number=ticket.number)
    return RESOLVE


async def resolution_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | None:
    """Resolve the ticket with this closing message; the reader is asked to rate it."""
    me = await who(update, context)
    svc = services(context)
    target = context.user_data.get(TARGET) or {}
    ticket_id = target.get("id")
    text = update.message.text or ""
    if not isinstance(ticket_id, int) or not me.is_staff:
        await reply(update, context, "tickets.draft_lost", lang=me.lang)
        return ConversationHandler.END
    if not await _text_ok(update, context, text):
        return None
    async with svc.db.session() as session:
        result = await resolve(session, ticket_id, me.user_id, text, svc.now())
    context.user_data.pop(TARGET, None)
    if result.outcome is Outcome.OK and result.ticket is not None:
        _wake(context)
        log.info("ticket %s resolved by staff %s", result.ticket.number, me.user_id)
        days = svc.policy.service.ticket_autoclose_days
        await reply(update, context, "tickets.resolved_done", lang=me.lang, number=result.ticket.number, days=days)
        if result.unreachable:
            await reply(update, context, "tickets.reader_unreachable", lang=me.lang)
        return ConversationHandler.END
    await _outcome_message(update, context, me, result)
    return ConversationHandler.END


async def rating_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | None:
    """A star rating on the closing message: close the ticket and offer an optional comment."""
    me = await who(update, context)
    svc = services(context)
    data = update.callback_query.data
    ticket_id, stars = _arg(data, 2), _arg(data, 3)
    if ticket_id is None or stars is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return None
    async with svc.db.session() as session:
        result = await rate(session, ticket_id, me.user_id, stars, svc.now())
    ticket = result.ticket
    if result.outcome is not Outcome.OK or ticket is None:
        key, params = {
            Outcome.FINISHED: ("tickets.already_rated", {"number": ticket.number if ticket else ""}),
            Outcome.NOT_YOURS: ("tickets.not_your_ticket", {}),
        }.get(result.outcome, ("common.stale_button", {}))
        await answer(update, context, key, alert=True, lang=me.lang, **params)
        return None
    _wake(context)
    await answer(update, context, lang=me.lang)
    try:  # the stars have done their work
        await update.callback_query.edit_message_reply_markup(None)
    except TelegramError:
        pass
    context.user_data.pop(DRAFT, None)
    context.user_data[TARGET] = {"id": ticket.id, "as": "comment"}
    await reply(
        update, context, "tickets.rated_thanks", lang=me.lang, number=ticket.number, stars="★" * stars,
        buttons=[[("tickets.btn_skip_comment", f"tk:nocomment:{ticket.id}")]],
    )
    return COMMENT


async def comment_received(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int | None:
    """Keep the comment that goes with the rating."""
    me = await who(update, context)
    svc = services(context)
    text = update.message.text or ""
    ticket_id = (context.user_data.get(TARGET) or {}).get("id")
    if not isinstance(ticket_id, int):
        return ConversationHandler.END
    if not await _text_ok(update, context, text):
        return None
    async with svc.db.session() as session:
        await add_rating_comment(session, ticket_id, me.user_id, text)
    context.user_data.pop(TARGET, None)
    await reply(update, context, "tickets.comment_thanks", lang=me.lang)
    return ConversationHandler.END


async def skip_comment(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """No comment: just thank them."""
    context.user_data.pop(TARGET, None)
    await answer(update, context)
    await edit(update, context, "tickets.comment_skipped")
    return ConversationHandler.END


# --------------------------------------------------------------------------------------------------
# /tickets: the reader's list or the staff queue; the ticket card; watching; the photo


async def tickets_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/tickets: staff see the queue, everyone else their own tickets; ``/tickets T-000123`` opens one."""
    me = await who(update, context)
    if context.args:
        ticket_id = parse_ticket_number(context.args[0])
        if ticket_id is not None:
            await _show_card(update, context, me, ticket_id, editing=False)
            return
    if me.is_staff:
        await _show_queue(update, context, me, 0, editing=False)
    else:
        await _show_mine(update, context, me, 0, editing=False)


async def queue_page(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A page of the staff queue (``tk:q:<page>``)."""
    me = await who(update, context)
    if not me.is_staff:
        await answer(update, context, "common.not_allowed", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await _show_queue(update, context, me, parse_page(update.callback_query.data), editing=True)


async def mine_page(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A page of the person's own tickets (``tk:my:<page>``)."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    await _show_mine(update, context, me, parse_page(update.callback_query.data), editing=True)


async def view_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Open one ticket (``tk:view:<id>``) — its reader or staff only."""
    me = await who(update, context)
    ticket_id = _arg(update.callback_query.data, 2)
    await answer(update, context, lang=me.lang)
    if ticket_id is None:
        return
    await _show_card(update, context, me, ticket_id, editing=True)


@requires(Role.STAFF)
async def watch_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Start or stop receiving new tickets in the private chat (``tk:watch:1`` / ``tk:watch:0``)."""
    me = await who(update, context)
    on = update.callback_query.data == "tk:watch:1"
    async with services(context).db.session() as session:
        await set_watching(session, me.user_id, on)
    await answer(update, context, "tickets.watching_on" if on else "tickets.watching_off", lang=me.lang)
    await _show_queue(update, context, me, 0, editing=True)


async def photo_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Send the ticket's photo (by its Telegram file_id) to its reader or a staff member."""
    me = await who(update, context)
    ticket_id = _arg(update.callback_query.data, 2)
    async with services(context).db.session() as session:
        ticket = await get_ticket(session, ticket_id) if ticket_id is not None else None
    if ticket is None or not ticket.photo_file_id or _side(ticket, me) is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await context.bot.send_photo(me.chat_id, ticket.photo_file_id, caption=ticket.number)


async def _show_mine(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, page: int, *, editing: bool) -> None:
    async with services(context).db.session() as session:
        mine = await reader_tickets(session, me.user_id)
    back: list[list[Button]] = [[("tickets.btn_queue", "tk:q:0")]] if me.is_staff else []
    if not mine:
        await _send_text(update, context, editing, t(me.lang, "tickets.my_empty"), back, me.lang)
        return
    chunk, nav = paginate(mine, page, PER_PAGE, "tk:my")
    lines = [
        t(me.lang, "tickets.my_line", number=x.number, category=t(me.lang, f"tickets.cat_{x.category}"),
          status=t(me.lang, f"tickets.status_{x.status}"), filed=_local(x.created_at, context, "%m-%d %H:%M"))
        for x in chunk
    ]
    rows: list[list[Button]] = [[(f"={x.number}", f"tk:view:{x.id}") for x in chunk[i : i + 4]] for i in range(0, len(chunk), 4)]
    title = t(me.lang, "tickets.my_title", count=len(mine))
    await _send_text(update, context, editing, title + "\n" + "\n".join(lines), [*rows, nav, *back], me.lang)


async def _show_queue(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, page: int, *, editing: bool) -> None:
    svc = services(context)
    now = svc.now()
    async with svc.db.session() as session:
        queue = await staff_queue(session, now)
        watching = await is_watching(session, me.user_id)
        owners = {x.assignee_id: await staff_name(session, x.assignee_id) for x in queue if x.assignee_id}
    watch = ("tickets.btn_watch_off", "tk:watch:0") if watching else ("tickets.btn_watch_on", "tk:watch:1")
    footer: list[list[Button]] = [[watch], [("tickets.btn_my", "tk:my:0")]]
    if not queue:
        await _send_text(update, context, editing, t(me.lang, "tickets.queue_empty"), footer, me.lang)
        return
    chunk, nav = paginate(queue, page, PER_PAGE, "tk:q")
    counts = {s: sum(1 for x in queue if x.status == s) for s in ACTIVE}
    lines = []
    for x in chunk:
        late = t(me.lang, "tickets.late_mark", late=late_by_words(now - x.respond_by, me.lang)) if is_late(x, now) else ""
        holder = escape(owners[x.assignee_id]) if x.assignee_id else t(me.lang, "tickets.nobody")
        lines.append(t(
            me.lang, "tickets.queue_line", late=late, number=x.number, category=t(me.lang, f"tickets.cat_{x.category}"),
            status=t(me.lang, f"tickets.status_{x.status}"), who=holder, filed=_local(x.created_at, context, "%m-%d %H:%M"),
        ))
    title = t(
        me.lang, "tickets.queue_title", new=counts["new"], open=counts["open"], waiting=counts["waiting_on_reader"],
        late=sum(1 for x in queue if is_late(x, now)),
    )
    rows: list[list[Button]] = [[(f"={x.number}", f"tk:view:{x.id}") for x in chunk[i : i + 4]] for i in range(0, len(chunk), 4)]
    await _send_text(update, context, editing, title + "\n\n" + "\n".join(lines), [*rows, nav, *footer], me.lang)


async def _send_text(
    update: Update, context: ContextTypes.DEFAULT_TYPE, editing: bool, text: str, buttons: list[list[Button]], lang: str
) -> None:
    """Send (or edit into) a text already rendered from several catalogue messages."""
    if editing:
        await edit(update, context, "tickets.raw", buttons=buttons, lang=lang, text=text)
    else:
        await reply(update, context, "tickets.raw", buttons=buttons, lang=lang, text=text)


async def _show_card(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, ticket_id: int, *, editing: bool) -> None:
    """The ticket with its conversation, as its reader or as staff see it, with the actions open to them."""
    svc = services(context)
    now = svc.now()
    async with svc.db.session() as session:
        ticket = await get_ticket(session, ticket_id)
        side = _side(ticket, me)
        if ticket is None or side is None:
            await _send_text(update, context, editing, t(me.lang, "tickets.not_found"), [], me.lang)
            return
        entries = await history(session, ticket.id)
        authors = {e.message.author_id for e in entries if e.message.from_staff}
        names = {a: await staff_name(session, a) for a in authors}
        assignee = await staff_name(session, ticket.assignee_id) if ticket.assignee_id else None
    lang = me.lang
    staff = side == "staff"
    lines = []
    for entry in entries[-HISTORY_SHOWN:]:
        m = entry.message
        if m.from_staff:
            author = escape(names.get(m.author_id, "—")) if staff else t(lang, "tickets.library")
        elif staff:
            author = _who_for_staff(ticket, lang)
        else:
            author = t(lang, "tickets.you")
        text = clip(m.text, 300) + (" 📷" if m.photo_file_id else "")
        mark = t(lang, "tickets.undelivered") if staff and m.from_staff and entry.delivered is False else ""
        lines.append(t(lang, "tickets.history_line", when=_local(m.at, context, "%m-%d %H:%M"), who=author, text=text, mark=mark))
    conversation = ""
    if lines:
        more = len(entries) - HISTORY_SHOWN
        conversation = t(lang, "tickets.history_title") + (t(lang, "tickets.history_more", count=more) if more > 0 else "")
        conversation += "".join(lines)
    rating = ""
    if ticket.rating:
        comment = f" — {clip(ticket.rating_comment, 300)}" if ticket.rating_comment else ""
        rating = t(lang, "tickets.card_rating", stars="★" * ticket.rating, comment=comment)
    common = {
        "number": ticket.number, "category": t(lang, f"tickets.cat_{ticket.category}"),
        "status": t(lang, f"tickets.status_{ticket.status}"), "filed": _local(ticket.created_at, context),
        "place": _in(lang, place_label(svc.policy, ticket.place, labels())), "text": clip(ticket.text, 1200),
        "photo": t(lang, "tickets.has_photo") if ticket.photo_file_id else "", "history": conversation, "rating": rating,
    }
    rows: list[list[Button]] = []
    if staff:
        late = t(lang, "tickets.card_late", late=late_by_words(now - ticket.respond_by, lang)) if is_late(ticket, now) else ""
        body = t(lang, "tickets.card_staff", **common, due=_local(ticket.respond_by, context), late=late,
                 who=_who_for_staff(ticket, lang), assignee=escape(assignee) if assignee else t(lang, "tickets.nobody"))
        if ticket.status == TicketStatus.NEW:
            rows.append([("tickets.btn_claim", f"tk:claim:{ticket.id}")])
        elif ticket.status in ACTIVE and ticket.assignee_id in (me.user_id, None):
            rows.append([("tickets.btn_reply", f"tk:reply:{ticket.id}"), ("tickets.btn_resolve", f"tk:resolve:{ticket.id}")])
    else:
        body = t(lang, "tickets.card_reader", **common)
        if ticket.status in ACTIVE:
            rows.append([("tickets.btn_reply", f"tk:reply:{ticket.id}")])
        elif ticket.rating is None and ticket.status in (TicketStatus.RESOLVED, TicketStatus.CLOSED):
            rows.append([(f"={n} ★", f"tk:rate:{ticket.id}:{n}") for n in range(1, 6)])
    if ticket.photo_file_id:
        rows.append([("tickets.btn_photo", f"tk:photo:{ticket.id}")])
    rows.append([("tickets.btn_queue", "tk:q:0")] if staff else [("tickets.btn_mine_back", "tk:my:0")])
    await _send_text(update, context, editing, body, rows, lang)


def _who_for_staff(ticket: Ticket, lang: str) -> str:
    """The reader as staff may see them: nobody at all for an anonymous ticket."""
    if ticket.anonymous or ticket.requester_id is None:
        return t(lang, "tickets.anonymous")
    name = clip(ticket.requester_name or "?", 80)
    return f"{name} ({clip(ticket.requester_card, 40)})" if ticket.requester_card else name


def _in(lang: str, value: Any) -> str:
    return str(value.get(lang, "")) if isinstance(value, dict) else str(value)


# --------------------------------------------------------------------------------------------------
# Scheduled jobs


async def escalate_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Tell the staff chat about tickets past their first-response time (each ticket once)."""
    svc = services(context)
    async with svc.db.session() as session:
        late = await escalate_late(session, svc.now(), svc.settings.staff_chat_id, labels())
    if late:
        log.info("escalated %d late ticket(s)", len(late))
        _wake(context)


async def autoclose_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Close resolved tickets nobody rated within the policy's days."""
    svc = services(context)
    async with svc.db.session() as session:
        closed = await autoclose(session, svc.policy, svc.now())
    if closed:
        log.info("closed %d resolved ticket(s) without a rating", closed)


# --------------------------------------------------------------------------------------------------
# Registration


def register(app: Application) -> None:  # type: ignore[type-arg]
    """The ticket conversation (filing, replying, resolving, rating), the buttons outside it, /tickets, the jobs."""
    private = filters.ChatType.PRIVATE
    words = filters.TEXT & ~filters.COMMAND
    anything = ~filters.COMMAND
    with warnings.catch_warnings():
        # Buttons are entry points and steps of a per-chat conversation on purpose: PTB's note that
        # such buttons are tracked per chat rather than per message is exactly what is wanted here.
        warnings.simplefilter("ignore", PTBUserWarning)
        conversation = ConversationHandler(
            entry_points=[
                CommandHandler(["complain", "feedback"], complain, filters=private),
                CallbackQueryHandler(reply_start, pattern=r"^tk:reply:\d+$"),
                CallbackQueryHandler(resolve_start, pattern=r"^tk:resolve:\d+$"),
                CallbackQueryHandler(rating_pressed, pattern=r"^tk:rate:\d+:\d$"),
            ],
            states={
                CATEGORY: [CallbackQueryHandler(category_chosen, pattern=r"^tk:cat:"), MessageHandler(anything, choose_category_first)],
                TEXT: [
                    MessageHandler(words, text_received),
                    MessageHandler(filters.PHOTO, photo_instead_of_text),
                    MessageHandler(anything, text_expected),
                ],
                PHOTO: [
                    MessageHandler(filters.PHOTO, photo_received),
                    CallbackQueryHandler(skip_photo, pattern=r"^tk:nophoto$"),
                    MessageHandler(filters.TEXT & ~filters.COMMAND, text_at_photo_step),
                    MessageHandler(anything, photo_expected),
                ],
                PLACE: [CallbackQueryHandler(place_chosen, pattern=r"^tk:place:"), MessageHandler(anything, choose_place_first)],
                ANON: [CallbackQueryHandler(anonymity_chosen, pattern=r"^tk:anon:"), MessageHandler(anything, choose_anonymity_first)],
                REPLY: [MessageHandler(words | filters.PHOTO, reply_received), MessageHandler(anything, text_expected)],
                RESOLVE: [MessageHandler(words, resolution_received), MessageHandler(anything, text_expected)],
                COMMENT: [
                    MessageHandler(words, comment_received),
                    CallbackQueryHandler(skip_comment, pattern=r"^tk:nocomment:\d+$"),
                    MessageHandler(anything, text_expected),
                ],
            },
            fallbacks=[*cancel_fallbacks()],
            allow_reentry=True,  # pressing Reply, or /complain again, in the middle of another step starts that
            # An abandoned step must not swallow what the person types much later (a catalog search).
            conversation_timeout=STEP_TIMEOUT,
            name="tickets",
            persistent=True,
        )
    app.add_handler(conversation)
    app.add_handler(CommandHandler("tickets", tickets_command))
    app.add_handler(CallbackQueryHandler(claim_pressed, pattern=r"^tk:claim:"))
    app.add_handler(CallbackQueryHandler(queue_page, pattern=r"^tk:q:\d+$"))
    app.add_handler(CallbackQueryHandler(mine_page, pattern=r"^tk:my:\d+$"))
    app.add_handler(CallbackQueryHandler(view_pressed, pattern=r"^tk:view:\d+$"))
    app.add_handler(CallbackQueryHandler(watch_pressed, pattern=r"^tk:watch:[01]$"))
    app.add_handler(CallbackQueryHandler(photo_pressed, pattern=r"^tk:photo:\d+$"))
    if app.job_queue is not None:
        app.job_queue.run_repeating(escalate_job, interval=ESCALATE_EVERY, first=30, name="tickets-escalate")
        app.job_queue.run_repeating(autoclose_job, interval=AUTOCLOSE_EVERY, first=120, name="tickets-autoclose")
