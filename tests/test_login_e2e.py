"""The step-by-step /login as a new reader meets it (#20): a wrong PIN asks again until the lockout,
another command ends the login, nothing typed in a login step stays in the chat or is searched,
a reader already linked is told, and the lockout says when it ends."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from bot.embedded import EmbeddedBot
from storage.people import LoginLock, Reader, User, hash_pin


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or "" for m in messages if m["from_bot"])


async def _card(env: EmbeddedBot, card: str = "R1001", pin: str = "5678", name: str = "Wang Fang") -> None:
    async with env.db.session() as s:
        s.add(Reader(card_number=card, name=name, pin_hash=hash_pin(pin)))


def _typed(person: Any) -> list[dict[str, Any]]:
    return [m for m in person.messages() if not m["from_bot"]]


async def _linked(env: EmbeddedBot, user_id: int) -> bool:
    async with env.db.session() as s:
        user = await s.get(User, user_id)
        return user is not None and user.reader_id is not None


async def test_a_wrong_pin_asks_for_it_again_and_the_next_pin_is_not_searched(bot_env: EmbeddedBot) -> None:
    await _card(bot_env)
    ann = await bot_env.person(1, language_code="en")
    await ann.send("/login")
    await ann.send("R1001")
    wrong = texts(await ann.send("0000"))
    assert "do not match" in wrong and "Send the PIN again" in wrong
    right = texts(await ann.send("5678"))
    assert "Your card is linked, Wang Fang" in right
    assert "result" not in right.lower() and "5678" not in right  # not run as a search, not echoed
    assert all(m["deleted"] for m in _typed(ann) if m["text"] in ("R1001", "0000", "5678"))
    assert not any("5678" in (m["text"] or "") or "0000" in (m["text"] or "") for m in ann.messages() if m["from_bot"])
    assert await _linked(bot_env, 1)


async def test_in_chinese_a_wrong_pin_asks_again_and_five_lock_with_the_time_it_ends(bot_env: EmbeddedBot) -> None:
    await _card(bot_env)
    li = await bot_env.person(2, language_code="zh")
    assert "读者证号" in texts(await li.send("/login"))
    await li.send("R1001")
    for _ in range(4):
        assert "请重新发送密码" in texts(await li.send("1111"))
    locked = texts(await li.send("1111"))  # the fifth wrong PIN ends the login with the lockout
    async with bot_env.db.session() as s:
        lock = await s.scalar(select(LoginLock).where(LoginLock.key == "card:R1001"))
    assert lock is not None and lock.locked_until is not None
    until = lock.locked_until.astimezone(bot_env.services.tz).strftime("%H:%M")
    assert f"请于 {until} 之后再试" in locked
    # the login is over: the next text is a catalog search again, not a sixth PIN
    await li.send("2222")
    async with bot_env.db.session() as s:
        lock = await s.scalar(select(LoginLock).where(LoginLock.key == "card:R1001"))
    assert lock is not None and lock.failures == 5
    assert all(m["deleted"] for m in _typed(li) if m["text"] == "1111")
    # asking again during the lock says until when, in English too
    eve = await bot_env.person(3, language_code="en")
    assert re.search(rf"paused until {until}", texts(await eve.send("/login R1001 5678")))


async def test_another_command_ends_the_login_and_runs(bot_env: EmbeddedBot) -> None:
    await _card(bot_env)
    ann = await bot_env.person(1, language_code="en")
    await ann.send("/login")
    hours = texts(await ann.send("/hours"))
    assert "☎️" in hours  # /hours answered, not swallowed as a card number
    await ann.send("R1001")
    await ann.send("Harry Potter")  # would have been a PIN attempt had the login gone on
    async with bot_env.db.session() as s:
        counted = (await s.scalars(select(LoginLock.failures).where(LoginLock.failures > 0))).all()
    assert counted == []
    assert not any(m["deleted"] for m in _typed(ann) if m["text"] == "Harry Potter")
    # /login in the middle of a login starts over
    await ann.send("/login")
    await ann.send("R9999")
    assert "card number" in texts(await ann.send("/login"))
    await ann.send("R1001")
    assert "Your card is linked" in texts(await ann.send("5678"))


async def test_a_reader_already_linked_is_told(bot_env: EmbeddedBot) -> None:
    await _card(bot_env)
    ann = await bot_env.person(1, language_code="en")
    await ann.send("/login R1001 5678")
    again = texts(await ann.send("/login"))
    assert "already linked to the card of Wang Fang (…1001)" in again
    assert "/cancel" in again
    zh = await bot_env.person(2, language_code="zh")
    await zh.send("/login R1001 5678")
    assert "本聊天已绑定 Wang Fang 的读者证" in texts(await zh.send("/login"))
    assert "已取消" in texts(await zh.send("/cancel"))
    assert await _linked(bot_env, 2)


async def test_card_and_pin_typed_together_at_the_card_step_log_in_and_are_deleted(bot_env: EmbeddedBot) -> None:
    await _card(bot_env)
    ann = await bot_env.person(1, language_code="en")
    await ann.send("/login")
    assert "Your card is linked" in texts(await ann.send("R1001 5678"))
    assert all(m["deleted"] for m in _typed(ann) if "5678" in (m["text"] or ""))
