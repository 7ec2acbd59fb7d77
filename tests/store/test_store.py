"""One contract for every store: each test runs against SQLite and against a real Redis."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest

from gateway.errors import (
    DuplicateTaskId,
    IdempotencyConflict,
    NotFound,
    QuotaError,
    RateLimited,
    RecordRejected,
    StoreUnavailable,
    TaskNotUnknown,
)
from gateway.policy.keyhealth import KeyHealth
from gateway.settings import Limits
from gateway.store.base import MAX_COUNTER, MAX_FIGURE, MAX_RESOLVER, TASK_FIELDS, TERMINAL, UNKNOWN, VOIDED
from gateway.store.redis.store import RedisStore
from gateway.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, statements
from gateway.store.sqlite.store import SQLiteStore
from tests.redis_server import RedisServer
from tests.store.helpers import (
    DOLLAR,
    EST_MICROS,
    EST_MS,
    admission,
    admitted,
    books,
    created,
    figures,
    preload_spent,
    subjects,
)

# admission


async def test_admit_reserves_and_counts(store):
    now = await store.now()
    task = await admitted(store, now)
    user, team = await figures(store, now)
    for usage in (user, team):
        assert (usage.counters.reserved_micros, usage.counters.reserved_ms, usage.in_flight) == (EST_MICROS, EST_MS, 1)
        assert (usage.counters.spent_micros, usage.counters.spent_ms) == (0, 0)
    assert await store.backlog() == 1
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [task.rid]
    assert await store.get_task(task.rid) is None  # looked up by upstream task id only


async def test_task_round_trips_every_field(store):
    now = await store.now()
    task = await admitted(store, now, input_estimated=True, created_at=now - 0.123456)
    [stored] = await store.ledger(None, None, None, None, None)
    assert stored == task


@pytest.mark.parametrize(
    ("scope", "limits", "reason", "error"),
    [
        ("team", Limits(budget_micros=4 * DOLLAR), "budget_usd", QuotaError),
        ("user", Limits(budget_micros=4 * DOLLAR), "budget_usd", QuotaError),
        ("team", Limits(video_seconds=20), "video_seconds", QuotaError),
        ("user", Limits(max_concurrent_tasks=1), "concurrency", RateLimited),
        ("team", Limits(requests_per_minute=1), "rate_limit", RateLimited),
    ],
)
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
    results = await asyncio.gather(*(replicas[i % 2].admit(admission(now, team=team), now) for i in range(50)))
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
    for usage in await figures(store, now, team=limits, user=limits):
        assert (usage.counters.reserved_micros, usage.counters.reserved_ms, usage.in_flight) == (0, 0, 0)
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


async def test_a_task_is_listed_as_soon_as_its_create_is_recorded(store):
    """Read-your-writes: a listing that follows an acknowledged write sees it, however many writes share a batch."""
    now = await store.now()

    async def create_then_list(n: int) -> tuple[bool, bool]:
        task = await admitted(store, now, created_at=now + n)
        task_id = f"cgt-ryw-{n}"
        await store.record_created(task.rid, task_id, "queued", now, (200, b"{}"))
        listed, _ = await store.list_tasks("marketing", 100, None, None)
        await store.set_status(task_id, "running", now + 1)
        running, _ = await store.list_tasks("marketing", 100, None, "running")
        return task_id in {t.task_id for t in listed}, task_id in {t.task_id for t in running}

    assert await asyncio.gather(*(create_then_list(n) for n in range(16))) == [(True, True)] * 16


async def test_a_listing_of_unknown_rows_pages_the_teams_own(store):
    now = await store.now()
    tasks = [await created(store, now, created_at=now + n, task_id=f"cgt-u{n}") for n in range(5)]
    other = await created(store, now, team_name="sales", task_id="cgt-sales")
    for task in (*tasks[:4], other):
        await store.settle(task.task_id, UNKNOWN, EST_MS, EST_MICROS, True, None, now + 10)
    await store.mark_deleted("cgt-u0", now + 11)
    page, more = await store.list_tasks("marketing", 2, None, UNKNOWN)
    assert ([t.task_id for t in page], more) == (["cgt-u3", "cgt-u2"], True)
    page, more = await store.list_tasks("marketing", 2, "cgt-u2", UNKNOWN)
    assert ([t.task_id for t in page], more) == (["cgt-u1", "cgt-u0"], False)
    page, _ = await store.list_tasks("marketing", 10, None, UNKNOWN, order="asc", include_deleted=False)
    assert [t.task_id for t in page] == ["cgt-u1", "cgt-u2", "cgt-u3"]
    await store.resolve_unknown("cgt-u3", VOIDED, 0, 0, "admin", now + 12)
    page, _ = await store.list_tasks("marketing", 10, None, UNKNOWN)
    assert [t.task_id for t in page] == ["cgt-u2", "cgt-u1", "cgt-u0"]
    assert [t.task_id for t in (await store.list_tasks("marketing", 10, None, "queued"))[0]] == ["cgt-u4"]


@pytest.mark.parametrize("sync", ["NORMAL", "FULL"])
async def test_sqlite_listings_run_on_the_reader_not_on_the_writer(tmp_path, sync):
    """list_tasks and unknown_tasks wait for the reader's thread; writes go on meanwhile (the event loop and the
    writer are not held by a long listing)."""
    store = SQLiteStore(str(tmp_path / "gateway.db"), sync)
    await store.open()
    gate = threading.Event()
    try:
        now = await store.now()
        await created(store, now, task_id="cgt-listed")
        busy = asyncio.create_task(store._read(lambda conn: gate.wait(10)))
        listing = asyncio.create_task(store.list_tasks("marketing", 10, None, None))
        unknown = asyncio.create_task(store.unknown_tasks(10))
        written = await created(store, now + 1, task_id="cgt-meanwhile")  # the writer is free
        await asyncio.sleep(0.05)
        assert written.task_id == "cgt-meanwhile" and not listing.done() and not unknown.done()
        gate.set()
        await busy
        assert [t.task_id for t in (await listing)[0]] == ["cgt-meanwhile", "cgt-listed"]
        assert await unknown == []
    finally:
        gate.set()
        await store.close()


async def test_settle_exactly_once(store):
    now = await store.now()
    task = await created(store, now)
    cost, billed = 2_400_000, 12_000
    results = await asyncio.gather(
        *(
            store.settle(task.task_id, "succeeded", billed, cost, False, b'{"status": "succeeded"}', now + 5)
            for _ in range(20)
        )
    )
    done = [r for r in results if r is not None]
    assert len(done) == 1
    assert (done[0].status, done[0].cost_micros, done[0].billed_ms, done[0].settled_at) == (
        "succeeded",
        cost,
        billed,
        now + 5,
    )
    for usage in await figures(store, now):
        counters = usage.counters
        assert (
            counters.reserved_micros,
            counters.reserved_ms,
            counters.spent_micros,
            counters.spent_ms,
            usage.in_flight,
        ) == (0, 0, cost, billed, 0)
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
    for usage in await figures(store, now):
        assert (usage.counters.reserved_micros, usage.counters.spent_micros, usage.in_flight) == (0, 0, 0)
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


# what the store does not take on trust


@pytest.mark.parametrize(
    ("billed", "cost"),
    [
        (MAX_FIGURE + 1, 1),
        (1, MAX_FIGURE + 1),
        (-1, 0),
        (0, -5),
        (1e14, 0),
        (0, 2.5),
        (True, 0),
        (0, 2**63),
        (0, "12"),
        (None, 0),
    ],
)
async def test_settle_with_a_bad_figure_changes_nothing(store, billed, cost):
    now = await store.now()
    task = await created(store, now)
    before = await books(store, now, task.rid)
    for _ in range(2):  # and a refused settlement gives nothing back, however often it is tried
        with pytest.raises(RecordRejected) as err:
            await store.settle(task.task_id, "succeeded", billed, cost, False, b"{}", now + 5)
        assert (err.value.status, err.value.type, err.value.code) == (500, "server_error", "record_rejected")
        assert await books(store, now, task.rid) == before
    done = await store.settle(task.task_id, "succeeded", 12_000, 2_400_000, False, b"{}", now + 5)
    assert done.status == "succeeded"
    for usage in await figures(store, now):
        assert (usage.counters.reserved_micros, usage.counters.spent_micros, usage.in_flight) == (0, 2_400_000, 0)
    assert (await store.key_in_flight())["primary"] == 0
    assert await store.settle(task.task_id, "succeeded", 12_000, 2_400_000, False, b"{}", now + 6) is None
    assert (await figures(store, now))[1].counters.spent_micros == 2_400_000


async def test_settle_at_the_largest_figures_applies(store):
    now = await store.now()
    task = await created(store, now)
    done = await store.settle(task.task_id, "succeeded", MAX_FIGURE, MAX_FIGURE, False, None, now)
    assert (done.billed_ms, done.cost_micros) == (MAX_FIGURE, MAX_FIGURE)
    assert (await store.get_task(task.task_id)).cost_micros == MAX_FIGURE
    assert (await figures(store, now))[1].counters.spent_micros == MAX_FIGURE


async def test_settle_refuses_a_status_that_is_not_terminal(store):
    now = await store.now()
    task = await created(store, now)
    before = await books(store, now, task.rid)
    for status in ("running", "pending", "", "create_failed"):
        with pytest.raises(RecordRejected):
            await store.settle(task.task_id, status, 0, 0, False, None, now)
    assert await books(store, now, task.rid) == before


async def test_settle_that_would_overflow_a_counter_changes_nothing(store):
    now = await store.now()
    task = await created(store, now)
    await preload_spent(store, "team", "marketing", task.team_period, MAX_COUNTER - 10)
    before = await books(store, now, task.rid)
    with pytest.raises(RecordRejected):
        await store.settle(task.task_id, "succeeded", 1000, 11, False, None, now)
    assert await books(store, now, task.rid) == before
    assert await store.settle(task.task_id, "succeeded", 1000, 10, False, None, now)
    assert (await figures(store, now))[1].counters.spent_micros == MAX_COUNTER


@pytest.mark.parametrize("field", ["estimate_micros", "estimate_ms", "input_ms"])
async def test_admit_refuses_an_estimate_out_of_range(store, field):
    now = await store.now()
    adm = admission(now, idem="k1", **{field: MAX_FIGURE + 1})
    with pytest.raises(RecordRejected):
        await store.admit(adm, now)
    user, team = await figures(store, now)
    assert (team.counters.reserved_micros, team.in_flight, user.in_flight) == (0, 0, 0)
    assert await store.ledger(None, None, None, None, None) == []
    assert await store.idem_get("marketing", "k1") is None


async def test_duplicate_task_id_is_refused_and_changes_nothing(store):
    now = await store.now()
    first = await created(store, now, task_id="cgt-twice", team_name="sales")
    second = await admitted(store, now, idem="k2")
    await store.acquire_key(second.rid, "primary", 100)
    before = await books(store, now, second.rid)
    with pytest.raises(DuplicateTaskId) as err:
        await store.record_created(second.rid, "cgt-twice", "queued", now, (200, b'{"id": "cgt-twice"}'))
    assert (err.value.status, err.value.code) == (502, "upstream_bad_response")
    assert await books(store, now, second.rid) == before
    assert (await store.get_record(second.rid)).task_id is None
    assert (await store.get_task("cgt-twice")).rid == first.rid  # the holder keeps its task
    assert (await store.idem_get("marketing", "k2")).done is False
    assert await store.list_tasks("marketing", 10, None, None) == ([], False)
    # the same record again for the task that holds the id is no duplicate
    await store.record_created(first.rid, "cgt-twice", "queued", now, (200, b"{}"))


async def test_record_created_never_reopens_a_settled_row(store):
    now = await store.now()
    task = await admitted(store, now)
    await store.mark_unknown(task.rid, now, None)
    await store.record_created(task.rid, "cgt-late", "queued", now, (200, b"{}"))
    row = await store.get_record(task.rid)
    assert (row.status, row.task_id) == (UNKNOWN, None)
    assert await store.get_task("cgt-late") is None


# unknown outcomes


async def test_unknown_and_voided_are_terminal():
    assert UNKNOWN in TERMINAL and VOIDED in TERMINAL


async def test_mark_unknown_charges_the_estimate_and_frees_the_slots(store):
    now = await store.now()
    limits = Limits(max_concurrent_tasks=1, budget_micros=10 * DOLLAR)
    task = await admitted(store, now, team=limits, idem="k1")
    assert await store.acquire_key(task.rid, "primary", 1)
    reply = (502, b'{"error": {"code": "upstream_timeout"}}')
    row = await store.mark_unknown(task.rid, now + 2, reply)
    assert (row.status, row.task_id, row.rid) == (UNKNOWN, None, task.rid)
    assert (row.billed_ms, row.cost_micros, row.cost_estimated, row.settled_at) == (EST_MS, EST_MICROS, True, now + 2)
    for usage in await figures(store, now, team=limits):
        counters = usage.counters
        assert (
            counters.reserved_micros,
            counters.reserved_ms,
            counters.spent_micros,
            counters.spent_ms,
            usage.in_flight,
        ) == (
            0,
            0,
            EST_MICROS,
            EST_MS,
            0,
        )
    assert (await store.key_in_flight())["primary"] == 0
    assert await store.backlog() == 0
    assert await store.due_tasks(now + 10_000, 10, 30) == []
    record = await store.idem_get("marketing", "k1")
    assert (record.done, record.status, record.body) == (True, *reply)
    [ledger_row] = await store.ledger(None, None, None, None, None)
    assert ledger_row == row == await store.get_record(task.rid)
    assert await store.get_task(task.rid) is None  # no upstream id
    # nothing is charged or given back twice: again, a late settlement, a late failure
    before = await books(store, now, task.rid)
    assert await store.mark_unknown(task.rid, now + 3, reply) == row
    assert await store.settle(task.rid, "unresolved", EST_MS, EST_MICROS, True, None, now + 4) is None
    await store.fail_create(task.rid, now + 5, None)
    await store.release_key(task.rid)
    assert await books(store, now, task.rid) == before
    assert await store.admit(admission(now, team=limits), now) is None  # its concurrency slot is free


async def test_mark_unknown_without_a_reply_keeps_the_claim(store):
    now = await store.now()
    task = await admitted(store, now, idem="k1")
    await store.mark_unknown(task.rid, now, None)
    assert (await store.idem_get("marketing", "k1")).done is False  # a retry is not charged again


async def test_mark_unknown_changes_only_a_pending_create(store):
    now = await store.now()
    task = await created(store, now)
    before = await books(store, now, task.rid)
    assert await store.mark_unknown(task.rid, now, None) == task
    assert await books(store, now, task.rid) == before
    with pytest.raises(NotFound) as err:
        await store.mark_unknown("no-such-rid", now, None)
    assert err.value.code == "task_not_found"


@pytest.mark.parametrize(
    ("status", "billed", "cost"),
    [(VOIDED, 0, 0), ("succeeded", 12_000, 2_400_000)],
    ids=["void", "settle"],
)
async def test_a_resolution_is_shown_and_final(store, status, billed, cost):
    now = await store.now()
    task = await admitted(store, now)
    await store.acquire_key(task.rid, "primary", 5)
    unknown = await store.mark_unknown(task.rid, now, None)
    done = await store.resolve_unknown(task.rid, status, billed, cost, "admin", now + 10)
    assert (done.status, done.billed_ms, done.cost_micros, done.cost_estimated) == (status, billed, cost, False)
    assert (done.resolved_by, done.resolved_at) == ("admin", now + 10)
    assert (done.settled_at, done.updated_at) == (unknown.settled_at, now + 10)
    assert await store.get_record(task.rid) == done
    assert await store.ledger(None, None, None, None, None) == [done]
    for usage in await figures(store, now):
        assert (
            usage.counters.spent_micros,
            usage.counters.spent_ms,
            usage.counters.reserved_micros,
            usage.in_flight,
        ) == (cost, billed, 0, 0)
    assert (await store.key_in_flight())["primary"] == 0
    before = await books(store, now, task.rid)
    for again, again_billed, again_cost in ((VOIDED, 0, 0), ("succeeded", 12_000, 2_400_000), (status, billed, cost)):
        with pytest.raises(TaskNotUnknown) as err:
            await store.resolve_unknown(task.rid, again, again_billed, again_cost, "someone-else", now + 20)
        assert f"is {status}" in err.value.message
    assert await books(store, now, task.rid) == before


async def test_resolve_unknown_by_its_figures_from_the_estimate(store):
    now = await store.now()
    task = await admitted(store, now)
    await store.mark_unknown(task.rid, now, None)
    row = await store.resolve_unknown(task.rid, "succeeded", EST_MS, EST_MICROS, "admin", now + 1)  # it was right
    assert (row.status, row.cost_micros, row.cost_estimated) == ("succeeded", EST_MICROS, False)
    assert (await figures(store, now))[1].counters.spent_micros == EST_MICROS


async def test_resolve_unknown_refusals(store):
    now = await store.now()
    done = await created(store, now)
    await store.settle(done.task_id, "succeeded", 1000, 200_000, False, None, now)
    with pytest.raises(TaskNotUnknown) as err:
        await store.resolve_unknown(done.task_id, VOIDED, 0, 0, "admin", now)
    assert (err.value.status, err.value.type, err.value.code) == (409, "invalid_request_error", "task_not_unknown")
    live = await created(store, now)
    with pytest.raises(TaskNotUnknown):
        await store.resolve_unknown(live.rid, VOIDED, 0, 0, "admin", now)
    with pytest.raises(NotFound) as err:
        await store.resolve_unknown("cgt-nobody", VOIDED, 0, 0, "admin", now)
    assert (err.value.status, err.value.code) == (404, "task_not_found")
    task = await admitted(store, now)
    unknown = await store.mark_unknown(task.rid, now, None)
    before = await books(store, now, task.rid)
    refused = [
        ("succeeded", -1, 0, "admin"),
        ("succeeded", 0, MAX_FIGURE + 1, "admin"),
        ("succeeded", 0.5, 0, "admin"),
        (UNKNOWN, 0, 0, "admin"),
        ("failed", 0, 0, "admin"),
        (VOIDED, 0, 0, ""),
        (VOIDED, 0, 0, "x" * (MAX_RESOLVER + 1)),
    ]
    for status, billed, cost, by in refused:
        with pytest.raises(RecordRejected):
            await store.resolve_unknown(task.rid, status, billed, cost, by, now)
    assert await books(store, now, task.rid) == before
    assert (await store.get_record(task.rid)) == unknown


async def test_get_record_by_task_id_or_rid(store):
    now = await store.now()
    task = await created(store, now)
    assert await store.get_record(task.task_id) == task == await store.get_record(task.rid)
    assert await store.get_record("nothing") is None


# what the OpenAI shape keeps: meta, deletion, order


async def test_meta_and_deletion_round_trip(store):
    now = await store.now()
    meta = b'{"alias": "sora-2", "size": "720x1280", "seconds": "4", "prompt": "a cat", "remixed_from": null}'
    task = await created(store, now, meta=meta)
    assert (task.meta, task.deleted_at) == (meta, None)
    assert (await store.ledger(None, None, None, None, None))[0].meta == meta
    deleted = await store.mark_deleted(task.task_id, now + 5)
    assert (deleted.deleted_at, deleted.meta, deleted.status) == (now + 5, meta, "queued")
    assert (await store.mark_deleted(task.task_id, now + 9)).deleted_at == now + 5  # the first time counts
    assert (await store.get_task(task.task_id)).deleted_at == now + 5  # the TokenHub shape keeps it
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [task.rid]
    assert await store.mark_deleted("cgt-nobody", now) is None
    pending = await admitted(store, now)
    assert await store.mark_deleted(pending.rid, now) is None  # not recorded upstream: no such task
    settled = await store.settle(task.task_id, "succeeded", 1000, 200_000, False, None, now + 10)
    assert settled.deleted_at == now + 5


async def test_list_in_either_order_with_or_without_deleted(store):
    now = await store.now()
    for i in range(6):
        await created(store, now, created_at=now + i, task_id=f"cgt-{i}")
    await store.mark_deleted("cgt-1", now)
    await store.mark_deleted("cgt-4", now)

    async def ids(limit, after=None, **kw):
        page, more = await store.list_tasks("marketing", limit, after, None, **kw)
        return [t.task_id for t in page], more

    assert await ids(3, order="asc") == (["cgt-0", "cgt-1", "cgt-2"], True)
    assert await ids(3, "cgt-2", order="asc") == (["cgt-3", "cgt-4", "cgt-5"], False)
    assert await ids(2, order="asc", include_deleted=False) == (["cgt-0", "cgt-2"], True)
    assert await ids(2, "cgt-2", order="asc", include_deleted=False) == (["cgt-3", "cgt-5"], False)
    assert await ids(2, "cgt-4", order="asc", include_deleted=False) == (["cgt-5"], False)  # from a deleted one
    assert await ids(3, include_deleted=False) == (["cgt-5", "cgt-3", "cgt-2"], True)
    assert await ids(3, "cgt-2", include_deleted=False) == (["cgt-0"], False)
    assert await ids(10) == ([f"cgt-{i}" for i in range(5, -1, -1)], False)  # the defaults: desc, all
    await store.set_status("cgt-3", "running", now)
    await store.set_status("cgt-4", "running", now)
    page, more = await store.list_tasks("marketing", 10, None, "running", order="asc", include_deleted=False)
    assert ([t.task_id for t in page], more) == (["cgt-3"], False)
    with pytest.raises(ValueError):
        await store.list_tasks("marketing", 10, None, None, order="sideways")


async def test_list_ascending_orders_ties_by_rid(store):
    now = await store.now()
    for rid in ("c" * 32, "a" * 32, "b" * 32):
        await created(store, now, rid=rid, task_id=f"cgt-{rid[0]}")
    page, more = await store.list_tasks("marketing", 2, None, None, order="asc")
    assert ([t.task_id for t in page], more) == (["cgt-a", "cgt-b"], True)
    page, more = await store.list_tasks("marketing", 2, "cgt-b", None, order="asc")
    assert ([t.task_id for t in page], more) == (["cgt-c"], False)


async def test_sqlite_schema_migrates_forward(tmp_path):
    path = tmp_path / "gateway.db"
    old = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[1].split(";"):
        if statement.strip():
            old.execute(statement)
    old.execute("PRAGMA user_version=1")
    now = time.time()
    task = admission(now).task
    v1 = [f for f in TASK_FIELDS if f not in ("meta", "deleted_at", "resolved_by", "resolved_at")]
    old.execute(
        f"INSERT INTO tasks ({', '.join(v1)}) VALUES ({', '.join('?' * len(v1))})", [getattr(task, f) for f in v1]
    )
    old.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        [kept] = await store.ledger(None, None, None, None, None)
        assert kept == task and (kept.meta, kept.deleted_at, kept.resolved_by, kept.resolved_at) == (None,) * 4
        assert await store._do(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION == 6
        await created(store, now, meta=b"{}", task_id="cgt-new")
        assert (await store.get_task("cgt-new")).meta == b"{}"
    finally:
        await store.close()
    reopened = SQLiteStore(str(path))  # a second open finds nothing to migrate
    await reopened.open()
    try:
        assert len(await reopened.ledger(None, None, None, None, None)) == 2
    finally:
        await reopened.close()


OLD_TASK_ID_CONSTRAINT = (
    MIGRATIONS[1]
    .replace("task_id TEXT,", "task_id TEXT UNIQUE,", 1)
    .replace("CREATE UNIQUE INDEX tasks_task_id ON tasks (task_id) WHERE task_id IS NOT NULL;", "")
)


@pytest.mark.parametrize("made_before", [False, True])
async def test_task_ids_stay_unique_in_stores_made_before_and_after_the_partial_index(tmp_path, made_before):
    """A new store keeps task ids unique through a partial index that pending rows stay out of; a store made
    before keeps its column's constraint. Both refuse a duplicate id and find a task by its id by index."""
    path = tmp_path / "gateway.db"
    if made_before:
        old = sqlite3.connect(path, isolation_level=None)
        for version in range(1, SCHEMA_VERSION + 1):
            for statement in statements(OLD_TASK_ID_CONSTRAINT if version == 1 else MIGRATIONS[version]):
                old.execute(statement)
        old.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        old.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        now = await store.now()
        first = await created(store, now, task_id="cgt-once")
        pending = await admitted(store, now)
        await store.acquire_key(pending.rid, "primary", 100)
        with pytest.raises(DuplicateTaskId):
            await store.record_created(pending.rid, "cgt-once", "queued", now, (200, b"{}"))
        assert (await store.get_task("cgt-once")).rid == first.rid

        def index_facts(conn: sqlite3.Connection) -> tuple[list[Any], int | None, str]:
            names = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name='tasks' AND type='index'")
            ]
            indexed = None
            if "tasks_task_id" in names:  # the index holds the one row with an id, not the pending one
                indexed = conn.execute(
                    "SELECT count(*) FROM tasks INDEXED BY tasks_task_id WHERE task_id > ''"
                ).fetchone()[0]
            plan = conn.execute("EXPLAIN QUERY PLAN SELECT rid FROM tasks WHERE task_id=?", ("cgt-once",)).fetchall()
            return names, indexed, " ".join(str(step[-1]) for step in plan)

        names, indexed, plan = await store._do(index_facts)
        if made_before:
            assert "tasks_task_id" not in names and "sqlite_autoindex_tasks_2" in plan
        else:
            assert indexed == 1 and "USING INDEX tasks_task_id" in plan
    finally:
        await store.close()


@pytest.mark.parametrize("made_before", [False, True])
async def test_sqlite_migration_6_indexes_the_unknown_rows(tmp_path, made_before):
    """From version 5, with or without the index a build that made it outside the migrations left behind."""
    path = tmp_path / "gateway.db"
    old = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 6):
        for statement in statements(MIGRATIONS[version]):
            old.execute(statement)
    if made_before:
        old.execute("CREATE INDEX tasks_unknown ON tasks (created_at) WHERE status = 'unknown'")
    old.execute("PRAGMA user_version=5")
    old.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        version, indexes, plan = await store._do(
            lambda c: (
                c.execute("PRAGMA user_version").fetchone()[0],
                c.execute("SELECT name FROM sqlite_master WHERE type='index' AND name='tasks_unknown'").fetchall(),
                c.execute(
                    "EXPLAIN QUERY PLAN SELECT rid FROM tasks WHERE status = ? ORDER BY created_at DESC LIMIT 5",
                    (UNKNOWN,),
                ).fetchall(),
            )
        )
        assert (version, indexes) == (SCHEMA_VERSION, [("tasks_unknown",)])
        assert "tasks_unknown" in " ".join(str(step[-1]) for step in plan)
    finally:
        await store.close()


async def test_an_unknown_row_kept_by_an_older_schema_is_resolved_after_the_migration(tmp_path):
    path = tmp_path / "gateway.db"
    old = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2, 3):
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                old.execute(statement)
    old.execute("PRAGMA user_version=3")
    now = time.time()
    task = replace(
        admission(now).task,
        status=UNKNOWN,
        billed_ms=EST_MS,
        cost_micros=EST_MICROS,
        cost_estimated=True,
        settled_at=now,
    )
    v3 = [f for f in TASK_FIELDS if f not in ("resolved_by", "resolved_at")]
    old.execute(
        f"INSERT INTO tasks ({', '.join(v3)}) VALUES ({', '.join('?' * len(v3))})", [getattr(task, f) for f in v3]
    )
    old.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.get_record(task.rid) == task
        done = await store.resolve_unknown(task.rid, "succeeded", EST_MS, EST_MICROS, "admin", now + 1)
        assert (done.status, done.resolved_by, done.resolved_at) == ("succeeded", "admin", now + 1)
    finally:
        await store.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "gateway.db"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    newer.close()
    store = SQLiteStore(str(path))
    with pytest.raises(StoreUnavailable):
        await store.open()
    await store.close()


# a Redis script checks everything before its first write


@pytest.fixture
async def redis_store(redis_url):
    s = RedisStore(redis_url, prefix=f"test:{uuid.uuid4().hex[:8]}:")
    await s.open()
    yield s
    await s.close()


@pytest.mark.parametrize(
    ("billed", "cost", "estimated", "now"),
    [
        ("1e14", "0", "0", "1.0"),
        ("0", "100000000000000000000", "0", "1.0"),
        ("-1", "0", "0", "1.0"),
        ("01", "0", "0", "1.0"),
        ("0", "", "0", "1.0"),
        ("0", "0", "yes", "1.0"),
        ("0", "0", "0", "soon"),
    ],
)
async def test_redis_settle_script_refuses_before_writing(redis_store, billed, cost, estimated, now):
    store = redis_store
    t = await store.now()
    task = await created(store, t)
    before = await books(store, t, task.rid)
    with pytest.raises(RecordRejected):  # past the Python checks, straight to the script
        await store._eval("settle", task.task_id, "succeeded", billed, cost, estimated, now, "", b"")
    assert await books(store, t, task.rid) == before


async def test_redis_script_errors_are_record_rejected_not_unavailable(redis_store):
    with pytest.raises(RecordRejected):
        await redis_store._do(
            redis_store._r.eval("return redis.call('HINCRBY', KEYS[1], 'x', 'y')", 1, redis_store.prefix + "scratch")
        )


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
