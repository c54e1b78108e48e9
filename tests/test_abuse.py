"""Abuse and bad input, property-based (hypothesis): random text, Unicode (right-to-left, zero-width,
emoji, CJK), very long messages, random commands with random arguments, edits, stickers, and random
or forged callback data, to every conversation state, as a visitor, a reader and staff. The bot
never crashes (no handler error reaches the error handler), never answers with a traceback or the
"something went wrong" message, and never shows a visitor or a reader another reader's data.

Examples are bounded and derandomised so CI is stable; each example is a new person, so one
example's conversation does not leak into the next.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from telegram.ext import BaseHandler, CallbackQueryHandler, CommandHandler, ConversationHandler

from bot.commands import DUTY_COMMANDS, READER_COMMANDS, STAFF_COMMANDS
from bot.embedded import EmbeddedBot
from bot.i18n import t
from storage.people import Reader, Role, User, add_staff
from tests.auxil.chat import Chat, relax_flood_control
from tests.auxil.people import others_private_strings, seed_library

ERRORS = {t("en", "common.error"), t("zh", "common.error")}
EXAMPLES = 25
ids = itertools.count(5_000_000)

# Text a person could type: every script the library meets, and the characters that break parsers.
NASTY = [
    "\u202eevil\u202c", "\u200b\u200c\u200d\ufeff", "مرحبا بالمكتبة", "שלום ספרייה", "😀👩‍👩‍👧‍👦🏳️‍🌈", "图书馆 借阅 續借",
    "<b>bold</b><script>x</script>", "&amp; &lt; & < > \"'", "{name} {0} %s %(x)s", "\\N{BULLET}", "../../etc/passwd",
    "'; DROP TABLE users; --", "T-000001", "978-7-111-12345-6", "0", "-1", "9" * 40, "\n\n\n", "\t", " ",
    "/", "//", "/start@librarybot extra", "@librarybot", "\x00", "\ud7ff", "ｆｕｌｌｗｉｄｔｈ", "Ä" * 300,
]
texts = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60),
    st.text(st.sampled_from("abcxyz 0123456789-:/@#_.图书馆借阅😀\u202e\u200bمש"), min_size=1, max_size=30),
    st.integers(1000, 4096).map(lambda n: ("長文 long " * 500)[:n]),
)


def _all_handlers(handlers: list[BaseHandler[Any, Any, Any]]) -> list[BaseHandler[Any, Any, Any]]:
    found: list[BaseHandler[Any, Any, Any]] = []
    for handler in handlers:
        found.append(handler)
        if isinstance(handler, ConversationHandler):
            nested = list(handler.entry_points) + list(handler.fallbacks)
            for state_handlers in handler.states.values():
                nested += list(state_handlers)
            found += _all_handlers(nested)
    return found


def _prefix(pattern: Any) -> str | None:
    """The literal start of a callback pattern such as ``^renew:`` or ``^tk:rate:\\d+:\\d$``."""
    source = getattr(pattern, "pattern", pattern)
    if not isinstance(source, str):
        return None
    match = re.match(r"\^((?:[A-Za-z0-9_:\-]|\\:)*)", source)
    return match.group(1).replace("\\", "") if match else None


class Surface:
    """What the running bot answers to: its commands and the starts of its callback data."""

    def __init__(self, env: EmbeddedBot) -> None:
        assert env.app is not None
        handlers = [h for group in env.app.handlers.values() for h in _all_handlers(group)]
        commands = {c for h in handlers if isinstance(h, CommandHandler) for c in h.commands}
        self.commands = sorted(commands | set(READER_COMMANDS) | set(STAFF_COMMANDS) | set(DUTY_COMMANDS) | {"xyzzy"})
        prefixes = {_prefix(h.pattern) for h in handlers if isinstance(h, CallbackQueryHandler)}
        self.prefixes = sorted(p for p in prefixes if p is not None) or ["x:"]
        self.conversations = [h for group in env.app.handlers.values() for h in group if isinstance(h, ConversationHandler)]


def forged(surface: Surface) -> st.SearchStrategy[str]:
    arg = st.one_of(st.integers(-2, 12).map(str), st.sampled_from(["", "0", "-1", "99999999999999999999", "all", "yes", "*", ":"]),
                    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8))
    return st.builds(
        lambda prefix, args: (prefix + ":".join(args)).encode()[:64].decode("utf-8", "ignore") or "x",
        st.sampled_from(surface.prefixes), st.lists(arg, max_size=4),
    )


def steps(surface: Surface) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("text"), texts),
        st.tuples(st.just("command"), st.sampled_from(surface.commands), st.text(max_size=40)),
        st.tuples(st.just("press"), st.integers(0, 20)),
        st.tuples(st.just("press"), st.integers(0, 3)),
        st.tuples(st.just("forge"), forged(surface)),
        st.tuples(st.just("edit"), texts),
        st.tuples(st.just("sticker")),
        st.tuples(st.just("photo"), st.text(max_size=30)),
    )


class Watch(logging.Handler):
    """Every error the bot logs: a handler that raised, a message id that is missing, …"""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(f"{record.name}: {record.getMessage()}"[:500])


@pytest.fixture
async def abused(bot_env: EmbeddedBot) -> AsyncIterator[dict[str, Any]]:
    """The demo library, loose flood control, an error watch, and what each role must never see."""
    await seed_library(bot_env.db, bot_env.policy)
    relax_flood_control(bot_env)
    async with bot_env.db.session() as s:
        from sqlalchemy import select

        card = await s.scalar(select(Reader.id).where(Reader.card_number == "D0002"))
    watch = Watch()
    logging.getLogger().addHandler(watch)
    try:
        yield {
            "env": bot_env, "watch": watch, "surface": Surface(bot_env), "card": card,
            "secrets": {
                "visitor": await others_private_strings(bot_env.db, 0),
                "reader": await others_private_strings(bot_env.db, 8002, card),
            },
        }
    finally:
        logging.getLogger().removeHandler(watch)


async def person(ctx: dict[str, Any], role: str) -> Chat:
    env: EmbeddedBot = ctx["env"]
    uid = next(ids)
    async with env.db.session() as s:
        s.add(User(telegram_id=uid, first_name="Abuser", telegram_language="en",
                   reader_id=ctx["card"] if role == "reader" else None))
        if role == "staff":
            await add_staff(s, uid, Role.STAFF, "Abusive staff")
    env.emulator.started(uid)
    return Chat(env, uid, first_name="Abuser", language_code="en")


async def act(chat: Chat, step: tuple[Any, ...]) -> list[dict[str, Any]]:
    kind = step[0]
    if kind == "text":
        return await chat.send(step[1])
    if kind == "command":
        return await chat.send(f"/{step[1]} {step[2]}".strip())
    if kind in ("press", "forge"):
        buttons = chat.buttons()
        own = chat.bot_messages()
        if kind == "press" and buttons:
            message_id, _, data = buttons[step[1] % len(buttons)]
            return await chat.press_data(message_id, data)
        if own:
            return await chat.press_data(own[-1]["message_id"], step[1] if kind == "forge" else "noop")
        return await chat.send("/start")
    if kind == "edit":
        mine = [m for m in chat.env.emulator.chat_messages(chat.chat_id)
                if not m["from_bot"] and not m["deleted"] and m["text"] and not (m["photo"] or m["document"] or m["sticker"] or m["caption"])]
        if mine:
            return await chat._after(lambda: chat.env.emulator.user_edit(chat.user_id, mine[-1]["message_id"], step[1]))
        return await chat.send(step[1])
    if kind == "sticker":
        return await chat.send_sticker()
    return await chat.send_photo(step[1])


def check(ctx: dict[str, Any], role: str, chat: Chat, answer: list[dict[str, Any]], step: tuple[Any, ...]) -> None:
    watch: Watch = ctx["watch"]
    assert not watch.errors, (role, step, watch.errors)
    said = [m["text"] or "" for m in answer] + [a.get("text") or "" for a in chat.callback_answers()[-1:]]
    for text in said:
        assert "Traceback" not in text and text not in ERRORS, (role, step, text[:300])
    if role in ctx["secrets"]:
        leaked = {s for s in ctx["secrets"][role] if any(s in text for text in said)}
        assert not leaked, (role, step, leaked)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_random_input_never_crashes_and_never_leaks(abused: dict[str, Any], data: st.DataObject) -> None:
    plan = data.draw(st.lists(steps(abused["surface"]), min_size=2, max_size=12), label="steps")
    for role in ("visitor", "reader", "staff"):  # the same input from each of them
        chat = await person(abused, role)
        for step in plan:
            answer = await act(chat, step)
            check(abused, role, chat, answer, step)


@settings(max_examples=1, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_every_conversation_state_takes_any_input(abused: dict[str, Any], data: st.DataObject) -> None:
    """Each state of each conversation, entered the way a person enters it and then moved to that
    step (as an old message's button or a restart can do), gets random input of every kind. (One
    example visits every state; the random test above covers the variety.)"""
    surface: Surface = abused["surface"]
    for conversation in surface.conversations:
        entry = next((c for h in conversation.entry_points if isinstance(h, CommandHandler) for c in sorted(h.commands)), None)
        if entry is None or conversation.per_message or not (conversation.per_chat and conversation.per_user):
            continue
        for state in conversation.states:
            role = data.draw(st.sampled_from(["visitor", "reader", "staff"]), label="role")
            chat = await person(abused, role)
            check(abused, role, chat, await chat.send(f"/{entry}"), ("command", entry))
            conversation._conversations[(chat.chat_id, chat.user_id)] = state  # the step to test
            for step in data.draw(st.lists(steps(surface), min_size=1, max_size=3), label=f"{conversation.name}:{state}"):
                check(abused, role, chat, await act(chat, step), (conversation.name, state, step))
            await chat.send("/cancel")

