"""Key health, pure: Retry-After, cooldown after a 429, disabling after 401/403, the circuit breaker, the
choice of a key and the earliest retry (gateway/policy/keyhealth.py). The store-backed pool is tested in
tests/upstream/test_keypool.py."""

import random

import pytest

from gateway.policy.keyhealth import (
    COOLDOWN,
    DISABLED,
    OK,
    OPEN,
    KeyHealth,
    choose,
    earliest_retry,
    on_failure,
    on_probe,
    on_reply,
    on_success,
    on_throttled,
)
from gateway.tokenhub import parse_retry_after
from tests.doubles import FAST, MODEL, UPSTREAM_SETTINGS, http_date, upstream_key

NOW = 1_800_000_000.0


def fail(health: KeyHealth, now: float, times: int, error: str = "upstream_server_error") -> KeyHealth:
    for _ in range(times):
        health = on_failure(health, now, error, UPSTREAM_SETTINGS)
    return health


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        (http_date(NOW + 45), 45.0),
        (http_date(NOW - 300), 0.0),  # a date in the past: retry now
        ("soon", None),
        ("-5", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected


# --- 429: cooldown ----------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["120", http_date(NOW + 120)], ids=["seconds", "http-date"])
def test_429_with_retry_after_cools_down_until_then(header):
    health = on_reply(KeyHealth(), NOW, 429, None, parse_retry_after(header, NOW), UPSTREAM_SETTINGS, random.Random(1))
    assert health.state == COOLDOWN and health.until == pytest.approx(NOW + 120)
    assert not health.usable(NOW) and not health.usable(NOW + 119.5)
    assert health.current(NOW + 120) == OK and health.usable(NOW + 120)


def test_429_without_retry_after_backs_off_exponentially_capped_at_10x_with_jitter():
    rng = random.Random(7)
    health = KeyHealth()
    now = NOW
    for attempt in range(14):
        health = on_throttled(health, now, None, UPSTREAM_SETTINGS, rng)
        base = min(UPSTREAM_SETTINGS.cooldown_s * 2**attempt, UPSTREAM_SETTINGS.cooldown_s * 10)
        wait = health.until - now
        assert 0.8 * base <= wait <= 1.2 * base, (attempt, wait)
        now = health.until  # usable again, then throttled again with no success in between
    assert health.throttles == 14


def test_429_jitter_spreads_over_plus_minus_20_percent():
    waits = [
        on_throttled(KeyHealth(), NOW, None, UPSTREAM_SETTINGS, random.Random(seed)).until - NOW for seed in range(2000)
    ]
    assert all(0.8 * 30 <= w <= 1.2 * 30 for w in waits)
    assert min(waits) < 0.82 * 30 and max(waits) > 1.18 * 30


def test_success_after_cooldown_resets_the_back_off():
    rng = random.Random(3)
    health = on_throttled(
        on_throttled(on_throttled(KeyHealth(), NOW, None, UPSTREAM_SETTINGS, rng), NOW, None, UPSTREAM_SETTINGS, rng),
        NOW,
        None,
        UPSTREAM_SETTINGS,
        rng,
    )
    later = health.until + 1
    health = on_success(health, later)
    assert health.state == OK and health.throttles == 0
    health = on_throttled(health, later, None, UPSTREAM_SETTINGS, rng)
    assert 24 <= health.until - later <= 36


# --- 401/403: disabled ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_disable_the_key_until_reload(status):
    rng = random.Random(0)
    health = on_reply(KeyHealth(), NOW, status, None, None, UPSTREAM_SETTINGS, rng)
    assert health.state == DISABLED and health.last_error == str(status)
    for step in (
        lambda health: on_success(health, NOW + 1),
        lambda health: on_reply(health, NOW + 2, 200, None, None, UPSTREAM_SETTINGS, rng),
        lambda health: on_reply(health, NOW + 3, 404, None, None, UPSTREAM_SETTINGS, rng),
        lambda health: on_throttled(health, NOW + 4, 5.0, UPSTREAM_SETTINGS, rng),
        lambda health: fail(health, NOW + 5, 10),
    ):
        health = step(health)
        assert health.state == DISABLED
    assert not health.usable(NOW + 10_000) and not health.needs_probe(NOW + 10_000)


# --- circuit breaker --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, error",
    [
        (500, None),
        (502, None),
        (503, None),
        (None, "upstream_unreachable"),
        (None, "upstream_timeout"),
    ],
)
def test_consecutive_failures_open_the_circuit(status, error):
    rng, health = random.Random(0), KeyHealth()
    for _ in range(UPSTREAM_SETTINGS.breaker_failures - 1):
        health = on_reply(health, NOW, status, error, None, UPSTREAM_SETTINGS, rng)
    assert health.state == OK and health.usable(NOW) and health.failures == UPSTREAM_SETTINGS.breaker_failures - 1
    health = on_reply(health, NOW, status, error, None, UPSTREAM_SETTINGS, rng)
    assert health.state == OPEN and health.until == NOW + UPSTREAM_SETTINGS.breaker_open_s
    assert not health.usable(NOW)
    assert not health.needs_probe(NOW + UPSTREAM_SETTINGS.breaker_open_s - 0.1)
    assert health.needs_probe(NOW + UPSTREAM_SETTINGS.breaker_open_s)
    assert not health.usable(NOW + UPSTREAM_SETTINGS.breaker_open_s + 100)  # an open circuit waits for its probe


def test_probe_healthy_closes_the_circuit_unhealthy_keeps_it_open():
    health = fail(KeyHealth(), NOW, UPSTREAM_SETTINGS.breaker_failures)
    later = NOW + UPSTREAM_SETTINGS.breaker_open_s
    healed = on_probe(health, later, True, "404", UPSTREAM_SETTINGS)
    assert healed.state == OK and healed.failures == 0 and healed.usable(later)
    still = on_probe(health, later, False, "500", UPSTREAM_SETTINGS)
    assert still.state == OPEN and still.until == later + UPSTREAM_SETTINGS.breaker_open_s
    assert not still.needs_probe(later + 1) and still.needs_probe(later + UPSTREAM_SETTINGS.breaker_open_s)
    assert still.last_error == "500"


@pytest.mark.parametrize("success_status", [200, 201, 400, 404, 422])
def test_a_success_resets_the_failure_count(success_status):
    rng = random.Random(0)
    health = fail(KeyHealth(), NOW, UPSTREAM_SETTINGS.breaker_failures - 1)
    health = on_reply(health, NOW, success_status, None, None, UPSTREAM_SETTINGS, rng)
    assert health.failures == 0
    health = fail(health, NOW, UPSTREAM_SETTINGS.breaker_failures - 1)
    assert health.state == OK and health.usable(NOW)


def test_success_does_not_close_an_open_circuit():
    health = on_success(fail(KeyHealth(), NOW, UPSTREAM_SETTINGS.breaker_failures), NOW + 1)
    assert health.state == OPEN and not health.usable(NOW + 1)


# --- choice -----------------------------------------------------------------------------------

CHOICE_CASES = [
    # (case, candidate key, its health, its tasks in flight, chosen?)
    ("healthy", upstream_key("x"), KeyHealth(), 0, True),
    ("model allowed", upstream_key("x", models=[MODEL]), KeyHealth(), 0, True),
    ("model not allowed", upstream_key("x", models=[FAST]), KeyHealth(), 0, False),
    ("disabled", upstream_key("x"), KeyHealth(state=DISABLED), 0, False),
    ("cooling", upstream_key("x"), KeyHealth(state=COOLDOWN, until=NOW + 5), 0, False),
    ("cooldown over", upstream_key("x"), KeyHealth(state=COOLDOWN, until=NOW - 1), 0, True),
    ("open", upstream_key("x"), KeyHealth(state=OPEN, until=NOW + 5), 0, False),
    ("open, due for probe", upstream_key("x"), KeyHealth(state=OPEN, until=NOW - 5), 0, False),
    ("at max_concurrent_tasks", upstream_key("x", max_tasks=3), KeyHealth(), 3, False),
    ("one slot left", upstream_key("x", max_tasks=3), KeyHealth(), 2, True),
]


@pytest.mark.parametrize("case, candidate, health, busy, chosen", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_choose_skips_unusable_keys(case, candidate, health, busy, chosen):
    keys = (upstream_key("good"), candidate)
    order = choose(keys, {"x": health}, {"x": busy}, MODEL, NOW, random.Random(0))
    assert [k.name for k in order if k.name == "x"] == (["x"] if chosen else [])
    assert "good" in [k.name for k in order]


def test_choose_returns_nothing_when_no_key_is_usable():
    keys = (upstream_key("a", models=[FAST]), upstream_key("b"))
    assert choose(keys, {"b": KeyHealth(state=DISABLED)}, {}, MODEL, NOW, random.Random(0)) == []


def test_choose_orders_every_usable_key_as_fallbacks():
    keys = (upstream_key("a"), upstream_key("b"), upstream_key("c"))
    order = choose(keys, {}, {}, MODEL, NOW, random.Random(5))
    assert sorted(k.name for k in order) == ["a", "b", "c"]


def first_choice_shares(keys, in_flight, draws=20_000, seed=42):
    rng, counts = random.Random(seed), dict.fromkeys((k.name for k in keys), 0)
    for _ in range(draws):
        counts[choose(keys, {}, in_flight, MODEL, NOW, rng)[0].name] += 1
    return {name: n / draws for name, n in counts.items()}


def test_idle_keys_share_creates_by_weight():
    shares = first_choice_shares(
        (upstream_key("w1", weight=1), upstream_key("w2", weight=2), upstream_key("w3", weight=3)), {}
    )
    for name, expected in (("w1", 1 / 6), ("w2", 2 / 6), ("w3", 3 / 6)):
        assert shares[name] == pytest.approx(expected, abs=0.02)


def test_a_loaded_key_is_chosen_less():
    keys = (upstream_key("busy"), upstream_key("idle"))
    shares = first_choice_shares(keys, {"busy": 8, "idle": 0})
    assert shares["busy"] < shares["idle"]
    assert shares["busy"] == pytest.approx(0.2 / 1.2, abs=0.02)  # odds ∝ weight × free share of slots


# --- earliest_retry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "health, expected",
    [
        ({}, 1),
        ({"a": KeyHealth(state=DISABLED)}, 1),
        ({"a": KeyHealth(state=COOLDOWN, until=NOW + 10.2)}, 11),
        ({"a": KeyHealth(state=COOLDOWN, until=NOW + 40), "b": KeyHealth(state=COOLDOWN, until=NOW + 7)}, 7),
        ({"a": KeyHealth(state=OPEN, until=NOW + 25), "b": KeyHealth(state=COOLDOWN, until=NOW + 60)}, 25),
        ({"a": KeyHealth(state=COOLDOWN, until=NOW - 3)}, 1),
        ({"a": KeyHealth(state=DISABLED), "b": KeyHealth(state=COOLDOWN, until=NOW + 3)}, 3),
        ({"zz": KeyHealth(state=COOLDOWN, until=NOW + 2)}, 1),  # a key not asked about is ignored
    ],
)
def test_earliest_retry_is_the_soonest_cooldown_end(health, expected):
    assert earliest_retry((upstream_key("a"), upstream_key("b")), health, NOW) == expected
