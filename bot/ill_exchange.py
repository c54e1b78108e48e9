"""The ISO 18626 exchange with partner libraries, as plumbing: the ``POST /iso18626`` endpoint served
at ``LIBRARYBOT_ILL_LISTEN`` (in polling and webhook mode alike), and the sender that works through
the durable queue of outgoing messages (``storage.ill_exchange.PartnerMessage``), in order per
request, retrying a partner that is down with backoff.

What a message means and what it changes is decided in ``storage.ill_exchange``; this module moves
bytes and keeps time. It runs only when ``LIBRARYBOT_ILL_AGENCY_ID`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from sqlalchemy.exc import DBAPIError, OperationalError
from telegram.ext import Application

from bot.context import Services, services
from storage import ill_exchange as exchange
from storage import iso18626 as iso
from storage.db import Database

log = logging.getLogger(__name__)
PATH = "/iso18626"
CONTENT_TYPE = "application/xml"


class IllExchange:
    """The endpoint and the sender of one running bot."""

    def __init__(
        self,
        db: Database,
        identity: exchange.Identity,
        listen: tuple[str, int],
        clock: Callable[[], dt.datetime],
        *,
        poll_seconds: float = 2.0,
        timeout_seconds: float = 20.0,
    ) -> None:
        self.db = db
        self.identity = identity
        self.listen = listen
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._http: aiohttp.ClientSession | None = None

    # -- the endpoint ---------------------------------------------------------------------------

    def web_app(self) -> web.Application:
        app = web.Application(client_max_size=iso.MAX_MESSAGE_BYTES + 1024)
        app.router.add_post(PATH, self._receive)
        return app

    async def _receive(self, request: web.Request) -> web.Response:
        """One partner message: processed once, answered with its confirmation (ERROR when unusable)."""
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            error = iso.InvalidMessage(iso.ErrorType.BADLY_FORMED_MESSAGE, "message too large")
            body = iso.to_xml(iso.confirm(None, self.clock(), error=error))
            return web.Response(body=body, status=413, content_type=CONTENT_TYPE, charset="utf-8")
        try:
            async with self.db.session() as session:
                answer = await exchange.handle_incoming(session, data, self.identity, self.clock())
        except (OSError, DBAPIError, OperationalError):
            log.warning("ISO 18626 message not processed: the database is not reachable")
            return web.Response(status=503, text="try again later")
        self.wake()  # the message may have queued an answer, or a request to the next partner
        return web.Response(body=answer, content_type=CONTENT_TYPE, charset="utf-8")

    @property
    def port(self) -> int:
        """The port the endpoint listens on (the one chosen, when 0 was asked)."""
        assert self._runner is not None
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("the ISO 18626 endpoint is not listening")

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}{PATH}"

    # -- the sender -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the queue now (something was just queued)."""
        self._wake.set()

    async def send_due(self) -> int:
        """Send every message whose time has come; how many the partners confirmed."""
        now = self.clock()
        async with self.db.session() as session:
            due = await exchange.due_messages(session, now)
            taken = [row for row in due if await exchange.lease(session, row.id, now)]
        confirmed = 0
        for index, row in enumerate(taken):
            if self._stopping:  # the rest go back to the queue at once, not after their lease
                async with self.db.session() as session:
                    await exchange.release(session, [r.id for r in taken[index:]])
                break
            confirmed += await self._send(row)
        return confirmed

    async def _send(self, row: exchange.PartnerMessage) -> int:
        partner = self.identity.policy.ill.partner(row.agency_id)
        answer: iso.Confirmation | None = None
        problem = ""
        if partner is None:
            problem = "the partner is no longer listed in the policy"
        else:
            headers = {"Content-Type": CONTENT_TYPE + "; charset=utf-8"}
            if partner.auth_header:
                headers["Authorization"] = partner.auth_header
            try:
                assert self._http is not None
                async with self._http.post(partner.endpoint, data=row.body.encode("utf-8"), headers=headers) as response:
                    body = await response.read()
                    if response.status >= 300 and response.status not in (400, 422):
                        problem = f"HTTP {response.status}"
                    else:
                        parsed = iso.parse(body)
                        expected = iso.Kind(row.kind).confirmation
                        if not isinstance(parsed, iso.Confirmation) or parsed.kind != expected:
                            problem = f"answered with {parsed.kind}, not {expected}"
                        else:
                            answer = parsed
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"[:200]
            except iso.InvalidMessage as exc:
                problem = f"answer not ISO 18626: {exc.value}"
        now = self.clock()
        async with self.db.session() as session:
            if answer is not None and answer.ok:
                await exchange.mark_sent(session, row.id, now)
            elif answer is not None:
                await exchange.mark_refused(session, row, answer, now, self.identity)
            else:
                when = await exchange.retry_later(session, row, problem, now, self.identity)
                log.info("ISO 18626 %s to %s not delivered (%s); next try at %s", row.summary, row.agency_id, problem,
                         when.isoformat(timespec="seconds"))
        if answer is not None:
            log.info("ISO 18626 %s to %s: %s", row.summary, row.agency_id, "OK" if answer.ok else answer.error_type)
        return 1 if answer is not None and answer.ok else 0

    async def _run_sender(self) -> None:
        while not self._stopping:
            try:
                await self.send_due()
            except (OSError, DBAPIError, OperationalError):
                log.warning("the ISO 18626 sender could not reach the database; trying again shortly")
            except Exception:  # a bug must not stop the exchange for good
                log.exception("the ISO 18626 sender failed; trying again shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(self.web_app(), access_log=None)
        await self._runner.setup()
        host, port = self.listen
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        self._http = aiohttp.ClientSession(timeout=self.timeout)
        self._stopping = False
        self._sender = asyncio.create_task(self._run_sender(), name="iso18626-sender")
        log.info("ISO 18626 endpoint served on %s:%s%s as %s", host, self.port, PATH, self.identity.agency)

    async def stop(self) -> None:
        """Stop taking messages; a message being sent finishes (or goes back to the queue)."""
        self._stopping = True
        self.wake()
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None


def listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


async def start_ill_exchange(app: Application) -> IllExchange | None:  # type: ignore[type-arg]
    """Start the exchange when this library has an ISO 18626 agency id; kept in ``bot_data``."""
    svc = services(app)
    identity = identity_for(svc)
    if identity is None:
        return None
    running = IllExchange(svc.db, identity, listen_address(svc.settings.ill_listen), svc.now)
    await running.start()
    app.bot_data["ill_exchange"] = running
    return running


async def stop_ill_exchange(app: Application) -> None:  # type: ignore[type-arg]
    running: IllExchange | None = app.bot_data.pop("ill_exchange", None)
    if running is not None:
        await running.stop()


def wake_exchange(bot_data: dict[str, object]) -> None:
    """After a change that queued a message to a partner: send it now rather than at the next poll."""
    running = bot_data.get("ill_exchange")
    if isinstance(running, IllExchange):
        running.wake()


def identity_for(svc: Services) -> exchange.Identity | None:
    """This library on the wire, from the running bot's settings and policy (None: no exchange)."""
    return exchange.identity_of(svc.settings.ill_agency_id, svc.policy, svc.settings.staff_chat_id)
