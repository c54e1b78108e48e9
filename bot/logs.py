"""Logging set-up: structured one-line records, and secrets (the token, the webhook secret) never
written at any level. httpx logs request URLs, which contain the token, so it is kept at WARNING.

At DEBUG python-telegram-bot logs every Bot API call with its parameters and its answer: whole
updates, with the PINs and card numbers people type and the texts of their complaints. Those texts
are replaced by their length at every level; aiosqlite, which would log the same texts as SQL
parameters, is kept at INFO."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from telegram import TelegramObject

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactSecrets(logging.Filter):
    """Replaces every known secret in a record's rendered message by ``[redacted]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "[redacted]")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# Keys of the Bot API's objects and parameters that hold what a person typed (or what the bot says
# back, which may quote it): message texts and captions, inline queries, poll texts.
TEXT_KEYS = frozenset({"text", "caption", "query", "quote", "explanation", "question", "message_text"})


def scrub(value: Any) -> Any:
    """``value`` (an update, an API call's parameters or answer, JSON text) with every typed text
    replaced by ``[N characters]``; anything else unchanged."""
    if isinstance(value, TelegramObject):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {
            key: f"[{len(item)} characters]" if key in TEXT_KEYS and isinstance(item, str) else scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    if isinstance(value, str | bytes) and value[:1] in ("{", "[", b"{", b"["):
        try:
            return json.dumps(scrub(json.loads(value)), ensure_ascii=False)
        except ValueError:
            return value
    return value


class RedactReaderTexts(logging.Filter):
    """Replaces, in a record's arguments, the texts people typed (see :func:`scrub`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping):
            record.args = scrub(args)
        elif args:
            record.args = tuple(scrub(arg) for arg in args)
        return True


def configure_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """Log to stderr at ``level`` with secrets redacted from every record."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    redact = RedactSecrets(secrets)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactSecrets | RedactReaderTexts)]:
            handler.removeFilter(old)
        handler.addFilter(RedactReaderTexts())  # first: the texts, then any secret left in the message
        handler.addFilter(redact)
    for noisy in ("httpx", "httpcore", "apscheduler", "aiohttp.access", "aiosqlite"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
