"""The ledger's grouped figures, pages and retention, on both stores: aggregate() equals grouping ledger()'s
rows in the process (routes/ledger.py's group(), the oracle) for every grouping and filter, whatever the rows
went through; ledger_page() visits every row once, in order; prune() keeps the figures."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from gateway.money import micros_to_usd
from gateway.routes.ledger import group
from gateway.store.base import GROUP_BY, Group, LedgerFilter, Task
from gateway.store.redis.store import RedisStore
from gateway.store.sqlite.store import SQLiteStore
from tests.store.helpers import admitted, created

DAY = 86_400
BASE = datetime(2025, 1, 1, tzinfo=UTC).timestamp()  # the rows span Dec 2024 to mid-March 2025
NOW = BASE + 80 * DAY
TEAMS = ("red", "blue", "green")
USERS = ("ann", "bob", "cy", "dee")
MODELS = ("doubao-seedance-2.0", "doubao-seedance-2.0-fast")
SETTLED = ("succeeded", "failed", "cancelled", "expired", "unresolved")
LIVE = ("pending", "queued", "running")
OTHERS = ("unknown", "resolved", "voided", "create_failed", "cancelled_admission")
# Moments inside a day, midnight's edges included: 0.4 µs before midnight is the next day (datetime rounds to
# the microsecond), 0.7 µs before it is not.
IN_DAY = (0.0, 1e-6, -4e-7, -7e-7, 43_200.0, DAY - 1e-6, 0.5)


def at(day: int, offset: float = 0.0) -> float:
    return BASE + day * DAY + offset


FILTERS = (
    LedgerFilter(),
    LedgerFilter(since=at(0), until=at(31)),  # January: a whole month
    LedgerFilter(since=at(0), until=at(59)),  # January and February
    LedgerFilter(since=at(-10), until=at(45)),  # whole days around whole months
    LedgerFilter(since=at(3, 3_600.5), until=at(40, 7_200.25)),  # partial days at both ends
    LedgerFilter(since=at(3, -4e-7), until=at(40, -4e-7)),  # just before midnights
    LedgerFilter(since=at(3, -7e-7), until=at(40, 1e-6)),
    LedgerFilter(since=at(5, 100.0), until=at(5, 50_000.0)),  # inside one day
    LedgerFilter(since=at(5), until=at(6)),  # exactly one day
    LedgerFilter(since=at(20)),
    LedgerFilter(until=at(20, 1.5)),
    LedgerFilter(since=at(-35, 12.0), until=at(70, 5.0), team="red"),
    LedgerFilter(team="blue", user="bob"),
    LedgerFilter(since=at(1), model=MODELS[1]),
    LedgerFilter(since=at(10), until=at(2)),  # nothing
    LedgerFilter(team="nobody"),
    LedgerFilter(since=datetime(1, 1, 1, tzinfo=UTC).timestamp(), until=datetime(9999, 12, 31, tzinfo=UTC).timestamp()),
)


@dataclass(frozen=True)
class Plan:
    """One row to write and what happens to it."""

    outcome: str
    created_at: float
    team: str
    user: str
    model: str
    estimate_micros: int
    billed_ms: int
    cost_micros: int


def plans(rng: random.Random, count: int, days: tuple[int, int] = (-40, 75)) -> list[Plan]:
    outcomes = SETTLED * 6 + LIVE * 2 + OTHERS
    return [
        Plan(
            outcome=rng.choice(outcomes),
            created_at=at(rng.randrange(*days), rng.choice((*IN_DAY, rng.uniform(0, DAY)))),
            team=rng.choice(TEAMS),
            user=rng.choice(USERS),
            model=rng.choice(MODELS),
            estimate_micros=rng.randrange(1, 5_000_000),
            billed_ms=rng.randrange(0, 20_000),
            cost_micros=rng.randrange(0, 6_000_000),
        )
        for _ in range(count)
    ]


async def write(store: Any, plan: Plan) -> Task:
    """The row the plan describes, written through the store's operations as the gateway does."""
    who = {
        "team_name": plan.team,
        "user_name": plan.user,
        "model": plan.model,
        "created_at": plan.created_at,
        "estimate_micros": plan.estimate_micros,
    }
    if plan.outcome in (*SETTLED, "queued", "running"):
        task = await created(store, NOW, **who)
        if plan.outcome == "running":
            await store.set_status(task.task_id, "running", NOW)
        elif plan.outcome != "queued":
            await store.settle(task.task_id, plan.outcome, plan.billed_ms, plan.cost_micros, False, b"{}", NOW)
        return task
    task = await admitted(store, NOW, **who)
    if plan.outcome == "create_failed":
        await store.fail_create(task.rid, NOW, None)
    elif plan.outcome == "cancelled_admission":
        await store.cancel_admission(task.rid)
    elif plan.outcome != "pending":
        await store.mark_unknown(task.rid, NOW, None)
        if plan.outcome in ("resolved", "voided"):
            status = "succeeded" if plan.outcome == "resolved" else "voided"
            await store.resolve_unknown(task.rid, status, plan.billed_ms, plan.cost_micros, "ops", NOW)
    return task


async def write_all(store: Any, todo: list[Plan]) -> list[Task]:
    tasks: list[Task] = []
    for start in range(0, len(todo), 25):  # a few at once, as concurrent requests would
        tasks += await asyncio.gather(*(write(store, plan) for plan in todo[start : start + 25]))
    return tasks


async def rows(store: Any, flt: LedgerFilter = LedgerFilter()) -> list[Task]:
    return await store.ledger(since=flt.since, until=flt.until, team=flt.team, user=flt.user, model=flt.model)


def as_rows(by: str, groups: list[Group]) -> list[dict[str, Any]]:
    """The store's figures as group() writes them."""
    return [
        {
            by: g.key,
            "tasks": g.tasks,
            "succeeded": g.succeeded,
            "failed": g.failed,
            "in_flight": g.in_flight,
            "billed_seconds": g.billed_ms / 1000,
            "cost_usd": micros_to_usd(g.cost_micros),
            "reserved_usd": micros_to_usd(g.reserved_micros),
        }
        for g in groups
    ]


async def assert_exact(store: Any, filters: tuple[LedgerFilter, ...] = FILTERS) -> None:
    for flt in filters:
        ledger = await rows(store, flt)
        for by in GROUP_BY:
            figures = await store.aggregate(by, flt)
            assert as_rows(by, figures) == group(ledger, by), (by, flt)
        assert sum(g.cost_micros for g in figures) == sum(t.cost_micros or 0 for t in ledger)


async def test_aggregate_equals_the_rows_grouped_for_every_grouping_and_filter(store):
    await write_all(store, plans(random.Random(23), 300))
    assert {t.status for t in await rows(store)} >= {*SETTLED, *LIVE, "unknown", "voided"}
    await assert_exact(store)


async def test_resolving_an_unknown_row_moves_its_figures_exactly(store):
    await write_all(store, plans(random.Random(5), 40, days=(0, 3)))
    unknown = await write(store, Plan("unknown", at(1, 10.0), "red", "ann", MODELS[0], 2_000_000, 0, 0))
    before = {g.key: g for g in await store.aggregate("team", LedgerFilter())}
    await store.resolve_unknown(unknown.rid, "succeeded", 8_000, 1_600_000, "ops", NOW)
    after = {g.key: g for g in await store.aggregate("team", LedgerFilter())}
    moved = replace(before["red"], succeeded=before["red"].succeeded + 1)
    moved.billed_ms += 8_000 - 15_000  # from the estimate's 15 s to the resolution's 8 s
    moved.cost_micros += 1_600_000 - 2_000_000
    assert after == {**before, "red": moved}
    await assert_exact(store, FILTERS[:5])


async def test_prune_deletes_old_settled_rows_in_batches_and_the_figures_stay(store):
    written = await write_all(store, plans(random.Random(7), 120, days=(-10, 10)))
    records = [r for r in await asyncio.gather(*(store.get_record(t.rid) for t in written)) if r is not None]
    cut = at(0, 0.25)
    everything = await store.aggregate("team", LedgerFilter())
    by_day = await store.aggregate("day", FILTERS[3])
    old = [r for r in records if r.created_at < cut]
    prunable = {r.rid for r in old if r.settled_at is not None and r.status != "unknown"}
    assert "create_failed" in {r.status for r in old}  # settled too: pruned, never counted
    assert prunable and len(prunable) < len(old)  # some old rows are in flight or unknown
    assert await store.prune(cut, batch=7) == len(prunable)
    left = [r.rid for r in records if await store.get_record(r.rid) is not None]
    assert set(left) == {r.rid for r in records} - prunable
    assert await store.aggregate("team", LedgerFilter()) == everything
    assert await store.aggregate("day", FILTERS[3]) == by_day
    assert await store.prune(cut, batch=7) == 0
    await assert_exact(store, (LedgerFilter(since=cut), LedgerFilter(since=at(3, 5.0), until=at(8, 1.0))))


async def test_ledger_page_visits_every_row_once_in_order_and_goes_on_after_new_rows(store):
    todo = plans(random.Random(11), 60, days=(-3, 3))
    todo += [replace(todo[0], outcome=outcome) for outcome in ("succeeded", "queued", "failed")]  # a tie
    await write_all(store, todo)
    expected = sorted(await rows(store), key=lambda t: (t.created_at, t.rid))
    for limit in (1, 2, 7, 61, 1000):
        seen = await every_page(store, LedgerFilter(), limit)
        assert seen == [replace(t, final_body=None, meta=None) for t in expected], limit
    flt = LedgerFilter(since=at(-1, 0.5), until=at(2), team="red")
    assert [t.rid for t in await every_page(store, flt, 3)] == [t.rid for t in expected if _matches(t, flt)]

    first, after = await store.ledger_page(LedgerFilter(), 10, None)
    assert after is not None and first == [replace(t, final_body=None, meta=None) for t in expected[:10]]
    late = await write_all(store, [replace(todo[1], outcome="succeeded", created_at=at(5, 1.0))] * 3)
    early = await write(store, replace(todo[1], outcome="succeeded", created_at=at(-5)))  # before the cursor
    rest = await every_page(store, LedgerFilter(), 4, after)
    assert [t.rid for t in rest] == [t.rid for t in expected[10:]] + sorted(t.rid for t in late)
    assert early.rid not in {t.rid for t in first + rest}


async def every_page(store: Any, flt: LedgerFilter, limit: int, after: str | None = None) -> list[Task]:
    seen: list[Task] = []
    while True:
        page, after = await store.ledger_page(flt, limit, after)
        assert len(page) <= limit and (page or after is None)
        seen += page
        if after is None:
            return seen


def _matches(task: Task, flt: LedgerFilter) -> bool:
    return (
        (flt.since is None or task.created_at >= flt.since)
        and (flt.until is None or task.created_at < flt.until)
        and all(getattr(flt, name) in (None, getattr(task, name)) for name in ("team", "user", "model"))
    )


async def test_rows_kept_before_the_figures_existed_are_counted_by_the_backfill(store):
    todo = plans(random.Random(13), 150, days=(-20, 45))
    todo += [replace(todo[i], outcome=outcome) for i, outcome in enumerate(("unknown", "unknown", "queued", "running"))]
    await write_all(store, todo)
    live = [t for t in await rows(store) if t.settled_at is None and t.task_id]
    unknown = [t for t in await rows(store) if t.status == "unknown"]
    await FORGET[type(store)](store)  # as a store written before it kept per-day figures
    await assert_exact(store, FILTERS[:6])  # exact before the backfill too
    await store.settle(live[0].task_id, "succeeded", 1_000, 200_000, False, None, NOW)  # settled before counted
    await store.resolve_unknown(unknown[0].rid, "voided", 0, 0, "ops", NOW)
    before_prune = await rows(store)
    await store.prune(at(-10))  # rows the backfill has not counted yet: counted as they go
    left = {t.rid for t in await rows(store)}
    pruned = [t for t in before_prune if t.rid not in left]
    await store._backfill()
    await store.settle(live[1].task_id, "failed", 0, 0, False, None, NOW)  # settled after
    await store.resolve_unknown(unknown[1].rid, "succeeded", 5_000, 1_000_000, "ops", NOW)
    await write_all(store, plans(random.Random(14), 20, days=(-20, 45)))
    # Exact where nothing was pruned (a row pruned just before a midnight stays in that day's figures).
    await assert_exact(store, tuple(f for f in FILTERS if f.since is not None and f.since > at(-10)))
    for by in GROUP_BY:  # all time: the rows left and the rows pruned
        assert as_rows(by, await store.aggregate(by, LedgerFilter())) == group(await rows(store) + pruned, by)


def forget_sqlite(conn: sqlite3.Connection) -> None:
    """What the v5 migration leaves of a v4 store: no figures, every row waiting for the backfill."""
    conn.execute("DELETE FROM ledger_days")
    conn.execute("DELETE FROM ledger_months")
    conn.execute("UPDATE tasks SET rolled = 0")
    conn.execute("UPDATE ledger_backfill SET done = 0, upto = (SELECT COALESCE(MAX(rowid), 0) FROM tasks)")


async def _forget_sqlite(store: SQLiteStore) -> None:
    await store._do(forget_sqlite)


async def _forget_redis(store: Any) -> None:
    await store._forget_figures()


FORGET: dict[type, Callable[[Any], Awaitable[None]]] = {SQLiteStore: _forget_sqlite, RedisStore: _forget_redis}
