"""The emulator refuses what Telegram refuses (``bot.emulator_rules``), checked with the real
python-telegram-bot client: flood limits counted in rolling windows, the Bot API's own limits with
Telegram's messages, and the rules that depend on time, on the emulator's clock (no sleeping)."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator

import pytest
from telegram import Bot, BotCommand, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.error import BadRequest, Forbidden, RetryAfter

from bot.emulator import Emulator, Person

READER, OTHER, NEWCOMER = 2001, 2002, 2003
GROUP = -4100

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    emulator = Emulator()
    emulator.started(READER, OTHER)  # they pressed Start some time ago; NEWCOMER never did
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
async def bot(emu: Emulator) -> AsyncIterator[Bot]:
    client = Bot(emu.token, base_url=emu.base_url, base_file_url=emu.base_file_url)
    await client.initialize()
    try:
        yield client
    finally:
        await client.shutdown()


def retry_after(exc: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value if isinstance(value, (int, float)) else value.total_seconds()


# -- flood limits ------------------------------------------------------------------------------


async def test_the_bots_limit_is_counted_in_a_rolling_second_without_saved_credit(emu: Emulator, bot: Bot) -> None:
    emu.set_limits(global_rate=5, per_chat_rate=None)
    emu.clock.advance(30)  # a long quiet spell saves up nothing
    for n in range(5):
        await bot.send_message(READER if n % 2 else OTHER, f"notice {n}")
    with pytest.raises(RetryAfter) as refused:
        await bot.send_message(READER, "the sixth in one second")
    assert retry_after(refused.value) == 1
    emu.clock.advance(0.5)
    with pytest.raises(RetryAfter):  # still inside the same rolling second
        await bot.send_message(OTHER, "half a second later")
    emu.clock.advance(0.6)
    for n in range(5):
        await bot.send_message(OTHER, f"next second {n}")
    assert emu.stats.too_many_requests == 2 and len(emu.stats.sends) == 10


async def test_edits_count_against_the_limit(emu: Emulator, bot: Bot) -> None:
    emu.set_limits(global_rate=3, per_chat_rate=None)
    sent = await bot.send_message(READER, "progress 1")
    await bot.edit_message_text("progress 2", chat_id=READER, message_id=sent.message_id)
    await bot.edit_message_text("progress 3", chat_id=READER, message_id=sent.message_id)
    with pytest.raises(RetryAfter):
        await bot.send_message(OTHER, "one too many, the edits counted")
    with pytest.raises(RetryAfter):
        await bot.edit_message_text("progress 4", chat_id=READER, message_id=sent.message_id)


async def test_a_private_chat_allows_a_short_burst_then_about_one_a_second(emu: Emulator, bot: Bot) -> None:
    emu.set_limits(global_rate=30, per_chat_rate=1, per_chat_burst=3)
    for n in range(3):
        await bot.send_message(READER, f"burst {n}")
    with pytest.raises(RetryAfter):
        await bot.send_message(READER, "too fast for one chat")
    await bot.send_message(OTHER, "another chat is not slowed")
    emu.clock.advance(1.0)
    await bot.send_message(READER, "a second later")
    with pytest.raises(RetryAfter):
        await bot.send_message(READER, "and again at once")


async def test_a_group_gets_twenty_messages_in_any_rolling_minute(emu: Emulator, bot: Bot) -> None:
    emu.set_limits(global_rate=30, per_chat_rate=1, group_per_minute=20)
    async with Person(emu.url or "", READER, chat_id=GROUP, chat_title="Staff", quiet=0.05) as member:
        await member.send("hello", wait=False)
    for n in range(20):
        emu.clock.advance(1.0)
        await bot.send_message(GROUP, f"alert {n}")
    with pytest.raises(RetryAfter) as refused:
        await bot.send_message(GROUP, "alert 21")
    assert 1 <= retry_after(refused.value) <= 41  # until the first of the twenty leaves the minute
    emu.clock.advance(retry_after(refused.value))
    await bot.send_message(GROUP, "alert 21, later")


# -- the Bot API's limits, with Telegram's messages --------------------------------------------


async def test_html_must_be_telegrams_and_escaped(bot: Bot) -> None:
    for bad, message in (
        ("a > b", 'Character ">" must be escaped'),
        ("Tom & Jerry", 'Character "&" must be escaped'),
        ("1 < 2", 'Unexpected "<"'),
        ("<b>bold</i>", "Unmatched end tag"),
        ("<b>open", "Can't find end tag"),
        ("line<br>break", 'Unsupported start tag "br"'),
    ):
        with pytest.raises(BadRequest, match=f"(?i)can't parse entities: .*{message}"):
            await bot.send_message(READER, bad, parse_mode="HTML")
    sent = await bot.send_message(READER, "a &gt; b &amp; <b>c</b> &lt; d", parse_mode="HTML")
    assert sent.text == "a > b & c < d"
    await bot.send_message(READER, "a > b & c, no parse mode")


async def test_text_and_caption_lengths_are_counted_after_parsing_in_utf16(bot: Bot) -> None:
    await bot.send_message(READER, "<b>" + "x" * 4096 + "</b>", parse_mode="HTML")  # tags do not count
    with pytest.raises(BadRequest, match="(?i)message is too long"):
        await bot.send_message(READER, "😀" * 2049)  # 4,098 UTF-16 units
    with pytest.raises(BadRequest, match="(?i)message text is empty"):
        await bot.send_message(READER, "<b></b>", parse_mode="HTML")
    await bot.send_document(READER, b"a,b\n", filename="x.csv", caption="c" * 1024)
    await bot.send_document(READER, b"a,b\n", filename="x.csv", caption="")
    with pytest.raises(BadRequest, match="(?i)message caption is too long"):
        await bot.send_document(READER, b"a,b\n", filename="x.csv", caption="é" * 1025)


async def test_buttons_callback_data_and_answers(emu: Emulator, bot: Bot) -> None:
    with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
        await bot.send_message(READER, "x", reply_markup=InlineKeyboardMarkup([[InlineKeyboardButton("a", callback_data="d" * 65)]]))
    many = [[InlineKeyboardButton(f"{r}{c}", callback_data=f"{r}:{c}") for c in range(8)] for r in range(13)]
    with pytest.raises(BadRequest, match="(?i)reply markup is too long"):  # 104 buttons
        await bot.send_message(READER, "x", reply_markup=InlineKeyboardMarkup(many))
    sent = await bot.send_message(READER, "x", reply_markup=InlineKeyboardMarkup(many[:12] + [many[12][:4]]))  # 100
    pressed = emu.user_press(READER, sent.message_id, "0:0")
    with pytest.raises(BadRequest, match="(?i)MESSAGE_TOO_LONG"):
        await bot.answer_callback_query(pressed["callback_query_id"], text="t" * 201)
    await bot.answer_callback_query(pressed["callback_query_id"], text="t" * 200)
    late = emu.user_press(READER, sent.message_id, "0:1")
    emu.clock.advance(16)
    with pytest.raises(BadRequest, match="(?i)query is too old and response timeout expired"):
        await bot.answer_callback_query(late["callback_query_id"])


async def test_commands_and_unknown_parameters(bot: Bot) -> None:
    with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_INVALID"):
        await bot.set_my_commands([BotCommand("Loans", "your loans")])
    with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_DESCRIPTION_INVALID"):
        await bot.set_my_commands([BotCommand("loans", "d" * 257)])
    with pytest.raises(BadRequest, match="(?i)BOT_COMMANDS_TOO_MUCH"):
        await bot.set_my_commands([BotCommand(f"c{n}", "d") for n in range(101)])
    await bot.set_my_commands([BotCommand("c" * 32, "d" * 256)])
    with pytest.raises(BadRequest, match='(?i)unknown parameter "disable_preview" of sendMessage'):
        await bot.do_api_request("sendMessage", api_kwargs={"chat_id": READER, "text": "x", "disable_preview": True})


# -- messages over time, and who may be written to --------------------------------------------


async def test_editing_a_message_the_user_deleted_and_not_modified(emu: Emulator, bot: Bot) -> None:
    sent = await bot.send_message(READER, "your loans")
    with pytest.raises(BadRequest, match="(?i)message is not modified"):
        await bot.edit_message_text("your loans", chat_id=READER, message_id=sent.message_id)
    emu.user_delete(READER, sent.message_id)
    with pytest.raises(BadRequest, match="(?i)message to edit not found"):
        await bot.edit_message_text("your loans, updated", chat_id=READER, message_id=sent.message_id)


async def test_a_message_can_be_deleted_for_48_hours(emu: Emulator, bot: Bot) -> None:
    young = await bot.send_message(READER, "young")
    old = await bot.send_message(READER, "old")
    emu.clock.advance(47 * 3600)
    assert await bot.delete_message(READER, young.message_id)
    emu.clock.advance(2 * 3600)
    with pytest.raises(BadRequest, match="(?i)message can't be deleted"):
        await bot.delete_message(READER, old.message_id)


async def test_nobody_is_written_to_before_pressing_start(emu: Emulator, bot: Bot) -> None:
    with pytest.raises(Forbidden, match="(?i)bot can't initiate conversation with a user"):
        await bot.send_message(NEWCOMER, "your book is overdue")
    assert emu.stats.forbidden == 1 and not emu.has_started(NEWCOMER)
    async with Person(emu.url or "", NEWCOMER, quiet=0.05) as newcomer:
        await newcomer.send("/start", wait=False)
    await bot.send_message(NEWCOMER, "welcome")
    await bot.send_message(GROUP, "groups need no Start")
