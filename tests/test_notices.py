"""The daily notice cycle: who gets a digest and what is in it, the staff digest with its CSV, and
idempotence (a rerun, a restart, two processes at once)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io

from sqlalchemy import func, select

from bot.i18n import t
from storage import circulation as circ
from storage.catalog import Item
from storage.circulation import Hold, HoldStatus, Loan
from storage.db import Database
from storage.notices import (
    REMINDER_CHOICES,
    _queue_digests,
    level_bands,
    reminder_days_of,
    run_notice_cycle,
    set_reminder_days,
)
from storage.outbox import Delivery, enqueue
from storage.policy import Policy
from tests.circ_helpers import card, outbox, title

TZ = circ.DEFAULT_TZ
DAY = dt.date(2025, 3, 10)
NOW = dt.datetime(2025, 3, 10, 0, 0, tzinfo=dt.UTC)  # 08:00 in Shanghai
POLICY = Policy()
STAFF_CHAT = -100500


async def loan_due(db: Database, reader_id: int, control: str, days_from_today: int, name: str | None = None) -> None:
    """A loan of a new title, due ``days_from_today`` days after DAY (negative: overdue)."""
    async with db.session() as s:
        record = await title(s, control, name or f"Title {control}")
        item = await s.scalar(select(Item).where(Item.record_id == record.id))
        assert item is not None
        item.status = "on_loan"
        due = circ.end_of_day(DAY + dt.timedelta(days=days_from_today), TZ)
        s.add(Loan(item_id=item.id, reader_id=reader_id, checked_out_at=due - dt.timedelta(days=30), due_at=due))


async def cycle(db: Database, **kwargs: object) -> circ.Any:
    return await run_notice_cycle(db, POLICY, DAY, TZ, render=t, now=NOW, staff_chat_id=STAFF_CHAT, **kwargs)  # type: ignore[arg-type]


async def test_digest_lists_due_soon_and_overdue_levels_only(db: Database) -> None:
    async with db.session() as s:
        reader = await card(s, "C1", telegram_id=101, reminder_days=3)
    for control, days in (("DUE3", 3), ("DUE1", 1), ("DUE2", 2), ("DUE0", 0), ("LATE1", -1), ("LATE5", -5),
                          ("LATE7", -7), ("LATE14", -14), ("LATE15", -15)):
        await loan_due(db, reader.id, control, days)
    report = await cycle(db)
    assert report.digests_queued == 1 and report.readers_notified == 1
    assert report.due_soon == 2 and report.overdue_notices == 3 and report.overdue_total == 5
    async with db.session() as s:
        [digest] = await outbox(s, 101)
    assert digest.text_key == "loans.digest" and digest.dedupe_key == f"digest:{DAY}:{reader.id}:101"
    assert digest.priority == 30
    body = digest.params["body"]["en"]
    for shown in ("DUE3", "DUE1", "LATE1", "LATE7", "LATE14"):
        assert f"({shown}-1)" in body
    for hidden in ("DUE2", "DUE0", "LATE5", "LATE15"):
        assert f"({hidden}-1)" not in body
    assert "14 days overdue</b>, fine ¥1.40" in body
    assert "due <b>2025-03-13</b> (in 3 days)" in body
    zh = digest.params["body"]["zh"]
    assert "已逾期 7 天" in zh and "即将到期" in zh
    assert digest.buttons == [[["loans.btn_my_loans", "loans:show"]]]
    rendered = t("en", digest.text_key, **{"body": digest.params["body"]["en"]})
    assert rendered.startswith("🔔 <b>Library reminders</b>")


async def test_reminder_choice_changes_the_due_soon_days(db: Database) -> None:
    async with db.session() as s:
        off = await card(s, "OFF", telegram_id=100, reminder_days=0)
        one = await card(s, "ONE", telegram_id=101, reminder_days=1)
        week = await card(s, "WEEK", telegram_id=107, reminder_days=7)
    for reader, prefix in ((off, "O"), (one, "A"), (week, "W")):
        for days in (7, 3, 1):
            await loan_due(db, reader.id, f"{prefix}{days}", days)
    await loan_due(db, off.id, "OLATE", -1)
    await cycle(db)
    async with db.session() as s:
        [o] = await outbox(s, 100)
        [a] = await outbox(s, 101)
        [w] = await outbox(s, 107)
    assert "O7-1" not in o.params["body"]["en"] and "O1-1" not in o.params["body"]["en"]
    assert "OLATE-1" in o.params["body"]["en"]  # overdue notices come even with reminders off
    assert "A1-1" in a.params["body"]["en"] and "A3-1" not in a.params["body"]["en"]
    assert all(f"W{d}-1" in w.params["body"]["en"] for d in (7, 3, 1))


async def test_nothing_to_say_means_no_message(db: Database) -> None:
    async with db.session() as s:
        quiet = await card(s, "C1", telegram_id=101)
        await card(s, "NOLINK")  # not on Telegram
    await loan_due(db, quiet.id, "X", 10)
    report = await cycle(db)
    assert report.digests_queued == 0
    async with db.session() as s:
        assert await outbox(s, 101) == []


async def test_hold_waiting_and_about_to_expire(db: Database) -> None:
    async with db.session() as s:
        soon = await card(s, "SOON", telegram_id=101)
        later = await card(s, "LATER", telegram_id=102)
        for reader, control, deadline in ((soon, "H1", DAY + dt.timedelta(days=1)), (later, "H2", DAY + dt.timedelta(days=5))):
            record = await title(s, control, f"Held {control}")
            item = await s.scalar(select(Item).where(Item.record_id == record.id))
            assert item is not None
            item.status = "on_hold_shelf"
            s.add(Hold(record_id=record.id, reader_id=reader.id, pickup_branch="east", status=HoldStatus.READY,
                       placed_at=NOW, item_id=item.id, ready_at=NOW, expires_at=circ.end_of_day(deadline, TZ)))
    await loan_due(db, later.id, "LATE", -7)
    await cycle(db)
    async with db.session() as s:
        [expiring] = await outbox(s, 101)
        [other] = await outbox(s, 102)
    assert "collect by 2025-03-11" in expiring.params["body"]["en"]
    assert "East Branch" in expiring.params["body"]["en"] and "东区分馆" in expiring.params["body"]["zh"]
    # A hold far from its deadline does not trigger a digest, but is listed when one is sent anyway.
    assert "Held H2: at East Branch until 2025-03-15" in other.params["body"]["en"]


async def test_rerun_restart_and_two_processes_send_nothing_twice(db: Database) -> None:
    async with db.session() as s:
        readers = [await card(s, f"C{n}", telegram_id=100 + n) for n in range(5)]
    for n, reader in enumerate(readers):
        await loan_due(db, reader.id, f"L{n}", -1)
    first, second = await asyncio.gather(cycle(db), cycle(db))
    assert first.digests_queued + second.digests_queued == 5
    third = await cycle(db)
    assert third.digests_queued == 0 and third.digests_already_sent == 5
    assert third.staff_digest == "already queued earlier"
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.chat_id > 0)) == 5
        assert await s.scalar(select(func.count()).select_from(Delivery).where(Delivery.chat_id == STAFF_CHAT)) == 1
    # The next day is a new day.
    nxt = await run_notice_cycle(db, POLICY, DAY + dt.timedelta(days=6), TZ, render=t, now=NOW)
    assert nxt.digests_queued == 5  # 7 days overdue


async def test_unreachable_and_multi_device_readers(db: Database) -> None:
    async with db.session() as s:
        blocked = await card(s, "BLK", telegram_id=101)
        shared = await card(s, "TWO", telegram_id=102)
        from storage.people import User

        s.add(User(telegram_id=103, reader_id=shared.id))
        user = await s.get(User, 101)
        assert user is not None
        user.unreachable = True
    await loan_due(db, blocked.id, "B", -1)
    await loan_due(db, shared.id, "S", 1)
    report = await cycle(db)
    # The reader who blocked the bot (or never pressed Start) is skipped, and counted for the staff.
    assert report.digests_queued == 2 and report.skipped_unreachable == 1 and report.readers_unreachable == 1
    async with db.session() as s:
        assert {d.chat_id for d in await outbox(s, key="loans.digest")} == {102, 103}
        [staff] = await outbox(s, STAFF_CHAT)
    assert "Readers with loans the bot cannot reach (never pressed Start, or blocked the bot): 1" in staff.params["body"]["en"]
    assert "机器人无法联系的读者" in staff.params["body"]["zh"]


async def test_staff_digest_counts_levels_lists_serious_and_attaches_csv(db: Database) -> None:
    async with db.session() as s:
        a = await card(s, "A1", telegram_id=101, name="Li <Lei>")
        b = await card(s, "B2", name="Bob")
    for n, days in enumerate((1, 3, 7, 13, 14, 20, 40)):
        await loan_due(db, (a if n % 2 else b).id, f"O{days}", -days, name=f"Overdue {days} & more")
    await loan_due(db, a.id, "FINE", 5)
    await cycle(db)
    async with db.session() as s:
        [staff] = await outbox(s, STAFF_CHAT)
    assert staff.kind == "alert" and staff.dedupe_key == f"staff-digest:{DAY}"
    en = staff.params["body"]["en"]
    assert "Overdue loans on 2025-03-10</b>: 7" in en
    assert "• 1–6 days: 2" in en and "• 7–13 days: 2" in en and "• 14+ days: 3" in en
    assert "Overdue 14 days or more: 3" in en
    assert "• Overdue 20 &amp; more · O20-1 · card A1 Li &lt;Lei&gt; · 20 d" in en
    assert en.index("O40-1") < en.index("O20-1") < en.index("O14-1")
    assert "O13-1" not in en
    assert staff.document_name == "overdue-2025-03-10.csv"
    assert staff.document is not None
    rows = list(csv.DictReader(io.StringIO(staff.document.decode("utf-8-sig"))))
    assert len(rows) == 7
    assert rows[0] == {"barcode": "O40-1", "title": "Overdue 40 & more", "card_number": "B2",
                       "reader_name": "Bob", "due_date": "2025-01-29", "days_overdue": "40", "fine": "4.00"}
    assert "FINE-1" not in staff.document.decode("utf-8-sig")


async def test_staff_caption_fits_telegram(db: Database) -> None:
    async with db.session() as s:
        reader = await card(s, "A1", name="A reader with a rather long name")
    for n in range(60):
        await loan_due(db, reader.id, f"LONG{n:03d}", -20 - n, name="A very long title " * 5)
    await cycle(db)
    async with db.session() as s:
        [staff] = await outbox(s, STAFF_CHAT)
    for lang in ("en", "zh"):
        caption = t(lang, staff.text_key, body=staff.params["body"][lang])
        assert len(caption) <= 1024
        assert "CSV" in caption


async def test_no_staff_chat_no_staff_digest(db: Database) -> None:
    async with db.session() as s:
        reader = await card(s, "A1")
    await loan_due(db, reader.id, "L", -14)
    report = await run_notice_cycle(db, POLICY, DAY, TZ, render=t, now=NOW)
    assert report.staff_digest == "no staff chat configured"
    assert report.lines()[0] == "notice cycle for 2025-03-10:"


async def test_many_items_are_cut_with_a_pointer_to_loans(db: Database) -> None:
    async with db.session() as s:
        reader = await card(s, "A1", telegram_id=101)
    for n in range(20):
        await loan_due(db, reader.id, f"M{n:02d}", 1)
    await cycle(db)
    async with db.session() as s:
        [digest] = await outbox(s, 101)
    assert "… and 5 more (see /loans)" in digest.params["body"]["en"]


async def test_cycle_expires_holds_and_purges_history(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R", "Wanted")
        await card(s, "OWN")
        first = await card(s, "FIRST", telegram_id=101)
        second = await card(s, "SECOND", telegram_id=102)
    async with db.session() as s:
        await circ.checkout(s, "R-1", "OWN", POLICY, NOW - dt.timedelta(days=60), TZ)
        await circ.place_hold(s, first.id, record.id, POLICY, NOW - dt.timedelta(days=59), TZ)
        await circ.place_hold(s, second.id, record.id, POLICY, NOW - dt.timedelta(days=58), TZ)
        await circ.checkin(s, "R-1", POLICY, NOW - dt.timedelta(days=40), TZ)
    report = await cycle(db)
    assert report.holds_expired == 1 and report.loans_purged == 1
    async with db.session() as s:
        statuses = dict((await s.execute(select(Hold.reader_id, Hold.status))).all())
        assert statuses == {first.id: HoldStatus.EXPIRED, second.id: HoldStatus.READY}
        assert await s.scalar(select(func.count()).select_from(Loan)) == 0
        assert len(await outbox(s, 102, "loans.hold_ready_notice")) == 1


async def test_reminder_setting(db: Database) -> None:
    async with db.session() as s:
        await card(s, "A1", telegram_id=101)
    async with db.session() as s:
        assert await reminder_days_of(s, 101) == 3
        assert await set_reminder_days(s, 101, 7)
        assert not await set_reminder_days(s, 101, 5)  # not offered: a forged button
        assert not await set_reminder_days(s, 999, 1)  # nobody
    async with db.session() as s:
        assert await reminder_days_of(s, 101) == 7
    assert REMINDER_CHOICES == (0, 1, 3, 7)


def test_level_bands() -> None:
    assert level_bands([1, 7, 14]) == [(1, 6), (7, 13), (14, None)]
    assert level_bands([3]) == [(3, None)]


async def test_no_overdue_loans_no_staff_digest(db: Database) -> None:
    async with db.session() as s:
        reader = await card(s, "A1", telegram_id=101)
    await loan_due(db, reader.id, "L", 1)
    report = await cycle(db)
    assert report.staff_digest == "nothing overdue, not sent" and report.digests_queued == 1
    async with db.session() as s:
        assert await outbox(s, STAFF_CHAT) == []


async def test_digests_are_queued_in_batches_and_a_key_queued_meanwhile_is_left_out(db: Database) -> None:
    async with db.session() as s:
        readers = [await card(s, f"B{n}", telegram_id=300 + n) for n in range(4)]
    for n, reader in enumerate(readers):
        await loan_due(db, reader.id, f"B{n}", -1)
    # Another run queued the first reader's digest already.
    async with db.session() as s:
        await enqueue(s, 300, "loans.digest", {"body": {"en": "x", "zh": "x"}},
                      dedupe_key=f"digest:{DAY.isoformat()}:{readers[0].id}:300")
    report = await cycle(db)
    assert (report.digests_queued, report.digests_already_sent) == (3, 1)
    # A batch whose insert is refused (here: the same key twice) falls back to one row at a time.
    key = f"digest:{DAY.isoformat()}:race"
    params = {"body": {"en": "y", "zh": "y"}}
    assert await _queue_digests(db, [(401, key, params), (402, key, params)]) == 1
    async with db.session() as s:
        rows = (await s.execute(select(Delivery.chat_id, Delivery.dedupe_key).where(Delivery.chat_id > 0))).all()
    keys = [k for _, k in rows]
    assert len(keys) == len(set(keys)) == 5
    assert sorted(c for c, _ in rows) == [300, 301, 302, 303, 401]
