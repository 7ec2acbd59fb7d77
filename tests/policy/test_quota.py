import random
from datetime import datetime, timedelta, timezone

import pytest

from gateway.errors import QuotaError, RateLimited
from gateway.policy import quota
from gateway.policy.quota import Counters, RateState, Subject, check, period_bounds, period_key, rate_state, retry_after
from gateway.settings import Limits


def ts(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def utc(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


# --- periods ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "period, moment, expected",
    [
        ("day", "2026-11-26T12:00:00", "2026-11-26"),
        ("day", "2026-12-31T23:59:59.999", "2026-12-31"),
        ("day", "2027-01-01T00:00:00", "2027-01-01"),
        ("day", "2024-02-29T08:00:00", "2024-02-29"),
        ("week", "2026-11-26T12:00:00", "2026-W48"),
        ("week", "2020-12-31T12:00:00", "2020-W53"),
        ("week", "2021-01-01T00:00:00", "2020-W53"),  # ISO week 53 runs into the next calendar year
        ("week", "2021-01-03T23:59:59", "2020-W53"),
        ("week", "2021-01-04T00:00:00", "2021-W01"),
        ("week", "2024-12-30T00:00:00", "2025-W01"),  # ISO week 1 starts in the previous calendar year
        ("week", "2024-12-29T23:59:59", "2024-W52"),
        ("week", "2027-01-01T00:00:00", "2026-W53"),
        ("week", "2027-01-04T00:00:00", "2027-W01"),
        ("month", "2026-11-26T12:00:00", "2026-11"),
        ("month", "2026-12-31T23:59:59", "2026-12"),
        ("month", "2027-01-01T00:00:00", "2027-01"),
        ("month", "2024-02-29T23:59:59", "2024-02"),
        ("total", "2026-11-26T12:00:00", "total"),
        ("total", "1999-01-01T00:00:00", "total"),
    ],
)
def test_period_key(period, moment, expected):
    assert period_key(period, ts(moment)) == expected


@pytest.mark.parametrize(
    "period, moment, start, end",
    [
        ("day", "2026-11-26T12:34:56", "2026-11-26", "2026-11-27"),
        ("day", "2026-12-31T23:59:59", "2026-12-31", "2027-01-01"),
        ("day", "2024-02-28T00:00:00", "2024-02-28", "2024-02-29"),
        ("week", "2026-11-26T12:00:00", "2026-11-23", "2026-11-30"),
        ("week", "2026-11-23T00:00:00", "2026-11-23", "2026-11-30"),
        ("week", "2026-11-29T23:59:59", "2026-11-23", "2026-11-30"),
        ("week", "2021-01-01T00:00:00", "2020-12-28", "2021-01-04"),
        ("week", "2024-12-31T10:00:00", "2024-12-30", "2025-01-06"),
        ("week", "2027-01-02T10:00:00", "2026-12-28", "2027-01-04"),
        ("month", "2026-11-26T12:00:00", "2026-11-01", "2026-12-01"),
        ("month", "2026-12-31T23:59:59", "2026-12-01", "2027-01-01"),
        ("month", "2027-01-31T23:00:00", "2027-01-01", "2027-02-01"),
        ("month", "2024-02-29T12:00:00", "2024-02-01", "2024-03-01"),
        ("month", "2023-02-28T12:00:00", "2023-02-01", "2023-03-01"),
    ],
)
def test_period_bounds(period, moment, start, end):
    assert period_bounds(period, ts(moment)) == (utc(start), utc(end))


def test_period_bounds_total_is_unbounded():
    assert period_bounds("total", ts("2026-11-26T00:00:00")) == (None, None)


@pytest.mark.parametrize("period", ["day", "week", "month"])
def test_period_bounds_agree_with_period_key(period):
    moment = utc("2020-12-20T05:00:00")
    while moment < utc("2027-02-10T00:00:00"):
        now = moment.timestamp()
        start, end = period_bounds(period, now)
        assert start.tzinfo is not None and start <= moment < end
        key = period_key(period, now)
        assert period_key(period, start.timestamp()) == key
        assert period_key(period, (end - timedelta(microseconds=1)).timestamp()) == key
        assert period_key(period, end.timestamp()) != key
        moment += timedelta(hours=17)


def test_period_key_remembering_the_latest_day_agrees_with_computing_it():
    rng = random.Random(2026)
    now = ts("2026-11-29T22:00:00")
    for _ in range(5000):  # mostly moments of the same day, some near or across midnight, periods interleaved
        now += rng.choice([0.0, 0.001, 1.0, 600.0, 7200.0, -7200.0, 86400.0 * 3])
        period = rng.choice(["day", "week", "month", "total"])
        expected = "total" if period == "total" else quota._period_of_day.__wrapped__(period, int(now // 86400))
        assert period_key(period, now) == expected, (period, now)


# --- request rate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit, window, now, expected",
    [
        (3, [], 100.0, RateState(3, 3, 0.0)),
        (3, [40.0, 50.0], 60.0, RateState(3, 1, 0.0)),
        (3, [40.0, 50.0, 55.0], 60.0, RateState(3, 0, 40.0)),  # first admission leaves the window at 100
        (3, [0.0, 10.0, 20.0], 59.5, RateState(3, 0, 0.5)),
        (3, [0.0, 10.0, 20.0], 60.0, RateState(3, 1, 0.0)),  # an admission exactly 60 s old is out
        (3, [0.0, 10.0, 20.0], 200.0, RateState(3, 3, 0.0)),
        (1, [99.0], 100.0, RateState(1, 0, 59.0)),
        (2, [90.0, 100.0], 100.0, RateState(2, 0, 50.0)),  # a burst of N at once is fine, then wait
    ],
)
def test_rate_state_sliding_window(limit, window, now, expected):
    assert rate_state(limit, window, now) == expected


def test_rate_state_reset_when_window_holds_more_than_the_limit():
    # 5 admissions, limit now 2: one is admitted again only once 4 have left, i.e. when 30.0 expires at 90.
    assert rate_state(2, [0.0, 10.0, 20.0, 30.0, 40.0], 50.0) == RateState(2, 0, 40.0)


@pytest.mark.parametrize(
    "reset_s, expected",
    [
        (0.0, 1),
        (0.2, 1),
        (1.0, 1),
        (1.01, 2),
        (29.5, 30),
        (59.5, 60),
        (60.0, 60),
        (75.0, 60),
    ],
)
def test_retry_after_is_whole_seconds_between_1_and_60(reset_s, expected):
    assert retry_after(reset_s) == expected


# --- check ------------------------------------------------------------------------------------

NOW = ts("2026-11-26T12:00:00")
SUBJECTS = [("team", "marketing"), ("user", "alice")]


def subject(scope, name, **limits):
    return Subject(scope, name, "month", Limits(**limits))


def counters(spent=0, reserved=0, spent_ms=0, reserved_ms=0):
    return Counters(spent, reserved, spent_ms, reserved_ms)


# (case, limits, counters, in_flight, window, estimate micros, estimate ms, expected reason or None)
CHECK_CASES = [
    ("no limits", {}, counters(10**12, 0, 10**9), 10**6, [NOW - 1] * 500, 10**9, 10**6, None),
    ("rate: room left", {"requests_per_minute": 3}, counters(), 0, [NOW - 30, NOW - 10], 1, 1, None),
    ("rate: no admissions yet", {"requests_per_minute": 1}, counters(), 0, None, 1, 1, None),
    ("rate: window full", {"requests_per_minute": 2}, counters(), 0, [NOW - 30, NOW - 10], 1, 1, "rate_limit"),
    (
        "rate: old admissions expired",
        {"requests_per_minute": 2},
        counters(),
        0,
        [NOW - 90, NOW - 61, NOW - 10],
        1,
        1,
        None,
    ),
    ("concurrency: one slot left", {"max_concurrent_tasks": 2}, counters(), 1, None, 1, 1, None),
    ("concurrency: full", {"max_concurrent_tasks": 2}, counters(), 2, None, 1, 1, "concurrency"),
    ("budget: fits exactly", {"budget_micros": 1_000_000}, counters(500_000, 300_000), 0, None, 200_000, 1, None),
    (
        "budget: one micro over",
        {"budget_micros": 1_000_000},
        counters(500_000, 300_000),
        0,
        None,
        200_001,
        1,
        "budget_usd",
    ),
    (
        "budget: reservations count",
        {"budget_micros": 1_000_000},
        counters(0, 900_000),
        0,
        None,
        200_000,
        1,
        "budget_usd",
    ),
    ("budget: overdrawn", {"budget_micros": 1_000_000}, counters(1_200_000, 0), 0, None, 1, 1, "budget_usd"),
    ("budget: zero", {"budget_micros": 0}, counters(), 0, None, 1, 1, "budget_usd"),
    ("seconds: fits exactly", {"video_seconds": 30}, counters(0, 0, 20_000, 5_000), 0, None, 1, 5_000, None),
    ("seconds: one ms over", {"video_seconds": 30}, counters(0, 0, 20_000, 5_000), 0, None, 1, 5_001, "video_seconds"),
    (
        "rate before the rest",
        {"requests_per_minute": 1, "max_concurrent_tasks": 1, "budget_micros": 0, "video_seconds": 0},
        counters(),
        5,
        [NOW - 1],
        1,
        1,
        "rate_limit",
    ),
    (
        "concurrency before budget",
        {"max_concurrent_tasks": 1, "budget_micros": 0, "video_seconds": 0},
        counters(),
        1,
        None,
        1,
        1,
        "concurrency",
    ),
    ("budget before seconds", {"budget_micros": 0, "video_seconds": 0}, counters(), 0, None, 1, 1, "budget_usd"),
]

ERRORS = {
    "rate_limit": (RateLimited, 429, "rate_limit_exceeded", "rate_limit_exceeded"),
    "concurrency": (RateLimited, 429, "rate_limit_exceeded", "concurrency_limit_exceeded"),
    "budget_usd": (QuotaError, 429, "insufficient_quota", "budget_exceeded"),
    "video_seconds": (QuotaError, 429, "insufficient_quota", "budget_exceeded"),
}


@pytest.mark.parametrize("scope, name", SUBJECTS)
@pytest.mark.parametrize(
    "case, limits, used, in_flight, window, micros, ms, reason", CHECK_CASES, ids=[c[0] for c in CHECK_CASES]
)
def test_check(scope, name, case, limits, used, in_flight, window, micros, ms, reason):
    rejection = check(subject(scope, name, **limits), used, in_flight, window, NOW, micros, ms)
    if reason is None:
        assert rejection is None
        return
    assert rejection is not None and rejection.reason == reason
    kind, status, type_, code = ERRORS[reason]
    err = rejection.error
    assert isinstance(err, kind)
    assert (err.status, err.type, err.code) == (status, type_, code)
    assert err.body()["error"]["code"] == code
    assert f"{scope} {name!r}" in err.message


@pytest.mark.parametrize("scope, name", SUBJECTS)
def test_rate_rejection_carries_retry_after(scope, name):
    window = [NOW - 50.5, NOW - 10]
    rejection = check(subject(scope, name, requests_per_minute=2), counters(), 0, window, NOW, 1, 1)
    assert rejection.error.retry_after == 10  # the admission 50.5 s old leaves the window in 9.5 s
    assert rejection.error.headers() == {"Retry-After": "10"}


@pytest.mark.parametrize(
    "reason, limits, used, micros, ms",
    [
        ("budget_usd", {"budget_micros": 50_000_000}, counters(49_500_000), 1_000_000, 5_000),
        ("video_seconds", {"video_seconds": 100}, counters(0, 0, 98_000), 1_000_000, 5_000),
    ],
)
def test_budget_rejection_message_states_the_figures(reason, limits, used, micros, ms):
    rejection = check(subject("user", "alice", **limits), used, 0, None, NOW, micros, ms)
    assert rejection.reason == reason
    if reason == "budget_usd":
        assert "$50.00" in rejection.error.message and "$1.00" in rejection.error.message
        assert "$0.50 remains" in rejection.error.message
    else:
        assert "100 s" in rejection.error.message and "98 s used" in rejection.error.message
