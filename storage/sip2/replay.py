"""A small SIP2 server that answers as a recorded one did, for tests, the demo and the benchmark.

``ReplayServer`` loads request/response pairs recorded from a real server (the Evergreen SIPServer
recordings in ``storage/sip2/recordings``, a copy of ``shared/data/sip2``) and answers each request with the response recorded for the
request with the same message code and key fields (patron AA, item AB, PIN AD, summary…), never
looking at timestamps, sequence numbers or checksums. It then fixes the response's ``AY``/``AZ``
to match the incoming request: error detection on when the request carried it, off otherwise.

It behaves like that server where the recordings show how: a login must come first (except 99),
a bad checksum is answered with 96, 97 resends the last response (with sequence number ``AY0``
and a fresh checksum when the 97 carried one, as the live Evergreen SIPServer does; without
AY/AZ when ``resend_strips_error_detection``), three refused logins close the connection, and requests recorded as ending in "connection
closed" (checkin of an unknown item, fee paid, garbage) close it.

Beyond the recordings, for load it synthesises readers with many loans: each entry of
``synthetic_patrons`` (default ``{"reader30": 30}``, PIN ``SYNTHETIC_PIN``) gets loans with
barcodes ``READER30-001``… (see ``synthetic_items``); 23/63/17/29/65/15/35 on them are answered
from generated data (a 64 with one AU per loan, an 18 per item, renewals that always succeed).

Knobs for tests: ``silent`` (accept, read, never answer), ``close_after_each`` (close after every
response, login included), ``latency`` (seconds before each answer), ``corrupt_next_checksum()``,
``respond_next_with(...)`` (answer the next request with given text or bytes, or close),
``close_connections()`` (drop every open connection, like a server restart). ``received`` lists
the requests as received.

Run standalone: ``python -m storage.sip2.replay --port 6001`` (prints ``READY <port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from storage.sip2 import protocol as p
from storage.sip2.errors import Sip2Error

log = logging.getLogger(__name__)

SYNTHETIC_PIN = "1234"
RECORDINGS = Path(__file__).resolve().parent / "recordings"

# Which fields pick a recorded answer: all of the first group must match; among those, the record
# matching most of the second group wins. Names not of the form XX are fixed fields.
KEY_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "99": ((), ()),
    "23": (("AA",), ("AD",)),
    "63": (("AA",), ("summary", "AD", "BP", "BQ")),
    "17": (("AB",), ()),
    "11": (("AA", "AB"), ("no_block",)),
    "09": (("AB",), ()),
    "29": (("AA", "AB"), ("AD",)),
    "65": (("AA",), ("AD",)),
    "15": (("AA", "hold_mode"), ("AB", "AJ")),
    "35": (("AA",), ()),
    "01": (("AA",), ()),
    "25": (("AA",), ()),
    "19": (("AB",), ()),
    "37": (("AA",), ()),
}


def default_exchanges_path() -> Path:
    """The recorded exchanges shipped with the package (``storage/sip2/recordings``)."""
    return RECORDINGS / "evergreen-sipserver-exchanges.json"


@dataclass
class _Recorded:
    index: int
    label: str
    request: p.Sip2Message
    response: str | None  # None: the server closed the connection instead of answering


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    logged_in: bool = False
    failed_logins: int = 0
    last_response: str | None = None
    close_after_answer: bool = False


@dataclass
class _Injected:
    raw: str | bytes | None
    close: bool


@dataclass
class _SyntheticPatron:
    patron_id: str
    name: str
    items: list[str] = field(default_factory=list)


def _value(msg: p.Sip2Message, key: str) -> str | None:
    if key in msg.fixed:
        return msg.fixed[key]
    return msg.get(key)


def _replace(fields: list[tuple[str, str]], code: str, value: str) -> list[tuple[str, str]]:
    return [(c, value if c == code else v) for c, v in fields]


class ReplayServer:
    """A SIP2 server answering from recorded exchanges (see the module docstring)."""

    def __init__(
        self,
        exchanges_path: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        encoding: str = "utf-8",
        latency: float = 0.0,
        silent: bool = False,
        close_after_each: bool = False,
        require_login: bool = True,
        resend_strips_error_detection: bool = False,
        synthetic_patrons: Mapping[str, int] | None = None,
        clock: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self.host = host
        self.clock = clock  # the server's local time: its timestamps and the synthetic due dates
        self.port = port
        self.encoding = p.check_encoding(encoding)
        self.latency = latency
        self.silent = silent
        self.close_after_each = close_after_each
        self.require_login = require_login
        self.resend_strips_error_detection = resend_strips_error_detection
        self.received: list[str] = []
        self.connections_seen = 0
        self.in_flight = 0  # requests received and not yet answered, and the most at any moment
        self.most_in_flight = 0
        self._recorded = self._load(Path(exchanges_path))
        self._logins = {
            (r.request.get("CN"), r.request.get("CO"))
            for r in self._recorded
            if r.request.code == "93" and r.response is not None and r.response.startswith("941")
        }
        self._pins: dict[str, str] = {}
        for r in self._recorded:
            if r.request.code in ("23", "63") and r.response is not None and "|CQY|" in r.response:
                self._pins[r.request.get("AA") or ""] = r.request.get("AD") or ""
        self._synthetic: dict[str, _SyntheticPatron] = {}
        self._synthetic_items: dict[str, tuple[_SyntheticPatron, int]] = {}
        for patron_id, loans in (
            {"reader30": 30} if synthetic_patrons is None else synthetic_patrons
        ).items():
            self.add_synthetic_patron(patron_id, loans)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._injected: deque[_Injected] = deque()
        self._corrupt_next = False

    # -- set-up ---------------------------------------------------------------------------------

    @staticmethod
    def _load(path: Path) -> list[_Recorded]:
        data = json.loads(path.read_text(encoding="utf-8"))
        recorded: list[_Recorded] = []
        for index, exchange in enumerate(data["exchanges"]):
            try:
                request = p.parse(exchange["sent"])
            except Sip2Error:
                continue  # garbage the recording sent on purpose; we close on garbage anyway
            recv: str = exchange["recv"]
            response = None if recv.startswith("<") else p.strip_error_detection(recv)
            recorded.append(_Recorded(index, exchange.get("label", ""), request, response))
        return recorded

    def add_synthetic_patron(self, patron_id: str, loans: int, name: str | None = None) -> list[str]:
        """Invent a reader with ``loans`` loans (PIN ``SYNTHETIC_PIN``); returns the item barcodes."""
        patron = _SyntheticPatron(patron_id, name or f"Synthetic Reader {patron_id}")
        for n in range(1, loans + 1):
            barcode = f"{patron_id.upper()}-{n:03d}"
            patron.items.append(barcode)
            self._synthetic_items[barcode] = (patron, n)
        self._synthetic[patron_id] = patron
        self._pins[patron_id] = SYNTHETIC_PIN
        return list(patron.items)

    def synthetic_items(self, patron_id: str) -> list[str]:
        """The loans' barcodes of a synthetic reader."""
        return list(self._synthetic[patron_id].items)

    # -- knobs ----------------------------------------------------------------------------------

    def corrupt_next_checksum(self) -> None:
        """Send the next response that carries a checksum with a wrong one (once)."""
        self._corrupt_next = True

    def respond_next_with(self, raw: str | bytes | None, *, close: bool = False) -> None:
        """Answer the next request with ``raw`` instead of the recorded response.

        A ``str`` gets AY/AZ fixed up like a recorded response and is encoded with the server's
        encoding; ``bytes`` go out as they are (add the CR yourself, or omit it to send a message
        cut short); ``None`` sends nothing (the caller times out). With ``close`` the connection
        is closed afterwards.
        """
        self._injected.append(_Injected(raw, close))

    def close_connections(self) -> None:
        """Close every open connection from the server's side now."""
        for conn in self._connections.values():
            conn.writer.close()

    def count(self, code: str) -> int:
        """How many requests with message ``code`` were received."""
        return sum(1 for r in self.received if r.startswith(code))

    # -- running --------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start listening; returns the port (useful with ``port=0``)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("SIP2 replay server listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        self.close_connections()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(writer)
        self._connections[task] = conn
        self.connections_seen += 1
        try:
            while True:
                try:
                    data = await reader.readuntil(b"\r")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                data = data.strip(b"\r\n")
                if not data:
                    continue
                self.received.append(data.decode(self.encoding, errors="replace"))
                if self.silent:
                    continue
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    if self.latency:
                        await asyncio.sleep(self.latency)
                finally:
                    self.in_flight -= 1
                answer = self._answer(conn, data)
                if answer:
                    writer.write(answer)
                    await writer.drain()
                if answer is None or self.close_after_each or conn.close_after_answer:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    # -- answering ------------------------------------------------------------------------------

    def _answer(self, conn: _Connection, data: bytes) -> bytes | None:
        """The bytes to send for one request (CR included; empty: say nothing), or None to close."""
        try:
            req = p.parse(data, self.encoding)
        except Sip2Error as exc:
            log.info("SIP2 replay: unreadable request (%s); closing, as the recorded server does", exc)
            return None
        if req.checksum_ok is False:
            return self._encode(p.build("96", "", [], None, True, self.encoding))
        if self._injected:
            injected = self._injected.popleft()
            conn.close_after_answer = injected.close
            if injected.raw is None:
                return None if injected.close else b""
            if isinstance(injected.raw, bytes):
                conn.last_response = injected.raw.decode(self.encoding, errors="replace").strip("\r\n")
                return injected.raw
            return self._encode(self._finish(conn, p.strip_error_detection(injected.raw), req))
        if req.code == "97":
            if conn.last_response is None:
                return None
            resent = p.strip_error_detection(conn.last_response)
            if not req.error_detection or self.resend_strips_error_detection:
                return self._encode(resent)
            head = resent + "AY0AZ"  # the live server resends with sequence 0, whatever the request's
            return self._encode(head + p.checksum(head, self.encoding))
        if req.code == "93":
            return self._encode(self._finish(conn, self._login(conn, req), req))
        if self.require_login and not conn.logged_in and req.code != "99":
            log.info("SIP2 replay: %s before login; closing, as the recorded server does", req.name)
            return None
        body = self._synthesise(req) if self._is_synthetic(req) else self._lookup(req)
        if body is None:
            return None
        return self._encode(self._finish(conn, body, req))

    def _encode(self, text: str) -> bytes:
        return text.encode(self.encoding, errors="replace") + b"\r"

    def _login(self, conn: _Connection, req: p.Sip2Message) -> str:
        if (req.get("CN"), req.get("CO")) in self._logins:
            conn.logged_in = True
            conn.failed_logins = 0
            return "941"
        conn.failed_logins += 1
        if conn.failed_logins >= 3:
            conn.close_after_answer = True  # the recorded server resets the connection after three
        return "940"

    def _finish(self, conn: _Connection, body: str, req: p.Sip2Message) -> str:
        """Add AY/AZ to a response body when the request had error detection; remember it for 97."""
        if not req.error_detection:
            conn.last_response = body
            return body
        head = body + (f"AY{req.sequence}" if req.sequence is not None else "") + "AZ"
        right = p.checksum(head, self.encoding)
        conn.last_response = body if self.resend_strips_error_detection else head + right
        if self._corrupt_next:
            self._corrupt_next = False
            return head + f"{(int(right, 16) + 1) & 0xFFFF:04X}"
        return head + right

    def _lookup(self, req: p.Sip2Message) -> str | None:
        primary, secondary = KEY_FIELDS.get(req.code, ((), ()))
        candidates = [
            r
            for r in self._recorded
            if r.request.code == req.code and all(_value(r.request, k) == _value(req, k) for k in primary)
        ]
        if not candidates:
            return self._not_found(req)
        # Prefer: most secondary keys equal, then a real answer over a recorded disconnect (those
        # often just follow an earlier crash in the same recorded session), then the earliest.
        best = max(
            candidates,
            key=lambda r: (
                sum(_value(r.request, k) == _value(req, k) for k in secondary),
                r.response is not None,
                -r.index,
            ),
        )
        if best.response is None:
            log.info("SIP2 replay: %r was answered by closing the connection; doing the same", best.label)
            return None
        return self._fix_pin(best.response, req)

    def _fix_pin(self, body: str, req: p.Sip2Message) -> str:
        """Make CQ (valid patron password) say whether this request's PIN is the reader's."""
        if req.code not in ("23", "63") or "|CQ" not in body:
            return body
        msg = p.parse(body, self.encoding)
        patron = req.get("AA") or ""
        valid = "Y" if patron in self._pins and self._pins[patron] == req.get("AD") else "N"
        if msg.get("CQ") == valid:
            return body
        return self._rebuild(msg, _replace(msg.fields, "CQ", valid))

    def _rebuild(self, msg: p.Sip2Message, fields: list[tuple[str, str]]) -> str:
        fixed = [msg.fixed[name] for name, _ in p.FIXED_LAYOUTS[msg.code]]
        return p.build(msg.code, fixed, fields, error_detection=False)

    def _not_found(self, req: p.Sip2Message) -> str | None:
        """Answer for a patron or item the recordings do not have, from the recorded "unknown" answers."""
        template: _Recorded | None = None
        if req.code in ("23", "63"):
            template = next(
                (
                    r
                    for r in self._recorded
                    if r.request.code == req.code and r.response and "|BLN|" in r.response
                ),
                None,
            )
            field_code = "AA"
        elif req.code == "17":
            template = next(
                (
                    r
                    for r in self._recorded
                    if r.request.code == "17" and r.response and r.response.startswith("1801")
                ),
                None,
            )
            field_code = "AB"
        elif req.code == "29":
            template = next(
                (
                    r
                    for r in self._recorded
                    if r.request.code == "29" and r.response and r.response.startswith("300")
                ),
                None,
            )
            field_code = "AB"
        if template is None or template.response is None:
            log.info("SIP2 replay: nothing recorded for this %s; closing the connection", req.name)
            return None
        msg = p.parse(template.response, self.encoding)
        fields = _replace(msg.fields, field_code, req.get(field_code) or "")
        if req.code == "29":
            fields = _replace(_replace(fields, "AA", req.get("AA") or ""), "AF", "Item not checked out")
        return self._rebuild(msg, fields)

    # -- synthetic readers ----------------------------------------------------------------------

    def _is_synthetic(self, req: p.Sip2Message) -> bool:
        return (req.get("AA") in self._synthetic) or (
            req.code == "17" and req.get("AB") in self._synthetic_items
        )

    def _synthesise(self, req: p.Sip2Message) -> str | None:
        local_now = self.clock().replace(microsecond=0)
        now = p.format_timestamp(local_now)
        institution = req.get("AO") or ""
        item_id = req.get("AB") or ""
        due = p.format_timestamp(local_now + dt.timedelta(days=14))
        if req.code == "17":
            patron, n = self._synthetic_items[item_id]
            fields = [
                ("AB", item_id),
                ("AJ", f"Synthetic title {n}"),
                ("AH", due),
                ("CK", "001"),
                ("AQ", "Main"),
                ("BG", institution),
            ]
            return p.build("18", ["04", "01", "01", now], fields, error_detection=False)
        patron = self._synthetic[req.get("AA") or ""]
        pin_ok = _value(req, "AD") == self._pins.get(patron.patron_id)
        head = [("AO", institution), ("AA", patron.patron_id), ("AE", patron.name)]
        if req.code == "23":
            return p.build(
                "24",
                [" " * 14, "001", now],
                [*head, ("BL", "Y"), ("CQ", "Y" if pin_ok else "N")],
                error_detection=False,
            )
        if req.code == "63":
            summary = req.fixed["summary"]
            start = int(req.get("BP") or 1)
            end = int(req.get("BQ") or len(patron.items))
            items = patron.items[start - 1 : end] if summary[2:3] == "Y" else []
            counts = ["0000", "0000", f"{len(patron.items):04d}", "0000", "0000", "0000"]
            fields = [
                *head,
                *(("AU", barcode) for barcode in items),
                ("BL", "Y"),
                ("CQ", "Y" if pin_ok else "N"),
            ]
            return p.build("64", [" " * 14, "001", now, *counts], fields, error_detection=False)
        if req.code == "29":
            if item_id not in patron.items:
                fields = [
                    ("AO", institution),
                    ("AA", patron.patron_id),
                    ("AB", item_id),
                    ("AJ", ""),
                    ("AH", ""),
                    ("AF", "Item not checked out"),
                ]
                return p.build("30", ["0", "N", "U", "N", now], fields, error_detection=False)
            n = self._synthetic_items[item_id][1]
            fields = [
                ("AO", institution),
                ("AA", patron.patron_id),
                ("AB", item_id),
                ("AJ", f"Synthetic title {n}"),
                ("AH", due),
            ]
            return p.build("30", ["1", "Y", "N", "N", now], fields, error_detection=False)
        if req.code == "65":
            fields = [("AO", institution), *(("BM", barcode) for barcode in patron.items)]
            return p.build(
                "66", ["1", f"{len(patron.items):04d}", "0000", now], fields, error_detection=False
            )
        if req.code == "15":
            fields = [("AO", institution), ("AA", patron.patron_id), ("AB", item_id), ("BR", "1")]
            return p.build("16", ["1", "N", now], fields, error_detection=False)
        if req.code == "35":
            return p.build(
                "36", ["Y", now], [("AO", institution), ("AA", patron.patron_id)], error_detection=False
            )
        return None


async def _serve(args: argparse.Namespace) -> None:
    server = ReplayServer(args.data, args.host, args.port, encoding=args.encoding, latency=args.latency)
    port = await server.start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the replay server until interrupted."""
    parser = argparse.ArgumentParser(description="Answer SIP2 requests as the recorded server did.")
    parser.add_argument("--data", default=str(default_exchanges_path()), help="recorded exchanges (JSON)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6001)
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
