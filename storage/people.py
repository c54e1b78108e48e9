"""People: Telegram users, library readers (cards), staff roles, invites and the login lockout."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ColumnElement, ForeignKey, String, case, delete, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow
from storage.outbox import Priority, enqueue


class Role(enum.IntEnum):
    """What a person may do; each role has every right of the ones below it."""

    VISITOR = 0
    READER = 1
    STAFF = 2
    DUTY_OFFICER = 3
    ADMIN = 4

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name.strip().upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


STAFF_ROLES = (Role.STAFF, Role.DUTY_OFFICER, Role.ADMIN)


class User(Base):
    """Somebody who pressed Start: the unit every message, notice and broadcast is addressed to."""

    __tablename__ = "users"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    first_name: Mapped[str] = mapped_column(String(256), default="")
    telegram_language: Mapped[str | None] = mapped_column(String(16))
    language: Mapped[str | None] = mapped_column(String(8))  # chosen with /language, overrides Telegram's
    reader_id: Mapped[int | None] = mapped_column(ForeignKey("readers.id", ondelete="SET NULL"), index=True)
    reminder_days: Mapped[int] = mapped_column(default=3)  # /settings: 0 (off), 1, 3 or 7 days ahead
    unreachable: Mapped[bool] = mapped_column(default=False)  # blocked the bot (403)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Reader(Base):
    """A library card. The PIN is kept only as an Argon2id hash."""

    __tablename__ = "readers"

    id: Mapped[int] = mapped_column(primary_key=True)
    card_number: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    pin_hash: Mapped[str] = mapped_column(String(256))
    category: Mapped[str] = mapped_column(String(64), default="adult")
    expires_on: Mapped[dt.date | None]
    blocked: Mapped[bool] = mapped_column(default=False)
    fines_cents: Mapped[int] = mapped_column(default=0)  # outstanding fines not tied to a current loan


class StaffMember(Base):
    """A Telegram user with a staff role. Granted only by the CLI or a one-time invite, never by a group."""

    __tablename__ = "staff"

    telegram_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(256), default="")
    added_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Invite(Base):
    """A one-time deep-link invite; only a hash of its code is stored."""

    __tablename__ = "invites"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    used_by: Mapped[int | None]
    used_at: Mapped[dt.datetime | None]


class LoginLock(Base):
    """PIN attempts counted per card and per Telegram user (keys ``card:…`` and ``user:…``).

    ``failures`` counts the attempts of the current window (one in progress counts until it proves
    right) and ``locked_until`` is when that window ends; the key is locked while ``failures`` has
    reached the limit and the window has not ended. The fifth failure starts a fresh 15-minute window.
    """

    __tablename__ = "login_locks"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[dt.datetime | None]

    def locked(self, now: dt.datetime) -> bool:
        """True while this key may not try another PIN."""
        return self.failures >= MAX_FAILURES and self.locked_until is not None and self.locked_until > now


# OWASP's recommended Argon2id parameters (19 MiB, 2 passes): strong, and about 20 ms per hash.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)

MAX_FAILURES = 5
LOCK_DURATION = dt.timedelta(minutes=15)
INVITE_LIFETIME = dt.timedelta(hours=24)


def hash_pin(pin: str) -> str:
    """The Argon2id hash stored instead of a PIN."""
    return _hasher.hash(pin)


def pin_matches(pin_hash: str, pin: str) -> bool:
    """True when ``pin`` is the PIN behind ``pin_hash``."""
    try:
        return _hasher.verify(pin_hash, pin)
    except (VerificationError, InvalidHashError):
        return False


async def touch_user(
    session: AsyncSession, telegram_id: int, first_name: str = "", telegram_language: str | None = None
) -> User:
    """The user row for ``telegram_id``, created on first contact and kept up to date."""
    user = await session.get(User, telegram_id)
    if user is None:
        try:
            async with session.begin_nested():
                session.add(User(telegram_id=telegram_id, first_name=first_name[:256], telegram_language=telegram_language))
        except IntegrityError:
            pass  # a second update from the same new person (a double tap, an album) created it just now
        found = await session.get(User, telegram_id, populate_existing=True)
        assert found is not None
        return found
    else:
        if first_name and user.first_name != first_name[:256]:
            user.first_name = first_name[:256]
        if telegram_language and user.telegram_language != telegram_language:
            user.telegram_language = telegram_language
        if user.unreachable:
            user.unreachable = False  # they are talking to us again, so they unblocked the bot
    return user


async def role_of(session: AsyncSession, telegram_id: int) -> Role:
    """The one place that decides a person's role."""
    staff = await session.get(StaffMember, telegram_id)
    if staff is not None:
        return Role.parse(staff.role)
    user = await session.get(User, telegram_id)
    if user is not None and user.reader_id is not None:
        return Role.READER
    return Role.VISITOR


async def reader_of(session: AsyncSession, telegram_id: int) -> Reader | None:
    """The card linked to this Telegram user, if any."""
    user = await session.get(User, telegram_id)
    if user is None or user.reader_id is None:
        return None
    return await session.get(Reader, user.reader_id)


class LoginOutcome(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # wrong card or PIN: deliberately not told which
    LOCKED = "locked"
    CARD_EXPIRED = "card_expired"


@dataclass(frozen=True)
class LoginResult:
    """What became of a login. ``locked_until`` is when logging in is possible again, set when the
    login was refused as LOCKED or when this failure used up the window's last attempt."""

    outcome: LoginOutcome
    reader: Reader | None = None
    locked_until: dt.datetime | None = None


# A real Argon2id hash of a random PIN, with the parameters of every card's hash: an unknown card is
# checked against it, so that it takes as long to refuse as a known card with a wrong PIN.
_DUMMY_HASH: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(hash_pin(secrets.token_hex(16)))
    return _DUMMY_HASH[0]


def _window_ended(now: dt.datetime) -> ColumnElement[bool]:
    return or_(LoginLock.locked_until.is_(None), LoginLock.locked_until <= now)


async def _claim_attempt(session: AsyncSession, key: str, now: dt.datetime) -> bool:
    """Count one PIN attempt against ``key`` before the PIN is checked; False when the key is locked.

    One conditional ``UPDATE … RETURNING``: the database counts (PostgreSQL re-reads the row a
    concurrent attempt changed, SQLite runs one writer at a time), so however many attempts arrive
    together, at most ``MAX_FAILURES`` are let through per window.
    """
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(LoginLock).values(key=key, failures=0, locked_until=None).on_conflict_do_nothing(index_elements=["key"])
    )
    until = literal(now + LOCK_DURATION, LoginLock.__table__.c.locked_until.type)
    ended = _window_ended(now)
    claimed = await session.scalar(
        update(LoginLock)
        .where(LoginLock.key == key, or_(ended, LoginLock.failures < MAX_FAILURES))
        .values(
            failures=case((ended, 1), else_=LoginLock.failures + 1),
            # a new window starts with its first attempt; the last allowed one locks for a full window
            locked_until=case((ended, until), (LoginLock.failures + 1 >= MAX_FAILURES, until), else_=LoginLock.locked_until),
        )
        .returning(LoginLock.failures)
        .execution_options(synchronize_session=False)
    )
    return claimed is not None


async def _give_back(session: AsyncSession, keys: list[str]) -> None:
    """Uncount an attempt that was not a failure (the PIN was right, or it could not be checked)."""
    await session.execute(
        update(LoginLock)
        .where(LoginLock.key.in_(keys), LoginLock.failures > 0)
        .values(failures=LoginLock.failures - 1)
        .execution_options(synchronize_session=False)
    )


async def _lock_end(session: AsyncSession, keys: list[str], now: dt.datetime) -> dt.datetime | None:
    """When the last lock among ``keys`` ends, or None when none of them is locked at ``now``."""
    query = select(LoginLock).where(LoginLock.key.in_(keys)).execution_options(populate_existing=True)
    rows = (await session.scalars(query)).all()
    ends = [row.locked_until for row in rows if row.locked(now) and row.locked_until is not None]
    return max(ends) if ends else None


async def login(
    session: AsyncSession,
    telegram_id: int,
    card_number: str,
    pin: str,
    now: dt.datetime,
    verify: Callable[[], Awaitable[bool]] | None = None,
    tz: dt.tzinfo = dt.UTC,
) -> LoginResult:
    """Link ``card_number`` to the Telegram user when the PIN is right.

    At most five wrong PINs are checked per card and per Telegram user (across cards) in a
    15-minute window, whatever the concurrency: each attempt is counted before its PIN is checked,
    and given back only when the PIN proves right. A locked login answers LOCKED without checking
    the PIN, so guessing during the lock teaches nothing. An unknown card costs a PIN check as well.
    ``verify`` lets an external library system decide the PIN (called only once the attempt is
    counted). Commits the session: the count must be durable before the PIN is checked. When the
    card was linked to other Telegram accounts, each of them is told at once.
    """
    card_number = card_number.strip()[:64]
    card_key, user_key = f"card:{card_number}", f"user:{telegram_id}"
    if not await _claim_attempt(session, card_key, now):
        until = await _lock_end(session, [card_key], now)
        await session.commit()
        return LoginResult(LoginOutcome.LOCKED, locked_until=until)
    if not await _claim_attempt(session, user_key, now):
        await _give_back(session, [card_key])
        until = await _lock_end(session, [user_key], now)
        await session.commit()
        return LoginResult(LoginOutcome.LOCKED, locked_until=until)
    await session.commit()  # the attempt is counted, and SQLite's write lock released, before the slow check
    try:
        if verify is not None:
            ok = await verify()
            reader = await session.scalar(select(Reader).where(Reader.card_number == card_number))
        else:
            reader = await session.scalar(select(Reader).where(Reader.card_number == card_number))
            stored = reader.pin_hash if reader is not None else _dummy_hash()
            ok = await asyncio.to_thread(pin_matches, stored, pin) and reader is not None
    except BaseException:
        await _give_back(session, [card_key, user_key])  # not checked: not a failure
        await session.commit()
        raise
    if not ok or reader is None:
        return LoginResult(LoginOutcome.FAILED, locked_until=await _lock_end(session, [card_key, user_key], now))
    await _give_back(session, [card_key, user_key])
    user = await session.get(User, telegram_id)
    if user is None:
        user = await touch_user(session, telegram_id)
    if user.reader_id != reader.id:
        await _tell_earlier_holders(session, reader, telegram_id, now, tz)
    user.reader_id = reader.id
    if reader.expires_on is not None and reader.expires_on < now.date():
        return LoginResult(LoginOutcome.CARD_EXPIRED, reader)
    return LoginResult(LoginOutcome.OK, reader)


def masked_card(card_number: str) -> str:
    """A card number as shown in messages about it: only its last four characters."""
    return "…" + card_number[-4:] if len(card_number) > 4 else card_number


async def _tell_earlier_holders(
    session: AsyncSession, reader: Reader, telegram_id: int, now: dt.datetime, tz: dt.tzinfo
) -> None:
    """Tell every other account linked to the card, at once, that one more account was linked."""
    others = await session.scalars(
        select(User.telegram_id).where(User.reader_id == reader.id, User.telegram_id != telegram_id)
    )
    when = now.astimezone(tz).strftime("%Y-%m-%d %H:%M")
    for other in others:
        await enqueue(
            session, other, "account.card_linked_elsewhere", {"card": masked_card(reader.card_number), "when": when},
            kind="alert", priority=Priority.ALERT, buttons=[[["account.btn_linked_accounts", "linked:list"]]],
        )


async def linked_accounts(session: AsyncSession, telegram_id: int) -> list[User]:
    """Every Telegram account linked to the same card as ``telegram_id`` (itself first); empty without a card."""
    user = await session.get(User, telegram_id)
    if user is None or user.reader_id is None:
        return []
    users = list(await session.scalars(select(User).where(User.reader_id == user.reader_id)))
    return sorted(users, key=lambda u: (u.telegram_id != telegram_id, u.started_at, u.telegram_id))


async def unlink_account(session: AsyncSession, telegram_id: int, other_id: int) -> bool:
    """Unlink ``other_id`` from the card of ``telegram_id``; False unless both hold the same card."""
    user = await session.get(User, telegram_id)
    if user is None or user.reader_id is None or other_id == telegram_id:
        return False
    result = await session.execute(
        update(User)
        .where(User.telegram_id == other_id, User.reader_id == user.reader_id)
        .values(reader_id=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def logout(session: AsyncSession, telegram_id: int) -> bool:
    """Unlink the card from this Telegram user; False when none was linked."""
    user = await session.get(User, telegram_id)
    if user is None or user.reader_id is None:
        return False
    user.reader_id = None
    return True


async def add_staff(session: AsyncSession, telegram_id: int, role: Role, name: str = "") -> StaffMember:
    """Grant ``role`` (staff, duty officer or admin) to a Telegram user, replacing any earlier role."""
    if role not in STAFF_ROLES:
        raise ValueError(f"not a staff role: {role.label}")
    member = await session.get(StaffMember, telegram_id)
    if member is None:
        member = StaffMember(telegram_id=telegram_id, role=role.label, name=name)
        session.add(member)
    else:
        member.role = role.label
        member.name = name or member.name
    await session.flush()
    return member


async def remove_staff(session: AsyncSession, telegram_id: int) -> bool:
    """Withdraw every staff right from a Telegram user; False when they had none."""
    result = await session.execute(delete(StaffMember).where(StaffMember.telegram_id == telegram_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def list_staff(session: AsyncSession) -> list[StaffMember]:
    """Every staff member, highest role first."""
    members = list(await session.scalars(select(StaffMember)))
    return sorted(members, key=lambda m: (-Role.parse(m.role), m.telegram_id))


async def staff_ids(session: AsyncSession, at_least: Role = Role.STAFF) -> list[int]:
    """Telegram ids of the staff whose role is ``at_least`` or higher."""
    return [m.telegram_id for m in await list_staff(session) if Role.parse(m.role) >= at_least]


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


async def create_invite(session: AsyncSession, role: Role, now: dt.datetime) -> str:
    """A new one-time invite code for ``role``, valid for 24 hours."""
    if role not in STAFF_ROLES:
        raise ValueError(f"not a staff role: {role.label}")
    code = secrets.token_urlsafe(18)
    session.add(Invite(code_hash=_code_hash(code), role=role.label, created_at=now, expires_at=now + INVITE_LIFETIME))
    await session.flush()
    return code


class InviteOutcome(enum.Enum):
    GRANTED = "granted"
    INVALID = "invalid"  # unknown, already used or expired: one answer for all


async def redeem_invite(
    session: AsyncSession, code: str, telegram_id: int, name: str, now: dt.datetime
) -> tuple[InviteOutcome, Role | None]:
    """Grant the invite's role to the first user who opens it, once, before it expires."""
    # One conditional UPDATE: of several people opening the link at once, exactly one changes the row.
    claimed = await session.scalar(
        update(Invite)
        .where(Invite.code_hash == _code_hash(code.strip()), Invite.used_by.is_(None), Invite.expires_at > now)
        .values(used_by=telegram_id, used_at=now)
        .returning(Invite.role)
        .execution_options(synchronize_session=False)
    )
    if claimed is None:
        return InviteOutcome.INVALID, None
    role = Role.parse(claimed)
    current = await session.get(StaffMember, telegram_id)
    if current is None or Role.parse(current.role) < role:
        await add_staff(session, telegram_id, role, name)
    return InviteOutcome.GRANTED, role
