"""The demo page in a real browser (Debian's Chromium driven by Playwright): pick the sample
reader, send /start, see the answer, press an inline button and see the edited message."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Page, async_playwright, expect

from bot.demo import DemoCard, personas
from bot.embedded import EmbeddedBot
from storage.db import Database
from storage.people import Reader, User, hash_pin

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
    env = await EmbeddedBot.start(db)
    env.emulator.personas = personas([DemoCard("D0001", "1234", "Wang Xiaoming", 8001, "sample")])
    env.emulator.started(8001)
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
