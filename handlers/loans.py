"""Loans, renewals and holds: /loans (with Renew and Renew all buttons), /renew BARCODE|all, /holds
(with Cancel buttons), the "Place hold" button of search results, /settings for due-date reminders,
and the daily notice job.

Everything goes through the circulation interface (``services(context).circulation``, a
``storage.ils.CirculationService``), so the library's own system can stand behind it. Callback data:

- ``renew:<renewals>:<barcode>``: renew one loan; the renewal count shown on the button makes a
  second press answer "already renewed" instead of renewing twice;
- ``renew:all:<unix time of the list>``: renew every loan; loans renewed since the list was shown
  are not renewed again;
- ``loans:show`` (from the daily digest) and ``loans:page:<n>``: the list of loans;
- ``hold:place:<record id>`` (search results), ``hold:at:<record id>:<branch>``, ``hold:cancel:<id>``;
- ``remind:<days>``: the reminder setting.

Every press re-checks who is pressing: the service answers only for the presser's own card, so a
forged button with someone else's barcode or hold id is refused like an unknown one.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from collections.abc import Sequence
from typing import Any

from telegram import Update
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.context import Who, services, who
from bot.i18n import t
from bot.ui import Button, answer, edit, paginate, parse_page, reply
from handlers.account import show_linked_accounts
from storage.ils import (
    AccountFines,
    CirculationService,
    CirculationUnavailable,
    HoldOutcome,
    HoldView,
    LoanView,
    RenewalOutcome,
    RenewalRefused,
)
from storage.notices import REMINDER_CHOICES, reminder_days_of, run_notice_cycle, set_reminder_days

log = logging.getLogger(__name__)

PER_PAGE = 8
MAX_DATA = 64  # Telegram's limit on callback data, in bytes
CATCH_UP_DELAY = 60.0  # seconds after start-up, so the bot answers people first


# --- helpers ----------------------------------------------------------------------------------------


def _circulation(context: ContextTypes.DEFAULT_TYPE) -> CirculationService:
    service = services(context).circulation
    if service is None:
        raise CirculationUnavailable("no circulation service configured")
    circulation: CirculationService = service
    return circulation


def _date(context: ContextTypes.DEFAULT_TYPE, moment: dt.datetime | None) -> str:
    """A due date or deadline as people read it: the date in the library's time zone."""
    return moment.astimezone(services(context).tz).date().isoformat() if moment else "?"


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def _reason(context: ContextTypes.DEFAULT_TYPE, lang: str, outcome: RenewalOutcome) -> str:
    """Why a renewal was refused, with the numbers that explain it."""
    params: dict[str, Any] = {
        **outcome.details,
        "currency": services(context).policy.circulation.currency,
        "due": _date(context, outcome.new_due_at),
    }
    text = t(lang, f"loans.reason_{outcome.reason.value}", **params) if outcome.reason else t(lang, "loans.reason_other")
    if outcome.message:
        text += t(lang, "loans.ils_message", message=_esc(outcome.message))
    return text


def _hint(context: ContextTypes.DEFAULT_TYPE, lang: str, loan: LoanView) -> str:
    if loan.renewable or loan.refusal is None or loan.refusal == RenewalRefused.TOO_EARLY:
        return ""
    refusal = RenewalOutcome(loan.barcode, loan.title, False, None, loan.refusal,
                             details={"renewals": loan.renewals, "max_renewals": loan.max_renewals, **loan.refusal_details})
    return t(lang, "loans.list_item_not_renewable", reason=_reason(context, lang, refusal))


async def _reader(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Who | None:
    """The person when a library card is linked to them (staff too); anyone else is asked to log in."""
    me = await who(update, context)
    if me.reader_id is not None:
        return me
    if update.callback_query is not None:
        await answer(update, context, "common.needs_login", alert=True, lang=me.lang)
    else:
        await reply(update, context, "common.needs_login", lang=me.lang)
    return None


async def _unavailable(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who) -> None:
    log.warning("circulation service unavailable for user %s", me.user_id)
    if update.callback_query is not None:
        await answer(update, context, "common.ils_unavailable", alert=True, lang=me.lang)
    else:
        await reply(update, context, "common.ils_unavailable", lang=me.lang)


# --- /loans -----------------------------------------------------------------------------------------


def _loans_text(context: ContextTypes.DEFAULT_TYPE, lang: str, loans: Sequence[LoanView], first: int, total: int) -> str:
    blocks = [t(lang, "loans.list_header", count=total)]
    for n, loan in enumerate(loans, start=first + 1):
        late = ""
        if loan.overdue_days > 0:
            late = t(lang, "loans.list_item_late", days=loan.overdue_days, fine=f"{loan.currency}{loan.fine}")
        elif loan.fine > 0:  # a fee the library's system charges on a loan that is not overdue
            late = t(lang, "sip2.loan_fine", fine=f"{loan.currency}{loan.fine}")
        blocks.append(
            t(lang, "loans.list_item", n=n, title=_esc(loan.title), barcode=_esc(loan.barcode),
              due=_date(context, loan.due_at), late=late, renewals=loan.renewals,
              max_renewals=loan.max_renewals if loan.max_renewals is not None else "?", hint=_hint(context, lang, loan))
        )
    return "\n\n".join(blocks)


def _loans_buttons(lang: str, loans: Sequence[LoanView], first: int, listed_at: dt.datetime, nav: list[Button]) -> list[list[Button]]:
    renew: list[Button] = []
    for n, loan in enumerate(loans, start=first + 1):
        data = f"renew:{loan.renewals}:{loan.barcode}"
        if loan.renewable and len(data.encode()) <= MAX_DATA:
            renew.append(("=" + t(lang, "loans.btn_renew_n", n=n), data))
    rows: list[list[Button]] = [renew[i : i + 3] for i in range(0, len(renew), 3)]
    if any(loan.renewable for loan in loans):
        rows.append([("loans.btn_renew_all", f"renew:all:{int(listed_at.timestamp())}")])
    if nav:
        rows.append(nav)
    return rows


async def _show_loans(
    update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, page: int, *, replace: bool, answered: bool = False
) -> None:
    assert me.reader_id is not None
    try:
        loans = await _circulation(context).loans(me.reader_id)
        fines = await _circulation(context).fines(me.reader_id)
    except CirculationUnavailable:
        await _unavailable(update, context, me)
        return
    if update.callback_query is not None and not answered:
        await answer(update, context, lang=me.lang)
    if not loans:
        if fines is not None:
            await (edit if replace else reply)(update, context, "loans.text", lang=me.lang,
                                               text=t(me.lang, "loans.none") + _fines_text(me.lang, fines))
            return
        await (edit if replace else reply)(update, context, "loans.none", lang=me.lang)
        return
    chunk, nav = paginate(loans, page, PER_PAGE, "loans:page")
    first = loans.index(chunk[0])
    text = _loans_text(context, me.lang, chunk, first, len(loans)) + _fines_text(me.lang, fines)
    buttons = _loans_buttons(me.lang, chunk, first, services(context).now(), nav)
    # The text is rendered here (a list of loans is several catalogue messages); "=" passes it as is.
    send = edit if replace else reply
    await send(update, context, "loans.text", buttons=buttons, lang=me.lang, text=text)


def _fines_text(lang: str, fines: AccountFines | None) -> str:
    """What the library's system says the reader owes (its fee amount and fine items), or ""."""
    if fines is None:
        return ""
    parts = []
    if fines.total is not None:
        code = len(fines.currency) == 3 and fines.currency.isalpha()  # an ISO code (BH), not a sign
        amount = f"{fines.currency} {fines.total}" if code else f"{fines.currency}{fines.total}"
        parts.append(t(lang, "sip2.fines_total", amount=_esc(amount)))
    if fines.items:
        parts.append(t(lang, "sip2.fines_items", items=_esc("; ".join(fines.items))))
    return "\n\n" + "\n".join(parts) if parts else ""


async def loans_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/loans: every loan with its due date, days overdue and fine, a Renew button each and Renew all."""
    if (me := await _reader(update, context)) is not None:
        await _show_loans(update, context, me, 0, replace=False)


async def loans_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``loans:show`` (the digest's button: a new list) or ``loans:page:<n>`` (turn the page)."""
    if (me := await _reader(update, context)) is None:
        return
    data = update.callback_query.data if update.callback_query else ""
    if data == "loans:show":
        await _show_loans(update, context, me, 0, replace=False)
    else:
        await _show_loans(update, context, me, parse_page(data), replace=True)


# --- renewals -----------------------------------------------------------------------------------------


async def _say_renewal(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, outcome: RenewalOutcome) -> None:
    if outcome.ok:
        await reply(update, context, "loans.renewed", lang=me.lang, title=_esc(outcome.title),
                    barcode=_esc(outcome.barcode), due=_date(context, outcome.new_due_at))
    elif outcome.title:
        await reply(update, context, "loans.refused", lang=me.lang, title=_esc(outcome.title),
                    barcode=_esc(outcome.barcode), reason=_reason(context, me.lang, outcome))
    else:
        await reply(update, context, "loans.refused_unknown", lang=me.lang, barcode=_esc(outcome.barcode[:64]),
                    reason=_reason(context, me.lang, outcome))


async def _say_summary(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, outcomes: list[RenewalOutcome]) -> None:
    if not outcomes:
        await reply(update, context, "loans.none", lang=me.lang)
        return
    if all(not o.barcode for o in outcomes):  # the library's system refused renew all as a whole
        await reply(update, context, "sip2.renew_all_refused", lang=me.lang, reason=_reason(context, me.lang, outcomes[0]))
        return
    lines = [t(me.lang, "loans.summary_header", ok=sum(o.ok for o in outcomes), total=len(outcomes))]
    for o in outcomes:
        if o.ok:
            lines.append(t(me.lang, "loans.summary_ok", title=_esc(o.title), barcode=_esc(o.barcode), due=_date(context, o.new_due_at)))
        else:
            lines.append(t(me.lang, "loans.summary_refused", title=_esc(o.title), barcode=_esc(o.barcode),
                           reason=_reason(context, me.lang, o)))
    await reply(update, context, "loans.text", lang=me.lang, text="\n".join(lines))


async def renew_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A Renew (``renew:<renewals>:<barcode>``) or Renew all (``renew:all:<time>``) button."""
    me = await _reader(update, context)
    if me is None or me.reader_id is None or update.callback_query is None:
        return
    _, kind, rest = ((update.callback_query.data or "").split(":", 2) + ["", ""])[:3]
    try:
        if kind == "all":
            listed_at = dt.datetime.fromtimestamp(int(rest), dt.UTC) if rest.isdigit() else None
            outcomes = await _circulation(context).renew_all(me.reader_id, listed_at=listed_at)
            await answer(update, context, lang=me.lang)
            await _say_summary(update, context, me, outcomes)
            # the list the button was under shows the new due dates (and no Renew for what cannot be)
            await _show_loans(update, context, me, 0, replace=True, answered=True)
            return
        if not kind.isdigit() or not rest:
            await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
            return
        outcome = await _circulation(context).renew(me.reader_id, rest, expected_renewals=int(kind))
    except CirculationUnavailable:
        await _unavailable(update, context, me)
        return
    await answer(update, context, lang=me.lang)
    await _say_renewal(update, context, me, outcome)


async def renew_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/renew BARCODE or /renew all, without buttons."""
    me = await _reader(update, context)
    if me is None or me.reader_id is None:
        return
    args = context.args or []
    if len(args) != 1:
        await reply(update, context, "loans.renew_usage", lang=me.lang)
        return
    try:
        if args[0].lower() in ("all", "全部"):
            await _say_summary(update, context, me, await _circulation(context).renew_all(me.reader_id))
        else:
            await _say_renewal(update, context, me, await _circulation(context).renew(me.reader_id, args[0][:64]))
    except CirculationUnavailable:
        await _unavailable(update, context, me)


# --- holds --------------------------------------------------------------------------------------------


def _holds_text(context: ContextTypes.DEFAULT_TYPE, lang: str, holds: Sequence[HoldView]) -> str:
    blocks = [t(lang, "loans.holds_header", count=len(holds))]
    for n, hold in enumerate(holds, start=1):
        if hold.status == "ready":
            blocks.append(t(lang, "loans.hold_ready", n=n, title=_esc(hold.title), pickup=hold.pickup,
                            deadline=_date(context, hold.expires_at)))
        else:
            blocks.append(t(lang, "loans.hold_waiting", n=n, title=_esc(hold.title), position=hold.position,
                            queue=hold.queue_length, pickup=hold.pickup))
    return "\n\n".join(blocks)


async def _show_holds(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, *, replace: bool) -> None:
    assert me.reader_id is not None
    holds = await _circulation(context).holds(me.reader_id)
    send = edit if replace else reply
    if not holds:
        await send(update, context, "loans.holds_none", lang=me.lang)
        return
    cancel: list[Button] = [
        ("=" + t(me.lang, "loans.btn_cancel_hold_n", n=n), f"hold:cancel:{h.hold_id}")
        for n, h in enumerate(holds, start=1)
        if len(f"hold:cancel:{h.hold_id}".encode()) <= MAX_DATA
    ]
    rows = [cancel[i : i + 3] for i in range(0, len(cancel), 3)]
    await send(update, context, "loans.text", buttons=rows, lang=me.lang, text=_holds_text(context, me.lang, holds))


async def holds_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/holds: each hold with its place in the queue (or its pick-up deadline) and a Cancel button."""
    me = await _reader(update, context)
    if me is None:
        return
    try:
        await _show_holds(update, context, me, replace=False)
    except CirculationUnavailable:
        await _unavailable(update, context, me)


async def _say_hold(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, outcome: HoldOutcome, *, replace: bool) -> None:
    send = edit if replace else reply
    if outcome.ok:
        await send(update, context, "loans.hold_placed", lang=me.lang, title=_esc(outcome.title), position=outcome.position)
        return
    reason = t(me.lang, f"loans.hold_reason_{outcome.refused.value}") if outcome.refused else t(me.lang, "loans.hold_reason_other")
    if outcome.message:
        reason += t(me.lang, "loans.ils_message", message=_esc(outcome.message))
    if outcome.title:
        await send(update, context, "loans.hold_refused", lang=me.lang, title=_esc(outcome.title), reason=reason)
    else:
        await send(update, context, "loans.hold_refused_plain", lang=me.lang, reason=reason)


async def hold_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``hold:place:<record>`` (from a search result), ``hold:at:<record>:<branch>`` (the pick-up
    branch chosen) or ``hold:cancel:<hold id>`` (from /holds)."""
    me = await _reader(update, context)
    if me is None or me.reader_id is None or update.callback_query is None:
        return
    parts = (update.callback_query.data or "").split(":")
    action = parts[1] if len(parts) > 1 else ""
    svc = services(context)
    try:
        if action == "cancel" and len(parts) == 3:
            if await _circulation(context).cancel_hold(me.reader_id, parts[2]):
                await answer(update, context, "loans.hold_cancelled", lang=me.lang)
                await _show_holds(update, context, me, replace=True)
            else:
                await answer(update, context, "loans.hold_not_found", alert=True, lang=me.lang)
            return
        if action in ("place", "at") and len(parts) >= 3 and parts[2].isdigit():
            record_id = int(parts[2])
            branches = svc.policy.library.branches
            if action == "place" and len(branches) > 1:
                rows = [[("=" + (b.name_zh if me.lang == "zh" else b.name_en), f"hold:at:{record_id}:{b.code}")] for b in branches]
                await answer(update, context, lang=me.lang)
                await reply(update, context, "loans.choose_branch", buttons=rows, lang=me.lang)
                return
            branch = parts[3] if action == "at" and len(parts) == 4 else None
            outcome = await _circulation(context).place_hold(me.reader_id, record_id, pickup_branch=branch)
            await answer(update, context, lang=me.lang)
            await _say_hold(update, context, me, outcome, replace=action == "at")
            return
    except CirculationUnavailable:
        await _unavailable(update, context, me)
        return
    await answer(update, context, "common.stale_button", alert=True, lang=me.lang)


# --- /settings -----------------------------------------------------------------------------------------


def _reminder_label(lang: str, days: int) -> str:
    if days == 0:
        return t(lang, "loans.settings_off")
    return t(lang, "loans.settings_day") if days == 1 else t(lang, "loans.settings_days", days=days)


def _reminder_buttons() -> list[list[Button]]:
    keys = {0: "loans.btn_settings_off", 1: "loans.btn_settings_1", 3: "loans.btn_settings_3", 7: "loans.btn_settings_7"}
    return [[(keys[d], f"remind:{d}") for d in REMINDER_CHOICES]]


async def settings_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/settings: how many days before the due date reminders come (off, 1, 3 or 7)."""
    me = await who(update, context)
    async with services(context).db.session() as session:
        days = await reminder_days_of(session, me.user_id)
    buttons = [*_reminder_buttons(), [("events.btn_subscriptions", "ev:subs")]]  # event news by category (#17)
    await reply(update, context, "loans.settings", buttons=buttons, lang=me.lang,
                current=_reminder_label(me.lang, days))
    await show_linked_accounts(update, context)  # and who else holds the card, each with Unlink


async def remind_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``remind:<days>``: save the reminder choice (anything not offered is a forged button)."""
    me = await who(update, context)
    value = (update.callback_query.data or "").split(":")[-1] if update.callback_query else ""
    days = int(value) if value.isdigit() else -1
    async with services(context).db.session() as session:
        saved = await set_reminder_days(session, me.user_id, days)
    if not saved:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    await edit(update, context, "loans.settings_saved", lang=me.lang, current=_reminder_label(me.lang, days))


# --- the daily notices ---------------------------------------------------------------------------------


async def daily_notices(context: ContextTypes.DEFAULT_TYPE) -> None:
    """The morning job: queue today's digests (the outbox makes a second run a no-op)."""
    svc = services(context)
    now = svc.now()
    report = await run_notice_cycle(
        svc.db, svc.policy, now.astimezone(svc.tz).date(), svc.tz,
        render=t, staff_chat_id=svc.settings.staff_chat_id, now=now,
    )
    log.info("daily notices: %s", "; ".join(line.strip() for line in report.lines()[1:]))


def register(app: Application) -> None:  # type: ignore[type-arg]
    """/loans, /renew, /holds, /settings, the renew, hold and reminder buttons, the daily notice job."""
    svc = services(app)
    app.add_handler(CommandHandler("loans", loans_command))
    app.add_handler(CommandHandler("renew", renew_command))
    app.add_handler(CommandHandler("holds", holds_command))
    app.add_handler(CommandHandler("settings", settings_command))
    app.add_handler(CallbackQueryHandler(loans_pressed, pattern=r"^loans:"))
    app.add_handler(CallbackQueryHandler(renew_pressed, pattern=r"^renew:"))
    app.add_handler(CallbackQueryHandler(hold_pressed, pattern=r"^hold:"))
    app.add_handler(CallbackQueryHandler(remind_pressed, pattern=r"^remind:"))
    if app.job_queue is not None:
        at = svc.policy.notices.time.replace(tzinfo=svc.tz)
        app.job_queue.run_daily(daily_notices, time=at, name="daily-notices")
        if svc.now().astimezone(svc.tz).time() >= svc.policy.notices.time:
            # Started after today's notice time (a restart, a deploy): catch up once. Idempotent, so
            # a day whose notices were already queued gets nothing twice.
            app.job_queue.run_once(daily_notices, when=CATCH_UP_DELAY, name="daily-notices-catch-up")
