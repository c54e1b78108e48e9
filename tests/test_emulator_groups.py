"""The emulator's groups change as Telegram's do: an upgrade to a supergroup (new id, service
messages, 400 with ``migrate_to_chat_id`` for the old id), the bot removed or muted (a
``my_chat_member`` update, 403 / 400 on send), and forum topics (``message_thread_id``)."""

from __future__ import annotations

from typing import Any

import aiohttp

from bot.embedded import TOKEN
from bot.emulator import Emulator

GROUP = -5_000_001


async def call(http: aiohttp.ClientSession, emulator: Emulator, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{emulator.base_url}{TOKEN}/{method}", json=params) as answer:
        return answer.status, await answer.json()


async def updates(http: aiohttp.ClientSession, emulator: Emulator) -> list[dict[str, Any]]:
    _, body = await call(http, emulator, "getUpdates", timeout=0)
    found: list[dict[str, Any]] = body["result"]
    if found:
        await call(http, emulator, "getUpdates", offset=found[-1]["update_id"] + 1, timeout=0)
    return found


async def test_upgrade_removal_restriction_and_topics_answer_as_telegram() -> None:
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await call(http, emulator, "sendMessage", chat_id=GROUP, text="before")
            assert status == 200 and body["result"]["chat"]["type"] == "group"

            new_id = emulator.upgrade_group(GROUP)
            assert new_id < -1_000_000_000_000
            service = [u["message"] for u in await updates(http, emulator)]
            assert [(m["chat"]["id"], m.get("migrate_to_chat_id"), m.get("migrate_from_chat_id")) for m in service] == [
                (GROUP, new_id, None), (new_id, None, GROUP)
            ]
            status, body = await call(http, emulator, "sendMessage", chat_id=GROUP, text="after")
            assert status == 400 and body["description"] == "Bad Request: group chat was upgraded to a supergroup chat"
            assert body["parameters"] == {"migrate_to_chat_id": new_id}
            status, body = await call(http, emulator, "sendMessage", chat_id=new_id, text="after")
            assert status == 200 and body["result"]["chat"]["type"] == "supergroup"

            emulator.set_bot_member(new_id, "kicked", by_user=77)
            change = (await updates(http, emulator))[0]["my_chat_member"]
            assert change["chat"]["id"] == new_id and change["from"]["id"] == 77
            assert (change["old_chat_member"]["status"], change["new_chat_member"]["status"]) == ("member", "kicked")
            status, body = await call(http, emulator, "sendMessage", chat_id=new_id, text="x")
            assert status == 403 and body["description"] == "Forbidden: bot was kicked from the group chat"
            status, body = await call(http, emulator, "getChat", chat_id=new_id)
            assert status == 403

            emulator.set_bot_member(new_id, "restricted", can_send_messages=False)
            assert (await updates(http, emulator))[0]["my_chat_member"]["new_chat_member"]["can_send_messages"] is False
            status, body = await call(http, emulator, "sendMessage", chat_id=new_id, text="x")
            assert status == 400 and "not enough rights" in body["description"]
            _, member = await call(http, emulator, "getChatMember", chat_id=new_id, user_id=emulator.bot_user["id"])
            assert member["result"]["status"] == "restricted"

            emulator.set_bot_member(new_id, "administrator")
            emulator.make_forum(new_id, {7: "Incidents"})
            _, chat = await call(http, emulator, "getChat", chat_id=new_id)
            assert chat["result"]["is_forum"] is True
            status, body = await call(http, emulator, "sendMessage", chat_id=new_id, text="in a topic", message_thread_id=7)
            assert status == 200 and body["result"]["message_thread_id"] == 7 and body["result"]["is_topic_message"]
            status, body = await call(http, emulator, "sendMessage", chat_id=new_id, text="general")
            assert status == 200 and "message_thread_id" not in body["result"]
            for method, extra in (("sendMessage", {"text": "x"}), ("sendChatAction", {"action": "typing"})):
                status, body = await call(http, emulator, method, chat_id=new_id, message_thread_id=99, **extra)
                assert status == 400 and body["description"] == "Bad Request: message thread not found"
            assert [m.get("message_thread_id") for m in emulator.messages_api(new_id) if m.get("text") in ("in a topic", "general")] == [7, None]
    finally:
        await emulator.stop()
