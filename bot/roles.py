"""Role checks for commands and buttons. Every staff-only handler re-checks on every update,
because callback data can be forged and roles can be withdrawn at any time."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from telegram import Update
from telegram.ext import ContextTypes

from bot.context import who
from bot.ui import answer, reply
from storage.people import Role

log = logging.getLogger(__name__)
R = TypeVar("R")
Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, R]]


def requires(role: Role) -> Callable[[Handler[Any]], Handler[Any]]:
    """Let the handler run only for people with ``role`` or higher; others get a polite refusal."""

    def decorate(handler: Handler[Any]) -> Handler[Any]:
        @functools.wraps(handler)
        async def checked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Any:
            me = await who(update, context)
            if me.role >= role:
                return await handler(update, context)
            log.info("refused %s to user %s with role %s", handler.__name__, me.user_id, me.role.label)
            key = "common.needs_login" if role == Role.READER else "common.not_allowed"
            if role == Role.DUTY_OFFICER and me.role >= Role.STAFF:
                key = "common.duty_only"  # staff are told whom it is for, not that it is staff-only
            if update.callback_query is not None:
                await answer(update, context, key, alert=True, lang=me.lang)
            else:
                await reply(update, context, key, lang=me.lang)
            return None

        return checked

    return decorate
