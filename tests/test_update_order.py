"""One person's updates in one chat are processed one at a time, in order (a conversation reads its
state when an update starts), while other chats go on at the same time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bot.embedded import EmbeddedBot
from bot.i18n import t
from tests.auxil.people import add_card

ASK_PIN = t("en", "account.ask_pin")
LOGIN_FAILED = t("en", "account.login_failed")


def text_update(update_id: int, user_id: int, text: str) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id, "date": int(time.time()), "text": text,
            "entities": [{"type": "bot_command", "offset": 0, "length": len(text)}] if text.startswith("/") else [],
            "chat": {"id": user_id, "type": "private", "first_name": "Ann"},
            "from": {"id": user_id, "is_bot": False, "first_name": "Ann", "language_code": "en"},
        },
    }


async def test_two_answers_to_one_step_arriving_together_are_taken_in_turn(bot_env: EmbeddedBot) -> None:
    await add_card(bot_env.db, "R1001", "5678", "Wang Fang")
    ann = await bot_env.person(1)
    assert ASK_PIN in "\n".join(m["text"] for m in await ann.send("/login R1001"))
    others = [await bot_env.person(100 + k) for k in range(5)]
    # Two PINs for the one "PIN?" step, in the same getUpdates batch, other people's messages
    # among them. Taken in turn: the first (wrong) is refused and the PIN asked again; only then is
    # the second read, as the answer to that new question.
    bot_env.emulator.inject_update(text_update(500_001, 1, "0000"))
    for k, other in enumerate(others):
        bot_env.emulator.inject_update(text_update(500_010 + k, other.user_id, "/hours"))
    bot_env.emulator.inject_update(text_update(500_002, 1, "5678"))

    def said(chat_id: int) -> list[str]:
        return [m["text"] or "" for m in bot_env.emulator.chat_messages(chat_id) if m["from_bot"]]

    def everyone_answered() -> bool:
        return len(said(1)) >= 3 and all(any("Sample Library" in x for x in said(o.user_id)) for o in others)

    for _ in range(300):
        if everyone_answered():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a further answer, if any, would come now
    assert everyone_answered(), said(1)
    assert said(1)[:2] == [ASK_PIN, LOGIN_FAILED], said(1)
    assert len(said(1)) == 3 and "Your card is linked" in said(1)[2], said(1)


async def test_the_lock_of_a_chat_is_dropped_when_it_is_idle(bot_env: EmbeddedBot) -> None:
    people = [await bot_env.person(200 + k) for k in range(20)]
    await asyncio.gather(*(p.send("/hours") for p in people))
    assert bot_env.app is not None
    processor: Any = bot_env.app.update_processor
    for _ in range(100):  # the last update's task finishes just after its answer
        if not processor.locks:
            break
        await asyncio.sleep(0.05)
    assert processor.locks == {}
