"""python-telegram-bot persistence kept in the database (not a pickle file), so that a conversation
survives a restart and several bot processes share it. Values must be JSON-serialisable.

Several processes: python-telegram-bot reads the persistence once, at start, and keeps conversation
states and user and chat data in memory. When bot processes share one database behind a load
balancer, one chat's next update may reach another process than its last one; so before each update
:meth:`DatabasePersistence.refresh` reads that update's user data, chat data and conversation
states, and takes over whatever another process stored since this one last read or wrote it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, tuple_
from telegram import Update
from telegram.ext import Application, BasePersistence, ConversationHandler, PersistenceInput

from storage.db import Database
from storage.state import PersistedState, load_state, save_state

ConversationDict = dict[tuple[str | int, ...], object]


class DatabasePersistence(BasePersistence[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Conversations, user data and chat data in the ``persisted_state`` table."""

    def __init__(self, db: Database, update_interval: float = 60) -> None:
        # bot_data holds live services, never persisted; callback data is plain strings.
        super().__init__(PersistenceInput(bot_data=False, callback_data=False), update_interval=update_interval)
        self.db = db
        # What this process last read or wrote for each (kind, key), as JSON (None: no row), and the
        # kinds read in full at start. The bot saves the user and chat data of every update, and
        # almost always they have not changed (most are empty): a value equal to the stored one is
        # not written again. That saves two transactions per update, most of a busy bot's writes.
        self.stored: dict[tuple[str, str], str | None] = {}
        self.loaded_kinds: set[str] = set()

    async def _load(self, kind: str) -> dict[str, dict[str, Any]]:
        async with self.db.session() as session:
            rows = await load_state(session, kind)
        self.loaded_kinds.add(kind)
        for key, value in rows.items():
            self.stored[(kind, key)] = _encoded(value)
        return rows

    async def _save(self, kind: str, key: str, value: dict[str, Any] | None) -> None:
        encoded = _encoded(value)
        if self._known(kind, key) == encoded:
            return
        async with self.db.session() as session:
            await save_state(session, kind, key, value)
        self.stored[(kind, key)] = encoded

    def _known(self, kind: str, key: str) -> str | None:
        """What this process last read or wrote for (kind, key); "?" when it does not know."""
        if (kind, key) in self.stored:
            return self.stored[(kind, key)]
        return None if kind in self.loaded_kinds else "?"

    async def refresh(self, app: Application, update: Update) -> None:  # type: ignore[type-arg]
        """Take over what another process stored for this update's user, chat and conversations."""
        wanted: list[tuple[str, str]] = []
        if update.effective_user is not None:
            wanted.append(("user", str(update.effective_user.id)))
        if update.effective_chat is not None:
            wanted.append(("chat", str(update.effective_chat.id)))
        conversations: dict[str, tuple[ConversationHandler, tuple[Any, ...]]] = {}  # type: ignore[type-arg]
        for handler in _persistent_conversations(app):
            try:
                own_key = handler._get_key(update)  # python-telegram-bot's own key of this update
            except RuntimeError:  # no chat or no user in this update: not part of a conversation
                continue
            kind = f"conversation:{handler.name}"
            conversations[kind] = (handler, own_key)
            wanted.append((kind, json.dumps(list(own_key))))
        async with self.db.session() as session:
            rows = await session.execute(
                select(PersistedState.kind, PersistedState.key, PersistedState.value).where(
                    tuple_(PersistedState.kind, PersistedState.key).in_(wanted)
                )
            )
            stored = {(kind, key): value for kind, key, value in rows}
        for kind, key in wanted:
            value = stored.get((kind, key))
            encoded = _encoded(value)
            if self._known(kind, key) == encoded:
                continue  # what this process knows is the latest
            self.stored[(kind, key)] = encoded
            if kind in ("user", "chat"):
                data = (app.user_data if kind == "user" else app.chat_data)[int(key)]
                data.clear()
                data.update(value or {})
            else:
                handler, conversation_key = conversations[kind]
                # The handler's own state dict, changed without marking it for saving (it is saved).
                states = handler._conversations
                target = getattr(states, "data", states)
                if value is None:
                    target.pop(conversation_key, None)
                else:
                    target[conversation_key] = value["state"]

    async def get_user_data(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in (await self._load("user")).items()}

    async def get_chat_data(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in (await self._load("chat")).items()}

    async def get_bot_data(self) -> dict[str, Any]:
        return {}

    async def get_callback_data(self) -> None:
        return None

    async def get_conversations(self, name: str) -> ConversationDict:
        rows = await self._load(f"conversation:{name}")
        return {tuple(json.loads(k)): v["state"] for k, v in rows.items()}

    async def update_conversation(self, name: str, key: tuple[str | int, ...], new_state: object | None) -> None:
        value = None if new_state is None else {"state": new_state}
        await self._save(f"conversation:{name}", json.dumps(list(key)), value)

    async def update_user_data(self, user_id: int, data: dict[str, Any]) -> None:
        await self._save("user", str(user_id), _jsonable(data))

    async def update_chat_data(self, chat_id: int, data: dict[str, Any]) -> None:
        await self._save("chat", str(chat_id), _jsonable(data))

    async def update_bot_data(self, data: dict[str, Any]) -> None:
        return None

    async def update_callback_data(self, data: Any) -> None:
        return None

    async def drop_user_data(self, user_id: int) -> None:
        await self._save("user", str(user_id), None)

    async def drop_chat_data(self, chat_id: int) -> None:
        await self._save("chat", str(chat_id), None)

    async def refresh_user_data(self, user_id: int, user_data: dict[str, Any]) -> None:
        return None

    async def refresh_chat_data(self, chat_id: int, chat_data: dict[str, Any]) -> None:
        return None

    async def refresh_bot_data(self, bot_data: dict[str, Any]) -> None:
        return None

    async def flush(self) -> None:
        return None


def _persistent_conversations(app: Application) -> list[ConversationHandler]:  # type: ignore[type-arg]
    return [
        h for handlers in app.handlers.values() for h in handlers
        if isinstance(h, ConversationHandler) and h.persistent and h.name
    ]


def _encoded(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _jsonable(data: dict[str, Any]) -> dict[str, Any] | None:
    """The data as stored (an empty dict is deleted); values that JSON cannot hold are left out."""
    if not data:
        return None
    return json.loads(json.dumps(data, default=lambda _value: None))
