"""Answering people: rendered replies, inline keyboards and the one pagination helper."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, TypeVar

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.constants import ParseMode
from telegram.error import BadRequest
from telegram.ext import ContextTypes

from bot.i18n import t
from bot.telegram_text import cant_parse, fit_html, fit_plain, plain_text

T = TypeVar("T")

# A button: (label, callback data). The label is a message id, or literal text after a leading "=".
# Data starting with "https://" makes a link button.
Button = tuple[str, str]
MAX_TEXT = 4096
MAX_CAPTION = 1024


def label(lang: str, text: str) -> str:
    return text[1:] if text.startswith("=") else t(lang, text)


def keyboard(lang: str, rows: Sequence[Sequence[Button]] | None) -> InlineKeyboardMarkup | None:
    """An inline keyboard from rows of (label, data); None for no rows."""
    if not rows:
        return None
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(label(lang, text), url=data)
                if data.startswith("https://")
                else InlineKeyboardButton(label(lang, text), callback_data=data[:64])
                for text, data in row
            ]
            for row in rows
            if row
        ]
    )


def escape(text: str) -> str:
    """Text typed by a person, made safe for Telegram's HTML parse mode."""
    return html.escape(text, quote=False)


def fit(text: str, limit: int = MAX_TEXT) -> str:
    """Cut an HTML text to Telegram's limit (4,096, or 1,024 for a caption) as Telegram counts it:
    after the tags and entities, in UTF-16 units; never inside a tag or an entity, the tags left
    open closed (a cut text ends with an ellipsis)."""
    return fit_html(text, limit)


async def _lang(update: Update, context: ContextTypes.DEFAULT_TYPE, lang: str | None) -> str:
    if lang is not None:
        return lang
    from bot.context import who

    return (await who(update, context)).lang


async def reply(
    update: Update,
    context: ContextTypes.DEFAULT_TYPE,
    key: str,
    *,
    buttons: Sequence[Sequence[Button]] | None = None,
    lang: str | None = None,
    **params: Any,
) -> Message:
    """Send the message ``key`` to the chat of ``update`` in the person's language."""
    lang = await _lang(update, context, lang)
    chat = update.effective_chat
    assert chat is not None
    text = t(lang, key, **params)
    try:
        return await context.bot.send_message(
            chat.id,
            fit(text),
            parse_mode=ParseMode.HTML,
            reply_markup=keyboard(lang, buttons),
            disable_web_page_preview=True,
        )
    except BadRequest as exc:
        if not cant_parse(exc):
            raise
        return await send_plain(context, chat.id, text, reply_markup=keyboard(lang, buttons))


async def send_plain(context: ContextTypes.DEFAULT_TYPE, chat_id: int, text: str, **kwargs: Any) -> Message:
    """Send an HTML text whose formatting Telegram refused once more, as plain text: the words
    matter more than the bold."""
    return await context.bot.send_message(
        chat_id, fit_plain(plain_text(text), MAX_TEXT), parse_mode=None, disable_web_page_preview=True, **kwargs
    )


async def edit(
    update: Update,
    context: ContextTypes.DEFAULT_TYPE,
    key: str,
    *,
    buttons: Sequence[Sequence[Button]] | None = None,
    lang: str | None = None,
    **params: Any,
) -> None:
    """Replace the message whose button was pressed (or send a new one when that is impossible)."""
    lang = await _lang(update, context, lang)
    query = update.callback_query
    text = fit(t(lang, key, **params))
    if query is None or query.message is None or not isinstance(query.message, Message):
        await reply(update, context, key, buttons=buttons, lang=lang, **params)
        return
    try:
        await query.edit_message_text(
            text, parse_mode=ParseMode.HTML, reply_markup=keyboard(lang, buttons), disable_web_page_preview=True
        )
    except BadRequest as exc:
        if "not modified" not in str(exc).lower():
            await reply(update, context, key, buttons=buttons, lang=lang, **params)


async def answer(update: Update, context: ContextTypes.DEFAULT_TYPE, key: str | None = None, *, alert: bool = False, lang: str | None = None, **params: Any) -> None:
    """Answer a button press (stops the spinner), optionally with a short notice."""
    query = update.callback_query
    if query is None:
        return
    text = None
    if key is not None:
        text = t(await _lang(update, context, lang), key, **params)[:200]
    try:
        await query.answer(text, show_alert=alert)
    except BadRequest:
        pass  # the press is too old to answer; nothing the person can see


def paginate(items: Sequence[T], page: int, per_page: int, prefix: str) -> tuple[Sequence[T], list[Button]]:
    """The items of ``page`` (0-based, clamped) and a row of Prev / n/m / Next buttons (empty for one page)."""
    pages = max(1, -(-len(items) // per_page))
    page = min(max(page, 0), pages - 1)
    chunk = items[page * per_page : (page + 1) * per_page]
    if pages == 1:
        return chunk, []
    row: list[Button] = []
    if page > 0:
        row.append(("common.prev", f"{prefix}:{page - 1}"))
    row.append((f"={page + 1}/{pages}", "noop"))
    if page < pages - 1:
        row.append(("common.next", f"{prefix}:{page + 1}"))
    return chunk, row


def trailing_id(data: str | None) -> int | None:
    """The id at the end of callback data such as ``bc:go:42``; None for anything malformed or out
    of range (callback data can be forged)."""
    try:
        value = int((data or "").rsplit(":", 1)[-1])
    except ValueError:
        return None
    return value if 0 < value < 2**63 else None


def parse_page(data: str | None) -> int:
    """The page number at the end of pagination callback data (0 for anything malformed)."""
    try:
        return max(0, int((data or "").rsplit(":", 1)[-1]))
    except ValueError:
        return 0
