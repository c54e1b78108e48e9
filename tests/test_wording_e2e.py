"""The Chinese wording a new user tripped over (#20), end to end through the emulator: /stats names
statuses as the rest of the bot does (the glossary), the ticket queue says how late in words, and
the opening hours use Chinese punctuation."""

from __future__ import annotations

import datetime as dt

from bot.embedded import EmbeddedBot
from handlers.tickets import labels
from storage.people import Role, User, add_staff
from storage.tickets import file_ticket
from tests.test_ill_e2e import READER, quick_loan, start

STAFF_ZH = 9011


async def test_stats_queue_and_hours_read_as_the_rest_of_the_bot_in_chinese(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    async with bot_env.db.session() as s:
        await add_staff(s, STAFF_ZH, Role.STAFF, "Wang Wei")
        s.add(User(telegram_id=STAFF_ZH, first_name="Wei", telegram_language="zh"))
    fang = await bot_env.person(READER)
    await fang.__aenter__()
    fang.quiet = 0.2
    assert "ILL-000001" in await quick_loan(fang, "A book nobody has")
    async with bot_env.db.session() as s:
        await file_ticket(s, READER, "facilities", "The lift is out of order", policy=bot_env.policy,
                          now=bot_env.now(), staff_chat_id=None, labels=labels())
    wei = await bot_env.person(STAFF_ZH, language_code="zh")
    await wei.__aenter__()
    stats = "\n".join(m["text"] or m.get("caption") or "" for m in await wei.send("/stats"))
    assert "已提交 1" in stats and "新提交 1" in stats and "设施与设备 1" in stats
    assert "办理周期（从提交到可领取）" in stats
    for old in ("可取/已发送", "未满足", "设施设备", "新建", "平均响应时间"):
        assert old not in stats, old

    bot_env.move_clock(dt.timedelta(hours=54, minutes=33))  # past the promised first answer
    queue = "\n".join(m["text"] or "" for m in await wei.send("/tickets"))
    assert "🔴 超时 " in queue and " 小时 " in queue and "+" not in queue

    hours = "\n".join(m["text"] or "" for m in await wei.send("/hours"))
    assert "：" in hours and not [line for line in hours.splitlines() if line.startswith("•") and ": " in line]
