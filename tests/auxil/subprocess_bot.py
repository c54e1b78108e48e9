"""The production bot as a separate process (``python -m bot.cli run``), for the tests that kill it.

The Bot API emulator runs in the test's own event loop, so everything here waits asynchronously:
a blocking wait would stop the emulator the bot is talking to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bot.embedded import STAFF_CHAT_ID, TOKEN

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "the bot is running"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BotProcess:
    """One ``librarybot run`` process against the emulator at ``api_url`` and the database ``database_url``.

    Its log (stderr and stdout) goes to ``log_path``; ``webhook_port`` switches it to webhook mode.
    ``log_level`` must be INFO or DEBUG: the process is ready when it logs that it is running.
    """

    def __init__(
        self,
        database_url: str,
        api_url: str,
        log_path: Path,
        *,
        webhook_port: int | None = None,
        webhook_secret: str = "robustness-webhook-secret-0123456789",
        log_level: str = "INFO",
        env: dict[str, str] | None = None,
        open_files: int | None = None,
    ) -> None:
        self.database_url = database_url
        self.api_url = api_url
        self.log_path = log_path
        self.webhook_port = webhook_port
        self.webhook_secret = webhook_secret
        self.log_level = log_level
        self.extra_env = env or {}
        self.open_files = open_files  # the process's limit of open files (RLIMIT_NOFILE), if set
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}/webhook"

    def environment(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
        env = {
            **base,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "LIBRARYBOT_TELEGRAM_API_URL": self.api_url,
            "LIBRARYBOT_DATABASE_URL": self.database_url,
            "LIBRARYBOT_STAFF_CHAT_ID": str(STAFF_CHAT_ID),
            "LIBRARYBOT_LANGUAGE": "zh",
            "LIBRARYBOT_LOG_LEVEL": self.log_level,
        }
        if self.webhook_port is not None:
            env["LIBRARYBOT_WEBHOOK_URL"] = self.webhook_url
            env["LIBRARYBOT_WEBHOOK_SECRET"] = self.webhook_secret
            env["LIBRARYBOT_LISTEN"] = f"127.0.0.1:{self.webhook_port}"
        env.update(self.extra_env)
        return env

    async def start(self, timeout: float = 30) -> BotProcess:  # noqa: ASYNC109
        """Start the process and wait until it says it is running."""
        args = [sys.executable, "-m", "bot.cli", "run"]
        if self.webhook_port is not None:
            args.append("--webhook")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # The working directory is the log's folder, so a developer's .env is not read.
            self.process = subprocess.Popen(  # noqa: ASYNC220 (Popen returns at once)
                args, stdout=log, stderr=subprocess.STDOUT, env=self.environment(), cwd=self.log_path.parent,
                preexec_fn=self._limit_open_files if self.open_files else None,
            )
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.new_log():
            if self.process.poll() is not None:
                raise RuntimeError(f"the bot exited with {self.process.returncode}:\n{self.new_log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the bot did not start in {timeout} s:\n{self.new_log()[-3000:]}")
            await asyncio.sleep(0.05)
        return self

    def _limit_open_files(self) -> None:
        import resource

        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def new_log(self) -> str:
        """What this run of the process has logged so far."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def log(self) -> str:
        """Everything logged to ``log_path`` (by every run)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a power cut or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    async def terminate(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        """SIGTERM (what systemd sends on stop) and wait for the exit; the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the bot did not stop within {timeout} s of SIGTERM")
            await asyncio.sleep(0.05)
        return int(self.process.returncode)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time the process used so far (Linux)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_memory_mb(self) -> float:
        """The process's peak resident memory (VmHWM), in MiB (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0
