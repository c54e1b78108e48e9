"""The command menu (``set_my_commands``), per language and per role scope."""

from __future__ import annotations

import logging

from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeDefault
from telegram.error import TelegramError
from telegram.ext import Application

from bot.i18n import LANGUAGES, t
from storage.people import Role

log = logging.getLogger(__name__)

READER_COMMANDS = [
    "search", "loans", "renew", "holds", "ill", "requests", "ask", "end", "complain", "tickets",
    "report", "events", "myevents", "hours", "settings", "language", "login", "logout", "privacy", "forgetme", "help", "cancel",
]
STAFF_COMMANDS = ["overdue", "illqueue", "illlending", "tickets", "stats", "checkin", "desk", "end", "survey", "myratings"]
DUTY_COMMANDS = ["emergency", "drill", "allclear", "incidents"]
ADMIN_COMMANDS = ["quality"]  # service quality (#18)


def commands_for(role: Role) -> list[str]:
    """The commands a person with ``role`` sees in the menu, in menu order."""
    names = list(READER_COMMANDS)
    if role >= Role.STAFF:
        names = [c for c in STAFF_COMMANDS] + [c for c in names if c not in STAFF_COMMANDS]
    if role >= Role.DUTY_OFFICER:
        names = DUTY_COMMANDS + names
    if role >= Role.ADMIN:
        names = ADMIN_COMMANDS + names
    return names


def _menu(lang: str, role: Role) -> list[BotCommand]:
    return [BotCommand(name, t(lang, f"commands.{name}")[:256]) for name in commands_for(role)]


async def set_default_menu(app: Application) -> None:  # type: ignore[type-arg]
    """The menu everyone sees, in each language (and the default language for the rest)."""
    default = app.bot_data["services"].default_language
    await app.bot.set_my_commands(_menu(default, Role.READER), scope=BotCommandScopeDefault())
    for lang in LANGUAGES:
        await app.bot.set_my_commands(_menu(lang, Role.READER), scope=BotCommandScopeDefault(), language_code=lang)


async def set_personal_menu(app: Application, telegram_id: int, role: Role) -> None:  # type: ignore[type-arg]
    """The menu of one staff member's private chat (reset to the default for a former staff member)."""
    try:
        for lang in (None, *LANGUAGES):
            scope = BotCommandScopeChat(telegram_id)
            if role >= Role.STAFF:
                default = app.bot_data["services"].default_language
                await app.bot.set_my_commands(_menu(lang or default, role), scope=scope, language_code=lang)
            else:
                await app.bot.delete_my_commands(scope=scope, language_code=lang)
    except TelegramError as exc:  # the person never started the bot: the menu follows when they do
        log.info("could not set the menu of %s: %s", telegram_id, exc.message)
