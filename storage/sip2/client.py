"""An asyncio SIP2 client and connection pool for the library's own system (the ACS).

Setting up the server side (copy into the README):

* Koha — add an account to ``SIPconfig.xml`` (``/etc/koha/sites/<instance>/``; recent Koha versions
  also manage SIP2 accounts under Administration): ``<login id="librarybot" password="…"
  institution="MAIN" error-detect="enabled" encoding="utf8" terminator="CR" delimiter="|"/>``;
  the ``id``/``password`` must be a Koha staff user with the *circulate* permission; the
  ``<institution id="MAIN">`` policy needs ``renewal="true"``. Start it with ``koha-sip --enable
  <instance> && koha-sip --start <instance>``. Keep ``client_timeout`` above our heartbeat.
* Evergreen — in ``oils_sip.xml`` add ``<login id="librarybot" password="…"
  institution="MAIN"/>`` (an Evergreen staff account with circulation permissions) under
  ``<accounts>``, an ``<institution id="MAIN" implementation="OpenILS::SIP">`` with
  ``<policy renewal="true" …/>``, and ``<encoding>utf8</encoding>`` in its implementation
  config; start it with ``oils_ctl.sh -a start_sip -s /openils/conf/oils_sip.xml`` (with the
  SIP2Mediator of Evergreen 3.12+, add the account in the staff client's SIP2 administration).
* FOLIO — run the ``edge-sip2`` module (``java -jar edge-sip2-fat.jar -conf sip2.conf``); in its
  tenant file set ``errorDetectionEnabled`` and ``charset`` (default IBM850: set
  ``LIBRARYBOT_SIP2_ENCODING=cp850`` or change it to UTF-8) to match ours; log in as a FOLIO user,
  with ``LIBRARYBOT_SIP2_LOCATION`` the service point's UUID; enable renew/hold in the
  ``acsTenantConfig`` ``supportedMessages``.

Our side: ``LIBRARYBOT_SIP2_HOST``, ``_PORT``, ``_USER``, ``_PASSWORD``, ``_INSTITUTION`` (the
institution id above), ``_LOCATION``, ``_TLS``, ``_ENCODING`` (gb18030 for many Chinese systems),
``_ERROR_DETECTION``, and optionally ``_TIMEOUT`` (5 s), ``_POOL_SIZE`` (4),
``_HEARTBEAT_SECONDS`` (60), ``_TERMINAL_PASSWORD``, ``_TLS_VERIFY``, ``_TLS_CA_FILE``;
``librarybot sip2 check`` shows what the server says it supports.

How the client behaves, and why:

* One request at a time per connection (SIP2 has no pipelining); ``Sip2Pool`` spreads concurrent
  callers over ``pool_size`` connections, each logged in when opened.
* Many servers allow an account fewer connections than ``pool_size`` (Evergreen's SIPServer as
  small installations run it: one); the extra login is accepted and never answered. When that
  happens while another connection is logged in, the pool keeps only the logged-in ones
  (``connection_limit``) and the request goes out on one of them: nothing was sent on the hung one.
* Every connect, write and read has ``timeout`` seconds; a server that accepts and never answers
  costs a caller at most that much per step, then ``Sip2Unavailable``, and the connection is
  dropped (a late answer must never be read as the answer to the next request).
* Lookups (23, 63, 17, 99) are retried once on a fresh connection if the server closed the
  connection under them. Renew, renew all, hold and end session never are once written: the
  library's system may have acted, and a renewal must not happen twice.
* The checksum is checked on the bytes first: a response with a bad checksum (even in its message
  code), or without AY/AZ while error detection is on, is asked for again (97: the server resends,
  it does not redo; Evergreen resends with sequence number 0, which is accepted);
  a 96 from the server means it could not read ours and did nothing, so ours is sent again.
* Passwords (CO, AD, AC) never reach the log; debug logging shows masked messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import ssl
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar
from zoneinfo import ZoneInfo

from storage.sip2 import protocol as p
from storage.sip2.errors import (
    Sip2ChecksumError,
    Sip2Error,
    Sip2Exception,
    Sip2LoginRefused,
    Sip2LoginUnanswered,
    Sip2Unavailable,
)

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
T = TypeVar("T")

# How often we ask again for a response that fails its checksum (97), or resend a request the
# server could not read (96), before giving up: a line that garbles twice is not getting better.
MAX_RESENDS = 2
# A connection idle this long is probed with a 99 before a renew or hold is written on it: the
# server may have dropped it, and finding out *after* writing a renew would leave us not knowing
# whether it happened.
PROBE_AFTER_IDLE_SECONDS = 1.0
# Longest message we accept (a 64 with a few hundred items fits easily).
MAX_MESSAGE_BYTES = 256 * 1024


def local_now() -> dt.datetime:
    """The default clock: local wall time, naive, as SIP2 timestamps are usually sent."""
    return dt.datetime.now()


def _env_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on", "y")


@dataclass(frozen=True)
class Sip2Config:
    """How to reach and log in to the library's SIP2 server.

    ``timeout`` bounds each step (connect, login, one request) in seconds. ``heartbeat_seconds``
    is how long a pooled connection may sit idle before the pool sends it a 99 (0 turns it off).
    ``terminal_password`` is sent as AC (most servers want it empty). ``login_retry_seconds``:
    after a refused login, how long to answer ``Sip2LoginRefused`` without asking the server
    again (some servers lock an account after a few bad logins).
    """

    host: str
    port: int = 6001
    user: str = ""
    password: str = field(default="", repr=False)
    institution: str = ""
    location: str = ""
    tls: bool = False
    encoding: str = "utf-8"
    error_detection: bool = True
    timeout: float = 5.0
    pool_size: int = 4
    heartbeat_seconds: float = 60.0
    terminal_password: str = field(default="", repr=False)
    language: str = "001"
    tls_verify: bool = True
    tls_ca_file: str | None = None
    login_retry_seconds: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoding", p.check_encoding(self.encoding))
        if self.timeout <= 0:
            raise ValueError("LIBRARYBOT_SIP2_TIMEOUT must be more than 0 seconds")
        if self.pool_size < 1:
            raise ValueError("LIBRARYBOT_SIP2_POOL_SIZE must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"LIBRARYBOT_SIP2_PORT {self.port} is not a TCP port")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Sip2Config:
        """Read ``LIBRARYBOT_SIP2_*`` settings; raises ``ValueError`` naming what is missing or wrong."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str = "") -> str:
            return env.get(f"LIBRARYBOT_SIP2_{name}", default).strip()

        host = get("HOST")
        if not host:
            raise ValueError("LIBRARYBOT_SIP2_HOST is not set: the host name of the library's SIP2 server")
        try:
            port = int(get("PORT", "6001"))
            timeout = float(get("TIMEOUT", "5"))
            pool_size = int(get("POOL_SIZE", "4"))
            heartbeat = float(get("HEARTBEAT_SECONDS", "60"))
        except ValueError as exc:
            raise ValueError(f"a LIBRARYBOT_SIP2_* number is not a number: {exc}") from None
        return cls(
            host=host,
            port=port,
            user=get("USER"),
            password=env.get("LIBRARYBOT_SIP2_PASSWORD", ""),
            institution=get("INSTITUTION"),
            location=get("LOCATION"),
            tls=_env_bool(get("TLS", "false")),
            encoding=get("ENCODING", "utf-8") or "utf-8",
            error_detection=_env_bool(get("ERROR_DETECTION", "true")),
            timeout=timeout,
            pool_size=pool_size,
            heartbeat_seconds=heartbeat,
            terminal_password=env.get("LIBRARYBOT_SIP2_TERMINAL_PASSWORD", ""),
            tls_verify=_env_bool(get("TLS_VERIFY", "true")),
            tls_ca_file=get("TLS_CA_FILE") or None,
        )

    @property
    def address(self) -> str:
        """``host:port``, for messages."""
        return f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context when ``tls`` is on (stunnel in front of the SIP server is common)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if not self.tls_verify:
            # Self-signed certificates on a library's own stunnel are common; the operator chose this.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class _LoginGate:
    """Remembers a refused login, shared by a pool's connections, so we stop knocking for a while."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.refused_until = 0.0
        self.reason = ""

    def check(self) -> None:
        if time.monotonic() < self.refused_until:
            raise Sip2LoginRefused(self.reason + " (not asked again yet)")

    def refuse(self, reason: str) -> None:
        self.reason = reason
        self.refused_until = time.monotonic() + self.seconds


class _EncodingWatch:
    """Warns once (per pool) when answers look like another encoding than the configured one."""

    def __init__(self) -> None:
        self.warned = False
        self.suspected: str | None = None

    def look(self, data: bytes, configured: str, address: str, *, decode_errors: bool = False) -> None:
        """Look at one answer's bytes: the first that seem to be in another encoding (or that do not
        decode at all) get the warning; later ones are not told again."""
        if self.warned:
            return
        guess = p.guess_encoding(data, configured)
        if guess is None and not decode_errors:
            return
        self.warned = True
        self.suspected = guess
        if guess is None:
            log.warning(
                "SIP2: an answer from %s is not valid %s; odd characters were replaced — check "
                "LIBRARYBOT_SIP2_ENCODING (many Chinese systems use gb18030)",
                address,
                configured,
            )
            return
        log.warning(
            "SIP2: the library system at %s seems to send %s, but LIBRARYBOT_SIP2_ENCODING is %s: names and "
            "titles are garbled — check LIBRARYBOT_SIP2_ENCODING: set LIBRARYBOT_SIP2_ENCODING=%s "
            "(or change the server's encoding)",
            address,
            guess,
            configured,
            guess,
        )


class _ConnectionLost(Exception):
    """The server closed or reset the connection; ``sent`` says whether our request was written."""

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.sent = sent


class Sip2Client:
    """One SIP2 connection, opened and logged in on first use, reopened when the server drops it.

    Methods may be called concurrently; they queue on the connection (use ``Sip2Pool`` to run them
    side by side). ``clock`` supplies transaction timestamps (tests inject a fixed one).
    """

    def __init__(self, config: Sip2Config, clock: Clock = local_now, *, name: str = "sip2") -> None:
        self.config = config
        self.name = name
        self._clock = clock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = 0
        self._lock = asyncio.Lock()
        self._last_used = 0.0
        self._gate = _LoginGate(config.login_retry_seconds)
        self._encoding_watch = _EncodingWatch()
        self.requests_sent = 0  # counters for the benchmark and the check screen
        self.connections_opened = 0

    # -- public API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is open (it may still turn out to be closed by the server)."""
        return self._writer is not None and not self._writer.is_closing()

    @property
    def busy(self) -> bool:
        """True while a request is in flight on this connection."""
        return self._lock.locked()

    def idle_seconds(self) -> float:
        """Seconds since the last exchange on this connection."""
        return time.monotonic() - self._last_used

    async def login(self) -> None:
        """Open the connection and log in (93) if not already; raises ``Sip2LoginRefused`` on 940."""
        async with self._lock:
            await self._ready()

    async def sc_status(self) -> p.ScStatus:
        """99 SC Status → what the server is and allows (online, renew policy, supported messages)."""
        msg = await self.request(p.sc_status_request())
        return p.ScStatus.from_message(msg)

    async def patron_status(self, patron: str, pin: str = "") -> p.PatronStatus:
        """23 Patron Status: is the reader known (``valid_patron``), is the PIN right, any blocks."""
        c = self.config
        req = p.patron_status_request(
            c.institution,
            patron,
            pin,
            now=self._clock(),
            terminal_password=c.terminal_password,
            language=c.language,
        )
        return p.PatronStatus.from_message(await self.request(req))

    async def patron_information(
        self,
        patron: str,
        pin: str = "",
        summary: str | None = "charged",
        start: int | None = 1,
        end: int | None = None,
    ) -> p.PatronInfo:
        """63 Patron Information with one item list: ``summary`` is ``charged`` (loans), ``hold``,
        ``overdue``, ``fine``, ``recall``, ``unavailable`` or None; items ``start``..``end`` (1-based,
        ``end`` defaults to ``start`` + 99; ``start=None`` sends no range)."""
        c = self.config
        req = p.patron_information_request(
            c.institution,
            patron,
            pin,
            now=self._clock(),
            summary=summary,
            start=start,
            end=end,
            terminal_password=c.terminal_password,
            language=c.language,
        )
        return p.PatronInfo.from_message(await self.request(req))

    async def item_information(self, barcode: str) -> p.ItemInfo:
        """17 Item Information: status, title, due date, locations."""
        c = self.config
        req = p.item_information_request(
            c.institution, barcode, now=self._clock(), terminal_password=c.terminal_password
        )
        return p.ItemInfo.from_message(await self.request(req))

    async def renew(
        self, patron: str, pin: str, barcode: str, *, fee_acknowledged: bool | None = False
    ) -> p.RenewResult:
        """29 Renew one loan. A refusal is a result (``ok`` False, reason in ``screen_messages``).

        Never retried once written; if the connection fails after that, ``Sip2Unavailable`` has
        ``may_have_reached_server`` set.
        """
        c = self.config
        req = p.renew_request(
            c.institution,
            patron,
            pin,
            barcode,
            now=self._clock(),
            fee_acknowledged=fee_acknowledged,
            terminal_password=c.terminal_password,
        )
        result = p.RenewResult.from_message(await self.request(req))
        if result.ok:
            log.info("SIP2 renew of %s: renewed, due %s", barcode, result.due_date_text or "?")
        else:
            log.info(
                "SIP2 renew of %s refused by the library system: %s", barcode, _reason(result.screen_messages)
            )
        return result

    async def renew_all(
        self, patron: str, pin: str, *, fee_acknowledged: bool | None = False
    ) -> p.RenewAllResult:
        """65 Renew All. Never retried once written."""
        c = self.config
        req = p.renew_all_request(
            c.institution,
            patron,
            pin,
            now=self._clock(),
            fee_acknowledged=fee_acknowledged,
            terminal_password=c.terminal_password,
        )
        result = p.RenewAllResult.from_message(await self.request(req))
        log.info(
            "SIP2 renew all: %s renewed, %s not renewed%s",
            result.renewed_count,
            result.unrenewed_count,
            f" ({_reason(result.screen_messages)})" if result.screen_messages else "",
        )
        return result

    async def hold(
        self,
        patron: str,
        pin: str,
        barcode_or_title: str,
        mode: str = "+",
        *,
        by_title: bool = False,
        pickup_location: str | None = None,
        expiration: dt.datetime | None = None,
        hold_type: int | None = None,
        fee_acknowledged: bool | None = None,
    ) -> p.HoldResult:
        """15 Hold: ``mode`` ``+`` place, ``-`` cancel, ``*`` change; on an item barcode, or a
        title when ``by_title``. Never retried once written."""
        c = self.config
        req = p.hold_request(
            c.institution,
            patron,
            pin,
            now=self._clock(),
            mode=mode,
            item=None if by_title else barcode_or_title,
            title=barcode_or_title if by_title else None,
            expiration=expiration,
            pickup_location=pickup_location,
            hold_type=hold_type,
            fee_acknowledged=fee_acknowledged,
            terminal_password=c.terminal_password,
        )
        result = p.HoldResult.from_message(await self.request(req))
        what = p.HOLD_MODES[mode]
        if result.ok:
            log.info("SIP2 hold (%s) on %s: done", what, barcode_or_title)
        else:
            log.info(
                "SIP2 hold (%s) on %s refused: %s", what, barcode_or_title, _reason(result.screen_messages)
            )
        return result

    async def end_session(self, patron: str, pin: str = "") -> p.EndSessionResult:
        """35 End Patron Session (some servers keep per-patron state until told)."""
        c = self.config
        req = p.end_session_request(
            c.institution, patron, pin, now=self._clock(), terminal_password=c.terminal_password
        )
        return p.EndSessionResult.from_message(await self.request(req))

    async def heartbeat(self) -> bool:
        """Send a 99 on an open, idle connection to keep it (and the server's session) alive.

        Returns False, having dropped the connection, when the server did not answer; the next
        request opens a fresh one. Does nothing (True) when not connected or busy.
        """
        if not self.connected or self.busy:
            return True
        async with self._lock:
            if not self.connected:
                return True
            try:
                await self._exchange(p.sc_status_request(), "98")
                return True
            except (Sip2Exception, _ConnectionLost) as exc:
                log.warning(
                    "SIP2 %s heartbeat to %s failed (%s); will reconnect on next use",
                    self.name,
                    self.config.address,
                    exc,
                )
                self._drop()
                return False

    async def request(self, req: p.Sip2Request, *, idempotent: bool | None = None) -> p.Sip2Message:
        """Send any request and return its parsed response (the typed methods use this).

        ``idempotent`` defaults to what the message code says; only idempotent requests are
        retried (once, on a fresh connection) when the server closes the connection under them.
        """
        expect = p.RESPONSE_CODES.get(req.code)
        if expect is None:
            raise p.Sip2BadRequest(f"no response is defined for a {req.code} message")
        retry = req.idempotent if idempotent is None else idempotent
        async with self._lock:
            for attempt in (1, 2):
                try:
                    await self._ready()
                    if not retry and self.idle_seconds() > PROBE_AFTER_IDLE_SECONDS:
                        await self._probe()
                except Sip2Unavailable as exc:
                    if not exc.may_have_reached_server:
                        raise
                    # Connecting or logging in failed: our request was never written, whatever
                    # the login or the probe left unanswered.
                    raise Sip2Unavailable(str(exc), may_have_reached_server=False) from None
                try:
                    return await self._exchange(req, expect)
                except _ConnectionLost as lost:
                    self._drop()
                    if attempt == 1 and (retry or not lost.sent):
                        log.info(
                            "SIP2 %s: %s closed the connection during %s (%s); %s, retrying once on a fresh connection",
                            self.name,
                            self.config.address,
                            req.name,
                            lost,
                            "it is safe to repeat" if retry else "it was never sent",
                        )
                        continue
                    if lost.sent and not retry:
                        log.warning(
                            "SIP2 %s: %s closed the connection after our %s was sent (%s); it may or may not have "
                            "been done, and is not sent again",
                            self.name,
                            self.config.address,
                            req.name,
                            lost,
                        )
                    raise Sip2Unavailable(
                        f"the library system at {self.config.address} closed the connection during {req.name}: {lost}"
                        + ("; it may have been done" if lost.sent and not retry else ""),
                        may_have_reached_server=lost.sent,
                    ) from None
                except BaseException:
                    # Timeouts, unreadable answers, cancellation: the connection's state is unknown,
                    # and a late answer must not be taken for the next request's.
                    self._drop()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the connection (no end-of-session message: SIP2 has none for the SC itself)."""
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- connection management ----------------------------------------------------------------

    async def _ready(self) -> None:
        """Make sure there is an open, logged-in connection (caller holds the lock)."""
        self._gate.check()
        if self._writer is not None and await self._closed_by_server():
            log.info("SIP2 %s: %s closed the idle connection; reconnecting", self.name, self.config.address)
            self._drop()
        if self._writer is not None:
            return
        await self._connect()
        try:
            await self._login_on_connection()
        except BaseException:
            self._drop()
            raise
        if await self._closed_by_server():
            self._drop()
            log.warning("SIP2 %s: %s closed the connection right after login", self.name, self.config.address)
            raise Sip2Unavailable(
                f"the library system at {self.config.address} closed the connection right after login; "
                "check its SIP2 server settings (does it drop every connection after one message?)"
            )

    async def _closed_by_server(self) -> bool:
        """True when the server has closed this connection (checked before writing anything)."""
        # Two turns of the event loop let an EOF that is already in the socket be noticed: one to
        # poll the socket, one to run the callback that marks the reader.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert self._reader is not None and self._writer is not None
        return self._reader.at_eof() or self._writer.is_closing()

    async def _connect(self) -> None:
        c = self.config
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(
                    c.host,
                    c.port,
                    ssl=c.ssl_context(),
                    limit=MAX_MESSAGE_BYTES,
                    server_hostname=c.host if c.tls else None,
                ),
                timeout=c.timeout,
            )
        except TimeoutError:
            log.warning("SIP2 %s: no connection to %s within %.1f s", self.name, c.address, c.timeout)
            raise Sip2Unavailable(
                f"the library system at {c.address} did not accept a connection within {c.timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            log.warning("SIP2 %s: cannot connect to %s: %s", self.name, c.address, exc)
            raise Sip2Unavailable(f"cannot connect to the library system at {c.address}: {exc}") from None
        self._seq = 0
        self._last_used = time.monotonic()
        self.connections_opened += 1
        log.debug("SIP2 %s: connected to %s%s", self.name, c.address, " (TLS)" if c.tls else "")

    async def _login_on_connection(self) -> None:
        c = self.config
        if not c.user:
            return  # some servers need no login; without a user there is nothing to send
        try:
            msg = await self._exchange(p.login_request(c.user, c.password, c.location), "94")
        except _ConnectionLost as lost:
            raise Sip2Unavailable(
                f"the library system at {c.address} closed the connection during login: {lost}"
            ) from None
        except Sip2Unavailable as exc:
            if isinstance(exc, Sip2LoginUnanswered) or not exc.may_have_reached_server:
                raise
            raise Sip2LoginUnanswered(
                f"the library system at {c.address} accepted a connection but did not answer our login "
                f"within {c.timeout:g} s (does it allow this account fewer connections?)"
            ) from None
        if not p.LoginResult.from_message(msg).ok:
            reason = (
                f"the library system at {c.address} refused the SIP2 login of user {c.user!r} "
                f"(location {c.location!r}); check LIBRARYBOT_SIP2_USER/PASSWORD/LOCATION and the server's account"
            )
            log.error("SIP2 %s: login refused (940) for user %r at %s", self.name, c.user, c.address)
            self._gate.refuse(reason)
            raise Sip2LoginRefused(reason)
        log.debug("SIP2 %s: logged in to %s as %s", self.name, c.address, c.user)

    async def _probe(self) -> None:
        """Check an idle connection with a 99 before writing something that must not be retried."""
        try:
            await self._exchange(p.sc_status_request(), "98")
        except (_ConnectionLost, Sip2Exception) as exc:
            log.info(
                "SIP2 %s: idle connection to %s is gone (%s); reconnecting",
                self.name,
                self.config.address,
                exc,
            )
            self._drop()
            await self._ready()

    def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 10
        return seq

    # -- one exchange -------------------------------------------------------------------------

    async def _exchange(self, req: p.Sip2Request, expect: str) -> p.Sip2Message:
        """Write one request and read its response, with the 96/97 resend dance (lock held)."""
        c = self.config
        seq = self._next_seq() if c.error_detection else None
        text = req.build(seq, c.error_detection, c.encoding)
        await self._send(text, first=True)
        asked_resend = resent = 0
        while True:
            data = await self._receive(req)
            # The checksum first: a corrupted message code must lead to a 97 like any corruption.
            trailer = p.trailer_check(data)
            msg = p.parse(data, c.encoding) if trailer is not False else None
            if msg is not None and msg.code == "96":
                # The server could not read our message and did nothing with it, so sending the same
                # bytes again is safe even for a renew.
                if resent >= MAX_RESENDS:
                    raise Sip2Error(
                        f"the library system at {c.address} kept asking for our {req.name} again (96)"
                    )
                resent += 1
                log.warning("SIP2 %s: server asked for our %s again (96); resending", self.name, req.name)
                await self._send(text, first=False)
                continue
            # With error detection on, an answer without AY/AZ cannot be checked: ask again.
            unchecked = c.error_detection and trailer is None
            if msg is None or unchecked:
                name = msg.name if msg is not None else f"answer to our {req.name}"
                problem = "came without its checksum" if unchecked else "failed its checksum"
                # Ask the server to send the same response again; it does not redo the request.
                if asked_resend >= MAX_RESENDS:
                    hint = " (is error detection on at the server? see LIBRARYBOT_SIP2_ERROR_DETECTION)" if unchecked else ""
                    raise Sip2ChecksumError(
                        f"the {name} from {c.address} {problem} {asked_resend + 1} times{hint}: "
                        f"{p.mask(data, c.encoding)}"
                    )
                asked_resend += 1
                log.warning(
                    "SIP2 %s: %s from %s %s (%s); asking for it again (97)",
                    self.name,
                    name,
                    c.address,
                    problem,
                    msg.checksum if msg is not None and msg.checksum else "mangled",
                )
                await self._send(p.resend_request().build(None, c.error_detection, c.encoding), first=False)
                continue
            break
        self._encoding_watch.look(data, c.encoding, c.address, decode_errors=msg.decode_errors)
        # A resent answer (after our 97) carries AY0 from Evergreen's SIPServer and others like it,
        # whatever our request's number was: that is how they resend, not a lost step.
        accepted = {seq, 0} if asked_resend else {seq}
        if seq is not None and msg.sequence is not None and msg.sequence not in accepted:
            raise Sip2Error(
                f"the library system at {c.address} answered sequence {msg.sequence} to our {seq}: out of step"
            )
        if msg.code != expect:
            raise Sip2Error(
                f"the library system at {c.address} answered our {req.name} with a {msg.code} ({msg.name}), "
                f"not a {expect}"
            )
        unknown = msg.unknown_fields()
        if unknown:
            log.debug(
                "SIP2 %s: fields without a name in %s: %s", self.name, msg.name, [code for code, _ in unknown]
            )
        return msg

    async def _send(self, text: str, *, first: bool) -> None:
        assert self._writer is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("SIP2 %s >>> %s", self.name, p.mask(text))
        try:
            self._writer.write(text.encode(self.config.encoding) + b"\r")
            await asyncio.wait_for(self._writer.drain(), timeout=self.config.timeout)
        except TimeoutError:
            raise Sip2Unavailable(
                f"the library system at {self.config.address} is not reading our messages (write timed out)",
                may_have_reached_server=True,
            ) from None
        except (ConnectionError, OSError) as exc:
            # A failing first write means the connection was already gone and asyncio dropped the
            # bytes: the request never left. A failing resend comes after the request itself did.
            raise _ConnectionLost(f"{type(exc).__name__}: {exc}", sent=not first) from None
        self.requests_sent += 1
        self._last_used = time.monotonic()

    async def _receive(self, req: p.Sip2Request) -> bytes:
        assert self._reader is not None
        c = self.config
        try:
            data = await asyncio.wait_for(self._reader.readuntil(b"\r"), timeout=c.timeout)
        except TimeoutError:
            log.warning(
                "SIP2 %s: no answer from %s to %s within %.1f s", self.name, c.address, req.name, c.timeout
            )
            raise Sip2Unavailable(
                f"the library system at {c.address} did not answer our {req.name} within {c.timeout:g} s",
                may_have_reached_server=True,
            ) from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                log.warning(
                    "SIP2 %s: %s closed the connection in the middle of its answer to %s (%d bytes)",
                    self.name,
                    c.address,
                    req.name,
                    len(exc.partial),
                )
                raise Sip2Error(
                    f"truncated answer to our {req.name} from {c.address}: the connection closed after "
                    f"{len(exc.partial)} bytes without the closing CR"
                ) from None
            raise _ConnectionLost(
                "EOF: the server closed the connection without answering", sent=True
            ) from None
        except asyncio.LimitOverrunError:
            raise Sip2Error(
                f"an answer from {c.address} is longer than {MAX_MESSAGE_BYTES} bytes without a CR"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise _ConnectionLost(f"{type(exc).__name__}: {exc}", sent=True) from None
        self._last_used = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("SIP2 %s <<< %s", self.name, p.mask(data, c.encoding))
        return data


def _reason(messages: list[str]) -> str:
    return " / ".join(m for m in messages if m) or "no reason given"


class Sip2Pool:
    """A few ``Sip2Client`` connections shared by concurrent callers, with a heartbeat.

    Each call takes a free connection (waiting for one if all are busy), so concurrent requests
    run on different connections. Connections open lazily and log in when opened. Use as
    ``async with Sip2Pool(config) as pool: ...`` or call ``close()``.
    """

    def __init__(self, config: Sip2Config, clock: Clock = local_now) -> None:
        self.config = config
        gate = _LoginGate(config.login_retry_seconds)
        watch = _EncodingWatch()
        self.clients = [Sip2Client(config, clock, name=f"sip2-{i + 1}") for i in range(config.pool_size)]
        for client in self.clients:
            client._gate = gate  # one refused login stops every connection from trying
            client._encoding_watch = watch  # and one warning about the encoding is enough
        #: How many connections the account may hold, once a login went unanswered; None: not seen.
        self.connection_limit: int | None = None
        self._free: asyncio.Queue[Sip2Client] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _start(self) -> asyncio.Queue[Sip2Client]:
        if self._closed:
            raise Sip2Error("this SIP2 pool is closed")
        if self._free is None:
            # Last in, first out: a light load keeps reusing the warm, logged-in connection and
            # the others are never opened; a burst opens as many as it needs.
            self._free = asyncio.LifoQueue()
            for client in self.clients:
                self._free.put_nowait(client)
            if self.config.heartbeat_seconds > 0:
                self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="sip2-heartbeat")
        return self._free

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Sip2Client]:
        """Borrow one connection for several requests in a row (e.g. patron info then renew)."""
        free = self._start()
        client = await self._free_client(free)
        try:
            yield client
        finally:
            free.put_nowait(client)

    async def _free_client(self, free: asyncio.Queue[Sip2Client]) -> Sip2Client:
        """The next free connection still in the pool (retired ones are dropped as they come up)."""
        while True:
            client = await free.get()
            if client in self.clients:
                return client

    async def login(self) -> None:
        """Open and log in every connection now (instead of on first use), one after another, so a
        server that allows fewer connections shrinks the pool instead of failing it."""
        self._start()
        for client in list(self.clients):
            try:
                await client.login()
            except Sip2LoginUnanswered:
                if not self._retire(client):
                    raise

    async def _use(self, work: Callable[[Sip2Client], Awaitable[T]]) -> T:
        """Run ``work`` on a free connection. When its login goes unanswered while other connections
        of the pool are logged in, the account holds no more connections than those: this one
        leaves the pool for good and the work runs on one that works (nothing was sent on it)."""
        free = self._start()
        while True:
            client = await self._free_client(free)
            give_back = True
            try:
                return await work(client)
            except Sip2LoginUnanswered:
                if not self._retire(client):
                    raise
                give_back = False  # retired: not given back, and the work goes to another one
            finally:
                if give_back:
                    free.put_nowait(client)

    def _retire(self, client: Sip2Client) -> bool:
        """Take ``client`` out of the pool after its login went unanswered; False (kept) when no
        other connection is logged in, so the server may simply be down."""
        if client not in self.clients:
            return True  # already taken out by a shrink while its login hung: the work goes on
        others = [c for c in self.clients if c is not client and c.connected]
        if not others:
            return False
        # The logged-in ones are what the account may hold: the never-opened ones go too, so no
        # later burst waits for their logins to go unanswered.
        self.clients = others
        self.connection_limit = len(self.clients)
        log.warning(
            "SIP2: the library system at %s did not answer a login on %s while %d other connection(s) were "
            "logged in: it allows this account %d connection(s); the pool now uses %d "
            "(set LIBRARYBOT_SIP2_POOL_SIZE=%d to start with that)",
            self.config.address,
            client.name,
            len(others),
            len(self.clients),
            len(self.clients),
            len(self.clients),
        )
        return True

    async def sc_status(self) -> p.ScStatus:
        """See ``Sip2Client.sc_status``."""
        return await self._use(lambda client: client.sc_status())

    async def patron_status(self, patron: str, pin: str = "") -> p.PatronStatus:
        """See ``Sip2Client.patron_status``."""
        return await self._use(lambda client: client.patron_status(patron, pin))

    async def patron_information(
        self,
        patron: str,
        pin: str = "",
        summary: str | None = "charged",
        start: int | None = 1,
        end: int | None = None,
    ) -> p.PatronInfo:
        """See ``Sip2Client.patron_information``."""
        return await self._use(lambda client: client.patron_information(patron, pin, summary, start, end))

    async def item_information(self, barcode: str) -> p.ItemInfo:
        """See ``Sip2Client.item_information``."""
        return await self._use(lambda client: client.item_information(barcode))

    async def renew(
        self, patron: str, pin: str, barcode: str, *, fee_acknowledged: bool | None = False
    ) -> p.RenewResult:
        """See ``Sip2Client.renew``."""
        return await self._use(lambda client: client.renew(patron, pin, barcode, fee_acknowledged=fee_acknowledged))

    async def renew_all(
        self, patron: str, pin: str, *, fee_acknowledged: bool | None = False
    ) -> p.RenewAllResult:
        """See ``Sip2Client.renew_all``."""
        return await self._use(lambda client: client.renew_all(patron, pin, fee_acknowledged=fee_acknowledged))

    async def hold(
        self,
        patron: str,
        pin: str,
        barcode_or_title: str,
        mode: str = "+",
        *,
        by_title: bool = False,
        pickup_location: str | None = None,
        expiration: dt.datetime | None = None,
        hold_type: int | None = None,
        fee_acknowledged: bool | None = None,
    ) -> p.HoldResult:
        """See ``Sip2Client.hold``."""
        return await self._use(
            lambda client: client.hold(
                patron,
                pin,
                barcode_or_title,
                mode,
                by_title=by_title,
                pickup_location=pickup_location,
                expiration=expiration,
                hold_type=hold_type,
                fee_acknowledged=fee_acknowledged,
            )
        )

    async def end_session(self, patron: str, pin: str = "") -> p.EndSessionResult:
        """See ``Sip2Client.end_session``."""
        return await self._use(lambda client: client.end_session(patron, pin))

    async def loans(
        self, patron: str, pin: str = "", *, page_size: int = p.DEFAULT_ITEMS_PER_PAGE
    ) -> tuple[p.PatronInfo, list[p.ItemInfo]]:
        """A reader's loans with their details: 63 (charged items, in pages of ``page_size``), then
        a 17 per loan, the 17s spread over the pool's connections.

        The returned ``PatronInfo`` lists every page's barcodes. If any 17 fails, its exception is
        raised (after the others finish): a list of loans with some silently missing would mislead.
        """
        info = await self.patron_information(patron, pin, summary="charged", start=1, end=page_size)
        barcodes = list(info.charged_items)
        count = info.charged_items_count or 0
        # Ask for more pages only while the server fills whole pages: some ignore BP/BQ and send
        # everything at once, and asking again would list those loans twice.
        while barcodes and len(barcodes) < count and len(barcodes) % page_size == 0:
            page = await self.patron_information(
                patron, pin, summary="charged", start=len(barcodes) + 1, end=len(barcodes) + page_size
            )
            if not page.charged_items:
                break
            barcodes += page.charged_items
        results = await asyncio.gather(*(self.item_information(b) for b in barcodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        items = [r for r in results if isinstance(r, p.ItemInfo)]
        return dataclasses.replace(info, charged_items=barcodes), items

    async def close(self) -> None:
        """Stop the heartbeat and close every connection."""
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        await asyncio.gather(*(client.close() for client in self.clients))

    async def _heartbeat_loop(self) -> None:
        # Checking twice per period keeps every connection's idle time under 1.5 periods.
        interval = self.config.heartbeat_seconds / 2
        while True:
            await asyncio.sleep(interval)
            due = [
                client
                for client in self.clients
                if client.connected
                and not client.busy
                and client.idle_seconds() >= self.config.heartbeat_seconds
            ]
            if due:
                await asyncio.gather(*(client.heartbeat() for client in due), return_exceptions=True)


# ------------------------------------------------------------------------------------------------
# `librarybot sip2 check`


@dataclass(frozen=True)
class Sip2Check:
    """The outcome of ``run_check``: ``ok`` for the exit code, ``report`` for the screen."""

    ok: bool
    report: str
    status: p.ScStatus | None = None
    connection_limit: int | None = None  # connections the account may hold (None: not learned)
    clock_skew: dt.timedelta | None = None  # the server's clock minus the bot's, in the library's zone


_MESSAGE_LABELS_ZH = {
    "patron status": "读者状态",
    "checkout": "借书",
    "checkin": "还书",
    "block patron": "冻结读者",
    "SC/ACS status": "系统状态",
    "request SC/ACS resend": "请求重发",
    "login": "登录",
    "patron information": "读者信息",
    "end patron session": "结束读者会话",
    "fee paid": "缴费",
    "item information": "文献信息",
    "item status update": "文献状态更新",
    "patron enable": "解冻读者",
    "hold": "预约",
    "renew": "续借",
    "renew all": "全部续借",
}

#: What librarybot uses; the check warns when the server says it does not support one.
NEEDED_MESSAGES = (
    "login",
    "SC/ACS status",
    "patron information",
    "item information",
    "renew",
    "renew all",
    "hold",
)


def _pad(label: str, width: int) -> str:
    """Pad to ``width`` terminal columns: Chinese characters take two, so str.ljust misaligns."""
    columns = sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in label)
    return label + " " * max(1, width - columns)


def _yes(flag: bool) -> str:
    return "yes / 是" if flag else "no / 否"


#: A server clock further than this from the bot's (in the library's time zone) is reported as wrong.
CLOCK_TOLERANCE = dt.timedelta(minutes=2)


async def count_connections(config: Sip2Config, first: Sip2Client, clock: Clock = local_now) -> int:
    """How many connections the account may hold, up to ``config.pool_size``: with ``first`` logged
    in, open and log in more until one login goes unanswered (the server then allows no more)."""
    extra: list[Sip2Client] = []
    try:
        for n in range(2, config.pool_size + 1):
            client = Sip2Client(config, clock, name=f"sip2-check-{n}")
            try:
                await client.login()
            except Sip2Unavailable:
                await client.close()
                return n - 1
            extra.append(client)
        return config.pool_size
    finally:
        await asyncio.gather(*(client.close() for client in extra))


def _skew_text(skew: dt.timedelta) -> str:
    seconds = int(abs(skew.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    amount = (f"{hours} h " if hours else "") + (f"{minutes} min " if hours or minutes else "") + f"{secs} s"
    return amount + (" ahead / 快" if skew > dt.timedelta(0) else " behind / 慢")


def clock_skew(server_time: dt.datetime, bot_now: dt.datetime, tz: ZoneInfo | None) -> dt.timedelta:
    """The server's clock (98's date-time sync) minus the bot's now. A naive server time is the
    library's local time (as transaction and due dates are read), so it is read in ``tz``."""
    if server_time.tzinfo is None:
        if tz is None:
            return server_time - bot_now.replace(tzinfo=None)
        server_time = server_time.replace(tzinfo=tz)
    if bot_now.tzinfo is None:
        bot_now = bot_now.replace(tzinfo=tz or dt.UTC)
    return server_time - bot_now


async def run_check(
    config: Sip2Config,
    clock: Clock = local_now,
    *,
    tz: ZoneInfo | None = None,
    now: Clock | None = None,
) -> Sip2Check:
    """Connect, log in, send SC status, and describe what the server supports for a librarian:
    also how many connections the account may hold, and whether the server's clock agrees with the
    bot's in the library's time zone ``tz`` (``now`` is the bot's clock, aware; default: the system's)."""
    lines = [
        f"SIP2 check / SIP2 连接检查 — {config.address}",
        f"  TLS / 加密: {_yes(config.tls)}   Encoding / 编码: {config.encoding}   "
        f"Checksums / 校验: {'on / 开' if config.error_detection else 'off / 关'}",
        "",
    ]

    def row(label: str, value: object) -> None:
        lines.append(f"{_pad(label, 44)}{value}")

    client = Sip2Client(config, clock, name="sip2-check")
    started = time.monotonic()
    try:
        await client.login()
        row(
            "Login / 登录:",
            f"OK as {config.user or '(no login)'} ({(time.monotonic() - started) * 1000:.0f} ms)",
        )
        status = await client.sc_status()
        bot_now = (now or (lambda: dt.datetime.now(dt.UTC)))()
        limit = await count_connections(config, client, clock)
    except Sip2LoginRefused as exc:
        row("Login / 登录:", "REFUSED / 被拒绝")
        lines += ["", str(exc)]
        return Sip2Check(ok=False, report="\n".join(lines))
    except Sip2Unavailable as exc:
        row("Connection / 连接:", "FAILED / 失败")
        lines += ["", str(exc)]
        return Sip2Check(ok=False, report="\n".join(lines))
    except Sip2Error as exc:
        row("Protocol / 协议:", "ERROR / 错误")
        lines += ["", str(exc)]
        return Sip2Check(ok=False, report="\n".join(lines))
    finally:
        await client.close()

    timeout = status.timeout_period
    row("Online / 在线:", _yes(status.online))
    row("Institution / 机构:", status.institution or "-")
    row("Library name / 图书馆名称:", status.library_name or "-")
    row("Terminal location / 终端位置:", status.terminal_location or "-")
    row("Protocol version / 协议版本:", status.protocol_version or "-")
    row("Checkout allowed / 允许借书:", _yes(status.checkout_ok))
    row("Checkin allowed / 允许还书:", _yes(status.checkin_ok))
    row("Renewals allowed (policy) / 允许续借:", _yes(status.renewal_policy))
    row("Status update allowed / 允许状态更新:", _yes(status.status_update_ok))
    row("Offline allowed / 允许脱机:", _yes(status.offline_ok))
    row(
        "Server timeout / 服务器超时:",
        f"{timeout / 10:g} s" if timeout is not None and timeout not in (0, 999) else "unknown / 未知",
    )
    row(
        "Retries allowed / 允许重试:",
        status.retries_allowed if status.retries_allowed not in (None, 999) else "unknown / 未知",
    )
    if limit < config.pool_size:
        row(
            "Connections allowed / 允许的连接数:",
            f"{limit} (LIBRARYBOT_SIP2_POOL_SIZE={config.pool_size}: the bot will use {limit} / "
            f"机器人将只使用 {limit} 个; set LIBRARYBOT_SIP2_POOL_SIZE={limit})",
        )
    else:
        row("Connections allowed / 允许的连接数:", f"at least {limit} / 至少 {limit} (LIBRARYBOT_SIP2_POOL_SIZE)")
    skew: dt.timedelta | None = None
    if status.date_time_sync is not None:
        skew = clock_skew(status.date_time_sync, bot_now, tz)
        row("Server clock / 服务器时间:", f"{status.date_time_sync:%Y-%m-%d %H:%M:%S}")
        zone = f"{tz.key}" if tz is not None else "local / 本机"
        local = bot_now.astimezone(tz) if tz is not None and bot_now.tzinfo is not None else bot_now
        row(f"Bot clock ({zone}) / 机器人时间:", f"{local:%Y-%m-%d %H:%M:%S}")
        if abs(skew) <= CLOCK_TOLERANCE:
            row("Clock skew / 时钟偏差:", f"{_skew_text(skew)} — agrees / 一致")
        else:
            row(
                "Clock skew / 时钟偏差:",
                f"{_skew_text(skew)} — WRONG / 不一致: due dates would be read off by that much; "
                "set LIBRARYBOT_TIMEZONE to the server's zone or fix its clock / "
                "请把 LIBRARYBOT_TIMEZONE 设为服务器所在时区或校准服务器时钟",
            )
    else:
        row("Server clock / 服务器时间:", "not sent / 未提供")
    for message in status.screen_messages:
        row("Message / 信息:", message)
    lines += ["", "Supported messages / 支持的消息:"]
    if status.supported_raw is None:
        lines.append("  (the server did not say / 服务器未说明)")
    else:
        for name in p.SUPPORTED_MESSAGES:
            mark = "x" if name in status.supported_messages else " "
            lines.append(f"  [{mark}] {name} / {_MESSAGE_LABELS_ZH[name]}")
    missing = [name for name in NEEDED_MESSAGES if not status.supports(name)]
    lines.append("")
    if missing:
        lines.append(
            "Not supported but used by librarybot / 本系统需要但服务器不支持: "
            + ", ".join(f"{n} / {_MESSAGE_LABELS_ZH[n]}" for n in missing)
        )
    else:
        lines.append("Everything librarybot uses is supported / 本系统所需功能均已支持")
    if not status.online:
        lines.append("The server says it is OFFLINE / 服务器报告离线")
    return Sip2Check(
        ok=status.online, report="\n".join(lines), status=status, connection_limit=limit, clock_skew=skew
    )


async def check_report(
    config: Sip2Config, clock: Clock = local_now, *, tz: ZoneInfo | None = None, now: Clock | None = None
) -> str:
    """The ``librarybot sip2 check`` screen as text (see ``run_check`` for the pass/fail flag)."""
    return (await run_check(config, clock, tz=tz, now=now)).report
