"""Interlibrary loan end to end: the real bot over HTTP through the emulator, as readers and as staff
in the staff chat and in private chats — a book loan and an article copy from submission to
completion or refusal, cancelling, forged and stale buttons, a restart mid-conversation, the
library's own holding, and /stats."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

import storage.catalog as catalog
from bot.embedded import STAFF_CHAT_ID, EmbeddedBot
from bot.emulator import Person
from bot.gate import FloodControl
from storage import ill
from storage.catalog import Item, Record
from storage.ill import IllEvent, IllRequest
from storage.people import Reader, Role, User, add_staff

READER, OTHER, STAFF, STAFF2 = 401, 402, 9001, 9003


def texts(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["text"] or m.get("caption") or "" for m in messages if m["from_bot"])


def containing(fragment: str) -> Any:
    return lambda m: fragment in (m["text"] or "")


def unhurried(env: EmbeddedBot) -> None:
    """Lift the per-person flood limit: a test walks a long form faster than any person types."""
    assert env.app is not None
    for handler in env.app.handlers.get(-1, []):
        if isinstance(handler.callback, FloodControl):
            handler.callback.limit = 10_000


async def start(env: EmbeddedBot) -> None:
    """Two readers with linked cards, two staff members; no flood limit."""
    async with env.db.session() as s:
        s.add_all([Reader(id=1, card_number="C0401", name="Wang Fang", pin_hash="x"),
                   Reader(id=2, card_number="C0402", name="Zhang Wei", pin_hash="x")])
        await s.flush()
        s.add(User(telegram_id=READER, first_name="Fang", telegram_language="en", reader_id=1))
        s.add(User(telegram_id=OTHER, first_name="Wei", telegram_language="en", reader_id=2))
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        await add_staff(s, STAFF2, Role.STAFF, "Chen Jie")
    env.emulator.started(READER, OTHER, STAFF, STAFF2)  # they pressed Start some time ago
    unhurried(env)


async def watch(env: EmbeddedBot, user_id: int, *, chat_id: int | None = None) -> Person:
    """A person whose chat is followed from now on (later pushes are seen by ``wait_for``)."""
    person = await env.person(user_id, chat_id=chat_id)
    person.quiet = 0.2  # every answer here is one message or edit (pushes are awaited with wait_for)
    await person.__aenter__()
    return person


async def request_row(env: EmbeddedBot, request_id: int = 1) -> IllRequest:
    async with env.db.session() as s:
        row = await ill.get_request(s, request_id)
        assert row is not None
        return row


async def count_requests(env: EmbeddedBot) -> int:
    async with env.db.session() as s:
        return int(await s.scalar(select(func.count()).select_from(IllRequest)) or 0)


def in_days(env: EmbeddedBot, days: int) -> str:
    return (env.now().astimezone(env.settings.tz).date() + dt.timedelta(days=days)).isoformat()


async def quick_loan(person: Person, title: str) -> str:
    """A loan request with only what is required; the bot's answer to Submit."""
    await person.send("/ill")
    await tap(person, "📖 Loan of a book")
    await person.send(title)
    for label in ("Skip ›", "Skip ›", "Skip ›", "Skip ›", "No particular date ›", "Main Library", "Skip ›"):
        await tap(person, label)  # author, identifier, publisher, year, needed-by date, branch, note
    return texts(await tap(person, "📨 Submit"))


async def settled(person: Person, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A press is answered at once and its message edited just after: wait for that message too."""
    return found or await person.wait_for()


async def tap(person: Person, label: str) -> list[dict[str, Any]]:
    """Press the button with this label; the bot messages it brought."""
    return await settled(person, await person.press(label))


async def arrived(person: Person, predicate: Any) -> dict[str, Any]:
    """The newest bot message matching ``predicate``, waiting for it if it has not come yet."""
    found = [m for m in person.bot_messages() if predicate(m)]
    return found[-1] if found else (await person.wait_for(predicate))[-1]


def _has(person: Person, label: str) -> bool:
    last = person.last_message() or {}
    return any(b.get("text") == label for row in last.get("buttons") or [] for b in row)


async def test_book_loan_from_submission_to_completion_and_rating(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID)
    chen_in_group = await watch(bot_env, STAFF2, chat_id=STAFF_CHAT_ID)
    fang = await watch(bot_env, READER)

    asked = texts(await fang.send("/ill 9787108009821"))
    assert "step 1 of 9" in asked and "Loan of a book" in asked
    assert "title" in texts(await tap(fang, "📖 Loan of a book"))
    assert "at most 500 characters, please (you sent 5000)" in texts(await fang.send("x" * 5000))
    assert "cannot be skipped" in texts(await fang.send("skip"))
    assert "author" in texts(await fang.send("万历十五年"))
    await fang.send("黄仁宇")
    assert _has(fang, "Keep: ISBN 978-7-108-00982-1")  # from /ill ISBN
    assert "wrong check digit" in texts(await fang.send("978-7-108-00982-0"))
    assert "publisher" in texts(await tap(fang, "Keep: ISBN 978-7-108-00982-1"))
    assert "ISBN" in texts(await tap(fang, "‹ Back"))  # one step back, the value kept
    assert "publisher" in texts(await tap(fang, "Keep: ISBN 978-7-108-00982-1"))
    assert "year" in texts(await tap(fang, "Skip ›"))
    assert "date" in texts(await fang.send("1997年"))
    assert "not a date in the calendar" in texts(await fang.send("2026-02-30"))
    assert "has passed" in texts(await fang.send(in_days(bot_env, -1)))
    assert "pick it up" in texts(await fang.send(in_days(bot_env, 30)))
    assert "Anything else" in texts(await tap(fang, "East Branch"))
    summary = texts(await tap(fang, "Skip ›"))
    assert "万历十五年" in summary and "ISBN 978-7-108-00982-1" in summary and "East Branch" in summary
    assert "1997" in summary and in_days(bot_env, 30) in summary and "already have" not in summary

    await tap(fang, "✏️ Edit")
    assert "year" in texts(await tap(fang, "Year")) and _has(fang, "Keep: 1997")
    summary = texts(await fang.send("1998"))  # straight back to the summary
    assert "1998" in summary and "Submit" in str(fang.last_message())
    summary_message = fang.last_message()
    assert summary_message is not None
    assert "ILL-000001" in texts(await tap(fang, "📨 Submit"))
    # Submit again on the same summary: one request only.
    submit_data = f"illf:submit:{summary_message['buttons'][0][0]['callback_data'].split(':')[-1]}"
    await fang.press_data(summary_message["message_id"], submit_data)
    assert "already sent as ILL-000001" in (fang.last_callback_answer or {}).get("text", "")
    assert await count_requests(bot_env) == 1

    alert = (await group.wait_for(containing("ILL-000001")))[-1]
    assert "万历十五年" in alert["text"] and "Wang Fang (C0401)" in alert["text"]
    assert [b["callback_data"] for b in alert["buttons"][0]] == ["illmv:1:submitted:in_review", "illun:1:submitted"]
    await group.press_data(alert["message_id"], "illmv:1:submitted:in_review")
    assert "being reviewed" in texts(await fang.wait_for(containing("being reviewed")))
    # A second staff member pressing the same (now stale) button is told what happened.
    await chen_in_group.press_data(alert["message_id"], "illmv:1:submitted:in_review")
    assert "changed meanwhile" in (chen_in_group.last_callback_answer or {}).get("text", "")

    asked = await settled(group, await group.press_data(alert["message_id"], "illpt:1:in_review"))
    assert "Which partner library" in texts(asked)
    card = texts(await group.send("Peking University Library"))
    assert "Requested from a partner library" in card and "Peking University Library" in card
    assert "Peking University Library" in texts(await fang.wait_for(containing("has been sent to")))
    card_message = group.last_message()
    assert card_message is not None
    for data, notice in [("illmv:1:requested:received", "has arrived"), ("illmv:1:received:available", "ready for pick-up"),
                         ("illmv:1:available:completed", "is completed")]:
        await group.press_data(card_message["message_id"], data)
        assert notice in texts(await fang.wait_for(containing(notice)))
    assert "East Branch" in texts([m for m in fang.bot_messages() if "ready for pick-up" in (m["text"] or "")])
    rating = fang.last_message()
    assert rating is not None and [b["text"] for b in rating["buttons"][0]] == ["1", "2", "3", "4", "5"]
    assert "★★★★★" in texts(await tap(fang, "5"))
    await fang.press_data(rating["message_id"], "illrt:1:1")
    assert "already rated" in (fang.last_callback_answer or {}).get("text", "")

    row = await request_row(bot_env)
    assert (row.status, row.rating, row.partner, row.handled_by, row.year) == ("completed", 5, "Peking University Library", STAFF, "1998")
    async with bot_env.db.session() as s:
        events = await ill.history(s, 1)
    assert [(e.to_status, e.actor) for e in events] == [
        ("submitted", READER), ("in_review", STAFF), ("requested", STAFF), ("received", STAFF),
        ("available", STAFF), ("completed", STAFF),
    ]
    listing = texts(await fang.send("/requests"))
    assert "ILL-000001" in listing and "Completed" in listing


async def test_article_copy_across_a_restart_then_unfilled(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    fang = await watch(bot_env, READER)
    li = await watch(bot_env, STAFF)

    await fang.send("/ill")
    assert "step 2 of 14" in texts(await tap(fang, "📄 Copy of an article or chapter"))
    assert "wrote the article" in texts(await fang.send("Observation of Bose–Einstein condensation"))
    await tap(fang, "Skip ›")
    assert "not a DOI" in texts(await fang.send("doi: 11.1038/nphys1170"))
    assert "journal" in texts(await fang.send("https://doi.org/10.1038/nphys1170"))
    assert "volume" in texts(await fang.send("Nature Physics"))
    await fang.send("5")

    await bot_env.restart()  # the process restarts in the middle of the form
    unhurried(bot_env)

    assert "pages" in texts(await fang.send("1"))  # the issue: the conversation carried on
    assert "like 45-67" in texts(await fang.send("some of them"))
    assert "publisher" in texts(await fang.send("pp. 45–67"))
    await tap(fang, "Skip ›")
    await fang.send("2009")
    await tap(fang, "No particular date ›")
    await tap(fang, "Main Library")
    assert "Copyright declaration" in texts(await fang.send("PDF is fine"))
    assert "choose with the buttons" in texts(await fang.send("ok"))
    summary = texts(await tap(fang, "✅ I accept"))
    for part in ("Nature Physics", "45-67", "DOI 10.1038/nphys1170", "accepted", "PDF is fine", "Main Library"):
        assert part in summary
    assert "ILL-000001" in texts(await tap(fang, "📨 Submit"))
    row = await request_row(bot_env)
    assert (row.kind, row.journal, row.volume, row.issue, row.pages, row.doi) == ("copy", "Nature Physics", "5", "1", "45-67", "10.1038/nphys1170")
    assert row.copyright_accepted_at is not None and row.need_before is None

    queue = texts(await li.send("/illqueue"))
    assert "ILL-000001" in queue and "1 open" in queue
    card = texts(await tap(li, "ILL-000001"))
    assert "Observation of Bose–Einstein condensation" in card and "Nature Physics" in card and "History" in card
    assert "Why can" in texts(await tap(li, "✖️ Unfilled…"))
    card = texts(await tap(li, "Copyright does not allow it"))
    assert "Could not be supplied" in card
    assert "copyright law does not allow" in texts(await fang.wait_for(containing("could not be supplied")))
    await li.press_data(li.last_message()["message_id"], "illmv:1:unfilled:completed")  # type: ignore[index]
    assert "is closed" in (li.last_callback_answer or {}).get("text", "")
    assert "nothing open" in texts(await li.send("/illqueue"))
    assert (await request_row(bot_env)).unfilled_reason == "copyright"


async def test_cancelling_forged_buttons_and_duplicates(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    group = await watch(bot_env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(bot_env, READER)
    wei = await watch(bot_env, OTHER)
    assert "ILL-000001" in await quick_loan(fang, "Orientalism")

    # Another reader forges the cancel button of someone else's request; a reader forges a staff move.
    assert "no interlibrary loan requests" in texts(await wei.send("/requests"))
    await wei.press_data(wei.last_message()["message_id"], "illcy:1")  # type: ignore[index]
    assert "not your request" in (wei.last_callback_answer or {}).get("text", "")
    await fang.press_data(fang.last_message()["message_id"], "illmv:1:submitted:in_review")  # type: ignore[index]
    assert "only for library staff" in (fang.last_callback_answer or {}).get("text", "")
    assert (await request_row(bot_env)).status == "submitted"

    # The same title again is flagged before submission.
    await fang.send("/ill")
    await tap(fang, "📖 Loan of a book")
    await fang.send("orientalism")
    for label in ("Skip ›", "Skip ›", "Skip ›", "Skip ›", "No particular date ›", "Main Library"):
        await tap(fang, label)
    summary = texts(await tap(fang, "Skip ›"))
    assert "already have an open request for this: ILL-000001 (Submitted)" in summary
    assert "not sent" in texts(await tap(fang, "Cancel"))
    await fang.press_data(fang.last_message()["message_id"], "illf:back:note")  # type: ignore[index]
    assert "form is closed" in (fang.last_callback_answer or {}).get("text", "")

    listing = texts(await fang.send("/requests"))
    assert "ILL-000001" in listing and "Submitted" in listing
    assert "Cancel request" in texts(await tap(fang, "Cancel ILL-000001"))
    assert "is cancelled" in texts(await tap(fang, "Yes, cancel it"))
    assert "ILL-000001" in texts(await group.wait_for(containing("取消")))  # the staff chat is told (in Chinese)
    assert (await request_row(bot_env)).status == "cancelled"

    # Too late to cancel once it was requested from a partner.
    assert "ILL-000002" in await quick_loan(fang, "Culture and Imperialism")
    async with bot_env.db.session() as s:
        for target, extra in [(ill.IllStatus.IN_REVIEW, {}), (ill.IllStatus.REQUESTED, {"partner": "CALIS"})]:
            moved = await ill.move_request(s, 2, target, actor=STAFF, staff=True, now=bot_env.now(),
                                           policy=bot_env.policy, **extra)
            assert moved.ok
    await fang.send("/requests")
    await fang.press_data(fang.last_message()["message_id"], "illcy:2")  # type: ignore[index]
    assert "can no longer be cancelled" in (fang.last_callback_answer or {}).get("text", "")
    assert (await request_row(bot_env, 2)).status == "requested"
    async with bot_env.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(IllEvent).where(IllEvent.request_id == 2)) == 3


async def test_the_library_holding_is_shown_instead(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    async with bot_env.db.session() as s:
        record = Record(control_number="R1", title="万历十五年", author="黄仁宇", year="1997",
                        isbns=["9787108009821"], call_number="K248.3/12")
        s.add(record)
        await s.flush()
        s.add(Item(barcode="B0001", record_id=record.id, status="available"))
        if hasattr(catalog, "RecordIdentifier"):  # the catalog's own ISBN index, in builds that have one
            s.add(catalog.RecordIdentifier(record_id=record.id, kind="isbn", value="9787108009821"))
    fang = await watch(bot_env, READER)
    shown = texts(await fang.send("/ill 9787108009821"))
    assert "already has this title" in shown and "K248.3/12" in shown and "1 of 1 copies on the shelf" in shown
    assert "/search" in texts(await tap(fang, "Fine, I'll use the library's copy"))
    assert await count_requests(bot_env) == 0

    # "Request by ILL" after a search: the search words come prefilled as the title.
    assert bot_env.app is not None
    bot_env.app.user_data[READER]["ill_prefill"] = "A book nobody has"
    await settled(fang, await fang.press_data(fang.last_message()["message_id"], "ill:new"))  # type: ignore[index]
    await tap(fang, "📖 Loan of a book")
    assert _has(fang, "Keep: A book nobody has")


async def test_stats_for_staff_with_chart_and_csv(bot_env: EmbeddedBot) -> None:
    await start(bot_env)
    async with bot_env.db.session() as s:
        await ill.seed_demo(s, bot_env.policy, bot_env.now(), __import__("random").Random(3), [READER])
    li = await watch(bot_env, STAFF)
    fang = await watch(bot_env, READER)
    assert "only for library staff" in texts(await fang.send("/stats"))
    assert "not a date" in texts(await li.send("/stats 2026-02-30"))
    assert "must not be after" in texts(await li.send("/stats 2026-11-30 2026-11-01"))
    assert "cover dates from 2000-01-01 to 2099-12-31" in texts(await li.send("/stats 0001-01-01 9999-12-31"))
    report = texts(await li.send("/stats"))
    assert "Fill rate: 66.7% (2 filled of 3 decided)" in report and "Satisfaction: 5.00 / 5 (n = 1)" in report
    chart = await arrived(li, lambda m: bool(m["photo"]))
    assert "per week by outcome" in (chart["caption"] or "")
    await tap(li, "⬇️ Numbers as CSV")
    document = (await arrived(li, lambda m: bool(m["document"])))["document"]
    assert document["file_name"].endswith(".csv")
