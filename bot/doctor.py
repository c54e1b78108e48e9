"""``librarybot doctor``: is everything the bot needs in order? One line per check, and a failure
says what to do. Checks the token (``getMe``), the database (reachable, schema up to date), the
staff group (reachable, the bot's rights, the topics of ``LIBRARYBOT_STAFF_TOPICS``), the webhook
(``getWebhookInfo``: URL, pending updates, last error) and, with ``LIBRARYBOT_ILS=sip2``, the SIP2
server. Nothing is changed and nothing is posted anywhere."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from telegram import Bot, ChatMemberAdministrator, ChatMemberRestricted
from telegram.constants import ChatAction
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError, TelegramError

from bot.settings import Settings
from storage.db import Database
from storage.staffchat import StaffChat

PENDING_TOO_MANY = 100  # updates waiting: the bot is not taking them


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<12} {self.detail}"


async def run_doctor(settings: Settings) -> list[Finding]:
    """Every check, in order; a check that cannot run says why."""
    database, stored = await _database(settings)
    try:
        token = settings.token()
    except ValueError as exc:
        findings = [Finding("token", False, str(exc)), database]
        findings += [Finding(n, False, "not checked: no usable token") for n in ("staff chat", "webhook")]
    else:
        bot = Bot(token, base_url=settings.telegram_api_url)
        token_finding = await _token(bot)
        findings = [token_finding, database]
        if token_finding.ok:
            try:
                findings.append(await _staff_chat(bot, settings, stored))
                findings.append(await _webhook(bot, settings))
            finally:
                await bot.shutdown()
        else:
            findings += [Finding(n, False, "not checked: the token does not work") for n in ("staff chat", "webhook")]
    if settings.ils == "sip2":
        findings.append(await _sip2(settings))
    return findings


async def _token(bot: Bot) -> Finding:
    """``getMe`` (initialising the bot)."""
    try:
        await bot.initialize()
    except (InvalidToken, Forbidden):
        return Finding("token", False, "Telegram refused the token: get the current one from @BotFather")
    except NetworkError as exc:
        return Finding("token", False, f"the Bot API is not reachable ({exc.message}): check the network and LIBRARYBOT_TELEGRAM_API_URL")
    except TelegramError as exc:
        return Finding("token", False, f"getMe failed: {exc.message}")
    return Finding("token", True, f"@{bot.username} (id {bot.id})")


async def _database(settings: Settings) -> tuple[Finding, StaffChat | None]:
    """Reachable, schema at the newest revision; and the staff group's stored state."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.models import alembic_config

    db = Database(settings.database_url)
    try:
        if not await db.ping():
            return Finding("database", False, "not reachable: check LIBRARYBOT_DATABASE_URL"), None
        async with db.engine.connect() as conn:
            current = await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_heads())
        heads = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_heads()
        if set(current) != set(heads):
            return Finding("database", False, f"reachable ({db.dialect}); schema not up to date: run `librarybot db upgrade`"), None
        stored = None
        if settings.staff_chat_id is not None:
            async with db.session() as session:
                stored = await session.get(StaffChat, settings.staff_chat_id)
                if stored is not None:
                    session.expunge(stored)
        return Finding("database", True, f"reachable ({db.dialect}), schema up to date"), stored
    finally:
        await db.dispose()


async def _staff_chat(bot: Bot, settings: Settings, stored: StaffChat | None) -> Finding:
    name = "staff chat"
    if settings.staff_chat_id is None:
        return Finding(name, True, "not configured (LIBRARYBOT_STAFF_CHAT_ID): staff alerts go to no group")
    chat_id = stored.chat_id if stored is not None else settings.staff_chat_id
    moved = f" (was {settings.staff_chat_id}, now a supergroup)" if chat_id != settings.staff_chat_id else ""
    try:
        chat = await bot.get_chat(chat_id)
        member = await bot.get_chat_member(chat_id, bot.id)
    except ChatMigrated as exc:
        return Finding(name, True, f"{chat_id} became the supergroup {exc.new_chat_id}; the bot follows it at its next alert")
    except Forbidden:
        return Finding(name, False, f"{chat_id}{moved}: the bot is not in the group; add it back")
    except BadRequest as exc:
        return Finding(name, False, f"{chat_id}{moved}: {exc.message}; check LIBRARYBOT_STAFF_CHAT_ID and add the bot to the group")
    except TelegramError as exc:
        return Finding(name, False, f"{chat_id}: {exc.message}")
    title = f"“{chat.title}” ({chat_id}{moved}, {chat.type})"
    if member.status in ("left", "kicked"):
        return Finding(name, False, f"{title}: the bot is not in the group; add it back")
    if isinstance(member, ChatMemberRestricted) and not member.can_send_messages:
        return Finding(name, False, f"{title}: the bot may not post; give it the right to send messages")
    rights = "administrator" if isinstance(member, ChatMemberAdministrator) else member.status
    topics = settings.staff_topic_map
    if not topics:
        return Finding(name, True, f"{title}, bot is {rights}")
    if not chat.is_forum:
        return Finding(name, False, f"{title}: LIBRARYBOT_STAFF_TOPICS is set but the group has no topics")
    missing = []
    for kind, thread in topics.items():
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread)
        except BadRequest:
            missing.append(f"{kind}={thread}")
    if missing:
        return Finding(name, False, f"{title}: no such topic for {', '.join(missing)}; fix LIBRARYBOT_STAFF_TOPICS")
    return Finding(name, True, f"{title}, bot is {rights}, topics {', '.join(f'{k}={v}' for k, v in topics.items())}")


async def _webhook(bot: Bot, settings: Settings) -> Finding:
    name = "webhook"
    try:
        info = await bot.get_webhook_info()
    except TelegramError as exc:
        return Finding(name, False, f"getWebhookInfo failed: {exc.message}")
    pending = info.pending_update_count
    problems: list[str] = []
    if settings.webhook_url and info.url != settings.webhook_url:
        problems.append(f"set to {info.url or 'nothing'}, not LIBRARYBOT_WEBHOOK_URL: start `librarybot run --webhook`")
    if not settings.webhook_url and info.url:
        problems.append(f"set to {info.url} while no LIBRARYBOT_WEBHOOK_URL is configured: long polling will fail")
    if info.last_error_date is not None:
        when = info.last_error_date.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        problems.append(f"last error {when}: {info.last_error_message}")
    if pending > PENDING_TOO_MANY:
        problems.append(f"{pending} updates waiting: is the bot running?")
    mode = f"URL {info.url}" if info.url else "none (long polling)"
    if problems:
        return Finding(name, False, f"{mode}, {pending} pending; " + "; ".join(problems))
    return Finding(name, True, f"{mode}, {pending} pending, no recent error")


async def _sip2(settings: Settings) -> Finding:
    from storage.ils_sip2 import sip2_config
    from storage.sip2.client import run_check

    try:
        config = sip2_config(settings)
    except ValueError as exc:
        return Finding("sip2", False, f"bad configuration: {exc}")
    quiet = logging.getLogger("storage.sip2")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        check: Any = await run_check(config)
    finally:
        quiet.setLevel(level)
    if check.ok:
        return Finding("sip2", True, f"{config.address}: logged in, server online")
    lines = [line.strip() for line in check.report.splitlines() if line.strip()]
    reason = lines[-1] if check.status is None else "the server says it is offline"
    return Finding("sip2", False, f"{config.address}: {reason} (details: `librarybot sip2 check`)")
