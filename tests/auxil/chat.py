"""A fast, in-process way to talk to the embedded bot: each action returns as soon as the bot has
finished handling the update (no quiet period to wait out), with the bot messages that are new or
changed since. Used where a test sends hundreds of updates (abuse, authorisation, privacy)."""

from __future__ import annotations

import asyncio
from typing import Any

from telegram.ext import Application

from bot.embedded import EmbeddedBot

JSON = dict[str, Any]


def _watch(app: Application) -> dict[int, asyncio.Future[None]]:  # type: ignore[type-arg]
    """Make ``app`` report when it finished each update (every outcome: answered, stopped, failed)."""
    watched: dict[int, asyncio.Future[None]] | None = getattr(app, "_test_watch", None)
    if watched is not None:
        return watched
    watched = {}
    original = app.process_update

    async def process_update(update: object) -> None:
        try:
            await original(update)
        finally:
            update_id = getattr(update, "update_id", None)
            future = watched.get(update_id) if update_id is not None else None
            if future is not None and not future.done():
                future.set_result(None)

    app.process_update = process_update  # type: ignore[method-assign]
    app._test_watch = watched  # type: ignore[attr-defined]
    return watched


class Chat:
    """One Telegram user in a private chat (or in a group with ``chat_id``)."""

    def __init__(
        self, env: EmbeddedBot, user_id: int, *, language_code: str = "en", first_name: str = "Test",
        chat_id: int | None = None, timeout: float = 15,
    ) -> None:
        self.env = env
        self.user_id = user_id
        self.language_code = language_code
        self.first_name = first_name
        self.chat_id = user_id if chat_id is None else chat_id
        self.timeout = timeout
        self.sent_texts: list[str] = []

    # -- what the chat looks like ---------------------------------------------------------------

    def _snapshot(self) -> dict[int, tuple[Any, ...]]:
        return {
            m["message_id"]: (m["text"], repr(m["buttons"]), m["deleted"])
            for m in self.env.emulator.chat_messages(self.chat_id)
            if m["from_bot"]
        }

    def bot_messages(self) -> list[JSON]:
        return [m for m in self.env.emulator.chat_messages(self.chat_id) if m["from_bot"] and not m["deleted"]]

    def callback_answers(self) -> list[JSON]:
        return self.env.emulator.callback_answers(self.user_id)

    # -- actions -----------------------------------------------------------------------------------

    async def _after(self, act: Any) -> list[JSON]:
        assert self.env.app is not None
        watched = _watch(self.env.app)
        before = self._snapshot()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        result = act()
        update_id = int(result["update_id"])
        watched[update_id] = future
        try:
            await asyncio.wait_for(future, self.timeout)
        finally:
            watched.pop(update_id, None)
        # Pushes (outbox rows) come later through the dispatcher; direct answers are there now.
        return [
            m for m in self.env.emulator.chat_messages(self.chat_id)
            if m["from_bot"] and before.get(m["message_id"]) != (m["text"], repr(m["buttons"]), m["deleted"])
        ]

    async def send(self, text: str) -> list[JSON]:
        """Send a text message; the bot messages new or changed once it was handled."""
        self.sent_texts.append(text)
        return await self._after(lambda: self.env.emulator.user_send(
            self.user_id, text=text, first_name=self.first_name, language_code=self.language_code,
            chat_id=self.chat_id,
        ))

    async def send_sticker(self) -> list[JSON]:
        return await self._after(lambda: self.env.emulator.user_send(
            self.user_id, sticker=True, first_name=self.first_name, language_code=self.language_code,
            chat_id=self.chat_id,
        ))

    async def send_photo(self, caption: str = "") -> list[JSON]:
        return await self._after(lambda: self.env.emulator.user_send(
            self.user_id, photo=True, caption=caption or None, first_name=self.first_name,
            language_code=self.language_code, chat_id=self.chat_id,
        ))

    async def press_data(self, message_id: int, data: str) -> list[JSON]:
        """Press any callback data (forged or not) on a message of this chat."""
        return await self._after(lambda: self.env.emulator.user_press(
            self.user_id, message_id, data, chat_id=self.chat_id, first_name=self.first_name,
            language_code=self.language_code,
        ))

    def buttons(self) -> list[tuple[int, str, str]]:
        """(message id, label, callback data) of every inline button on the bot's messages, newest first."""
        found = []
        for m in reversed(self.bot_messages()):
            for row in m["buttons"]:
                for b in row:
                    if "callback_data" in b:
                        found.append((m["message_id"], b["text"], b["callback_data"]))
        return found

    async def press(self, label: str) -> list[JSON]:
        """Press the newest button with this label (or callback data)."""
        for message_id, text, data in self.buttons():
            if label in (text, data):
                return await self.press_data(message_id, data)
        raise LookupError(f"no button {label!r}; have {[b[1] for b in self.buttons()[:10]]}")


def texts(messages: list[JSON]) -> str:
    """The texts of bot messages, one per line."""
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


def relax_flood_control(env: EmbeddedBot, limit: int = 1_000_000) -> None:
    """Let one person send as fast as a test needs (flood control has its own tests)."""
    from bot.gate import FloodControl

    assert env.app is not None
    for handlers in env.app.handlers.values():
        for handler in handlers:
            if isinstance(getattr(handler, "callback", None), FloodControl):
                handler.callback.limit = limit  # type: ignore[attr-defined]


def conversation_entry_commands(env: EmbeddedBot) -> list[str]:
    """The commands that open a conversation of the running bot (ILL form, complaint, login, …)."""
    from telegram.ext import CommandHandler, ConversationHandler

    assert env.app is not None
    found: list[str] = []
    for handlers in env.app.handlers.values():
        for handler in handlers:
            if isinstance(handler, ConversationHandler):
                for entry in handler.entry_points:
                    if isinstance(entry, CommandHandler):
                        found += [c for c in sorted(entry.commands) if c not in found]
    return found


STOP_WORDS = ("cancel", "取消", "back", "返回", "no", "否", "skip")


async def walk(chat: Chat, command: str, say: Any, steps: int = 8) -> list[JSON]:
    """Go through a conversation the way a person would: start it with ``command``, then at each
    step press the first button offered (not Cancel or Back), or else type ``say(step)``. Returns
    every bot message of the walk. Leaves the conversation with /cancel at the end."""
    seen: list[JSON] = list(await chat.send(f"/{command}"))
    pressed: set[str] = set()
    for step in range(steps):
        last = seen[-1] if seen else None
        choices = [
            (m, d) for m, label, d in chat.buttons()
            if last is not None and m == last["message_id"] and d not in pressed and d != "noop"
            and not d.startswith("https://") and not any(w in label.lower() for w in STOP_WORDS)
        ]
        if choices:
            message_id, data = choices[0]
            pressed.add(data)
            answer = await chat.press_data(message_id, data)
        else:
            answer = await chat.send(say(step))
        if not answer:
            break
        seen += answer
    seen += await chat.send("/cancel")
    return seen
