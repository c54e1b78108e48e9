"""What every handler needs: the services of the running bot and who is talking."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from telegram import Update
from telegram.ext import Application, ContextTypes

from bot.i18n import language_for
from bot.settings import Settings
from storage.db import Database, utcnow
from storage.people import Role, role_of, touch_user
from storage.policy import Policy


@dataclass
class Services:
    """The bot's shared services, kept in ``application.bot_data["services"]``."""

    settings: Settings
    db: Database
    policy: Policy
    circulation: Any = None  # storage.ils.CirculationService
    clock_offset: dt.timedelta = field(default_factory=dt.timedelta)  # tests move the clock forward

    def now(self) -> dt.datetime:
        """The current time (UTC), as the bot sees it."""
        return utcnow() + self.clock_offset

    @property
    def tz(self) -> ZoneInfo:
        return self.settings.tz

    @property
    def default_language(self) -> str:
        return self.settings.language


def services(context: ContextTypes.DEFAULT_TYPE | Application) -> Services:  # type: ignore[type-arg]
    """The running bot's services."""
    svc: Services = context.bot_data["services"]
    return svc


def language_without_store(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The person's language from Telegram alone, for when the store cannot be asked (it is down)."""
    code = update.effective_user.language_code if update.effective_user else None
    return language_for(None, code, services(context).default_language)


@dataclass(frozen=True)
class Who:
    """The person behind an update, as far as the library is concerned."""

    user_id: int
    chat_id: int
    name: str
    lang: str
    role: Role
    reader_id: int | None
    private: bool

    @property
    def is_staff(self) -> bool:
        return self.role >= Role.STAFF


async def who(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Who:
    """Who sent ``update``: their language, role and linked card, from the store (never from the chat).

    Roles are granted by ``from_user.id`` only: being in a group, even the staff group, grants nothing.
    """
    svc = services(context)
    user = update.effective_user
    chat = update.effective_chat
    assert user is not None, "updates without a sender are filtered out before the handlers"
    async with svc.db.session() as session:
        row = await touch_user(session, user.id, user.first_name or "", user.language_code)
        role = await role_of(session, user.id)
        lang = language_for(row.language, row.telegram_language, svc.default_language)
        reader_id = row.reader_id
    return Who(
        user_id=user.id,
        chat_id=chat.id if chat else user.id,
        name=user.full_name,
        lang=lang,
        role=role,
        reader_id=reader_id,
        private=chat is None or chat.type == "private",
    )
