"""Circulation in the store: checkout, return, renewal (including double presses and forged
buttons), the holds queue and its notices, history purge, and ``LocalCirculation``."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import func, select

from storage import circulation as circ
from storage.catalog import Item
from storage.circulation import (
    CheckoutRefused,
    Hold,
    HoldRefused,
    HoldStatus,
    Loan,
    RenewalRefused,
    end_of_day,
    local_date,
)
from storage.db import Database
from storage.ils import CirculationService, CirculationUnavailable, LocalCirculation
from storage.people import Reader
from storage.policy import Circulation, Policy
from tests.circ_helpers import card, outbox, title

TZ = circ.DEFAULT_TZ
NOW = dt.datetime(2025, 3, 10, 2, 0, tzinfo=dt.UTC)  # 10:00 in Shanghai
POLICY = Policy()


async def lend(db: Database, barcode: str, card_number: str, when: dt.datetime = NOW) -> circ.CheckoutResult:
    async with db.session() as s:
        return await circ.checkout(s, barcode, card_number, POLICY, when, TZ)


async def test_checkout_sets_due_date_and_refuses_a_second_checkout(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Dream of the Red Chamber", copies=1)
        await card(s, "C1")
        await card(s, "C2")
    first = await lend(db, "R1-1", "C1")
    assert first.ok and local_date(first.due_at, TZ) == dt.date(2025, 4, 9)
    second = await lend(db, "R1-1", "C2")
    assert not second.ok and second.refused == CheckoutRefused.ALREADY_ON_LOAN
    assert (await lend(db, "NOPE", "C1")).refused == CheckoutRefused.UNKNOWN_ITEM
    async with db.session() as s:
        await title(s, "R2", "Other")
    assert (await lend(db, "R2-1", "NOBODY")).refused == CheckoutRefused.UNKNOWN_CARD
    async with db.session() as s:
        item = await s.scalar(select(Item).where(Item.barcode == "R1-1"))
        assert item is not None and item.status == "on_loan"


async def test_non_loanable_type_is_refused(db: Database) -> None:
    async with db.session() as s:
        await title(s, "REF", "Encyclopaedia", item_type="reference")
        await card(s, "C1")
    assert (await lend(db, "REF-1", "C1")).refused == CheckoutRefused.NOT_LOANABLE


async def test_renewal_and_its_refusals_through_the_store(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Book one")
        await title(s, "R2", "Book two")
        a = await card(s, "C1")
        await card(s, "C2")
    await lend(db, "R1-1", "C1")
    await lend(db, "R2-1", "C2")
    async with db.session() as s:
        ok = await circ.renew_loan(s, a.id, "R1-1", POLICY, NOW, TZ)
    assert ok.result.ok and ok.title == "Book one"
    assert local_date(ok.result.new_due_at, TZ) == dt.date(2025, 5, 9)
    async with db.session() as s:
        # Another reader's loan: not on this card, and no hint whose it is.
        theirs = await circ.renew_loan(s, a.id, "R2-1", POLICY, NOW, TZ)
        assert theirs.result.reason == RenewalRefused.NOT_ON_LOAN and theirs.title == ""
        unknown = await circ.renew_loan(s, a.id, "XXXX", POLICY, NOW, TZ)
        assert unknown.result.reason == RenewalRefused.NOT_ON_LOAN
        # #20: two minutes later it is not renewed again (the policy's day between renewals)
        soon = await circ.renew_loan(s, a.id, "R1-1", POLICY, NOW + dt.timedelta(minutes=2), TZ)
        assert soon.result.reason == RenewalRefused.RENEWED_RECENTLY
        assert soon.result.details == {"days": 1, "from": "2025-03-11 10:00"}
        later = NOW + dt.timedelta(days=1)
        again = await circ.renew_loan(s, a.id, "R1-1", POLICY, later, TZ)
        assert again.result.ok  # second of two
        no_minimum = Policy(circulation=Circulation(min_days_between_renewals=0))
        limit = await circ.renew_loan(s, a.id, "R1-1", no_minimum, later, TZ)
        assert limit.result.reason == RenewalRefused.LIMIT_REACHED
        assert limit.result.details == {"renewals": 2, "max_renewals": 2}
        await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
        returned = await circ.renew_loan(s, a.id, "R1-1", POLICY, NOW, TZ)
        assert returned.result.reason == RenewalRefused.NOT_ON_LOAN


async def test_a_stale_button_does_not_renew_twice(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Book")
        a = await card(s, "C1")
    await lend(db, "R1-1", "C1")
    service = LocalCirculation(db, POLICY, TZ, clock=lambda: NOW)
    first = await service.renew(a.id, "R1-1", expected_renewals=0)
    second = await service.renew(a.id, "R1-1", expected_renewals=0)
    assert first.ok
    assert not second.ok and second.reason == RenewalRefused.ALREADY_RENEWED
    assert second.new_due_at == first.new_due_at
    listed = NOW - dt.timedelta(minutes=1)
    outcomes = await service.renew_all(a.id, listed_at=listed)
    assert [o.reason for o in outcomes] == [RenewalRefused.ALREADY_RENEWED]
    async with db.session() as s:
        loan = await s.scalar(select(Loan))
        assert loan is not None and loan.renewals == 1


async def test_two_presses_at_the_same_moment_renew_once(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Book")
        a = await card(s, "C1")
    await lend(db, "R1-1", "C1")
    service = LocalCirculation(db, POLICY, TZ, clock=lambda: NOW)
    outcomes = await asyncio.gather(*(service.renew(a.id, "R1-1", expected_renewals=0) for _ in range(4)))
    assert sum(o.ok for o in outcomes) == 1
    assert {o.reason for o in outcomes if not o.ok} == {RenewalRefused.ALREADY_RENEWED}
    async with db.session() as s:
        assert (await s.scalar(select(Loan.renewals))) == 1


async def test_concurrent_stale_read_is_caught_by_the_conditional_update(db: Database) -> None:
    """A renewal that read the loan before another one committed renews nothing."""
    async with db.session() as s:
        await title(s, "R1", "Book")
        a = await card(s, "C1")
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        loan = await s.scalar(select(Loan))
        assert loan is not None
        loan_id = loan.id
    async with db.session() as s:
        # Simulate the other press having committed between our read and our write.
        await s.execute(circ.update(Loan).where(Loan.id == loan_id).values(renewals=1))
    async with db.session() as s:
        changed = await s.execute(
            circ.update(Loan).where(Loan.id == loan_id, Loan.renewals == 0).values(renewals=Loan.renewals + 1)
        )
        assert changed.rowcount == 0
    async with db.session() as s:
        attempt = await circ.renew_loan(s, a.id, "R1-1", POLICY, NOW, TZ, expected_renewals=0)
        assert attempt.result.reason == RenewalRefused.ALREADY_RENEWED


async def test_fines_are_charged_at_return_and_then_refuse_renewal(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Late book")
        await title(s, "R2", "Other book")
        a = await card(s, "C1")
    await lend(db, "R2-1", "C1")
    await lend(db, "R1-1", "C1", NOW - dt.timedelta(days=150))  # due 120 days before NOW
    async with db.session() as s:
        result = await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
    assert result.ok and result.fine_cents == 120 * 10
    async with db.session() as s:
        reader = await s.get(Reader, a.id)
        assert reader is not None and reader.fines_cents == 1200
        refused = await circ.renew_loan(s, a.id, "R2-1", POLICY, NOW, TZ)
        assert refused.result.reason == RenewalRefused.FINES_TOO_HIGH
        assert refused.result.details == {"fines": "12.00", "limit": "10.00"}
    async with db.session() as s:
        again = await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
        assert not again.ok and again.known_item
        assert not (await circ.checkin(s, "NOPE", POLICY, NOW, TZ)).known_item


async def test_accruing_fines_on_open_loans_count_towards_the_limit(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Late")
        await title(s, "R2", "Fine")
        a = await card(s, "C1", fines_cents=950)
    await lend(db, "R2-1", "C1")
    await lend(db, "R1-1", "C1", NOW - dt.timedelta(days=36))  # 6 days overdue: 0.60 accrued
    async with db.session() as s:
        refused = await circ.renew_loan(s, a.id, "R2-1", POLICY, NOW, TZ)
    assert refused.result.reason == RenewalRefused.FINES_TOO_HIGH
    assert refused.result.details["fines"] == "10.10"


async def test_hold_queue_return_fills_hold_and_tells_the_reader(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R1", "Wanted <book>", copies=1)
        borrower = await card(s, "C1", telegram_id=101)
        first = await card(s, "C2", telegram_id=102)
        second = await card(s, "C3", telegram_id=103)
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        p1 = await circ.place_hold(s, first.id, record.id, POLICY, NOW, TZ)
        p2 = await circ.place_hold(s, second.id, record.id, POLICY, NOW + dt.timedelta(minutes=1), TZ)
        dup = await circ.place_hold(s, first.id, record.id, POLICY, NOW, TZ)
        own = await circ.place_hold(s, borrower.id, record.id, POLICY, NOW, TZ)
    assert p1.ok and p1.position == 1 and p2.position == 2
    assert dup.refused == HoldRefused.ALREADY_HELD
    assert own.refused == HoldRefused.ALREADY_ON_LOAN
    async with db.session() as s:
        # The borrower was told once that the loan can no longer be renewed.
        told = await outbox(s, 101, "loans.hold_blocks_renewal")
        assert len(told) == 1 and told[0].params["barcode"] == "R1-1"
        refused = await circ.renew_loan(s, borrower.id, "R1-1", POLICY, NOW, TZ)
        assert refused.result.reason == RenewalRefused.ON_HOLD
    async with db.session() as s:
        returned = await circ.checkin(s, "R1-1", POLICY, NOW + dt.timedelta(days=2), TZ)
    assert returned.hold_filled_for == first.id
    async with db.session() as s:
        ready = await outbox(s, 102, "loans.hold_ready_notice")
        assert len(ready) == 1
        params = ready[0].params
        assert params["title"] == "Wanted &lt;book&gt;"
        assert params["pickup"] == {"zh": "总馆", "en": "Main Library"}
        assert params["deadline"] == "2025-03-19"  # returned 12 March + 7 days on the shelf
        item = await s.scalar(select(Item).where(Item.barcode == "R1-1"))
        assert item is not None and item.status == "on_hold_shelf"
        # Somebody else cannot take the copy waiting for C2; C2 can, and the hold is collected.
    assert (await lend(db, "R1-1", "C3", NOW + dt.timedelta(days=3))).refused == CheckoutRefused.HELD_FOR_ANOTHER
    assert (await lend(db, "R1-1", "C2", NOW + dt.timedelta(days=3))).ok
    async with db.session() as s:
        statuses = dict((await s.execute(select(Hold.reader_id, Hold.status))).all())
    assert statuses == {first.id: HoldStatus.COLLECTED, second.id: HoldStatus.WAITING}


async def test_unpicked_hold_expires_and_passes_to_the_next_reader(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R1", "Wanted")
        await card(s, "C1")
        first = await card(s, "C2", telegram_id=102)
        second = await card(s, "C3", telegram_id=103)
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        await circ.place_hold(s, first.id, record.id, POLICY, NOW, TZ)
        await circ.place_hold(s, second.id, record.id, POLICY, NOW + dt.timedelta(seconds=1), TZ)
        await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
    async with db.session() as s:
        # On the last day of the shelf period nothing expires …
        assert await circ.expire_holds(s, POLICY, end_of_day(dt.date(2025, 3, 17), TZ), TZ) == 0
    async with db.session() as s:
        # … the next morning it does, and the copy waits for the next reader.
        assert await circ.expire_holds(s, POLICY, NOW + dt.timedelta(days=8), TZ) == 1
        assert await circ.expire_holds(s, POLICY, NOW + dt.timedelta(days=8), TZ) == 0
    async with db.session() as s:
        assert len(await outbox(s, 102, "loans.hold_expired")) == 1
        ready = await outbox(s, 103, "loans.hold_ready_notice")
        assert len(ready) == 1 and ready[0].params["deadline"] == "2025-03-25"
        statuses = dict((await s.execute(select(Hold.reader_id, Hold.status))).all())
        assert statuses == {first.id: HoldStatus.EXPIRED, second.id: HoldStatus.READY}


async def test_cancelling_a_ready_hold_passes_the_copy_on(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R1", "Wanted")
        await card(s, "C1")
        first = await card(s, "C2")
        second = await card(s, "C3", telegram_id=103)
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        h1 = await circ.place_hold(s, first.id, record.id, POLICY, NOW, TZ)
        await circ.place_hold(s, second.id, record.id, POLICY, NOW + dt.timedelta(seconds=1), TZ)
        await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
    assert h1.hold is not None
    async with db.session() as s:
        assert await circ.cancel_hold(s, second.id, h1.hold.id, POLICY, NOW, TZ) is None  # not theirs
        assert await circ.cancel_hold(s, first.id, h1.hold.id, POLICY, NOW, TZ) is not None
        assert await circ.cancel_hold(s, first.id, h1.hold.id, POLICY, NOW, TZ) is None  # already
    async with db.session() as s:
        assert len(await outbox(s, 103, "loans.hold_ready_notice")) == 1


async def test_return_with_nobody_waiting_shelves_the_copy(db: Database) -> None:
    async with db.session() as s:
        await title(s, "R1", "Book")
        await card(s, "C1")
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        result = await circ.checkin(s, "R1-1", POLICY, NOW, TZ)
        assert result.ok and result.hold_filled_for is None and result.fine_cents == 0
        item = await s.scalar(select(Item))
        assert item is not None and item.status == "available"


async def test_hold_refusals(db: Database) -> None:
    async with db.session() as s:
        on_shelf = await title(s, "R1", "On the shelf")
        reference = await title(s, "R2", "Reference only", item_type="reference")
        out = await title(s, "R3", "Out")
        blocked = await card(s, "C1", blocked=True)
        expired = await card(s, "C2", expires_on=dt.date(2025, 1, 1))
        good = await card(s, "C3")
        await card(s, "C4")
    await lend(db, "R3-1", "C4")
    async with db.session() as s:
        assert (await circ.place_hold(s, good.id, on_shelf.id, POLICY, NOW, TZ)).refused == HoldRefused.COPY_AVAILABLE
        assert (await circ.place_hold(s, good.id, reference.id, POLICY, NOW, TZ)).refused == HoldRefused.NOT_HOLDABLE
        assert (await circ.place_hold(s, good.id, 99999, POLICY, NOW, TZ)).refused == HoldRefused.UNKNOWN_RECORD
        assert (await circ.place_hold(s, blocked.id, out.id, POLICY, NOW, TZ)).refused == HoldRefused.CARD_BLOCKED
        assert (await circ.place_hold(s, expired.id, out.id, POLICY, NOW, TZ)).refused == HoldRefused.CARD_EXPIRED
        assert (await circ.place_hold(s, good.id, out.id, POLICY, NOW, TZ)).ok


async def test_borrower_not_told_when_the_loan_was_not_renewable_anyway(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R1", "Wanted")
        borrower = await card(s, "C1", telegram_id=101)
        other = await card(s, "C2")
        third = await card(s, "C3")
    await lend(db, "R1-1", "C1")
    async with db.session() as s:
        await s.execute(circ.update(Loan).values(renewals=2))  # limit reached
        await circ.place_hold(s, other.id, record.id, POLICY, NOW, TZ)
        assert await outbox(s, 101) == []
        await s.execute(circ.update(Loan).values(renewals=0))
        await circ.place_hold(s, third.id, record.id, POLICY, NOW, TZ)  # a second hold changes nothing
        assert await outbox(s, 101) == []
    assert borrower.id


async def test_checkout_of_another_copy_releases_the_shelved_one(db: Database) -> None:
    async with db.session() as s:
        record = await title(s, "R1", "Two copies", copies=2)
        await card(s, "C1")
        await card(s, "C2")
        waiting = await card(s, "C3")
        next_in_line = await card(s, "C4", telegram_id=104)
    await lend(db, "R1-1", "C1")
    await lend(db, "R1-2", "C2")
    async with db.session() as s:
        await circ.place_hold(s, waiting.id, record.id, POLICY, NOW, TZ)
        await circ.place_hold(s, next_in_line.id, record.id, POLICY, NOW + dt.timedelta(seconds=1), TZ)
        await circ.checkin(s, "R1-1", POLICY, NOW, TZ)  # for C3
        await circ.checkin(s, "R1-2", POLICY, NOW, TZ)  # for C4
        await circ.cancel_hold(s, next_in_line.id, 2, POLICY, NOW, TZ)  # C4 no longer wants it
    # C3 takes the other copy at the desk: the copy kept for C3 goes back on the shelf.
    assert (await lend(db, "R1-2", "C3")).ok
    async with db.session() as s:
        statuses = dict((await s.execute(select(Item.barcode, Item.status))).all())
    assert statuses == {"R1-1": "available", "R1-2": "on_loan"}


async def test_history_is_purged_after_the_retention_period(db: Database) -> None:
    policy = Policy(circulation=Circulation(loan_history_days=30))
    async with db.session() as s:
        await title(s, "R1", "Book")
        await title(s, "R2", "Book 2")
        await card(s, "C1")
    await lend(db, "R1-1", "C1")
    await lend(db, "R2-1", "C1")
    async with db.session() as s:
        await circ.checkin(s, "R1-1", policy, NOW, TZ)
    async with db.session() as s:
        assert await circ.purge_history(s, policy, NOW + dt.timedelta(days=30)) == 0
        assert await circ.purge_history(s, policy, NOW + dt.timedelta(days=31)) == 1
        assert await s.scalar(select(func.count()).select_from(Loan)) == 1  # the open loan stays


async def test_local_circulation_views(db: Database) -> None:
    async with db.session() as s:
        held = await title(s, "R1", "Held by another")
        await title(s, "R2", "Late")
        await title(s, "R3", "Reserve", item_type="reserve")
        shelf = await title(s, "R4", "On shelf", copies=2)
        a = await card(s, "C1")
        b = await card(s, "C2")
    await lend(db, "R1-1", "C1")
    await lend(db, "R2-1", "C1", NOW - dt.timedelta(days=33))
    await lend(db, "R3-1", "C1")
    await lend(db, "R4-1", "C2")
    service = LocalCirculation(db, POLICY, TZ, clock=lambda: NOW)
    assert isinstance(service, CirculationService)
    placed = await service.place_hold(b.id, held.id, pickup_branch="east")
    assert placed.ok and placed.position == 1 and placed.hold_id is not None
    loans = {v.barcode: v for v in await service.loans(a.id)}
    assert list(loans) == ["R2-1", "R1-1", "R3-1"]  # earliest due first
    late = loans["R2-1"]
    assert late.overdue_days == 3 and str(late.fine) == "0.30" and late.renewable
    assert late.max_renewals == 2 and late.currency == "¥"
    assert loans["R1-1"].refusal == RenewalRefused.ON_HOLD and not loans["R1-1"].renewable
    assert loans["R3-1"].refusal == RenewalRefused.NOT_RENEWABLE
    holds = await service.holds(b.id)
    assert len(holds) == 1
    assert holds[0].status == "waiting" and holds[0].position == 1 and holds[0].queue_length == 1
    assert holds[0].pickup == {"zh": "东区分馆", "en": "East Branch"}
    outcomes = await service.renew_all(a.id)
    assert [(o.barcode, o.ok, o.reason) for o in outcomes] == [
        ("R2-1", True, None),
        ("R1-1", False, RenewalRefused.ON_HOLD),
        ("R3-1", False, RenewalRefused.NOT_RENEWABLE),
    ]
    availability = await service.availability([held.id, shelf.id, 424242])
    assert availability[held.id].on_shelf == 0 and availability[held.id].holds_waiting == 1
    assert availability[held.id].holdable
    assert availability[shelf.id].total == 2 and availability[shelf.id].on_shelf == 1
    assert not availability[shelf.id].holdable
    assert 424242 not in availability
    assert await service.cancel_hold(a.id, placed.hold_id) is False  # not theirs
    assert await service.cancel_hold(b.id, "not-a-number") is False
    assert await service.cancel_hold(b.id, placed.hold_id) is True
    assert await service.holds(b.id) == []
    assert (await service.check_card("C1", "1234")).valid
    assert not (await service.check_card("C1", "0000")).valid
    assert not (await service.check_card("NOPE", "1234")).valid


async def test_unreachable_database_is_circulation_unavailable(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> object:
        raise ConnectionRefusedError("database server not answering")

    monkeypatch.setattr(db, "session", refused)
    service = LocalCirculation(db, POLICY, TZ)
    with pytest.raises(CirculationUnavailable):
        await service.loans(1)
    with pytest.raises(CirculationUnavailable):
        await service.renew(1, "X")
