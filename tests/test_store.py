"""One contract for every store: each test runs against SQLite and against a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import replace

import pytest

from gateway.config import Limits
from gateway.errors import IdempotencyConflict, QuotaError, RateLimited, StoreUnavailable
from gateway.keypool import KeyHealth
from gateway.quota import Subject, period_key
from gateway.store.base import Admission, Task
from gateway.store.redis import RedisStore
from gateway.store.sqlite import SQLiteStore
from tests.redis_server import RedisServer, require_redis_server

DOLLAR = 1_000_000
EST_MICROS, EST_MS = 3 * DOLLAR, 15_000  # 15 s at $0.20/s


@pytest.fixture(scope="session")
def redis_url():
    require_redis_server()
    server = RedisServer()
    yield server.start()
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(str(tmp_path / "gateway.db"))
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex[:8]}:")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def replicas(redis_url):
    """Two RedisStore instances on one server and one prefix: two gateway replicas."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    pair = [RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)]
    for s in pair:
        await s.open()
    yield pair
    for s in pair:
        await s.close()


def subjects(now: float, team: Limits = Limits(), user: Limits = Limits(),
             team_name: str = "marketing", user_name: str = "alice") -> tuple[Subject, Subject]:
    return (Subject("user", user_name, period_key(user.period, now), user),
            Subject("team", team_name, period_key(team.period, now), team))


def admission(now: float, team: Limits = Limits(), user: Limits = Limits(), *,
              team_name: str = "marketing", user_name: str = "alice", idem: str | None = None,
              body_hash: str | None = None, created_at: float | None = None, **task_fields) -> Admission:
    subs = subjects(now, team, user, team_name, user_name)
    task = Task(rid=uuid.uuid4().hex, team=team_name, user=user_name, model="doubao-seedance-2.0",
                resolution="720p", duration_s=10, input_ms=5000, input_estimated=False,
                estimate_ms=EST_MS, estimate_micros=EST_MICROS, team_period=subs[1].period,
                user_period=subs[0].period, created_at=created_at or now, updated_at=now,
                idem_key=idem, next_poll_at=now + 15)
    return Admission(replace(task, **task_fields), subs, body_hash or ("h" if idem else None))


async def admitted(store, now: float, **kw) -> Task:
    adm = admission(now, **kw)
    assert await store.admit(adm, now) is None
    return adm.task


async def created(store, now: float, task_id: str | None = None, **kw) -> Task:
    """A task admitted, given a key and recorded as created upstream."""
    task = await admitted(store, now, **kw)
    assert await store.acquire_key(task.rid, "primary", 100)
    task_id = task_id or "cgt-" + task.rid[:12]
    await store.record_created(task.rid, task_id, "queued", now, (200, b'{"id": "%s"}' % task_id.encode()))
    return await store.get_task(task_id)


async def figures(store, now: float, **kw) -> tuple:
    user, team = await store.usage(subjects(now, **kw))
    return user, team


# admission

async def test_admit_reserves_and_counts(store):
    now = await store.now()
    task = await admitted(store, now)
    user, team = await figures(store, now)
    for u in (user, team):
        assert (u.counters.reserved_micros, u.counters.reserved_ms, u.in_flight) == (EST_MICROS, EST_MS, 1)
        assert (u.counters.spent_micros, u.counters.spent_ms) == (0, 0)
    assert await store.backlog() == 1
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [task.rid]
    assert await store.get_task(task.rid) is None  # looked up by upstream task id only


async def test_task_round_trips_every_field(store):
    now = await store.now()
    task = await admitted(store, now, input_estimated=True, created_at=now - 0.123456)
    [stored] = await store.ledger(None, None, None, None, None)
    assert stored == task


@pytest.mark.parametrize(("scope", "limits", "reason", "error"), [
    ("team", Limits(budget_micros=4 * DOLLAR), "budget_usd", QuotaError),
    ("user", Limits(budget_micros=4 * DOLLAR), "budget_usd", QuotaError),
    ("team", Limits(video_seconds=20), "video_seconds", QuotaError),
    ("user", Limits(max_concurrent_tasks=1), "concurrency", RateLimited),
    ("team", Limits(requests_per_minute=1), "rate_limit", RateLimited),
])
async def test_each_limit_rejects_the_second_create(store, scope, limits, reason, error):
    now = await store.now()
    kw = {scope: limits}
    await admitted(store, now, **kw)
    before = await figures(store, now, **kw)
    rejection = await store.admit(admission(now, **kw), now)
    assert rejection is not None
    assert rejection.reason == reason
    assert type(rejection.error) is error
    assert f"{scope} " in rejection.error.message
    assert await figures(store, now, **kw) == before  # a rejected create holds nothing
    if reason == "rate_limit":
        assert 1 <= rejection.error.retry_after <= 60
        state = await store.rate_state("team", "marketing", 1, await store.now())
        assert (state.remaining, 0 < state.reset_s <= 60) == (0, True)


async def test_error_codes_of_rejections(store):
    now = await store.now()
    limits = Limits(max_concurrent_tasks=0)
    rejection = await store.admit(admission(now, team=limits), now)
    assert rejection.error.code == "concurrency_limit_exceeded"
    rejection = await store.admit(admission(now, team=Limits(budget_micros=DOLLAR)), now)
    assert (rejection.error.type, rejection.error.code) == ("insufficient_quota", "budget_exceeded")


async def test_concurrent_admits_admit_exactly_what_fits(store):
    now = await store.now()
    team = Limits(budget_micros=7 * EST_MICROS + EST_MICROS // 2)
    results = await asyncio.gather(*(store.admit(admission(now, team=team), now) for _ in range(50)))
    assert sum(r is None for r in results) == 7
    assert {r.reason for r in results if r} == {"budget_usd"}
    _, team_usage = await figures(store, now, team=team)
    assert (team_usage.counters.reserved_micros, team_usage.in_flight) == (7 * EST_MICROS, 7)


async def test_two_replicas_admit_exactly_what_fits(replicas):
    now = await replicas[0].now()
    team = Limits(budget_micros=7 * EST_MICROS, requests_per_minute=1000, max_concurrent_tasks=1000)
    results = await asyncio.gather(*(replicas[i % 2].admit(admission(now, team=team), now)
                                     for i in range(50)))
    assert sum(r is None for r in results) == 7
    for s in replicas:
        _, team_usage = await figures(s, now, team=team)
        assert (team_usage.counters.reserved_micros, team_usage.in_flight) == (7 * EST_MICROS, 7)


async def test_two_replicas_share_rate_window_and_key_health(replicas):
    a, b = replicas
    now = await a.now()
    team = Limits(requests_per_minute=3)
    results = await asyncio.gather(*(s.admit(admission(now, team=team), now) for s in (a, b) * 3))
    assert sum(r is None for r in results) == 3
    await a.save_key_health("primary", KeyHealth(state="disabled", last_error="401"))
    await asyncio.sleep(0.25)  # b's cached read expires
    assert (await b.key_health())["primary"].state == "disabled"


async def test_cancel_admission_gives_everything_back(store):
    now = await store.now()
    limits = Limits(requests_per_minute=1, budget_micros=EST_MICROS, max_concurrent_tasks=1)
    task = await admitted(store, now, team=limits, user=limits, idem="k1")
    await store.acquire_key(task.rid, "primary", 1)
    await store.cancel_admission(task.rid)
    for u in await figures(store, now, team=limits, user=limits):
        assert (u.counters.reserved_micros, u.counters.reserved_ms, u.in_flight) == (0, 0, 0)
    assert (await store.rate_state("team", "marketing", 1, await store.now())).remaining == 1
    assert await store.idem_get("marketing", "k1") is None
    assert (await store.key_in_flight()).get("primary", 0) == 0
    assert await store.ledger(None, None, None, None, None) == []
    assert await store.backlog() == 0
    await admitted(store, now, team=limits, user=limits, idem="k1")  # the same again fits
    await store.cancel_admission("no-such-rid")


async def test_raised_rate_limit_takes_effect(store):
    now = await store.now()
    for _ in range(2):
        await admitted(store, now, team=Limits(requests_per_minute=2))
    raised = Limits(requests_per_minute=3)
    assert await store.admit(admission(now, team=raised), now) is None
    rejection = await store.admit(admission(now, team=raised), now)
    assert rejection is not None and rejection.reason == "rate_limit"


# upstream keys

async def test_acquire_key_respects_the_limit_under_concurrency(store):
    now = await store.now()
    tasks = [await admitted(store, now) for _ in range(10)]
    got = await asyncio.gather(*(store.acquire_key(t.rid, "primary", 3) for t in tasks))
    assert sum(got) == 3
    assert (await store.key_in_flight())["primary"] == 3
    holder = tasks[got.index(True)]
    await store.release_key(holder.rid)
    await store.release_key(holder.rid)
    assert (await store.key_in_flight())["primary"] == 2
    assert await store.acquire_key(tasks[got.index(False)].rid, "primary", 3)


async def test_key_health_round_trip(store):
    assert await store.key_health() == {}
    sick = KeyHealth(state="cooldown", until=123.5, throttles=2, last_error="429", last_error_at=120.25)
    await store.save_key_health("primary", sick)
    await store.save_key_health("backup", KeyHealth())
    assert await store.key_health() == {"primary": sick, "backup": KeyHealth()}


# recorded tasks

async def test_record_created_then_get_and_list(store):
    now = await store.now()
    tasks = [await created(store, now, created_at=now + i, task_id=f"cgt-{i}") for i in range(5)]
    await admitted(store, now)  # still pending: not listed
    await created(store, now, team_name="sales", task_id="cgt-sales")
    assert tasks[2].task_id == "cgt-2" and tasks[2].status == "queued" and tasks[2].key_name == "primary"
    await store.set_status("cgt-3", "running", now + 1)
    page, more = await store.list_tasks("marketing", 2, None, None)
    assert [t.task_id for t in page] == ["cgt-4", "cgt-3"] and more
    page, more = await store.list_tasks("marketing", 2, "cgt-3", None)
    assert [t.task_id for t in page] == ["cgt-2", "cgt-1"] and more
    page, more = await store.list_tasks("marketing", 2, "cgt-1", None)
    assert [t.task_id for t in page] == ["cgt-0"] and not more
    page, more = await store.list_tasks("marketing", 10, None, "running")
    assert [t.task_id for t in page] == ["cgt-3"] and not more
    assert await store.list_tasks("marketing", 10, "cgt-sales", None) == ([], False)
    assert await store.list_tasks("marketing", 10, "cgt-unknown", None) == ([], False)
    assert await store.get_task("cgt-unknown") is None


async def test_list_orders_ties_by_rid(store):
    now = await store.now()
    twins = [await created(store, now, rid=rid, task_id=f"cgt-{rid}") for rid in ("a" * 32, "b" * 32, "c" * 32)]
    page, more = await store.list_tasks("marketing", 1, None, None)
    assert [t.rid for t in page] == [twins[2].rid] and more
    page, more = await store.list_tasks("marketing", 5, page[0].task_id, None)
    assert [t.rid for t in page] == [twins[1].rid, twins[0].rid] and not more


async def test_settle_exactly_once(store):
    now = await store.now()
    task = await created(store, now)
    cost, billed = 2_400_000, 12_000
    results = await asyncio.gather(*(store.settle(task.task_id, "succeeded", billed, cost, False,
                                                  b'{"status": "succeeded"}', now + 5) for _ in range(20)))
    done = [r for r in results if r is not None]
    assert len(done) == 1
    assert (done[0].status, done[0].cost_micros, done[0].billed_ms, done[0].settled_at) == \
        ("succeeded", cost, billed, now + 5)
    for u in await figures(store, now):
        c = u.counters
        assert (c.reserved_micros, c.reserved_ms, c.spent_micros, c.spent_ms, u.in_flight) == \
            (0, 0, cost, billed, 0)
    assert (await store.key_in_flight())["primary"] == 0
    assert await store.backlog() == 0
    stored = await store.get_task(task.task_id)
    assert stored.settled and stored.final_body == b'{"status": "succeeded"}'
    await store.set_status(task.task_id, "running", now + 6)
    assert (await store.get_task(task.task_id)).status == "succeeded"


async def test_settle_above_the_reservation_overdraws(store):
    now = await store.now()
    team = Limits(budget_micros=4 * DOLLAR)
    task = await created(store, now, team=team)
    assert await store.settle(task.task_id, "succeeded", 30_000, 6 * DOLLAR, False, None, now)
    _, team_usage = await figures(store, now, team=team)
    assert team_usage.counters.spent_micros == 6 * DOLLAR  # more than the budget
    rejection = await store.admit(admission(now, team=team), now)
    assert rejection.reason == "budget_usd"


async def test_settle_a_pending_create_by_rid(store):
    now = await store.now()
    task = await admitted(store, now)
    done = await store.settle(task.rid, "unresolved", EST_MS, EST_MICROS, True, None, now)
    assert done.cost_estimated and done.status == "unresolved"
    _, team = await figures(store, now)
    assert (team.counters.spent_micros, team.counters.reserved_micros, team.in_flight) == (EST_MICROS, 0, 0)


async def test_fail_create_releases_and_keeps_the_reply(store):
    now = await store.now()
    task = await admitted(store, now, idem="k1")
    await store.acquire_key(task.rid, "primary", 5)
    await store.fail_create(task.rid, now, (502, b'{"error": {}}'))
    await store.fail_create(task.rid, now, (502, b'{"error": {}}'))
    for u in await figures(store, now):
        assert (u.counters.reserved_micros, u.counters.spent_micros, u.in_flight) == (0, 0, 0)
    assert (await store.key_in_flight())["primary"] == 0
    record = await store.idem_get("marketing", "k1")
    assert (record.done, record.status, record.body) == (True, 502, b'{"error": {}}')
    assert await store.ledger(None, None, None, None, None) == []
    assert await store.due_tasks(now + 100, 10, 30) == []
    other = await admitted(store, now, idem="k2")
    await store.fail_create(other.rid, now, None)
    assert await store.idem_get("marketing", "k2") is None


async def test_idempotency_claim_conflict_then_done(store):
    now = await store.now()
    task = await admitted(store, now, idem="k1", body_hash="abc")
    record = await store.idem_get("marketing", "k1")
    assert (record.body_hash, record.done) == ("abc", False)
    with pytest.raises(IdempotencyConflict) as err:
        await store.admit(admission(now, idem="k1", body_hash="abc"), now)
    assert err.value.code == "idempotency_key_in_progress"
    assert await store.idem_get("sales", "k1") is None  # scoped to the team
    await store.record_created(task.rid, "cgt-1", "queued", now, (200, b'{"id": "cgt-1"}'))
    record = await store.idem_get("marketing", "k1")
    assert (record.done, record.status, record.body) == (True, 200, b'{"id": "cgt-1"}')
    assert await store.purge_idempotency(now) >= 0


# background polling

async def test_due_tasks_are_leased(store):
    now = await store.now()
    tasks = [await admitted(store, now, next_poll_at=now - 1) for _ in range(3)]
    later = await admitted(store, now, next_poll_at=now + 3600)
    assert {t.rid for t in await store.due_tasks(await store.now(), 10, 0.5)} == {t.rid for t in tasks}
    assert await store.due_tasks(await store.now(), 10, 0.5) == []
    await asyncio.sleep(0.6)
    await store.defer_poll(tasks[0].rid, now + 3600)
    await store.settle(tasks[1].rid, "failed", 0, 0, False, None, now)
    assert [t.rid for t in await store.due_tasks(await store.now(), 10, 0.5)] == [tasks[2].rid]
    await store.defer_poll(later.rid, now - 1)
    assert [t.rid for t in await store.due_tasks(await store.now(), 1, 30)] == [later.rid]
    assert await store.backlog() == 3


# figures

async def test_ledger_filters(store):
    now = await store.now()
    a = await created(store, now, created_at=now - 100)
    b = await created(store, now, created_at=now - 50, user_name="bob", model="doubao-seedance-2.0-fast")
    c = await created(store, now, created_at=now - 10, team_name="sales")
    failed = await admitted(store, now)
    await store.fail_create(failed.rid, now, None)

    async def rids(**kw):
        args = {"since": None, "until": None, "team": None, "user": None, "model": None} | kw
        return [t.rid for t in await store.ledger(**args)]

    assert await rids() == [a.rid, b.rid, c.rid]
    assert await rids(since=now - 50) == [b.rid, c.rid]
    assert await rids(until=now - 50) == [a.rid]
    assert await rids(team="marketing") == [a.rid, b.rid]
    assert await rids(user="bob") == [b.rid]
    assert await rids(model="doubao-seedance-2.0") == [a.rid, c.rid]


async def test_prune_deletes_settled_tasks_before_a_date(store):
    now = await store.now()
    old = [await created(store, now, created_at=now - 1000 + i) for i in range(3)]
    live_old = await created(store, now, created_at=now - 900)
    new = await created(store, now, created_at=now - 10)
    for t in (*old, new):
        await store.settle(t.task_id, "succeeded", 1000, 200_000, False, None, now)
    assert await store.prune(now - 100) == 3
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [live_old.rid, new.rid]
    assert await store.get_task(old[0].task_id) is None
    page, _ = await store.list_tasks("marketing", 10, None, None)
    assert [t.rid for t in page] == [new.rid, live_old.rid]
    assert await store.prune(now - 100) == 0


async def test_now_is_close_to_this_clock(store):
    assert abs(await store.now() - time.time()) < 5


# Redis outages

async def test_redis_down_is_store_unavailable_and_recovers():
    server = RedisServer()
    store = RedisStore(server.start(), timeout_s=0.5)
    await store.open()
    try:
        now = await store.now()
        await asyncio.gather(*(admitted(store, now) for _ in range(10)))  # several pooled connections
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.admit(admission(now), now)
        assert abs(await store.now() - time.time()) < 5  # the cached offset still answers
        server.start()
        await store.ping()
        # every stale pooled connection reconnects, and the scripts are loaded into the new server
        await asyncio.gather(*(admitted(store, now) for _ in range(10)))
        assert (await store.usage(subjects(now)))[1].in_flight == 10
    finally:
        await store.close()
        server.stop()


async def test_hung_redis_fails_fast():
    server = RedisServer()
    store = RedisStore(server.start(), timeout_s=0.3)
    await store.open()
    try:
        server.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 3
        server.resume()
        await store.ping()
    finally:
        await store.close()
        server.stop()


# the SQLite writer's batches

async def _one_batch(store: SQLiteStore, *steps):
    """Run the steps' store operations in one batch of the writer thread: it is held until all are queued."""
    gate = threading.Event()
    held = store._do(lambda c: gate.wait(5))
    tasks = [asyncio.ensure_future(step) for step in steps]
    await asyncio.sleep(0.05)  # every step has queued its operation behind the held one
    gate.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_sqlite_batch_a_refusal_leaves_the_others_standing(tmp_path):
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    try:
        now = await store.now()
        await admitted(store, now, idem="k1", body_hash="abc")
        first, second = admission(now), admission(now)
        results = await _one_batch(store, store.admit(first, now),
                                   store.admit(admission(now, idem="k1", body_hash="abc"), now),
                                   store.admit(second, now))
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], IdempotencyConflict)
        user, team = await figures(store, now)
        assert (team.in_flight, team.counters.reserved_micros) == (3, 3 * EST_MICROS)
    finally:
        await store.close()
    reopened = SQLiteStore(str(tmp_path / "gateway.db"))  # and it was all committed
    await reopened.open()
    try:
        user, team = await figures(reopened, now)
        assert (team.in_flight, team.counters.reserved_micros) == (3, 3 * EST_MICROS)
    finally:
        await reopened.close()


async def test_sqlite_batch_a_failure_rolls_back_the_whole_batch(tmp_path):
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    try:
        now = await store.now()
        kept = await admitted(store, now)
        lost = admission(now)
        results = await _one_batch(store, store.admit(lost, now),
                                   store._do(lambda c: c.execute("INSERT INTO no_such_table VALUES (1)")))
        assert all(isinstance(r, StoreUnavailable) for r in results)
        user, team = await figures(store, now)  # the books are read again from the tables
        assert (team.in_flight, team.counters.reserved_micros) == (1, EST_MICROS)
        assert await store.get_task(kept.rid) is None  # not created upstream yet: found by rid only below
        assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [kept.rid]
        assert await store.admit(admission(now), now) is None  # and the writer goes on
    finally:
        await store.close()
