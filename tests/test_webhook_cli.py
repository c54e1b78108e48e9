"""Webhook mode over HTTP, the health check, and the command line's answers to bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from bot.embedded import TOKEN
from bot.emulator import Emulator, Person
from bot.runner import _serve_webhook, start_bot, stop_bot
from bot.settings import Settings
from storage.db import Database
from storage.policy import Policy

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_mode_checks_the_secret_and_answers(db: Database) -> None:
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    port = _free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=db.url,
        telegram_api_url=emulator.base_url,
        webhook_url=f"http://127.0.0.1:{port}/hook",
        webhook_secret="s3cret-webhook-value",
        listen=f"127.0.0.1:{port}",
    )
    app = await start_bot(settings, db, Policy(), TOKEN, poll=False)
    runner = await _serve_webhook(app, settings)
    try:
        async with aiohttp.ClientSession() as http:
            fake = {"update_id": 1, "message": {"message_id": 1, "date": 0, "text": "/start",
                    "chat": {"id": 5, "type": "private"}, "from": {"id": 5, "is_bot": False, "first_name": "X"}}}
            async with http.post(f"http://127.0.0.1:{port}/hook", json=fake) as response:
                assert response.status == 403
            async with http.post(f"http://127.0.0.1:{port}/hook", json=fake,
                                 headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"}) as response:
                assert response.status == 403
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                health = await response.json()
                assert response.status == 200 and health["database"] is True and health["outbox_backlog"] == 0
        person = Person(emulator.base_url.removesuffix("/bot"), 7, "Ann", "en")
        answer = await person.send("/start")
        assert any("Welcome to the library" in (m["text"] or "") for m in answer)
        assert not any(m["chat_id"] == 5 for m in emulator.chat_messages(5) if m["from_bot"])
        await person.close()
    finally:
        await runner.cleanup()
        await stop_bot(app)
        await emulator.stop()


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], capture_output=True, text=True, timeout=60,
        env={**base, **(env or {}), "PYTHONPATH": str(ROOT)}, cwd=cwd,
    )


def test_run_without_a_token_says_so(tmp_path: Path) -> None:
    result = _cli("run", cwd=tmp_path)
    assert result.returncode == 1
    assert "TELEGRAM_BOT_TOKEN is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_malformed_token_says_so(tmp_path: Path) -> None:
    result = _cli("run", env={"TELEGRAM_BOT_TOKEN": "not-a-token"}, cwd=tmp_path)
    assert result.returncode == 1 and "does not look like a bot token" in result.stderr


def test_run_with_a_bad_policy_file_names_the_key(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[circulation]\nmax_renewals = -3\n", encoding="utf-8")
    result = _cli("run", env={"TELEGRAM_BOT_TOKEN": "123456:" + "A" * 30, "LIBRARYBOT_POLICY_FILE": str(policy)}, cwd=tmp_path)
    assert result.returncode == 1
    assert "circulation.max_renewals" in result.stderr and "Traceback" not in result.stderr


def test_run_with_an_unreachable_database_says_so(tmp_path: Path) -> None:
    env = {"TELEGRAM_BOT_TOKEN": "123456:" + "A" * 30,
           "LIBRARYBOT_DATABASE_URL": f"postgresql+asyncpg://nobody@127.0.0.1:{_free_port()}/none"}
    result = _cli("run", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "database is not reachable" in result.stderr and "Traceback" not in result.stderr
    assert "A" * 30 not in result.stderr  # the token is never printed


def test_staff_commands_round_trip(tmp_path: Path) -> None:
    env = {"LIBRARYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"}
    assert _cli("staff", "add", "4242", "--role", "duty_officer", "--name", "Zhao Lei", env=env).returncode == 0
    listed = _cli("staff", "list", env=env)
    assert "4242\tduty_officer\tZhao Lei" in listed.stdout
    invite = _cli("staff", "invite", "--role", "staff", "--bot-username", "DemoLibBot", env=env)
    assert "https://t.me/DemoLibBot?start=inv_" in invite.stdout
    bad = _cli("staff", "add", "1", "--role", "wizard", env=env)
    assert bad.returncode == 1 and "unknown role" in bad.stderr
    assert _cli("staff", "remove", "4242", env=env).returncode == 0
    missing = _cli("staff", "remove", "4242", env=env)
    assert missing.returncode == 1 and "not a staff member" in missing.stderr


def test_run_with_a_token_telegram_rejects_says_so_in_one_line_without_the_token(tmp_path: Path) -> None:
    """A rejected token used to print a 58-line traceback showing it (#13)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unauthorized(BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"ok": False, "error_code": 401, "description": "Unauthorized"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _refuse

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "123456:" + "B" * 35
    try:
        env = {"TELEGRAM_BOT_TOKEN": token, "LIBRARYBOT_TELEGRAM_API_URL": f"http://127.0.0.1:{server.server_port}/bot",
               "LIBRARYBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", "LIBRARYBOT_LOG_LEVEL": "DEBUG"}
        result = _cli("run", env=env, cwd=tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 1
    assert "librarybot: Telegram rejected the bot token" in result.stderr
    assert "Traceback" not in result.stderr
    assert "B" * 35 not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("librarybot:")]
    assert len(errors) == 1
