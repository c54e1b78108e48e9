"""The demo page in a real browser (Debian's Chromium driven by Playwright): pick the sample
reader, send /start, see the answer, press an inline button and see the edited message; the staff
group persona shows the group and its alerts; an English-speaking sample reader is answered in
English, and the page's language button switches the persona's language (#20)."""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, async_playwright, expect

from bot.demo import STAFF_ID, DemoCard, personas
from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from handlers.tickets import labels
from storage.db import Database
from storage.people import Reader, Role, User, add_staff, hash_pin
from storage.tickets import file_ticket

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def demo(db: Database) -> AsyncIterator[EmbeddedBot]:
    async with db.session() as s:
        reader = Reader(card_number="D0001", name="Wang Xiaoming", pin_hash=hash_pin("1234"))
        s.add(reader)
        await s.flush()
        s.add(User(telegram_id=8001, first_name="Wang", telegram_language="en", reader_id=reader.id))
        other = Reader(card_number="D0002", name="Emma Smith", pin_hash=hash_pin("2345"))
        s.add(other)
        await s.flush()
        s.add(User(telegram_id=8002, first_name="Emma", telegram_language="zh", reader_id=other.id))
        await add_staff(s, STAFF_ID, Role.STAFF, "李娜 Li Na")
    env = await EmbeddedBot.start(db)
    env.emulator.personas = personas([DemoCard("D0001", "1234", "Wang Xiaoming", 8001, "sample"),
                                      DemoCard("D0002", "2345", "Emma Smith", 8002, "sample")])
    env.emulator.started(8001, 8002)
    try:
        yield env
    finally:
        await env.stop()


@pytest.fixture
async def page(demo: EmbeddedBot) -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = await browser.new_context(locale="en-US")
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{demo.emulator.port}/")
        try:
            yield page
        finally:
            await browser.close()


async def test_a_reader_chats_and_presses_a_button_in_the_demo_page(page: Page) -> None:
    await page.locator("#persona-list button[data-user-id='8001']").click()
    await page.locator("#message-input").fill("/start")
    await page.locator("#send-button").click()
    await expect(page.locator(".message.bot .text").last).to_contain_text("欢迎回来", timeout=10_000)

    await page.locator("#message-input").fill("/language")
    await page.locator("#message-input").press("Enter")
    button = page.locator(".message.bot .inline-keyboard button", has_text="English")
    await expect(button).to_be_visible(timeout=10_000)
    await button.click()
    # The same message is edited in place: its text changes and its buttons go.
    await expect(page.locator(".message.bot .text", has_text="I will speak English")).to_be_visible(timeout=10_000)
    await expect(page.locator(".message.bot .inline-keyboard button", has_text="English")).to_have_count(0)
    await page.screenshot(path="/tmp/demo-page.png", full_page=True)


async def test_the_staff_group_and_an_english_reader_in_the_demo_page(page: Page, demo: EmbeddedBot) -> None:
    async with demo.db.session() as s:  # an alert the staff group receives
        await file_ticket(s, 8001, "facilities", "The lift on 3F is broken", policy=demo.policy, now=demo.now(),
                          staff_chat_id=STAFF_CHAT_ID, labels=labels())
    await page.locator(f"#persona-list button[data-chat-id='{STAFF_CHAT_ID}']").click()
    await expect(page.locator("#chat-subtitle")).to_contain_text("Staff group", timeout=10_000)
    await expect(page.locator(".message.bot .text", has_text="The lift on 3F is broken")).to_be_visible(timeout=15_000)

    # Half the sample readers speak English: Emma's Telegram is English, and she is answered in it.
    await page.locator("#switch-persona").click()
    emma = page.locator("#persona-list button[data-chat-id='8002']")
    await expect(emma.locator(".persona-lang")).to_have_text("EN")
    await emma.click()
    await page.locator("#message-input").fill("/start")
    await page.locator("#send-button").click()
    await expect(page.locator(".message.bot .text", has_text="Welcome back, Emma")).to_be_visible(timeout=10_000)
    # The page's language button switches Emma's language too: the bot answers her in Chinese.
    await page.locator("#lang-toggle").click()
    await page.locator("#message-input").fill("/help")
    await page.locator("#send-button").click()
    await expect(page.locator(".message.bot .text", has_text="我能为您做什么")).to_be_visible(timeout=10_000)
    # The page sends photos (complaints and incident reports take them): the picture itself arrives.
    await page.locator("#message-input").fill("/report")
    await page.locator("#send-button").click()
    await page.locator(".message.bot .inline-keyboard button", has_text="漏水").click()
    await page.locator(".message.bot .inline-keyboard button", has_text="二层 自然科学阅览区").click()
    await expect(page.locator(".message.bot .text", has_text="照片").last).to_be_visible(timeout=10_000)
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    await page.locator("#photo-input").set_input_files(files=[{"name": "leak.png", "mimeType": "image/png", "buffer": png}])
    await expect(page.locator(".message.user .photo img")).to_have_count(1, timeout=10_000)
    await expect(page.locator(".message.bot .text", has_text="第 1 号报告已送达").last).to_be_visible(timeout=10_000)
    await page.screenshot(path="/tmp/demo-page-english-reader.png", full_page=True)
