"""The reference desk (参考咨询): /ask (the answer base first, then a librarian), /desk (desk duty and
the queue), /end, the Take button, the live conversation relayed both ways, notes, saved replies,
catalog records shared from a search, hand-over, and after the end the rating, the READ effort and
saving the answer to the answer base; the job that tells waiting readers when to expect an answer.

Who is in a conversation is kept in the person's ``user_data`` (persisted, and refreshed from the
database before every update, so several bot processes agree): ``reference.live`` holds the
conversation's id, ``reference.pending`` a one-message step (the question after a bare /ask, a
note, a catalog query, an answer to save). :class:`DeskRouter` takes a private message only when
one of them is set; the store decides the rest, and a person whose conversation ended meanwhile
gets the ordinary catalog search.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Any

from telegram import Message, Update
from telegram.ext import Application, BaseHandler, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.context import Who, services, who
from bot.i18n import both, t
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, reply, trailing_id
from handlers import search as search_handlers
from storage.people import Role
from storage.reference import (
    MAX_TEXT,
    Attachment,
    DeskConversation,
    Labels,
    Outcome,
    Result,
    Status,
    active_conversations,
    add_entry,
    add_saved_reply,
    answer_draft,
    answered_by_base,
    ask,
    desk_open,
    end,
    free_colleagues,
    hand_over,
    is_on_duty,
    messages,
    next_opening_text,
    on_duty,
    open_conversation_of,
    queue,
    rate,
    relay,
    save_answer,
    saved_replies,
    set_duty,
    set_effort,
    staff_name,
    take,
    tell_waiting,
    text_problem,
    to_librarian,
)
from storage.reference import clip as _clip
from storage.search import record_details, search

log = logging.getLogger(__name__)

KEY = "reference"  # user_data: {"live": conversation id, "pending": "ask" | "note:<id>" | "record:<id>" | "save:<id>"}
WAIT_EVERY = dt.timedelta(minutes=1)
QUEUE_SHOWN = 10


@functools.cache
def labels() -> Labels:
    return Labels(
        reader=both("reference.who_reader"), librarian=both("reference.who_librarian"),
        note=both("reference.who_note"), none=both("reference.nothing_said"),
    )


def _wake(context: ContextTypes.DEFAULT_TYPE) -> None:
    dispatcher = context.bot_data.get("dispatcher")
    if dispatcher is not None:
        dispatcher.wake()


def _state(context: ContextTypes.DEFAULT_TYPE) -> dict[str, Any]:
    state: dict[str, Any] = context.user_data.setdefault(KEY, {})
    return state


async def _next_message_is(update: Update, context: ContextTypes.DEFAULT_TYPE, pending: str, prompt: str) -> None:
    """A staff button whose answer is the next message (a note, a record search, an answer to save):
    remember what it is for, and ask for it."""
    me, number = await _conversation_pressed(update, context)
    if number is None:
        return
    _state(context)["pending"] = f"{pending}:{number}"
    await reply(update, context, prompt, lang=me.lang)


def _set_live(app: Application, user_id: int, conversation_id: int | None) -> None:  # type: ignore[type-arg]
    """Mark (or unmark) a person as in a conversation — also someone else than the update's sender,
    whose data is then saved with this update's."""
    data = app.user_data[user_id]
    state = data.setdefault(KEY, {})
    if conversation_id is None:
        state.pop("live", None)
        if not state:
            data.pop(KEY, None)
    else:
        state["live"] = conversation_id
    app.mark_data_for_update_persistence(user_ids=[user_id])


def _arg(data: str | None, index: int) -> int | None:
    parts = (data or "").split(":")
    try:
        value = int(parts[index])
    except (IndexError, ValueError):
        return None
    return value if 0 <= value < 2**63 else None


def _local(when: dt.datetime | None, context: ContextTypes.DEFAULT_TYPE) -> str:
    return when.astimezone(services(context).tz).strftime("%Y-%m-%d %H:%M") if when else "—"


def _short(text: str, limit: int) -> str:
    """A button label: plain text (buttons are not HTML), cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _incoming(message: Message) -> tuple[str, Attachment | None]:
    """The text (or caption) and the photo or document of a message."""
    text = message.text or message.caption or ""
    if message.photo:
        return text, Attachment("photo", file_id=message.photo[-1].file_id)
    if message.document:
        return text, Attachment("document", file_id=message.document.file_id)
    return text, None


# --------------------------------------------------------------------------------------------------
# Asking: /ask → answers from the answer base → "This answers it" or "Ask a librarian"


async def ask_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/ask QUESTION (or /ask, then the question)."""
    me = await who(update, context)
    if not me.private:
        await reply(update, context, "reference.private_only", lang=me.lang)
        return
    text = (update.effective_message.text or "").split(maxsplit=1) if update.effective_message else []
    question = text[1].strip() if len(text) > 1 else ""
    if not question:
        _state(context)["pending"] = "ask"
        await reply(update, context, "reference.ask_prompt", lang=me.lang, limit=MAX_TEXT)
        return
    await _question(update, context, me, question)


async def _question(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, question: str) -> None:
    """Match the question against the answer base; offer up to three answers, or queue it at once."""
    problem = text_problem(question)
    if problem is not None:
        await reply(update, context, f"reference.{problem.value}", lang=me.lang, limit=MAX_TEXT)
        return
    svc = services(context)
    async with svc.db.session() as session:
        current = await open_conversation_of(session, me.user_id)
        if current is not None and current.reader_id == me.user_id:
            await reply(update, context, "reference.already_open", lang=me.lang, number=current.id)
            return
        conversation, offers = await ask(session, me.user_id, question, svc.now())
    log.info("reference question %s asked (%d answers offered)", conversation.id, len(offers))
    if not offers:
        await reply(update, context, "reference.no_answer_found", lang=me.lang)
        await _queue(update, context, me, conversation.id)
        return
    lines = [
        t(me.lang, "reference.offer_line", number=i, question=escape(o.question), answer=escape(o.answer))
        for i, o in enumerate(offers, 1)
    ]
    rows: list[list[Button]] = [
        [(f"={t(me.lang, 'reference.btn_answers', number=i)}", f"rf:ok:{conversation.id}:{o.entry_id}") for i, o in enumerate(offers, 1)],
        [("reference.btn_librarian", f"rf:lib:{conversation.id}")],
    ]
    await reply(update, context, "reference.offers", buttons=rows, lang=me.lang, lines="\n\n".join(lines))


async def answers_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"This answers it" (``rf:ok:<conversation>:<entry>``)."""
    me = await who(update, context)
    conversation_id, entry_id = _arg(update.callback_query.data, 2), _arg(update.callback_query.data, 3)
    if conversation_id is None or entry_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with services(context).db.session() as session:
        result = await answered_by_base(session, conversation_id, me.user_id, entry_id)
    if result.outcome is Outcome.OK:
        await answer(update, context, lang=me.lang)
        await reply(update, context, "reference.glad", lang=me.lang)
    else:
        await answer(update, context, "reference.already_decided", alert=True, lang=me.lang)


async def librarian_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Ask a librarian" (``rf:lib:<conversation>``): the question, already written, goes to the queue."""
    me = await who(update, context)
    conversation_id = trailing_id(update.callback_query.data)
    await answer(update, context, lang=me.lang)
    if conversation_id is None:
        return
    await _queue(update, context, me, conversation_id)


async def _queue(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, conversation_id: int) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        result = await to_librarian(session, conversation_id, me.user_id, svc.policy, svc.now(), svc.tz)
    conversation = result.conversation
    if result.outcome is Outcome.BUSY and conversation is not None:
        await reply(update, context, "reference.already_open", lang=me.lang, number=conversation.id)
        return
    if result.outcome is not Outcome.OK or conversation is None:
        await reply(update, context, "reference.already_decided", lang=me.lang)
        return
    _set_live(context.application, me.user_id, conversation.id)
    _wake(context)
    log.info("reference question %s queued for a librarian", conversation.id)
    if result.desk_open:
        minutes = max(1, round((result.expected - svc.now()).total_seconds() / 60)) if result.expected else 0
        await reply(update, context, "reference.queued", lang=me.lang, number=conversation.id, position=result.position, minutes=minutes)
    else:
        await reply(
            update, context, "reference.queued_closed", lang=me.lang, number=conversation.id, position=result.position,
            when=_local(result.expected, context),
        )


# --------------------------------------------------------------------------------------------------
# Staff: /desk (duty and queue), Take


@requires(Role.STAFF)
async def desk_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/desk: toggle desk duty and show the queue with Take buttons."""
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        on = not await is_on_duty(session, me.user_id)
        await set_duty(session, me.user_id, on, svc.now())
    log.info("staff %s %s desk duty", me.user_id, "on" if on else "off")
    await _show_desk(update, context, me, on)


async def _show_desk(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, on: bool, *, editing: bool = False) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        waiting = await queue(session)
        active = await active_conversations(session)
        duty = await on_duty(session)
        names = {c.staff_id: await staff_name(session, c.staff_id) for c in active}
    now = svc.now()
    lines = [
        t(me.lang, "reference.queue_line", number=c.id, minutes=int((now - (c.queued_at or now)).total_seconds() // 60),
          question=_clip(c.question, 120))
        for c in waiting[:QUEUE_SHOWN]
    ]
    lines += [
        t(me.lang, "reference.active_line", number=c.id, name=escape(names.get(c.staff_id, "—")), question=_clip(c.question, 80))
        for c in active
    ]
    rows: list[list[Button]] = [[(f"={t(me.lang, 'reference.btn_take_number', number=c.id)}", f"rf:take:{c.id}")] for c in waiting[:QUEUE_SHOWN]]
    rows.append([("reference.btn_duty_off", "rf:duty:0") if on else ("reference.btn_duty_on", "rf:duty:1")])
    rows.append([("reference.btn_faq_add", "rf:faqadd")])
    key = "reference.desk_on" if on else "reference.desk_off"
    open_now = desk_open(svc.policy, now, svc.tz)
    params = {
        "on_duty": len(duty), "queued": len(waiting), "active": len(active),
        "hours": t(me.lang, "reference.hours_open") if open_now else t(me.lang, "reference.hours_closed", when=next_opening_text(svc.policy, now, svc.tz)),
        "lines": "\n".join(lines) or t(me.lang, "reference.queue_empty"),
    }
    if editing:
        await edit(update, context, key, buttons=rows, lang=me.lang, **params)
    else:
        await reply(update, context, key, buttons=rows, lang=me.lang, **params)


@requires(Role.STAFF)
async def duty_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``rf:duty:1`` / ``rf:duty:0`` on the desk card."""
    me = await who(update, context)
    svc = services(context)
    on = update.callback_query.data == "rf:duty:1"
    async with svc.db.session() as session:
        await set_duty(session, me.user_id, on, svc.now())
    await answer(update, context, lang=me.lang)
    await _show_desk(update, context, me, on, editing=True)


@requires(Role.STAFF)
async def take_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Take a queued question: one of two pressing at once wins; the conversation card follows."""
    me = await who(update, context)
    svc = services(context)
    conversation_id = trailing_id(update.callback_query.data)
    if conversation_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        result = await take(session, conversation_id, me.user_id, svc.now(), labels())
    conversation = result.conversation
    if result.outcome is Outcome.OK and conversation is not None:
        _set_live(context.application, me.user_id, conversation.id)
        _wake(context)
        log.info("reference question %s taken by staff %s", conversation.id, me.user_id)
        await answer(update, context, "reference.taken_you", lang=me.lang, number=conversation.id)
    elif result.outcome is Outcome.TAKEN and conversation is not None:
        await answer(update, context, "reference.taken_other", alert=True, lang=me.lang, number=conversation.id, name=result.other)
    elif result.outcome is Outcome.BUSY and conversation is not None:
        await answer(update, context, "reference.busy", alert=True, lang=me.lang, number=conversation.id)
    else:
        await answer(update, context, "reference.finished", alert=True, lang=me.lang)


# --------------------------------------------------------------------------------------------------
# The conversation: relay, notes, saved replies, records, hand-over, /end


class DeskRouter(BaseHandler[Update, ContextTypes.DEFAULT_TYPE, None]):
    """Takes a private, non-command message of a person in a conversation or a one-message step."""

    def __init__(self, app: Application) -> None:  # type: ignore[type-arg]
        super().__init__(route)
        self.app = app

    def check_update(self, update: object) -> bool:
        if not isinstance(update, Update) or update.message is None or update.effective_user is None:
            return False
        message = update.message
        if message.chat.type != "private" or (message.text or "").startswith("/"):
            return False
        if not (message.text or message.photo or message.document or message.caption):
            return False
        data = self.app.user_data.get(update.effective_user.id) or {}
        return bool(data.get(KEY))


async def route(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A message in a conversation or step: the question, a note, a catalog query, an answer to save,
    or a message to relay. Without a conversation any more: the catalog search."""
    me = await who(update, context)
    state = _state(context)
    pending = str(state.pop("pending", "") or "")
    message = update.message
    text, attachment = _incoming(message)
    if pending == "ask":
        if text.strip():
            await _question(update, context, me, text.strip())
        else:
            state["pending"] = "ask"  # a photo or file alone: the question is still wanted in words
            await reply(update, context, "reference.empty", lang=me.lang)
        return
    if pending in ("faq_question", "faq_answer") and me.is_staff:
        await _faq_step(update, context, me, pending, text)
        return
    if pending.startswith(("note:", "record:", "save:")):
        kind, _, number = pending.partition(":")
        if kind == "note":
            await _relay(update, context, me, text, attachment, note=True)
        elif kind == "record":
            await _record_query(update, context, me, int(number), text)
        else:
            await _save_written(update, context, me, int(number), text)
        return
    await _relay(update, context, me, text, attachment)


async def _relay(
    update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, text: str, attachment: Attachment | None, *, note: bool = False
) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        conversation = await open_conversation_of(session, me.user_id)
        if conversation is None:
            result = Result(Outcome.NOT_FOUND)
        else:
            result = await relay(session, conversation.id, me.user_id, text, svc.now(), attachment=attachment, note=note)
    if result.outcome is Outcome.NOT_FOUND:
        _set_live(context.application, me.user_id, None)
        if update.message.text:
            await search_handlers.plain_text(update, context)  # the conversation ended: plain text is a search
        return
    conversation = result.conversation
    assert conversation is not None
    if result.outcome is Outcome.OK:
        _wake(context)
        if note:
            await reply(update, context, "reference.note_kept", lang=me.lang)
        elif conversation.status == Status.QUEUED:
            await reply(update, context, "reference.added_while_queued", lang=me.lang, number=conversation.id)
    elif result.outcome in (Outcome.EMPTY, Outcome.TOO_LONG):
        await reply(update, context, f"reference.{result.outcome.value}", lang=me.lang, limit=MAX_TEXT)
    elif result.outcome is Outcome.NOT_YOURS:
        _set_live(context.application, me.user_id, None)
        await reply(update, context, "reference.not_yours", lang=me.lang, number=conversation.id, name=escape(result.other))
    else:
        _set_live(context.application, me.user_id, None)
        await reply(update, context, "reference.finished", lang=me.lang)


def _conversation_button(update: Update) -> int | None:
    return _arg(update.callback_query.data, 2)


async def _conversation_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> tuple[Who, int | None]:
    """Who pressed a conversation's staff button, and which conversation (None: forged data); the
    press is answered."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    return me, _conversation_button(update)


@requires(Role.STAFF)
async def note_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Note": the next message is an internal note, never sent to the reader."""
    await _next_message_is(update, context, "note", "reference.note_prompt")


@requires(Role.STAFF)
async def saved_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Saved replies": the desk's saved replies as buttons, and one to keep the last message sent."""
    me, number = await _conversation_pressed(update, context)
    if number is None:
        return
    async with services(context).db.session() as session:
        replies = await saved_replies(session)
    rows: list[list[Button]] = [[(f"={_short(r.text, 60)}", f"rf:sr:{number}:{r.id}")] for r in replies[:20]]
    rows.append([("reference.btn_saved_add", f"rf:sradd:{number}")])
    await reply(update, context, "reference.saved_list", buttons=rows, lang=me.lang, count=len(replies))


@requires(Role.STAFF)
async def saved_reply_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Send a saved reply (``rf:sr:<conversation>:<reply>``) to the reader."""
    me = await who(update, context)
    reply_id = _arg(update.callback_query.data, 3)
    async with services(context).db.session() as session:
        found = next((r for r in await saved_replies(session) if r.id == reply_id), None)
    if found is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, "reference.saved_sent", lang=me.lang)
    await _relay(update, context, me, found.text, None)


@requires(Role.STAFF)
async def saved_add_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Keep the last message the librarian sent in this conversation as a saved reply."""
    me = await who(update, context)
    svc = services(context)
    number = _conversation_button(update)
    async with svc.db.session() as session:
        said = [m for m in await messages(session, number or 0, notes=False) if m.side == "staff" and m.author_id == me.user_id and m.text]
        kept = await add_saved_reply(session, said[-1].text, me.user_id, svc.now()) if said else None
    await answer(update, context, "reference.saved_added" if kept else "reference.saved_nothing", alert=kept is None, lang=me.lang)


@requires(Role.STAFF)
async def record_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Share a record": the next message is a catalog search whose results can be shared."""
    await _next_message_is(update, context, "record", "reference.record_prompt")


async def _record_query(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, number: int, query: str) -> None:
    async with services(context).db.session() as session:
        page = await search(session, query, limit=5)
    if not page.hits:
        await reply(update, context, "reference.record_none", lang=me.lang, query=escape(query[:80]))
        return
    lines = [search_handlers._hit(me.lang, i, hit) for i, hit in enumerate(page.hits, 1)]
    rows: list[list[Button]] = [
        [(f"={t(me.lang, 'reference.btn_share', number=i)}", f"rf:share:{number}:{hit.record_id}") for i, hit in enumerate(page.hits, 1)]
    ]
    await reply(update, context, "reference.record_results", buttons=rows, lang=me.lang, lines="\n".join(lines))


@requires(Role.STAFF)
async def share_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Share a catalog record (``rf:share:<conversation>:<record>``): the reader gets it with Place hold."""
    me = await who(update, context)
    svc = services(context)
    record_id = _arg(update.callback_query.data, 3)
    async with svc.db.session() as session:
        details = await record_details(session, record_id) if record_id is not None else None
    if details is None or record_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    record = {
        lang: t(lang, "reference.record_text", title=escape(details.title), author=escape(details.author or "—"),
                publication=escape(details.publication or ""),
                holdings=escape(search_handlers._holdings(lang, details.availability, details.call_number)))
        for lang in ("zh", "en")
    }
    attachment = Attachment("record", record_id=record_id, record_text=record, holdable=True)
    await answer(update, context, "reference.record_shared", lang=me.lang)
    await _relay(update, context, me, details.title, attachment)


@requires(Role.STAFF)
async def handover_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Hand over": colleagues on duty who are free, as buttons."""
    me, number = await _conversation_pressed(update, context)
    if number is None:
        return
    async with services(context).db.session() as session:
        colleagues = await free_colleagues(session, me.user_id)
    if not colleagues:
        await reply(update, context, "reference.nobody_free", lang=me.lang)
        return
    rows: list[list[Button]] = [[(f"={_short(name, 40)}", f"rf:to:{number}:{staff_id}")] for staff_id, name in colleagues]
    await reply(update, context, "reference.handover_to", buttons=rows, lang=me.lang)


@requires(Role.STAFF)
async def handover_to_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Hand the conversation to the chosen colleague (``rf:to:<conversation>:<staff>``)."""
    me = await who(update, context)
    number, colleague = _arg(update.callback_query.data, 2), _arg(update.callback_query.data, 3)
    if number is None or colleague is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with services(context).db.session() as session:
        result = await hand_over(session, number, me.user_id, colleague, labels())
    if result.outcome is Outcome.OK:
        _set_live(context.application, me.user_id, None)
        _set_live(context.application, colleague, number)
        _wake(context)
        await answer(update, context, lang=me.lang)
        await edit(update, context, "reference.handed_you", lang=me.lang, number=number, name=escape(result.other))
    else:
        await answer(update, context, f"reference.handover_{result.outcome.value}", alert=True, lang=me.lang)


async def end_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/end: either side ends the conversation they are in."""
    me = await who(update, context)
    async with services(context).db.session() as session:
        conversation = await open_conversation_of(session, me.user_id)
    if conversation is None:
        _set_live(context.application, me.user_id, None)
        await reply(update, context, "reference.nothing_to_end", lang=me.lang)
        return
    await _end(update, context, me, conversation.id)


async def end_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The End button (``rf:end:<conversation>``)."""
    me = await who(update, context)
    number = _conversation_button(update)
    await answer(update, context, lang=me.lang)
    if number is not None:
        await _end(update, context, me, number)


async def _end(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, number: int) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        result = await end(session, number, me.user_id, svc.now(), labels())
    conversation = result.conversation
    if result.outcome is not Outcome.OK or conversation is None:
        await reply(update, context, "reference.finished", lang=me.lang)
        return
    for person in (conversation.reader_id, conversation.staff_id):
        if person is not None:
            _set_live(context.application, person, None)
    _state(context).pop("pending", None)
    _wake(context)
    log.info("reference conversation %s ended by %s", conversation.id, conversation.ended_by)


@requires(Role.STAFF)
async def faq_add_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Add to the answer base" on the desk card: the question, then the answer, as two messages."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    _state(context)["pending"] = "faq_question"
    await reply(update, context, "reference.faq_ask_question", lang=me.lang)


async def _faq_step(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, step: str, text: str) -> None:
    svc = services(context)
    state = _state(context)
    problem = text_problem(text)
    if problem is not None:
        state["pending"] = step  # ask again
        await reply(update, context, f"reference.{problem.value}", lang=me.lang, limit=MAX_TEXT)
        return
    if step == "faq_question":
        state["pending"], state["faq_question"] = "faq_answer", text.strip()
        await reply(update, context, "reference.faq_ask_answer", lang=me.lang)
        return
    question = str(state.pop("faq_question", "") or "")
    if not question:
        await reply(update, context, "reference.save_refused", lang=me.lang)
        return
    async with svc.db.session() as session:
        entry = await add_entry(session, question, text, me.user_id, svc.now())
    log.info("staff %s added answer-base entry %s", me.user_id, entry.id)
    await reply(update, context, "reference.saved_to_base", lang=me.lang, entry=entry.id)


# --------------------------------------------------------------------------------------------------
# After the end: rating, effort, saving the answer


async def rate_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reader's 1–5 rating (``rf:rate:<conversation>:<n>``)."""
    me = await who(update, context)
    number, stars = _arg(update.callback_query.data, 2), _arg(update.callback_query.data, 3)
    svc = services(context)
    async with svc.db.session() as session:
        result = await rate(session, number or 0, me.user_id, stars or 0, svc.now())
    if result.outcome is Outcome.OK:
        _wake(context)
        await answer(update, context, "reference.thanks_rating", lang=me.lang)
        await edit(update, context, "reference.rated", lang=me.lang, number=number, stars="★" * (stars or 0))
    elif result.outcome is Outcome.ALREADY:
        await answer(update, context, "reference.already_rated", alert=True, lang=me.lang)
    else:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)


@requires(Role.STAFF)
async def effort_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The READ effort 1–6 (``rf:effort:<conversation>:<n>``)."""
    me = await who(update, context)
    number, effort = _arg(update.callback_query.data, 2), _arg(update.callback_query.data, 3)
    async with services(context).db.session() as session:
        result = await set_effort(session, number or 0, me.user_id, effort or 0)
    if result.outcome is Outcome.OK:
        await answer(update, context, "reference.effort_kept", lang=me.lang, effort=effort)
    else:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)


@requires(Role.STAFF)
async def save_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Save to the answer base": the question and the answer given, to save as is or rewrite."""
    me = await who(update, context)
    number = _conversation_button(update)
    async with services(context).db.session() as session:
        result, draft = await answer_draft(session, number or 0, me.user_id)
    conversation = result.conversation
    if result.outcome is not Outcome.OK or conversation is None or number is None:
        await answer(update, context, "reference.save_refused", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    rows: list[list[Button]] = [[("reference.btn_write", f"rf:savew:{number}")]]
    if draft:
        rows.insert(0, [("reference.btn_save_as_is", f"rf:savek:{number}")])
    await reply(
        update, context, "reference.save_draft", buttons=rows, lang=me.lang,
        question=_clip(conversation.question, 1000), answer=_clip(draft, 2000) if draft else t(me.lang, "reference.nothing_said"),
    )


@requires(Role.STAFF)
async def save_as_is_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Save the answer as given in the conversation (``rf:savek:<conversation>``)."""
    me = await who(update, context)
    svc = services(context)
    number = _conversation_button(update) or 0
    async with svc.db.session() as session:
        _, draft = await answer_draft(session, number, me.user_id)
        result = await save_answer(session, number, me.user_id, draft, svc.now())
    await answer(update, context, lang=me.lang)
    await _saved(update, context, me, result)


@requires(Role.STAFF)
async def save_write_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Write the answer to save (``rf:savew:<conversation>``): the next message."""
    await _next_message_is(update, context, "save", "reference.save_prompt")


async def _save_written(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, number: int, text: str) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        result = await save_answer(session, number, me.user_id, text, svc.now())
    await _saved(update, context, me, result)


async def _saved(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, result: Result) -> None:
    conversation: DeskConversation | None = result.conversation
    if result.outcome is Outcome.OK and conversation is not None:
        log.info("answer of reference conversation %s saved as entry %s", conversation.id, conversation.saved_entry_id)
        await reply(update, context, "reference.saved_to_base", lang=me.lang, entry=conversation.saved_entry_id)
    elif result.outcome in (Outcome.EMPTY, Outcome.TOO_LONG):
        await reply(update, context, f"reference.{result.outcome.value}", lang=me.lang, limit=MAX_TEXT)
    else:
        await reply(update, context, "reference.save_refused", lang=me.lang)


# --------------------------------------------------------------------------------------------------
# The waiting job and registration


async def waiting_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Tell readers whose question nobody took in time when to expect an answer."""
    svc = services(context)
    async with svc.db.session() as session:
        told = await tell_waiting(session, svc.policy, svc.now(), svc.tz)
    if told:
        log.info("told %d waiting reader(s) when to expect an answer", told)
        _wake(context)


async def cancel_pending(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/cancel also drops a one-message step of the desk (the question after a bare /ask, a note, …);
    the /cancel handler of group 0 answers the person."""
    state = context.user_data.get(KEY)
    if state and state.pop("pending", None) is not None and not state:
        context.user_data.pop(KEY, None)


def register(app: Application) -> None:  # type: ignore[type-arg]
    """/ask, /desk, /end, the conversation router and every ``rf:`` button, the waiting job."""
    app.add_handler(CommandHandler("ask", ask_command))
    app.add_handler(CommandHandler("desk", desk_command))
    app.add_handler(CommandHandler("end", end_command))
    app.add_handler(DeskRouter(app))
    app.add_handler(CommandHandler("cancel", cancel_pending), group=1)  # after group 0's /cancel answered
    for pattern, callback in (
        (r"^rf:ok:\d+:\d+$", answers_pressed),
        (r"^rf:lib:\d+$", librarian_pressed),
        (r"^rf:duty:[01]$", duty_pressed),
        (r"^rf:faqadd$", faq_add_pressed),
        (r"^rf:take:\d+$", take_pressed),
        (r"^rf:note:\d+$", note_pressed),
        (r"^rf:saved:\d+$", saved_pressed),
        (r"^rf:sr:\d+:\d+$", saved_reply_pressed),
        (r"^rf:sradd:\d+$", saved_add_pressed),
        (r"^rf:rec:\d+$", record_pressed),
        (r"^rf:share:\d+:\d+$", share_pressed),
        (r"^rf:hand:\d+$", handover_pressed),
        (r"^rf:to:\d+:\d+$", handover_to_pressed),
        (r"^rf:end:\d+$", end_pressed),
        (r"^rf:rate:\d+:\d$", rate_pressed),
        (r"^rf:effort:\d+:\d$", effort_pressed),
        (r"^rf:save:\d+$", save_pressed),
        (r"^rf:savek:\d+$", save_as_is_pressed),
        (r"^rf:savew:\d+$", save_write_pressed),
    ):
        app.add_handler(CallbackQueryHandler(callback, pattern=pattern))
    if app.job_queue is not None:
        app.job_queue.run_repeating(waiting_job, interval=WAIT_EVERY, first=20, name="reference-waiting")
