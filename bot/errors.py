"""Errors reach someone: an unexpected error is reported privately to the admins, as
python-telegram-bot's rules-bot reports to its maintainers, at most once per kind of error every
ten minutes (a kind is the exception's type and the line of our code it came from).

A report holds an error id (also in the log line with the full traceback, so the admin can find
it in the journal), the kind of update (``message /renew``, ``callback_query ovd``, ``job``), the
exception and where it was raised. Never personal data: no message text, no names, no Telegram
ids; quoted strings and numbers of three digits or more in the exception's message are masked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import logging
import re
import traceback
import uuid
from collections import Counter
from pathlib import Path

from telegram import Update
from telegram.ext import ContextTypes

from bot.context import services
from bot.gate import DATABASE_DOWN
from storage.outbox import Priority, enqueue
from storage.people import Role, staff_ids

log = logging.getLogger(__name__)

REPORT_EVERY = dt.timedelta(minutes=10)
ROOT = Path(__file__).resolve().parents[1]
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
LONG_NUMBER = re.compile(r"\d{3,}")  # ids, card numbers, phone numbers


class ErrorReports:
    """When each kind of error was last reported, and how many were not reported since
    (one per bot process, in ``bot_data["error_reports"]``)."""

    def __init__(self) -> None:
        self.last: dict[str, dt.datetime] = {}
        self.held_back: Counter[str] = Counter()


def update_kind(update: object) -> str:
    """What kind of update failed, without what anybody wrote: the command or the button's prefix."""
    if not isinstance(update, Update):
        return "job" if update is None else type(update).__name__
    kind = next((name for name in Update.ALL_TYPES if getattr(update, name, None) is not None), "update")
    message = update.effective_message
    if update.callback_query is not None:
        prefix = (update.callback_query.data or "").split(":", 1)[0]
        return f"{kind} {prefix[:16]}" if re.fullmatch(r"[a-z]{1,16}", prefix) else kind
    if message is not None and message.text and message.text.startswith("/"):
        command = message.text.split()[0].split("@")[0]
        return f"{kind} {command[:33]}" if re.fullmatch(r"/[A-Za-z0-9_]{1,32}", command) else kind
    return kind


def where(error: BaseException) -> str:
    """The last line of our own code in the traceback (``handlers/loans.py:120 in renew``)."""
    found = "?"
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(ROOT) and "site-packages" not in path.parts:
            found = f"{path.relative_to(ROOT)}:{frame.lineno} in {frame.name}"
    return found


def describe(error: BaseException) -> str:
    """The exception without what could be personal data (quoted strings, long numbers)."""
    text = LONG_NUMBER.sub("…", QUOTED.sub("'…'", str(error)))
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


async def report(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Report ``context.error`` to the admins unless this kind was reported in the last ten minutes
    (an unreachable database is not reported: the people are told, ``/healthz`` shows it)."""
    error = context.error
    if error is None or isinstance(error, DATABASE_DOWN):
        return
    svc = services(context)
    reports: ErrorReports = context.bot_data.setdefault("error_reports", ErrorReports())
    place = where(error)
    kind = f"{type(error).__name__}@{place}"
    error_id = uuid.uuid4().hex[:8]
    # The traceback was logged just before (bot.app.on_error); this line gives it the report's id.
    log.error("error %s is %s while handling %s", error_id, kind, update_kind(update))
    now = svc.now()
    last = reports.last.get(kind)
    if last is not None and now - last < REPORT_EVERY:
        reports.held_back[kind] += 1
        return
    reports.last[kind] = now
    held_back = reports.held_back.pop(kind, 0)
    digest = hashlib.sha256(kind.encode()).hexdigest()[:16]
    window = int(now.timestamp() // REPORT_EVERY.total_seconds())  # one report per window across processes
    params = {
        "id": error_id,
        "update": html.escape(update_kind(update)),
        "error": html.escape(describe(error)),
        "where": html.escape(place),
        "count": held_back,
    }
    key = "errors.report_more" if held_back else "errors.report"
    try:
        async with svc.db.session() as session:
            for admin in await staff_ids(session, Role.ADMIN):
                await enqueue(
                    session, admin, key, params, kind="system", priority=Priority.ALERT,
                    dedupe_key=f"error:{digest}:{window}:{admin}",
                )
    except Exception:  # the report must never make things worse
        log.warning("could not report error %s to the admins", error_id, exc_info=True)
