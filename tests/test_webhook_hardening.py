"""The webhook server against slow and malformed requests, and the demo's control API against pages
on other sites: a thousand half-sent requests, JSON that is not an update, cross-site and
DNS-rebinding requests."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.embedded import TOKEN
from bot.emulator import Emulator
from bot.runner import _serve_webhook, start_bot, stop_bot
from bot.settings import Settings
from bot.web import MAX_CONNECTIONS, quiet_repeated_errors
from storage.db import Database
from storage.policy import Policy
from tests.auxil.subprocess_bot import ROOT, BotProcess, free_port
from tests.test_acknowledged import answers, hours_update

SECRET = "robustness-webhook-secret-0123456789"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(token=TOKEN)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


async def test_json_that_is_not_an_update_answers_400(db: Database, emulator: Emulator) -> None:
    port = free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db.url, telegram_api_url=emulator.base_url,
        webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET, listen=f"127.0.0.1:{port}",
    )
    app = await start_bot(settings, db, Policy(), TOKEN, poll=False)
    runner = await _serve_webhook(app, settings)
    try:
        async with aiohttp.ClientSession() as http:
            for body in ("[]", "null", "42", '"text"', "{}", '{"update_id": "1"}', "[" * 100_000, "{" * 50_000, "not json"):
                async with http.post(f"http://127.0.0.1:{port}/hook", data=body, headers={
                    "X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}) as response:
                    assert response.status == 400, (body[:20], response.status)
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
        await stop_bot(app)


async def test_a_thousand_half_sent_requests_do_not_stop_the_bot(db: Database, emulator: Emulator, tmp_path: Path) -> None:
    """Slowloris against the real process, which may open 256 files: the connections over its cap
    are closed at once, the half-sent ones after the read timeout, and meanwhile the health check
    answers and a reader is answered; the log does not fill up."""
    port = free_port()
    bot = BotProcess(db.url, emulator.base_url, tmp_path / "bot.log", webhook_port=port, webhook_secret=SECRET, open_files=256)
    await bot.start()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(1000):
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
            except TimeoutError:
                break  # the server takes no more connections (its files are all in use)
            except OSError:
                continue
            writer.write(b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n")  # and never the end
            held.append(writer)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
        emulator.inject_update(hours_update(300_001, 4242))
        for _ in range(200):
            if answers(emulator, 4242):
                break
            await asyncio.sleep(0.05)
        assert answers(emulator, 4242) == 1
        # The half-sent requests are cut off by the server after its read timeout.
        async def cut_off(writer: asyncio.StreamWriter) -> bool:
            reader = writer.transport.get_protocol()._stream_reader  # type: ignore[attr-defined]
            try:
                return await asyncio.wait_for(reader.read(), 30) == b""
            except (TimeoutError, ConnectionError):
                return False

        closed = sum(await asyncio.gather(*(cut_off(w) for w in held[:50])))
        assert closed == 50
        log = bot.new_log()
        assert "Too many open files" not in log, log[-3000:]
        assert len(log) < 20_000 and len(re.findall("connections open", log)) <= 1, log[-3000:]
    finally:
        for writer in held:
            writer.close()
        bot.kill()


def test_a_repeating_error_is_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    quiet_repeated_errors()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(1000):
            logging.getLogger("asyncio").error("socket.accept() out of system resource")
    assert len([r for r in caplog.records if "out of system resource" in r.getMessage()]) == 1


def test_the_service_may_open_enough_files_for_its_connections() -> None:
    unit = (ROOT / "deploy" / "librarybot.service").read_text(encoding="utf-8")
    limit = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert limit is not None and int(limit.group(1)) >= 2 * MAX_CONNECTIONS


async def test_the_demo_control_api_answers_only_its_own_page(emulator: Emulator) -> None:
    base = emulator.url
    port = emulator.port
    async with aiohttp.ClientSession() as http:
        # A cross-site form post (text/plain needs no permission from the browser): refused.
        async with http.post(f"{base}/_emu/send", data='{"user_id": 7, "text": "/forgetme"}',
                             headers={"Content-Type": "text/plain"}) as response:
            assert response.status == 415
        # JSON from a page on another site: refused.
        async with http.post(f"{base}/_emu/send", json={"user_id": 7, "text": "/incidents"},
                             headers={"Origin": "http://attacker.example"}) as response:
            assert response.status == 403
        # DNS rebinding: the attacker's name resolving to this machine; reading too is refused.
        for method in ("GET", "POST"):
            async with http.request(method, f"{base}/_emu/personas", json={},
                                    headers={"Host": f"attacker.example:{port}"}) as response:
                assert response.status == 403
        # The page cannot send every update (logins included) to another server.
        async with http.post(f"{base}/_emu/webhooks", json={"urls": ["http://attacker.example/"]},
                             headers={"Origin": base}) as response:
            assert response.status in (404, 405)
        assert not emulator._webhook_targets
        # The page itself, and programs on this machine, still work.
        async with http.post(f"{base}/_emu/send", json={"user_id": 7, "text": "hi"}, headers={"Origin": base}) as response:
            assert response.status == 200
        async with http.get(f"http://localhost:{port}/_emu/personas") as response:
            assert response.status == 200
    assert [m["text"] for m in emulator.chat_messages(7) if not m["from_bot"]] == ["hi"]
