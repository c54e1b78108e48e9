"""Getting started and the account: /start (and staff invites), /help, /language, /login, /logout,
/privacy, /forgetme, /hours and /cancel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from telegram import Update
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

from bot.commands import set_personal_menu
from bot.context import services, who
from bot.i18n import t
from bot.ui import answer, edit, escape, reply
from storage.ils import CirculationUnavailable
from storage.people import (
    LOCK_DURATION,
    InviteOutcome,
    LoginOutcome,
    Role,
    linked_accounts,
    login,
    logout,
    masked_card,
    reader_of,
    redeem_invite,
    unlink_account,
)
from storage.privacy import forget_person

log = logging.getLogger(__name__)

CARD, PIN = "login:card", "login:pin"
INVITE_PREFIX = "inv_"


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Welcome the person; a deep link ``/start inv_<code>`` redeems a staff invite."""
    me = await who(update, context)
    if context.args and context.args[0].startswith(INVITE_PREFIX):
        await _redeem(update, context, context.args[0][len(INVITE_PREFIX) :])
        return
    key = "account.welcome_reader" if me.role >= Role.READER else "account.welcome"
    await reply(update, context, key, lang=me.lang, name=escape(update.effective_user.first_name or ""))


async def _redeem(update: Update, context: ContextTypes.DEFAULT_TYPE, code: str) -> None:
    me = await who(update, context)
    if not me.private:  # roles are granted in private chats only, never through a group
        await reply(update, context, "account.invite_private_only", lang=me.lang)
        return
    svc = services(context)
    async with svc.db.session() as session:
        outcome, role = await redeem_invite(session, code, me.user_id, me.name, svc.now())
    if outcome is InviteOutcome.INVALID or role is None:
        await reply(update, context, "account.invite_invalid", lang=me.lang)
        return
    log.info("user %s joined the staff as %s through an invite", me.user_id, role.label)
    await set_personal_menu(context.application, me.user_id, role)
    await reply(update, context, "account.invite_granted", lang=me.lang, role=_role_name(me.lang, role))


def _role_name(lang: str, role: Role) -> str:
    from bot.i18n import t

    return t(lang, f"account.role_{role.label}")


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """List what the person can do, by role."""
    me = await who(update, context)
    await reply(update, context, "account.help", lang=me.lang)
    if me.role >= Role.STAFF:
        await reply(update, context, "account.help_staff", lang=me.lang)
    if me.role >= Role.DUTY_OFFICER:
        await reply(update, context, "account.help_duty", lang=me.lang)


async def language(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Offer the two languages as buttons."""
    await reply(update, context, "account.choose_language", buttons=[[("=中文", "lang:zh"), ("=English", "lang:en")]])


async def language_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Remember the chosen language and answer in it."""
    choice = (update.callback_query.data or "").removeprefix("lang:")
    if choice not in ("zh", "en"):
        await answer(update, context, "common.stale_button", alert=True)
        return
    svc = services(context)
    me = await who(update, context)
    from storage.people import User

    async with svc.db.session() as session:
        user = await session.get(User, me.user_id)
        if user is not None:
            user.language = choice
    await answer(update, context, lang=choice)
    await edit(update, context, "account.language_set", lang=choice)
    if me.role >= Role.STAFF:
        await set_personal_menu(context.application, me.user_id, me.role)


async def login_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """/login: with card and PIN in one message, log in at once; otherwise ask for the card.

    A reader whose chat is already linked is told which card, and may link another one."""
    me = await who(update, context)
    args = context.args or []
    context.user_data.pop("login_card", None)
    if len(args) >= 2:
        await _delete_pin_message(update, context)
        return await _try_login(update, context, args[0], args[1])
    if me.reader_id is not None:
        async with services(context).db.session() as session:
            linked = await reader_of(session, me.user_id)
        if linked is not None:
            await reply(update, context, "account.already_linked", lang=me.lang,
                        card=escape(masked_card(linked.card_number)), name=escape(linked.name))
    if len(args) == 1:
        context.user_data["login_card"] = args[0][:64]
        await reply(update, context, "account.ask_pin", lang=me.lang)
        return PIN
    await reply(update, context, "account.ask_card", lang=me.lang)
    return CARD


async def login_card(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Keep the card number and ask for the PIN. The message is deleted like the PIN's: what is
    typed in a login step is never left in the chat (some type the card and the PIN together)."""
    await _delete_pin_message(update, context)
    words = (update.message.text or "").split()
    if len(words) >= 2:
        return await _try_login(update, context, words[0], words[1])
    context.user_data["login_card"] = (words[0] if words else "")[:64]
    await reply(update, context, "account.ask_pin")
    return PIN


async def login_pin(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str | int:
    """Check the PIN (the message holding it is deleted first). A wrong PIN asks for it again,
    until the lockout; the card number is forgotten once the login ends."""
    await _delete_pin_message(update, context)
    card = context.user_data.get("login_card", "")
    return await _try_login(update, context, card, (update.message.text or "").strip())


async def login_interrupted(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Another command in the middle of the login: the login ends, and the command runs as it would
    have outside it (python-telegram-bot hands an update to one handler per group, so the
    conversation passes it on to the first other handler of its group that takes it)."""
    context.user_data.pop("login_card", None)
    app = context.application
    # Only the login's own group: the groups before it already ran, the ones after it still will.
    group = next(g for g, handlers in app.handlers.items() if any(_is_login(h) for h in handlers))
    for handler in app.handlers[group]:
        if _is_login(handler):
            continue
        check = handler.check_update(update)
        if check is not None and check is not False:
            await handler.handle_update(update, app, check, context)
            break
    return ConversationHandler.END


def _is_login(handler: object) -> bool:
    return isinstance(handler, ConversationHandler) and handler.name == "login"


async def not_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A sticker, photo or file where a card number or PIN was expected."""
    await reply(update, context, "common.text_expected")


async def _delete_pin_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    try:
        await update.effective_message.delete()
    except TelegramError:  # in a group the bot may lack the right; it still logs in
        log.info("could not delete a message holding a PIN")


async def _try_login(update: Update, context: ContextTypes.DEFAULT_TYPE, card: str, pin: str) -> str | int:
    """Try the card and PIN, answer, and return the login's next step: the PIN again after a wrong
    one (while attempts are left) or when the library system could not be asked, else the end."""
    svc = services(context)
    me = await who(update, context)
    verify: Callable[[], Awaitable[bool]] | None = None
    circulation = svc.circulation
    if circulation is not None and svc.settings.ils != "local":
        # The library's own system decides whether the PIN is right (SIP2: 63 → CQ); the lockout
        # stays ours, and the system is asked only once the attempt is counted.
        async def check() -> bool:
            return (await circulation.check_card(card, pin)).valid

        verify = check

    context.user_data["login_card"] = card.strip()[:64]
    try:
        async with svc.db.session() as session:
            result = await login(session, me.user_id, card, pin, svc.now(), verify=verify, tz=svc.tz)
    except CirculationUnavailable:
        await reply(update, context, "common.ils_unavailable", lang=me.lang)
        return PIN
    context.user_data.pop("login_card", None)
    if result.outcome is LoginOutcome.OK and result.reader is not None:
        log.info("user %s linked a card", me.user_id)
        await reply(update, context, "account.login_ok", lang=me.lang, name=escape(result.reader.name))
    elif result.outcome is LoginOutcome.CARD_EXPIRED and result.reader is not None:
        await reply(update, context, "account.login_expired", lang=me.lang, name=escape(result.reader.name))
    elif result.outcome is LoginOutcome.LOCKED or result.locked_until is not None:
        # a wrong PIN that used up the last attempt says both; a login refused while locked, only the lock
        key = "account.login_locked" if result.outcome is LoginOutcome.LOCKED else "account.login_failed_locked"
        until = result.locked_until or svc.now() + LOCK_DURATION
        await reply(update, context, key, lang=me.lang, until=until.astimezone(svc.tz).strftime("%H:%M"))
    else:
        context.user_data["login_card"] = card.strip()[:64]
        await reply(update, context, "account.login_failed", lang=me.lang)
        return PIN
    return ConversationHandler.END


async def logout_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Unlink the card."""
    svc = services(context)
    me = await who(update, context)
    async with svc.db.session() as session:
        done = await logout(session, me.user_id)
    await reply(update, context, "account.logout_ok" if done else "account.not_logged_in", lang=me.lang)


# --- the accounts linked to one's card (shown by /settings, and by the alert of a new link) ----------


async def show_linked_accounts(update: Update, context: ContextTypes.DEFAULT_TYPE, *, replace: bool = False) -> None:
    """List the Telegram accounts linked to the person's card, each other one with an Unlink button."""
    me = await who(update, context)
    async with services(context).db.session() as session:
        reader = await reader_of(session, me.user_id)
        users = await linked_accounts(session, me.user_id)
    if reader is None:
        if replace:
            await edit(update, context, "account.not_logged_in", lang=me.lang)
        return
    from bot.i18n import t

    lines, buttons = [], []
    for user in users:
        name, tail = user.first_name or "—", str(user.telegram_id)[-4:]
        key = "account.linked_account_you" if user.telegram_id == me.user_id else "account.linked_account_line"
        lines.append(t(me.lang, key, name=escape(name), tail=tail))
        if user.telegram_id != me.user_id:
            buttons.append([("=" + t(me.lang, "account.btn_unlink", name=name[:24], tail=tail), f"unlink:{user.telegram_id}")])
    params = {"card": escape(masked_card(reader.card_number)), "lines": "\n".join(lines)}
    if replace:
        await edit(update, context, "account.linked_accounts", buttons=buttons, lang=me.lang, **params)
    else:
        await reply(update, context, "account.linked_accounts", buttons=buttons, lang=me.lang, **params)


async def linked_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``linked:list`` (the button of the new-link alert): show the linked accounts."""
    me = await who(update, context)
    await answer(update, context, lang=me.lang)
    await show_linked_accounts(update, context)


async def unlink_pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``unlink:<telegram id>``: unlink that account, when it holds the same card as the one pressing."""
    me = await who(update, context)
    value = (update.callback_query.data or "").removeprefix("unlink:")
    async with services(context).db.session() as session:
        done = value.isdigit() and await unlink_account(session, me.user_id, int(value))
    if not done:
        await answer(update, context, "common.stale_button", alert=True, lang=me.lang)
        return
    log.info("user %s unlinked another account from their card", me.user_id)
    await answer(update, context, "account.unlinked", lang=me.lang)
    await show_linked_accounts(update, context, replace=True)


async def privacy(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """What the bot stores about the person, and how to erase it."""
    svc = services(context)
    me = await who(update, context)
    async with svc.db.session() as session:
        reader = await reader_of(session, me.user_id)
    card = escape(reader.card_number) if reader else "—"
    await reply(update, context, "account.privacy", lang=me.lang, card=card, days=svc.policy.circulation.loan_history_days)


async def forgetme(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Ask for confirmation before erasing everything."""
    await reply(update, context, "account.forget_confirm", buttons=[[("account.forget_yes", "forget:yes"), ("account.forget_no", "forget:no")]])


async def forget_confirmed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Erase the person's data (or leave it, when they said no)."""
    me = await who(update, context)
    if update.callback_query.data != "forget:yes":
        await answer(update, context, lang=me.lang)
        await edit(update, context, "account.forget_kept", lang=me.lang)
        return
    async with services(context).db.session() as session:
        await forget_person(session, me.user_id)
    context.application.drop_user_data(me.user_id)
    context.application.drop_chat_data(me.chat_id)
    _end_conversations(context.application, me.user_id)
    log.info("user %s erased their data", me.user_id)
    await answer(update, context, lang=me.lang)
    await edit(update, context, "account.forget_done", lang=me.lang)


def _end_conversations(app: Application, user_id: int) -> None:  # type: ignore[type-arg]
    """End every conversation the person is in, so that a step typed after /forgetme does not store
    again what was just erased. python-telegram-bot has no public way to end a conversation from
    outside it; its state dict is the one it persists, so the deletion is saved as well."""
    for handlers in app.handlers.values():
        for handler in handlers:
            if isinstance(handler, ConversationHandler):
                for key in [k for k in handler._conversations if user_id in k]:
                    del handler._conversations[key]


async def hours(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Opening hours, address and contact, from the policy file."""
    me = await who(update, context)
    library = services(context).policy.library
    zh = me.lang == "zh"
    lines = "\n".join("• " + t(me.lang, "common.label_value", label=d.days_zh if zh else d.days_en, value=d.hours)
                      for d in library.hours)
    await reply(
        update, context, "account.hours", lang=me.lang,
        library=escape(library.name_zh if zh else library.name_en),
        lines=escape(lines),
        note=escape(library.hours_note_zh if zh else library.hours_note_en),
        address=escape(library.address_zh if zh else library.address_en),
        phone=escape(library.phone), email=escape(library.email), website=escape(library.website),
    )


async def cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    """Leave whatever conversation is going on; the fallback of every conversation."""
    context.user_data.pop("login_card", None)
    await reply(update, context, "common.cancelled")
    return ConversationHandler.END


async def nothing_to_cancel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/cancel outside any conversation."""
    await reply(update, context, "common.nothing_to_cancel")


def cancel_fallbacks() -> list[CommandHandler]:  # type: ignore[type-arg]
    """The /cancel fallback every conversation shares."""
    return [CommandHandler("cancel", cancel)]


def register(app: Application) -> None:  # type: ignore[type-arg]
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("login", login_start)],
            states={
                CARD: [MessageHandler(filters.TEXT & ~filters.COMMAND, login_card)],
                PIN: [MessageHandler(filters.TEXT & ~filters.COMMAND, login_pin)],
            },
            fallbacks=[
                *cancel_fallbacks(),
                MessageHandler(~filters.COMMAND & ~filters.TEXT, not_text),
                MessageHandler(filters.COMMAND, login_interrupted),
            ],
            name="login",
            persistent=True,
            allow_reentry=True,  # /login again starts over (with another card number)
        )
    )
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("help", help_command))
    app.add_handler(CommandHandler("language", language))
    app.add_handler(CallbackQueryHandler(language_chosen, pattern=r"^lang:"))
    app.add_handler(CommandHandler("logout", logout_command))
    app.add_handler(CommandHandler("privacy", privacy))
    app.add_handler(CommandHandler("forgetme", forgetme))
    app.add_handler(CallbackQueryHandler(forget_confirmed, pattern=r"^forget:"))
    app.add_handler(CommandHandler("hours", hours))
    app.add_handler(CallbackQueryHandler(linked_pressed, pattern=r"^linked:list$"))
    app.add_handler(CallbackQueryHandler(unlink_pressed, pattern=r"^unlink:"))


def register_last(app: Application) -> None:  # type: ignore[type-arg]
    """Handlers that must come after every feature: /cancel with nothing to cancel, unknown commands."""
    app.add_handler(CommandHandler("cancel", nothing_to_cancel))
    app.add_handler(CallbackQueryHandler(noop, pattern=r"^noop$"))
    app.add_handler(MessageHandler(filters.COMMAND, unknown_command))
    app.add_handler(CallbackQueryHandler(stale_button))
    app.add_handler(MessageHandler(~filters.COMMAND & ~filters.TEXT & filters.ChatType.PRIVATE, not_text))


async def unknown_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A command the bot does not know."""
    await reply(update, context, "common.unknown_command")


async def noop(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button that only shows information (such as a page number)."""
    await answer(update, context)


async def stale_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A button press nobody handles: old, or forged."""
    await answer(update, context, "common.stale_button", alert=True)
