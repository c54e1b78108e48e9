"""``librarybot doctor`` as a person runs it (a separate process) against the emulator: one line per
check, exit 0 when all is well; each problem named on its line and exit 1 when something is wrong."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from bot.embedded import STAFF_CHAT_ID, TOKEN
from bot.emulator import Emulator
from storage.db import Database
from tests.auxil.subprocess_bot import free_port

ROOT = Path(__file__).resolve().parents[1]


async def doctor(tmp_path: Path, emulator: Emulator, db: Database, **env: str) -> tuple[int, list[str]]:
    """Run ``python -m bot.cli doctor`` (without blocking the emulator, which runs in this loop)."""
    values = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))},
        "PYTHONPATH": str(ROOT),
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "LIBRARYBOT_TELEGRAM_API_URL": emulator.base_url,
        "LIBRARYBOT_DATABASE_URL": db.url,
        "LIBRARYBOT_STAFF_CHAT_ID": str(STAFF_CHAT_ID),
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "doctor", cwd=tmp_path, env=values,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines()


def line(lines: list[str], name: str) -> str:
    found = [x for x in lines if x[6:].startswith(name)]
    assert len(found) == 1, (name, lines)
    return found[0]


async def test_doctor_says_all_is_well_and_names_each_problem(db: Database, tmp_path: Path) -> None:
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    try:
        emulator.set_bot_member(STAFF_CHAT_ID, "administrator")
        emulator.make_forum(STAFF_CHAT_ID, {7: "Incidents"})
        code, lines = await doctor(tmp_path, emulator, db, LIBRARYBOT_STAFF_TOPICS="incidents=7")
        assert code == 0, lines
        assert line(lines, "token").startswith("ok") and "@librarybot" in line(lines, "token")
        assert line(lines, "database").startswith("ok") and "schema up to date" in line(lines, "database")
        staff = line(lines, "staff chat")
        assert staff.startswith("ok") and "administrator" in staff and "topics incidents=7" in staff
        assert line(lines, "webhook").startswith("ok") and "long polling" in line(lines, "webhook")
        assert len(lines) == 4  # one line each, no SIP2 configured

        # A topic that does not exist, then the bot removed from the group.
        code, lines = await doctor(tmp_path, emulator, db, LIBRARYBOT_STAFF_TOPICS="incidents=7,ill=99")
        assert code == 1 and "no such topic for ill=99" in line(lines, "staff chat")
        emulator.set_bot_member(STAFF_CHAT_ID, "restricted", can_send_messages=False)
        code, lines = await doctor(tmp_path, emulator, db)
        assert code == 1 and "the bot may not post" in line(lines, "staff chat")
        emulator.set_bot_member(STAFF_CHAT_ID, "kicked")
        code, lines = await doctor(tmp_path, emulator, db)
        assert code == 1 and line(lines, "staff chat").startswith("FAIL") and "not in the group" in line(lines, "staff chat")
        assert "something is wrong: staff chat" in lines[-1]

        # A webhook that Telegram cannot deliver to.
        emulator.set_bot_member(STAFF_CHAT_ID, "member")
        emulator.set_webhook_targets(["http://127.0.0.1:9/hook"])
        emulator.inject_update({"message": {"message_id": 1, "date": 0, "text": "hi", "chat": {"id": 5, "type": "private"},
                                            "from": {"id": 5, "is_bot": False, "first_name": "X"}}})
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(f"{emulator.base_url}{TOKEN}/getWebhookInfo") as answer:
                    if "last_error_message" in (await answer.json())["result"]:
                        break
                await asyncio.sleep(0.05)
        code, lines = await doctor(tmp_path, emulator, db)
        webhook = line(lines, "webhook")
        assert code == 1 and webhook.startswith("FAIL") and "http://127.0.0.1:9/hook" in webhook
        assert "last error" in webhook and "no LIBRARYBOT_WEBHOOK_URL is configured" in webhook
        assert line(lines, "staff chat").startswith("ok")

        # A token Telegram refuses.
        code, lines = await doctor(tmp_path, emulator, db, TELEGRAM_BOT_TOKEN="123456789:" + "x" * 30)
        assert code == 1 and "Telegram refused the token" in line(lines, "token")
        assert line(lines, "database").startswith("ok")
    finally:
        await emulator.stop()


async def test_doctor_reports_a_database_and_a_sip2_server_that_are_not_there(tmp_path: Path) -> None:
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    try:
        missing = Database(f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'x.db'}")
        code, lines = await doctor(
            tmp_path, emulator, missing, LIBRARYBOT_ILS="sip2", LIBRARYBOT_SIP2_HOST="127.0.0.1",
            LIBRARYBOT_SIP2_PORT=str(free_port()), LIBRARYBOT_SIP2_TIMEOUT="2",
        )
        assert code == 1 and "not reachable" in line(lines, "database")
        assert line(lines, "token").startswith("ok")
        assert line(lines, "sip2").startswith("FAIL") and "librarybot sip2 check" in line(lines, "sip2")
        assert len(lines) == 6  # five checks and the summary

        code, lines = await doctor(tmp_path, emulator, missing, LIBRARYBOT_STAFF_TOPICS="incidents=seven")
        assert code == 1 and lines == [
            "librarybot: bad configuration: LIBRARYBOT_STAFF_TOPICS: Value error, LIBRARYBOT_STAFF_TOPICS: 'incidents=seven'"
            " is not kind=thread_id with a kind among overdue, ill, tickets, incidents, reference, events, system"
        ]
    finally:
        await emulator.stop()
