"""A live Evergreen SIPServer for tests (#15), and a proxy that garbles its answers on request.

The server is the one in ``../shared/peers/evergreen-sipserver`` (or ``LIBRARYBOT_SIP2_SERVER_DIR``),
started with its own ``start.sh`` on a free port with its own state directory, in UTC. It allows one
connection at a time for its one account, and keeps its library in memory: it starts with nothing
on loan, so tests lend items with a checkout (11) first. ``start`` raises when the server cannot be
started: the tests that use it fail. Only a clone with no server beside it (and without
``LIBRARYBOT_REQUIRE_LIVE_SIP2``, which .ci/run sets) skips them, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from storage.sip2 import protocol as p
from storage.sip2.client import Sip2Client, Sip2Config

ROOT = Path(__file__).resolve().parents[2]
ENV_DIR = "LIBRARYBOT_SIP2_SERVER_DIR"
REQUIRE_LIVE = "LIBRARYBOT_REQUIRE_LIVE_SIP2"  # set by .ci/run: a missing server fails the tests
USER, PASSWORD, INSTITUTION = "scclient", "clientpwd", "UWOLS"
PIN = "6789"  # djfiander's and miker's
ITEMS = ("1565921879", "0440242746", "660")


def server_dir() -> Path:
    """Where the SIPServer is: ``LIBRARYBOT_SIP2_SERVER_DIR``, else ``../shared/peers/evergreen-sipserver``
    beside the repository."""
    configured = os.environ.get(ENV_DIR, "").strip()
    return Path(configured) if configured else ROOT.parent / "shared" / "peers" / "evergreen-sipserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveSipServer:
    """Evergreen's SIPServer with its test library, one per test (its state is in memory)."""

    def __init__(self, state_dir: Path, *, tz: str = "UTC") -> None:
        self.state_dir = state_dir
        self.tz = tz
        self.port = 0
        self.pid: int | None = None

    def start(self) -> None:
        """Start it and wait until it accepts connections; raise ``RuntimeError`` saying why not."""
        folder = server_dir()
        script = folder / "start.sh"
        if not script.is_file():
            raise RuntimeError(
                f"the live SIP2 server is not at {folder} (set {ENV_DIR} to the evergreen-sipserver folder)"
            )
        self.port = free_port()
        env = {**os.environ, "TZ": self.tz}  # the server's clock, for the clock-skew check
        done = subprocess.run(
            ["bash", str(script), str(self.port), str(self.state_dir)],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )
        if done.returncode != 0 or not done.stdout.strip().isdigit():
            raise RuntimeError(
                f"the live SIP2 server did not start (exit {done.returncode}): {done.stderr.strip()[-2000:]}\n"
                "it needs Debian's libnet-server-perl libxml-simple-perl libxml-libxml-perl "
                "libuniversal-require-perl libcache-memcached-perl libclone-perl libxml-parser-perl "
                "libio-multiplex-perl (bash .ci/run installs them)"
            )
        self.pid = int(done.stdout.strip())

    def stop(self) -> None:
        """Stop the server and its worker (start.sh runs it in its own session: one process group)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def syslog(self) -> str:
        path = self.state_dir / "sip-syslog.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def config(self, port: int | None = None, **overrides: object) -> Sip2Config:
        values: dict[str, object] = {
            "host": "127.0.0.1", "port": port or self.port, "user": USER, "password": PASSWORD,
            "institution": INSTITUTION, "location": "", "timeout": 1.0, "heartbeat_seconds": 0, "pool_size": 4,
        }
        return Sip2Config(**{**values, **overrides})  # type: ignore[arg-type]


async def lend(server: LiveSipServer, patron: str, *items: str) -> dict[str, str]:
    """Check ``items`` out to ``patron`` (11) on a connection of its own, closed before returning (the
    account holds one connection at a time). Returns each item's due date as the server sent it."""
    due: dict[str, str] = {}
    # A generous timeout: the server may first be replacing a worker a hung login left behind.
    async with Sip2Client(server.config(timeout=10.0), name="lender") as client:
        for item in items:
            now = dt.datetime.now()  # the server's own clock decides the due date; this is only sent
            fixed = "NN" + p.format_timestamp(now) + " " * 18
            fields = [("AO", INSTITUTION), ("AA", patron), ("AB", item), ("AC", ""), ("AD", PIN)]
            answer = await client.request(p.Sip2Request("11", fixed, fields), idempotent=False)
            assert answer.fixed["ok"] == "1", answer.raw
            due[item] = answer.get("AH") or ""
    return due


class GarblingProxy:
    """A TCP proxy in front of the live server that can spoil its next answer, as a noisy line would:
    ``garble_next(change)`` passes the next server→client message (bytes, CR excluded) through
    ``change``. Counts what the client sent (``sent``)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.sent: list[str] = []
        self._changes: list[Callable[[bytes], bytes]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def garble_next(self, change: Callable[[bytes], bytes]) -> None:
        self._changes.append(change)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def client_to_server() -> None:
            while data := await reader.readuntil(b"\r"):
                self.sent.append(data.decode("utf-8", errors="replace").strip())
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.readuntil(b"\r"):
                if self._changes:
                    data = self._changes.pop(0)(data[:-1]) + b"\r"
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            up_writer.close()
            writer.close()

    def count(self, code: str) -> int:
        return sum(1 for m in self.sent if m.startswith(code))
