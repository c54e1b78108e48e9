"""The Bot API emulator, checked with the real python-telegram-bot client and a simulated user."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, InputMediaPhoto, Update
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes

from bot.emulator import Emulator, Person, parse_html, plain_text

READER = 1001


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    emulator = Emulator()
    emulator.started(*range(READER, READER + 20))  # these people pressed Start some time ago
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


@pytest.fixture
async def person(emu: Emulator) -> AsyncIterator[Person]:
    async with Person(emu.url or "", READER, first_name="Lin", language_code="zh-hans", quiet=0.1) as p:
        yield p


def keyboard(*labels: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(label, callback_data=f"cb:{label}") for label in labels]]
    )


async def test_get_me_and_bad_token(emu: Emulator, bot: Bot) -> None:
    me = await bot.get_me()
    assert me.username == "librarybot" and me.is_bot
    wrong = Bot("999:WRONG", base_url=emu.base_url)
    with pytest.raises(InvalidToken):
        await wrong.get_me()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{emu.base_url}{emu.token}/noSuchMethod") as resp:
            assert resp.status == 404
            assert (await resp.json())["description"] == "Not Found: method not found"
        async with session.post(f"{emu.base_url}999:WRONG/getMe") as resp:
            assert resp.status == 401
            assert await resp.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}


async def test_send_message_reaches_the_person(bot: Bot, person: Person) -> None:
    sent = await bot.send_message(READER, "<b>Due soon</b>: 3 &lt;books&gt;", parse_mode="HTML")
    assert sent.text == "Due soon: 3 <books>"
    assert sent.entities[0].type == "bold" and sent.chat.first_name == "User1001"
    [message] = await person.wait_for()
    assert message["text"] == "<b>Due soon</b>: 3 &lt;books&gt;"
    assert message["plain"] == "Due soon: 3 <books>" and message["from_bot"]
    assert person.messages()[-1]["message_id"] == sent.message_id


async def test_telegram_like_validation(bot: Bot) -> None:
    with pytest.raises(BadRequest, match="(?i)message is too long"):
        await bot.send_message(READER, "x" * 4097)
    with pytest.raises(BadRequest, match="(?i)text is empty"):
        await bot.send_message(READER, " ")
    with pytest.raises(BadRequest, match="(?i)can't parse entities"):
        await bot.send_message(READER, "a <br> b", parse_mode="HTML")
    with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="y" * 65)]])
        await bot.send_message(READER, "hi", reply_markup=markup)
    assert (await bot.send_message(READER, "é" * 4096)).text


async def test_press_edit_and_callback_answer(emu: Emulator, bot: Bot, person: Person) -> None:
    sent = await bot.send_message(READER, "Renew?", reply_markup=keyboard("Renew", "Cancel"))
    await person.wait_for()
    await person.press("Renew", wait=False)
    [update_data] = await bot.get_updates(timeout=2)
    update = Update.de_json(update_data.to_dict(), bot)
    query = update.callback_query
    assert query is not None and query.data == "cb:Renew" and query.from_user.id == READER
    assert query.message is not None and query.message.message_id == sent.message_id

    async def answer() -> None:
        await asyncio.sleep(0.05)
        await bot.answer_callback_query(query.id, text="Renewed until 1 May")
        await bot.edit_message_text("Renewed.", chat_id=READER, message_id=sent.message_id)

    task = asyncio.create_task(answer())
    [edited] = await person.press_data(sent.message_id, "forged", timeout=3)
    await task
    assert edited["plain"] == "Renewed." and edited["edited"] == 1 and edited["buttons"] == []
    with pytest.raises(BadRequest, match="(?i)message is not modified"):
        await bot.edit_message_text("Renewed.", chat_id=READER, message_id=sent.message_id)
    # The first press was answered above; the forged one never was.
    assert person.last_callback_answer is not None
    assert person.last_callback_answer["text"] == "Renewed until 1 May"
    with pytest.raises(BadRequest, match="(?i)query is too old"):
        await bot.answer_callback_query(query.id)
    await bot.delete_message(READER, sent.message_id)
    await asyncio.sleep(0.05)
    assert person.messages()[-1]["deleted"]


async def test_document_round_trip(emu: Emulator, bot: Bot, person: Person) -> None:
    payload = b"card,due\n123,2025-05-01\n"
    sent = await bot.send_document(
        STAFF_CHAT, payload, filename="overdue.csv", caption="Overdue <i>list</i>", parse_mode="HTML"
    )
    assert sent.document is not None and sent.document.file_name == "overdue.csv"
    assert sent.caption == "Overdue list"
    telegram_file = await bot.get_file(sent.document.file_id)
    assert bytes(await telegram_file.download_as_bytearray()) == payload
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{emu.url}/_emu/files/{sent.document.file_id}") as resp:
            assert await resp.read() == payload
    [view] = emu.chat_messages(STAFF_CHAT)
    assert view["document"]["file_name"] == "overdue.csv" and view["text"] == "Overdue <i>list</i>"
    photo = await bot.send_photo(READER, b"\x89PNG fake", caption="Shelf 3F")
    assert photo.photo and (await person.wait_for())[0]["photo"] == photo.photo[-1].file_id
    # attach:// references: a thumbnail, and an album of an upload plus a known file_id.
    with_thumb = await bot.send_document(READER, b"%PDF-1.4", filename="guide.pdf", thumbnail=b"\x89PNG")
    assert with_thumb.document is not None and with_thumb.document.file_name == "guide.pdf"
    album = await bot.send_media_group(
        READER, [InputMediaPhoto(b"\x89PNG one", caption="one"), InputMediaPhoto(photo.photo[-1].file_id)]
    )
    assert (
        len(album) == 2 and album[0].media_group_id == album[1].media_group_id and album[0].caption == "one"
    )


STAFF_CHAT = -100500


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_global_rate_limit_gives_429(emu: Emulator, bot: Bot) -> None:
    emu.set_limits(global_rate=3, per_chat_rate=None)
    for n in range(3):
        await bot.send_message(READER + n, "notice")
    with pytest.raises(RetryAfter):
        await bot.send_message(READER + 9, "one too many")
    async with aiohttp.ClientSession() as session:
        url = f"{emu.base_url}{emu.token}/sendMessage"
        async with session.post(url, json={"chat_id": READER, "text": "again"}) as resp:
            body = await resp.json()
    assert resp.status == 429 and body["parameters"]["retry_after"] >= 1
    assert body["description"] == f"Too Many Requests: retry after {body['parameters']['retry_after']}"
    assert emu.stats.too_many_requests == 2 and len(emu.stats.sends) == 3
    emu.set_limits(None, per_chat_rate=1, per_chat_burst=2)
    await bot.send_message(READER, "a")
    await bot.send_message(READER, "b")
    with pytest.raises(RetryAfter):
        await bot.send_message(READER, "c")
    await bot.send_message(READER + 1, "another chat is fine")
    assert emu.stats.sends_per_chat[READER] == 3


async def test_blocked_user_gives_403(emu: Emulator, bot: Bot, person: Person) -> None:
    emu.block(READER)
    with pytest.raises(Forbidden, match="(?i)bot was blocked by the user"):
        await bot.send_message(READER, "emergency")
    assert emu.stats.forbidden == 1
    [update] = await bot.get_updates()
    assert update.my_chat_member is not None and update.my_chat_member.new_chat_member.status == "kicked"
    await person.send("/start", wait=False)  # writing again unblocks, as "Restart" does
    assert not emu.is_blocked(READER)
    await bot.send_message(READER, "welcome back")


async def test_get_updates_long_poll_and_offset(emu: Emulator, bot: Bot, person: Person) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await asyncio.sleep(0.1)
    assert not poll.done()
    await person.send("/search tea", wait=False)
    updates = await asyncio.wait_for(poll, 2)
    [update] = updates
    assert update.message is not None and update.message.text == "/search tea"
    assert update.message.entities[0].type == "bot_command"
    assert update.message.from_user is not None and update.message.from_user.language_code == "zh-hans"
    assert [u.update_id for u in await bot.get_updates()] == [update.update_id]  # not confirmed yet
    assert await bot.get_updates(offset=update.update_id + 1) == ()
    # The same update delivered twice must be possible (duplicate delivery tests).
    raw = update.to_dict()
    emu.inject_update(raw)
    emu.inject_update(raw)
    again = await bot.get_updates(offset=update.update_id + 1)
    assert [u.update_id for u in again] == [update.update_id, update.update_id]


async def test_webhook_delivery_and_conflict(emu: Emulator, bot: Bot, person: Person) -> None:
    received: list[tuple[str | None, dict]] = []
    arrived = asyncio.Event()
    failures = [1]

    async def receive(request: web.Request) -> web.Response:
        if failures:
            failures.pop()
            return web.Response(status=500)  # Telegram keeps the update and retries
        received.append((request.headers.get("X-Telegram-Bot-Api-Secret-Token"), await request.json()))
        arrived.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    emu.webhook_retry_delay = 0.05
    try:
        await bot.set_webhook(f"http://127.0.0.1:{port}/hook", secret_token="s3cret")
        with pytest.raises(Conflict):
            await bot.get_updates()
        await person.send("hello", wait=False)
        await asyncio.wait_for(arrived.wait(), 3)
        [(secret, update)] = received
        assert secret == "s3cret" and update["message"]["text"] == "hello"
        info = await bot.get_webhook_info()
        assert info.url.endswith("/hook") and info.pending_update_count == 0
        await bot.delete_webhook()
        assert await bot.get_updates() == ()
    finally:
        await runner.cleanup()


async def test_injected_failures(emu: Emulator, bot: Bot) -> None:
    emu.fail_next("sendMessage", count=1, status=502)
    with pytest.raises(NetworkError):
        await bot.send_message(READER, "flaky")
    assert (await bot.send_message(READER, "ok")).text == "ok"
    assert emu.stats.sends_per_chat[READER] == 1


async def test_commands_per_scope_and_language(emu: Emulator, bot: Bot) -> None:
    from telegram import BotCommand, BotCommandScopeAllPrivateChats, BotCommandScopeChat

    await bot.set_my_commands([BotCommand("search", "Search the catalog")])
    await bot.set_my_commands([BotCommand("search", "检索馆藏")], language_code="zh")
    await bot.set_my_commands(
        [BotCommand("overdue", "Overdue loans")], scope=BotCommandScopeChat(42), language_code="en"
    )
    await bot.set_my_commands([BotCommand("help", "Help")], scope=BotCommandScopeAllPrivateChats())
    # Telegram's order: narrower scope first, and within a scope the user's language first.
    assert emu.commands(READER, READER, "zh-hans")[0]["command"] == "help"
    assert emu.commands(-5, READER, "zh-hans")[0]["description"] == "检索馆藏"
    assert emu.commands(-5, READER, "fr")[0]["description"] == "Search the catalog"
    assert emu.commands(42, 42, "en-GB")[0]["command"] == "overdue"
    assert [c.command for c in await bot.get_my_commands(language_code="zh")] == ["search"]
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{emu.url}/_emu/commands", params={"chat_id": "42", "language_code": "en"}
        ) as r:
            assert (await r.json())["commands"][0]["command"] == "overdue"


async def test_person_with_a_real_application(emu: Emulator) -> None:
    """The real python-telegram-bot Application, polling the emulator, and a Person talking to it."""

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        await update.effective_message.reply_html(
            "Welcome, <b>reader</b>!", reply_markup=keyboard("Hours", "Help")
        )

    async def pressed(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        assert query is not None
        await query.answer("Opening hours")
        await query.edit_message_text(f"You chose {query.data}")

    application = (
        Application.builder().token(emu.token).base_url(emu.base_url).base_file_url(emu.base_file_url).build()
    )
    application.add_handler(CommandHandler("start", start))
    application.add_handler(CallbackQueryHandler(pressed))
    async with application:
        await application.start()
        assert application.updater is not None
        await application.updater.start_polling(poll_interval=0, timeout=1)
        try:
            async with Person(emu.url or "", 2002, first_name="Ada", quiet=0.1) as ada:
                [welcome] = await ada.send("/start")
                assert welcome["plain"] == "Welcome, reader!" and welcome["text"].startswith("Welcome, <b>")
                assert [b["text"] for b in welcome["buttons"][0]] == ["Hours", "Help"]
                [edited] = await ada.press("Hours")
                assert (
                    edited["message_id"] == welcome["message_id"]
                    and plain_text([edited]) == "You chose cb:Hours"
                )
                assert (
                    ada.last_callback_answer is not None
                    and ada.last_callback_answer["text"] == "Opening hours"
                )
                assert await ada.send("no handler for this", expect=False) == []
                with pytest.raises(LookupError):
                    await ada.press("Nope")
        finally:
            await application.updater.stop()
            await application.stop()


def test_html_parser() -> None:
    plain, entities = parse_html(
        '<b>Bold <i>both</i></b> <a href="https://x.org/?a=1&amp;b=2">link</a> 😀<code>c</code>'
    )
    assert plain == "Bold both link 😀c"
    assert entities == [
        {"type": "bold", "offset": 0, "length": 9},
        {"type": "italic", "offset": 5, "length": 4},
        {"type": "text_link", "offset": 10, "length": 4, "url": "https://x.org/?a=1&b=2"},
        {"type": "code", "offset": 17, "length": 1},
    ]
    assert parse_html('<pre><code class="language-python">x</code></pre>')[1] == [
        {"type": "pre", "offset": 0, "length": 1, "language": "python"}
    ]
    for bad in ("<b>open", "<b>x</i>", "1 < 2", "<div>x</div>"):
        with pytest.raises(Exception, match="(?i)can't parse entities"):
            parse_html(bad)


async def test_several_webhook_receivers_share_the_chats(emu: Emulator) -> None:
    """Each chat goes to one receiver (a conversation stays in one process), in order."""
    received: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    done = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        message = (await request.json())["message"]
        received[request.match_info["name"]].append((message["chat"]["id"], message["text"]))
        if sum(len(v) for v in received.values()) == 12:
            done.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook/{name}", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    root = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        emu.set_webhook_targets([f"{root}/hook/a", f"{root}/hook/b"])
        for n in range(3):
            for user in (11, 12, 13, 14):
                emu.user_send(user, text=f"m{n}")
        await asyncio.wait_for(done.wait(), 3)
    finally:
        await runner.cleanup()
    assert received["a"] and received["b"]
    for messages in received.values():
        for chat in {c for c, _ in messages}:
            assert [t for c, t in messages if c == chat] == ["m0", "m1", "m2"]
        assert not {c for c, _ in received["a"]} & {c for c, _ in received["b"]}


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_group_chat_and_group_limit(emu: Emulator, bot: Bot) -> None:
    async with Person(emu.url or "", READER, chat_id=-4001, chat_title="Staff", quiet=0.05) as member:
        await member.send("/overdue@librarybot", wait=False)
        [update] = await bot.get_updates()
        assert update.message is not None and update.message.chat.type == "group"
        assert update.message.chat.title == "Staff" and update.effective_user is not None
        assert update.effective_user.id == READER
        emu.set_limits(None, None, group_per_minute=2)
        await bot.send_message(-4001, "alert 1")
        await bot.send_message(-4001, "alert 2")
        with pytest.raises(RetryAfter):
            await bot.send_message(-4001, "alert 3")
        assert [m["plain"] for m in await member.wait_for()] == ["alert 1", "alert 2"]


async def test_demo_page_and_control_api(emu: Emulator) -> None:
    emu.personas = [
        {"user_id": 7, "first_name": "Mei", "language_code": "zh", "label_zh": "读者", "label_en": "Reader"}
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{emu.url}/") as resp:
            page = await resp.text()
            assert resp.status == 200 and 'id="persona-list"' in page
        async with session.get(f"{emu.url}/static/demo.js") as resp:
            assert resp.status == 200
        async with session.get(f"{emu.url}/_emu/personas") as resp:
            assert (await resp.json())["personas"][0]["label_zh"] == "读者"
        async with session.post(f"{emu.url}/_emu/send", json={"user_id": 7, "text": "hi"}) as resp:
            sent = await resp.json()
        poll = f"{emu.url}/_emu/chats/7/events"
        async with session.get(poll, params={"after": "0", "wait": "1"}) as resp:
            events = (await resp.json())["events"]
        assert [(e["type"], e["message"]["text"]) for e in events] == [("new", "hi")]
        assert events[0]["seq"] == sent["seq"]
        async with session.post(f"{emu.url}/_emu/updates", json={"message": {"text": "raw"}}) as resp:
            assert (await resp.json())["update_id"] > sent["update_id"]
        async with session.post(f"{emu.url}/_emu/limits", json={"global_rate": 5}) as resp:
            assert (await resp.json())["global_rate"] == 5
        async with session.get(f"{emu.url}/_emu/stats") as resp:
            assert (await resp.json())["total_sends"] == 0
