"""An in-memory Telegram Bot API emulator (aiohttp) and a simulated Telegram user.

The emulator plays Telegram for three audiences:

* end-to-end tests, where the real python-telegram-bot ``Application`` talks to it over HTTP
  (``base_url=emu.base_url``, ``base_file_url=emu.base_file_url``);
* ``librarybot demo``, whose web chat page (``bot/static/demo.html``, served at ``/``) drives the
  user side through the ``/_emu/`` control API;
* the benchmarks (broadcasts under Telegram-like flood control, many concurrent readers).

Bot side: ``/bot{token}/{method}`` and ``/file/bot{token}/{path}``, answering real Bot API objects.
User side: ``/_emu/...`` (JSON), wrapped for Python by :class:`Person`.

Choices worth knowing:

* Flood control (:mod:`bot.emulator_rules`) counts sends in rolling windows as Telegram does:
  ``sendMessage``, ``sendPhoto``, ``sendDocument``, ``sendSticker``, ``sendMediaGroup`` (one per
  album), ``copyMessage``, ``forwardMessage`` and the edits; chat actions are never limited.
  ``stats.sends`` has one entry per message sent (edits not included).
* ``getUpdates`` confirms (forgets) an update only once it has been handed out and a later call
  passes a higher ``offset``. A raw update injected twice with the same ``update_id`` is therefore
  delivered twice, which is what duplicate-delivery tests need.
* Several webhook receivers (:meth:`Emulator.set_webhook_targets`) share the updates: each chat is
  given to one receiver (round robin over chats, ``sticky=True``) so a conversation stays in order;
  with ``sticky=False`` every update goes to the next receiver in turn. Either way one chat's
  updates are delivered one at a time, in order.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import html
import itertools
import json
import logging
import mimetypes
import re
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from bot.emulator_groups import GroupChanges, GroupControls
from bot.emulator_rules import (
    EmulatorClock,
    FloodControl,
    Refusal,
    check_answer_in_time,
    check_call,
    check_deletable,
    check_started,
    unescaped,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64

#: Update kinds Telegram leaves out unless ``allowed_updates`` asks for them.
_OPT_IN_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})

# A 1x1 transparent PNG, the content of photos "taken" by simulated users.
_TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)

_dumps = partial(json.dumps, ensure_ascii=False, separators=(",", ":"))

JSON = dict[str, Any]


class ApiError(Exception):
    """A Bot API error answer: HTTP status, ``description`` and optional ``parameters``."""

    def __init__(self, status: int, description: str, parameters: JSON | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters

    def payload(self) -> JSON:
        """The JSON body Telegram would answer with."""
        body: JSON = {"ok": False, "error_code": self.status, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body

    def response(self) -> web.Response:
        return web.json_response(self.payload(), status=self.status, dumps=_dumps)


def _bad(description: str) -> ApiError:
    return ApiError(400, f"Bad Request: {description}")


# --------------------------------------------------------------------------------------------
# Text: UTF-16 lengths, Telegram's HTML subset, command entities


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's limits and entity offsets."""
    return len(text.encode("utf-16-le")) // 2


_TAG_RE = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*?)?)\s*(/?)>")
_ATTR_RE = re.compile(r"""([a-zA-Z_:-]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?""")
_CHAR_REF_RE = re.compile(r"&(#[xX][0-9a-fA-F]+|#[0-9]+|lt|gt|amp|quot);")
_NAMED_REFS = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_ENTITY_TYPES = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode())


def parse_html(source: str) -> tuple[str, list[JSON]]:
    """Parse Telegram's HTML subset into plain text and entities, rejecting what Telegram rejects.

    Raises :class:`ApiError` 400 "can't parse entities" for unknown tags (``<br>``, ``<div>``), a
    bare ``<`` and unbalanced tags: exactly the bugs that unescaped user text causes in production.
    """
    out: list[str] = []
    pos = 0  # UTF-16 offset of the plain text produced so far
    stack: list[tuple[str, int, dict[str, str]]] = []
    entities: list[JSON] = []
    i, n = 0, len(source)
    while i < n:
        lt, amp = source.find("<", i), source.find("&", i)
        stop = min(x for x in (lt, amp, n) if x >= 0)
        if stop > i:
            chunk = source[i:stop]
            if ">" in chunk:  # bot.emulator_rules: a bare ">" must be escaped too
                raise unescaped(">", _byte_offset(source, i + chunk.index(">")))
            out.append(chunk)
            pos += utf16_len(chunk)
            i = stop
            continue
        if source[i] == "&":
            ref = _CHAR_REF_RE.match(source, i)
            if ref is None:
                raise unescaped("&", _byte_offset(source, i))
            else:
                name = ref.group(1)
                if name.startswith(("#x", "#X")):
                    char = chr(int(name[2:], 16))
                elif name.startswith("#"):
                    char = chr(int(name[1:]))
                else:
                    char = _NAMED_REFS[name]
                i = ref.end()
            out.append(char)
            pos += utf16_len(char)
            continue
        tag = _TAG_RE.match(source, i)
        if tag is None:
            raise _bad(f'can\'t parse entities: Unexpected "<" at byte offset {_byte_offset(source, i)}')
        closing, name = tag.group(1) == "/", tag.group(2).lower()
        if name not in _HTML_ENTITY_TYPES:
            kind = "end" if closing else "start"
            raise _bad(
                f'can\'t parse entities: Unsupported {kind} tag "{name}" at byte offset '
                f"{_byte_offset(source, i)}"
            )
        if not closing:
            attrs = {
                m.group(1).lower(): html.unescape(m.group(2) or m.group(3) or m.group(4) or "")
                for m in _ATTR_RE.finditer(tag.group(3) or "")
            }
            if name == "span" and attrs.get("class") != "tg-spoiler":
                raise _bad('can\'t parse entities: Tag "span" must have class "tg-spoiler"')
            stack.append((name, pos, attrs))
        else:
            if not stack or stack[-1][0] != name:
                expected = f'expected "</{stack[-1][0]}>", ' if stack else ""
                raise _bad(
                    f"can't parse entities: Unmatched end tag at byte offset "
                    f'{_byte_offset(source, i)}, {expected}found "</{name}>"'
                )
            _, start, attrs = stack.pop()
            language = attrs.get("class", "")
            if name == "code" and stack and stack[-1][0] == "pre" and language.startswith("language-"):
                # <pre><code class="language-x"> is one pre entity with a language, as in Telegram.
                stack[-1][2]["language"] = language.removeprefix("language-")
            elif pos > start:
                entity: JSON = {"type": _HTML_ENTITY_TYPES[name], "offset": start, "length": pos - start}
                if name == "a":
                    href = attrs.get("href", "")
                    if href.startswith("tg://user?id="):
                        entity = {**entity, "type": "text_mention", "user": _stub_user(href)}
                    elif href:
                        entity["url"] = href
                    else:
                        entity = {}
                elif name == "pre" and attrs.get("language"):
                    entity["language"] = attrs["language"]
                elif name == "blockquote" and "expandable" in attrs:
                    entity["type"] = "expandable_blockquote"
                elif name == "tg-emoji":
                    entity["custom_emoji_id"] = attrs.get("emoji-id", "")
                if entity:
                    entities.append(entity)
        i = tag.end()
    if stack:
        raise _bad(f"can't parse entities: Can't find end tag corresponding to start tag \"{stack[-1][0]}\"")
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def _stub_user(href: str) -> JSON:
    try:
        user_id = int(href.rsplit("=", 1)[1])
    except ValueError:
        user_id = 0
    return {"id": user_id, "is_bot": False, "first_name": str(user_id)}


_COMMAND_RE = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")


def command_entities(text: str) -> list[JSON]:
    """``bot_command`` entities as Telegram adds them (python-telegram-bot's CommandHandler needs them)."""
    return [
        {"type": "bot_command", "offset": utf16_len(text[: m.start()]), "length": utf16_len(m.group())}
        for m in _COMMAND_RE.finditer(text)
    ]


def plain_text(messages: Iterable[Mapping[str, Any]]) -> str:
    """The plain text (HTML removed) of several message views, one per line: handy in asserts."""
    return "\n".join(str(m.get("plain", "")) for m in messages)


# --------------------------------------------------------------------------------------------
# Request parameters


@dataclass(slots=True)
class Upload:
    """A file part of a multipart request."""

    filename: str
    content_type: str
    data: bytes


class Params:
    """Method parameters from a query string, JSON, urlencoded or multipart body.

    Values are coerced where they are read, as Telegram does: python-telegram-bot sends every
    non-string value JSON-encoded in form fields (``chat_id=42``, ``reply_markup={...}``).
    """

    def __init__(self, raw: Mapping[str, Any], uploads: Mapping[str, Upload] | None = None) -> None:
        self.raw = dict(raw)
        self.uploads = dict(uploads or {})

    def get_str(self, name: str, default: str | None = None) -> str | None:
        value = self.raw.get(name)
        if value is None:
            return default
        return value if isinstance(value, str) else _dumps(value)

    def get_int(self, name: str, default: int | None = None) -> int | None:
        value = self.raw.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise _bad(f"invalid {name} specified") from None

    def get_float(self, name: str, default: float | None = None) -> float | None:
        value = self.raw.get(name)
        if value is None or value == "":
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _bad(f"invalid {name} specified") from None

    def get_bool(self, name: str, default: bool = False) -> bool:
        value = self.raw.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, str):
            return value.strip().lower() in {"true", "1", "yes"}
        return bool(value)

    def get_json(self, name: str) -> Any:
        value = self.raw.get(name)
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise _bad(f"can't parse {name} JSON object") from None
        return value

    def get_file(self, name: str) -> Upload | str | None:
        """An uploaded part, an ``attach://`` reference resolved to its part, or a file_id/URL."""
        if name in self.uploads:
            return self.uploads[name]
        value = self.get_str(name)
        if value and value.startswith("attach://"):
            part = self.uploads.get(value.removeprefix("attach://"))
            if part is None:
                raise _bad(f"file attach://{value[9:]} not found in the request")
            return part
        return value

    def chat_id(self, name: str = "chat_id") -> int:
        value = self.raw.get(name)
        if value is None or value == "":
            raise _bad("chat_id is empty" if name == "chat_id" else f"{name} is empty")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _bad("chat not found") from None  # "@channelusername" chats do not exist here


# --------------------------------------------------------------------------------------------
# State


class _Signal:
    """Wakes every waiter once per change; waiters take ``event`` *before* checking their condition."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        return
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


@dataclass(slots=True)
class StoredFile:
    """A file the emulator knows: uploaded by the bot or invented for a simulated user."""

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    file_name: str | None = None
    mime_type: str | None = None

    def api(self) -> JSON:
        return {"file_id": self.file_id, "file_unique_id": self.file_unique_id, "file_size": len(self.data)}


@dataclass(slots=True, eq=False)
class StoredMessage:
    """One message of a chat: the Bot API object plus what the user side needs to render it."""

    chat_id: int
    message_id: int
    from_bot: bool
    api: JSON
    source_text: str | None = None  # text or caption exactly as sent (HTML kept)
    parse_mode: str | None = None
    markup: JSON | None = None  # reply_markup as sent, any kind
    version: int = 0
    deleted: bool = False

    def view(self) -> JSON:
        """The flat dict the demo page and :class:`Person` work with."""
        api = self.api
        plain = api.get("text", api.get("caption", ""))
        markup = self.markup or {}
        photo = api.get("photo")
        document = api.get("document")
        sticker = api.get("sticker")
        reply_to = api.get("reply_to_message")
        return {
            "message_id": self.message_id,
            "chat_id": self.chat_id,
            "from_bot": self.from_bot,
            "from_id": api.get("from", {}).get("id"),
            "date": api.get("date"),
            "text": self.source_text if self.source_text is not None else plain,
            "plain": plain,
            "caption": api.get("caption"),
            "parse_mode": self.parse_mode,
            "entities": api.get("entities") or api.get("caption_entities") or [],
            "buttons": [
                [{k: v for k, v in b.items() if k in {"text", "callback_data", "url"}} for b in row]
                for row in markup.get("inline_keyboard", [])
            ],
            "reply_keyboard": [
                [b if isinstance(b, str) else b.get("text", "") for b in row]
                for row in markup.get("keyboard", [])
            ],
            "remove_keyboard": bool(markup.get("remove_keyboard")),
            "reply_markup": self.markup,
            "edited": self.version,
            "deleted": self.deleted,
            "photo": photo[-1]["file_id"] if photo else None,
            "document": (
                {
                    "file_name": document.get("file_name"),
                    "file_id": document["file_id"],
                    "mime_type": document.get("mime_type"),
                    "url": f"/_emu/files/{document['file_id']}",
                }
                if document
                else None
            ),
            "sticker": sticker.get("emoji", "") if sticker else None,
            "reply_to_message_id": reply_to.get("message_id") if reply_to else None,
        }


@dataclass(slots=True, eq=False)
class ChatState:
    """A chat: its messages and its event log (new / edit / delete / callback_answer / action)."""

    id: int
    type: str
    title: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    username: str | None = None
    messages: dict[int, StoredMessage] = field(default_factory=dict)
    events: list[JSON] = field(default_factory=list)
    next_message_id: int = 1
    signal: _Signal = field(default_factory=_Signal)

    def api(self) -> JSON:
        chat: JSON = {"id": self.id, "type": self.type}
        for key in ("title", "first_name", "last_name", "username"):
            value = getattr(self, key)
            if value:
                chat[key] = value
        return chat


@dataclass
class EmulatorStats:
    """What the bot did, for tests and benchmarks."""

    sends_per_chat: Counter[int] = field(default_factory=Counter)
    #: (time.monotonic(), chat_id, method) for every accepted send, in order.
    sends: list[tuple[float, int, str]] = field(default_factory=list)
    too_many_requests: int = 0  # 429 answers
    forbidden: int = 0  # 403 answers
    requests: Counter[str] = field(default_factory=Counter)  # every bot API call by method

    def to_dict(self, include_sends: bool = False) -> JSON:
        data: JSON = {
            "total_sends": len(self.sends),
            "sends_per_chat": {str(k): v for k, v in self.sends_per_chat.items()},
            "too_many_requests": self.too_many_requests,
            "forbidden": self.forbidden,
            "requests": dict(self.requests),
        }
        if include_sends:
            data["sends"] = [list(s) for s in self.sends]
        return data


@dataclass(slots=True)
class _QueuedUpdate:
    update: JSON
    delivered: bool = False

    @property
    def update_id(self) -> int:
        return int(self.update["update_id"])


def _update_kind(update: Mapping[str, Any]) -> str:
    return next((k for k in update if k != "update_id"), "")


def _update_chat(update: Mapping[str, Any]) -> int:
    """The chat an update belongs to (0 if none), to keep one chat's updates in order."""
    body = update.get(_update_kind(update))
    if not isinstance(body, dict):
        return 0
    if isinstance(body.get("chat"), dict):
        return int(body["chat"].get("id", 0))
    if isinstance(body.get("message"), dict):
        return int(body["message"].get("chat", {}).get("id", 0))
    return int(body.get("from", {}).get("id", 0)) if isinstance(body.get("from"), dict) else 0


def _scope_key(scope: Any) -> str:
    if not isinstance(scope, dict) or not scope.get("type"):
        scope = {"type": "default"}
    clean: JSON = {"type": scope["type"]}
    for key in ("chat_id", "user_id"):
        if key in scope:
            try:
                clean[key] = int(scope[key])
            except (TypeError, ValueError):
                clean[key] = scope[key]
    return _dumps(clean, sort_keys=True)


# --------------------------------------------------------------------------------------------
# The emulator

Handler = Callable[[Params], Awaitable[Any]]


class Emulator(GroupControls):
    """The Bot API emulator. All state lives in memory in this object."""

    def __init__(
        self,
        *,
        token: str = "123456:TEST",
        bot_username: str = "librarybot",
        bot_first_name: str = "Library Bot",
        global_rate: float | None = None,
        per_chat_rate: float | None = None,
        per_chat_burst: int = 5,
        group_per_minute: int | None = None,
    ) -> None:
        self.token = token
        bot_id = token.split(":", 1)[0]
        self.bot_user: JSON = {
            "id": int(bot_id) if bot_id.isdigit() else 1,
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
        }
        self.personas: list[JSON] = []
        self.stats = EmulatorStats()
        self.flood = FloodControl(global_rate, per_chat_rate, per_chat_burst, group_per_minute)
        self.clock = EmulatorClock()  # bot.emulator_rules: what depends on time, moved by tests
        self._started: set[int] = set()  # people who pressed Start (wrote to the bot) in private
        #: Seconds between webhook delivery retries (doubling up to ``webhook_retry_max``).
        self.webhook_retry_delay = 0.2
        self.webhook_retry_max = 2.0
        self.url: str | None = None  # "http://HOST:PORT", set by start()
        self.port: int | None = None

        self._chats: dict[int, ChatState] = {}
        self._users: dict[int, JSON] = {}
        self._blocked: set[int] = set()
        self._failures: dict[str, deque[int]] = {}
        self._files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._file_seq = itertools.count(1)
        self._commands: dict[tuple[str, str], list[JSON]] = {}
        self._menu_buttons: dict[int | None, JSON] = {}
        self._bot_texts: dict[str, str] = {}
        self._callbacks: dict[str, JSON] = {}
        self._callback_answers: dict[int, list[JSON]] = {}
        self._callback_seq = itertools.count(4_300_000_000_000_000_001)
        self.groups = GroupChanges()  # supergroup upgrades, the bot's membership, forum topics

        self._next_update_id = 100_000
        self._updates: deque[_QueuedUpdate] = deque()
        self._updates_signal = _Signal()
        self._allowed_updates: list[str] = []
        self._poll_generation = 0

        self._webhook_targets: list[str] = []
        self._webhook_pinned = False  # set_webhook_targets() wins over the bot's own setWebhook
        self._webhook_sticky = True
        self._webhook_secret: str | None = None
        self._webhook_max_connections = 40
        self._webhook_last_error: tuple[int, str] | None = None
        self._chat_target: dict[int, int] = {}
        self._round_robin = 0
        self._lanes: dict[int, deque[JSON]] = {}
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._webhook_pending = 0
        self._http: aiohttp.ClientSession | None = None

        self._events: list[JSON] = []  # every chat event, seq = index + 1
        self._events_signal = _Signal()
        self._closing = False
        self._runner: web.AppRunner | None = None

        self._methods: dict[str, Handler] = {
            name.lower(): getattr(self, f"_m_{name}")
            for name in (
                "getMe getUpdates setWebhook deleteWebhook getWebhookInfo sendMessage editMessageText "
                "editMessageCaption editMessageReplyMarkup answerCallbackQuery deleteMessage deleteMessages "
                "sendPhoto sendDocument sendSticker sendMediaGroup copyMessage forwardMessage getFile sendChatAction "
                "setMyCommands getMyCommands deleteMyCommands setChatMenuButton getChatMenuButton getChat "
                "getChatMember pinChatMessage unpinChatMessage setMyDescription setMyShortDescription "
                "setMyName getMyDescription getMyShortDescription getMyName close logOut"
            ).split()
        }
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (built once, in ``__init__``)."""
        return self.app

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[control_api_guard])
        r = app.router
        r.add_route("*", "/bot{token}/{method}", self._handle_bot)
        r.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        r.add_post("/_emu/send", self._h_send)
        r.add_post("/_emu/press", self._h_press)
        r.add_post("/_emu/edit", self._h_edit)
        r.add_get("/_emu/events", self._h_all_events)
        r.add_get("/_emu/chats/{chat_id}/events", self._h_chat_events)
        r.add_get("/_emu/chats/{chat_id}/messages", self._h_chat_messages)
        r.add_get("/_emu/callback_answers", self._h_callback_answers)
        r.add_get("/_emu/personas", self._h_personas)
        r.add_post("/_emu/personas", self._h_set_personas)
        r.add_post("/_emu/block", self._h_block)
        r.add_get("/_emu/limits", self._h_limits)
        r.add_post("/_emu/limits", self._h_limits)
        r.add_post("/_emu/fail", self._h_fail)
        r.add_post("/_emu/updates", self._h_inject)
        r.add_get("/_emu/stats", self._h_stats)
        r.add_post("/_emu/stats/reset", self._h_stats_reset)
        r.add_get("/_emu/files/{file_id}", self._h_file_download)
        r.add_get("/_emu/commands", self._h_commands)
        r.add_get("/_emu/webhooks", self._h_webhooks)
        r.add_get("/", self._h_index)
        if STATIC_DIR.is_dir():
            r.add_static("/static/", STATIC_DIR)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0 = a free port); returns the root URL ``http://HOST:PORT``."""
        self._closing = False
        # No access log: request paths contain the bot token. Handler cancellation lets an
        # abandoned long poll go away instead of holding updates until its timeout.
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        public_host = "127.0.0.1" if host in {"0.0.0.0", "", "::"} else host
        if ":" in public_host:
            public_host = f"[{public_host}]"  # an IPv6 literal in a URL
        self.url = f"http://{public_host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Stop serving; pending long polls return at once."""
        self._closing = True
        self._wake_all()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        else:
            await self._on_cleanup(self.app)

    async def _on_cleanup(self, _app: web.Application) -> None:
        self._closing = True
        self._wake_all()
        for task in list(self._lane_tasks):
            task.cancel()
        if self._lane_tasks:
            await asyncio.gather(*self._lane_tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _wake_all(self) -> None:
        self._updates_signal.notify()
        self._events_signal.notify()
        for chat in self._chats.values():
            chat.signal.notify()

    @property
    def base_url(self) -> str:
        """python-telegram-bot's ``base_url`` (the token is appended by the library)."""
        return f"{self._root()}/bot"

    @property
    def base_file_url(self) -> str:
        """python-telegram-bot's ``base_file_url``."""
        return f"{self._root()}/file/bot"

    def _root(self) -> str:
        if self.url is None:
            raise RuntimeError("the emulator is not started (or set emulator.url)")
        return self.url

    # -- test controls -------------------------------------------------------------------------

    def set_limits(
        self,
        global_rate: float | None,
        per_chat_rate: float | None,
        per_chat_burst: int = 5,
        group_per_minute: int | None = None,
    ) -> None:
        """Flood limits (``None`` = unlimited); buckets start full."""
        self.flood.configure(global_rate, per_chat_rate, per_chat_burst, group_per_minute)

    def block(self, user_id: int, blocked: bool = True) -> None:
        """The user blocks (or unblocks) the bot: sends to that chat then get 403.

        The bot also receives a ``my_chat_member`` update, as from Telegram.
        """
        if blocked == (user_id in self._blocked):
            return
        if blocked:
            self._blocked.add(user_id)
        else:
            self._blocked.discard(user_id)
        if user_id > 0:
            user = self._users.get(user_id) or self._stub_user_api(user_id)
            old, new = ("member", "kicked") if blocked else ("kicked", "member")
            self._emit_update(
                {
                    "update_id": self._new_update_id(),
                    "my_chat_member": {
                        "chat": self._chat(user_id).api(),
                        "from": user,
                        "date": int(time.time()),
                        "old_chat_member": {"status": old, "user": self.bot_user},
                        "new_chat_member": {
                            "status": new,
                            "user": self.bot_user,
                            **({"until_date": 0} if blocked else {}),
                        },
                    },
                }
            )

    def is_blocked(self, user_id: int) -> bool:
        return user_id in self._blocked

    def fail_next(self, method: str, count: int = 1, status: int = 502) -> None:
        """The next ``count`` calls of ``method`` (``"*"`` = any) fail with ``status``.

        ``status`` 0 drops the connection without an answer.
        """
        queue = self._failures.setdefault(method.lower(), deque())
        queue.extend([status] * count)

    def inject_update(self, update: Mapping[str, Any]) -> int:
        """Deliver a raw update (an ``update_id`` is assigned if missing; repeating one is allowed)."""
        update = dict(update)
        if "update_id" not in update:
            update["update_id"] = self._new_update_id()
        else:
            self._next_update_id = max(self._next_update_id, int(update["update_id"]) + 1)
        message = update.get("message") or {}
        if (message.get("chat") or {}).get("type") == "private" and "from" in message:
            self._started.add(int(message["from"]["id"]))  # writing to the bot is what lets it write back
        self._emit_update(update)
        return int(update["update_id"])

    def set_webhook_targets(
        self, urls: list[str], *, sticky: bool = True, secret_token: str | None = None
    ) -> None:
        """Deliver updates to several receivers (an empty list removes the webhook).

        These targets stay in force when a bot process calls ``setWebhook`` with its own URL (only
        the secret and allowed_updates are taken from that call), so several processes can share.
        """
        self._webhook_sticky = sticky
        self._webhook_pinned = bool(urls)
        if secret_token is not None:
            self._webhook_secret = secret_token or None
        self._set_targets(list(urls))

    def reset_stats(self) -> None:
        self.stats = EmulatorStats()

    def chat_messages(self, chat_id: int) -> list[JSON]:
        """The views of a chat's messages (deleted ones flagged), oldest first."""
        chat = self._chats.get(chat_id)
        return [m.view() for m in chat.messages.values()] if chat else []

    def callback_answers(self, user_id: int) -> list[JSON]:
        return list(self._callback_answers.get(user_id, []))

    def commands(
        self, chat_id: int | None = None, user_id: int | None = None, language_code: str = ""
    ) -> list[JSON]:
        """The command menu Telegram would show this user in this chat (scope + language resolution)."""
        lang = (language_code or "")[:2].lower()
        scopes: list[JSON] = []
        if chat_id is not None and chat_id < 0:
            if user_id is not None:
                scopes.append({"type": "chat_member", "chat_id": chat_id, "user_id": user_id})
            scopes += [{"type": "chat", "chat_id": chat_id}, {"type": "all_group_chats"}]
        elif chat_id is not None:
            scopes += [{"type": "chat", "chat_id": chat_id}, {"type": "all_private_chats"}]
        scopes.append({"type": "default"})
        for scope in scopes:
            key = _scope_key(scope)
            for code in ([lang] if lang else []) + [""]:
                found = self._commands.get((key, code))
                if found:
                    return found
        return []

    def all_commands(self) -> list[JSON]:
        return [
            {"scope": json.loads(scope), "language_code": lang, "commands": cmds}
            for (scope, lang), cmds in self._commands.items()
        ]

    # -- user side (in process; the /_emu/ HTTP API calls these) ------------------------------

    def user_send(
        self,
        user_id: int,
        *,
        text: str | None = None,
        first_name: str | None = None,
        last_name: str | None = None,
        username: str | None = None,
        language_code: str | None = None,
        chat_id: int | None = None,
        chat_type: str | None = None,
        chat_title: str | None = None,
        photo: bool | Mapping[str, Any] = False,  # or {"content_b64": …}: a picture sent from the demo page
        caption: str | None = None,
        sticker: bool | str = False,
        document: Mapping[str, Any] | None = None,
        reply_to_message_id: int | None = None,
    ) -> JSON:
        """A user sends a message; returns ``{"message", "update_id", "seq"}``."""
        user = self._remember_user(user_id, first_name, last_name, username, language_code)
        chat = self._chat(chat_id if chat_id is not None else user_id, chat_type, chat_title)
        if chat.id == user_id:
            self._started.add(user_id)  # writing to the bot is pressing Start
        # A blocked user who writes has pressed "Restart": Telegram unblocks the bot.
        if chat.id == user_id and user_id in self._blocked:
            self.block(user_id, False)
        api: JSON = {
            "message_id": chat.next_message_id,
            "from": user,
            "chat": chat.api(),
            "date": int(self.clock.time()),
        }
        if text is not None and text != "":
            api["text"] = text
            entities = command_entities(text)
            if entities:
                api["entities"] = entities
        elif photo:
            upload = base64.b64decode(photo.get("content_b64", "") or "") if isinstance(photo, Mapping) else b""
            sizes = self._invent_photo(upload) if upload else self._invent_photo()
            api["photo"] = sizes
        elif sticker:
            emoji = sticker if isinstance(sticker, str) else "👍"
            f = self._store_file("stickers", _TINY_PNG, "sticker.webp", "image/webp")
            api["sticker"] = {
                **f.api(),
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
                "emoji": emoji,
            }
        elif document:
            data = base64.b64decode(document.get("content_b64", "") or "")
            name = str(document.get("file_name") or "file.bin")
            f = self._store_file("documents", data, name, document.get("mime_type"))
            api["document"] = {**f.api(), "file_name": name, "mime_type": f.mime_type}
        else:
            raise _bad("message is empty")
        if caption and ("photo" in api or "document" in api):
            api["caption"] = caption
        if reply_to_message_id and reply_to_message_id in chat.messages:
            api["reply_to_message"] = self._reply_copy(chat.messages[reply_to_message_id])
        msg = self._add_message(chat, api, from_bot=False, source_text=None)
        update_id = self._new_update_id()
        self._emit_update({"update_id": update_id, "message": api})
        return {"message": msg.view(), "update_id": update_id, "seq": len(self._events)}

    def user_press(
        self,
        user_id: int,
        message_id: int,
        data: str,
        *,
        chat_id: int | None = None,
        first_name: str | None = None,
        language_code: str | None = None,
    ) -> JSON:
        """A user presses an inline button (any callback data, forged or not)."""
        user = self._remember_user(user_id, first_name, None, None, language_code)
        chat = self._chats.get(chat_id if chat_id is not None else user_id)
        msg = chat.messages.get(message_id) if chat else None
        if chat is None or msg is None or msg.deleted:
            raise _bad("message not found")
        query_id = str(next(self._callback_seq))
        self._callbacks[query_id] = {
            "user_id": user_id,
            "chat_id": chat.id,
            "message_id": message_id,
            "answered": False,
            "at": self.clock.monotonic(),
        }
        update_id = self._new_update_id()
        self._emit_update(
            {
                "update_id": update_id,
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "message": msg.api,
                    "chat_instance": str(abs(chat.id) * 7919 + 13),
                    "data": data,
                },
            }
        )
        return {"callback_query_id": query_id, "update_id": update_id, "seq": len(self._events)}

    def user_edit(self, user_id: int, message_id: int, text: str, *, chat_id: int | None = None) -> JSON:
        """A user edits one of their own text messages (the bot gets an ``edited_message``)."""
        chat = self._chats.get(chat_id if chat_id is not None else user_id)
        msg = chat.messages.get(message_id) if chat else None
        if chat is None or msg is None or msg.deleted:
            raise _bad("message to edit not found")
        if msg.from_bot or msg.api.get("from", {}).get("id") != user_id or "text" not in msg.api:
            raise _bad("message can't be edited")
        api = {k: v for k, v in msg.api.items() if k != "entities"}
        api["text"] = text
        api["edit_date"] = int(time.time())
        entities = command_entities(text)
        if entities:
            api["entities"] = entities
        self._replace(chat, msg, api)
        update_id = self._new_update_id()
        self._emit_update({"update_id": update_id, "edited_message": api})
        return {"message": msg.view(), "update_id": update_id, "seq": len(self._events)}

    # -- Bot API rules (bot.emulator_rules): who pressed Start, what users delete ----------------

    def started(self, *user_ids: int) -> None:
        """These people pressed Start some time ago (set-up for people made in the database): the
        bot may write to them. Anybody else who never wrote to the bot gets it a 403."""
        self._started.update(user_ids)

    def has_started(self, user_id: int) -> bool:
        return user_id in self._started

    def user_delete(self, user_id: int, message_id: int, *, chat_id: int | None = None) -> None:
        """A user deletes a message from the chat (for both sides; the bot is not told)."""
        chat = self._chats.get(chat_id if chat_id is not None else user_id)
        msg = chat.messages.get(message_id) if chat else None
        if chat is None or msg is None or msg.deleted:
            raise _bad("message to delete not found")
        msg.deleted = True
        self._event(chat, "delete", message=msg.view())

    # -- internals: chats, messages, events ----------------------------------------------------

    def _remember_user(
        self,
        user_id: int,
        first_name: str | None,
        last_name: str | None,
        username: str | None,
        language_code: str | None,
    ) -> JSON:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = self._stub_user_api(user_id)
        if first_name:
            user["first_name"] = first_name
        if last_name:
            user["last_name"] = last_name
        if username:
            user["username"] = username
        if language_code:
            user["language_code"] = language_code
        chat = self._chats.get(user_id)
        if chat is not None and chat.type == "private":
            chat.first_name = user["first_name"]
            chat.last_name = user.get("last_name")
            chat.username = user.get("username")
        return dict(user)

    @staticmethod
    def _stub_user_api(user_id: int) -> JSON:
        return {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}

    def _chat(self, chat_id: int, chat_type: str | None = None, title: str | None = None) -> ChatState:
        """The chat, created on first use (the bot may write to chats that never wrote first)."""
        chat = self._chats.get(chat_id)
        if chat is None:
            if chat_id >= 0:
                user = self._users.get(chat_id) or self._stub_user_api(chat_id)
                chat = ChatState(
                    chat_id,
                    "private",
                    first_name=user["first_name"],
                    last_name=user.get("last_name"),
                    username=user.get("username"),
                )
            else:
                # Supergroup ids look like -100xxxxxxxxxx; smaller negative ids are basic groups.
                kind = chat_type or ("supergroup" if chat_id <= -1_000_000_000_000 else "group")
                chat = ChatState(chat_id, kind, title=title or f"Group {chat_id}")
            self._chats[chat_id] = chat
        elif title and chat.id < 0:
            chat.title = title
        return chat

    def _add_message(
        self,
        chat: ChatState,
        api: JSON,
        *,
        from_bot: bool,
        source_text: str | None,
        parse_mode: str | None = None,
        markup: JSON | None = None,
    ) -> StoredMessage:
        msg = StoredMessage(chat.id, chat.next_message_id, from_bot, api, source_text, parse_mode, markup)
        chat.next_message_id += 1
        chat.messages[msg.message_id] = msg
        self._event(chat, "new", message=msg.view())
        return msg

    def _replace(
        self,
        chat: ChatState,
        msg: StoredMessage,
        api: JSON,
        *,
        source_text: str | None = None,
        parse_mode: str | None = None,
        markup: JSON | None = None,
        keep_source: bool = False,
    ) -> None:
        msg.api = api
        if not keep_source:
            msg.source_text, msg.parse_mode = source_text, parse_mode
        # Edits only touch inline keyboards; a reply keyboard sent with the message stays.
        if msg.from_bot and (markup is not None or not msg.markup or "inline_keyboard" in msg.markup):
            msg.markup = markup
        msg.version += 1
        self._event(chat, "edit", message=msg.view())

    def _event(self, chat: ChatState, kind: str, **body: Any) -> None:
        event = {"seq": len(self._events) + 1, "type": kind, "chat_id": chat.id, **body}
        self._events.append(event)
        chat.events.append(event)
        chat.signal.notify()
        self._events_signal.notify()

    @staticmethod
    def _reply_copy(msg: StoredMessage) -> JSON:
        return {k: v for k, v in msg.api.items() if k != "reply_to_message"}

    def _store_file(
        self, folder: str, data: bytes, file_name: str | None, mime_type: str | None
    ) -> StoredFile:
        n = next(self._file_seq)
        suffix = Path(file_name).suffix if file_name else ""
        f = StoredFile(
            file_id=f"EMU{folder[:3].upper()}{n:06d}{uuid.uuid4().hex[:12]}",
            file_unique_id=f"U{n:08d}",
            file_path=f"{folder}/file_{n}{suffix}",
            data=data,
            file_name=file_name,
            mime_type=mime_type or (mimetypes.guess_type(file_name)[0] if file_name else None),
        )
        self._files[f.file_id] = f
        self._files_by_path[f.file_path] = f
        return f

    def _invent_photo(self, data: bytes = _TINY_PNG) -> list[JSON]:
        thumb = self._store_file("photos", data, "photo.jpg", "image/jpeg")
        full = self._store_file("photos", data, "photo.jpg", "image/jpeg")
        return [
            {**thumb.api(), "width": 90, "height": 68},
            {**full.api(), "width": 800, "height": 600},
        ]

    def _resolve_file(self, value: Upload | str | None, folder: str, name: str) -> StoredFile:
        if isinstance(value, Upload):
            return self._store_file(folder, value.data, value.filename, value.content_type)
        if not value:
            raise _bad(f"there is no {name} in the request")
        known = self._files.get(value)
        if known is not None:
            return known
        if value.startswith(("http://", "https://")):
            # No network here: remember the URL as an empty file so the message still exists.
            return self._store_file(folder, b"", value.rsplit("/", 1)[-1] or name, None)
        raise _bad("wrong file identifier/HTTP URL specified")

    # -- internals: updates, polling, webhooks --------------------------------------------------

    def _new_update_id(self) -> int:
        self._next_update_id += 1
        return self._next_update_id - 1

    def _allowed(self, update: Mapping[str, Any]) -> bool:
        kind = _update_kind(update)
        if self._allowed_updates:
            return kind in self._allowed_updates
        return kind not in _OPT_IN_UPDATES

    def _emit_update(self, update: JSON) -> None:
        if self._webhook_targets:
            self._dispatch_webhook(update)
        else:
            self._updates.append(_QueuedUpdate(update))
            self._updates_signal.notify()

    def _confirm(self, offset: int) -> None:
        queue = self._updates
        if offset < 0:
            while len(queue) > -offset:
                queue.popleft()
            return
        # Only updates already handed out are confirmed: see the module docstring.
        while queue and queue[0].delivered and queue[0].update_id < offset:
            queue.popleft()

    def _take_updates(self, limit: int) -> list[JSON]:
        batch: list[JSON] = []
        for item in self._updates:
            if len(batch) >= limit:
                break
            item.delivered = True
            if self._allowed(item.update):
                batch.append(item.update)
        return batch

    def _set_targets(self, urls: list[str]) -> None:
        had = bool(self._webhook_targets)
        self._webhook_targets = urls
        self._chat_target.clear()
        if urls and not had:
            pending = [q.update for q in self._updates]
            self._updates.clear()
            for update in pending:
                self._dispatch_webhook(update)
        self._updates_signal.notify()  # a pending getUpdates now answers 409

    def _dispatch_webhook(self, update: JSON) -> None:
        if not self._allowed(update):
            return
        key = _update_chat(update)
        lane = self._lanes.get(key)
        self._webhook_pending += 1
        if lane is not None:
            lane.append(update)
            return
        lane = self._lanes[key] = deque([update])
        task = asyncio.get_running_loop().create_task(self._run_lane(key, lane))
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    def _target_for(self, key: int) -> str:
        targets = self._webhook_targets
        if not self._webhook_sticky:
            self._round_robin += 1
            return targets[self._round_robin % len(targets)]
        index = self._chat_target.get(key)
        if index is None or index >= len(targets):
            index = self._chat_target[key] = self._round_robin % len(targets)
            self._round_robin += 1
        return targets[index]

    async def _run_lane(self, key: int, lane: deque[JSON]) -> None:
        """Deliver one chat's webhook updates in order, retrying each until it is accepted."""
        delay = self.webhook_retry_delay
        try:
            while lane:
                if not self._webhook_targets:
                    # The webhook was removed: what is left waits for getUpdates.
                    self._webhook_pending -= len(lane)
                    self._updates.extend(_QueuedUpdate(u) for u in lane)
                    lane.clear()
                    self._updates_signal.notify()
                    break
                update = lane[0]
                if await self._post_update(self._target_for(key), update):
                    # The lane may have been emptied meanwhile (drop_pending_updates).
                    if lane and lane[0] is update:
                        lane.popleft()
                        self._webhook_pending -= 1
                    delay = self.webhook_retry_delay
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.webhook_retry_max)
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _post_update(self, url: str, update: JSON) -> bool:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=200)
            )
        headers = {"Content-Type": "application/json"}
        if self._webhook_secret:
            headers["X-Telegram-Bot-Api-Secret-Token"] = self._webhook_secret
        try:
            async with self._http.post(url, data=_dumps(update).encode(), headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True
                error = f"Wrong response from the webhook: {resp.status} {resp.reason}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"Connection failed: {exc.__class__.__name__}"
        self._webhook_last_error = (int(time.time()), error)
        return False

    # -- internals: sending ----------------------------------------------------------------------

    def _admit(self, chat: ChatState, method: str | None) -> None:
        """403 for a blocked chat; 429 for a send over the flood limits (``method`` None = no limit)."""
        if chat.id in self._blocked:
            self.stats.forbidden += 1
            reason = "bot was blocked by the user" if chat.id > 0 else "bot was kicked from the group chat"
            raise ApiError(403, f"Forbidden: {reason}")
        if chat.type == "private" and chat.id not in self._started:
            self.stats.forbidden += 1
            check_started(chat.type, chat.id, self._started)
        if method is None:
            return
        retry = self.flood.admit(chat.id, self.clock.monotonic())
        if retry is not None:
            self.stats.too_many_requests += 1
            raise ApiError(429, f"Too Many Requests: retry after {retry}", {"retry_after": retry})

    def _record_send(self, chat_id: int, method: str) -> None:
        self.stats.sends_per_chat[chat_id] += 1
        self.stats.sends.append((time.monotonic(), chat_id, method))

    def _format(
        self, text: str, parse_mode: str | None, entities: Any, limit: int, what: str
    ) -> tuple[str, list[JSON]]:
        """Plain text and entities of a text or caption, checked against Telegram's limits."""
        if parse_mode and parse_mode.upper() == "HTML":
            plain, parsed = parse_html(text)
        else:
            plain, parsed = text, entities if isinstance(entities, list) else []
        size = utf16_len(plain)
        if size > limit:
            raise _bad(f"message {what} is too long" if what == "caption" else "message is too long")
        return plain, parsed

    @staticmethod
    def _check_markup(markup: Any, *, inline_only: bool) -> JSON | None:
        if markup is None or markup == "":
            return None
        if not isinstance(markup, dict):
            raise _bad("can't parse reply keyboard markup JSON object")
        if "inline_keyboard" in markup:
            rows = markup["inline_keyboard"]
            if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
                raise _bad("can't parse inline keyboard markup JSON object")
            for row in rows:
                for button in row:
                    if not isinstance(button, dict) or not button.get("text"):
                        raise _bad("can't parse inline keyboard button: Text is empty")
                    data = button.get("callback_data")
                    if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA:
                        raise _bad("BUTTON_DATA_INVALID")
                    if len(button) == 1:
                        raise _bad(
                            "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
                        )
            return markup
        if inline_only:
            raise _bad("inline keyboard expected")
        return markup

    def _bot_message(
        self,
        chat: ChatState,
        content: JSON,
        params: Params,
        *,
        source_text: str | None,
        parse_mode: str | None,
        markup: JSON | None,
    ) -> StoredMessage:
        api: JSON = {
            "message_id": chat.next_message_id,
            "from": self.bot_user,
            "chat": chat.api(),
            "date": int(self.clock.time()),
        }
        reply = params.get_json("reply_parameters")
        reply_id = (
            reply.get("message_id") if isinstance(reply, dict) else params.get_int("reply_to_message_id")
        )
        if reply_id and int(reply_id) in chat.messages:
            api["reply_to_message"] = self._reply_copy(chat.messages[int(reply_id)])
        api.update(content)
        api.update(self._thread(chat.id, params))
        if markup and "inline_keyboard" in markup:
            api["reply_markup"] = {"inline_keyboard": markup["inline_keyboard"]}
        return self._add_message(
            chat, api, from_bot=True, source_text=source_text, parse_mode=parse_mode, markup=markup
        )

    def _editable(self, p: Params) -> tuple[ChatState, StoredMessage]:
        if p.get_str("inline_message_id"):
            raise _bad("inline messages are not supported by the emulator")
        chat = self._chats.get(p.chat_id())
        message_id = p.get_int("message_id")
        msg = chat.messages.get(message_id or 0) if chat else None
        if chat is None or msg is None or msg.deleted:
            raise _bad("message to edit not found")
        if not msg.from_bot:
            raise _bad("message can't be edited")
        self._admit(chat, "edit")  # edits count against the flood limits, as in Telegram
        return chat, msg

    def _edited(self, chat: ChatState, msg: StoredMessage, api: JSON, markup: JSON | None, **kw: Any) -> JSON:
        old = msg.api
        same = all(
            api.get(k) == old.get(k)
            for k in ("text", "entities", "caption", "caption_entities", "reply_markup")
        )
        if same:
            raise _bad(
                "message is not modified: specified new message content and reply markup are exactly the "
                "same as a current content and reply markup of the message"
            )
        api["edit_date"] = int(time.time())
        self._replace(chat, msg, api, markup=markup, **kw)
        return api

    # -- HTTP: bot side --------------------------------------------------------------------------

    async def _handle_bot(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return ApiError(401, "Unauthorized").response()
        name = request.match_info["method"]
        handler = self._methods.get(name.lower())
        if handler is None:
            return ApiError(404, "Not Found: method not found").response()
        self.stats.requests[name] += 1
        status = self._take_failure(name.lower())
        if status is not None:
            if status == 0:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            return self._injected_error(status).response()
        try:
            params = await self._read_params(request)
            check_call(name, params.raw)
            self._group_refusal(name, params)
            result = await handler(params)
        except ApiError as exc:
            return exc.response()
        except Refusal as exc:  # bot.emulator_rules: what the Bot API refuses
            return ApiError(exc.status, exc.description).response()
        return web.json_response({"ok": True, "result": result}, dumps=_dumps)

    def _injected_error(self, status: int) -> ApiError:
        """The answer Telegram gives with this status, so the client reacts as it would in production."""
        if status == 429:
            self.stats.too_many_requests += 1
            return ApiError(429, "Too Many Requests: retry after 1", {"retry_after": 1})
        if status == 403:
            self.stats.forbidden += 1
            return ApiError(403, "Forbidden: bot was blocked by the user")
        descriptions = {
            400: "Bad Request: injected failure",
            500: "Internal Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
        }
        return ApiError(status, descriptions.get(status, f"Error {status} (injected)"))

    def _take_failure(self, method: str) -> int | None:
        for key in (method, "*"):
            queue = self._failures.get(key)
            if queue:
                return queue.popleft()
        return None

    @staticmethod
    async def _read_params(request: web.Request) -> Params:
        raw: dict[str, Any] = dict(request.query)
        uploads: dict[str, Upload] = {}
        if request.can_read_body:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    raise _bad("can't parse JSON request body") from None
                if isinstance(body, dict):
                    raw.update(body)
            else:
                form = await request.post()
                for key, value in form.items():
                    if isinstance(value, web.FileField):
                        uploads[key] = Upload(value.filename, value.content_type, value.file.read())
                    else:
                        raw[key] = value
        return Params(raw, uploads)

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return ApiError(401, "Unauthorized").response()
        f = self._files_by_path.get(request.match_info["path"])
        if f is None:
            return ApiError(404, "Not Found").response()
        return web.Response(body=f.data, content_type=f.mime_type or "application/octet-stream")

    # -- Bot API methods (one per Telegram method; names mirror the API) ------------------------

    async def _m_getMe(self, p: Params) -> JSON:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _m_getUpdates(self, p: Params) -> list[JSON]:
        if self._webhook_targets:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
            )
        offset = p.get_int("offset")
        limit = min(100, max(1, p.get_int("limit", 100) or 100))
        timeout = max(0.0, p.get_float("timeout", 0.0) or 0.0)
        allowed = p.get_json("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = [str(a) for a in allowed]
        # A newer getUpdates ends an older one, as on Telegram.
        self._poll_generation += 1
        generation = self._poll_generation
        self._updates_signal.notify()
        if offset is not None:
            self._confirm(offset)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._updates_signal.event
            if self._poll_generation != generation:
                raise ApiError(
                    409,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                )
            if self._webhook_targets:
                raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
            batch = self._take_updates(limit)
            remaining = deadline - loop.time()
            if batch or remaining <= 0 or self._closing:
                return batch
            await _wait(event, remaining)

    async def _m_setWebhook(self, p: Params) -> bool:
        url = p.get_str("url", "") or ""
        secret = p.get_str("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise _bad("secret token contains unallowed characters")
        if p.get_bool("drop_pending_updates"):
            self._drop_pending()
        allowed = p.get_json("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = [str(a) for a in allowed]
        self._webhook_max_connections = p.get_int("max_connections", 40) or 40
        if not url:
            return await self._m_deleteWebhook(Params({}))
        if not url.startswith(("http://", "https://")):
            raise _bad("bad webhook: Webhook can be set up only on ports 80, 88, 443 or 8443")
        self._webhook_secret = secret or None
        if not self._webhook_pinned:
            self._set_targets([url])
        self._webhook_last_error = None
        return True

    async def _m_deleteWebhook(self, p: Params) -> bool:
        if p.get_bool("drop_pending_updates"):
            self._drop_pending()
        self._webhook_pinned = False
        self._webhook_secret = None
        self._set_targets([])
        return True

    def _drop_pending(self) -> None:
        self._updates.clear()
        for lane in self._lanes.values():
            self._webhook_pending -= len(lane)
            lane.clear()

    async def _m_getWebhookInfo(self, p: Params) -> JSON:
        info: JSON = {
            "url": self._webhook_targets[0] if self._webhook_targets else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates) + self._webhook_pending,
        }
        if self._webhook_targets:
            info["max_connections"] = self._webhook_max_connections
            if self._allowed_updates:
                info["allowed_updates"] = self._allowed_updates
            if self._webhook_last_error:
                info["last_error_date"], info["last_error_message"] = self._webhook_last_error
        return info

    async def _m_sendMessage(self, p: Params) -> JSON:
        chat = self._chat(p.chat_id())
        text = p.get_str("text") or ""
        parse_mode = p.get_str("parse_mode")
        plain, entities = self._format(text, parse_mode, p.get_json("entities"), MAX_TEXT, "text")
        if not plain.strip():
            raise _bad("message text is empty")
        markup = self._check_markup(p.get_json("reply_markup"), inline_only=False)
        self._admit(chat, "sendMessage")
        content: JSON = {"text": plain}
        if entities:
            content["entities"] = entities
        msg = self._bot_message(chat, content, p, source_text=text, parse_mode=parse_mode, markup=markup)
        self._record_send(chat.id, "sendMessage")
        return msg.api

    def _caption(self, p: Params) -> tuple[JSON, str | None, str | None]:
        caption = p.get_str("caption")
        if not caption:
            return {}, None, None
        parse_mode = p.get_str("parse_mode")
        plain, entities = self._format(
            caption, parse_mode, p.get_json("caption_entities"), MAX_CAPTION, "caption"
        )
        content: JSON = {"caption": plain}
        if entities:
            content["caption_entities"] = entities
        return content, caption, parse_mode

    def _media_content(self, kind: str, value: Upload | str | None) -> JSON:
        """The message content for a photo, document or sticker given as upload, file_id or URL."""
        if kind == "photo":
            known = self._files.get(value) if isinstance(value, str) else None
            if known is not None:
                return {"photo": [{**known.api(), "width": 800, "height": 600}]}
            data = (
                value.data if isinstance(value, Upload) else self._resolve_file(value, "photos", "photo").data
            )
            return {"photo": self._invent_photo(data)}
        f = self._resolve_file(value, f"{kind}s", kind)
        body: JSON = {**f.api()}
        if kind == "document":
            body["file_name"] = f.file_name or "document"
            if f.mime_type:
                body["mime_type"] = f.mime_type
        else:
            body.update(type="regular", width=512, height=512, is_animated=False, is_video=False)
        return {kind: body}

    async def _send_media(self, p: Params, method: str, kind: str) -> JSON:
        chat = self._chat(p.chat_id())
        caption, source, parse_mode = self._caption(p) if kind != "sticker" else ({}, None, None)
        markup = self._check_markup(p.get_json("reply_markup"), inline_only=False)
        content = self._media_content(kind, p.get_file(kind))
        self._admit(chat, method)
        content.update(caption)
        msg = self._bot_message(chat, content, p, source_text=source, parse_mode=parse_mode, markup=markup)
        self._record_send(chat.id, method)
        return msg.api

    async def _m_sendMediaGroup(self, p: Params) -> list[JSON]:
        """An album: one message per item sharing a media_group_id (flood-counted as one send)."""
        chat = self._chat(p.chat_id())
        media = p.get_json("media")
        if not isinstance(media, list) or not 2 <= len(media) <= 10:
            raise _bad("media must include 2-10 items")
        prepared: list[tuple[JSON, str | None, str | None]] = []
        for item in media:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in {"photo", "document"}:
                raise _bad(f"media type {kind!r} is not supported by the emulator")
            ref = item.get("media")
            value: Upload | str | None = ref
            if isinstance(ref, str) and ref.startswith("attach://"):
                value = p.uploads.get(ref.removeprefix("attach://"))
                if value is None:
                    raise _bad(f"file {ref} not found in the request")
            content = self._media_content(kind, value)
            item_params = Params(
                {k: v for k, v in item.items() if k in {"caption", "parse_mode", "caption_entities"}}
            )
            caption, source, parse_mode = self._caption(item_params)
            content.update(caption)
            prepared.append((content, source, parse_mode))
        self._admit(chat, "sendMediaGroup")
        group_id = f"{next(self._file_seq)}{int(time.time())}"
        results = []
        for content, source, parse_mode in prepared:
            content["media_group_id"] = group_id
            msg = self._bot_message(chat, content, p, source_text=source, parse_mode=parse_mode, markup=None)
            self._record_send(chat.id, "sendMediaGroup")
            results.append(msg.api)
        return results

    async def _m_sendPhoto(self, p: Params) -> JSON:
        return await self._send_media(p, "sendPhoto", "photo")

    async def _m_sendDocument(self, p: Params) -> JSON:
        return await self._send_media(p, "sendDocument", "document")

    async def _m_sendSticker(self, p: Params) -> JSON:
        return await self._send_media(p, "sendSticker", "sticker")

    async def _copy(self, p: Params, method: str) -> StoredMessage:
        chat = self._chat(p.chat_id())
        source_chat = self._chats.get(p.chat_id("from_chat_id"))
        source = source_chat.messages.get(p.get_int("message_id") or 0) if source_chat else None
        if source is None or source.deleted:
            raise _bad("message to copy not found")
        keys = ("text", "entities", "caption", "caption_entities", "photo", "document", "sticker")
        content = {k: v for k, v in source.api.items() if k in keys}
        markup = None
        source_text, parse_mode = source.source_text, source.parse_mode
        if method == "forwardMessage":
            sender = source.api.get("from", {})
            content["forward_origin"] = {
                "type": "user",
                "sender_user": sender,
                "date": source.api.get("date"),
            }
        else:
            caption, caption_source, caption_mode = self._caption(p)
            if caption:
                content.update(caption)
                source_text, parse_mode = caption_source, caption_mode
            markup = self._check_markup(p.get_json("reply_markup"), inline_only=False)
        self._admit(chat, method)
        msg = self._bot_message(
            chat, content, p, source_text=source_text, parse_mode=parse_mode, markup=markup
        )
        self._record_send(chat.id, method)
        return msg

    async def _m_copyMessage(self, p: Params) -> JSON:
        return {"message_id": (await self._copy(p, "copyMessage")).message_id}

    async def _m_forwardMessage(self, p: Params) -> JSON:
        return (await self._copy(p, "forwardMessage")).api

    async def _m_editMessageText(self, p: Params) -> JSON:
        chat, msg = self._editable(p)
        if "text" not in msg.api:
            raise _bad("there is no text in the message to edit")
        text = p.get_str("text") or ""
        parse_mode = p.get_str("parse_mode")
        plain, entities = self._format(text, parse_mode, p.get_json("entities"), MAX_TEXT, "text")
        if not plain.strip():
            raise _bad("message text is empty")
        # Like Telegram: an edit without reply_markup removes the inline keyboard.
        markup = self._check_markup(p.get_json("reply_markup"), inline_only=True)
        api = {k: v for k, v in msg.api.items() if k not in {"text", "entities", "reply_markup", "edit_date"}}
        api["text"] = plain
        if entities:
            api["entities"] = entities
        if markup:
            api["reply_markup"] = markup
        return self._edited(chat, msg, api, markup, source_text=text, parse_mode=parse_mode)

    async def _m_editMessageCaption(self, p: Params) -> JSON:
        chat, msg = self._editable(p)
        if "text" in msg.api:
            raise _bad("there is no caption in the message to edit")
        caption, source, parse_mode = self._caption(p)
        markup = self._check_markup(p.get_json("reply_markup"), inline_only=True)
        drop = {"caption", "caption_entities", "reply_markup", "edit_date"}
        api = {k: v for k, v in msg.api.items() if k not in drop}
        api.update(caption)
        if markup:
            api["reply_markup"] = markup
        return self._edited(chat, msg, api, markup, source_text=source, parse_mode=parse_mode)

    async def _m_editMessageReplyMarkup(self, p: Params) -> JSON:
        chat, msg = self._editable(p)
        markup = self._check_markup(p.get_json("reply_markup"), inline_only=True)
        api = {k: v for k, v in msg.api.items() if k not in {"reply_markup", "edit_date"}}
        if markup:
            api["reply_markup"] = markup
        return self._edited(chat, msg, api, markup, keep_source=True)

    async def _m_deleteMessage(self, p: Params) -> bool:
        self._delete(self._chats.get(p.chat_id()), p.get_int("message_id") or 0)
        return True

    async def _m_deleteMessages(self, p: Params) -> bool:
        chat = self._chats.get(p.chat_id())
        ids = p.get_json("message_ids")
        for message_id in ids if isinstance(ids, list) else []:
            try:
                self._delete(chat, int(message_id))
            except ApiError:
                pass  # Telegram skips the ones it cannot delete
        return True

    def _delete(self, chat: ChatState | None, message_id: int) -> None:
        msg = chat.messages.get(message_id) if chat else None
        if chat is None or msg is None or msg.deleted:
            raise _bad("message to delete not found")
        check_deletable(float(msg.api.get("date", 0)), self.clock.time())
        msg.deleted = True
        self._event(chat, "delete", message=msg.view())

    async def _m_answerCallbackQuery(self, p: Params) -> bool:
        query_id = p.get_str("callback_query_id") or ""
        query = self._callbacks.get(query_id)
        if query is None or query["answered"]:
            raise _bad("query is too old and response timeout expired or query ID is invalid")
        check_answer_in_time(query["at"], self.clock.monotonic())
        query["answered"] = True
        answer = {
            "callback_query_id": query_id,
            "user_id": query["user_id"],
            "chat_id": query["chat_id"],
            "message_id": query["message_id"],
            "text": p.get_str("text"),
            "show_alert": p.get_bool("show_alert"),
            "url": p.get_str("url"),
        }
        self._callback_answers.setdefault(query["user_id"], []).append(answer)
        self._event(self._chat(query["chat_id"]), "callback_answer", answer=answer)
        return True

    async def _m_getFile(self, p: Params) -> JSON:
        f = self._files.get(p.get_str("file_id") or "")
        if f is None:
            raise _bad("invalid file_id")
        return {**f.api(), "file_path": f.file_path}

    async def _m_sendChatAction(self, p: Params) -> bool:
        chat = self._chat(p.chat_id())
        self._admit(chat, None)
        self._thread(chat.id, p)
        self._event(chat, "action", action=p.get_str("action") or "typing")
        return True

    async def _m_setMyCommands(self, p: Params) -> bool:
        commands = p.get_json("commands")
        if not isinstance(commands, list):
            raise _bad("can't parse commands JSON object")
        for command in commands:
            name = str(command.get("command", "")) if isinstance(command, dict) else ""
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise _bad("BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _bad("BOT_COMMAND_DESCRIPTION_INVALID")
        key = (_scope_key(p.get_json("scope")), p.get_str("language_code", "") or "")
        if commands:
            self._commands[key] = [
                {"command": c["command"], "description": c["description"]} for c in commands
            ]
        else:
            self._commands.pop(key, None)
        return True

    async def _m_getMyCommands(self, p: Params) -> list[JSON]:
        return self._commands.get((_scope_key(p.get_json("scope")), p.get_str("language_code", "") or ""), [])

    async def _m_deleteMyCommands(self, p: Params) -> bool:
        self._commands.pop((_scope_key(p.get_json("scope")), p.get_str("language_code", "") or ""), None)
        return True

    async def _m_setChatMenuButton(self, p: Params) -> bool:
        button = p.get_json("menu_button")
        self._menu_buttons[p.get_int("chat_id")] = button if isinstance(button, dict) else {"type": "default"}
        return True

    async def _m_getChatMenuButton(self, p: Params) -> JSON:
        chat_id = p.get_int("chat_id")
        return self._menu_buttons.get(chat_id) or self._menu_buttons.get(None) or {"type": "commands"}

    async def _m_getChat(self, p: Params) -> JSON:
        chat_id = p.chat_id()
        if chat_id not in self._chats and chat_id not in self._users:
            raise _bad("chat not found")
        gifts = dict.fromkeys(
            (
                "unlimited_gifts",
                "limited_gifts",
                "unique_gifts",
                "premium_subscription",
                "gifts_from_channels",
            ),
            False,
        )
        return {
            **self._chat(chat_id).api(),
            **self._forum_flag(chat_id),
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": gifts,
        }

    async def _m_getChatMember(self, p: Params) -> JSON:
        user_id = p.get_int("user_id") or 0
        if user_id == self.bot_user["id"]:
            return self._bot_member_of(p.chat_id()) or {"status": "member", "user": self.bot_user}
        status = "kicked" if user_id in self._blocked else "member"
        member: JSON = {"status": status, "user": self._users.get(user_id) or self._stub_user_api(user_id)}
        if status == "kicked":
            member["until_date"] = 0
        return member

    async def _m_pinChatMessage(self, p: Params) -> bool:
        return True

    async def _m_unpinChatMessage(self, p: Params) -> bool:
        return True

    async def _set_bot_text(self, p: Params, key: str) -> bool:
        self._bot_texts[f"{key}:{p.get_str('language_code', '') or ''}"] = p.get_str(key, "") or ""
        return True

    async def _m_setMyDescription(self, p: Params) -> bool:
        return await self._set_bot_text(p, "description")

    async def _m_setMyShortDescription(self, p: Params) -> bool:
        return await self._set_bot_text(p, "short_description")

    async def _m_setMyName(self, p: Params) -> bool:
        return await self._set_bot_text(p, "name")

    def _bot_text(self, p: Params, key: str) -> JSON:
        lang = p.get_str("language_code", "") or ""
        return {key: self._bot_texts.get(f"{key}:{lang}", self._bot_texts.get(f"{key}:", ""))}

    async def _m_getMyDescription(self, p: Params) -> JSON:
        return self._bot_text(p, "description")

    async def _m_getMyShortDescription(self, p: Params) -> JSON:
        return self._bot_text(p, "short_description")

    async def _m_getMyName(self, p: Params) -> JSON:
        return {"name": self._bot_text(p, "name")["name"] or self.bot_user["first_name"]}

    async def _m_close(self, p: Params) -> bool:
        return True

    async def _m_logOut(self, p: Params) -> bool:
        return True

    # -- HTTP: user side and controls (/_emu/) --------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> JSON:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "Bad Request: JSON body expected") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Bad Request: JSON object expected")
        return body

    @staticmethod
    def _ok(data: Any) -> web.Response:
        return web.json_response(data, dumps=_dumps)

    @staticmethod
    def _opt_int(body: Mapping[str, Any], key: str) -> int | None:
        value = body.get(key)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ApiError(400, f"Bad Request: {key} must be an integer") from None

    def _req_int(self, body: Mapping[str, Any], key: str) -> int:
        value = self._opt_int(body, key)
        if value is None:
            raise ApiError(400, f"Bad Request: {key} is required")
        return value

    async def _guard(self, work: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await work()
        except ApiError as exc:
            return exc.response()

    async def _h_send(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            return self._ok(
                self.user_send(
                    self._req_int(b, "user_id"),
                    text=b.get("text"),
                    first_name=b.get("first_name"),
                    last_name=b.get("last_name"),
                    username=b.get("username"),
                    language_code=b.get("language_code"),
                    chat_id=self._opt_int(b, "chat_id"),
                    chat_type=b.get("chat_type"),
                    chat_title=b.get("chat_title"),
                    photo=_photo_field(b.get("photo")),
                    caption=b.get("caption"),
                    sticker=b.get("sticker") or False,
                    document=b.get("document"),
                    reply_to_message_id=self._opt_int(b, "reply_to_message_id"),
                )
            )

        return await self._guard(work)

    async def _h_press(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            return self._ok(
                self.user_press(
                    self._req_int(b, "user_id"),
                    self._req_int(b, "message_id"),
                    str(b.get("data", "")),
                    chat_id=self._opt_int(b, "chat_id"),
                    first_name=b.get("first_name"),
                    language_code=b.get("language_code"),
                )
            )

        return await self._guard(work)

    async def _h_edit(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            return self._ok(
                self.user_edit(
                    self._req_int(b, "user_id"),
                    self._req_int(b, "message_id"),
                    str(b.get("text", "")),
                    chat_id=self._opt_int(b, "chat_id"),
                )
            )

        return await self._guard(work)

    @staticmethod
    def _poll_args(request: web.Request) -> tuple[int, float, int]:
        q = request.query
        try:
            after = int(q.get("after", "0"))
            wait = min(60.0, max(0.0, float(q.get("wait", "0"))))
            limit = min(5000, max(1, int(q.get("limit", "1000"))))
        except ValueError:
            raise ApiError(400, "Bad Request: after, wait and limit must be numbers") from None
        return after, wait, limit

    async def _h_all_events(self, request: web.Request) -> web.StreamResponse:
        """Every chat's events after ``seq`` (long poll): one stream for many simulated users."""

        async def work() -> web.StreamResponse:
            after, wait, limit = self._poll_args(request)
            if after > len(self._events):
                # The client saw a previous emulator run: it must reload (``reset``).
                return self._ok({"events": [], "seq": len(self._events), "reset": True})
            deadline = asyncio.get_running_loop().time() + wait
            while True:
                signal = self._events_signal.event
                if after < 0:
                    after = len(self._events)
                events = self._events[after : after + limit]
                remaining = deadline - asyncio.get_running_loop().time()
                if events or remaining <= 0 or self._closing:
                    seq = events[-1]["seq"] if events else max(after, len(self._events))
                    return self._ok({"events": events, "seq": seq})
                await _wait(signal, remaining)

        return await self._guard(work)

    async def _h_chat_events(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            chat = self._chat(self._path_int(request, "chat_id"))
            after, wait, limit = self._poll_args(request)
            if after > len(self._events):
                return self._ok({"events": [], "seq": len(self._events), "reset": True})
            deadline = asyncio.get_running_loop().time() + wait
            while True:
                signal = chat.signal.event
                start = bisect.bisect_right(chat.events, after, key=lambda e: e["seq"])
                events = chat.events[start : start + limit]
                remaining = deadline - asyncio.get_running_loop().time()
                if events or remaining <= 0 or self._closing:
                    seq = events[-1]["seq"] if len(events) == limit else max(after, len(self._events))
                    return self._ok({"events": events, "seq": seq})
                await _wait(signal, remaining)

        return await self._guard(work)

    @staticmethod
    def _path_int(request: web.Request, key: str) -> int:
        try:
            return int(request.match_info[key])
        except ValueError:
            raise ApiError(400, f"Bad Request: {key} must be an integer") from None

    async def _h_chat_messages(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            chat_id = self._path_int(request, "chat_id")
            return self._ok({"messages": self.chat_messages(chat_id), "seq": len(self._events)})

        return await self._guard(work)

    async def _h_callback_answers(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            user_id = self._req_int(request.query, "user_id")
            return self._ok({"answers": self.callback_answers(user_id)})

        return await self._guard(work)

    async def _h_personas(self, request: web.Request) -> web.StreamResponse:
        return self._ok({"personas": self.personas, "bot": self.bot_user})

    async def _h_set_personas(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            personas = (await self._body(request)).get("personas")
            if not isinstance(personas, list):
                raise ApiError(400, "Bad Request: personas must be a list")
            self.personas = personas
            return self._ok({"personas": self.personas})

        return await self._guard(work)

    async def _h_block(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            user_id = self._req_int(b, "user_id")
            self.block(user_id, bool(b.get("blocked", True)))
            return self._ok({"user_id": user_id, "blocked": self.is_blocked(user_id)})

        return await self._guard(work)

    async def _h_limits(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            if request.method == "POST":
                b = await self._body(request)
                self.set_limits(
                    b.get("global_rate"),
                    b.get("per_chat_rate"),
                    int(b.get("per_chat_burst") or 5),
                    b.get("group_per_minute"),
                )
            return self._ok(self.flood.limits())

        return await self._guard(work)

    async def _h_fail(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            method = str(b.get("method") or "")
            if not method:
                raise ApiError(400, "Bad Request: method is required")
            self.fail_next(method, int(b.get("count", 1)), int(b.get("status", 502)))
            return self._ok({"ok": True})

        return await self._guard(work)

    async def _h_inject(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            b = await self._body(request)
            update = b.get("update", b)
            return self._ok({"update_id": self.inject_update(update)})

        return await self._guard(work)

    async def _h_stats(self, request: web.Request) -> web.StreamResponse:
        data = self.stats.to_dict(include_sends=request.query.get("sends") in {"1", "true"})
        data["limits"] = self.flood.limits()
        data["pending_updates"] = len(self._updates) + self._webhook_pending
        return self._ok(data)

    async def _h_stats_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_stats()
        return self._ok({"ok": True})

    async def _h_file_download(self, request: web.Request) -> web.StreamResponse:
        f = self._files.get(request.match_info["file_id"])
        if f is None:
            return ApiError(404, "Not Found: file not found").response()
        name = f.file_name or Path(f.file_path).name
        headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}"}
        return web.Response(
            body=f.data, content_type=f.mime_type or "application/octet-stream", headers=headers
        )

    async def _h_commands(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            q = request.query
            commands = self.commands(
                self._opt_int(q, "chat_id"), self._opt_int(q, "user_id"), q.get("language_code", "")
            )
            return self._ok({"commands": commands, "all": self.all_commands()})

        return await self._guard(work)

    async def _h_webhooks(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            if request.method == "POST":
                b = await self._body(request)
                urls = b.get("urls")
                if not isinstance(urls, list):
                    raise ApiError(400, "Bad Request: urls must be a list")
                self.set_webhook_targets(
                    [str(u) for u in urls],
                    sticky=bool(b.get("sticky", True)),
                    secret_token=b.get("secret_token"),
                )
            return self._ok(
                {
                    "urls": self._webhook_targets,
                    "sticky": self._webhook_sticky,
                    "pending": self._webhook_pending,
                }
            )

        return await self._guard(work)

    async def _h_index(self, request: web.Request) -> web.StreamResponse:
        page = STATIC_DIR / "demo.html"
        if not page.is_file():
            return web.Response(status=404, text="demo page missing")
        return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------------------------
# The user side for Python: Person


class _EventHub:
    """One long poll of ``/_emu/events`` shared by all Persons of one HTTP session and emulator.

    Two hundred simulated readers then cost one waiting connection, not two hundred.
    """

    def __init__(self, root: str, session: aiohttp.ClientSession) -> None:
        self.root = root
        self.session = session
        self.persons: dict[int, set[Person]] = {}
        self.cursor = 0
        self.task: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    def register(self, person: Person) -> None:
        self.persons.setdefault(person.chat_id, set()).add(person)
        if self.task is None or self.task.done():
            self.started = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())

    def unregister(self, person: Person) -> None:
        group = self.persons.get(person.chat_id)
        if group is not None:
            group.discard(person)
            if not group:
                del self.persons[person.chat_id]
        if not self.persons and self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        delay = 0.05
        first = True
        while True:
            try:
                params = {"after": str(-1 if first else self.cursor), "wait": "0" if first else "20"}
                async with self.session.get(f"{self.root}/_emu/events", params=params) as resp:
                    resp.raise_for_status()
                    data = await resp.json()
                first = False
                delay = 0.05
                self.started.set()
                for event in data["events"]:
                    for person in list(self.persons.get(event["chat_id"], ())):
                        person._apply(event)
                self.cursor = int(data["seq"]) if data.get("reset") else max(self.cursor, int(data["seq"]))
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                await asyncio.sleep(delay)  # the emulator restarts or stops; try again gently
                delay = min(delay * 2, 1.0)


_HUBS: weakref.WeakKeyDictionary[aiohttp.ClientSession, dict[str, _EventHub]] = weakref.WeakKeyDictionary()


class Person:
    """A simulated Telegram user, driving the user side of the emulator over HTTP.

    ``send``/``press``/``edit`` return the bot messages (views, see :meth:`StoredMessage.view`) that
    arrived or changed after the action: they wait for the first one, then for a quiet period
    (``quiet`` seconds) with nothing more. ``expect=False`` waits just the quiet period and may
    return ``[]``, to check the bot stayed silent. Use as ``async with Person(...) as p:``, or
    call :meth:`close`::

        async with Person(emu.url, 1001, "Lin", "zh-hans") as reader:
            [menu] = await reader.send("/loans")
            assert "Renew all" in menu["plain"]
            replies = await reader.press("Renew all")
            notice = await reader.wait_for(lambda m: "due" in m["plain"])

    ``base_url`` is the emulator's root (``emu.url``); a trailing ``/bot`` is tolerated. Persons
    sharing one ``session`` share one event stream, which is how benchmarks run hundreds of them.
    """

    def __init__(
        self,
        base_url: str,
        user_id: int,
        first_name: str = "Test",
        language_code: str = "en",
        chat_id: int | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        last_name: str | None = None,
        username: str | None = None,
        chat_type: str | None = None,
        chat_title: str | None = None,
        quiet: float = 0.3,
    ) -> None:
        root = base_url.rstrip("/")
        self.root = root.removesuffix("/bot") if root.endswith("/bot") else root
        self.user_id = user_id
        self.first_name = first_name
        self.language_code = language_code
        self.last_name = last_name
        self.username = username
        self.chat_id = user_id if chat_id is None else chat_id
        self.chat_type = chat_type or ("private" if self.chat_id > 0 else "group")
        self.chat_title = chat_title
        self.quiet = quiet
        self.last_callback_answer: JSON | None = None
        #: Seconds from the last action to the first bot reply (benchmarks: excludes ``quiet``).
        self.last_latency: float | None = None
        self.callback_answers: list[JSON] = []
        self._session = session
        self._own_session = session is None
        self._hub: _EventHub | None = None
        self._messages: dict[int, JSON] = {}
        self._events: list[JSON] = []
        self._buffer: list[JSON] | None = None
        self._snapshot_seq = 0
        self._cursor = 0
        self._signal: _Signal | None = None
        self._starting: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Person:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- actions -----------------------------------------------------------------------------

    async def send(
        self,
        text: str,
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Send a text message; returns the bot's new or edited messages after it."""
        return await self._send({"text": text}, wait, timeout, expect, quiet)

    async def send_photo(
        self,
        caption: str = "",
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Send a photo (the emulator invents its file_id) with an optional caption."""
        return await self._send({"photo": True, "caption": caption or None}, wait, timeout, expect, quiet)

    async def send_sticker(
        self,
        emoji: str = "👍",
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Send a sticker."""
        return await self._send({"sticker": emoji}, wait, timeout, expect, quiet)

    async def send_document(
        self,
        file_name: str,
        content: bytes,
        caption: str = "",
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Send a file."""
        document = {"file_name": file_name, "content_b64": base64.b64encode(content).decode()}
        return await self._send(
            {"document": document, "caption": caption or None}, wait, timeout, expect, quiet
        )

    async def press(
        self,
        button: str,
        *,
        message: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Press the inline button with this exact label or callback_data.

        It is looked for on ``message`` (its latest version), else on the newest bot message that
        has it. A button of a reply keyboard is "pressed" by sending its text. Returns new or edited
        bot messages; the callback answer (toast) is in :attr:`last_callback_answer`.
        """
        await self._start()
        if message is not None:
            candidates = [self._messages.get(int(message["message_id"]), dict(message))]
        else:
            candidates = sorted(
                (m for m in self._messages.values() if m["from_bot"] and not m["deleted"]),
                key=lambda m: m["message_id"],
                reverse=True,
            )
        for msg in candidates:
            for row in msg.get("buttons") or []:
                for b in row:
                    if b.get("text") == button or b.get("callback_data") == button:
                        if "callback_data" not in b:
                            raise ValueError(
                                f"button {button!r} is a URL button ({b.get('url')}), not pressable"
                            )
                        return await self.press_data(
                            msg["message_id"],
                            b["callback_data"],
                            wait=wait,
                            timeout=timeout,
                            expect=expect,
                            quiet=quiet,
                        )
        for msg in candidates:
            if any(button in row for row in msg.get("reply_keyboard") or []):
                return await self.send(button, wait=wait, timeout=timeout, expect=expect, quiet=quiet)
        available = [b.get("text") for m in candidates[:5] for row in m.get("buttons") or [] for b in row]
        raise LookupError(f"no button {button!r}; buttons on the latest bot messages: {available}")

    async def press_data(
        self,
        message_id: int,
        data: str,
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Press any callback data (possibly forged) on any message id of this chat."""
        await self._start()
        payload = {
            "user_id": self.user_id,
            "chat_id": self.chat_id,
            "message_id": message_id,
            "data": data,
            "first_name": self.first_name,
            "language_code": self.language_code,
        }
        result = await self._post("/_emu/press", payload)
        if not wait:
            self._cursor = max(self._cursor, int(result["seq"]))
            return []
        return await self._collect(
            int(result["seq"]),
            timeout=timeout,
            expect=expect,
            quiet=quiet,
            query_id=result["callback_query_id"],
        )

    async def edit(
        self,
        message_id: int,
        text: str,
        *,
        wait: bool = True,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        expect: bool = True,
        quiet: float | None = None,
    ) -> list[JSON]:
        """Edit one of this person's own messages (the bot gets an ``edited_message``)."""
        await self._start()
        payload = {"user_id": self.user_id, "chat_id": self.chat_id, "message_id": message_id, "text": text}
        result = await self._post("/_emu/edit", payload)
        if not wait:
            self._cursor = max(self._cursor, int(result["seq"]))
            return []
        return await self._collect(int(result["seq"]), timeout=timeout, expect=expect, quiet=quiet)

    async def wait_for(
        self,
        predicate: Callable[[JSON], bool] | None = None,
        timeout: float = 10,  # noqa: ASYNC109 (public API: seconds to wait for the bot)
        quiet: float | None = None,
    ) -> list[JSON]:
        """Wait for bot messages (pushes such as notices) not yet returned by an earlier call.

        Returns the new or edited bot messages matching ``predicate`` (all if None), once at least
        one matched and a quiet period passed. Raises ``TimeoutError`` if none arrives in time.
        """
        await self._start()
        return await self._collect(
            self._cursor, timeout=timeout, expect=True, quiet=quiet, predicate=predicate
        )

    def messages(self) -> list[JSON]:
        """The chat as this person sees it: latest version of every message, oldest first."""
        return [self._messages[k] for k in sorted(self._messages)]

    def bot_messages(self) -> list[JSON]:
        """The bot's messages that are not deleted, oldest first."""
        return [m for m in self.messages() if m["from_bot"] and not m["deleted"]]

    def last_message(self) -> JSON | None:
        """The newest bot message still in the chat."""
        bot = self.bot_messages()
        return bot[-1] if bot else None

    async def close(self) -> None:
        """Stop following the chat and close the session if this Person opened it."""
        if self._hub is not None:
            self._hub.unregister(self)
            self._hub = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
        self._starting = None

    # -- internals ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Start following the chat (done by the first action; ``messages()`` is empty before)."""
        await self._start()

    async def _start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._follow())
        try:
            await asyncio.shield(self._starting)
        except Exception:
            self._starting = None  # let a later call try again (the emulator may not be up yet)
            if self._hub is not None:
                self._hub.unregister(self)
                self._hub = None
            raise

    async def _follow(self) -> None:
        """Join the session's event stream, then load the chat as it is now."""
        self._signal = _Signal()
        if self._session is None:
            self._session = aiohttp.ClientSession()
        hubs = _HUBS.setdefault(self._session, {})
        hub = hubs.get(self.root)
        if hub is None:
            hub = hubs[self.root] = _EventHub(self.root, self._session)
        self._hub = hub
        self._buffer = []  # events arriving before the snapshot, replayed after it
        hub.register(self)
        # The stream must be positioned before the snapshot is taken, or events between the two
        # would be lost.
        await asyncio.wait_for(hub.started.wait(), 10)
        snapshot = await self._get(f"/_emu/chats/{self.chat_id}/messages")
        self._snapshot_seq = self._cursor = int(snapshot["seq"])
        self._messages = {int(m["message_id"]): m for m in snapshot["messages"]}
        buffered, self._buffer = self._buffer, None
        for event in buffered:
            self._apply(event)

    def _apply(self, event: JSON) -> None:
        if self._buffer is not None:
            self._buffer.append(event)
            return
        if event["seq"] <= self._snapshot_seq or (self._events and event["seq"] <= self._events[-1]["seq"]):
            return
        self._events.append(event)
        if "message" in event:
            message = event["message"]
            self._messages[int(message["message_id"])] = message
        elif event["type"] == "callback_answer" and event["answer"]["user_id"] == self.user_id:
            self.last_callback_answer = event["answer"]
            self.callback_answers.append(event["answer"])
        if self._signal is not None:
            self._signal.notify()

    async def _send(
        self,
        body: JSON,
        wait: bool,
        timeout: float,  # noqa: ASYNC109
        expect: bool,
        quiet: float | None,
    ) -> list[JSON]:
        await self._start()
        payload = {
            "user_id": self.user_id,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "username": self.username,
            "language_code": self.language_code,
            "chat_id": self.chat_id,
            "chat_type": self.chat_type,
            "chat_title": self.chat_title,
            **body,
        }
        result = await self._post("/_emu/send", {k: v for k, v in payload.items() if v is not None})
        if not wait:
            self._cursor = max(self._cursor, int(result["seq"]))
            return []
        return await self._collect(int(result["seq"]), timeout=timeout, expect=expect, quiet=quiet)

    async def _collect(
        self,
        after: int,
        *,
        timeout: float,  # noqa: ASYNC109
        expect: bool,
        quiet: float | None,
        predicate: Callable[[JSON], bool] | None = None,
        query_id: str | None = None,
    ) -> list[JSON]:
        """Bot messages new or edited after event ``after``; see the class docstring."""
        assert self._signal is not None
        quiet = self.quiet if quiet is None else quiet
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        seen = -1
        settle_at: float | None = None
        while True:
            signal = self._signal.event
            found, answered, last_seq = self._scan(after, predicate, query_id)
            relevant = len(found) + answered
            now = loop.time()
            if relevant != seen:
                if relevant and seen <= 0:
                    self.last_latency = now - started
                seen = relevant
                if relevant or not expect:
                    settle_at = now + quiet
            if settle_at is not None and now >= settle_at:
                break
            if settle_at is None and now >= deadline:
                recent = [m.get("plain", "")[:80] for m in self.messages()[-5:]]
                raise TimeoutError(
                    f"no bot message in {timeout} s for user {self.user_id}; last messages: {recent}"
                )
            until = settle_at if settle_at is not None else deadline
            await _wait(signal, until - now)
        self._cursor = max(self._cursor, last_seq)
        return found

    def _scan(
        self, after: int, predicate: Callable[[JSON], bool] | None, query_id: str | None
    ) -> tuple[list[JSON], int, int]:
        start = bisect.bisect_right(self._events, after, key=lambda e: e["seq"])
        ids: dict[int, None] = {}
        answered = 0
        last_seq = after
        for event in self._events[start:]:
            if event["type"] in {"new", "edit"} and event["message"]["from_bot"]:
                message = self._messages[int(event["message"]["message_id"])]
                if predicate is None or predicate(message):
                    ids[int(message["message_id"])] = None
                    last_seq = event["seq"]
            elif event["type"] == "callback_answer" and event["answer"]["callback_query_id"] == query_id:
                answered = 1
            if predicate is None:
                last_seq = event["seq"]
        return [self._messages[i] for i in ids], answered, last_seq

    async def _post(self, path: str, payload: JSON) -> JSON:
        assert self._session is not None
        async with self._session.post(self.root + path, json=payload) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise RuntimeError(f"emulator refused {path}: {data.get('description', data)}")
            return data

    async def _get(self, path: str) -> JSON:
        assert self._session is not None
        async with self._session.get(self.root + path) as resp:
            resp.raise_for_status()
            return await resp.json()


# --- the control API is for the page the emulator serves, and for nobody else ------------------


def _served_host(host: str) -> bool:
    """A ``Host`` header naming this machine by address (or as localhost): a domain name that
    resolves here is how DNS rebinding gets a foreign page the same origin as the demo."""
    import ipaddress

    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def control_api_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/_emu/*`` acts for the people in the demo: only for requests from the page it serves.

    A ``Host`` other than this machine's address (DNS rebinding) and an ``Origin`` other than the
    page's are refused; a POST must be JSON, which a page on another site cannot send without the
    browser asking first (a cross-site form or ``text/plain`` POST is refused).
    """
    if not request.path.startswith("/_emu/"):
        return await handler(request)
    if not _served_host(request.host):
        return web.json_response({"ok": False, "description": "Forbidden: unknown host"}, status=403)
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return web.json_response({"ok": False, "description": "Forbidden: cross-origin request"}, status=403)
    if request.method == "POST" and request.content_type != "application/json":
        return web.json_response({"ok": False, "description": "Unsupported Media Type: send JSON"}, status=415)
    return await handler(request)
def _photo_field(value: Any) -> bool | Mapping[str, Any]:
    """``photo`` of ``/_emu/send``: true (a photo is invented) or ``{"content_b64": …}`` (the demo page's upload)."""
    return value if isinstance(value, dict) else bool(value)
