"""The aiohttp web server of a running bot: the Telegram webhook and the health check."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web
from sqlalchemy.exc import DBAPIError
from telegram import Update
from telegram.ext import Application

from bot.context import services
from bot.staffchat import staff_chat_health
from storage.outbox import backlog

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


async def health(app: Application) -> tuple[bool, dict[str, Any]]:  # type: ignore[type-arg]
    """Database reachability and the outbox backlog."""
    svc = services(app)
    report: dict[str, Any] = {"database": await svc.db.ping()}
    if report["database"]:
        try:
            async with svc.db.session() as session:
                report["outbox_backlog"] = await backlog(session)
        except (OSError, DBAPIError):  # the database went away between the two questions
            report["database"] = False
    report.update(staff_chat_health(app))  # whether the bot can write to the staff group
    return bool(report["database"]), report


def health_handler(app: Application) -> Any:  # type: ignore[type-arg]
    async def healthz(_request: web.Request) -> web.Response:
        ok, report = await health(app)
        return web.json_response({"ok": ok, **report}, status=200 if ok else 503)

    return healthz


def webhook_app(app: Application, secret: str, path: str = "/webhook") -> web.Application:  # type: ignore[type-arg]
    """The webhook endpoint (checking Telegram's secret header in constant time) and ``/healthz``."""

    async def webhook(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            log.warning("webhook request without the right secret token refused")
            return web.Response(status=403)
        try:
            update = Update.de_json(json.loads(await request.read()), app.bot)
        except (ValueError, TypeError, KeyError):
            return web.Response(status=400)
        await app.update_queue.put(update)
        return web.Response(status=200)

    web_app = web.Application(client_max_size=1024 * 1024)
    web_app.router.add_post(path, webhook)
    web_app.router.add_get("/healthz", health_handler(app))
    return web_app
