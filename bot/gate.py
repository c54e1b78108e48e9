"""What every update passes before and after the handlers: duplicate delivery, flood control, and
making the conversation state durable."""

from __future__ import annotations

import collections
import logging
import time

from sqlalchemy.exc import DBAPIError, OperationalError
from telegram import Update
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, ContextTypes

from bot.context import language_without_store
from bot.persistence import DatabasePersistence
from bot.ui import reply

log = logging.getLogger(__name__)

FLOOD_WINDOW = 10.0  # seconds
FLOOD_LIMIT = 20  # updates per person per window before they are slowed down

# Errors meaning "the database cannot be reached right now" (a restart, a network cut, a full pool).
DATABASE_DOWN = (DBAPIError, OperationalError, OSError, ConnectionError, TimeoutError)


async def drop_duplicates(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Take the update before any handler runs; a copy of it stops here.

    The update was stored when it arrived (``bot.updates``), leased to this process, and a copy
    received again (by Telegram after a restart, or by a second bot process, or twice in one batch)
    was not queued. Here the process checks that it still holds the update (another process may
    have taken over an update this one was too slow to start), or records it now if it could not be
    stored on arrival. When the database cannot be reached the person is told to try again, once,
    here, and nothing else runs (every handler would fail the same way and answer again).
    """
    persistence = context.application.persistence
    try:
        first = await context.application.bot_data["inbox"].take(update.update_id)
        if first and isinstance(persistence, DatabasePersistence):
            # This chat's last update may have gone to another bot process: take over its state.
            await persistence.refresh(context.application, update)
    except DATABASE_DOWN as exc:
        log.warning("database unreachable for update %s: %s", update.update_id, type(exc).__name__)
        await _tell_try_again(update, context)
        raise ApplicationHandlerStop from None
    except Exception:  # a state that cannot be taken over: go on with what this process knows
        log.exception("could not take over the stored state for update %s", update.update_id)
        first = True
    if not first:
        log.info("update %s already processed; ignored", update.update_id)
        raise ApplicationHandlerStop


async def _tell_try_again(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """"Nothing was saved, try again" in the person's Telegram language (the store is unreachable)."""
    if update.effective_chat is None:
        return
    lang = language_without_store(update, context)
    try:
        if update.callback_query is not None:
            from bot.ui import answer

            await answer(update, context, "common.try_again_later", alert=True, lang=lang)
        else:
            await reply(update, context, "common.try_again_later", lang=lang)
    except TelegramError:
        log.warning("could not tell the person to try again")


async def drop_without_sender(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Channel posts and service updates have no person behind them: nothing to answer. An edit of
    an earlier message is not a new answer either (as in most bots, edits are ignored): treating it
    as one would replay a step of a conversation with stale text."""
    if update.effective_user is None or update.effective_user.is_bot or update.edited_message is not None:
        raise ApplicationHandlerStop


class FloodControl:
    """Slow down one person who sends too much, with one polite message, without touching others."""

    def __init__(self, limit: int = FLOOD_LIMIT, window: float = FLOOD_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.recent: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.warned: set[int] = set()

    async def __call__(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        user = update.effective_user
        if user is None:
            return
        now = time.monotonic()
        stamps = self.recent[user.id]
        while stamps and now - stamps[0] > self.window:
            stamps.popleft()
        stamps.append(now)
        if len(stamps) <= self.limit:
            self.warned.discard(user.id)
            return
        if user.id not in self.warned:
            self.warned.add(user.id)
            await reply(update, context, "common.slow_down")
        raise ApplicationHandlerStop


async def mark_processed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """After the handlers: make the conversation state and the user and chat data durable now,
    not at the next periodic save, so a crash after this update loses nothing of it."""
    # python-telegram-bot marks this update's user and chat data for saving only after the last
    # group ran, i.e. after this handler: without marking them here a step's user_data (such as the
    # card number of "/login CARD", a person's first message) would reach the database one update
    # late and be lost by a crash in between.
    context.application.mark_data_for_update_persistence(
        chat_ids=update.effective_chat.id if update.effective_chat else None,
        user_ids=update.effective_user.id if update.effective_user else None,
    )
    try:
        await context.application.update_persistence()
        # Done now that its handlers finished and its state is saved (the update processor would
        # mark it too, a moment later: after the answer, which must find what it erased gone).
        await context.application.bot_data["inbox"].finish_early(update.update_id)
    except DATABASE_DOWN as exc:
        # The handlers already answered (or the error handler told the person to try again); a
        # second "try again" here would only confuse. The state is saved with the next update.
        log.warning("could not save the state after update %s: %s", update.update_id, type(exc).__name__)
