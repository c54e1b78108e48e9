"""The SIP2 client and pool against the replay server: the recorded session, then everything a
real server does wrong (silence, dropped connections, bad checksums, cut-short and mis-encoded
answers, refused logins), each of which must end in a clear result or exception, never a hang."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage.sip2 import protocol as p
from storage.sip2.client import Sip2Client, Sip2Config, Sip2Pool, check_report, run_check
from storage.sip2.errors import (
    Sip2ChecksumError,
    Sip2Error,
    Sip2LoginRefused,
    Sip2Unavailable,
)
from storage.sip2.replay import SYNTHETIC_PIN, ReplayServer, default_exchanges_path

EXCHANGES_PATH = default_exchanges_path()

RECORDED_AT = dt.datetime(2026, 11, 26, 5, 29, 10)  # the transaction time in the recordings' first pass


def recorded_clock() -> dt.datetime:
    return RECORDED_AT


def recorded_sent(label: str) -> str:
    exchanges = json.loads(EXCHANGES_PATH.read_text(encoding="utf-8"))["exchanges"]
    (found,) = [e["sent"] for e in exchanges if e["label"] == label]
    return found


def recorded_recv(label: str) -> str:
    exchanges = json.loads(EXCHANGES_PATH.read_text(encoding="utf-8"))["exchanges"]
    (found,) = [e["recv"] for e in exchanges if e["label"] == label]
    return found


@pytest.fixture
async def server() -> AsyncIterator[ReplayServer]:
    srv = ReplayServer(EXCHANGES_PATH)
    await srv.start()
    yield srv
    await srv.stop()


def config_for(server: ReplayServer | None = None, **overrides: Any) -> Sip2Config:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port if server is not None else 6001,
        "user": "scclient",
        "password": "clientpwd",
        "institution": "UWOLS",
        "location": "lib",
        "timeout": 0.5,
        "heartbeat_seconds": 0,
        "pool_size": 4,
    }
    settings.update(overrides)
    return Sip2Config(**settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(message: str) -> str:
    """A request without its AY/AZ trailer, for comparing across sequence numbers."""
    return p.strip_error_detection(message)


# ------------------------------------------------------------------------------------------------
# The recorded session, replayed


async def test_client_sends_the_recorded_requests(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server), clock=recorded_clock) as client:
        await client.login()
        status = await client.sc_status()
        dj = await client.patron_status("djfiander", "6789")
        nobody = await client.patron_status("nobody", "0000")
        plain = await client.patron_information("djfiander", "6789", summary=None)
        fines = await client.patron_information("djfiander", "6789", summary="fine", end=5)
        wrong = await client.patron_information("djfiander", "wrong", summary=None)
        unknown = await client.patron_information("nobody", "0000", summary=None)
        item = await client.item_information("1565921879")
        missing = await client.item_information("nosuchitem")
        # The first ten exchanges of the recorded session, with the same sequence numbers: byte for
        # byte, except that the recording client put a stray '|' before AY in its 99.
        expected = [
            "[main] 93 login OK",
            "[main] 99 SC status",
            "[main] 23 patron status djfiander",
            "[main] 23 patron status unknown patron",
            "[main] 63 patron info, no summary",
            "[main] 63 patron info, fine items summary (pos 3)",
            "[main] 63 patron info wrong PIN",
            "[main] 63 patron info unknown patron",
            "[main] 17 item info (available)",
            "[main] 17 item info unknown item",
        ]
        sent = [recorded_sent(label) for label in expected]
        sent[1] = "9900302.00AY1AZFCA5"  # the specification's form of the recorded "9900302.00|AY1AZFC29"
        assert server.received == sent

        loans = await client.patron_information("djfiander", "6789", summary="charged", end=5)
        renewed = await client.renew("djfiander", "6789", "1565921879")
        refused = await client.renew("djfiander", "6789", "0440242746")
        everything = await client.renew_all("djfiander", "6789")
        placed = await client.hold(
            "miker",
            "6789",
            "1565921879",
            "+",
            pickup_location="Beacock",
            hold_type=2,
            expiration=RECORDED_AT,
            fee_acknowledged=False,
        )
        holds = await client.patron_information("miker", "6789", summary="hold", start=None)
        cancelled = await client.hold("miker", "6789", "1565921879", "-")
        ended = await client.end_session("djfiander", "6789")
        expected = [
            "[main] 63 patron info, charged items summary (pos 2)",
            "[main] 29 renew 1565921879",
            "[main] 29 renew item not checked out",
            "[main] 65 renew all",
            "[main] 15 hold + for miker on 1565921879",
            "[main] 63 patron info miker, hold items summary (pos 0)",
            "[main] 15 hold - (cancel) for miker",
            "[main] 35 end patron session",
        ]
        # Same bodies; our sequence numbers run on without the recording's checkouts in between.
        assert [body(r) for r in server.received[10:]] == [body(recorded_sent(label)) for label in expected]
        for n, request in enumerate(server.received):
            msg = p.parse(request)
            assert msg.checksum_ok and msg.sequence == n % 10

    assert status.online and status.supports("renew")
    assert dj.known and dj.valid_password and dj.name == "David J. Fiander"
    assert not nobody.known
    assert plain.valid_password and not wrong.valid_password
    assert fines.fine_items[0] == "Computer Time"
    assert not unknown.known
    assert item.found and item.title == "Perl 5 desktop reference" and not missing.found
    assert loans.charged_items == ["1565921879", "1565921879"]
    assert renewed.ok and renewed.due_date == dt.datetime(2026, 12, 10, 5, 29, 10)
    assert not refused.ok and refused.screen_messages == ["Item not checked out to David J. Fiander"]
    assert everything.renewed_count == 2
    assert placed.ok and placed.queue_position == 1
    assert holds.hold_items_count == 1
    assert cancelled.ok and cancelled.screen_messages == ["Hold Cancelled."]
    assert ended.ended


async def test_refused_renewal_is_a_result_with_a_log_line(
    server: ReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="storage.sip2")
    async with Sip2Client(config_for(server)) as client:
        result = await client.renew("djfiander", "6789", "0440242746")
    assert not result.ok
    assert (
        "renew of 0440242746 refused by the library system: Item not checked out to David J. Fiander"
        in caplog.text
    )


async def test_without_error_detection(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server, error_detection=False), clock=recorded_clock) as client:
        status = await client.sc_status()
        patron = await client.patron_status("djfiander", "6789")
    assert status.online and patron.known
    assert server.received[1] == "9900302.00"
    assert server.received[2] == recorded_sent("[main] 23 patron status djfiander").split("|AY")[0] + "|"
    assert all("AZ" not in r for r in server.received)


async def test_replay_server_answers_as_recorded(server: ReplayServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def exchange(label: str | None, raw: str | None = None) -> str:
        writer.write((raw if raw is not None else recorded_sent(label or "")).encode() + b"\r")
        data = await asyncio.wait_for(reader.readuntil(b"\r"), 1)
        return data.decode().rstrip("\r")

    assert await exchange("[main] 99 SC status") == recorded_recv(
        "[main] 99 SC status"
    )  # allowed before login
    assert await exchange("[main] 93 login OK") == recorded_recv("[main] 93 login OK")
    assert await exchange("[main] 23 patron status djfiander") == recorded_recv(
        "[main] 23 patron status djfiander"
    )
    assert await exchange("[main] 63 patron info wrong PIN") == recorded_recv(
        "[main] 63 patron info wrong PIN"
    )
    assert await exchange("[main] 29 renew item not checked out") == recorded_recv(
        "[main] 29 renew item not checked out"
    )
    assert await exchange("35 end patron session") == recorded_recv("35 end patron session")
    assert await exchange("97 request ACS resend (no checksum)") == recorded_recv(
        "97 request ACS resend (no checksum)"
    )
    assert await exchange("99 with WRONG checksum") == "96AZFEF6"
    # Without AY/AZ in the request, none in the answer (the recorded server's clock aside).
    assert await exchange("99 without error detection fields") == body(recorded_recv("[main] 99 SC status"))
    # An unknown patron is answered from the recorded "unknown patron" answer.
    unknown = await exchange(
        None, p.patron_status_request("UWOLS", "stranger", "1", now=RECORDED_AT).build(3)
    )
    msg = p.parse(unknown)
    assert msg.checksum_ok and msg.sequence == 3 and msg.get("AA") == "stranger" and msg.get("BL") == "N"
    # Garbage closes the connection, as the recorded server did.
    writer.write(b"XX garbage\r")
    assert await asyncio.wait_for(reader.read(), 1) == b""
    writer.close()


async def test_replay_server_hangs_up_like_the_recorded_one(server: ReplayServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(recorded_sent("[nologin] 23 patron status WITHOUT login").encode() + b"\r")
    assert await asyncio.wait_for(reader.read(), 1) == b""  # no login, no answer
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for label in ("[badlogin3] 93 bad #1", "[badlogin3] 93 bad #2", "[badlogin3] 93 bad #3"):
        writer.write(recorded_sent(label).encode() + b"\r")
        assert (await asyncio.wait_for(reader.readuntil(b"\r"), 1)).decode() == recorded_recv(label) + "\r"
    assert await asyncio.wait_for(reader.read(), 1) == b""  # three strikes
    writer.close()


# ------------------------------------------------------------------------------------------------
# The pool


async def test_pool_spreads_concurrent_requests_over_connections(server: ReplayServer) -> None:
    server.latency = 0.05
    async with Sip2Pool(config_for(server, pool_size=4)) as pool:
        await pool.login()
        items = await asyncio.gather(
            *(pool.item_information(b) for b in server.synthetic_items("reader30")[:8])
        )
    assert all(item.found for item in items)
    assert server.connections_seen == 4
    assert server.most_in_flight == 4  # four asked at once, not eight in a row


async def test_pool_reads_a_reader_with_thirty_loans(server: ReplayServer) -> None:
    async with Sip2Pool(config_for(server)) as pool:
        info, items = await pool.loans("reader30", SYNTHETIC_PIN)
    assert info.charged_items_count == 30 and len(info.charged_items) == 30 and info.valid_password
    assert [i.item_id for i in items] == info.charged_items
    assert all(i.status_name == "charged" and i.due_date is not None for i in items)


async def test_pool_pages_through_many_loans(server: ReplayServer) -> None:
    barcodes = server.add_synthetic_patron("reader250", 250)
    async with Sip2Pool(config_for(server)) as pool:
        info, items = await pool.loans("reader250", SYNTHETIC_PIN)
    assert info.charged_items == barcodes and [i.item_id for i in items] == barcodes
    assert server.count("63") == 3


async def test_pool_loans_raise_when_details_fail(server: ReplayServer) -> None:
    async with Sip2Pool(config_for(server, pool_size=1, timeout=0.3)) as pool:
        await pool.login()
        counts = "0000" * 2 + "0002" + "0000" * 3
        server.respond_next_with(
            f"64{' ' * 14}001{p.format_timestamp(RECORDED_AT)}{counts}AOUWOLS|AAx|AUa|AUb|"
        )
        server.respond_next_with(None)  # the first 17 is never answered
        with pytest.raises(Sip2Unavailable, match="did not answer our item information"):
            await pool.loans("x", "")
    assert server.count("17") == 2  # the second loan was still looked up


async def test_pool_heartbeat_keeps_idle_connections_alive(server: ReplayServer) -> None:
    async with Sip2Pool(config_for(server, pool_size=2, heartbeat_seconds=0.1)) as pool:
        await pool.item_information("1565921879")
        await asyncio.sleep(0.4)
        assert server.count("99") >= 1
        before = server.count("93")
        await pool.item_information("1565921879")
    assert server.count("93") == before  # the same connections, still logged in


async def test_closed_pool_refuses_work(server: ReplayServer) -> None:
    pool = Sip2Pool(config_for(server))
    await pool.close()
    with pytest.raises(Sip2Error, match="closed"):
        await pool.sc_status()


# ------------------------------------------------------------------------------------------------
# Servers that misbehave


async def test_silent_server_gives_unavailable_in_time() -> None:
    async with ReplayServer(EXCHANGES_PATH, silent=True) as silent:
        async with Sip2Client(config_for(silent, timeout=0.3)) as client:
            with pytest.raises(Sip2Unavailable, match="did not answer our login within 0.3 s"):
                await client.patron_information("djfiander", "6789")
        assert silent.count("93") == 1  # one login, given up after the timeout, never retried


async def test_silent_after_login_gives_unavailable_and_no_retry_for_renew(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server, timeout=0.3)) as client:
        await client.login()
        server.silent = True
        with pytest.raises(Sip2Unavailable) as caught:
            await client.renew("djfiander", "6789", "1565921879")
        assert caught.value.may_have_reached_server
    assert server.count("29") == 1


async def test_no_server_at_all() -> None:
    async with Sip2Client(config_for(None, port=free_port())) as client:
        with pytest.raises(Sip2Unavailable, match="cannot connect"):
            await client.sc_status()


async def test_server_closing_after_every_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="storage.sip2")
    async with ReplayServer(EXCHANGES_PATH, close_after_each=True) as closing:
        async with Sip2Client(config_for(closing)) as client:
            with pytest.raises(Sip2Unavailable, match="closed the connection"):
                await client.patron_information("djfiander", "6789")
            with pytest.raises(Sip2Unavailable, match="closed the connection"):
                await client.renew("djfiander", "6789", "1565921879")
        assert closing.count("29") <= 1  # a renew is never sent twice
    assert "closed the connection" in caplog.text


async def test_reconnect_and_login_again_after_the_server_drops_us(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.item_information("1565921879")
        server.close_connections()
        await asyncio.sleep(0.05)
        item = await client.item_information("1565921879")
        server.close_connections()
        await asyncio.sleep(0.05)
        renewed = await client.renew("djfiander", "6789", "1565921879")
    assert item.found and renewed.ok
    assert server.count("93") == 3 and server.count("17") == 2 and server.count("29") == 1


async def test_lookup_is_retried_once_when_the_connection_drops(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with(None, close=True)
        item = await client.item_information("1565921879")
    assert item.found
    assert server.count("17") == 2 and server.count("93") == 2


async def test_renew_is_never_retried_once_sent(
    server: ReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="storage.sip2")
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with(None, close=True)
        with pytest.raises(Sip2Unavailable, match="it may have been done") as caught:
            await client.renew("djfiander", "6789", "1565921879")
        assert caught.value.may_have_reached_server
        await client.login()  # a fresh connection, so that the next answer is the renew all's
        server.respond_next_with(None, close=True)
        with pytest.raises(Sip2Unavailable):
            await client.renew_all("djfiander", "6789")
        await client.login()
        server.respond_next_with(None, close=True)
        with pytest.raises(Sip2Unavailable):
            await client.hold("miker", "6789", "1565921879")
    assert server.count("29") == 1 and server.count("65") == 1 and server.count("15") == 1
    assert "is not sent again" in caplog.text


async def test_idle_connection_is_probed_before_a_renew(
    server: ReplayServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("storage.sip2.client.PROBE_AFTER_IDLE_SECONDS", 0.0)
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        # The server lost the connection without us seeing a close: the probe finds out, and the
        # renew goes out on a fresh connection, once.
        server.respond_next_with(None, close=True)
        renewed = await client.renew("djfiander", "6789", "1565921879")
    assert renewed.ok
    assert server.count("99") == 1 and server.count("29") == 1 and server.count("93") == 2


async def test_bad_checksum_asks_for_a_resend(server: ReplayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="storage.sip2")
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.corrupt_next_checksum()
        renewed = await client.renew("djfiander", "6789", "1565921879")
    assert renewed.ok and renewed.title == "Perl 5 desktop reference"
    assert server.count("97") == 1 and server.count("29") == 1  # the server resent, it did not renew again
    assert "failed its checksum" in caplog.text


async def test_resend_with_error_detection_kept(server: ReplayServer) -> None:
    server.resend_strips_error_detection = False
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.corrupt_next_checksum()
        assert (await client.item_information("1565921879")).found
    assert server.count("97") == 1


async def test_checksum_that_keeps_failing_is_an_error(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        for _ in range(3):
            server.respond_next_with(b"941AY1AZ0000\r")
        with pytest.raises(Sip2ChecksumError, match="failed its checksum 3 times"):
            await client.item_information("1565921879")
    assert server.count("97") == 2


async def test_server_asking_for_our_message_again(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with(b"96AZFEF6\r")
        renewed = await client.renew("djfiander", "6789", "1565921879")
    assert renewed.ok
    # The server could not read the first copy, so it did nothing with it.
    renews = [r for r in server.received if r.startswith("29")]
    assert len(renews) == 2 and renews[0] == renews[1]


async def test_truncated_response(server: ReplayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="storage.sip2")
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with(b"24  Y           0012026112", close=True)
        with pytest.raises(Sip2Error, match="truncated answer to our patron status request"):
            await client.patron_status("djfiander", "6789")
        # Cut short but framed: no checksum and no final '|'; asking again gets the same, then an error.
        for _ in range(3):
            server.respond_next_with(b"24  Y           00120261126    052910AOUWOLS|AAdjfi\r")
        with pytest.raises(Sip2Error):
            await client.patron_status("djfiander", "6789")
        assert (await client.patron_status("djfiander", "6789")).known  # and the client recovers
    assert "in the middle of its answer" in caplog.text


async def test_response_in_the_wrong_encoding(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="storage.sip2")
    title = "億万富翁图书馆"  # 億 has a '|' byte in gb18030
    answer = f"18040201{p.format_timestamp(RECORDED_AT)}AB1565921879|AJ{title}|CK001|"
    async with ReplayServer(EXCHANGES_PATH, encoding="gb18030") as gb:
        async with (
            Sip2Client(config_for(gb)) as wrong,
            Sip2Client(config_for(gb, encoding="gb18030")) as right,
        ):
            await wrong.login()
            await right.login()
            gb.respond_next_with(answer)
            read_wrong = await wrong.item_information("1565921879")
            gb.respond_next_with(answer)
            read_right = await right.item_information("1565921879")
    assert read_right.title == title and not read_right.message.decode_errors
    assert read_wrong.message.decode_errors and "\ufffd" in (read_wrong.title or "")
    assert read_wrong.item_id == "1565921879" and read_wrong.media_type == "001"
    assert "check LIBRARYBOT_SIP2_ENCODING" in caplog.text


async def test_unknown_fields_are_tolerated(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        server.respond_next_with("941")
        await client.login()
        server.respond_next_with(
            f"18030201{p.format_timestamp(RECORDED_AT)}AB1|ZZmystery|AJTitle|ZZagain|XQ|"
        )
        item = await client.item_information("1")
    assert item.title == "Title" and item.message.get_all("ZZ") == ["mystery", "again"]


async def test_out_of_step_sequence_number(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        head = f"18030201{p.format_timestamp(RECORDED_AT)}AB1|AJT|AY7AZ"
        server.respond_next_with((head + p.checksum(head)).encode() + b"\r")
        with pytest.raises(Sip2Error, match="out of step"):
            await client.item_information("1")


async def test_wrong_answer_code(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with("941")
        with pytest.raises(Sip2Error, match="answered our item information with a 94"):
            await client.item_information("1")


async def test_login_refused(server: ReplayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="storage.sip2")
    async with Sip2Client(config_for(server, password="WRONG")) as client:
        with pytest.raises(Sip2LoginRefused, match="refused the SIP2 login of user 'scclient'"):
            await client.patron_information("djfiander", "6789")
        with pytest.raises(Sip2LoginRefused, match="not asked again yet"):
            await client.patron_information("djfiander", "6789")
    assert server.count("93") == 1  # the refusal is remembered; no knocking until the account locks
    assert "login refused (940)" in caplog.text
    assert "WRONG" not in caplog.text


async def test_no_login_means_the_recorded_server_hangs_up(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server, user="")) as client:
        assert (await client.sc_status()).online  # 99 is allowed before login
        with pytest.raises(Sip2Unavailable, match="closed the connection"):
            await client.patron_status("djfiander", "6789")


async def test_bad_patron_barcode_is_refused_before_sending(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        with pytest.raises(p.Sip2BadRequest):
            await client.patron_status("dj|ADforged", "6789")
    assert server.received == []


async def test_passwords_never_reach_the_log(server: ReplayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="storage.sip2")
    async with Sip2Client(config_for(server)) as client:
        await client.patron_information("djfiander", "6789")
        await client.renew("djfiander", "6789", "1565921879")
        server.corrupt_next_checksum()
        await client.renew_all("djfiander", "6789")
    assert ">>> 9300CNscclient|CO****|CPlib|" in caplog.text  # debug logging is on, and masked
    assert "clientpwd" not in caplog.text and "6789" not in caplog.text
    assert "clientpwd" not in repr(config_for(server))


# ------------------------------------------------------------------------------------------------
# Settings and the check screen


def test_config_from_environment() -> None:
    env = {
        "LIBRARYBOT_SIP2_HOST": "sip.example.org",
        "LIBRARYBOT_SIP2_PORT": "6443",
        "LIBRARYBOT_SIP2_USER": "librarybot",
        "LIBRARYBOT_SIP2_PASSWORD": "s3cret",
        "LIBRARYBOT_SIP2_INSTITUTION": "MAIN",
        "LIBRARYBOT_SIP2_LOCATION": "circ",
        "LIBRARYBOT_SIP2_TLS": "true",
        "LIBRARYBOT_SIP2_ENCODING": "GB18030",
        "LIBRARYBOT_SIP2_ERROR_DETECTION": "false",
    }
    config = Sip2Config.from_env(env)
    assert (config.host, config.port, config.user, config.password) == (
        "sip.example.org",
        6443,
        "librarybot",
        "s3cret",
    )
    assert config.tls and not config.error_detection and config.encoding == "gb18030"
    assert config.timeout == 5.0 and config.ssl_context() is not None
    assert Sip2Config.from_env({"LIBRARYBOT_SIP2_HOST": "h"}).error_detection  # on by default
    with pytest.raises(ValueError, match="LIBRARYBOT_SIP2_HOST"):
        Sip2Config.from_env({})
    with pytest.raises(ValueError, match="unknown text encoding"):
        Sip2Config.from_env({"LIBRARYBOT_SIP2_HOST": "h", "LIBRARYBOT_SIP2_ENCODING": "nope"})
    with pytest.raises(ValueError, match="not a number"):
        Sip2Config.from_env({"LIBRARYBOT_SIP2_HOST": "h", "LIBRARYBOT_SIP2_PORT": "sixty"})


async def test_check_report(server: ReplayServer) -> None:
    check = await run_check(config_for(server))
    assert check.ok and check.status is not None
    text = check.report
    assert "Online / 在线:" in text and "yes / 是" in text
    assert "[x] renew / 续借" in text and "[ ] fee paid / 缴费" in text
    assert "Everything librarybot uses is supported" in text
    assert "clientpwd" not in text


async def test_check_report_when_things_fail(server: ReplayServer) -> None:
    refused = await run_check(config_for(server, password="WRONG"))
    assert not refused.ok and "REFUSED / 被拒绝" in refused.report
    down = await check_report(config_for(None, port=free_port()))
    assert "Connection / 连接:" in down and "FAILED / 失败" in down


# ------------------------------------------------------------------------------------------------
# Resending, as the live Evergreen SIPServer does it (#15)


async def test_a_resent_answer_with_sequence_zero_is_accepted(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        await client.sc_status()
        await client.sc_status()  # the renew goes out with sequence 3
        server.corrupt_next_checksum()
        renewed = await client.renew("djfiander", "6789", "1565921879")
    assert renewed.ok and renewed.message.sequence == 0  # resent as AY0: not "out of step"
    assert server.count("29") == 1 and server.count("97") == 1
    assert server.received[-1].startswith("97")


async def test_a_corrupted_message_code_is_asked_for_again(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        head = f"1O030201{p.format_timestamp(RECORDED_AT)}AB1565921879|AJPerl|AY1AZ"
        server.respond_next_with((head + p.checksum(head)[::-1]).encode() + b"\r")  # code and checksum spoiled
        server.respond_next_with(f"18030201{p.format_timestamp(RECORDED_AT)}AB1565921879|AJPerl|")  # the resend
        item = await client.item_information("1565921879")
    assert item.found and server.count("97") == 1


async def test_an_answer_without_its_checksum_is_asked_for_again(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        server.respond_next_with(f"18030201{p.format_timestamp(RECORDED_AT)}AB1565921879|AJPerl|".encode() + b"\r")
        item = await client.item_information("1565921879")
        assert item.found and server.count("97") == 1  # not accepted unchecked: the resend has AY/AZ
        server.resend_strips_error_detection = True
        for _ in range(3):
            server.respond_next_with(f"18030201{p.format_timestamp(RECORDED_AT)}AB1|AJT|".encode() + b"\r")
        with pytest.raises(Sip2ChecksumError, match="came without its checksum 3 times.*LIBRARYBOT_SIP2_ERROR_DETECTION"):
            await client.item_information("1565921879")


async def test_sequence_zero_outside_a_resend_is_still_out_of_step(server: ReplayServer) -> None:
    async with Sip2Client(config_for(server)) as client:
        await client.login()
        await client.sc_status()
        head = f"18030201{p.format_timestamp(RECORDED_AT)}AB1|AJT|AY0AZ"
        server.respond_next_with((head + p.checksum(head)).encode() + b"\r")
        with pytest.raises(Sip2Error, match="out of step"):
            await client.item_information("1")


async def test_check_reports_the_clock_skew_against_the_library_time_zone(server: ReplayServer) -> None:
    """The replay server's clock is the recording's; the bot's is set 8 hours and 30 s later in UTC.
    Read in UTC the server is 8 h behind; read in Shanghai time it agrees but for 30 s."""
    from zoneinfo import ZoneInfo

    server.clock = lambda: RECORDED_AT
    bot_now = RECORDED_AT.replace(tzinfo=dt.UTC) - dt.timedelta(hours=8) + dt.timedelta(seconds=30)
    in_utc = await run_check(config_for(server), recorded_clock, tz=ZoneInfo("UTC"), now=lambda: bot_now)
    assert in_utc.clock_skew == dt.timedelta(hours=8, seconds=-30)
    assert "7 h 59 min 30 s ahead / 快 — WRONG / 不一致" in in_utc.report
    shanghai = await run_check(config_for(server), recorded_clock, tz=ZoneInfo("Asia/Shanghai"), now=lambda: bot_now)
    assert shanghai.clock_skew == dt.timedelta(seconds=-30)
    assert "30 s behind / 慢 — agrees / 一致" in shanghai.report
    assert "Connections allowed / 允许的连接数:" in shanghai.report and "at least 4" in shanghai.report
