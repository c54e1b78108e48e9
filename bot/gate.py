"""What every update passes before and after the handlers: duplicate delivery, flood control, and
making the conversation state durable."""

from __future__ import annotations

import collections
import logging
import time

from telegram import Update
from telegram.ext import ApplicationHandlerStop, ContextTypes

from bot.context import services
from bot.ui import reply
from storage.state import claim_update, update_seen

log = logging.getLogger(__name__)

FLOOD_WINDOW = 10.0  # seconds
FLOOD_LIMIT = 20  # updates per person per window before they are slowed down


async def drop_duplicates(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Stop an update that was already processed (Telegram or a restart delivered it again)."""
    async with services(context).db.session() as session:
        if await update_seen(session, update.update_id):
            log.info("update %s already processed; ignored", update.update_id)
            raise ApplicationHandlerStop


async def drop_without_sender(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Channel posts and service updates have no person behind them: nothing to answer."""
    if update.effective_user is None or update.effective_user.is_bot:
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
    """After the handlers: make conversation and user data durable, then record the update as done.

    Recording only at the end means an update interrupted by a crash is processed again after the
    restart rather than lost; the store's operations are written so that a repeat does no harm.
    """
    await context.application.update_persistence()
    async with services(context).db.session() as session:
        await claim_update(session, update.update_id)
