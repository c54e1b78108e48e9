"""Per-user flood control (``bot.gate.FloodControl``): a person sending fifty messages in ten seconds
is slowed down with one polite message, and nobody else notices."""

from __future__ import annotations

import asyncio

from bot.embedded import EmbeddedBot
from bot.gate import FLOOD_LIMIT, FloodControl
from bot.i18n import t
from tests.auxil.chat import Chat

HOURS = "Sample Library"
SLOW_DOWN = t("en", "common.slow_down")


def flood_control(env: EmbeddedBot) -> FloodControl:
    assert env.app is not None
    return next(h.callback for h in env.app.handlers[-1] if isinstance(getattr(h, "callback", None), FloodControl))


def count(chat: Chat, needle: str) -> int:
    return sum(1 for m in chat.bot_messages() if needle in (m["text"] or ""))


async def test_fifty_messages_in_ten_seconds_get_one_polite_message_and_others_are_not_affected(bot_env: EmbeddedBot) -> None:
    flooder = Chat(bot_env, 1)
    neighbour = Chat(bot_env, 2)
    await flooder.send("/start")  # (a new user's first messages arriving all at once: see the report)
    await neighbour.send("/start")

    async def flood() -> None:
        await asyncio.gather(*(flooder.send("/hours") for _ in range(50)))

    async def live_normally() -> list[str]:
        answers = []
        for _ in range(5):
            answers.append("\n".join(m["text"] for m in await neighbour.send("/hours")))
            await asyncio.sleep(0.1)
        return answers

    _, neighbour_answers = await asyncio.gather(flood(), live_normally())
    assert count(flooder, SLOW_DOWN) == 1  # one polite message, not fifty
    assert count(flooder, HOURS) == FLOOD_LIMIT - 1  # /start counted; the rest is not answered while the flood lasts
    assert all(HOURS in answer for answer in neighbour_answers)  # the neighbour notices nothing
    assert count(neighbour, SLOW_DOWN) == 0


async def test_a_slowed_person_is_answered_again_once_the_window_has_passed(bot_env: EmbeddedBot) -> None:
    gate = flood_control(bot_env)
    gate.window = 1.0  # the same rule on a shorter clock, to keep the test fast
    flooder = Chat(bot_env, 1)
    for _ in range(FLOOD_LIMIT + 5):
        await flooder.send("/hours")
    assert count(flooder, SLOW_DOWN) == 1
    await asyncio.sleep(1.2)
    assert HOURS in "\n".join(m["text"] for m in await flooder.send("/hours"))
    for _ in range(FLOOD_LIMIT + 5):  # a second flood later gets its own single reminder
        await flooder.send("/hours")
    assert count(flooder, SLOW_DOWN) == 2
