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


# --- races and guessing (#13): fired concurrently against the real database ----------------------


async def _attempt(db: Database, telegram_id: int, card: str, pin: str, now: dt.datetime = NOW) -> LoginOutcome:
    async with db.session() as s:
        return (await login(s, telegram_id, card, pin, now)).outcome


async def test_thirty_wrong_pins_at_once_from_thirty_accounts_check_at_most_five(db: Database) -> None:
    import asyncio

    await _reader(db)
    assert await _attempt(db, 999, "C001", "9999") is LoginOutcome.FAILED  # the card's counter exists already
    outcomes = await asyncio.gather(*(_attempt(db, 1000 + n, "C001", f"{n:04d}") for n in range(30)))
    assert outcomes.count(LoginOutcome.FAILED) == 4
    assert outcomes.count(LoginOutcome.LOCKED) == 26
    assert await _attempt(db, 2000, "C001", "2468") is LoginOutcome.LOCKED  # the owner too, for the window


async def test_twenty_wrong_pins_at_once_from_one_account_check_at_most_five(db: Database) -> None:
    import asyncio

    await _reader(db)
    outcomes = await asyncio.gather(*(_attempt(db, 77, "C001", f"{n:04d}") for n in range(20)))
    assert outcomes.count(LoginOutcome.FAILED) == 5
    assert outcomes.count(LoginOutcome.LOCKED) == 15


async def test_the_right_pin_among_concurrent_guesses_is_never_a_takeover_after_five(db: Database) -> None:
    import asyncio

    await _reader(db)
    guesses = [f"{n:04d}" for n in range(40)] + ["2468"]  # the right PIN comes last
    outcomes = await asyncio.gather(*(_attempt(db, 3000 + n, "C001", pin) for n, pin in enumerate(guesses)))
    assert outcomes.count(LoginOutcome.FAILED) <= 5
    assert outcomes[-1] is LoginOutcome.LOCKED
    async with db.session() as s:
        assert await s.scalar(select(User).where(User.reader_id.is_not(None))) is None


async def test_eight_people_opening_one_invite_at_once_make_one_duty_officer(db: Database) -> None:
    import asyncio

    from storage.people import list_staff

    async with db.session() as s:
        code = await create_invite(s, Role.DUTY_OFFICER, NOW)

    async def open_invite(telegram_id: int) -> InviteOutcome:
        async with db.session() as s:
            return (await redeem_invite(s, code, telegram_id, "X", NOW))[0]

    outcomes = await asyncio.gather(*(open_invite(600 + n) for n in range(8)))
    assert outcomes.count(InviteOutcome.GRANTED) == 1
    async with db.session() as s:
        assert len(await list_staff(s)) == 1


async def test_logging_in_to_ones_own_card_does_not_reset_the_guesses_counted_against_the_account(db: Database) -> None:
    await _reader(db, "C001", "2468")
    for n in range(4):
        await _reader(db, f"OTHER{n}", "9999")
    for n in range(4):
        assert await _attempt(db, 100, f"OTHER{n}", "0000") is LoginOutcome.FAILED
    assert await _attempt(db, 100, "C001", "2468") is LoginOutcome.OK
    assert await _attempt(db, 100, "OTHER0", "1111") is LoginOutcome.FAILED  # the fifth failure of the window
    assert await _attempt(db, 100, "OTHER1", "1111") is LoginOutcome.LOCKED
    assert await _attempt(db, 100, "OTHER2", "9999") is LoginOutcome.LOCKED  # even the right PIN, for the window
    later = NOW + dt.timedelta(minutes=16)
    assert await _attempt(db, 100, "OTHER2", "9999", later) is LoginOutcome.OK


async def test_failures_of_an_earlier_window_do_not_count(db: Database) -> None:
    await _reader(db)
    for n in range(4):
        assert await _attempt(db, 200 + n, "C001", "0000") is LoginOutcome.FAILED
    next_window = NOW + dt.timedelta(minutes=16)
    for n in range(4):  # four more, a quarter of an hour later: the card is not locked by the old ones
        assert await _attempt(db, 300 + n, "C001", "0000", next_window) is LoginOutcome.FAILED
    assert await _attempt(db, 400, "C001", "2468", next_window) is LoginOutcome.OK


async def test_an_unknown_card_is_checked_against_a_hash_like_a_known_one(db: Database, monkeypatch: object) -> None:
    import pytest

    import storage.people as people

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    await _reader(db)
    checked: list[str] = []
    real = people.pin_matches

    def spy(pin_hash: str, pin: str) -> bool:
        checked.append(pin_hash.rsplit("$", 2)[0])  # the algorithm and its parameters, not the salt
        return real(pin_hash, pin)

    monkeypatch.setattr(people, "pin_matches", spy)
    assert await _attempt(db, 100, "C001", "0000") is LoginOutcome.FAILED
    assert await _attempt(db, 101, "NO-SUCH-CARD", "0000") is LoginOutcome.FAILED
    assert len(checked) == 2 and checked[0] == checked[1]


async def test_linking_a_card_held_by_another_account_tells_that_account_and_it_can_unlink(db: Database) -> None:
    from storage.outbox import Delivery
    from storage.people import linked_accounts, unlink_account

    await _reader(db, "C0012345")
    assert await _attempt(db, 100, "C0012345", "2468") is LoginOutcome.OK
    async with db.session() as s:
        assert list(await s.scalars(select(Delivery))) == []  # nobody else held it
    assert await _attempt(db, 666, "C0012345", "2468", NOW + dt.timedelta(hours=1)) is LoginOutcome.OK
    async with db.session() as s:
        told = list(await s.scalars(select(Delivery)))
        assert [(d.chat_id, d.text_key) for d in told] == [(100, "account.card_linked_elsewhere")]
        assert told[0].params == {"card": "…2345", "when": "2026-11-26 10:00"}
        assert [u.telegram_id for u in await linked_accounts(s, 100)] == [100, 666]
        assert not await unlink_account(s, 100, 100)
        assert not await unlink_account(s, 100, 12345)  # not on this card
        assert await unlink_account(s, 100, 666)
    async with db.session() as s:
        assert await role_of(s, 666) is Role.VISITOR
        assert await role_of(s, 100) is Role.READER
        assert [u.telegram_id for u in await linked_accounts(s, 100)] == [100]
