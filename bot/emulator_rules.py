"""What the emulator enforces as Telegram does: the flood limits, counted the way Telegram counts
them, the emulator's clock, and the checks of the published Bot API that refuse a call with
Telegram's own 400 message.

Kept apart from :mod:`bot.emulator` (which plays the chats, the updates and the HTTP side) so the
rules can be read, and changed, in one place.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]

# --------------------------------------------------------------------------------------------
# The clock


class EmulatorClock:
    """The emulator's time: the real clock plus an offset that a test moves forward, so the rules
    that depend on age (a callback query answered after 15 s, a message deleted after 48 hours, the
    flood windows) are tested without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        """Seconds since the epoch (message dates)."""
        return time.time() + self.offset

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (flood windows, query ages)."""
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the emulator's time forward by ``seconds``."""
        self.offset += seconds


# --------------------------------------------------------------------------------------------
# Flood limits

WINDOW = 1.0  # Telegram counts a bot's messages in any rolling second
GROUP_WINDOW = 60.0  # and a group's messages in any rolling minute


class _RollingWindow:
    """At most ``limit`` messages in any ``span`` seconds, counted from the times they were accepted."""

    __slots__ = ("limit", "sent", "span")

    def __init__(self, limit: int, span: float) -> None:
        self.limit = max(1, limit)
        self.span = span
        self.sent: deque[float] = deque()

    def wait(self, now: float) -> float:
        """Seconds until one more message fits (0 if it does now)."""
        while self.sent and self.sent[0] <= now - self.span:
            self.sent.popleft()
        if len(self.sent) < self.limit:
            return 0.0
        return self.sent[len(self.sent) - self.limit] + self.span - now

    def take(self, now: float) -> None:
        self.sent.append(now)


class _Bucket:
    """A private chat: about ``rate`` messages a second, with a short burst of ``capacity``."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self.stamp = now

    def wait(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return (1 - self.tokens) / self.rate if self.tokens < 1 else 0.0

    def take(self, now: float) -> None:
        self.tokens -= 1


class FloodControl:
    """Telegram's flood limits, as it enforces them.

    * ``global_rate`` messages in any rolling second for the whole bot (about 30): no credit is
      saved up in quiet moments, so a burst after a pause is refused just the same;
    * about ``per_chat_rate`` messages a second to one private chat, with short bursts of
      ``per_chat_burst``;
    * ``group_per_minute`` messages in any rolling minute to one group (20).

    Every message counts, edits included; a refused one does not. ``None`` = unlimited.
    """

    def __init__(
        self,
        global_rate: float | None = None,
        per_chat_rate: float | None = None,
        per_chat_burst: int = 5,
        group_per_minute: int | None = None,
    ) -> None:
        self.configure(global_rate, per_chat_rate, per_chat_burst, group_per_minute)

    def configure(
        self,
        global_rate: float | None,
        per_chat_rate: float | None,
        per_chat_burst: int = 5,
        group_per_minute: int | None = None,
    ) -> None:
        """Set the limits (``None`` = unlimited) and forget what was counted."""
        self.global_rate = global_rate or None
        self.per_chat_rate = per_chat_rate or None
        self.per_chat_burst = max(1, per_chat_burst)
        self.group_per_minute = group_per_minute or None
        self._global = _RollingWindow(math.floor(global_rate * WINDOW), WINDOW) if global_rate else None
        self._chats: dict[int, _Bucket | _RollingWindow] = {}

    def limits(self) -> JSON:
        return {
            "global_rate": self.global_rate,
            "per_chat_rate": self.per_chat_rate,
            "per_chat_burst": self.per_chat_burst,
            "group_per_minute": self.group_per_minute,
            "window_seconds": WINDOW,
        }

    def _chat_limit(self, chat_id: int, now: float) -> _Bucket | _RollingWindow | None:
        found = self._chats.get(chat_id)
        if found is not None:
            return found
        if chat_id < 0 and self.group_per_minute:
            found = _RollingWindow(self.group_per_minute, GROUP_WINDOW)
        elif chat_id >= 0 and self.per_chat_rate:
            found = _Bucket(self.per_chat_rate, self.per_chat_burst, now)
        if found is not None:
            self._chats[chat_id] = found
        return found

    def admit(self, chat_id: int, now: float) -> int | None:
        """Count one message to ``chat_id``, or return the ``retry_after`` seconds (at least 1)."""
        limits: list[_Bucket | _RollingWindow] = [
            x for x in (self._global, self._chat_limit(chat_id, now)) if x is not None
        ]
        wait = max((x.wait(now) for x in limits), default=0.0)
        if wait > 0:
            return max(1, math.ceil(wait))
        for x in limits:
            x.take(now)
        return None


# --------------------------------------------------------------------------------------------
# The Bot API's own limits: what Telegram refuses with 400 (or 403), with its own messages

CALLBACK_QUERY_TIMEOUT = 15.0  # seconds within which a callback query must be answered
DELETE_WINDOW = 48 * 3600.0  # a bot may delete a message only this long after it was sent
MAX_INLINE_BUTTONS = 100
MAX_CALLBACK_ANSWER = 200
MAX_COMMANDS = 100

QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"
CANT_INITIATE = "Forbidden: bot can't initiate conversation with a user"


class Refusal(Exception):
    """Telegram's answer to a call it refuses: HTTP ``status`` and its ``description``."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.status = status
        self.description = description if status != 400 else f"Bad Request: {description}"


_SEND = frozenset(
    "chat_id business_connection_id message_thread_id direct_messages_topic_id disable_notification "
    "protect_content allow_paid_broadcast message_effect_id suggested_post_parameters reply_parameters "
    "reply_markup".split()
)
_CAPTION = frozenset("caption parse_mode caption_entities show_caption_above_media".split())


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: The parameters each emulated method accepts (Bot API 9), as published. Methods not listed are
#: not checked.
PARAMETERS: dict[str, frozenset[str]] = {
    "getme": frozenset(),
    "logout": frozenset(),
    "close": frozenset(),
    "getwebhookinfo": frozenset(),
    "getupdates": _names("offset limit timeout allowed_updates"),
    "setwebhook": _names(
        "url certificate ip_address max_connections allowed_updates drop_pending_updates secret_token"
    ),
    "deletewebhook": _names("drop_pending_updates"),
    "sendmessage": _SEND | _names("text parse_mode entities link_preview_options"),
    "sendphoto": _SEND | _CAPTION | _names("photo has_spoiler"),
    "senddocument": _SEND | _CAPTION | _names("document thumbnail disable_content_type_detection"),
    "sendsticker": _SEND | _names("sticker emoji"),
    "sendmediagroup": (_SEND - {"reply_markup", "suggested_post_parameters"}) | _names("media"),
    "copymessage": (_SEND - {"business_connection_id", "message_effect_id"})
    | _CAPTION
    | _names("from_chat_id message_id video_start_timestamp"),
    "forwardmessage": _names(
        "chat_id message_thread_id direct_messages_topic_id from_chat_id video_start_timestamp "
        "disable_notification protect_content suggested_post_parameters message_id"
    ),
    "editmessagetext": _names(
        "business_connection_id chat_id message_id inline_message_id text parse_mode entities "
        "link_preview_options reply_markup"
    ),
    "editmessagecaption": _names(
        "business_connection_id chat_id message_id inline_message_id caption parse_mode caption_entities "
        "show_caption_above_media reply_markup"
    ),
    "editmessagereplymarkup": _names("business_connection_id chat_id message_id inline_message_id reply_markup"),
    "deletemessage": _names("chat_id message_id"),
    "deletemessages": _names("chat_id message_ids"),
    "answercallbackquery": _names("callback_query_id text show_alert url cache_time"),
    "getfile": _names("file_id"),
    "sendchataction": _names("business_connection_id chat_id message_thread_id action"),
    "setmycommands": _names("commands scope language_code"),
    "getmycommands": _names("scope language_code"),
    "deletemycommands": _names("scope language_code"),
    "setchatmenubutton": _names("chat_id menu_button"),
    "getchatmenubutton": _names("chat_id"),
    "getchat": _names("chat_id"),
    "getchatmember": _names("chat_id user_id"),
    "pinchatmessage": _names("business_connection_id chat_id message_id disable_notification"),
    "unpinchatmessage": _names("business_connection_id chat_id message_id"),
    "setmydescription": _names("description language_code"),
    "setmyshortdescription": _names("short_description language_code"),
    "setmyname": _names("name language_code"),
    "getmydescription": _names("language_code"),
    "getmyshortdescription": _names("language_code"),
    "getmyname": _names("language_code"),
}


def check_call(method: str, raw: Mapping[str, Any]) -> None:
    """Refuse, before anything else, a call the Bot API would refuse whatever the chat: a parameter
    the method does not have, too many inline buttons, an answer to a button over 200 characters,
    more than 100 commands. ``raw`` holds the parameters as sent (JSON strings in form bodies)."""
    name = method.lower()
    accepted = PARAMETERS.get(name)
    if accepted is not None:
        unknown = sorted(set(raw) - accepted)
        if unknown:
            # Telegram itself ignores unknown parameters; refusing them finds a misspelt one, which
            # production would silently drop.
            raise Refusal(f'unknown parameter "{unknown[0]}" of {method}')
    markup = _json(raw.get("reply_markup"))
    if isinstance(markup, dict) and isinstance(markup.get("inline_keyboard"), list):
        buttons = sum(len(row) for row in markup["inline_keyboard"] if isinstance(row, list))
        if buttons > MAX_INLINE_BUTTONS:
            raise Refusal("reply markup is too long")
    if name == "answercallbackquery" and len(str(raw.get("text") or "")) > MAX_CALLBACK_ANSWER:
        raise Refusal("MESSAGE_TOO_LONG")
    if name == "setmycommands":
        commands = _json(raw.get("commands"))
        if isinstance(commands, list) and len(commands) > MAX_COMMANDS:
            raise Refusal("BOT_COMMANDS_TOO_MUCH")


def check_answer_in_time(asked_at: float, now: float) -> None:
    """A callback query is answered within 15 s of the press, or never."""
    if now - asked_at > CALLBACK_QUERY_TIMEOUT:
        raise Refusal(QUERY_TOO_OLD)


def check_deletable(sent_at: float, now: float) -> None:
    """A bot deletes a message only within 48 hours of its date."""
    if now - sent_at > DELETE_WINDOW:
        raise Refusal("message can't be deleted")


def check_started(chat_type: str, chat_id: int, started: set[int]) -> None:
    """A bot writes to a private chat only after the person pressed Start (wrote to it)."""
    if chat_type == "private" and chat_id not in started:
        raise Refusal(CANT_INITIATE, status=403)


_ESCAPE = {">": "&gt;", "&": "&amp;", "<": "&lt;"}


def unescaped(char: str, byte_offset: int) -> Refusal:
    """Telegram's HTML: every ``<``, ``>`` and ``&`` that is not part of a tag or an entity must be
    escaped (the Bot API documentation's rule)."""
    return Refusal(
        f'can\'t parse entities: Character "{char}" must be escaped as "{_ESCAPE[char]}" at byte offset {byte_offset}'
    )


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value
