"""Assembly: the python-telegram-bot ``Application`` with its services, persistence, dispatcher
and every handler, registered in one visible place."""

from __future__ import annotations

import logging
import traceback

from sqlalchemy.exc import DBAPIError, OperationalError
from telegram import Update
from telegram.ext import Application, ContextTypes, TypeHandler

from bot import errors, staffchat
from bot.commands import set_default_menu, set_personal_menu
from bot.context import Services, language_without_store, services
from bot.dispatcher import BudgetRateLimiter, Dispatcher, SendBudget
from bot.gate import FloodControl, drop_duplicates, drop_without_sender, mark_processed
from bot.persistence import DatabasePersistence
from bot.settings import Settings
from bot.ui import reply
from bot.updates import ChatOrderedProcessor, DurableUpdateQueue, UpdateInbox
from handlers import (
    account,
    broadcast,
    ill,
    ill_partners,
    incidents,
    loans,
    reference,
    search,
    staff,
    stats,
    tickets,
)
from handlers import events as events_handlers
from handlers import quality as quality_handlers
from storage.db import Database
from storage.ils import make_circulation_service
from storage.people import Role, list_staff
from storage.policy import Policy

log = logging.getLogger(__name__)


def file_url(api_url: str) -> str:
    """The file download URL that goes with a Bot API URL (``…/bot`` → ``…/file/bot``)."""
    base = api_url.rstrip("/")
    return base[: -len("/bot")] + "/file/bot" if base.endswith("/bot") else base + "/file/bot"


def register_handlers(app: Application) -> None:  # type: ignore[type-arg]
    """Every handler, in the order python-telegram-bot must try them.

    Groups run in ascending order and every group sees the update; within a group the first
    matching handler wins. Negative groups are the gate every update passes; group 0 holds the
    features, with the conversations before plain commands (a conversation in progress must see
    the text typed in its steps) and the catalog search on plain text last; group 100 makes the
    result durable.
    """
    staffchat.register(app)  # group -4: the staff group became a supergroup, the bot was removed or added back

    app.add_handler(TypeHandler(Update, drop_without_sender), group=-3)
    app.add_handler(TypeHandler(Update, drop_duplicates), group=-2)
    app.add_handler(TypeHandler(Update, FloodControl()), group=-1)

    account.register(app)  # /start (with invite deep links), /login conversation, /language, …

    search.register(app)  # /search and the result buttons (pages, details)

    loans.register(app)  # /loans, /renew, /holds, /settings, renew/hold/reminder buttons, the daily notice job

    tickets.register(app)  # /complain, /feedback and ticket replies (a conversation), /tickets, claim buttons, SLA jobs

    ill.register(app)  # /ill request conversation, the staff's partner question, /requests, /illqueue, ILL buttons
    ill_partners.register(app)  # ISO 18626 partners: Send to partners, Returned to partner, lending buttons, /illlending

    stats.register(app)  # /stats (staff): figures, weekly chart, CSV

    incidents.register(app)  # /report conversation, "I'm handling it", /incidents reports and CSV, the escalation job

    broadcast.register(app)  # /emergency and /drill conversation, confirm buttons, /allclear, acknowledgements, progress and reminder jobs

    events_handlers.register(app)  # /events, /myevents, /checkin, the staff's event form (a conversation: before the search fallback), reminder job

    staff.register(app)  # /overdue (staff): overdue loans by branch and days, pages, CSV

    reference.register(app)  # /ask, /desk, /end, Take and the rf: buttons; before the search fallback: a message of someone in a reference conversation is relayed, not searched

    quality_handlers.register(app)  # surveys in the chat (written answers: before the search fallback), /survey, /myratings, /quality, survey job

    search.register_fallback(app)  # plain text outside any conversation is a catalog search

    account.register_last(app)  # /cancel outside a conversation, unknown commands, stale buttons

    app.add_handler(TypeHandler(Update, mark_processed), group=100)
    app.add_error_handler(on_error)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log the failure (never the message text), and tell the person to try again."""
    error = context.error
    database_down = isinstance(error, (DBAPIError, OperationalError, OSError, ConnectionError))
    log.error(
        "error while handling update %s: %s",
        getattr(update, "update_id", "?"),
        "".join(traceback.format_exception_only(type(error), error)).strip() if error else "?",
        exc_info=error if not database_down else None,
    )
    if isinstance(update, Update) and update.effective_chat is not None and update.effective_user is not None:
        key = "common.try_again_later" if database_down else "common.error"
        try:
            await reply(update, context, key, lang=language_without_store(update, context))
        except Exception:  # nothing more can be done for this update
            log.warning("could not tell the person about the error")
    await errors.report(update, context)  # privately to the admins, once per kind every 10 minutes




async def _post_init(app: Application) -> None:  # type: ignore[type-arg]
    svc = services(app)
    await set_default_menu(app)
    async with svc.db.session() as session:
        members = await list_staff(session)
    for member in members:
        await set_personal_menu(app, member.telegram_id, Role.parse(member.role))
    dispatcher = Dispatcher(
        app.bot,
        svc.db,
        rate=svc.settings.effective_broadcast_rate,
        default_language=svc.default_language,
        clock=svc.now,
        paid_broadcast=svc.settings.paid_broadcast,
        budget=app.bot_data["send_budget"],
    )
    app.bot_data["dispatcher"] = dispatcher
    await staffchat.start(app, dispatcher)  # the staff group's current id and state, before the first send
    dispatcher.start()


async def _post_shutdown(app: Application) -> None:  # type: ignore[type-arg]
    dispatcher: Dispatcher | None = app.bot_data.get("dispatcher")
    if dispatcher is not None:
        await dispatcher.stop()
    circulation = services(app).circulation
    if hasattr(circulation, "close"):  # the SIP2 connection pool and its link watcher
        await circulation.close()
    await services(app).db.dispose()


def build_application(settings: Settings, db: Database, policy: Policy, token: str) -> Application:  # type: ignore[type-arg]
    """The bot, ready to ``initialize()``; the database schema must already be up to date."""
    # One sending budget for the outbox and the direct answers: answers go first, never meet a 429.
    budget = SendBudget(settings.effective_broadcast_rate)
    inbox = UpdateInbox(db)
    app = (
        Application.builder()
        .token(token)
        .base_url(settings.telegram_api_url)
        .base_file_url(file_url(settings.telegram_api_url))
        .persistence(DatabasePersistence(db))
        # Updates are stored before they are acknowledged, and processed 64 at a time but one
        # at a time per chat and person (see bot/updates.py).
        .update_queue(DurableUpdateQueue(inbox))
        .concurrent_updates(ChatOrderedProcessor(inbox, limit=64))
        # getUpdates gets a pool of its own with room for a second connection: with one, an
        # interrupted long poll can leave polling waiting for a connection (PoolTimeout).
        .get_updates_connection_pool_size(2)
        .rate_limiter(BudgetRateLimiter(budget))
        .post_init(_post_init)
        .post_shutdown(_post_shutdown)
        .build()
    )
    app.bot_data["send_budget"] = budget
    app.bot_data["inbox"] = inbox
    svc = Services(settings=settings, db=db, policy=policy)
    # The circulation service: the local store, or the library's own system over SIP2; it reads
    # the bot's clock, which tests move forward.
    svc.circulation = make_circulation_service(settings.ils, db, policy, settings.tz, settings, clock=svc.now)
    app.bot_data["services"] = svc
    register_handlers(app)
    return app
