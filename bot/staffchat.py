"""The staff group as it really behaves: it may become a supergroup with a new id, the bot may be
removed from it or lose the right to post, and it may be a forum whose topics sort the alerts.

:class:`StaffChat` is the one place that knows where staff-group messages go now. The outbox
dispatcher asks it for the chat and topic of every row addressed to the staff group, and tells it
what Telegram answered: "group chat was upgraded to a supergroup chat" (the bot follows the new id
at once and sends again), 403 "bot was kicked" or "not enough rights" (the admins and duty officers
are told privately, urgent alerts go to staff privately, the rest wait). The handlers registered
here see the same changes from Telegram's side: the ``migrate_to_chat_id`` / ``migrate_from_chat_id``
service messages and ``my_chat_member`` updates (removed, muted, added back).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from telegram import ChatMemberAdministrator, ChatMemberRestricted, Update
from telegram.ext import Application, ChatMemberHandler, ContextTypes, MessageHandler, filters

from bot.settings import Settings
from storage.db import Database
from storage.outbox import Delivery, DeliveryState, Outcome, Priority
from storage.staffchat import (
    StaffChatState,
    deliver_privately,
    follow_migration,
    mark_available,
    mark_unavailable,
    staff_chat,
)

log = logging.getLogger(__name__)

HOLD = dt.timedelta(minutes=10)  # a message that can wait is looked at again this often while the group is unavailable

# The kind of alert (LIBRARYBOT_STAFF_TOPICS) of a message, by the area of its catalogue key.
TOPIC_OF_AREA = {
    "loans": "overdue",
    "ill": "ill",
    "tickets": "tickets",
    "incidents": "incidents",
    "broadcast": "incidents",
    "reference": "reference",
    "desk": "reference",
    "events": "events",
    "sip2": "system",
    "staffchat": "system",
    "errors": "system",
}


def topic_kind(text_key: str) -> str:
    """The kind of alert a message is (``system`` for anything unknown)."""
    return TOPIC_OF_AREA.get(text_key.partition(".")[0], "system")


def urgent(row: Delivery) -> bool:
    """A message that cannot wait for the group to come back (incident reports, escalations, ILL
    and ticket alerts, "need help"): everything but the daily digests and other bulk."""
    return row.priority <= Priority.ALERT


class StaffChat:
    """Where the staff group is now, and whether the bot may write to it (one per bot process,
    kept in ``bot_data["staff_chat"]``; the store holds the truth shared by every process)."""

    def __init__(self, settings: Settings, db: Database, clock: Callable[[], dt.datetime]) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.configured: int | None = settings.staff_chat_id
        self.chat_id: int | None = settings.staff_chat_id
        self.state = StaffChatState.OK
        self.topics = settings.staff_topic_map
        self.bad_threads: set[int] = set()  # topics Telegram said do not exist: the general topic instead
        self.wake: Callable[[], None] = lambda: None  # the dispatcher's, once it runs

    async def load(self) -> None:
        """Read the group's current id and state (a restart keeps a supergroup's new id)."""
        if self.configured is None:
            return
        async with self.db.session() as session:
            row = await staff_chat(session, self.configured)
            self._apply(row.chat_id, StaffChatState(row.state))

    def _apply(self, chat_id: int, state: StaffChatState) -> None:
        if chat_id != self.chat_id:
            log.info("the staff group's id is now %s (configured %s)", chat_id, self.configured)
        self.chat_id = chat_id
        self.state = state
        # New alerts are queued straight to the current id; LIBRARYBOT_STAFF_CHAT_ID itself is unchanged.
        self.settings.staff_chat_id = chat_id

    # --- what the dispatcher asks -----------------------------------------------------------------

    def addresses(self, chat_id: int) -> bool:
        """True for a row addressed to the staff group (by its configured or its current id)."""
        return self.configured is not None and chat_id in (self.configured, self.chat_id)

    @property
    def writable(self) -> bool:
        return self.state == StaffChatState.OK

    def thread_for(self, row: Delivery) -> dict[str, Any]:
        """``message_thread_id`` for the row's kind of alert, or nothing (the general topic)."""
        thread = self.topics.get(topic_kind(row.text_key))
        return {"message_thread_id": thread} if thread and thread not in self.bad_threads else {}

    async def migrated(self, row: Delivery, new_id: int, error: str) -> Outcome:
        """Telegram answered that the group is now the supergroup ``new_id``: follow it and send again."""
        old = self.chat_id
        if self.configured is not None and old is not None and old != new_id:
            async with self.db.session() as session:
                if await follow_migration(session, self.configured, old, new_id, self.clock()):
                    log.warning("the staff group became a supergroup: alerts now go to %s", new_id)
            await self.load()
        return Outcome(row.id, DeliveryState.QUEUED, error, retry_at=self.clock(), refund=True)

    async def refused(self, row: Delivery, state: StaffChatState, error: str) -> Outcome:
        """Telegram refused to post in the group (removed, or no right to post)."""
        await self.unavailable_now(state)
        return await self.unavailable(row, error)

    async def unavailable(self, row: Delivery, error: str = "the staff group is unavailable") -> Outcome:
        """A row for the group while the bot may not write there: an urgent one goes to every staff
        member privately, the others wait for the group to come back."""
        await self.load()  # another bot process may have seen the bot added back
        if self.writable:
            return Outcome(row.id, DeliveryState.QUEUED, retry_at=self.clock(), refund=True)
        if not urgent(row):
            return Outcome(row.id, DeliveryState.QUEUED, error, retry_at=self.clock() + HOLD, refund=True)
        async with self.db.session() as session:
            count = await deliver_privately(session, row.id)
        log.warning("a staff alert went privately to %d staff members (the staff group is unavailable)", count)
        return Outcome(row.id, DeliveryState.FAILED, f"{error}; sent privately to {count} staff members"[:512])

    def topic_missing(self, row: Delivery, error: str) -> Outcome:
        """The configured topic does not exist: send it to the general topic instead."""
        thread = self.thread_for(row).get("message_thread_id")
        if thread is not None:
            self.bad_threads.add(thread)
            log.warning("topic %s of the staff group does not exist; check LIBRARYBOT_STAFF_TOPICS", thread)
        return Outcome(row.id, DeliveryState.QUEUED, error, retry_at=self.clock(), refund=True)

    # --- what Telegram tells in updates -----------------------------------------------------------

    async def unavailable_now(self, state: StaffChatState) -> None:
        if self.configured is None:
            return
        async with self.db.session() as session:
            if await mark_unavailable(session, self.configured, state, self.clock()):
                log.warning("the bot can no longer write to the staff group (%s); admins and duty officers told", state)
        await self.load()
        self.wake()

    async def available_now(self) -> None:
        if self.configured is None:
            return
        async with self.db.session() as session:
            if await mark_available(session, self.configured, self.clock()):
                log.info("the bot can write to the staff group again")
        await self.load()
        self.wake()

    async def follow(self, old_id: int, new_id: int) -> None:
        if self.configured is None:
            return
        async with self.db.session() as session:
            if await follow_migration(session, self.configured, old_id, new_id, self.clock()):
                log.warning("the staff group became a supergroup: alerts now go to %s", new_id)
        await self.load()
        self.wake()

    def report(self) -> dict[str, Any]:
        """For ``/healthz``."""
        return {"chat_id": self.chat_id, "state": str(self.state)}


def staff_chat_of(app: Application | ContextTypes.DEFAULT_TYPE) -> StaffChat:  # type: ignore[type-arg]
    found: StaffChat = app.bot_data["staff_chat"]
    return found


async def on_migration(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The service message of a group that became a supergroup (in the old or in the new chat)."""
    message = update.effective_message
    if message is None:
        return
    if message.migrate_to_chat_id:
        await staff_chat_of(context).follow(message.chat_id, message.migrate_to_chat_id)
    elif message.migrate_from_chat_id:
        await staff_chat_of(context).follow(message.migrate_from_chat_id, message.chat_id)


async def on_my_chat_member(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The bot's own membership changed; for the staff group: removed, muted, or back."""
    change = update.my_chat_member
    staff = staff_chat_of(context)
    if change is None or not staff.addresses(change.chat.id):
        return
    member = change.new_chat_member
    if member.status in ("left", "kicked"):
        await staff.unavailable_now(StaffChatState.REMOVED)
    elif isinstance(member, ChatMemberRestricted) and not (member.is_member and member.can_send_messages):
        await staff.unavailable_now(StaffChatState.MUTED if member.is_member else StaffChatState.REMOVED)
    elif isinstance(member, ChatMemberAdministrator) or member.status in ("member", "restricted", "creator"):
        await staff.available_now()


def register(app: Application) -> None:  # type: ignore[type-arg]
    """The staff group's own changes, seen before the gate: they may come without a person behind
    them (an anonymous admin upgraded the group), and following them twice does nothing."""
    app.bot_data["staff_chat"] = StaffChat(app.bot_data["services"].settings, app.bot_data["services"].db, app.bot_data["services"].now)
    app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, on_migration), group=-4)
    app.add_handler(ChatMemberHandler(on_my_chat_member, ChatMemberHandler.MY_CHAT_MEMBER), group=-4)


async def start(app: Application, dispatcher: Any) -> None:  # type: ignore[type-arg]
    """Before the outbox runs: read the group's stored id and state, and route the dispatcher through it."""
    staff = staff_chat_of(app)
    await staff.load()
    dispatcher.staff = staff
    staff.wake = dispatcher.wake


def staff_chat_health(app: Application) -> dict[str, Any]:  # type: ignore[type-arg]
    """``/healthz``'s line about the staff group (nothing when none is configured)."""
    staff: StaffChat | None = app.bot_data.get("staff_chat")
    if staff is None or staff.configured is None:
        return {}
    return {"staff_chat": staff.report()}
