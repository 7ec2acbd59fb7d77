"""The Redis store's per-day figures (gateway/store/redis/rollup.py, aggregate.py): aggregate equals grouping
the ledger's rows (gateway/routes/ledger.py's `group`) for any range and filter, through resolutions, pruning,
the backfill of rows settled before the figures existed, and two replicas settling at once; ledger_page
walks every row once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import TaskNotUnknown, ValidationError
from gateway.routes.ledger import group, group_row
from gateway.store.base import GROUP_BY, LedgerFilter
from gateway.store.redis.aggregate import day_name, day_of
from gateway.store.redis.prelude import PRELUDE
from gateway.store.redis.store import RedisStore
from tests.redis_server import RedisClusterServers, SentinelServers, require_redis_sentinel, require_redis_server
from tests.store.helpers import admitted, created

DAY = 86_400
BASE = datetime(2025, 1, 27, tzinfo=UTC).timestamp()  # a midnight; the rows run into March
MODELS = ("doubao-seedance-2.0", "doubao-seedance-2.0-fast")
OUTCOMES = ("succeeded", "succeeded", "failed", "cancelled", "expired", "unknown", "create_failed", "", "")


@pytest.fixture
async def store(redis_url: str) -> Any:
    opened = RedisStore(redis_url, prefix=f"{{rollup-{random.getrandbits(32):08x}}}:")
    await opened.open()
    yield opened
    await opened.close()


async def seed(store: RedisStore, count: int, rng: random.Random) -> list[Any]:
    """Rows of every outcome (an empty one: in flight) over five weeks, some a breath before a midnight and
    two created at the same moment."""
    now = await store.now()
    moments = [BASE + rng.uniform(0, 40 * DAY) for _ in range(count)]
    moments[:4] = [BASE + 3 * DAY - 3e-7, BASE + 3 * DAY, BASE + 5 * DAY + 7.25, BASE + 5 * DAY + 7.25]
    tasks = []
    for index, moment in enumerate(moments):
        team = ("marketing", "sales")[index % 2]
        subject = {"team_name": team, "user_name": rng.choice(("alice", "bob")), "model": rng.choice(MODELS)}
        outcome = OUTCOMES[index % len(OUTCOMES)]
        if outcome in ("unknown", "create_failed"):
            task = await admitted(store, now, created_at=moment, **subject)
            if outcome == "unknown":
                await store.mark_unknown(task.rid, moment + 60, None)
            else:
                await store.fail_create(task.rid, moment + 1, None)
        else:
            task = await created(store, now, created_at=moment, **subject)
            if outcome:
                cost = rng.randrange(10**6, 10**7) if outcome == "succeeded" else 0
                ms = cost // 200
                await store.settle(task.task_id, outcome, ms, cost, False, b'{"body": 1}', moment + 90)
        tasks.append(task)
    return tasks


def ranges() -> list[LedgerFilter]:
    """Ranges with whole days, whole months, partial days at either end, none at all, open ends."""
    edges = [
        BASE + 3 * DAY,
        BASE + 3 * DAY - 1e-7,
        BASE + 5 * DAY + 7.25,
        BASE + 5 * DAY + 3600.5,
        datetime(2025, 2, 1, tzinfo=UTC).timestamp(),
        datetime(2025, 3, 1, tzinfo=UTC).timestamp(),
        datetime(2025, 3, 2, 12, tzinfo=UTC).timestamp(),
    ]
    spans = [LedgerFilter(), LedgerFilter(since=edges[0]), LedgerFilter(until=edges[5])]
    spans += [LedgerFilter(since=a, until=b) for a in edges for b in edges if a < b]
    spans += [LedgerFilter(team="sales"), LedgerFilter(user="bob", since=edges[4]), LedgerFilter(model=MODELS[1])]
    spans += [LedgerFilter(team="marketing", user="alice", model=MODELS[0], until=edges[6]), LedgerFilter(team="")]
    return spans


async def assert_figures(store: RedisStore, spans: list[LedgerFilter]) -> None:
    for flt in spans:
        rows = await store.ledger(flt.since, flt.until, flt.team, flt.user, flt.model)
        for by in GROUP_BY:
            figures = [group_row(by, g) for g in await store.aggregate(by, flt)]
            assert figures == group(rows, by), (by, flt)


async def forget_figures(store: RedisStore) -> None:
    """The store as the gateway left it before it kept figures: none, and no row flagged as counted."""
    keys = [key async for key in store._r.scan_iter(match=store.prefix + "r:*")]
    if keys:
        await store._r.delete(*keys)
    for rid in await store._r.zrange(store.prefix + "all", 0, -1):
        await store._r.hdel(store.prefix.encode() + b"t:" + rid, "rolled")


async def test_a_row_has_the_day_python_gives_it(store):
    rng = random.Random(3)
    moments = [rng.uniform(0, 4e9) for _ in range(300)]
    for day in (0, 11016, 11017, 20089, 47541, 47542, rng.randrange(40000)):  # 2000-02-29/03-01, 2100-02-28/03-01
        moments += [day * DAY + offset for offset in (0, 0.3e-6, -0.3e-6, -0.5e-6, -0.6e-6, -1e-6, 86399.5)]
    script = PRELUDE + "local out = {}\nfor i = 2, #ARGV do out[#out + 1] = civil(day_of(tonumber(ARGV[i]))) end\n"
    days = await store._r.eval(script + "return out", 1, store.prefix, store.prefix, *map(repr, moments))
    expected = [datetime.fromtimestamp(moment, UTC).date().isoformat() for moment in moments]
    assert [day.decode() for day in days] == expected == [day_name(day_of(moment)) for moment in moments]


async def test_aggregate_equals_grouping_the_rows(store):
    await seed(store, 60, random.Random(1))
    await assert_figures(store, ranges())
    assert await store.aggregate("team", LedgerFilter(since=BASE + 100 * DAY)) == []
    with pytest.raises(ValueError):
        await store.aggregate("status", LedgerFilter())


async def test_figures_are_in_day_and_month_hashes(store):
    await seed(store, 20, random.Random(2))
    months = await store._r.zrange(store.prefix + "r:months", 0, -1)
    assert months == [b"2025-01", b"2025-02", b"2025-03"]
    assert await store._r.exists(store.prefix + "r:d:2025-01-30") == 1  # the row 0.3 µs before its midnight
    assert await store._r.get(store.prefix + "r:bf") == b"done"


async def test_a_resolution_moves_the_figures_once(store):
    tasks = await seed(store, 18, random.Random(4))
    unknown = [t for t in tasks if (await store.get_record(t.rid)).status == "unknown"]
    assert len(unknown) == 2
    await store.resolve_unknown(unknown[0].rid, "succeeded", 9000, 1_800_000, "ops", BASE + 50 * DAY)
    await store.resolve_unknown(unknown[1].rid, "voided", 0, 0, "ops", BASE + 50 * DAY)
    with pytest.raises(TaskNotUnknown):
        await store.resolve_unknown(unknown[1].rid, "succeeded", 1, 1, "ops", BASE + 50 * DAY)
    await assert_figures(store, ranges()[:6])


async def test_pruning_keeps_the_figures(store):
    tasks = await seed(store, 45, random.Random(5))
    cut = BASE + 20 * DAY
    spans = [LedgerFilter(), LedgerFilter(until=cut), LedgerFilter(since=BASE + 2 * DAY, until=cut, team="sales")]
    before = {(by, flt): await store.aggregate(by, flt) for by in GROUP_BY for flt in spans}
    kept = [t.rid for t in await store.ledger(None, None, None, None, None)]
    rows = {t.rid: await store.get_record(t.rid) for t in tasks}
    doomed = {rid for rid, t in rows.items() if t.created_at < cut and t.settled and t.status != "unknown"}

    assert await store.prune(cut, batch=2) == len(doomed) > 4
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [r for r in kept if r not in doomed]
    assert {(by, flt): await store.aggregate(by, flt) for by in GROUP_BY for flt in spans} == before
    assert await store.prune(cut) == 0
    assert [await store.get_record(rid) for rid in doomed] == [None] * len(doomed)


async def test_the_backfill_counts_rows_settled_before_the_figures(store):
    tasks = await seed(store, 40, random.Random(6))
    rows = sorted([await store.get_record(t.rid) for t in tasks], key=lambda row: row.created_at)
    spans = ranges()[::4]
    await forget_figures(store)
    await assert_figures(store, spans)  # from the rows, until the backfill counts them
    live = [row for row in rows if not row.settled and row.task_id]
    await store.settle(live[-1].task_id, "succeeded", 3000, 600_000, False, None, BASE + 50 * DAY)
    await assert_figures(store, spans)  # a row settled now is counted by its settlement, not twice
    unknown = [row for row in rows if row.status == "unknown"]
    steps = 0
    while not await store.backfill_step(batch=7):
        steps += 1
        if steps == 2:  # a row the backfill has not reached: it counts the resolved figures, once
            assert await store._r.hget(store.prefix + "t:" + unknown[-1].rid, "rolled") is None
            await store.resolve_unknown(unknown[-1].rid, "succeeded", 4000, 800_000, "ops", BASE + 50 * DAY)
        await assert_figures(store, spans[:3])
    assert steps == 5
    await assert_figures(store, spans)
    assert await store._r.get(store.prefix + "r:bf") == b"done"
    assert await store._r.hget(store.prefix + "t:" + unknown[0].rid, "rolled") == b"2"
    await store.resolve_unknown(unknown[0].rid, "voided", 0, 0, "ops", BASE + 50 * DAY)  # counted: moved once
    await assert_figures(store, spans[:3])


async def test_rows_pruned_before_the_backfill_reached_them_stay_counted(store):
    await seed(store, 30, random.Random(7))
    everything = {by: await store.aggregate(by, LedgerFilter()) for by in GROUP_BY}
    await forget_figures(store)
    assert await store.backfill_step(batch=5) is False
    assert await store.prune(BASE + 25 * DAY, batch=3) > 5
    while not await store.backfill_step(batch=5):
        pass
    assert {by: await store.aggregate(by, LedgerFilter()) for by in GROUP_BY} == everything


async def test_a_store_opened_on_rows_without_figures_counts_them_in_the_background(redis_url):
    first = RedisStore(redis_url, prefix=f"{{rollup-{random.getrandbits(32):08x}}}:")
    await first.open()
    try:
        tasks = await seed(first, 30, random.Random(8))
        expected = {by: await first.aggregate(by, LedgerFilter()) for by in GROUP_BY}
        await forget_figures(first)
    finally:
        await first.close()
    reopened = RedisStore(redis_url, prefix=first.prefix)
    reopened.backfill_batch = 4  # the first batch at open, the six others in the background
    await reopened.open()
    try:
        assert await reopened._r.get(reopened.prefix + "r:bf") not in (None, b"done")
        for _ in range(250):
            if await reopened._r.get(reopened.prefix + "r:bf") == b"done":
                break
            await asyncio.sleep(0.02)
        settled = [t.rid for t in tasks if (await reopened.get_record(t.rid)).status not in ("queued", "pending")]
        flags = {await reopened._r.hget(reopened.prefix + "t:" + rid, "rolled") for rid in settled}
        assert flags == {b"2", None}  # counted by the backfill; create_failed rows never are
        assert {by: await reopened.aggregate(by, LedgerFilter()) for by in GROUP_BY} == expected
    finally:
        await reopened.close()


async def test_two_replicas_settling_at_once_count_each_row_once(replicas):
    one, two = replicas
    now = await one.now()
    tasks = [
        await created(one, now, created_at=BASE + i * 5000.5, user_name=("alice", "bob")[i % 2]) for i in range(24)
    ]
    unknown = [await admitted(two, now, created_at=BASE + i * 7000.25) for i in range(6)]

    async def settle(store: RedisStore, index: int) -> None:
        task = tasks[index]
        await store.settle(task.task_id, ("succeeded", "failed")[index % 2], 5000, 1_000_000 + index, False, None, now)

    await asyncio.gather(*(settle(store, i) for i in range(len(tasks)) for store in (one, two)))
    await asyncio.gather(*(store.mark_unknown(t.rid, now, None) for t in unknown for store in (one, two)))
    outcomes = await asyncio.gather(
        *(store.resolve_unknown(t.rid, "succeeded", 7, 70, "ops", now) for t in unknown for store in (two, one)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, TaskNotUnknown) for o in outcomes) == len(unknown)
    for store in replicas:
        await assert_figures(store, [LedgerFilter(), LedgerFilter(since=BASE + DAY, until=BASE + 2 * DAY + 0.5)])
    [total] = await two.aggregate("team", LedgerFilter())
    assert (total.tasks, total.succeeded, total.failed) == (30, 18, 12)


async def pages(store: RedisStore, flt: LedgerFilter, limit: int) -> list[str]:
    rids: list[str] = []
    after = None
    while True:
        rows, after = await store.ledger_page(flt, limit, after)
        assert len(rows) <= limit and (after is None or len(rows) == limit)
        assert all(row.final_body is None and row.meta is None for row in rows)
        rids += [row.rid for row in rows]
        if after is None:
            return rids


async def test_ledger_page_walks_every_row_once(store):
    await seed(store, 27, random.Random(9))
    for flt in ranges()[::3]:
        expected = [t.rid for t in await store.ledger(flt.since, flt.until, flt.team, flt.user, flt.model)]
        for limit in (1, 4, 100):
            assert await pages(store, flt, limit) == expected, (flt, limit)
    rows, after = await store.ledger_page(LedgerFilter(), 27 - 3, None)  # every row but the create_failed
    assert len(rows) == 24 and after is None


async def test_ledger_page_goes_on_past_a_row_deleted_under_its_cursor(store):
    now = await store.now()
    tasks = [await created(store, now, created_at=BASE + i // 3) for i in range(9)]  # threes created at one moment
    first, after = await store.ledger_page(LedgerFilter(), 2, None)
    assert after == f"{first[-1].created_at!r}:{first[-1].rid}"
    await store.cancel_admission(first[-1].rid)  # the cursor's row is gone; the two created with it are not
    rows, _ = await store.ledger_page(LedgerFilter(), 10, after)
    assert [r.rid for r in first[:-1] + rows] == [
        t.rid for t in sorted(tasks, key=lambda t: (t.created_at, t.rid)) if t.rid != first[-1].rid
    ]
    for bad in ("nonsense", "1.5:", "inf:abc", ":abc"):
        with pytest.raises(ValidationError):
            await store.ledger_page(LedgerFilter(), 10, bad)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    require_redis_server()
    servers = RedisClusterServers()
    yield servers.start()
    servers.stop()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[str]:
    require_redis_server()
    require_redis_sentinel()
    servers = SentinelServers()
    yield servers.start()
    servers.stop()


@pytest.mark.parametrize("deployment", ["cluster", "sentinel"])
async def test_figures_pages_and_pruning_on_a_cluster_and_behind_sentinel(deployment, request):
    """Every key the figures use shares the prefix's hash tag (one slot of a Cluster); behind Sentinel the
    writes wait for the replica, the reads do not."""
    store = RedisStore(request.getfixturevalue(deployment), prefix=f"{{rollup-{random.getrandbits(32):08x}}}:")
    await store.open()
    try:
        await seed(store, 16, random.Random(10))
        spans = ranges()[::9]
        await forget_figures(store)
        await assert_figures(store, spans)
        while not await store.backfill_step(batch=5):
            pass
        await assert_figures(store, spans)
        everything = await store.aggregate("user", LedgerFilter())
        assert await store.prune(BASE + 20 * DAY, batch=3) > 2
        assert await store.aggregate("user", LedgerFilter()) == everything
        expected = [t.rid for t in await store.ledger(None, None, None, None, None)]
        assert await pages(store, LedgerFilter(), 5) == expected
    finally:
        await store.close()
