"""The bot and the Bot API emulator in one process: the demo, the end-to-end tests and the
benchmarks all run the production bot this way, talking HTTP to the emulator."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web
from telegram.ext import Application

from bot.context import Services
from bot.emulator import Emulator, Person
from bot.runner import start_bot, stop_bot
from bot.settings import Settings
from storage.db import Database
from storage.policy import Policy

TOKEN = "123456789:EMULATOR-token-not-a-secret-000000"
STAFF_CHAT_ID = -1001000000001


class EmbeddedBot:
    """A started emulator and a bot polling it; ``restart()`` simulates a process restart."""

    def __init__(self, emulator: Emulator, settings: Settings, db: Database, policy: Policy) -> None:
        self.emulator = emulator
        self.settings = settings
        self.db = db
        self.policy = policy
        self.app: Application | None = None  # type: ignore[type-arg]
        self.people: list[Person] = []
        self.clock_offset = dt.timedelta()

    @classmethod
    async def start(
        cls,
        db: Database,
        *,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        emulator: Emulator | None = None,
        **settings: Any,
    ) -> EmbeddedBot:
        """Start the emulator (unless one is given) and the bot against it; ``settings`` override
        the defaults by field name (``staff_chat_id=…``, ``broadcast_rate=…``)."""
        holder: list[EmbeddedBot] = []
        if emulator is None:
            emulator = Emulator(token=TOKEN)
            # The demo serves the emulator's web app: it gets the same health check as webhook mode.
            emulator.app.router.add_get("/healthz", _healthz(holder))
            await emulator.start(host, port)
        values: dict[str, Any] = {
            "database_url": db.url,
            "telegram_api_url": emulator.base_url,
            "staff_chat_id": STAFF_CHAT_ID,
            "language": "zh",
            **settings,
        }
        embedded = cls(emulator, Settings(_env_file=None, **values), db, policy or Policy())  # type: ignore[call-arg]
        holder.append(embedded)
        await embedded._start_app()
        return embedded

    async def _start_app(self) -> None:
        self.app = await start_bot(self.settings, self.db, self.policy, TOKEN, poll_timeout=1)
        self.services.clock_offset = self.clock_offset

    @property
    def services(self) -> Services:
        assert self.app is not None
        svc: Services = self.app.bot_data["services"]
        return svc

    def move_clock(self, delta: dt.timedelta) -> None:
        """Move the bot's clock forward (escalations, reminders, due dates)."""
        self.clock_offset += delta
        self.services.clock_offset = self.clock_offset

    def now(self) -> dt.datetime:
        return self.services.now()

    async def person(self, user_id: int, *, language_code: str = "en", first_name: str = "Test", chat_id: int | None = None) -> Person:
        """A simulated Telegram user chatting with the bot."""
        person = Person(self.emulator.base_url.removesuffix("/bot"), user_id, first_name, language_code, chat_id=chat_id)
        self.people.append(person)
        return person

    async def run_jobs(self) -> None:
        """Run every scheduled job now (as the job queue would at its time)."""
        assert self.app is not None and self.app.job_queue is not None
        for job in self.app.job_queue.jobs():
            await job.run(self.app)

    async def restart(self) -> None:
        """Stop the bot as a process exit would and start a new one on the same database."""
        await self.stop_bot()
        await self._start_app()

    async def stop_bot(self) -> None:
        if self.app is not None:
            await stop_bot(self.app)
            self.app = None

    async def stop(self) -> None:
        await self.stop_bot()
        for person in self.people:
            await person.close()
        await self.emulator.stop()


def _healthz(holder: list[EmbeddedBot]) -> Any:
    """``GET /healthz`` of the embedded bot: database reachability and outbox backlog, as in
    webhook mode (``bot.web``); 503 while the bot is not running or the database is unreachable."""
    from bot.web import health

    async def healthz(_request: web.Request) -> web.Response:
        app = holder[0].app if holder else None
        if app is None:
            return web.json_response({"ok": False, "bot": "stopped"}, status=503)
        ok, report = await health(app)
        return web.json_response({"ok": ok, **report}, status=200 if ok else 503)

    return healthz
