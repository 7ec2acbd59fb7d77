"""The store-backed key pool (gateway/upstream/keypool.py): reports saved as key health, candidates, probes,
re-enabling, reloads and the key-state gauges. The pure key-health functions are tested in
tests/policy/test_keyhealth.py."""

import random
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import ConnectFailed, NoUpstreamKey, UpstreamError, UpstreamTimeout
from gateway.metrics import Metrics
from gateway.policy.keyhealth import COOLDOWN, DISABLED, OK, OPEN, KeyHealth
from gateway.tokenhub import PROBE_TASK_ID, task_path
from gateway.upstream.keypool import KeyPool
from tests.doubles import FAST, MODEL, UPSTREAM_SETTINGS, FakeClock, FakeUpstream, http_date, upstream_key

NOW = 1_800_000_000.0


class FakeStore:
    def __init__(self, in_flight=None):
        self.health: dict[str, KeyHealth] = {}
        self.in_flight = dict(in_flight or {})

    async def key_health(self, fresh=False):
        return dict(self.health)

    async def save_key_health(self, name, health):
        self.health[name] = health

    async def key_in_flight(self):
        return dict(self.in_flight)


def make_pool(*keys, in_flight=None, seed=0):
    settings = replace(UPSTREAM_SETTINGS, keys=tuple(keys) or (upstream_key("a"), upstream_key("b")))
    store = FakeStore(in_flight)
    metrics = Metrics(CollectorRegistry())
    clock = FakeClock(NOW)
    return KeyPool(settings, store, metrics, clock=clock, rng=random.Random(seed)), store, metrics, clock


def gauge(metrics, name, state):
    return metrics.registry.get_sample_value("tokenhub_gateway_upstream_key_state", {"key": name, "state": state})


@pytest.mark.parametrize("header", ["20", http_date(NOW + 20)], ids=["seconds", "http-date"])
async def test_pool_report_429_cools_the_key_and_it_comes_back(header):
    pool, store, metrics, clock = make_pool()
    await pool.report("a", 429, retry_after=header)
    assert store.health["a"].state == COOLDOWN and store.health["a"].until == pytest.approx(NOW + 20)
    assert gauge(metrics, "a", "cooldown") == 1 and gauge(metrics, "a", "ok") == 0
    assert [k.name for k in await pool.candidates(MODEL)] == ["b"]
    clock.now = NOW + 20
    assert sorted(k.name for k in await pool.candidates(MODEL)) == ["a", "b"]


async def test_pool_disabled_key_stays_disabled_until_reenable():
    pool, store, metrics, clock = make_pool()
    await pool.report("a", 401)
    await pool.report("b", 403)
    assert await pool.all_disabled()
    for status in (200, 404):
        await pool.report("a", status)
    clock.now += 3600
    assert store.health["a"].state == DISABLED and await pool.candidates(MODEL) == []
    assert gauge(metrics, "a", "disabled") == 1
    await pool.reenable()
    assert {n: h.state for n, h in store.health.items()} == {"a": OK, "b": OK}
    assert not await pool.all_disabled()
    assert sorted(k.name for k in await pool.candidates(MODEL)) == ["a", "b"]
    assert gauge(metrics, "a", "ok") == 1 and gauge(metrics, "a", "disabled") == 0


async def test_pool_reenable_leaves_cooling_and_open_keys_alone():
    pool, store, _, _ = make_pool()
    await pool.report("a", 429, retry_after="60")
    for _ in range(UPSTREAM_SETTINGS.breaker_failures):
        await pool.report("b", 503)
    await pool.reenable()
    assert store.health["a"].state == COOLDOWN and store.health["b"].state == OPEN


async def test_pool_probe_with_404_closes_a_due_circuit_and_skips_keys_not_due():
    pool, store, metrics, clock = make_pool(
        upstream_key("due"), upstream_key("early"), upstream_key("fine"), upstream_key("off")
    )
    for name in ("due", "early"):
        for _ in range(UPSTREAM_SETTINGS.breaker_failures):
            await pool.report(name, None, error="upstream_timeout")
    store.health["early"] = replace(store.health["early"], until=NOW + 10 * UPSTREAM_SETTINGS.breaker_open_s)
    await pool.report("fine", 200)
    await pool.report("off", 401)
    assert gauge(metrics, "due", "open") == 1

    upstream = FakeUpstream(status=404)
    clock.now = NOW + UPSTREAM_SETTINGS.breaker_open_s
    await pool.probe(upstream)

    assert upstream.calls == [("GET", task_path(PROBE_TASK_ID), "th-due-0123456789abcd")]
    assert store.health["due"].state == OK and store.health["due"].failures == 0
    assert gauge(metrics, "due", "ok") == 1 and gauge(metrics, "due", "open") == 0
    assert store.health["early"].state == OPEN and store.health["off"].state == DISABLED
    assert "due" in [k.name for k in await pool.candidates(MODEL)]


async def test_pool_probe_makes_no_call_before_the_circuit_is_due():
    pool, store, _, clock = make_pool()
    for _ in range(UPSTREAM_SETTINGS.breaker_failures):
        await pool.report("a", 500)
    upstream = FakeUpstream(status=404)
    clock.now = NOW + UPSTREAM_SETTINGS.breaker_open_s - 1
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
    for _ in range(UPSTREAM_SETTINGS.breaker_failures):
        await pool.report("a", 502)
    clock.now = NOW + UPSTREAM_SETTINGS.breaker_open_s
    await pool.probe(upstream)
    health = store.health["a"]
    assert len(upstream.calls) == 1
    assert health.state == OPEN and health.until == clock.now + UPSTREAM_SETTINGS.breaker_open_s
    assert [k.name for k in await pool.candidates(MODEL)] == ["b"]


@pytest.mark.parametrize("status", [401, 403])
async def test_pool_probe_rejected_disables_the_key(status):
    pool, store, _, clock = make_pool()
    for _ in range(UPSTREAM_SETTINGS.breaker_failures):
        await pool.report("a", 502)
    clock.now = NOW + UPSTREAM_SETTINGS.breaker_open_s
    await pool.probe(FakeUpstream(status=status))
    assert store.health["a"].state == DISABLED


async def test_pool_candidates_respect_store_in_flight_and_no_key_error_has_retry_after():
    pool, store, _, _ = make_pool(upstream_key("a", max_tasks=2), upstream_key("b", models=[FAST]), in_flight={"a": 2})
    assert await pool.candidates(MODEL) == []
    await pool.report("b", 429, retry_after="9")
    err = await pool.no_key_error(FAST)
    assert isinstance(err, NoUpstreamKey)
    assert err.status == 503 and err.code == "no_upstream_key" and err.retry_after == 9
    assert err.headers() == {"Retry-After": "9"}


async def test_pool_keeps_removed_keys_for_polling_after_reload():
    pool, _, _, _ = make_pool(upstream_key("a"), upstream_key("b"))
    pool.apply(replace(UPSTREAM_SETTINGS, keys=(upstream_key("b"), upstream_key("c"))))
    assert pool.key_for("a").name == "a" and pool.key_for("c").name == "c"
    assert pool.key_for(None) is None and pool.key_for("nope") is None
    assert [k.name for k in pool.keys] == ["b", "c"]


async def test_pool_refresh_gauges_shows_each_key_state_once():
    pool, store, metrics, _ = make_pool()
    store.health["a"] = KeyHealth(state=COOLDOWN, until=NOW + 30)
    await pool.refresh_gauges()
    assert [gauge(metrics, "a", s) for s in (OK, COOLDOWN, DISABLED, OPEN)] == [0, 1, 0, 0]
    assert [gauge(metrics, "b", s) for s in (OK, COOLDOWN, DISABLED, OPEN)] == [1, 0, 0, 0]
