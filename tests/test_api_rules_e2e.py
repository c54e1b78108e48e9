"""The real bot against the emulator's Telegram rules (``bot.emulator_rules``): a chat's own flood
limit slows only that chat; the duty officer deleting the live progress message of a broadcast;
a button answered too late. Each through the production ``Application`` over HTTP."""

from __future__ import annotations

import time

import tests.test_broadcast_e2e as emergency
from bot.dispatcher import SendBudget
from bot.embedded import EmbeddedBot

HOURS = "Sample Library"


def budget(env: EmbeddedBot) -> SendBudget:
    assert env.app is not None
    found: SendBudget = env.app.bot_data["send_budget"]
    return found


async def test_a_chat_meeting_its_own_limit_slows_nobody_else(bot_env: EmbeddedBot) -> None:
    """One message every two seconds for one person (no burst): their second answer in a row meets a
    429, waits and arrives; the bot's overall rate is not lowered and pushes do not pause."""
    bot_env.emulator.set_limits(global_rate=30, per_chat_rate=0.5, per_chat_burst=1)
    reader = await emergency.watch(bot_env, 501)
    neighbour = await emergency.watch(bot_env, 502)
    await reader.send("/start")
    answered = await reader.send("/hours", timeout=15)  # refused once for this chat, then sent
    assert HOURS in answered[-1]["text"]
    assert bot_env.emulator.stats.too_many_requests >= 1
    spent = budget(bot_env)
    assert spent.rate == spent.configured and spent.paused_until < time.monotonic()
    other = await neighbour.send("/hours")  # nobody else waits
    assert HOURS in other[-1]["text"]


async def test_the_progress_message_deleted_by_the_duty_officer_is_posted_again(bot_env: EmbeddedBot) -> None:
    await emergency.setup(bot_env)
    duty = await emergency.watch(bot_env, emergency.DUTY)
    preview = await emergency.prepare(duty, "/emergency", "Power outage", "1F Lobby and circulation desk", "Everyone (8)")
    await duty.press(preview[-1]["buttons"][0][0]["text"])
    progress = await emergency.latest(duty, "Broadcast #1</b>")
    bot_env.emulator.user_delete(emergency.DUTY, progress["message_id"])
    done = await emergency.finished(bot_env, duty, 1)
    assert done["message_id"] != progress["message_id"] and not done["deleted"]  # a new one, kept up to date


async def test_a_press_answered_too_late_is_not_an_error_for_the_person(bot_env: EmbeddedBot) -> None:
    """The emulator's clock passes the 15 s a callback query lives while the bot works: the answer is
    refused as "query is too old", and the person still gets the result."""
    reader = await emergency.watch(bot_env, 503)
    shown = await reader.send("/settings")
    original = bot_env.emulator._m_answerCallbackQuery

    async def slow_answer(params: object) -> object:
        bot_env.emulator.clock.advance(16)  # the bot took longer than Telegram waits
        return await original(params)  # type: ignore[arg-type]

    bot_env.emulator._methods["answercallbackquery"] = slow_answer  # type: ignore[assignment]
    label = shown[-1]["buttons"][0][0]["text"]
    changed = await reader.press(label, timeout=15)
    assert bot_env.emulator.callback_answers(503) == []  # Telegram refused the late answer
    assert changed[-1]["edited"] and "Saved: reminders" in changed[-1]["plain"]  # the choice was still saved and shown
