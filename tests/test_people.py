"""Cards, PINs, roles and invites: the rules of who is who, without Telegram."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from storage.db import Database, utcnow
from storage.people import (
    InviteOutcome,
    LoginOutcome,
    Reader,
    Role,
    User,
    add_staff,
    create_invite,
    hash_pin,
    login,
    logout,
    redeem_invite,
    remove_staff,
    role_of,
    touch_user,
)

NOW = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)


async def _reader(db: Database, card: str = "C001", pin: str = "2468", **extra: object) -> None:
    async with db.session() as s:
        s.add(Reader(card_number=card, name="Wang Fang", pin_hash=hash_pin(pin), **extra))


async def test_pin_is_stored_only_as_an_argon2id_hash(db: Database) -> None:
    await _reader(db, pin="2468")
    async with db.session() as s:
        reader = await s.scalar(select(Reader))
    assert reader is not None
    assert "2468" not in reader.pin_hash
    assert reader.pin_hash.startswith("$argon2id$")


async def test_right_pin_links_the_card_and_makes_a_reader(db: Database) -> None:
    await _reader(db)
    async with db.session() as s:
        await touch_user(s, 100)
        result = await login(s, 100, "C001", "2468", NOW)
    assert result.outcome is LoginOutcome.OK
    async with db.session() as s:
        assert await role_of(s, 100) is Role.READER
        assert await logout(s, 100)
        assert await role_of(s, 100) is Role.VISITOR
        assert not await logout(s, 100)


async def test_wrong_pin_and_unknown_card_get_the_same_answer(db: Database) -> None:
    await _reader(db)
    async with db.session() as s:
        wrong_pin = await login(s, 100, "C001", "0000", NOW)
        unknown = await login(s, 101, "NOPE", "2468", NOW)
    assert wrong_pin.outcome is unknown.outcome is LoginOutcome.FAILED


async def test_five_failures_lock_the_card_for_fifteen_minutes_even_for_the_right_pin(db: Database) -> None:
    await _reader(db)
    for attacker in range(200, 205):  # five different Telegram users guessing one card
        async with db.session() as s:
            assert (await login(s, attacker, "C001", "0000", NOW)).outcome is LoginOutcome.FAILED
    async with db.session() as s:
        assert (await login(s, 300, "C001", "2468", NOW + dt.timedelta(minutes=14))).outcome is LoginOutcome.LOCKED
    async with db.session() as s:
        assert (await login(s, 300, "C001", "2468", NOW + dt.timedelta(minutes=16))).outcome is LoginOutcome.OK


async def test_five_failures_lock_the_telegram_user_across_cards(db: Database) -> None:
    await _reader(db, "C001")
    for n in range(5):
        async with db.session() as s:
            await login(s, 100, f"GUESS{n}", "0000", NOW)
    async with db.session() as s:
        assert (await login(s, 100, "C001", "2468", NOW)).outcome is LoginOutcome.LOCKED


async def test_expired_card_is_linked_but_reported(db: Database) -> None:
    await _reader(db, expires_on=dt.date(2026, 1, 1))
    async with db.session() as s:
        assert (await login(s, 100, "C001", "2468", NOW)).outcome is LoginOutcome.CARD_EXPIRED


async def test_invite_grants_its_role_once_and_expires(db: Database) -> None:
    async with db.session() as s:
        code = await create_invite(s, Role.DUTY_OFFICER, NOW)
        late = await create_invite(s, Role.STAFF, NOW)
    async with db.session() as s:
        assert await redeem_invite(s, code, 500, "Zhao", NOW) == (InviteOutcome.GRANTED, Role.DUTY_OFFICER)
    async with db.session() as s:
        assert (await redeem_invite(s, code, 501, "Eve", NOW))[0] is InviteOutcome.INVALID
        assert (await redeem_invite(s, late, 502, "Eve", NOW + dt.timedelta(hours=25)))[0] is InviteOutcome.INVALID
        assert (await redeem_invite(s, "forged", 503, "Eve", NOW))[0] is InviteOutcome.INVALID
        assert await role_of(s, 500) is Role.DUTY_OFFICER
        assert await role_of(s, 501) is Role.VISITOR


async def test_staff_roles_are_granted_and_withdrawn(db: Database) -> None:
    async with db.session() as s:
        await add_staff(s, 42, Role.ADMIN, "Admin")
        assert await role_of(s, 42) is Role.ADMIN
        await add_staff(s, 42, Role.STAFF)
        assert await role_of(s, 42) is Role.STAFF
        assert await remove_staff(s, 42)
        assert await role_of(s, 42) is Role.VISITOR
        assert not await remove_staff(s, 42)


async def test_a_real_clock_time_works_too(db: Database) -> None:
    async with db.session() as s:
        code = await create_invite(s, Role.STAFF, utcnow())
        assert (await redeem_invite(s, code, 1, "A", utcnow()))[0] is InviteOutcome.GRANTED


async def test_two_first_messages_at_once_create_one_user(db: Database) -> None:
    import asyncio

    async def first_contact() -> int:
        async with db.session() as s:
            return (await touch_user(s, 4242, "Ann", "en")).telegram_id

    assert await asyncio.gather(*(first_contact() for _ in range(5))) == [4242] * 5
    async with db.session() as s:
        assert (await s.get(User, 4242)) is not None
