"""Texts measured and cut as Telegram counts them (after the tags and entities, in UTF-16 units),
never inside a tag or an entity; a message whose formatting Telegram refuses is sent again as plain
text. Telegram's side is the emulator's parser, which refuses what Telegram refuses."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from bot.embedded import EmbeddedBot
from bot.emulator import parse_html, utf16_len
from bot.telegram_text import fit_html, plain_text, visible_length
from bot.ui import escape
from storage.outbox import Delivery, DeliveryState, enqueue
from tests.test_broadcast_e2e import DUTY, READERS_EN, STAFF, latest, setup, watch

WORDS = st.text(alphabet=st.sampled_from(list("ab &<>\"'中文😀\n")), max_size=40)
TAGS = ("b", "i", "u", "s", "code", "tg-spoiler")


@st.composite
def html_texts(draw: st.DrawFn) -> str:
    """Valid Telegram HTML: escaped words, some of them in (nested) tags."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        words = escape(draw(WORDS))
        for tag in draw(st.lists(st.sampled_from(TAGS), max_size=2, unique=True)):
            words = f"<{tag}>{words}</{tag}>"
        if draw(st.booleans()):
            words = f'<a href="https://example.org/?a=1&amp;b=2">{words}</a>'
        parts.append(words)
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(html_texts(), st.integers(2, 120))
def test_a_cut_text_is_valid_html_within_the_limit(text: str, limit: int) -> None:
    fitted = fit_html(text, limit)
    plain, _ = parse_html(fitted)  # Telegram would accept it (raises "can't parse entities" otherwise)
    assert utf16_len(plain) <= limit
    assert visible_length(fitted) == utf16_len(plain)
    if visible_length(text) <= limit:
        assert fitted == text
    else:
        assert plain.endswith("…") and parse_html(text)[0].startswith(plain[:-1])


def test_the_length_is_counted_after_entities_in_utf16_units() -> None:
    assert visible_length("<b>A &amp; B</b> 😀") == 8  # "A & B 😀": the emoji counts two
    assert plain_text("<i>x &lt;y&gt;</i>") == "x <y>"
    # 4,090 characters with 12 "&" escaped are 4,138 characters of HTML but fit in one message.
    text = "<i>" + escape("&" * 12 + "x" * 4078) + "</i>"
    assert len(text) > 4096 and fit_html(text, 4096) == text


async def test_a_4000_character_emergency_with_ampersands_reaches_staff_whole(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    staff = await watch(bot_env, STAFF)
    reader = await watch(bot_env, READERS_EN[0])
    words = ("Leave by the east exit & wait outside. " * 12)[:468]  # twelve "&"
    body = words + "x" * (4000 - len(words))
    assert len(body) == 4000 and body.count("&") == 12

    await duty.send("/emergency")
    await duty.press("Fire")
    await duty.press("3F Social Sciences reading area")
    await duty.press("✏️ Edit English")
    await duty.send(body)
    await duty.press("✅ Use this text")
    await duty.press("Everyone (8)")
    await duty.press("📣 Send to 8 people")

    got_reader = await latest(reader, "Leave by the east exit", within=20)
    got_staff = await latest(staff, "Leave by the east exit", within=20)
    assert body in got_reader["plain"]
    # The staff version adds a line and the buttons: still one message, with the whole text.
    assert body in got_staff["plain"] and got_staff["buttons"]
    assert utf16_len(got_staff["plain"]) <= 4096
    async with bot_env.db.session() as s:
        states = set(await s.scalars(select(Delivery.state).where(Delivery.kind == "broadcast")))
    assert DeliveryState.FAILED not in states


async def test_a_push_whose_formatting_is_refused_goes_out_as_plain_text(bot_env: EmbeddedBot) -> None:
    staff = await watch(bot_env, STAFF)
    bot_env.emulator.started(STAFF)  # they pressed Start long ago: the bot may write to them
    async with bot_env.db.session() as s:  # a parameter that was not escaped: "<" opens no tag
        await enqueue(s, STAFF, "incidents.literal", {"text": "Smoke on 3F <east stairs> & lift"}, kind="test")
    got = await latest(staff, "Smoke on 3F", within=20)
    assert got["plain"] == "Smoke on 3F <east stairs> & lift"
    for _ in range(50):
        async with bot_env.db.session() as s:
                state = await s.scalar(select(Delivery.state).where(Delivery.kind == "test"))
        if state == DeliveryState.SENT:
            break
        await asyncio.sleep(0.1)
    assert state == DeliveryState.SENT
