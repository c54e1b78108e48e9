"""People: Telegram users, library readers (cards), staff roles, invites and the login lockout."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ForeignKey, String, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, utcnow


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
    """Failed logins counted per card and per Telegram user (keys ``card:…`` and ``user:…``)."""

    __tablename__ = "login_locks"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[dt.datetime | None]


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
    outcome: LoginOutcome
    reader: Reader | None = None


async def _lock(session: AsyncSession, key: str) -> LoginLock:
    lock = await session.get(LoginLock, key, with_for_update=True)
    if lock is None:
        lock = LoginLock(key=key, failures=0)
        session.add(lock)
    return lock


async def login(
    session: AsyncSession,
    telegram_id: int,
    card_number: str,
    pin: str,
    now: dt.datetime,
    verify: bool | None = None,
) -> LoginResult:
    """Link ``card_number`` to the Telegram user when the PIN is right.

    Five failures per card or per Telegram user lock both for 15 minutes; a locked login answers
    LOCKED without checking the PIN, so guessing during the lock teaches nothing. ``verify`` lets an
    external library system decide the PIN (it is then checked there, not against the local hash).
    """
    card_number = card_number.strip()[:64]
    locks = [await _lock(session, f"card:{card_number}"), await _lock(session, f"user:{telegram_id}")]
    if any(lock.locked_until is not None and lock.locked_until > now for lock in locks):
        return LoginResult(LoginOutcome.LOCKED)
    reader = await session.scalar(select(Reader).where(Reader.card_number == card_number))
    ok = verify if verify is not None else reader is not None and pin_matches(reader.pin_hash, pin)
    if not ok or reader is None:
        for lock in locks:
            lock.failures += 1
            if lock.failures >= MAX_FAILURES:
                lock.locked_until = now + LOCK_DURATION
                lock.failures = 0
        return LoginResult(LoginOutcome.FAILED)
    for lock in locks:
        lock.failures = 0
        lock.locked_until = None
    user = await session.get(User, telegram_id)
    if user is None:
        user = await touch_user(session, telegram_id)
    user.reader_id = reader.id
    if reader.expires_on is not None and reader.expires_on < now.date():
        return LoginResult(LoginOutcome.CARD_EXPIRED, reader)
    return LoginResult(LoginOutcome.OK, reader)


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
    invite = await session.get(Invite, _code_hash(code.strip()), with_for_update=True)
    if invite is None or invite.used_by is not None or invite.expires_at <= now:
        return InviteOutcome.INVALID, None
    invite.used_by = telegram_id
    invite.used_at = now
    role = Role.parse(invite.role)
    current = await session.get(StaffMember, telegram_id)
    if current is None or Role.parse(current.role) < role:
        await add_staff(session, telegram_id, role, name)
    return InviteOutcome.GRANTED, role
