"""Texts as Telegram counts them: the length of a message in HTML parse mode is the length of its
text once the tags are removed and the entities (``&amp;``…) decoded, in UTF-16 code units. A text
cut to fit is cut there, never inside a tag or an entity, and the tags left open are closed."""

from __future__ import annotations

import html
import re

# The tags of Telegram's HTML; anything else between "<" and ">" is text (and refused by Telegram).
TAGS = "b|strong|i|em|u|ins|s|strike|del|span|tg-spoiler|a|tg-emoji|code|pre|blockquote"
TOKEN = re.compile(
    rf"</?(?:{TAGS})(?:\s[^<>]*)?>|&(?:#[0-9]{{1,7}}|#x[0-9a-fA-F]{{1,6}}|[a-zA-Z]{{2,8}});|[^<&]+|[<&]", re.IGNORECASE
)
TAG = re.compile(r"<\s*(/?)\s*([a-zA-Z][a-zA-Z0-9-]*)")
ELLIPSIS = "…"


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (a character outside the Basic Multilingual Plane counts two)."""
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _visible(token: str) -> str:
    """What one token shows: nothing for a tag, the character for an entity, the text itself."""
    if token.startswith("<") and len(token) > 1:
        return ""
    if token.startswith("&") and len(token) > 1:
        return html.unescape(token)
    return token


def visible_length(text: str) -> int:
    """The length Telegram counts for ``text`` in HTML parse mode."""
    return sum(utf16_len(_visible(token)) for token in TOKEN.findall(text))


def plain_text(text: str) -> str:
    """What ``text`` (HTML) shows, without its formatting: to send when the formatting is refused."""
    return "".join(_visible(token) for token in TOKEN.findall(text))


def fit_html(text: str, limit: int) -> str:
    """``text`` (HTML) cut to ``limit`` as Telegram counts, ending with an ellipsis when cut; the
    cut falls between tokens and every tag open there is closed."""
    if visible_length(text) <= limit:
        return text
    room = limit - utf16_len(ELLIPSIS)
    kept: list[str] = []
    open_tags: list[str] = []
    for token in TOKEN.findall(text):
        shown = _visible(token)
        if not shown:  # a tag: kept whole, and followed to close what is left open
            tag = TAG.match(token)
            if tag is not None:
                closing, name = tag.group(1), tag.group(2).lower()
                if closing and name in open_tags:
                    del open_tags[len(open_tags) - 1 - open_tags[::-1].index(name)]
                elif not closing and not token.rstrip().endswith("/>"):
                    open_tags.append(name)
            kept.append(token)
            continue
        size = utf16_len(shown)
        if size <= room:
            kept.append(token)
            room -= size
            continue
        if len(token) > 1 and not token.startswith("&"):  # a run of text: as much of it as fits
            part = []
            for char in token:
                if utf16_len(char) > room:
                    break
                part.append(char)
                room -= utf16_len(char)
            kept.append("".join(part))
        break
    # Tags opened and not closed before the cut (an empty element just before it is harmless).
    return "".join(kept) + ELLIPSIS + "".join(f"</{name}>" for name in reversed(open_tags))


def fit_plain(text: str, limit: int) -> str:
    """A plain text cut to ``limit`` UTF-16 units, ending with an ellipsis when cut."""
    if utf16_len(text) <= limit:
        return text
    room, kept = limit - utf16_len(ELLIPSIS), []
    for char in text:
        if utf16_len(char) > room:
            break
        kept.append(char)
        room -= utf16_len(char)
    return "".join(kept) + ELLIPSIS


def cant_parse(error: Exception) -> bool:
    """True when Telegram refused a message for its formatting (``can't parse entities``)."""
    return "can't parse entities" in str(error).lower() or "can't find end" in str(error).lower()
