"""Interlibrary loan with partner libraries over ISO 18626, end to end: the real bot polling the Bot
API emulator, its ``POST /iso18626`` endpoint and its sender on real HTTP, and partner libraries
(``tests.auxil.iso_partner``) that speak ISO 18626 as suppliers and as requesters and check every
message against the published schema.

Scenarios: a loan that goes round the rota (Unfilled → next partner) and comes back; every partner
declining; a copy; the reader cancelling (partner agrees, partner refuses); a partner down for a
while across a restart; the library lending to a partner; bad and unknown messages; a message
delivered twice; the figures per partner.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.embedded import STAFF_CHAT_ID, TOKEN, EmbeddedBot
from bot.emulator import Emulator, Person
from bot.ill_exchange import IllExchange
from bot.runner import _serve_webhook, start_bot, stop_bot
from bot.settings import Settings
from storage import ill
from storage.db import Database
from storage.ill_exchange import LendingRequest, PartnerAttempt, PartnerMessage
from storage.policy import Policy
from storage.stats import service_stats
from tests.auxil.iso_partner import PartnerLibrary, status_of, text
from tests.test_ill_e2e import READER, STAFF, containing, quick_loan, start, texts, watch
from tests.test_webhook_cli import _free_port

AGENCY = "ISIL:CN-990000-L"
DONGCHENG = ("ISIL:CN-110000-A", "东城区图书馆", "Dongcheng District Library")
XICHENG = ("ISIL:CN-110000-B", "西城区图书馆", "Xicheng District Library")


def partner_policy(*partners: tuple[PartnerLibrary, tuple[str, str, str]]) -> Policy:
    return Policy.model_validate({"ill": {"partners": [
        {"agency_id": ids[0], "name_zh": ids[1], "name_en": ids[2], "endpoint": lib.endpoint,
         "auth_header": "Bearer test-partner"}
        for lib, ids in partners
    ]}})


@pytest.fixture
async def partners() -> AsyncIterator[tuple[PartnerLibrary, PartnerLibrary]]:
    dongcheng, xicheng = PartnerLibrary(DONGCHENG[0], AGENCY), PartnerLibrary(XICHENG[0], AGENCY)
    await dongcheng.start()
    await xicheng.start()
    try:
        yield dongcheng, xicheng
    finally:
        await dongcheng.stop()
        await xicheng.stop()


@pytest.fixture
async def env(db: Database, partners: tuple[PartnerLibrary, PartnerLibrary]) -> AsyncIterator[EmbeddedBot]:
    dongcheng, xicheng = partners
    policy = partner_policy((dongcheng, DONGCHENG), (xicheng, XICHENG))
    bot = await EmbeddedBot.start(db, policy=policy, ill_agency_id=AGENCY, ill_listen="127.0.0.1:0")
    try:
        yield bot
    finally:
        await bot.stop()


def exchange(env: EmbeddedBot) -> IllExchange:
    assert env.app is not None
    running = env.app.bot_data["ill_exchange"]
    assert isinstance(running, IllExchange)
    return running


def message(person: Person, message_id: int) -> dict[str, Any]:
    return next(m for m in person.messages() if m["message_id"] == message_id)


def callback_data(msg: dict[str, Any]) -> list[str]:
    return [b.get("callback_data", "") for row in msg.get("buttons") or [] for b in row]


async def edited(person: Person, message_id: int, data: str) -> dict[str, Any]:
    """The message once it carries a button with this callback data (waiting for the edit)."""
    current = message(person, message_id)
    if data in callback_data(current):
        return current
    found = await person.wait_for(lambda m: m["message_id"] == message_id and data in callback_data(m))
    return found[-1]


async def eventually(check: Any, seconds: float = 30.0) -> None:
    """Wait until ``check()`` (async) is true."""
    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110 (the condition is another server's state: nothing to await)
            await asyncio.sleep(0.05)


async def request_status(env: EmbeddedBot, request_id: int = 1) -> str:
    async with env.db.session() as s:
        row = await ill.get_request(s, request_id)
        assert row is not None
        return row.status


async def sent_to_partners(env: EmbeddedBot, group: Person, number: str = "ILL-000001") -> int:
    """Staff take the new request and press Send to partners on its card; the card's message id."""
    request_id = int(number.split("-")[1])
    alert = (await group.wait_for(containing(number)))[-1]
    await group.press_data(alert["message_id"], f"illmv:{request_id}:submitted:in_review")
    # The press is answered first and the card edited just after: the card offers Send to partners.
    await edited(group, alert["message_id"], f"illsp:{request_id}:in_review")
    await group.press_data(alert["message_id"], f"illsp:{request_id}:in_review")
    assert "Sent to Dongcheng District Library" in (group.last_callback_answer or {}).get("text", "")
    return int(alert["message_id"])


async def submit_copy(env: EmbeddedBot) -> None:
    """A reader's article-copy request, made as the form makes it."""
    async with env.db.session() as s:
        result = await ill.submit_request(
            s, {"kind": "copy", "title": "Observation of Bose–Einstein condensation", "author": "Anderson",
                "journal": "Science", "volume": "269", "pages": "198-201", "pickup_branch": "main",
                "copyright": True, "doi": "10.1126/science.269.5221.198"},
            token="copy-1", telegram_id=READER, reader_id=1, now=env.now(), policy=env.policy,
            today=env.now().date(), staff_chat_id=STAFF_CHAT_ID,
        )
        assert result.created


async def test_a_loan_goes_round_the_rota_and_comes_back(
    env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]
) -> None:
    dongcheng, xicheng = partners
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    assert "ILL-000001" in await quick_loan(fang, "The Structure of Scientific Revolutions")
    card_id = await sent_to_partners(env, group)

    # The first partner of the rota gets an ISO 18626 request (checked against the schema on arrival).
    [request] = await dongcheng.wait_for(1, "request")
    assert request.get("header/requestingAgencyRequestId") == "ILL-000001"
    assert request.get("header/supplyingAgencyId/agencyIdValue") == "CN-110000-A"
    assert request.get("header/requestingAgencyId/agencyIdValue") == "CN-990000-L"
    assert request.get("bibliographicInfo/title") == "The Structure of Scientific Revolutions"
    assert request.get("serviceInfo/serviceType") == "Loan"
    assert "has been sent to" in texts(await fang.wait_for(containing("has been sent to")))

    # Unfilled: on to the next partner by itself, the staff chat told; delivered twice, it counts once.
    declined = dongcheng.supplying_message("ILL-000001", "Unfilled", reason="RequestResponse", unfilled="NotHeld")
    first = await dongcheng.post(exchange(env).url, declined)
    again = await dongcheng.post(exchange(env).url, declined)
    assert status_of(first) == status_of(again) == ("OK", "")
    assert text(first, "supplyingAgencyMessageConfirmation/reasonForMessage") == "RequestResponse"
    assert "西城区图书馆" in texts(await group.wait_for(containing("下一个合作馆")))  # the staff chat speaks zh
    await xicheng.wait_for(1, "request")
    await asyncio.sleep(0.5)  # anything sent twice would have arrived by now
    assert len(xicheng.of_kind("request")) == 1 and len(dongcheng.received) == 1
    assert await request_status(env) == "requested"

    # WillSupply is shown to staff; Loaned tells the reader it is on its way from that partner.
    await xicheng.post(exchange(env).url, xicheng.supplying_message("ILL-000001", "WillSupply", reason="RequestResponse"))
    assert "ILL-000001" in texts(await group.wait_for(containing("将提供")))
    await xicheng.post(exchange(env).url, xicheng.supplying_message("ILL-000001", "Loaned"))
    on_its_way = texts(await fang.wait_for(containing("has sent the book")))
    assert "Xicheng District Library" in on_its_way

    # Staff: received → Received to the partner; available; returned → ShippedReturn; LoanCompleted completes.
    await group.press_data(card_id, "illmv:1:requested:received")
    [received] = await xicheng.wait_for(1, "requestingAgencyMessage")
    assert received.get("action") == "Received"
    await group.press_data(card_id, "illmv:1:received:available")
    assert "ready for pick-up" in texts(await fang.wait_for(containing("ready for pick-up")))
    card = await edited(group, card_id, "illrp:1")
    assert "Xicheng District Library — sent it" in card["text"] and "declined (NotHeld)" in card["text"]
    await group.press_data(card_id, "illrp:1")
    shipped = await xicheng.wait_for(2, "requestingAgencyMessage")
    assert shipped[-1].get("action") == "ShippedReturn"
    done = await xicheng.post(exchange(env).url, xicheng.supplying_message("ILL-000001", "LoanCompleted"))
    assert status_of(done) == ("OK", "")
    assert "is completed" in texts(await fang.wait_for(containing("is completed")))
    assert await request_status(env) == "completed"

    async with env.db.session() as s:
        outgoing = list(await s.scalars(select(PartnerMessage).order_by(PartnerMessage.id)))
        report = await service_stats(s, None, None, env.settings.tz, env.now(), policy=env.policy)
    assert [(m.agency_id, m.summary, m.state) for m in outgoing] == [
        (DONGCHENG[0], "request", "sent"), (XICHENG[0], "request", "sent"), (XICHENG[0], "Received", "sent"),
        (XICHENG[0], "ShippedReturn", "sent"),
    ]
    figures = {f.agency_id: f for f in report.partners}
    assert (figures[DONGCHENG[0]].borrowed, figures[DONGCHENG[0]].borrowed_fill_rate) == (1, 0.0)
    assert (figures[XICHENG[0]].borrowed, figures[XICHENG[0]].borrowed_fill_rate) == (1, 1.0)
    assert "Xicheng District Library (ISIL:CN-110000-B) — as borrower: 1 requests, fill rate 100% (1/1)" in report.to_text("en")
    assert f"partners,borrowed_requests,{DONGCHENG[0]},1" in report.to_csv()
    li = await watch(env, STAFF)
    shown = texts(await li.send("/stats"))
    assert "合作馆" in shown or "Partner libraries" in shown


async def test_every_partner_declines(env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]) -> None:
    dongcheng, xicheng = partners
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    await quick_loan(fang, "乡土中国")
    card_id = await sent_to_partners(env, group)
    await dongcheng.wait_for(1, "request")
    await dongcheng.post(exchange(env).url, dongcheng.supplying_message(
        "ILL-000001", "Unfilled", reason="RequestResponse", unfilled="NotHeld"))
    await xicheng.wait_for(1, "request")
    await xicheng.post(exchange(env).url, xicheng.supplying_message(
        "ILL-000001", "Unfilled", reason="RequestResponse", unfilled="NotAvailableForILL", note="on loan"))
    told = texts(await fang.wait_for(containing("could not be supplied")))
    assert "ILL-000001" in told
    alert = texts(await group.wait_for(containing("所有合作馆均拒绝")))
    assert "NotHeld" in alert and "NotAvailableForILL — on loan" in alert
    assert await request_status(env) == "unfilled"
    # Send to partners is not offered again, and a forged press is refused.
    assert not any(d.startswith("illsp:") for d in callback_data(message(group, card_id)))
    await group.press_data(card_id, "illsp:1:in_review")
    assert "changed meanwhile" in (group.last_callback_answer or {}).get("text", "")
    async with env.db.session() as s:
        attempts = list(await s.scalars(select(PartnerAttempt).order_by(PartnerAttempt.position)))
    assert [(a.agency_id, a.state) for a in attempts] == [(DONGCHENG[0], "declined"), (XICHENG[0], "declined")]


async def test_a_copy_and_a_cancellation_the_partner_accepts_or_refuses(
    env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]
) -> None:
    dongcheng, _ = partners
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    await submit_copy(env)
    await sent_to_partners(env, group)
    [request] = await dongcheng.wait_for(1, "request")
    assert request.get("serviceInfo/serviceType") == "Copy"
    assert request.get("bibliographicInfo/titleOfComponent") == "Observation of Bose–Einstein condensation"
    assert request.get("bibliographicInfo/bibliographicItemId/bibliographicItemIdentifierCode") == "DOI"

    # The reader cancels while the partner has it: Cancel goes out; the partner refuses (it was sent).
    listing = await fang.send("/requests")
    assert any("illcx:1" in callback_data(m) for m in listing)
    await fang.press("Cancel ILL-000001")
    answered = texts(await fang.press("Yes, cancel it"))
    assert "asked them to cancel" in answered
    [cancel] = await dongcheng.wait_for(1, "requestingAgencyMessage")
    assert cancel.get("action") == "Cancel"
    await dongcheng.post(exchange(env).url, dongcheng.supplying_message(
        "ILL-000001", "WillSupply", reason="CancelResponse", answer="N"))
    assert "could not be cancelled" in texts(await fang.wait_for(containing("could not be cancelled")))
    assert await request_status(env) == "requested"
    await dongcheng.post(exchange(env).url, dongcheng.supplying_message("ILL-000001", "CopyCompleted"))
    assert "has sent the copy" in texts(await fang.wait_for(containing("has sent the copy")))

    # A second request; this time the partner agrees to cancel.
    await quick_loan(fang, "万历十五年")
    await sent_to_partners(env, group, "ILL-000002")
    await dongcheng.wait_for(2, "request")
    await fang.send("/requests")
    await fang.press("Cancel ILL-000002")
    await fang.press("Yes, cancel it")
    await dongcheng.wait_for(2, "requestingAgencyMessage")
    await dongcheng.post(exchange(env).url, dongcheng.supplying_message(
        "ILL-000002", "Cancelled", reason="CancelResponse", answer="Y"))
    assert "is cancelled, as you asked" in texts(await fang.wait_for(containing("as you asked")))
    assert await request_status(env, 2) == "cancelled"


async def test_a_partner_down_for_a_while_across_a_restart(
    env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]
) -> None:
    dongcheng, _ = partners
    dongcheng.down = True
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    await quick_loan(fang, "The Structure of Scientific Revolutions")
    await sent_to_partners(env, group)

    async def tried() -> bool:
        return dongcheng.refused_while_down >= 1
    await eventually(tried)
    async with env.db.session() as s:
        [queued] = list(await s.scalars(select(PartnerMessage)))
    assert queued.state == "pending" and queued.attempts >= 1 and "503" in queued.last_error
    # Nothing is tried again before the backoff has passed; after each backoff, one more attempt.
    exchange(env).wake()
    assert await exchange(env).send_due() == 0 and dongcheng.refused_while_down == 1
    for attempt in range(2, 6):
        env.move_clock(dt.timedelta(hours=1))
        exchange(env).wake()

        async def retried(n: int = attempt) -> bool:
            return dongcheng.refused_while_down >= n
        await eventually(retried)
    assert dongcheng.refused_while_down == 5
    assert "5" in texts(await group.wait_for(containing("未响应")))  # the staff chat hears of it once

    # The bot restarts while the partner is still down; nothing is lost.
    await env.restart()
    dongcheng.down = False
    env.move_clock(dt.timedelta(hours=2))  # past the backoff
    exchange(env).wake()
    [request] = await dongcheng.wait_for(1, "request")
    assert request.get("header/requestingAgencyRequestId") == "ILL-000001"
    await asyncio.sleep(0.5)
    async with env.db.session() as s:
        [delivered] = list(await s.scalars(select(PartnerMessage)))
    assert delivered.state == "sent" and len(dongcheng.received) == 1  # sent once, not twice

    # The partner answers through the restarted bot's endpoint.
    await dongcheng.post(exchange(env).url, dongcheng.supplying_message("ILL-000001", "Loaned"))
    assert "has sent the book" in texts(await fang.wait_for(containing("has sent the book")))


async def test_lending_to_a_partner(env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]) -> None:
    dongcheng, xicheng = partners
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)

    asked = dongcheng.request("DC-77", "Orientalism", author="Edward W. Said", isbn="9780394740676")
    confirmation = await dongcheng.post(exchange(env).url, asked)
    assert status_of(confirmation) == ("OK", "")
    assert text(confirmation, "requestConfirmation/confirmationHeader/requestingAgencyRequestId") == "DC-77"
    again = await dongcheng.post(exchange(env).url, asked)  # delivered twice: one lending request
    assert status_of(again) == ("OK", "")
    alert = (await group.wait_for(containing("借出请求 LEND-000001")))[-1]
    assert "Orientalism" in alert["text"] and "东城区图书馆" in alert["text"]
    assert "2027-01-31" in alert["text"]
    await group.press_data(alert["message_id"], "illlw:1:received")
    [will] = await dongcheng.wait_for(1, "supplyingAgencyMessage")
    assert (will.get("statusInfo/status"), will.get("messageInfo/reasonForMessage")) == ("WillSupply", "RequestResponse")
    assert will.get("header/requestingAgencyRequestId") == "DC-77"
    await group.press_data(alert["message_id"], "illll:1:will_supply")
    loaned = await dongcheng.wait_for(2, "supplyingAgencyMessage")
    assert loaned[-1].get("statusInfo/status") == "Loaned"
    await dongcheng.post(exchange(env).url, dongcheng.requesting_message("DC-77", "Received"))
    await dongcheng.post(exchange(env).url, dongcheng.requesting_message("DC-77", "ShippedReturn"))
    back = (await group.wait_for(containing("已寄还借出请求")))[-1]
    await group.press_data(back["message_id"], "illlc:1:returned")
    completed = await dongcheng.wait_for(3, "supplyingAgencyMessage")
    assert completed[-1].get("statusInfo/status") == "LoanCompleted"

    # Another partner's request: Unfilled with a reason; a third is cancelled by its partner first.
    await xicheng.post(exchange(env).url, xicheng.request("XC-1", "A book we do not have"))
    alert = (await group.wait_for(containing("LEND-000002")))[-1]
    await group.press_data(alert["message_id"], "illlu:2:received")
    await group.press_data(alert["message_id"], "illlr:2:received:NotHeld")
    [unfilled] = await xicheng.wait_for(1, "supplyingAgencyMessage")
    assert (unfilled.get("statusInfo/status"), unfilled.get("messageInfo/reasonUnfilled")) == ("Unfilled", "NotHeld")
    await xicheng.post(exchange(env).url, xicheng.request("XC-2", "Another", service="Copy"))
    await xicheng.post(exchange(env).url, xicheng.requesting_message("XC-2", "Cancel"))
    answers = await xicheng.wait_for(2, "supplyingAgencyMessage")
    assert (answers[-1].get("statusInfo/status"), answers[-1].get("messageInfo/answerYesNo")) == ("Cancelled", "Y")

    async with env.db.session() as s:
        lendings = list(await s.scalars(select(LendingRequest).order_by(LendingRequest.id)))
        report = await service_stats(s, None, None, env.settings.tz, env.now(), policy=env.policy)
    assert [(x.their_request_id, x.state) for x in lendings] == [
        ("DC-77", "completed"), ("XC-1", "unfilled"), ("XC-2", "cancelled")]
    figures = {f.agency_id: f for f in report.partners}
    assert (figures[DONGCHENG[0]].lent, figures[DONGCHENG[0]].lent_fill_rate) == (1, 1.0)
    assert (figures[XICHENG[0]].lent, figures[XICHENG[0]].lent_fill_rate) == (2, 0.0)


async def test_bad_unknown_and_foreign_messages_are_answered_error(
    env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]
) -> None:
    dongcheng, _ = partners
    url = exchange(env).url
    # Not valid against the schema (a status the standard does not have), and not XML at all.
    wrong = dongcheng.supplying_message("ILL-000001", "Loaned").replace(b"<status>Loaned<", b"<status>Lent<")
    answer = await dongcheng.post(url, wrong)
    assert status_of(answer) == ("ERROR", "BadlyFormedMessage")
    assert answer.find(".//{http://illtransactions.org/2013/iso18626}supplyingAgencyMessageConfirmation") is not None
    assert status_of(await dongcheng.post(url, b"this is not xml")) == ("ERROR", "BadlyFormedMessage")
    unversioned = dongcheng.supplying_message("ILL-000001", "Loaned").replace(b' ill:version="1.2"', b"")
    assert status_of(await dongcheng.post(url, unversioned)) == ("ERROR", "BadlyFormedMessage")
    # A request id the library never sent.
    unknown = await dongcheng.post(url, dongcheng.supplying_message("ILL-424242", "Loaned"))
    assert status_of(unknown) == ("ERROR", "UnrecognisedDataValue")
    # A library that is not a partner, and a message meant for another library.
    stranger = PartnerLibrary("ISIL:XX-0000", AGENCY)
    assert status_of(await stranger.post(url, stranger.request("S-1", "Anything"))) == ("ERROR", "UnrecognisedDataValue")
    elsewhere = PartnerLibrary(DONGCHENG[0], "ISIL:CN-000000-Z")
    assert status_of(await elsewhere.post(url, elsewhere.request("S-2", "Anything"))) == ("ERROR", "UnrecognisedDataValue")
    async with env.db.session() as s:
        assert await s.scalar(select(func.count()).select_from(LendingRequest)) == 0


async def test_partner_answers_error_the_staff_are_told(
    env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]
) -> None:
    dongcheng, _ = partners
    dongcheng.answer_error = "UnrecognisedDataValue"
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    await quick_loan(fang, "The Structure of Scientific Revolutions")
    await sent_to_partners(env, group)
    told = texts(await group.wait_for(containing("拒绝了我们")))
    assert "UnrecognisedDataValue" in told and "ILL-000001" in told
    async with env.db.session() as s:
        [row] = list(await s.scalars(select(PartnerMessage)))
    assert row.state == "failed"


async def test_the_endpoint_is_served_in_webhook_mode_too(db: Database) -> None:
    """``librarybot run --webhook`` serves POST /iso18626 at LIBRARYBOT_ILL_LISTEN as polling does; a bot
    without LIBRARYBOT_ILL_AGENCY_ID serves nothing there."""
    partner = PartnerLibrary(DONGCHENG[0], AGENCY)
    await partner.start()
    emulator = Emulator(token=TOKEN)
    await emulator.start()
    hook, ill_port = _free_port(), _free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=db.url, telegram_api_url=emulator.base_url, staff_chat_id=STAFF_CHAT_ID,
        webhook_url=f"http://127.0.0.1:{hook}/hook", webhook_secret="s3cret-webhook-value", listen=f"127.0.0.1:{hook}",
        ill_agency_id=AGENCY, ill_listen=f"127.0.0.1:{ill_port}",
    )
    app = await start_bot(settings, db, partner_policy((partner, DONGCHENG)), TOKEN, poll=False)
    runner = await _serve_webhook(app, settings)
    try:
        url = f"http://127.0.0.1:{ill_port}/iso18626"
        assert status_of(await partner.post(url, partner.request("DC-9", "Orientalism"))) == ("OK", "")
        assert status_of(await partner.post(url, b"<nonsense/>")) == ("ERROR", "BadlyFormedMessage")
        async with db.session() as s:
            assert [x.their_request_id for x in await s.scalars(select(LendingRequest))] == ["DC-9"]
        await runner.cleanup()
        await stop_bot(app)
        plain = await start_bot(Settings(_env_file=None, database_url=db.url, telegram_api_url=emulator.base_url),  # type: ignore[call-arg]
                                db, Policy(), TOKEN, poll=False)
        assert "ill_exchange" not in plain.bot_data
        await stop_bot(plain)
    finally:
        await runner.cleanup()
        if app.running:
            await stop_bot(app)
        await emulator.stop()
        await partner.stop()


async def test_partner_buttons_are_for_staff_only(env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]) -> None:
    dongcheng, _ = partners
    await start(env)
    fang = await watch(env, READER)
    await quick_loan(fang, "The Structure of Scientific Revolutions")
    await dongcheng.post(exchange(env).url, dongcheng.request("DC-1", "Orientalism"))
    own = fang.bot_messages()[-1]["message_id"]
    for data in ("illsp:1:submitted", "illrp:1", "illlw:1:received", "illll:1:received", "illlu:1:received",
                 "illlr:1:received:NotHeld", "illlc:1:received"):
        await fang.press_data(own, data)
        assert "only for library staff" in (fang.last_callback_answer or {}).get("text", ""), data
    assert "only for library staff" in texts(await fang.send("/illlending"))
    await asyncio.sleep(0.5)
    assert dongcheng.received == []  # nothing was sent to the partner
    async with env.db.session() as s:
        assert [x.state for x in await s.scalars(select(LendingRequest))] == ["received"]
    assert await request_status(env) == "submitted"


async def test_staff_giving_up_tells_the_partner(env: EmbeddedBot, partners: tuple[PartnerLibrary, PartnerLibrary]) -> None:
    """Staff mark a request unfilled while a partner is still looking for it: the partner gets Cancel,
    and its late answer moves nothing."""
    dongcheng, _ = partners
    await start(env)
    group = await watch(env, STAFF, chat_id=STAFF_CHAT_ID)
    fang = await watch(env, READER)
    await quick_loan(fang, "乡土中国")
    card_id = await sent_to_partners(env, group)
    await dongcheng.wait_for(1, "request")
    await group.press_data(card_id, "illur:1:requested:not_in_time")
    assert "ILL-000001" in texts(await fang.wait_for(containing("could not be supplied")))
    [cancel] = await dongcheng.wait_for(1, "requestingAgencyMessage")
    assert cancel.get("action") == "Cancel"
    late = await dongcheng.post(exchange(env).url, dongcheng.supplying_message("ILL-000001", "Loaned"))
    assert status_of(late) == ("OK", "")
    assert await request_status(env) == "unfilled"
    async with env.db.session() as s:
        [attempt] = list(await s.scalars(select(PartnerAttempt)))
    assert (attempt.state, attempt.shipped_at) == ("cancelled", None)
