import random
from dataclasses import replace
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import ConnectFailed, NoUpstreamKey, UpstreamError, UpstreamTimeout
from gateway.metrics import Metrics
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
from gateway.settings import Secret, UpstreamKey, UpstreamSettings
from gateway.tokenhub import PROBE_TASK_ID, parse_retry_after, task_path
from gateway.upstream.client import Reply
from gateway.upstream.keypool import KeyPool

M = "doubao-seedance-2.0"
FAST = "doubao-seedance-2.0-fast"
NOW = 1_800_000_000.0
CFG = UpstreamSettings(
    base_url="https://tokenhub.test/api/v1", keys=(), cooldown_s=30, breaker_failures=5, breaker_open_s=30
)


def key(name, weight=1, max_tasks=10, models=None, value=None):
    return UpstreamKey(
        name=name,
        value=Secret(value or f"th-{name}-0123456789abcd"),
        weight=weight,
        max_concurrent_tasks=max_tasks,
        models=None if models is None else frozenset(models),
    )


def http_date(ts):
    return format_datetime(datetime.fromtimestamp(ts, timezone.utc), usegmt=True)


def fail(h, now, n, error="upstream_server_error"):
    for _ in range(n):
        h = on_failure(h, now, error, CFG)
    return h


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
    h = on_reply(KeyHealth(), NOW, 429, None, parse_retry_after(header, NOW), CFG, random.Random(1))
    assert h.state == COOLDOWN and h.until == pytest.approx(NOW + 120)
    assert not h.usable(NOW) and not h.usable(NOW + 119.5)
    assert h.current(NOW + 120) == OK and h.usable(NOW + 120)


def test_429_without_retry_after_backs_off_exponentially_capped_at_10x_with_jitter():
    rng, h, now = random.Random(7), KeyHealth(), NOW
    for n in range(14):
        h = on_throttled(h, now, None, CFG, rng)
        base = min(CFG.cooldown_s * 2**n, CFG.cooldown_s * 10)
        wait = h.until - now
        assert 0.8 * base <= wait <= 1.2 * base, (n, wait)
        now = h.until  # usable again, then throttled again with no success in between
    assert h.throttles == 14


def test_429_jitter_spreads_over_plus_minus_20_percent():
    waits = [on_throttled(KeyHealth(), NOW, None, CFG, random.Random(seed)).until - NOW for seed in range(2000)]
    assert all(0.8 * 30 <= w <= 1.2 * 30 for w in waits)
    assert min(waits) < 0.82 * 30 and max(waits) > 1.18 * 30


def test_success_after_cooldown_resets_the_back_off():
    rng = random.Random(3)
    h = on_throttled(
        on_throttled(on_throttled(KeyHealth(), NOW, None, CFG, rng), NOW, None, CFG, rng), NOW, None, CFG, rng
    )
    later = h.until + 1
    h = on_success(h, later)
    assert h.state == OK and h.throttles == 0
    h = on_throttled(h, later, None, CFG, rng)
    assert 24 <= h.until - later <= 36


# --- 401/403: disabled ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_disable_the_key_until_reload(status):
    rng = random.Random(0)
    h = on_reply(KeyHealth(), NOW, status, None, None, CFG, rng)
    assert h.state == DISABLED and h.last_error == str(status)
    for step in (
        lambda h: on_success(h, NOW + 1),
        lambda h: on_reply(h, NOW + 2, 200, None, None, CFG, rng),
        lambda h: on_reply(h, NOW + 3, 404, None, None, CFG, rng),
        lambda h: on_throttled(h, NOW + 4, 5.0, CFG, rng),
        lambda h: fail(h, NOW + 5, 10),
    ):
        h = step(h)
        assert h.state == DISABLED
    assert not h.usable(NOW + 10_000) and not h.needs_probe(NOW + 10_000)


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
    rng, h = random.Random(0), KeyHealth()
    for _ in range(CFG.breaker_failures - 1):
        h = on_reply(h, NOW, status, error, None, CFG, rng)
    assert h.state == OK and h.usable(NOW) and h.failures == CFG.breaker_failures - 1
    h = on_reply(h, NOW, status, error, None, CFG, rng)
    assert h.state == OPEN and h.until == NOW + CFG.breaker_open_s
    assert not h.usable(NOW)
    assert not h.needs_probe(NOW + CFG.breaker_open_s - 0.1)
    assert h.needs_probe(NOW + CFG.breaker_open_s)
    assert not h.usable(NOW + CFG.breaker_open_s + 100)  # an open circuit waits for its probe


def test_probe_healthy_closes_the_circuit_unhealthy_keeps_it_open():
    h = fail(KeyHealth(), NOW, CFG.breaker_failures)
    later = NOW + CFG.breaker_open_s
    healed = on_probe(h, later, True, "404", CFG)
    assert healed.state == OK and healed.failures == 0 and healed.usable(later)
    still = on_probe(h, later, False, "500", CFG)
    assert still.state == OPEN and still.until == later + CFG.breaker_open_s
    assert not still.needs_probe(later + 1) and still.needs_probe(later + CFG.breaker_open_s)
    assert still.last_error == "500"


@pytest.mark.parametrize("success_status", [200, 201, 400, 404, 422])
def test_a_success_resets_the_failure_count(success_status):
    rng = random.Random(0)
    h = fail(KeyHealth(), NOW, CFG.breaker_failures - 1)
    h = on_reply(h, NOW, success_status, None, None, CFG, rng)
    assert h.failures == 0
    h = fail(h, NOW, CFG.breaker_failures - 1)
    assert h.state == OK and h.usable(NOW)


def test_success_does_not_close_an_open_circuit():
    h = on_success(fail(KeyHealth(), NOW, CFG.breaker_failures), NOW + 1)
    assert h.state == OPEN and not h.usable(NOW + 1)


# --- choice -----------------------------------------------------------------------------------

CHOICE_CASES = [
    # (case, candidate key, its health, its tasks in flight, chosen?)
    ("healthy", key("x"), KeyHealth(), 0, True),
    ("model allowed", key("x", models=[M]), KeyHealth(), 0, True),
    ("model not allowed", key("x", models=[FAST]), KeyHealth(), 0, False),
    ("disabled", key("x"), KeyHealth(state=DISABLED), 0, False),
    ("cooling", key("x"), KeyHealth(state=COOLDOWN, until=NOW + 5), 0, False),
    ("cooldown over", key("x"), KeyHealth(state=COOLDOWN, until=NOW - 1), 0, True),
    ("open", key("x"), KeyHealth(state=OPEN, until=NOW + 5), 0, False),
    ("open, due for probe", key("x"), KeyHealth(state=OPEN, until=NOW - 5), 0, False),
    ("at max_concurrent_tasks", key("x", max_tasks=3), KeyHealth(), 3, False),
    ("one slot left", key("x", max_tasks=3), KeyHealth(), 2, True),
]


@pytest.mark.parametrize("case, candidate, health, busy, chosen", CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_choose_skips_unusable_keys(case, candidate, health, busy, chosen):
    keys = (key("good"), candidate)
    order = choose(keys, {"x": health}, {"x": busy}, M, NOW, random.Random(0))
    assert [k.name for k in order if k.name == "x"] == (["x"] if chosen else [])
    assert "good" in [k.name for k in order]


def test_choose_returns_nothing_when_no_key_is_usable():
    keys = (key("a", models=[FAST]), key("b"))
    assert choose(keys, {"b": KeyHealth(state=DISABLED)}, {}, M, NOW, random.Random(0)) == []


def test_choose_orders_every_usable_key_as_fallbacks():
    keys = (key("a"), key("b"), key("c"))
    order = choose(keys, {}, {}, M, NOW, random.Random(5))
    assert sorted(k.name for k in order) == ["a", "b", "c"]


def first_choice_shares(keys, in_flight, draws=20_000, seed=42):
    rng, counts = random.Random(seed), dict.fromkeys((k.name for k in keys), 0)
    for _ in range(draws):
        counts[choose(keys, {}, in_flight, M, NOW, rng)[0].name] += 1
    return {name: n / draws for name, n in counts.items()}


def test_idle_keys_share_creates_by_weight():
    shares = first_choice_shares((key("w1", weight=1), key("w2", weight=2), key("w3", weight=3)), {})
    for name, expected in (("w1", 1 / 6), ("w2", 2 / 6), ("w3", 3 / 6)):
        assert shares[name] == pytest.approx(expected, abs=0.02)


def test_a_loaded_key_is_chosen_less():
    keys = (key("busy"), key("idle"))
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
    assert earliest_retry((key("a"), key("b")), health, NOW) == expected


# --- KeyPool (store-backed shell) -------------------------------------------------------------


class FakeStore:
    def __init__(self, in_flight=None):
        self.health: dict[str, KeyHealth] = {}
        self.in_flight = dict(in_flight or {})

    async def key_health(self):
        return dict(self.health)

    async def save_key_health(self, name, health):
        self.health[name] = health

    async def key_in_flight(self):
        return dict(self.in_flight)


class FakeUpstream:
    def __init__(self, status=404, raises=None):
        self.status, self.raises, self.calls = status, raises, []

    async def call(self, method, path, key, body=None):
        self.calls.append((method, path, key))
        if self.raises is not None:
            raise self.raises
        return Reply(self.status, b"{}", None, 0.01)


class Clock:
    def __init__(self, t=NOW):
        self.t = t

    def __call__(self):
        return self.t


def make_pool(*keys, in_flight=None, seed=0):
    settings = replace(CFG, keys=tuple(keys) or (key("a"), key("b")))
    store, metrics, clock = FakeStore(in_flight), Metrics(CollectorRegistry()), Clock()
    return KeyPool(settings, store, metrics, clock=clock, rng=random.Random(seed)), store, metrics, clock


def gauge(metrics, name, state):
    return metrics.registry.get_sample_value("tokenhub_gateway_upstream_key_state", {"key": name, "state": state})


@pytest.mark.parametrize("header", ["20", http_date(NOW + 20)], ids=["seconds", "http-date"])
async def test_pool_report_429_cools_the_key_and_it_comes_back(header):
    pool, store, metrics, clock = make_pool()
    await pool.report("a", 429, retry_after=header)
    assert store.health["a"].state == COOLDOWN and store.health["a"].until == pytest.approx(NOW + 20)
    assert gauge(metrics, "a", "cooldown") == 1 and gauge(metrics, "a", "ok") == 0
    assert [k.name for k in await pool.candidates(M)] == ["b"]
    clock.t = NOW + 20
    assert sorted(k.name for k in await pool.candidates(M)) == ["a", "b"]


async def test_pool_disabled_key_stays_disabled_until_reenable():
    pool, store, metrics, clock = make_pool()
    await pool.report("a", 401)
    await pool.report("b", 403)
    assert await pool.all_disabled()
    for status in (200, 404):
        await pool.report("a", status)
    clock.t += 3600
    assert store.health["a"].state == DISABLED and await pool.candidates(M) == []
    assert gauge(metrics, "a", "disabled") == 1
    await pool.reenable()
    assert {n: h.state for n, h in store.health.items()} == {"a": OK, "b": OK}
    assert not await pool.all_disabled()
    assert sorted(k.name for k in await pool.candidates(M)) == ["a", "b"]
    assert gauge(metrics, "a", "ok") == 1 and gauge(metrics, "a", "disabled") == 0


async def test_pool_reenable_leaves_cooling_and_open_keys_alone():
    pool, store, _, _ = make_pool()
    await pool.report("a", 429, retry_after="60")
    for _ in range(CFG.breaker_failures):
        await pool.report("b", 503)
    await pool.reenable()
    assert store.health["a"].state == COOLDOWN and store.health["b"].state == OPEN


async def test_pool_probe_with_404_closes_a_due_circuit_and_skips_keys_not_due():
    pool, store, metrics, clock = make_pool(key("due"), key("early"), key("fine"), key("off"))
    for name in ("due", "early"):
        for _ in range(CFG.breaker_failures):
            await pool.report(name, None, error="upstream_timeout")
    store.health["early"] = replace(store.health["early"], until=NOW + 10 * CFG.breaker_open_s)
    await pool.report("fine", 200)
    await pool.report("off", 401)
    assert gauge(metrics, "due", "open") == 1

    upstream = FakeUpstream(status=404)
    clock.t = NOW + CFG.breaker_open_s
    await pool.probe(upstream)

    assert upstream.calls == [("GET", task_path(PROBE_TASK_ID), "th-due-0123456789abcd")]
    assert store.health["due"].state == OK and store.health["due"].failures == 0
    assert gauge(metrics, "due", "ok") == 1 and gauge(metrics, "due", "open") == 0
    assert store.health["early"].state == OPEN and store.health["off"].state == DISABLED
    assert "due" in [k.name for k in await pool.candidates(M)]


async def test_pool_probe_makes_no_call_before_the_circuit_is_due():
    pool, store, _, clock = make_pool()
    for _ in range(CFG.breaker_failures):
        await pool.report("a", 500)
    upstream = FakeUpstream(status=404)
    clock.t = NOW + CFG.breaker_open_s - 1
    await pool.probe(upstream)
    assert upstream.calls == [] and store.health["a"].state == OPEN


@pytest.mark.parametrize(
    "upstream",
    [
        FakeUpstream(status=500),
        FakeUpstream(status=200),
        FakeUpstream(raises=ConnectFailed("down")),
        FakeUpstream(raises=UpstreamTimeout("slow")),
        FakeUpstream(raises=UpstreamError("cut off")),
    ],
    ids=["500", "200", "connect", "timeout", "cut-off"],
)
async def test_pool_failed_probe_keeps_the_circuit_open(upstream):
    pool, store, _, clock = make_pool()
    for _ in range(CFG.breaker_failures):
        await pool.report("a", 502)
    clock.t = NOW + CFG.breaker_open_s
    await pool.probe(upstream)
    h = store.health["a"]
    assert len(upstream.calls) == 1
    assert h.state == OPEN and h.until == clock.t + CFG.breaker_open_s
    assert [k.name for k in await pool.candidates(M)] == ["b"]


@pytest.mark.parametrize("status", [401, 403])
async def test_pool_probe_rejected_disables_the_key(status):
    pool, store, _, clock = make_pool()
    for _ in range(CFG.breaker_failures):
        await pool.report("a", 502)
    clock.t = NOW + CFG.breaker_open_s
    await pool.probe(FakeUpstream(status=status))
    assert store.health["a"].state == DISABLED


async def test_pool_candidates_respect_store_in_flight_and_no_key_error_has_retry_after():
    pool, store, _, _ = make_pool(key("a", max_tasks=2), key("b", models=[FAST]), in_flight={"a": 2})
    assert await pool.candidates(M) == []
    await pool.report("b", 429, retry_after="9")
    err = await pool.no_key_error(FAST)
    assert isinstance(err, NoUpstreamKey)
    assert err.status == 503 and err.code == "no_upstream_key" and err.retry_after == 9
    assert err.headers() == {"Retry-After": "9"}


async def test_pool_keeps_removed_keys_for_polling_after_reload():
    pool, _, _, _ = make_pool(key("a"), key("b"))
    pool.apply(replace(CFG, keys=(key("b"), key("c"))))
    assert pool.key_for("a").name == "a" and pool.key_for("c").name == "c"
    assert pool.key_for(None) is None and pool.key_for("nope") is None
    assert [k.name for k in pool.keys] == ["b", "c"]


async def test_pool_refresh_gauges_shows_each_key_state_once():
    pool, store, metrics, _ = make_pool()
    store.health["a"] = KeyHealth(state=COOLDOWN, until=NOW + 30)
    await pool.refresh_gauges()
    assert [gauge(metrics, "a", s) for s in (OK, COOLDOWN, DISABLED, OPEN)] == [0, 1, 0, 0]
    assert [gauge(metrics, "b", s) for s in (OK, COOLDOWN, DISABLED, OPEN)] == [1, 0, 0, 0]
