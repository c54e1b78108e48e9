"""Running the bot: long polling or webhook, until SIGTERM/SIGINT, shutting down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from urllib.parse import urlparse

from aiohttp import web
from telegram import Update
from telegram.ext import Application

from bot.app import build_application
from bot.ill_exchange import start_ill_exchange, stop_ill_exchange
from bot.settings import Settings
from bot.web import CappedSite, connection_cap, quiet_repeated_errors, serving_runner, webhook_app
from storage.db import Database
from storage.models import create_schema
from storage.policy import Policy

log = logging.getLogger(__name__)


async def start_bot(
    settings: Settings, db: Database, policy: Policy, token: str, *, poll: bool = True, poll_timeout: int = 10
) -> Application:  # type: ignore[type-arg]
    """Build, initialise and start the bot; with ``poll`` it also starts long polling."""
    app = build_application(settings, db, policy, token)
    await app.initialize()
    # run_polling() would call these hooks itself; this runner manages the lifecycle by hand so that
    # the demo, the tests and the webhook mode share one event loop with other servers.
    if app.post_init is not None:
        await app.post_init(app)
    await app.start()
    await start_ill_exchange(app)  # POST /iso18626 and the partner sender, when LIBRARYBOT_ILL_AGENCY_ID is set
    # Updates stored but not done by a process that died are taken over (after their lease).
    app.bot_data["inbox"].start(app)
    if poll:
        assert app.updater is not None
        await app.updater.start_polling(timeout=poll_timeout, allowed_updates=Update.ALL_TYPES)
    return app


async def stop_bot(app: Application) -> None:  # type: ignore[type-arg]
    """Stop taking updates, finish the ones in flight, flush the state, and close."""
    await stop_ill_exchange(app)
    if app.updater is not None and app.updater.running:
        await app.updater.stop()
    if app.running:
        await app.stop()
    await app.bot_data["inbox"].stop()
    # The outbox dispatcher sends through the application's bot: stop it (the messages in flight
    # finish, the rest go back to the queue) before shutdown() closes the bot's connections, or
    # those last sends would fail and wait for their lease to run out.
    dispatcher = app.bot_data.get("dispatcher")
    if dispatcher is not None:
        app.bot_data["dispatcher"] = None  # post_shutdown must not stop it a second time
        await dispatcher.stop()
    await app.shutdown()
    if app.post_shutdown is not None:
        await app.post_shutdown(app)


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(settings: Settings, policy: Policy, *, webhook: bool) -> None:
    """``librarybot run``: the production bot against Telegram (or another Bot API server)."""
    token = settings.token()
    db = Database(settings.database_url)
    if not await db.ping():
        raise SystemExit(f"the database is not reachable ({urlparse(settings.database_url).scheme}); check LIBRARYBOT_DATABASE_URL")
    await create_schema(db)
    app = await start_bot(settings, db, policy, token, poll=not webhook)
    runner: web.AppRunner | None = None
    try:
        if webhook:
            runner = await _serve_webhook(app, settings)
        log.info("the bot is running (%s); stop it with SIGTERM or Ctrl-C", "webhook" if webhook else "long polling")
        await wait_for_signal()
        log.info("stopping: finishing the updates in flight")
    finally:
        if runner is not None:
            await runner.cleanup()
        await stop_bot(app)


async def _serve_webhook(app: Application, settings: Settings) -> web.AppRunner:  # type: ignore[type-arg]
    if not settings.webhook_url or settings.webhook_secret is None:
        raise SystemExit("webhook mode needs LIBRARYBOT_WEBHOOK_URL and LIBRARYBOT_WEBHOOK_SECRET")
    secret = settings.webhook_secret.get_secret_value()
    path = urlparse(settings.webhook_url).path or "/webhook"
    quiet_repeated_errors()
    runner = serving_runner(webhook_app(app, secret, path))
    await runner.setup()
    host, port = settings.listen_address()
    await CappedSite(runner, host, port, connection_cap()).start()
    await app.bot.set_webhook(settings.webhook_url, secret_token=secret, allowed_updates=Update.ALL_TYPES)
    log.info("webhook served on %s:%s and registered with the Bot API", host, port)
    return runner
