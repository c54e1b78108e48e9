"""The circulation rules as pure functions: every refusal reason, the boundaries of every limit,
time zones (due dates are the end of the local day) and dates at the end of a month."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.circulation import (
    DEFAULT_TZ,
    CheckoutRefused,
    LoanTerms,
    ReaderStanding,
    RenewalRefused,
    card_expired,
    due_at_after,
    due_soon_days_for,
    end_of_day,
    fine_cents,
    hold_deadline,
    loan_due_at,
    local_date,
    may_check_out,
    money,
    outstanding_fines,
    overdue_days,
    renew,
    to_cents,
)
from storage.policy import Circulation, LoanRules, Notices, Policy

SH = DEFAULT_TZ
UTC = dt.UTC


def at(y: int, m: int, d: int, hh: int = 12, mm: int = 0, tz: ZoneInfo = SH) -> dt.datetime:
    """A moment given in local time, as UTC."""
    return dt.datetime(y, m, d, hh, mm, tzinfo=tz).astimezone(UTC)


NOW = at(2025, 3, 10, 10)
GOOD = ReaderStanding(category="adult", expires_on=dt.date(2030, 1, 1), blocked=False, fines_cents=0)


def loan(due: dt.date, renewals: int = 0, item_type: str = "book") -> LoanTerms:
    return LoanTerms(due_at=end_of_day(due), renewals=renewals, item_type=item_type)


def policy(**circ: object) -> Policy:
    return Policy(circulation=Circulation(**circ))  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# Dates


def test_due_date_is_end_of_local_day_in_shanghai() -> None:
    due = end_of_day(dt.date(2025, 3, 10))
    assert due == dt.datetime(2025, 3, 10, 15, 59, 59, tzinfo=UTC)
    assert local_date(due) == dt.date(2025, 3, 10)


def test_loan_made_just_after_local_midnight_counts_from_the_local_date() -> None:
    # 00:30 on 1 March in Shanghai is still 28 February in UTC.
    checkout = at(2025, 3, 1, 0, 30)
    assert checkout.date() == dt.date(2025, 2, 28)
    due = loan_due_at("adult", "book", Policy(), checkout)
    assert local_date(due) == dt.date(2025, 3, 31)


def test_loan_made_late_evening_counts_from_the_local_date() -> None:
    checkout = at(2025, 3, 1, 23, 30)  # 15:30 UTC on 1 March
    due = loan_due_at("adult", "book", Policy(), checkout)
    assert local_date(due) == dt.date(2025, 3, 31)


def test_other_time_zone_gives_other_end_of_day() -> None:
    ny = ZoneInfo("America/New_York")
    due = end_of_day(dt.date(2025, 7, 1), ny)
    assert due == dt.datetime(2025, 7, 2, 3, 59, 59, tzinfo=UTC)  # EDT is UTC-4
    assert local_date(due, ny) == dt.date(2025, 7, 1)
    # Across a daylight-saving change the end of day is still 23:59:59 local.
    assert end_of_day(dt.date(2025, 3, 9), ny).astimezone(ny).time() == dt.time(23, 59, 59)


@pytest.mark.parametrize(
    ("start", "days", "expected"),
    [
        (dt.date(2025, 1, 31), 30, dt.date(2025, 3, 2)),  # through a 28-day February
        (dt.date(2024, 1, 31), 30, dt.date(2024, 3, 1)),  # leap year
        (dt.date(2025, 1, 31), 28, dt.date(2025, 2, 28)),
        (dt.date(2025, 12, 31), 1, dt.date(2026, 1, 1)),  # year end
        (dt.date(2025, 4, 30), 31, dt.date(2025, 5, 31)),
        (dt.date(2025, 2, 28), 1, dt.date(2025, 3, 1)),
    ],
)
def test_periods_across_month_ends(start: dt.date, days: int, expected: dt.date) -> None:
    assert local_date(due_at_after(start, days)) == expected


def test_overdue_days_count_local_days_after_the_due_date() -> None:
    due = end_of_day(dt.date(2025, 3, 10))
    assert overdue_days(due, at(2025, 3, 10, 23, 59)) == 0
    assert overdue_days(due, at(2025, 3, 11, 0, 0)) == 1  # 16:00 UTC on 10 March
    assert overdue_days(due, at(2025, 3, 9)) == 0
    assert overdue_days(due, at(2025, 4, 9)) == 30


def test_overdue_across_month_end() -> None:
    due = end_of_day(dt.date(2025, 2, 28))
    assert overdue_days(due, at(2025, 3, 1, 0, 1)) == 1
    assert overdue_days(due, at(2025, 3, 31)) == 31


def test_card_valid_through_its_expiry_date() -> None:
    assert not card_expired(dt.date(2025, 3, 10), at(2025, 3, 10, 23, 59))
    assert card_expired(dt.date(2025, 3, 10), at(2025, 3, 11, 0, 0))
    assert not card_expired(None, NOW)


def test_money() -> None:
    assert to_cents(0.1) == 10
    assert to_cents("10.005") == 1001
    assert to_cents(0.15) == 15
    assert str(money(1234)) == "12.34"
    assert fine_cents(7, Circulation(fine_per_day=0.1)) == 70
    assert fine_cents(0, Circulation()) == 0


def test_outstanding_fines_add_charged_and_accruing() -> None:
    loans = [(end_of_day(dt.date(2025, 3, 3)), "book"), (end_of_day(dt.date(2025, 3, 20)), "book")]
    assert outstanding_fines(150, loans, "adult", Policy(), NOW) == 150 + 7 * 10


# -------------------------------------------------------------------------------------------------
# Renewal: success


def test_renewal_counts_from_the_due_date() -> None:
    result = renew(loan(dt.date(2025, 3, 15)), GOOD, Policy(), NOW)
    assert result.ok and result.reason is None
    assert local_date(result.new_due_at) == dt.date(2025, 4, 14)
    assert result.new_due_at == end_of_day(dt.date(2025, 4, 14))


def test_renewal_from_today_when_configured() -> None:
    result = renew(loan(dt.date(2025, 3, 15)), GOOD, policy(renew_from="today", renewal_days=14), NOW)
    assert local_date(result.new_due_at) == dt.date(2025, 3, 24)


def test_renewal_from_today_never_shortens_the_loan() -> None:
    result = renew(loan(dt.date(2025, 4, 1)), GOOD, policy(renew_from="today", renewal_days=7), NOW)
    assert result.ok and local_date(result.new_due_at) == dt.date(2025, 4, 1)


def test_overdue_renewal_counts_from_today() -> None:
    result = renew(loan(dt.date(2025, 3, 5)), GOOD, Policy(), NOW)  # 5 days overdue
    assert result.ok and local_date(result.new_due_at) == dt.date(2025, 4, 9)


def test_renewal_across_month_end() -> None:
    now = at(2025, 1, 30)
    result = renew(loan(dt.date(2025, 1, 31)), GOOD, Policy(), now)
    assert local_date(result.new_due_at) == dt.date(2025, 3, 2)


def test_renewal_period_from_item_type_override() -> None:
    p = policy(item_types={"dvd": LoanRules(renewal_days=7)})
    result = renew(loan(dt.date(2025, 3, 15), item_type="dvd"), GOOD, p, NOW)
    assert local_date(result.new_due_at) == dt.date(2025, 3, 22)


# -------------------------------------------------------------------------------------------------
# Renewal: each refusal and the boundary of each limit


def test_on_hold_for_another_reader() -> None:
    result = renew(loan(dt.date(2025, 3, 15)), GOOD, Policy(), NOW, held_for_another=True)
    assert not result.ok and result.reason == RenewalRefused.ON_HOLD and result.new_due_at is None


@pytest.mark.parametrize(("renewals", "ok"), [(0, True), (1, True), (2, False), (3, False)])
def test_renewal_limit_boundary(renewals: int, ok: bool) -> None:
    result = renew(loan(dt.date(2025, 3, 15), renewals=renewals), GOOD, Policy(), NOW)
    assert result.ok is ok
    if not ok:
        assert result.reason == RenewalRefused.LIMIT_REACHED
        assert result.details == {"renewals": renewals, "max_renewals": 2}


def test_renewal_limit_per_reader_category() -> None:
    p = policy(categories={"student": LoanRules(max_renewals=1)})
    student = ReaderStanding("student", None, False)
    assert renew(loan(dt.date(2025, 3, 15), renewals=1), student, p, NOW).reason == RenewalRefused.LIMIT_REACHED
    assert renew(loan(dt.date(2025, 3, 15), renewals=1), GOOD, p, NOW).ok


def test_item_type_override_beats_category_override() -> None:
    p = policy(categories={"staff": LoanRules(max_renewals=5)}, item_types={"dvd": LoanRules(max_renewals=1)})
    staff = ReaderStanding("staff", None, False)
    assert renew(loan(dt.date(2025, 3, 15), renewals=1, item_type="dvd"), staff, p, NOW).reason == RenewalRefused.LIMIT_REACHED
    assert renew(loan(dt.date(2025, 3, 15), renewals=4), staff, p, NOW).ok


@pytest.mark.parametrize(("late", "ok"), [(0, True), (29, True), (30, True), (31, False)])
def test_overdue_block_boundary(late: int, ok: bool) -> None:
    due = local_date(NOW) - dt.timedelta(days=late)
    result = renew(loan(due), GOOD, policy(fine_per_day=0), NOW)
    assert result.ok is ok
    if not ok:
        assert result.reason == RenewalRefused.OVERDUE_TOO_LONG
        assert result.details == {"overdue_days": 31, "limit_days": 30}


def test_overdue_block_zero_refuses_any_overdue_loan() -> None:
    p = policy(overdue_block_days=0)
    assert renew(loan(local_date(NOW)), GOOD, p, NOW).ok  # due today is not overdue
    late = renew(loan(local_date(NOW) - dt.timedelta(days=1)), GOOD, p, NOW)
    assert late.reason == RenewalRefused.OVERDUE_TOO_LONG


@pytest.mark.parametrize(("fines", "ok"), [(0, True), (999, True), (1000, True), (1001, False)])
def test_fine_limit_boundary(fines: int, ok: bool) -> None:
    reader = ReaderStanding("adult", None, False, fines_cents=fines)
    result = renew(loan(dt.date(2025, 3, 15)), reader, Policy(), NOW)  # limit 10.00
    assert result.ok is ok
    if not ok:
        assert result.reason == RenewalRefused.FINES_TOO_HIGH
        assert result.details == {"fines": "10.01", "limit": "10.00"}


def test_card_expired_boundary() -> None:
    today = local_date(NOW)
    assert renew(loan(dt.date(2025, 3, 15)), ReaderStanding("adult", today, False), Policy(), NOW).ok
    yesterday = ReaderStanding("adult", today - dt.timedelta(days=1), False)
    result = renew(loan(dt.date(2025, 3, 15)), yesterday, Policy(), NOW)
    assert result.reason == RenewalRefused.CARD_EXPIRED
    assert result.details == {"expired_on": "2025-03-09"}


def test_card_blocked() -> None:
    result = renew(loan(dt.date(2025, 3, 15)), ReaderStanding("adult", None, True), Policy(), NOW)
    assert result.reason == RenewalRefused.CARD_BLOCKED


def test_item_type_not_renewable() -> None:
    result = renew(loan(dt.date(2025, 3, 15), item_type="reserve"), GOOD, Policy(), NOW)
    assert result.reason == RenewalRefused.NOT_RENEWABLE and result.details == {"item_type": "reserve"}


def test_no_renewals_allowed_at_all_is_not_renewable() -> None:
    result = renew(loan(dt.date(2025, 3, 15)), GOOD, policy(max_renewals=0), NOW)
    assert result.reason == RenewalRefused.NOT_RENEWABLE


@pytest.mark.parametrize(("days_ahead", "ok"), [(0, True), (2, True), (3, True), (4, False), (20, False)])
def test_too_early_boundary(days_ahead: int, ok: bool) -> None:
    due = local_date(NOW) + dt.timedelta(days=days_ahead)
    result = renew(loan(due), GOOD, policy(min_days_before_due=3), NOW)
    assert result.ok is ok
    if not ok:
        assert result.reason == RenewalRefused.TOO_EARLY
        assert result.details["days"] == 3
        assert result.details["from"] == (due - dt.timedelta(days=3)).isoformat()


def test_no_minimum_means_renew_any_time() -> None:
    assert renew(loan(local_date(NOW) + dt.timedelta(days=29)), GOOD, Policy(), NOW).ok


def test_returned_loan_is_not_on_loan() -> None:
    returned = LoanTerms(end_of_day(dt.date(2025, 3, 15)), 0, "book", returned_at=NOW)
    assert renew(returned, GOOD, Policy(), NOW).reason == RenewalRefused.NOT_ON_LOAN


def test_every_reason_is_listed_most_fundamental_first() -> None:
    worst = ReaderStanding("adult", dt.date(2020, 1, 1), True, fines_cents=10_000)
    terms = LoanTerms(end_of_day(dt.date(2024, 1, 1)), 5, "reserve")
    result = renew(terms, worst, policy(min_days_before_due=1), NOW, held_for_another=True)
    assert result.reason == RenewalRefused.CARD_BLOCKED
    assert result.reasons == (
        RenewalRefused.CARD_BLOCKED,
        RenewalRefused.CARD_EXPIRED,
        RenewalRefused.NOT_RENEWABLE,
        RenewalRefused.ON_HOLD,
        RenewalRefused.LIMIT_REACHED,
        RenewalRefused.OVERDUE_TOO_LONG,
        RenewalRefused.FINES_TOO_HIGH,
    )


@given(
    due_offset=st.integers(min_value=-30, max_value=60),
    renewals=st.integers(min_value=0, max_value=1),
    hour=st.integers(min_value=0, max_value=23),
    renew_from=st.sampled_from(["due_date", "today"]),
    days=st.integers(min_value=1, max_value=90),
)
def test_a_granted_renewal_is_end_of_day_not_shorter_and_not_past(
    due_offset: int, renewals: int, hour: int, renew_from: str, days: int
) -> None:
    now = at(2025, 1, 31, hour)
    old = loan(local_date(now) + dt.timedelta(days=due_offset), renewals=renewals)
    result = renew(old, GOOD, policy(renew_from=renew_from, renewal_days=days, fine_per_day=0), now)
    assert result.ok
    assert result.new_due_at is not None
    assert result.new_due_at >= old.due_at
    assert result.new_due_at > now
    assert result.new_due_at.astimezone(SH).time() == dt.time(23, 59, 59)


# -------------------------------------------------------------------------------------------------
# Checkout


def test_checkout_rules() -> None:
    p = Policy()
    assert may_check_out(GOOD, "book", "available", p, NOW) is None
    assert may_check_out(ReaderStanding("adult", None, True), "book", "available", p, NOW) == CheckoutRefused.CARD_BLOCKED
    expired = ReaderStanding("adult", dt.date(2025, 3, 9), False)
    assert may_check_out(expired, "book", "available", p, NOW) == CheckoutRefused.CARD_EXPIRED
    assert may_check_out(GOOD, "reference", "available", p, NOW) == CheckoutRefused.NOT_LOANABLE
    assert may_check_out(GOOD, "book", "on_loan", p, NOW) == CheckoutRefused.ALREADY_ON_LOAN
    assert may_check_out(GOOD, "book", "missing", p, NOW) == CheckoutRefused.NOT_LOANABLE
    assert may_check_out(GOOD, "book", "on_hold_shelf", p, NOW) is None
    assert (
        may_check_out(GOOD, "book", "on_hold_shelf", p, NOW, held_for_another=True) == CheckoutRefused.HELD_FOR_ANOTHER
    )
    owing = ReaderStanding("adult", None, False, fines_cents=1001)
    assert may_check_out(owing, "book", "available", p, NOW) == CheckoutRefused.FINES_TOO_HIGH


def test_loan_period_per_category_and_item_type() -> None:
    p = policy(categories={"student": LoanRules(loan_days=14)}, item_types={"dvd": LoanRules(loan_days=7)})
    assert local_date(loan_due_at("student", "book", p, NOW)) == dt.date(2025, 3, 24)
    assert local_date(loan_due_at("student", "dvd", p, NOW)) == dt.date(2025, 3, 17)
    assert local_date(loan_due_at("adult", "book", p, NOW)) == dt.date(2025, 4, 9)


# -------------------------------------------------------------------------------------------------
# Notices


@pytest.mark.parametrize(
    ("choice", "days"),
    [(0, set()), (1, {1}), (3, {3, 1}), (7, {7, 3, 1})],
)
def test_reminder_days_choice(choice: int, days: set[int]) -> None:
    assert due_soon_days_for(choice, Policy()) == days


def test_reminder_days_follow_policy_levels() -> None:
    p = Policy(notices=Notices(due_soon_days=[5, 2]))
    assert due_soon_days_for(3, p) == {3, 2}


def test_hold_deadline_is_end_of_local_day() -> None:
    deadline = hold_deadline(at(2025, 2, 25, 23, 30), Policy())
    assert deadline == end_of_day(dt.date(2025, 3, 4))
