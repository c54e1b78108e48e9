"""The aiohttp web server of a running bot: the Telegram webhook and the health check."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import resource
import time
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
READ_TIMEOUT = 10.0  # seconds to send a request's headers, and its body
MAX_CONNECTIONS = 1000  # open connections at most; fewer when the process may open fewer files


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


def parse_update(body: bytes, app: Application) -> Update | None:  # type: ignore[type-arg]
    """The update in a webhook request's body; None for anything that is not a JSON object
    holding one (``[]``, ``null``, ``42``, brackets nested too deep, a broken update)."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            return None
        return Update.de_json(data, app.bot)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def webhook_app(app: Application, secret: str, path: str = "/webhook") -> web.Application:  # type: ignore[type-arg]
    """The webhook endpoint (checking Telegram's secret header in constant time) and ``/healthz``."""

    async def webhook(request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            log.warning("webhook request without the right secret token refused")
            return web.Response(status=403)
        try:
            async with asyncio.timeout(READ_TIMEOUT):  # a body sent a byte at a time is dropped
                body = await request.read()
        except TimeoutError:
            return web.Response(status=408)
        update = parse_update(body, app)
        if update is None:
            return web.Response(status=400)
        # Stored before the 200 (bot/updates.py): Telegram does not resend what it was told arrived.
        await app.update_queue.put(update)
        return web.Response(status=200)

    web_app = web.Application(client_max_size=1024 * 1024)
    web_app.router.add_post(path, webhook)
    web_app.router.add_get("/healthz", health_handler(app))
    return web_app


# --- holding out against slow or too many connections (slowloris) ------------------------------


def connection_cap() -> int:
    """Open connections the server accepts at once: ``MAX_CONNECTIONS``, and at most half the
    files this process may open (the database, the Bot API and the logs need the rest)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft // 2))


class CappedSite(web.TCPSite):
    """A TCP site holding at most ``cap`` connections: when a new one comes while ``cap`` are open,
    the oldest that are not in the middle of a request (idle, or still sending their headers) are
    closed to make room, so a flood of half-sent requests cannot keep the health check and Telegram
    out. A client that sends its request too slowly is also cut off by the runner's
    ``keepalive_timeout`` and ``READ_TIMEOUT``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, cap: int) -> None:  # type: ignore[type-arg]
        # The event loop accepts up to ``backlog`` connections in one go before any is looked at:
        # a small batch keeps the files in use near the cap.
        super().__init__(runner, host, port, backlog=max(8, min(128, cap // 8)))
        self.cap = cap
        self.evicted = 0
        self._said = OncePerMinute()

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.cap:
            self._make_room(server.connections)
        return server()

    def _make_room(self, connections: list[Any]) -> None:
        room = max(1, self.cap // 10)
        for handler in connections:  # oldest first
            if room == 0:
                break
            # (aiohttp keeps this flag private; without it nothing is closed, as before)
            if not getattr(handler, "_request_in_progress", True):
                handler.force_close()
                self.evicted += 1
                room -= 1
        if self._said.allow("cap"):
            log.warning("%s connections open: the oldest idle ones are closed (%s so far)", self.cap, self.evicted)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def serving_runner(web_app: web.Application) -> web.AppRunner:
    """The runner of a bot's web server: idle and half-sent connections closed after
    ``READ_TIMEOUT`` (aiohttp's keep-alive timer also runs until a request's headers are in)."""
    return web.AppRunner(web_app, keepalive_timeout=READ_TIMEOUT, handle_signals=False)


class OncePerMinute:
    """Says whether a message may be logged now: the first time, then once a minute."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if now - self.last.get(key, -self.every) < self.every:
            return False
        self.last[key] = now
        return True


class RepeatedErrorFilter(logging.Filter):
    """A log record repeated (the same message template from the same place) is let through once a
    minute: "Too many open files" from accept() must not fill the disk."""

    def __init__(self) -> None:
        super().__init__()
        self.once = OncePerMinute()
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = f"{record.name}:{record.pathname}:{record.lineno}:{record.msg}"
        if not self.once.allow(key):
            self.dropped[key] = self.dropped.get(key, 0) + 1
            return False
        dropped = self.dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in the last minute)"
        return True


def quiet_repeated_errors() -> None:
    """Install ``RepeatedErrorFilter`` on the loggers of the event loop and the web server."""
    for name in ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatedErrorFilter) for f in logger.filters):
            logger.addFilter(RepeatedErrorFilter())
