"""SIP2 against a LIVE Evergreen SIPServer (#15): the client, the circulation service and the bot.

Each test starts its own server (``tests/auxil/sip2_live.py``; one connection per account, its
library in memory, so items are lent with a checkout first) and FAILS when it cannot be started:
CI has to prove these paths against the real thing. What a live server cannot produce (a checksum
spoiled on the line, a server in another encoding, a fee amount) goes through a proxy in front of
it or through the replay server. Dates are the server's own (its clock is today's): the tests
compare what the bot shows with what the server said, never with a fixed day or a duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from bot.embedded import EmbeddedBot
from storage.catalog import Item, Record
from storage.db import Database
from storage.ils import AccountFines, CirculationUnavailable
from storage.ils_sip2 import RENEWALS, Sip2Circulation
from storage.people import Reader, User
from storage.policy import Policy
from storage.sip2 import client as sip2_client
from storage.sip2 import protocol as p
from storage.sip2.client import Sip2Client, Sip2Config, Sip2Pool, run_check
from storage.sip2.errors import Sip2Unavailable
from storage.sip2.replay import ReplayServer, default_exchanges_path
from storage.state import PersistedState
from tests.auxil.sip2_live import ENV_DIR, PIN, REQUIRE_LIVE, GarblingProxy, LiveSipServer, lend, server_dir

ROOT = Path(__file__).resolve().parents[1]
PERL, ALIBI, HARRY = "1565921879", "0440242746", "660"
NOT_ANSWERING = "The library system is not answering, please try again in a few minutes."


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveSipServer]:
    server = LiveSipServer(tmp_path / "sipserver")
    if not (server_dir() / "start.sh").is_file() and not os.environ.get(REQUIRE_LIVE):
        # A clone alone has no server beside it; .ci/run sets REQUIRE_LIVE, so there a missing server fails.
        pytest.skip(f"no live SIP2 server at {server_dir()} (set {ENV_DIR}); these paths are unproven here")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))  # a server that is there but does not start is a failure, never a skip
    try:
        yield server
    finally:
        server.stop()


def the_day(text: str) -> str:
    """The date of a SIP2 timestamp (``20261218    152714`` → ``2026-12-18``)."""
    when = p.parse_timestamp(text)
    assert when is not None, text
    return when.date().isoformat()


def plain(messages: list[dict[str, Any]]) -> str:
    return "\n".join(m["plain"] or "" for m in messages if m["from_bot"])


async def reader_row(db: Database, card: str, name: str = "") -> int:
    async with db.session() as s:
        reader = await s.scalar(select(Reader).where(Reader.card_number == card))
        if reader is None:
            reader = Reader(card_number=card, name=name or card, pin_hash="!sip2")
            s.add(reader)
            await s.flush()
        return reader.id


async def catalogue(db: Database, title: str, *barcodes: str) -> int:
    async with db.session() as s:
        record = Record(control_number=f"ctl-{barcodes[0]}", title=title, isbns=[])
        s.add(record)
        await s.flush()
        for barcode in barcodes:
            s.add(Item(barcode=barcode, record_id=record.id, location="3F", status="available"))
        return record.id


# -- the server itself: what the issue saw --------------------------------------------------------


async def test_the_live_server_behaves_as_the_issue_says(live: LiveSipServer) -> None:
    """The behaviours the client is built around, seen on the wire: a second login is never
    answered, an empty AD is refused where a missing one is accepted, a 97 comes back with AY0."""
    await lend(live, "djfiander", PERL)
    async with Sip2Client(live.config(), name="first") as first:
        await first.login()
        second = Sip2Client(live.config(timeout=0.5), name="second")
        with pytest.raises(Sip2Unavailable) as unanswered:
            await second.item_information(PERL)
        assert not unanswered.value.may_have_reached_server  # the 17 itself never left
        await second.close()
        stamp = p.format_timestamp(dt.datetime.now())
        empty_ad = await first.request(
            p.Sip2Request("65", stamp, [("AO", "UWOLS"), ("AA", "djfiander"), ("AD", ""), ("AC", "")]), idempotent=False
        )
        refused = p.RenewAllResult.from_message(empty_ad)
        assert not refused.ok and refused.screen_messages == ["Invalid patron password."]
        assert any(i.startswith("ARRAY(0x") for i in refused.renewed_items + refused.unrenewed_items)
        accepted = await first.renew_all("djfiander", "")  # no PIN: AD left out
        assert accepted.ok and accepted.renewed_count == 1 and accepted.renewed_items == [PERL]


# -- (1) the pool against one connection per account, (8) clocks: `librarybot sip2 check` ---------


async def test_pool_shrinks_to_the_one_connection_and_keeps_working(live: LiveSipServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="storage.sip2")
    await lend(live, "djfiander", PERL, ALIBI, HARRY)
    async with Sip2Pool(live.config(pool_size=4)) as pool:
        info, items = await pool.loans("djfiander")  # 63, then three 17s at once: two logins hang together
        assert sorted(info.charged_items) == [ALIBI, PERL, HARRY] and {i.item_id for i in items} == {PERL, ALIBI, HARRY}
        assert pool.connection_limit == 1 and len(pool.clients) == 1
        assert "allows this account 1 connection(s)" in caplog.text and "LIBRARYBOT_SIP2_POOL_SIZE=1" in caplog.text
        # And it keeps working: concurrent lookups queue on the one connection.
        found = await asyncio.gather(*(pool.item_information(b) for b in (PERL, ALIBI, HARRY)))
        assert [f.item_id for f in found] == [PERL, ALIBI, HARRY]
        renewed = await pool.renew("djfiander", "", PERL)
        assert renewed.ok


async def test_sip2_check_reports_the_connection_limit_and_the_clock(live: LiveSipServer) -> None:
    env = {
        "LIBRARYBOT_SIP2_HOST": "127.0.0.1", "LIBRARYBOT_SIP2_PORT": str(live.port), "LIBRARYBOT_SIP2_USER": "scclient",
        "LIBRARYBOT_SIP2_PASSWORD": "clientpwd", "LIBRARYBOT_SIP2_INSTITUTION": "UWOLS", "LIBRARYBOT_SIP2_TIMEOUT": "1",
        "LIBRARYBOT_TIMEZONE": "UTC",  # the live server runs in UTC: the clocks agree
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIBRARYBOT_", "TELEGRAM_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "sip2", "check",
        env={**base, **env, "PYTHONPATH": str(ROOT)}, cwd=live.state_dir,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out_bytes, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    out = out_bytes.decode()
    assert proc.returncode == 0, err.decode()
    assert "Connections allowed / 允许的连接数:" in out
    assert "1 (LIBRARYBOT_SIP2_POOL_SIZE=4: the bot will use 1" in out
    assert "Bot clock (UTC)" in out and "— agrees / 一致" in out

    # The same server seen by a bot set to China's time: eight hours apart, said plainly.
    check = await run_check(live.config(pool_size=2), tz=ZoneInfo("Asia/Shanghai"))
    assert check.ok and check.connection_limit == 1 and check.clock_skew is not None
    assert abs(check.clock_skew + dt.timedelta(hours=8)) < dt.timedelta(minutes=2)
    assert "8 h 0 min" in check.report and "behind / 慢 — WRONG / 不一致" in check.report
    assert "LIBRARYBOT_TIMEZONE" in check.report


# -- the circulation service and the bot against the live server ---------------------------------


@pytest.fixture
async def bot(db: Database, live: LiveSipServer) -> AsyncIterator[EmbeddedBot]:
    """The bot with LIBRARYBOT_ILS=sip2 and the default pool of 4, against the live server (UTC)."""
    await lend(live, "djfiander", PERL, ALIBI)
    env = await EmbeddedBot.start(
        db, ils="sip2", sip2_host="127.0.0.1", sip2_port=live.port, sip2_user="scclient",
        sip2_password="clientpwd", sip2_institution="UWOLS", sip2_location="", sip2_timeout=1.0,
        sip2_heartbeat_seconds=0, sip2_rate=200, timezone="UTC",
    )
    circulation = env.services.circulation
    assert isinstance(circulation, Sip2Circulation)
    circulation.probe_every = 0.2
    try:
        yield env
    finally:
        await circulation.close()
        await env.stop()


async def test_a_reader_with_loans_lists_renews_and_sees_fines(bot: EmbeddedBot, live: LiveSipServer) -> None:
    record = await catalogue(bot.db, "Perl 5 desktop reference", PERL, HARRY)
    dj = await bot.person(601)
    assert "David J. Fiander" in plain(await dj.send("/login djfiander 6789"))

    shown = await dj.send("/loans")  # with a pool of 4 against one connection: it shrinks, it answers
    text = plain(shown)
    assert NOT_ANSWERING not in text
    assert "Your loans (2)" in text and "Perl 5 desktop reference" in text and "The deep blue alibi" in text
    assert "Renewed 0 of ?" in text
    # (7) The fine item the system keeps on the account (Evergreen's test patron: "Computer Time").
    assert "Charges the library system lists on your account: Computer Time" in text
    circulation = bot.services.circulation
    assert circulation.pool.connection_limit == 1

    # Live availability: one copy on loan, one on the shelf; not the catalogue's "2 of 2".
    details = plain(await dj.press_data(shown[-1]["message_id"], f"search:rec:{record}"))
    assert "1 of 2 on shelf" in details and "as last recorded in the catalogue" not in details

    # (2) No PIN kept: renew all goes without AD, and the system renews both.
    everything = plain(await dj.press("🔄 Renew all", message=shown[-1]))
    assert "Renew all: 2 of 2 renewed" in everything
    again = plain(await dj.send("/loans"))
    assert again.count("Renewed 1 of ?") == 2

    # (1) The system stops answering: availability is the catalogue's, and says so.
    live.stop()
    stale = plain(await dj.press_data(shown[-1]["message_id"], f"search:rec:{record}"))
    assert "All 2 on shelf" in stale and "as last recorded in the catalogue" in stale
    assert NOT_ANSWERING in plain(await dj.send("/loans"))


async def test_renew_all_refused_by_the_system_is_shown_as_refused(bot: EmbeddedBot, live: LiveSipServer) -> None:
    """(3) A card the system no longer knows: the 66 is ok=0 with ARRAY(0x…) placeholders and an AF."""
    circulation = bot.services.circulation
    gone = await reader_row(bot.db, "nobody", "A card deleted in the ILS")
    outcomes = await circulation.renew_all(gone)
    assert [(o.barcode, o.ok, o.message) for o in outcomes] == [("", False, "Invalid patron barcode.")]
    async with bot.db.session() as s:
        notes = list(await s.scalars(select(PersistedState.key).where(PersistedState.kind == RENEWALS)))
    assert notes == []  # no note for a fake barcode

    async with bot.db.session() as s:
        s.add(User(telegram_id=602, first_name="x", reader_id=gone))
    person = await bot.person(602)
    said = plain(await person.send("/renew all"))
    assert "Nothing was renewed" in said and "The library system says: Invalid patron barcode." in said
    assert "ARRAY(0x" not in said and "no loans" not in said

    # A reader without loans: ok=1 and zero counts, no message: "no loans", as it is.
    miker = await reader_row(bot.db, "miker", "Mike Rylander")
    assert await circulation.renew_all(miker) == []


async def test_a_renewal_whose_login_went_unanswered_is_sent_once_on_the_working_connection(
    db: Database, live: LiveSipServer
) -> None:
    """(5) The renewal is taken by a connection whose login hangs (the account's one connection is
    busy): nothing was written, so no "unknown" note; the pool shrinks and the renewal goes out on
    the working connection, once. The list then says "Renewed 1 of ?", not "2 of ?"."""
    due = await lend(live, "djfiander", PERL)
    service = Sip2Circulation(db, Policy(), live.config(pool_size=2), rate=1000)
    try:
        reader = await reader_row(db, "djfiander")
        assert [v.barcode for v in await service.loans(reader)] == [PERL]  # connection 1 logged in
        async with service.pool.connection():  # connection 1 busy: the renewal gets connection 2
            renewal = asyncio.create_task(service.renew(reader, PERL, expected_renewals=0))
            while service.pool.connection_limit is None:
                assert not renewal.done(), renewal.result()
                await asyncio.sleep(0.05)
        outcome = await renewal
        assert outcome.ok and outcome.new_due_at is not None
        async with db.session() as s:
            notes = dict((await s.execute(
                select(PersistedState.key, PersistedState.value).where(PersistedState.kind == RENEWALS))).all())
        assert list(notes) == [f"{reader}:0:{PERL}"] and notes[f"{reader}:0:{PERL}"]["state"] == "done"
        [view] = await service.loans(reader)
        assert view.renewals == 1
        assert the_day(due[PERL]) <= view.due_at.date().isoformat()
    finally:
        await service.close()


async def test_a_renewal_that_never_left_keeps_no_note_and_can_be_sent_again(
    db: Database, live: LiveSipServer
) -> None:
    """(5) The whole account is held elsewhere: the renewal's login hangs, nothing is written, the
    reader is told "not answering", and no "unknown" note stays behind: the same button renews once
    the system answers, and the list counts that one renewal."""
    service = Sip2Circulation(db, Policy(), live.config(pool_size=1), rate=1000)
    try:
        reader = await reader_row(db, "djfiander")
        async with Sip2Client(live.config(), name="elsewhere") as elsewhere:
            await elsewhere.login()
            with pytest.raises(CirculationUnavailable) as failed:
                await service.renew(reader, PERL, expected_renewals=0)
        assert isinstance(failed.value.__cause__, Sip2Unavailable)
        assert not failed.value.__cause__.may_have_reached_server
        async with db.session() as s:
            assert list(await s.scalars(select(PersistedState.key).where(PersistedState.kind == RENEWALS))) == []

        await lend(live, "djfiander", PERL)
        outcome = await service.renew(reader, PERL, expected_renewals=0)
        assert outcome.ok
        [view] = await service.loans(reader)
        assert view.renewals == 1  # "Renewed 1 of ?", not "2 of ?"
    finally:
        await service.close()


async def test_a_login_timeout_alone_is_not_a_sent_renewal(live: LiveSipServer) -> None:
    """(5) At the client: a renew whose connection's login is not answered was never written."""
    async with Sip2Client(live.config(), name="holder") as holder:
        await holder.login()
        waiting = Sip2Client(live.config(timeout=0.5), name="waiting")
        with pytest.raises(Sip2Unavailable) as failed:
            await waiting.renew("djfiander", "", PERL)
        await waiting.close()
    assert not failed.value.may_have_reached_server


# -- (4) resend: answers spoiled on the line, on their way from the live server -------------------


@pytest.fixture
async def proxy(live: LiveSipServer) -> AsyncIterator[GarblingProxy]:
    line = GarblingProxy(live.port)
    await line.start()
    yield line
    await line.stop()


def flip_code(data: bytes) -> bytes:
    return b"3O" + data[2:]  # "30" → "3O": an unknown code, and a wrong checksum


def spoil_checksum(data: bytes) -> bytes:
    return data[:-1] + (b"0" if data[-1:] != b"0" else b"1")


def drop_trailer(data: bytes) -> bytes:
    return p.strip_error_detection(data.decode()).encode()


@pytest.mark.parametrize("spoil", [flip_code, spoil_checksum, drop_trailer])
async def test_a_spoiled_renew_answer_is_asked_for_again_and_the_renewal_stands(
    live: LiveSipServer, proxy: GarblingProxy, spoil: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sip2_client, "PROBE_AFTER_IDLE_SECONDS", 60.0)  # the 30 is the next answer
    due = await lend(live, "djfiander", PERL)
    async with Sip2Client(live.config(port=proxy.port)) as client:
        await client.login()
        await client.sc_status()  # the renew's sequence number is then not 0
        proxy.garble_next(spoil)
        renewed = await client.renew("djfiander", "", PERL)
    assert renewed.ok and renewed.item_id == PERL and renewed.due_date_text
    assert the_day(renewed.due_date_text) >= the_day(due[PERL])
    assert proxy.count("29") == 1 and proxy.count("97") == 1  # asked again, renewed once
    assert renewed.message.sequence == 0  # the resent answer's AY0, accepted


# -- (6) encodings, (7) a fee amount: what this live server does not send -------------------------


async def test_fines_with_a_fee_amount_from_the_system(db: Database) -> None:
    """(7) The live test patron has a fine item but no fee amount (BV): the replay server answers
    with one (and a currency), as Koha does."""
    async with ReplayServer(default_exchanges_path()) as replay:
        service = Sip2Circulation(db, Policy(), replay_config(replay.port), rate=1000)
        try:
            reader = await reader_row(db, "djfiander")
            await service.pool.login()
            head = "64" + " " * 14 + "001" + p.format_timestamp(dt.datetime(2026, 11, 26, 5, 29, 10))
            counts = "0000" * 3 + "0002" + "0000" * 2  # two fine items
            replay.respond_next_with(f"{head}{counts}AOUWOLS|AAdjfiander|AEDavid J. Fiander|BHCNY|BV12.5|BLY|")
            replay.respond_next_with(f"{head}{counts}AOUWOLS|AAdjfiander|AVOverdue: Perl|AVLost card|AV|BLY|")
            fines = await service.fines(reader)
            assert fines == AccountFines(Decimal("12.50"), "CNY", ("Overdue: Perl", "Lost card"))
            replay.respond_next_with(f"{head}{'0000' * 6}AOUWOLS|AAdjfiander|BLY|")
            assert await service.fines(reader) is None  # nothing owed: nothing said
        finally:
            await service.close()


async def test_utf8_read_as_gb18030_and_the_reverse_are_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    """(6) 张三·李四 sent in one encoding and read in the other: one warning naming the setting."""
    caplog.set_level(logging.WARNING, logger="storage.sip2")
    head = "24" + " " * 14 + "001" + p.format_timestamp(dt.datetime(2026, 11, 26, 5, 29, 10))
    for sent_in, read_as in (("utf-8", "gb18030"), ("gb18030", "utf-8")):
        caplog.clear()
        async with ReplayServer(default_exchanges_path(), encoding=sent_in) as replay:
            async with Sip2Pool(replay_config(replay.port, encoding=read_as, pool_size=2)) as pool:
                await pool.login()
                for _ in range(3):
                    replay.respond_next_with(f"{head}AOUWOLS|AAdjfiander|AE张三·李四|BLY|")
                    await pool.patron_status("djfiander", PIN)
        warnings = [r.getMessage() for r in caplog.records if "LIBRARYBOT_SIP2_ENCODING" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"seems to send {sent_in}, but LIBRARYBOT_SIP2_ENCODING is {read_as}" in warnings[0]
        assert f"set LIBRARYBOT_SIP2_ENCODING={sent_in}" in warnings[0]


def replay_config(port: int, **overrides: Any) -> Sip2Config:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": port, "user": "scclient", "password": "clientpwd", "institution": "UWOLS",
        "location": "lib", "timeout": 1.0, "heartbeat_seconds": 0, "pool_size": 1,
    }
    return Sip2Config(**{**values, **overrides})


def test_the_server_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIBRARYBOT_SIP2_SERVER_DIR", str(tmp_path))
    assert server_dir() == tmp_path
    with pytest.raises(RuntimeError, match="not at"):
        LiveSipServer(tmp_path / "state").start()
    monkeypatch.delenv("LIBRARYBOT_SIP2_SERVER_DIR")
    assert server_dir() == ROOT.parent / "shared" / "peers" / "evergreen-sipserver"


def test_fines_from_the_system_read_in_both_languages() -> None:
    from handlers.loans import _fines_text

    fines = AccountFines(Decimal("12.50"), "¥", ("Lost card", "<Computer Time>"))
    assert "You owe the library <b>¥12.50</b>" in _fines_text("en", fines)
    assert "&lt;Computer Time&gt;" in _fines_text("en", fines)  # the system's words, escaped
    assert "<b>¥12.50</b>" in _fines_text("zh", fines) and "Lost card" in _fines_text("zh", fines)
    assert _fines_text("en", AccountFines(None, "¥", ("Computer Time",))).strip().startswith("💰 Charges")
    assert _fines_text("en", None) == ""
