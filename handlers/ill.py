"""Interlibrary loan and document delivery (馆际互借 / 文献传递).

Readers: ``/ill`` (or ``/ill ISBN``, or "Request by ILL" after a search that found nothing, callback
``ill:new``) walks them through a request one step at a time — a Back button at each step, Skip where
the field is optional, Keep when it already has a value — and ends on a summary with Submit and
Edit. The form lives in ``user_data`` and the conversation is persistent, so a restart mid-way
loses nothing. ``/requests`` lists their requests, with Cancel while that is still possible and a
1–5 rating once one is completed.

Staff: every new request reaches the staff chat (and the staff who asked for it) with buttons that
move it on; ``/illqueue`` lists the open requests oldest first, filterable by status; a request card
shows its history. Every button re-checks role and ownership: callback data can be forged.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from telegram import ForceReply, Update
from telegram.constants import ParseMode
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
from bot.i18n import localise, t
from bot.ill_exchange import identity_for, wake_exchange
from bot.roles import requires
from bot.ui import Button, answer, edit, escape, paginate, parse_page, reply
from handlers.account import cancel_fallbacks
from storage import ill, ill_exchange
from storage.ill import CANCELLABLE, IllRequest, IllStatus, Invalid, Refusal
from storage.people import Role

log = logging.getLogger(__name__)

FORM = "ill_form"  # user_data: the request being filled in (plain JSON)
PREFILL = "ill_prefill"  # user_data: the search query the search module leaves for "Request by ILL"
PARTNER_FOR = "ill_partner"  # user_data: the request a staff member is naming the partner library of

# The steps of the form; each is also the conversation's state while it is asked.
KIND, TITLE, AUTHOR, IDENT, HOLDING = "kind", "title", "author", "ident", "holding"
JOURNAL, VOLUME, ISSUE, PAGES = "journal", "volume", "issue", "pages"
PUBLISHER, YEAR, NEED_BY, BRANCH, NOTE, COPYRIGHT, SUMMARY = (
    "publisher", "year", "need_by", "branch", "note", "copyright", "summary",
)
PARTNER = "partner"  # the staff conversation's only state

LOAN_STEPS = [KIND, TITLE, AUTHOR, IDENT, PUBLISHER, YEAR, NEED_BY, BRANCH, NOTE, SUMMARY]
COPY_STEPS = [KIND, TITLE, AUTHOR, IDENT, JOURNAL, VOLUME, ISSUE, PAGES, PUBLISHER, YEAR, NEED_BY, BRANCH, NOTE,
              COPYRIGHT, SUMMARY]
OPTIONAL = frozenset({AUTHOR, IDENT, VOLUME, ISSUE, PUBLISHER, YEAR, NEED_BY, NOTE})
FIELD = {  # the form field each step fills (the identifier step fills isbn, issn or doi)
    KIND: "kind", TITLE: "title", AUTHOR: "author", JOURNAL: "journal", VOLUME: "volume", ISSUE: "issue",
    PAGES: "pages", PUBLISHER: "publisher", YEAR: "year", NEED_BY: "need_before", BRANCH: "pickup_branch",
    NOTE: "note", COPYRIGHT: "copyright",
}
STEP_OF = {name: step for step, name in FIELD.items()}
PER_PAGE = 5


# -------------------------------------------------------------------------------------------------
# The form


def _form(context: ContextTypes.DEFAULT_TYPE) -> dict[str, Any] | None:
    form = context.user_data.get(FORM) if context.user_data is not None else None
    return form if isinstance(form, dict) else None


def _steps(form: dict[str, Any]) -> list[str]:
    return COPY_STEPS if form.get("kind") == ill.IllKind.COPY else LOAN_STEPS


def _ident(form: dict[str, Any]) -> str:
    if form.get("isbn"):
        return "ISBN " + ill.format_isbn(form["isbn"])
    if form.get("issn"):
        return "ISSN " + form["issn"]
    if form.get("doi"):
        return "DOI " + form["doi"]
    return ""


def _shown(lang: str, form: dict[str, Any], step: str, policy: Any) -> str:
    """The value of ``step`` as the reader reads it ('' when empty); not escaped."""
    if step == IDENT:
        return _ident(form)
    value = form.get(FIELD[step])
    if not value:
        return ""
    if step == KIND:
        return t(lang, f"ill.kind_{value}")
    if step == BRANCH:
        return str(localise(lang, ill.branch_name(policy, value)))
    if step == COPYRIGHT:
        return t(lang, "ill.copyright_accepted")
    return str(value)


def _store(form: dict[str, Any], step: str, value: Any) -> None:
    if step == IDENT:
        for scheme in ("isbn", "issn", "doi"):
            form[scheme] = ""
        if isinstance(value, ill.Identifier):
            form[value.scheme] = value.value
        return
    if isinstance(value, dt.date):
        value = value.isoformat()
    form[FIELD[step]] = value


async def _lost(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """The form is gone (erased with /forgetme, or never made): start again."""
    if update.callback_query is not None:
        await answer(update, context, "ill.form_closed", alert=True)
    else:
        await reply(update, context, "ill.form_closed")
    return ConversationHandler.END


# -------------------------------------------------------------------------------------------------
# Asking


def _question(lang: str, form: dict[str, Any], step: str, policy: Any) -> tuple[str, list[list[Button]]]:
    """The message id and buttons that ask ``step``."""
    back: list[Button] = [("common.back", f"illf:back:{step}")]
    kind = form.get("kind") or ill.IllKind.LOAN
    if step == KIND:
        rows = [[("ill.btn_kind_loan", "illf:kind:loan")], [("ill.btn_kind_copy", "illf:kind:copy")]]
        return "ill.ask_kind", rows + [back if form.get("editing") else [("common.cancel", "illf:cancel")]]
    if step == BRANCH:
        rows = [[("=" + str(localise(lang, ill.branch_name(policy, b.code))), f"illf:branch:{b.code}")]
                for b in policy.library.branches]
        return "ill.ask_branch", rows + [back]
    if step == COPYRIGHT:
        return "ill.ask_copyright", [[("ill.btn_accept", "illf:accept")], back]
    rows = []
    current = _shown(lang, form, step, policy)
    if current:
        short = current if len(current) <= 40 else current[:39] + "…"
        rows.append([("=" + t(lang, "ill.btn_keep", value=short), f"illf:keep:{step}")])
    if step in OPTIONAL:
        rows.append([("ill.btn_no_date" if step == NEED_BY else "ill.btn_skip", f"illf:skip:{step}")])
    rows.append(back)
    key = f"ill.ask_{step}_{kind}" if step in (TITLE, AUTHOR) else f"ill.ask_{step}"
    return key, rows


async def _ask(update: Update, context: ContextTypes.DEFAULT_TYPE, step: str, *, by_edit: bool = False) -> str:
    """Put the question of ``step`` to the reader; ``step`` is the conversation's new state."""
    form = _form(context)
    assert form is not None
    form["step"] = step
    if step == SUMMARY:
        return await _show_summary(update, context, by_edit=by_edit)
    me = await who(update, context)
    svc = services(context)
    seq = _steps(form)
    key, buttons = _question(me.lang, form, step, svc.policy)
    progress = t(me.lang, "ill.progress", n=seq.index(step) + 1, total=len(seq) - 1)
    send = edit if by_edit else reply
    await send(
        update, context, key, buttons=buttons, lang=me.lang, progress=progress,
        limit=ill.LIMITS.get(FIELD.get(step, ""), ""), today=_today(context).isoformat(),
    )
    return step


def _today(context: ContextTypes.DEFAULT_TYPE) -> dt.date:
    svc = services(context)
    return svc.now().astimezone(svc.tz).date()


async def _advance(update: Update, context: ContextTypes.DEFAULT_TYPE, after: str, *, by_edit: bool = False) -> str:
    """Go on from ``after``: to the next step, to the holding the library has, or (when editing) back
    to the summary once nothing required is missing."""
    form = _form(context)
    assert form is not None
    seq = _steps(form)
    if form.get("editing"):
        missing = ill.missing_fields(_clean(form))
        if missing:
            return await _ask(update, context, STEP_OF.get(missing[0], SUMMARY), by_edit=by_edit)
        form["editing"] = False
        return await _ask(update, context, SUMMARY, by_edit=by_edit)
    following = seq[seq.index(after) + 1]
    if after == IDENT:
        shown = await _offer_holding(update, context, form, then=following, by_edit=by_edit)
        if shown:
            return HOLDING
    return await _ask(update, context, following, by_edit=by_edit)


def _clean(form: dict[str, Any]) -> dict[str, Any]:
    """The form without the wizard's own bookkeeping."""
    return {k: v for k, v in form.items() if k in ill.FORM_FIELDS or k == "holding_record_id"}


async def _take(
    update: Update, context: ContextTypes.DEFAULT_TYPE, step: str, parse: Callable[[str], Any]
) -> str | int:
    """Check a typed answer for ``step``: store it and go on, or say what is wrong and ask again."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    text = update.message.text if update.message else ""
    if ill.is_skip(text or ""):
        if step not in OPTIONAL:
            await reply(update, context, "ill.required")
            return step
        _store(form, step, "")
        return await _advance(update, context, step)
    value = parse(text or "")
    if isinstance(value, Invalid):
        await reply(update, context, f"ill.invalid_{value.code}", **value.params)
        return step
    _store(form, step, value)
    return await _advance(update, context, step)


# -------------------------------------------------------------------------------------------------
# The reader's steps


@requires(Role.READER)
async def ill_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """/ill, /ill ISBN, or "Request by ILL" after a search: a new, empty form (prefilled when possible)."""
    await answer(update, context)
    form: dict[str, Any] = {"token": uuid.uuid4().hex, "step": KIND}
    typed = " ".join(context.args or []) if update.message else ""
    prefill = typed or str(context.user_data.pop(PREFILL, "") or "")
    context.user_data.pop(PREFILL, None)
    context.user_data[FORM] = form
    if prefill:
        found = ill.parse_identifier(prefill)
        if isinstance(found, ill.Identifier):
            _store(form, IDENT, found)
        elif typed:  # /ill followed by something: meant as an identifier, so say what is wrong with it
            await reply(update, context, f"ill.invalid_{found.code}", **found.params)
        else:  # the words of a search that found nothing: a good guess at the title
            title = ill.clean_text(prefill, "title")
            if isinstance(title, str):
                form["title"] = title
    if form.get("isbn") and await _offer_holding(update, context, form, then=KIND):
        return HOLDING
    return await _ask(update, context, KIND)


async def kind_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Loan of a book, or copy of an article or chapter."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    choice = (update.callback_query.data or "").rsplit(":", 1)[-1]
    if form.get("step") != KIND or choice not in (ill.IllKind.LOAN, ill.IllKind.COPY):
        return await stale_in_form(update, context)
    await answer(update, context)
    form["kind"] = choice
    return await _advance(update, context, KIND, by_edit=True)


async def title_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The title of the book, or of the article or chapter (required, at most 500 characters)."""
    return await _take(update, context, TITLE, lambda text: ill.clean_text(text, "title"))


async def author_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The author (optional)."""
    return await _take(update, context, AUTHOR, lambda text: ill.clean_text(text, "author"))


async def ident_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """An ISBN, ISSN or DOI (optional), checked: a wrong check digit is pointed out."""
    return await _take(update, context, IDENT, ill.parse_identifier)


async def journal_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Copies: the journal, or the book that holds the chapter (required)."""
    return await _take(update, context, JOURNAL, lambda text: ill.clean_text(text, "journal"))


async def volume_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Copies: the volume (optional)."""
    return await _take(update, context, VOLUME, lambda text: ill.parse_short(text, "volume"))


async def issue_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Copies: the issue (optional)."""
    return await _take(update, context, ISSUE, lambda text: ill.parse_short(text, "issue"))


async def pages_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Copies: the pages (required)."""
    return await _take(update, context, PAGES, ill.parse_pages)


async def publisher_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The publisher (optional)."""
    return await _take(update, context, PUBLISHER, lambda text: ill.clean_text(text, "publisher"))


async def year_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The year of publication (optional)."""
    today = _today(context)
    return await _take(update, context, YEAR, lambda text: ill.parse_year(text, today))


async def need_by_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The date the reader needs it by (optional): a real date, not in the past."""
    today = _today(context)
    return await _take(update, context, NEED_BY, lambda text: ill.parse_need_by(text, today))


async def note_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """A note for the staff (optional)."""
    return await _take(update, context, NOTE, lambda text: ill.clean_text(text, "note"))


async def branch_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The pick-up branch, from the library's list."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    code = (update.callback_query.data or "").split(":", 2)[-1]
    if form.get("step") != BRANCH or code not in {b.code for b in services(context).policy.library.branches}:
        return await stale_in_form(update, context)
    await answer(update, context)
    form["pickup_branch"] = code
    return await _advance(update, context, BRANCH, by_edit=True)


async def copyright_accepted(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Copies: the reader accepts the copyright declaration."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    if form.get("step") != COPYRIGHT:
        return await stale_in_form(update, context)
    await answer(update, context)
    form["copyright"] = True
    return await _advance(update, context, COPYRIGHT, by_edit=True)


async def use_the_buttons(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Text typed where a button must be chosen (kind, branch, declaration, summary)."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    await reply(update, context, "ill.use_buttons")
    return str(form.get("step") or KIND)


async def skip_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Skip an optional step (a required one says so)."""
    form = _form(context)
    step = (update.callback_query.data or "").split(":")[-1]
    if form is None:
        return await _lost(update, context)
    if form.get("step") != step:
        return await stale_in_form(update, context)
    if step not in OPTIONAL:
        await answer(update, context, "ill.required", alert=True)
        return step
    await answer(update, context)
    _store(form, step, "")
    return await _advance(update, context, step, by_edit=True)


async def keep_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Keep the value the step already has."""
    form = _form(context)
    step = (update.callback_query.data or "").split(":")[-1]
    if form is None:
        return await _lost(update, context)
    if form.get("step") != step or step not in FIELD and step != IDENT:
        return await stale_in_form(update, context)
    await answer(update, context)
    return await _advance(update, context, step, by_edit=True)


async def back_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """One step back (while editing from the summary: back to the summary)."""
    form = _form(context)
    step = (update.callback_query.data or "").split(":")[-1]
    if form is None:
        return await _lost(update, context)
    if form.get("step") != step:
        return await stale_in_form(update, context)
    await answer(update, context)
    if form.get("editing"):
        form["editing"] = False
        return await _ask(update, context, SUMMARY, by_edit=True)
    seq = _steps(form)
    if step == HOLDING:
        previous = IDENT
    else:
        previous = seq[max(seq.index(step) - 1, 0)] if step in seq else KIND
    return await _ask(update, context, previous, by_edit=True)


async def cancel_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """The Cancel button of the form: nothing is sent."""
    context.user_data.pop(FORM, None)
    await answer(update, context)
    await edit(update, context, "ill.form_cancelled")
    return ConversationHandler.END


async def stale_in_form(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """A button of an earlier question (or a forged one): the current question stays."""
    await answer(update, context, "ill.old_button", alert=True)
    form = _form(context)
    return str(form.get("step") or KIND) if form else ConversationHandler.END


# -------------------------------------------------------------------------------------------------
# The library's own holding


async def _offer_holding(
    update: Update, context: ContextTypes.DEFAULT_TYPE, form: dict[str, Any], *, then: str, by_edit: bool = False
) -> bool:
    """Show the library's own copy of the title, if it has one; True when shown."""
    if form.get("kind") == ill.IllKind.COPY and not form.get("isbn"):
        return False  # an article: the catalog holds books, not articles
    svc = services(context)
    async with svc.db.session() as session:
        holding = await ill.find_holding(
            session, isbn=form.get("isbn") or "", title=form.get("title") or "", author=form.get("author") or ""
        )
    if holding is None or holding.record_id == form.get("holding_record_id"):
        return False  # nothing held, or the reader already chose to go on for this record
    form["step"] = HOLDING
    form["after_holding"] = then
    form["holding_offered"] = holding.record_id
    buttons: list[list[Button]] = [[("ill.btn_holding_stop", "illf:hold:stop")], [("ill.btn_holding_go", "illf:hold:go")]]
    if then != KIND:
        buttons.append([("common.back", f"illf:back:{HOLDING}")])
    key = "ill.holding_on_shelf" if holding.on_shelf else "ill.holding_all_out"
    await (edit if by_edit else reply)(
        update, context, key, buttons=buttons,
        title=escape(holding.title), author=escape(holding.author) or "—", year=escape(holding.year) or "—",
        call_number=escape(holding.call_number) or "—", copies=holding.copies, on_shelf=holding.on_shelf,
    )
    return True


async def holding_answered(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """After seeing the library's own copy: stop here, or request it anyway (say, it is missing)."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    if form.get("step") != HOLDING:
        return await stale_in_form(update, context)
    await answer(update, context)
    if update.callback_query.data == "illf:hold:stop":
        context.user_data.pop(FORM, None)
        await edit(update, context, "ill.holding_stopped")
        return ConversationHandler.END
    form["holding_record_id"] = form.get("holding_offered")
    following = str(form.get("after_holding") or KIND)
    return await _ask(update, context, following, by_edit=True)


# -------------------------------------------------------------------------------------------------
# Summary, edit and submit


def _summary_lines(lang: str, form: dict[str, Any], policy: Any) -> str:
    lines = []
    for step in _steps(form)[:-1]:
        value = _shown(lang, form, step, policy)
        if value or step not in OPTIONAL:
            lines.append(t(lang, "common.label_value", label=f"<b>{t(lang, f'ill.field_{step}')}</b>", value=escape(value) if value else "—"))
    return "\n".join(lines)


async def _show_summary(update: Update, context: ContextTypes.DEFAULT_TYPE, *, by_edit: bool) -> str:
    """Everything the reader gave, a warning if they already asked for it, and Submit / Edit."""
    form = _form(context)
    assert form is not None
    form["step"] = SUMMARY
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        duplicates = await ill.open_duplicates(session, _clean(form), me.user_id, me.reader_id)
    warning = ""
    if duplicates:
        warning = t(me.lang, "ill.duplicate_warning", numbers=", ".join(
            f"{r.number} ({t(me.lang, f'ill.status_{r.status}')})" for r in duplicates
        ))
    buttons: list[list[Button]] = [
        [("ill.btn_submit_anyway" if duplicates else "ill.btn_submit", f"illf:submit:{form['token']}")],
        [("ill.btn_edit", "illf:edit"), ("common.cancel", "illf:cancel")],
    ]
    await (edit if by_edit else reply)(
        update, context, "ill.summary", buttons=buttons, lang=me.lang,
        details=_summary_lines(me.lang, form, svc.policy), warning=warning,
    )
    return SUMMARY


async def edit_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Edit: choose the field to change."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    if form.get("step") != SUMMARY:
        return await stale_in_form(update, context)
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    fields = [(f"ill.field_{step}", f"illf:editf:{step}") for step in _steps(form)[:-1]]
    rows: list[list[Button]] = [fields[i : i + 2] for i in range(0, len(fields), 2)]
    rows.append([("ill.btn_back_to_summary", "illf:sum")])
    await edit(update, context, "ill.choose_field", buttons=rows, lang=me.lang)
    return SUMMARY


async def field_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """A field to change from the summary; after it, back to the summary."""
    form = _form(context)
    step = (update.callback_query.data or "").split(":")[-1]
    if form is None:
        return await _lost(update, context)
    if form.get("step") != SUMMARY or step not in _steps(form)[:-1]:
        return await stale_in_form(update, context)
    await answer(update, context)
    form["editing"] = True
    return await _ask(update, context, step, by_edit=True)


async def summary_again(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Back from the list of fields to the summary."""
    form = _form(context)
    if form is None:
        return await _lost(update, context)
    if form.get("step") != SUMMARY:
        return await stale_in_form(update, context)
    await answer(update, context)
    return await _ask(update, context, SUMMARY, by_edit=True)


async def submit_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Submit: make the request once (a second press finds the first), and alert the staff."""
    token = (update.callback_query.data or "").split(":")[-1]
    form = _form(context)
    if form is None or form.get("token") != token:
        await submitted_before(update, context)
        return str(form.get("step") or KIND) if form else ConversationHandler.END
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        result = await ill.submit_request(
            session, _clean(form), token=token, telegram_id=me.user_id, reader_id=me.reader_id, now=svc.now(),
            policy=svc.policy, today=_today(context), staff_chat_id=svc.settings.staff_chat_id,
        )
    if result.request is None:  # something required is missing or no longer valid: ask it again
        await answer(update, context, "ill.incomplete", alert=True, lang=me.lang)
        form["editing"] = True
        return await _ask(update, context, STEP_OF.get(result.missing[0], KIND), by_edit=True)
    context.user_data.pop(FORM, None)
    request = result.request
    key = "ill.submitted" if result.created else "ill.already_submitted"
    await answer(update, context, lang=me.lang)
    await edit(update, context, key, lang=me.lang, number=request.number, title=escape(request.title))
    return ConversationHandler.END


async def submitted_before(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Submit on an old summary: tell which request it made, if it made one."""
    token = (update.callback_query.data or "").split(":")[-1]
    me = await who(update, context)
    async with services(context).db.session() as session:
        request = await ill.request_by_token(session, token)
    mine = request is not None and ill.owns(request, me.user_id, me.reader_id)
    if mine and request is not None:
        await answer(update, context, "ill.already_submitted_short", alert=True, lang=me.lang, number=request.number)
    else:
        await answer(update, context, "ill.form_closed", alert=True, lang=me.lang)


async def form_closed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button of a form that is no longer being filled in."""
    await answer(update, context, "ill.form_closed", alert=True)


async def not_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo, sticker or file where an answer was expected."""
    await reply(update, context, "common.text_expected")


# -------------------------------------------------------------------------------------------------
# The reader's list: /requests, cancelling, rating


def _local(at: dt.datetime | None, context: ContextTypes.DEFAULT_TYPE, with_time: bool = False) -> str:
    if at is None:
        return "—"
    return at.astimezone(services(context).tz).strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")


def _status_detail(lang: str, request: IllRequest, policy: Any) -> str:
    """What the reader should know about the current status (partner, reason, pick-up place)."""
    if request.state == IllStatus.REQUESTED and request.partner:
        return t(lang, "ill.detail_partner", partner=escape(request.partner))
    if request.state == IllStatus.UNFILLED:
        return t(lang, "ill.detail_reason", reason=t(lang, f"ill.reason_{request.unfilled_reason}"))
    if request.state == IllStatus.AVAILABLE:
        return t(lang, "ill.detail_branch", branch=localise(lang, ill.branch_name(policy, request.pickup_branch)))
    return ""


@requires(Role.READER)
async def my_requests(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/requests: the reader's requests, newest first, with status and dates."""
    await _show_requests(update, context, 0, by_edit=False)


async def requests_page(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Another page of /requests."""
    await answer(update, context)
    await _show_requests(update, context, parse_page(update.callback_query.data), by_edit=True)


async def _show_requests(update: Update, context: ContextTypes.DEFAULT_TYPE, page: int, *, by_edit: bool) -> None:
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        requests = await ill.requests_of(session, me.user_id, me.reader_id)
        with_partner = await ill_exchange.cancellable_with_partner(session, [r.id for r in requests])
    send = edit if by_edit else reply
    if not requests:
        await send(update, context, "ill.no_requests", lang=me.lang)
        return
    chunk, nav = paginate(requests, page, PER_PAGE, "illrq")
    lines, buttons = [], []
    for request in chunk:
        detail = _status_detail(me.lang, request, svc.policy)
        lines.append(t(
            me.lang, "ill.request_line", number=request.number, kind=t(me.lang, f"ill.kind_{request.kind}"),
            title=escape(request.title[:120]), status=t(me.lang, f"ill.status_{request.status}"),
            changed=_local(request.updated_at, context), submitted=_local(request.submitted_at, context),
            detail=f"\n{detail}" if detail else "",
        ))
        if request.state in CANCELLABLE or request.id in with_partner:
            buttons.append([("=" + t(me.lang, "ill.btn_cancel_request", number=request.number), f"illcx:{request.id}")])
        elif request.state == IllStatus.COMPLETED and request.rating is None:
            buttons.append([("=" + t(me.lang, "ill.btn_rate", number=request.number), f"illra:{request.id}")])
    if nav:
        buttons.append(nav)
    await send(update, context, "ill.requests", buttons=buttons, lang=me.lang, count=len(requests), lines="\n\n".join(lines))


def _request_id(data: str | None, position: int = 1) -> int | None:
    try:
        return int((data or "").split(":")[position])
    except (IndexError, ValueError):
        return None


async def _own_request(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who) -> IllRequest | None:
    """The request named by the button, if it is the person's own (a forged id answers NOT_YOURS)."""
    request_id = _request_id(update.callback_query.data)
    request = None
    if request_id is not None:
        async with services(context).db.session() as session:
            request = await ill.get_request(session, request_id)
    if request is None or not ill.owns(request, me.user_id, me.reader_id):
        await answer(update, context, "ill.refused_not_yours", alert=True, lang=me.lang)
        return None
    return request


async def cancel_asked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Cancel on /requests: ask to confirm."""
    me = await who(update, context)
    request = await _own_request(update, context, me)
    if request is None:
        return
    await answer(update, context, lang=me.lang)
    await edit(
        update, context, "ill.cancel_confirm", lang=me.lang, number=request.number, title=escape(request.title[:200]),
        buttons=[[("ill.btn_cancel_yes", f"illcy:{request.id}"), ("ill.btn_cancel_no", "illcn")]],
    )


async def cancel_confirmed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reader confirmed: cancel, if it is theirs and not yet requested from a partner."""
    me = await who(update, context)
    svc = services(context)
    request_id = _request_id(update.callback_query.data)
    if request_id is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        result = await ill.move_request(
            session, request_id, IllStatus.CANCELLED, actor=me.user_id, staff=False, now=svc.now(), policy=svc.policy,
            reader_id=me.reader_id, staff_chat_id=svc.settings.staff_chat_id,
        )
    if result.refusal is Refusal.TOO_LATE_TO_CANCEL and await _ask_partner_to_cancel(update, context, me, request_id):
        return
    if not result.ok:
        await answer(update, context, lang=me.lang, alert=True, **_refusal(me.lang, result))
        return
    assert result.request is not None
    await answer(update, context, lang=me.lang)
    await edit(update, context, "ill.cancelled", lang=me.lang, number=result.request.number)


async def _ask_partner_to_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, request_id: int) -> bool:
    """A request a partner library already has (ISO 18626): Cancel goes to the partner, whose answer decides."""
    svc = services(context)
    identity = identity_for(svc)
    if identity is None:
        return False
    async with svc.db.session() as session:
        asked = await ill_exchange.ask_partner_to_cancel(session, request_id, identity, svc.now())
        request = await ill.get_request(session, request_id) if asked else None
    if request is None:
        return False
    wake_exchange(context.bot_data)
    await answer(update, context, lang=me.lang)
    await edit(update, context, "ill_partners.cancel_asked", lang=me.lang, number=request.number,
               partner=escape(request.partner))
    return True


async def cancel_kept(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reader changed their mind."""
    await answer(update, context)
    await edit(update, context, "ill.cancel_kept")


def _refusal(lang: str, result: ill.MoveResult) -> dict[str, Any]:
    """``answer``'s arguments for a refused move: the reason, with the current status."""
    status = t(lang, f"ill.status_{result.previous}") if result.previous else ""
    number = result.request.number if result.request is not None else ""
    return {"key": f"ill.refused_{result.refusal}", "status": status, "number": number}


async def rate_asked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Rate on /requests: the 1–5 buttons."""
    me = await who(update, context)
    request = await _own_request(update, context, me)
    if request is None:
        return
    await answer(update, context, lang=me.lang)
    await edit(
        update, context, "ill.rate_ask", lang=me.lang, number=request.number,
        buttons=[[(f"={n}", f"illrt:{request.id}:{n}") for n in range(1, 6)]],
    )


async def rated(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A 1–5 rating of a completed request, once, by the reader who made it."""
    me = await who(update, context)
    svc = services(context)
    request_id = _request_id(update.callback_query.data)
    rating = _request_id(update.callback_query.data, 2)
    if request_id is None or rating is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        outcome = await ill.rate_request(session, request_id, me.user_id, me.reader_id, rating, svc.now())
    if outcome is not ill.RateOutcome.OK:
        await answer(update, context, f"ill.rate_{outcome}", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await edit(update, context, "ill.rated", lang=me.lang, stars="★" * rating + "☆" * (5 - rating))


# -------------------------------------------------------------------------------------------------
# Staff: the request card, moving requests on, the queue


def _age(lang: str, since: dt.datetime, now: dt.datetime) -> str:
    minutes = max(0, int((now - since).total_seconds() // 60))
    days, hours = minutes // 1440, minutes % 1440 // 60
    if days:
        return t(lang, "ill.age_days", d=days, h=hours)
    if hours:
        return t(lang, "ill.age_hours", h=hours)
    return t(lang, "ill.age_minutes", m=minutes)


async def _card(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, request_id: int) -> tuple[dict[str, Any], list[list[Button]]] | None:
    """The staff card of a request (its citation, requester, status and history) and its buttons."""
    svc = services(context)
    async with svc.db.session() as session:
        request = await ill.get_request(session, request_id)
        if request is None:
            return None
        requester = await ill.requester_label(session, request)
        events = await ill.history(session, request.id)
        names = await ill.staff_names(session, [request.handled_by, *(e.actor for e in events)])
        attempts = await ill_exchange.attempts_of(session, request.id)
    params = ill.staff_params(request, svc.policy, requester)
    params["branch"] = localise(lang, params["branch"])
    params["submitted"] = _local(request.submitted_at, context, with_time=True)
    history = []
    for event in events:
        actor = names.get(event.actor or 0) or (t(lang, "ill.actor_reader") if event.actor_role == "reader" else "—")
        detail = ""
        if event.to_status == IllStatus.UNFILLED and event.detail:
            detail = " — " + t(lang, f"ill.reason_{event.detail}")
        elif event.detail:
            detail = " — " + escape(event.detail)
        history.append(t(
            lang, "ill.history_line", at=_local(event.at, context, with_time=True),
            status=t(lang, f"ill.status_{event.to_status}"), actor=escape(actor), detail=detail,
        ))
    params |= {
        "status": t(lang, f"ill.status_{request.status}"),
        "age": _age(lang, request.submitted_at, svc.now()),
        "handler": escape(names.get(request.handled_by or 0, "—")),
        "history": "\n".join(history + _partner_lines(lang, attempts, svc.policy)),
        "key": f"ill.staff_card_{request.kind}",
    }
    buttons: list[list[Button]] = [[(label, data) for label, data in row] for row in ill.staff_buttons(request)]
    return params, buttons + _partner_buttons(request, attempts, identity_for(svc) is not None and bool(svc.policy.ill.partners))


def _partner_lines(lang: str, attempts: Sequence[ill_exchange.PartnerAttempt], policy: Any) -> list[str]:
    """The partner libraries asked for a request (ISO 18626), for its card."""
    if not attempts:
        return []
    lines = [t(lang, "ill_partners.card_partners")]
    for attempt in attempts:
        name = localise(lang, ill_exchange.partner_label(policy.ill.partner(attempt.agency_id), attempt.agency_id))
        lines.append(t(
            lang, "ill_partners.card_attempt", position=attempt.position, partner=escape(str(name)),
            state=t(lang, f"ill_partners.state_{attempt.state}"),
            reason=f" ({escape(attempt.reason)})" if attempt.reason else "",
        ))
    return lines


def _partner_buttons(request: IllRequest, attempts: Sequence[ill_exchange.PartnerAttempt], exchange: bool) -> list[list[Button]]:
    """Send to partners (while nobody was asked), Returned to partner (a partner's book, back from the reader)."""
    rows: list[list[Button]] = []
    if exchange and request.state in (IllStatus.SUBMITTED, IllStatus.IN_REVIEW):
        rows.append([("ill_partners.btn_send", f"illsp:{request.id}:{request.status}")])
    shipped = any(a.state == "shipped" for a in attempts)
    if shipped and request.kind == ill.IllKind.LOAN and request.state in (IllStatus.RECEIVED, IllStatus.AVAILABLE):
        rows.append([("ill_partners.btn_returned", f"illrp:{request.id}")])
    return rows


async def _show_card(update: Update, context: ContextTypes.DEFAULT_TYPE, request_id: int, *, by_edit: bool, lang: str) -> bool:
    card = await _card(update, context, lang, request_id)
    if card is None:
        return False
    params, buttons = card
    key = params.pop("key")
    await (edit if by_edit else reply)(update, context, key, buttons=buttons, lang=lang, **params)
    return True


@requires(Role.STAFF)
async def card_opened(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A request from the queue (a new message) or refreshed in place (``illsx``)."""
    me = await who(update, context)
    request_id = _request_id(update.callback_query.data)
    card = await _card(update, context, me.lang, request_id) if request_id is not None else None
    if card is None:
        await answer(update, context, "ill.refused_not_found", alert=True, lang=me.lang, number="")
        return
    await answer(update, context, lang=me.lang)
    params, buttons = card
    key = params.pop("key")
    in_place = (update.callback_query.data or "").startswith("illsx:")
    await (edit if in_place else reply)(update, context, key, buttons=buttons, lang=me.lang, **params)


def _parse_move(data: str | None) -> tuple[int, IllStatus, IllStatus | None, str] | None:
    """``prefix:id:from[:to-or-reason]`` → (id, from, to, extra); None for anything malformed."""
    parts = (data or "").split(":")
    try:
        request_id, current = int(parts[1]), IllStatus(parts[2])
    except (IndexError, ValueError):
        return None
    extra = parts[3] if len(parts) > 3 else ""
    target = IllStatus(extra) if extra in IllStatus.__members__.values() else None
    return request_id, current, target, extra


async def _apply_move(
    update: Update, context: ContextTypes.DEFAULT_TYPE, request_id: int, expected: IllStatus, target: IllStatus,
    *, partner: str = "", reason: str = "", by_edit: bool = True,
) -> bool:
    """Move the request as the staff member asked; show the refreshed card, or why it was refused."""
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        result = await ill.move_request(
            session, request_id, target, actor=me.user_id, staff=True, now=svc.now(), policy=svc.policy,
            expected=expected, partner=partner, reason=reason, staff_chat_id=svc.settings.staff_chat_id,
        )
        identity = identity_for(svc)
        if result.ok and result.request is not None and identity is not None:  # "received" tells the partner
            await ill_exchange.after_staff_move(session, result.request, target, identity, svc.now())
    wake_exchange(context.bot_data)
    if result.ok:
        await answer(update, context, "ill.moved", lang=me.lang, status=t(me.lang, f"ill.status_{target}"))
    else:
        refusal = _refusal(me.lang, result)
        if update.callback_query is not None:
            await answer(update, context, lang=me.lang, alert=True, **refusal)
        else:
            await reply(update, context, lang=me.lang, **refusal)
        if result.refusal is Refusal.NOT_FOUND:
            return False
    await _show_card(update, context, request_id, by_edit=by_edit, lang=me.lang)
    return result.ok


@requires(Role.STAFF)
async def move_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A staff button that moves a request on (take it, received, available, completed)."""
    parsed = _parse_move(update.callback_query.data)
    if parsed is None or parsed[2] is None:
        await answer(update, context, "common.stale_button", alert=True)
        return
    request_id, expected, target, _ = parsed
    assert target is not None
    await _apply_move(update, context, request_id, expected, target)


@requires(Role.STAFF)
async def unfilled_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Unfilled…: choose the reason the reader will be told."""
    me = await who(update, context)
    parsed = _parse_move(update.callback_query.data)
    if parsed is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    request_id, expected, _, _ = parsed
    await answer(update, context, lang=me.lang)
    rows: list[list[Button]] = [
        [(f"ill.reason_{reason}", f"illur:{request_id}:{expected}:{reason}")] for reason in ill.UNFILLED_REASONS
    ]
    rows.append([("common.back", f"illsx:{request_id}")])
    await edit(update, context, "ill.choose_reason", buttons=rows, lang=me.lang, number=ill.request_number(request_id))


@requires(Role.STAFF)
async def reason_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reason chosen: the request is unfilled, and the reader told why."""
    parsed = _parse_move(update.callback_query.data)
    if parsed is None or parsed[3] not in ill.UNFILLED_REASONS:
        await answer(update, context, "common.stale_button", alert=True)
        return
    request_id, expected, _, reason = parsed
    await _apply_move(update, context, request_id, expected, IllStatus.UNFILLED, reason=reason)


@requires(Role.STAFF)
async def partner_asked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int | None:
    """Requested from…: ask which partner library (recent ones as buttons in a private chat)."""
    me = await who(update, context)
    parsed = _parse_move(update.callback_query.data)
    if parsed is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return ConversationHandler.END
    request_id, expected, _, _ = parsed
    svc = services(context)
    async with svc.db.session() as session:
        request = await ill.get_request(session, request_id)
        recent = await ill.recent_partners(session)
    if request is None or request.state != expected:
        fake = ill.MoveResult(Refusal.STALE if request else Refusal.NOT_FOUND, request, request.state if request else None)
        await answer(update, context, lang=me.lang, alert=True, **_refusal(me.lang, fake))
        if request is not None:
            await _show_card(update, context, request_id, by_edit=True, lang=me.lang)
        return ConversationHandler.END
    await answer(update, context, lang=me.lang)
    context.user_data[PARTNER_FOR] = {"id": request_id, "from": expected.value, "recent": recent}
    text = t(me.lang, "ill.ask_partner", number=request.number, title=escape(request.title[:200]))
    chat = update.effective_chat
    assert chat is not None
    if me.private:
        rows = [[("=" + name[:60], f"illpp:{i}")] for i, name in enumerate(recent)] + [[("common.cancel", "illpc")]]
        await reply(update, context, "ill.ask_partner", buttons=rows, lang=me.lang, number=request.number,
                    title=escape(request.title[:200]))
    else:  # in a group the bot sees only replies to its own messages: ask this staff member for one
        mention = f'<a href="tg://user?id={me.user_id}">{escape(me.name or str(me.user_id))}</a>'
        await context.bot.send_message(
            chat.id, f"{mention}: {text}", parse_mode=ParseMode.HTML, reply_markup=ForceReply(selective=True),
        )
    return PARTNER


async def partner_given(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """The partner library's name, typed."""
    name = ill.clean_text(update.message.text or "", "partner")
    if isinstance(name, Invalid):
        await reply(update, context, f"ill.invalid_{name.code}", **name.params)
        return PARTNER
    return await _partner_done(update, context, name)


async def partner_picked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """A recent partner library, chosen by button."""
    pending = context.user_data.get(PARTNER_FOR) or {}
    index = _request_id(update.callback_query.data)
    recent: Sequence[str] = pending.get("recent") or []
    if index is None or not 0 <= index < len(recent):
        await answer(update, context, "common.stale_button", alert=True)
        return PARTNER
    return await _partner_done(update, context, recent[index])


async def _partner_done(update: Update, context: ContextTypes.DEFAULT_TYPE, partner: str) -> int:
    me = await who(update, context)
    if me.role < Role.STAFF:  # the role may have been withdrawn meanwhile
        context.user_data.pop(PARTNER_FOR, None)
        await reply(update, context, "common.not_allowed", lang=me.lang)
        return ConversationHandler.END
    pending = context.user_data.pop(PARTNER_FOR, None)
    if not pending:
        await reply(update, context, "common.stale_button", lang=me.lang)
        return ConversationHandler.END
    await _apply_move(
        update, context, int(pending["id"]), IllStatus(pending["from"]), IllStatus.REQUESTED, partner=partner,
        by_edit=False,
    )
    return ConversationHandler.END


async def partner_cancelled(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Cancel naming the partner: the request stays as it was."""
    context.user_data.pop(PARTNER_FOR, None)
    await answer(update, context)
    await edit(update, context, "common.cancelled")
    return ConversationHandler.END


QUEUE_FILTERS = ["all", IllStatus.SUBMITTED, IllStatus.IN_REVIEW, IllStatus.REQUESTED, IllStatus.RECEIVED, IllStatus.AVAILABLE]


@requires(Role.STAFF)
async def queue(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/illqueue [status]: open requests, oldest first, with their age."""
    me = await who(update, context)
    wanted = (context.args or ["all"])[0].strip().lower()
    if wanted not in QUEUE_FILTERS:
        await reply(update, context, "ill.queue_bad_status", lang=me.lang, statuses=", ".join(QUEUE_FILTERS))
        return
    await _show_queue(update, context, me, wanted, 0, by_edit=False)


@requires(Role.STAFF)
async def queue_page(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Another page or another status filter of the queue."""
    me = await who(update, context)
    parts = (update.callback_query.data or "").split(":")
    wanted = parts[1] if len(parts) > 1 and parts[1] in QUEUE_FILTERS else "all"
    await answer(update, context, lang=me.lang)
    await _show_queue(update, context, me, wanted, parse_page(update.callback_query.data), by_edit=True)


@requires(Role.STAFF)
async def watch_toggled(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Start or stop hearing of every new request privately."""
    me = await who(update, context)
    on = update.callback_query.data == "illsub:on"
    svc = services(context)
    async with svc.db.session() as session:
        await ill.set_watching(session, me.user_id, on, svc.now())
    await answer(update, context, "ill.watching_on" if on else "ill.watching_off", lang=me.lang)
    await _show_queue(update, context, me, "all", 0, by_edit=True)


async def _show_queue(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, wanted: str, page: int, *, by_edit: bool) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        rows = await ill.open_queue(session, None if wanted == "all" else IllStatus(wanted))
        watching = me.user_id in await ill.watchers(session)
    now = svc.now()
    chunk, nav = paginate(rows, page, 8, f"illq:{wanted}")
    lines = [
        t(me.lang, "ill.queue_line", number=r.number, age=_age(me.lang, r.submitted_at, now),
          status=t(me.lang, f"ill.status_{r.status}"), kind=t(me.lang, f"ill.kind_{r.kind}"), title=escape(r.title[:80]))
        for r in chunk
    ]
    cards = [(f"={r.number}", f"illsv:{r.id}") for r in chunk]
    buttons: list[list[Button]] = [cards[i : i + 2] for i in range(0, len(cards), 2)]
    filters_row = [
        (("=• " if f == wanted else "=") + t(me.lang, f"ill.filter_{f}"), f"illq:{f}:0") for f in QUEUE_FILTERS
    ]
    buttons += [filters_row[:3], filters_row[3:]]
    if nav:
        buttons.append(nav)
    buttons.append([("ill.btn_unwatch", "illsub:off") if watching else ("ill.btn_watch", "illsub:on")])
    key = "ill.queue" if rows else "ill.queue_empty"
    await (edit if by_edit else reply)(
        update, context, key, buttons=buttons, lang=me.lang, count=len(rows),
        filter=t(me.lang, f"ill.filter_{wanted}"), lines="\n".join(lines),
    )


# -------------------------------------------------------------------------------------------------
# Registration


def _form_states() -> dict[object, list[Any]]:
    buttons = [
        CallbackQueryHandler(kind_chosen, pattern=r"^illf:kind:"),
        CallbackQueryHandler(branch_chosen, pattern=r"^illf:branch:"),
        CallbackQueryHandler(copyright_accepted, pattern=r"^illf:accept$"),
        CallbackQueryHandler(skip_pressed, pattern=r"^illf:skip:"),
        CallbackQueryHandler(keep_pressed, pattern=r"^illf:keep:"),
        CallbackQueryHandler(back_pressed, pattern=r"^illf:back:"),
        CallbackQueryHandler(holding_answered, pattern=r"^illf:hold:(go|stop)$"),
        CallbackQueryHandler(edit_pressed, pattern=r"^illf:edit$"),
        CallbackQueryHandler(field_chosen, pattern=r"^illf:editf:"),
        CallbackQueryHandler(summary_again, pattern=r"^illf:sum$"),
        CallbackQueryHandler(submit_pressed, pattern=r"^illf:submit:"),
        CallbackQueryHandler(cancel_pressed, pattern=r"^illf:cancel$"),
        CallbackQueryHandler(stale_in_form, pattern=r"^illf:"),
    ]
    text = filters.TEXT & ~filters.COMMAND
    typed = {
        TITLE: title_given, AUTHOR: author_given, IDENT: ident_given, JOURNAL: journal_given, VOLUME: volume_given,
        ISSUE: issue_given, PAGES: pages_given, PUBLISHER: publisher_given, YEAR: year_given, NEED_BY: need_by_given,
        NOTE: note_given,
    }
    states: dict[object, list[Any]] = {
        step: [MessageHandler(text, handler), *buttons] for step, handler in typed.items()
    }
    for step in (KIND, HOLDING, BRANCH, COPYRIGHT, SUMMARY):  # answered with buttons only
        states[step] = [MessageHandler(text, use_the_buttons), *buttons]
    return states


def register(app: Application) -> None:  # type: ignore[type-arg]
    """The request conversation, the staff's partner question, and every ILL button and command."""
    with warnings.catch_warnings():
        # Button presses are tracked per user and chat, not per message, on purpose: the form is one
        # per person, and each button names its step, so a press on an old message is recognised.
        warnings.filterwarnings("ignore", category=PTBUserWarning)
        app.add_handler(ConversationHandler(
            entry_points=[CommandHandler("ill", ill_start), CallbackQueryHandler(ill_start, pattern=r"^ill:new$")],
            states=_form_states(),
            fallbacks=[*cancel_fallbacks(), MessageHandler(~filters.COMMAND & ~filters.TEXT, not_text)],
            name="ill",
            persistent=True,
            allow_reentry=True,
        ))
        app.add_handler(ConversationHandler(
            entry_points=[CallbackQueryHandler(partner_asked, pattern=r"^illpt:")],
            states={PARTNER: [
                MessageHandler(filters.TEXT & ~filters.COMMAND, partner_given),
                CallbackQueryHandler(partner_picked, pattern=r"^illpp:"),
                CallbackQueryHandler(partner_cancelled, pattern=r"^illpc$"),
            ]},
            fallbacks=[*cancel_fallbacks()],
            name="ill_partner",
            persistent=True,
            allow_reentry=True,
        ))
    app.add_handler(CallbackQueryHandler(submitted_before, pattern=r"^illf:submit:"))
    app.add_handler(CallbackQueryHandler(form_closed, pattern=r"^illf:"))
    app.add_handler(CommandHandler("requests", my_requests))
    app.add_handler(CallbackQueryHandler(requests_page, pattern=r"^illrq:\d+$"))
    app.add_handler(CallbackQueryHandler(cancel_asked, pattern=r"^illcx:"))
    app.add_handler(CallbackQueryHandler(cancel_confirmed, pattern=r"^illcy:"))
    app.add_handler(CallbackQueryHandler(cancel_kept, pattern=r"^illcn$"))
    app.add_handler(CallbackQueryHandler(rate_asked, pattern=r"^illra:"))
    app.add_handler(CallbackQueryHandler(rated, pattern=r"^illrt:"))
    app.add_handler(CommandHandler("illqueue", queue))
    app.add_handler(CallbackQueryHandler(queue_page, pattern=r"^illq:"))
    app.add_handler(CallbackQueryHandler(watch_toggled, pattern=r"^illsub:(on|off)$"))
    app.add_handler(CallbackQueryHandler(card_opened, pattern=r"^ills[vx]:"))
    app.add_handler(CallbackQueryHandler(move_pressed, pattern=r"^illmv:"))
    app.add_handler(CallbackQueryHandler(unfilled_pressed, pattern=r"^illun:"))
    app.add_handler(CallbackQueryHandler(reason_chosen, pattern=r"^illur:"))
