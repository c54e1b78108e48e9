"""The translation catalogue: every text a person sees, in Simplified Chinese and English.

Texts live in TOML files, one per area, under ``bot/locales/<lang>/<area>.toml``; the key ``name``
in ``loans.toml`` is the message id ``loans.name``. Values are ``str.format`` templates rendered in
Telegram's HTML parse mode. A test checks that both languages have exactly the same message ids.
"""

from __future__ import annotations

import functools
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

LANGUAGES = ("zh", "en")
LOCALES = Path(__file__).parent / "locales"

log = logging.getLogger(__name__)


def _flatten(prefix: str, table: dict[str, Any], out: dict[str, str]) -> None:
    for key, value in table.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            _flatten(name, value, out)
        else:
            out[name] = str(value)


GLOSSARY_TERM = re.compile(r"\[\[(\w+)\]\]")


@functools.cache
def glossary() -> dict[str, dict[str, str]]:
    """The glossary (``bot/locales/glossary.toml``): each status and term in every language."""
    terms: dict[str, dict[str, str]] = tomllib.loads((LOCALES / "glossary.toml").read_text(encoding="utf-8"))
    return terms


def glossed(lang: str, text: str) -> str:
    """``text`` with each ``[[term]]`` replaced by the glossary's word in ``lang`` (unknown terms stay)."""
    terms = glossary()
    return GLOSSARY_TERM.sub(lambda m: terms[m.group(1)][lang] if m.group(1) in terms else m.group(0), text)


@functools.cache
def catalogue(lang: str) -> dict[str, str]:
    """Every message of ``lang``, by message id; glossary terms are filled in."""
    messages: dict[str, str] = {}
    for path in sorted((LOCALES / lang).glob("*.toml")):
        _flatten(path.stem, tomllib.loads(path.read_text(encoding="utf-8")), messages)
    return {key: glossed(lang, text) if "[[" in text else text for key, text in messages.items()}


def language_for(chosen: str | None, telegram_language: str | None, default: str) -> str:
    """The user's language: their /language choice, else Telegram's (zh* or en*), else the default."""
    if chosen in LANGUAGES:
        return chosen
    code = (telegram_language or "").lower()
    if code.startswith("zh"):
        return "zh"
    if code.startswith("en"):
        return "en"
    return default


class _Localised(dict[str, Any]):
    """Format parameters where a ``{"zh": …, "en": …}`` value is taken in the wanted language."""

    def __init__(self, lang: str, params: dict[str, Any]) -> None:
        super().__init__({k: localise(lang, v) for k, v in params.items()})

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def localise(lang: str, value: Any) -> Any:
    """``value`` in ``lang`` when it is a bilingual dict; otherwise unchanged."""
    if isinstance(value, dict) and set(value) >= set(LANGUAGES) and len(value) == len(LANGUAGES):
        return value[lang]
    return value


def t(lang: str, key: str, **params: Any) -> str:
    """The message ``key`` in ``lang`` with ``params`` filled in.

    A missing id falls back to the other language, then to the id itself, so a slip never crashes a
    conversation (the parity test keeps it from happening).
    """
    text = catalogue(lang).get(key)
    if text is None:
        log.error("missing message id %s for %s", key, lang)
        other = "en" if lang == "zh" else "zh"
        text = catalogue(other).get(key, key)
    try:
        return text.format_map(_Localised(lang, params))
    except (ValueError, IndexError, AttributeError):
        log.exception("cannot format message id %s", key)
        return text


def both(key: str, **params: Any) -> dict[str, str]:
    """The message in every language, as a bilingual parameter for another message."""
    return {lang: t(lang, key, **params) for lang in LANGUAGES}
