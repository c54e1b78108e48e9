"""What a duty officer and the staff met in an emergency (#20), end to end through the emulator:
editing one language marks the other as the template (in the draft and the preview), the staff's
answer shows on their copy with its time, "Need help" says what was actually done, the all-clear
can be edited, a staff member is told a command is for duty officers, and a reported incident is
closed with a note the reporter reads."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

from bot.embedded import EmbeddedBot
from storage.outbox import Delivery
from tests.test_broadcast_e2e import (
    DUTY,
    READERS_EN,
    READERS_ZH,
    STAFF,
    STAFF_ZH,
    finished,
    latest,
    setup,
    watch,
)


async def test_edits_answers_help_and_an_editable_all_clear(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    staff = await watch(bot_env, STAFF)
    staff_zh = await watch(bot_env, STAFF_ZH, language_code="zh")
    reader_en = await watch(bot_env, READERS_EN[0])
    reader_zh = await watch(bot_env, READERS_ZH[0], language_code="zh")

    await duty.send("/emergency")
    await duty.press("Fire")
    drafted = await duty.press("3F Social Sciences reading area")
    assert "still the template" not in drafted[-1]["text"]
    await duty.press("✏️ Edit 中文")
    shown = await duty.send("火警：三层起火，请经东侧楼梯撤离，到南门广场集合。")
    assert "南门广场" in shown[-1]["text"]
    assert "<b>English</b> ⚠️ still the template, not edited" in shown[-1]["text"]
    assert "Only the Chinese text was edited" in shown[-1]["text"]
    await duty.press("✅ Use this text")
    preview = await duty.press("Everyone (8)")
    assert "<b>English</b> ⚠️ still the template" in preview[-1]["text"]
    assert "<b>中文</b> ⚠️" not in preview[-1]["text"]
    await duty.press("📣 Send to 8 people")
    await latest(reader_zh, "南门广场")
    await finished(bot_env, duty, 1)

    # The answer and its time stay on the staff member's own copy (buttons kept: it may change).
    copy = await latest(staff, "FIRE at 3F")
    now = bot_env.now().astimezone(bot_env.services.tz).strftime("%H:%M")
    await staff.press("✅ Received")
    answered = [m for m in staff.bot_messages() if m["message_id"] == copy["message_id"]][0]
    assert "Your answer: ✅ Received · " in answered["text"] and "FIRE at 3F" in answered["text"]
    assert answered["text"].split("Your answer: ✅ Received · ")[1][:5] >= now
    assert [b["text"] for b in answered["buttons"][0]] == ["✅ Received", "🟢 I'm safe", "🆘 Need help"]
    zh_copy = await latest(staff_zh, "南门广场")
    await staff_zh.press("🟢 我平安")
    answered_zh = [m for m in staff_zh.bot_messages() if m["message_id"] == zh_copy["message_id"]][0]
    assert "您的回复：🟢 我平安 · " in answered_zh["text"]

    # "Need help" says what was done: a message to the duty officers, not "help is on its way".
    await staff.press("🆘 Need help")
    placed = await staff.press("2F Sciences reading area")
    said = placed[-1]["text"]
    assert "The duty officers have been sent a message that you need help at 2F Sciences reading area" in said
    assert "on its way" not in said
    await staff_zh.press("🆘 需要帮助")
    placed_zh = await staff_zh.press("二层 自然科学阅览区")
    assert "已向值班人员发送消息" in placed_zh[-1]["text"] and "救援正在赶来" not in placed_zh[-1]["text"]

    # The all-clear can be edited, language by language; the untouched one is marked.
    await duty.send("/allclear")
    await latest(duty, "All-clear for #1")
    await duty.press("✏️ Edit English")
    await latest(duty, "Send the new <b>English</b> text")
    await duty.send("ALL CLEAR: you may go back in. The east stairs stay closed until noon.")
    edited = await latest(duty, "east stairs stay closed")
    assert "<b>中文</b> ⚠️ still the template, not edited" in edited["text"] and "All-clear for #1" in edited["text"]
    await duty.press("✏️ Edit 中文")
    await duty.send("解除：可以返回馆内。东侧楼梯中午前仍关闭。")
    both = await latest(duty, "东侧楼梯中午前仍关闭")
    assert "still the template" not in both["text"]
    await duty.press("📣 Send all-clear to 8 people")
    await latest(reader_en, "east stairs stay closed until noon")
    await latest(reader_zh, "东侧楼梯中午前仍关闭")


async def test_a_staff_member_is_told_the_command_is_for_duty_officers(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    staff = await watch(bot_env, STAFF)
    staff_zh = await watch(bot_env, STAFF_ZH, language_code="zh")
    reader = await watch(bot_env, READERS_EN[0])
    for command in ("/emergency", "/allclear", "/incidents"):
        assert "only for the duty officers" in (await staff.send(command))[-1]["text"]
        said = (await staff_zh.send(command))[-1]["text"]
        assert "仅供值班人员使用" in said and "仅供图书馆工作人员使用" not in said
    assert "only for library staff" in (await reader.send("/emergency"))[-1]["text"]


async def test_a_reported_incident_is_closed_with_a_note_the_reporter_reads(bot_env: EmbeddedBot) -> None:
    await setup(bot_env)
    duty = await watch(bot_env, DUTY)
    reporter = await watch(bot_env, READERS_ZH[0], language_code="zh")
    await reporter.send("/report")
    await reporter.press("漏水")
    await reporter.press("二层 自然科学阅览区")
    await reporter.press("不附照片，直接发送")
    await latest(duty, "Water leak")

    await duty.send("/incidents")
    report = await duty.press("#1")
    assert "✅ Close with a note" in [b["text"] for row in report[-1]["buttons"] for b in row]
    asked = await duty.press("✅ Close with a note")
    assert "Closing incident #1" in asked[-1]["text"]
    done = await duty.send("A pipe above the window leaked; facilities fixed it and the floor is dry.")
    assert "Incident #1 is closed" in done[-1]["text"]
    told = await latest(reporter, "已处理完毕")
    assert "第 1 号报告（漏水）" in told["text"] and "facilities fixed it" in told["text"]

    await duty.send("/incidents")
    report = await duty.press("#1")
    text = report[-1]["text"]
    assert "Closing note: A pipe above the window leaked" in text and "closed" in text
    assert "✅ Close with a note" not in [b["text"] for row in report[-1]["buttons"] for b in row]
    bot_env.move_clock(dt.timedelta(hours=1))
    await bot_env.run_jobs()  # closed: no escalation of a report nobody took
    async with bot_env.db.session() as s:
        escalations = await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.text_key == "incidents.escalation"))
    assert escalations == 0
