"""Interlibrary loan with partner libraries over ISO 18626 (合作馆), the staff's side.

Borrowing: "Send to partners" on a request's card (callback ``illsp``) sends it to the first partner
of the rota; "Returned to partner" (``illrp``) tells the lending partner the book is on its way back.
Lending: a partner's request reaches the staff chat with Will supply / Loaned / Unfilled… buttons
(``illlw``, ``illll``, ``illlu`` → ``illlr`` with the reason, ``illlc`` when the book is back);
``/illlending`` lists the lending requests still open. Every button re-checks the role.
"""

from __future__ import annotations

from typing import Any

from telegram import Update
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.context import services, who
from bot.i18n import localise, t
from bot.ill_exchange import identity_for, wake_exchange
from bot.roles import requires
from bot.ui import Button, answer, edit, reply
from handlers.ill import _show_card
from storage import ill_exchange
from storage.ill import IllStatus
from storage.ill_exchange import LendingRequest
from storage.people import Role


def _parts(data: str | None) -> list[str]:
    return (data or "").split(":")


@requires(Role.STAFF)
async def send_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Send to partners: the request goes to the first partner library not asked before."""
    me = await who(update, context)
    svc = services(context)
    parts = _parts(update.callback_query.data)
    identity = identity_for(svc)
    try:
        request_id, expected = int(parts[1]), IllStatus(parts[2])
    except (IndexError, ValueError):
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    if identity is None:
        await answer(update, context, "ill_partners.refused_no_partners", alert=True, lang=me.lang)
        return
    async with svc.db.session() as session:
        result = await ill_exchange.send_to_partners(
            session, request_id, actor=me.user_id, expected=expected, identity=identity, now=svc.now()
        )
    if not result.ok:
        await answer(update, context, f"ill_partners.refused_{result.refusal}", alert=True, lang=me.lang)
    else:
        wake_exchange(context.bot_data)
        partner = localise(me.lang, ill_exchange.partner_label(result.partner))
        await answer(update, context, "ill_partners.sent", lang=me.lang, partner=partner)
    if result.request is not None:
        await _show_card(update, context, request_id, by_edit=True, lang=me.lang)


@requires(Role.STAFF)
async def returned_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Returned to partner: ShippedReturn goes to the library that lent the book."""
    me = await who(update, context)
    svc = services(context)
    parts = _parts(update.callback_query.data)
    identity = identity_for(svc)
    if len(parts) < 2 or not parts[1].isdigit() or identity is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    request_id = int(parts[1])
    async with svc.db.session() as session:
        refusal = await ill_exchange.return_to_partner(session, request_id, identity, svc.now())
    if refusal is not None:
        await answer(update, context, f"ill_partners.refused_{refusal}", alert=True, lang=me.lang)
        return
    wake_exchange(context.bot_data)
    await answer(update, context, "ill_partners.returned_sent", lang=me.lang)
    await _show_card(update, context, request_id, by_edit=True, lang=me.lang)


# -------------------------------------------------------------------------------------------------
# Lending


def _lending_card(lang: str, lending: LendingRequest, policy: Any) -> dict[str, Any]:
    params = ill_exchange.lending_params(lending, policy)
    params["state_name"] = t(lang, f"ill_partners.lend_state_{lending.state}")
    params["kind"] = localise(lang, params["kind"])
    params["partner"] = localise(lang, params["partner"])
    return params


async def _show_lending(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str, lending_id: int) -> None:
    svc = services(context)
    async with svc.db.session() as session:
        lending = await ill_exchange.get_lending(session, lending_id)
    if lending is None:
        return
    rows: list[list[Button]] = [[(label, data) for label, data in row] for row in ill_exchange.lending_buttons(lending)]
    await edit(update, context, "ill_partners.staff_lending", buttons=rows, lang=lang,
               **_lending_card(lang, lending, svc.policy))


async def _answer_lending(update: Update, context: ContextTypes.DEFAULT_TYPE, target: str, reason: str = "") -> None:
    me = await who(update, context)
    svc = services(context)
    parts = _parts(update.callback_query.data)
    identity = identity_for(svc)
    if len(parts) < 3 or not parts[1].isdigit() or identity is None:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    lending_id = int(parts[1])
    async with svc.db.session() as session:
        result = await ill_exchange.answer_lending(
            session, lending_id, target, actor=me.user_id, expected=parts[2], identity=identity, now=svc.now(),
            reason=reason,
        )
    if not result.ok:
        await answer(update, context, f"ill_partners.refused_{result.refusal}", alert=True, lang=me.lang)
    else:
        wake_exchange(context.bot_data)
        await answer(update, context, "ill_partners.lend_answered", lang=me.lang)
    await _show_lending(update, context, me.lang, lending_id)


@requires(Role.STAFF)
async def will_supply_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Will supply: WillSupply to the partner."""
    await _answer_lending(update, context, "will_supply")


@requires(Role.STAFF)
async def loaned_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Loaned (or the copy sent): Loaned / CopyCompleted to the partner."""
    await _answer_lending(update, context, "loaned")


@requires(Role.STAFF)
async def completed_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The lent book is back: LoanCompleted to the partner."""
    await _answer_lending(update, context, "completed")


@requires(Role.STAFF)
async def lend_unfilled_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Unfilled…: choose the reason the partner is given."""
    me = await who(update, context)
    parts = _parts(update.callback_query.data)
    if len(parts) < 3 or not parts[1].isdigit():
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    await answer(update, context, lang=me.lang)
    rows: list[list[Button]] = [
        [(f"ill_partners.lend_reason_{reason}", f"illlr:{parts[1]}:{parts[2]}:{reason}")]
        for reason in ill_exchange.LENDING_REASONS
    ]
    await edit(update, context, "ill_partners.choose_lend_reason", buttons=rows, lang=me.lang,
               number=f"LEND-{int(parts[1]):06d}")


@requires(Role.STAFF)
async def lend_reason_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The reason chosen: Unfilled with that reason to the partner."""
    parts = _parts(update.callback_query.data)
    reason = parts[3] if len(parts) > 3 else ""
    await _answer_lending(update, context, "unfilled", reason)


@requires(Role.STAFF)
async def lending_list(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/illlending: the partners' requests still open, each with its buttons."""
    me = await who(update, context)
    svc = services(context)
    async with svc.db.session() as session:
        waiting = await ill_exchange.lending_queue(session)
    if not waiting:
        await reply(update, context, "ill_partners.lending_queue_empty", lang=me.lang)
        return
    await reply(update, context, "ill_partners.lending_queue_title", lang=me.lang, count=len(waiting))
    for lending in waiting[:20]:
        rows: list[list[Button]] = [[(label, data) for label, data in row] for row in ill_exchange.lending_buttons(lending)]
        await reply(update, context, "ill_partners.staff_lending", buttons=rows, lang=me.lang,
                    **_lending_card(me.lang, lending, svc.policy))


def register(app: Application) -> None:  # type: ignore[type-arg]
    """The partner buttons on request cards and lending requests, and /illlending."""
    app.add_handler(CallbackQueryHandler(send_pressed, pattern=r"^illsp:"))
    app.add_handler(CallbackQueryHandler(returned_pressed, pattern=r"^illrp:"))
    app.add_handler(CallbackQueryHandler(will_supply_pressed, pattern=r"^illlw:"))
    app.add_handler(CallbackQueryHandler(loaned_pressed, pattern=r"^illll:"))
    app.add_handler(CallbackQueryHandler(lend_unfilled_pressed, pattern=r"^illlu:"))
    app.add_handler(CallbackQueryHandler(lend_reason_chosen, pattern=r"^illlr:"))
    app.add_handler(CallbackQueryHandler(completed_pressed, pattern=r"^illlc:"))
    app.add_handler(CommandHandler("illlending", lending_list))
