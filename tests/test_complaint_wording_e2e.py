"""Filing a complaint as a new reader met it (#20), end to end through the emulator: words typed at
the photo step are kept (added to the description, and said so), and a complaint of emoji only is
refused with a request for words, in English and in Chinese."""

from __future__ import annotations

from bot.embedded import EmbeddedBot
from tests.test_tickets_e2e import READER, setup, texts, ticket, watch


async def test_text_at_the_photo_step_is_kept_and_emoji_alone_are_refused(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    fang = await watch(bot_env, READER)
    await fang.send("/complain")
    await fang.press("Facilities and equipment")
    refused = texts(await fang.send("😡😡😡 !!!"))
    assert "describe it in words" in refused and "add a photo" not in refused
    assert "add a photo" in texts(await fang.send("The printer on 3F jams"))
    kept = texts(await fang.send("It has been broken since Monday"))
    assert "added that to your description" in kept and "Please send a photo" not in kept
    assert "Where in the library" in texts(await fang.press("Skip"))
    await fang.press("3F Social Sciences reading area")
    await fang.press("Show my name")
    filed = await ticket(bot_env)
    assert filed.text == "The printer on 3F jams\nIt has been broken since Monday"


async def test_in_chinese_too(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    ming = await watch(bot_env, 1201, language_code="zh")
    await ming.send("/complain")
    await ming.press("设施与设备")
    assert "请用文字描述" in texts(await ming.send("👍🏻🎉"))
    await ming.send("三层的打印机卡纸")
    assert "已将这段文字补充到您的描述中" in texts(await ming.send("周一就坏了"))
    await ming.send_photo(caption="卡纸位置")
    await ming.press("与地点无关")
    await ming.press("显示我的姓名")
    filed = await ticket(bot_env)
    assert filed.text == "三层的打印机卡纸\n周一就坏了\n卡纸位置" and filed.photo_file_id
