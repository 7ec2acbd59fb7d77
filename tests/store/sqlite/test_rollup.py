"""The SQLite store's per-day figures: a row's day as Python dates it, a v4 store migrated and backfilled batch by
batch while it serves, the figures read instead of the rows (thousands of rows), the reader read-only."""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import Awaitable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.routes.ledger import group
from gateway.store.base import GROUP_BY, TASK_FIELDS, LedgerFilter, Task
from gateway.store.sqlite import rollup
from gateway.store.sqlite.schema import INSERT_TASK, MIGRATIONS, statements, task_values
from gateway.store.sqlite.store import SQLiteStore
from tests.store.helpers import admission
from tests.store.test_aggregates import FILTERS, NOW, as_rows, at, forget_sqlite, plans, rows, write_all


def test_a_rows_day_is_the_date_python_gives_it():
    conn = sqlite3.connect(":memory:")
    moments = [at(0, 0.123), 1.0, 86_399.9999995, 86_399.9999994]
    for midnight in (at(0), at(59), 4_102_444_800.0):  # 2100-01-01
        moment = midnight - 2e-6
        for _ in range(40):  # every double from 2 µs before midnight to past the rounding's edge
            moments.append(moment)
            moment = math.nextafter(moment, math.inf)
    for moment in moments:
        (day,) = conn.execute(f"SELECT {rollup.day_of('?')}", (moment,) * 3).fetchone()
        assert datetime.fromtimestamp(day * 86_400, UTC).date() == datetime.fromtimestamp(moment, UTC).date(), moment


def v4_store(path: Path, tasks: list[Task]) -> None:
    """A store file as the gateway wrote it before the figures existed."""
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 5):
        for statement in statements(MIGRATIONS[version]):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=4")
    conn.executemany(
        f"INSERT INTO tasks ({', '.join(TASK_FIELDS)}) VALUES ({', '.join('?' * len(TASK_FIELDS))})",
        [task_values(task) for task in tasks],
    )
    conn.close()


def old_rows(count: int) -> list[Task]:
    rng = random.Random(3)
    statuses = ("succeeded", "failed", "expired", "unknown", "create_failed", "queued", "pending")
    tasks = []
    for i in range(count):
        task = admission(NOW, team_name=rng.choice("ab"), created_at=at(rng.randrange(-30, 30), rng.uniform(0, 86_400)))
        status = statuses[i % len(statuses)]  # each kind in every 7 rowids
        settled = status not in ("queued", "pending")
        tasks.append(
            replace(
                task.task,
                task_id=f"cgt-old-{i}" if status != "pending" else None,
                status=status,
                billed_ms=rng.randrange(20_000) if settled else None,
                cost_micros=rng.randrange(4_000_000) if settled else None,
                settled_at=NOW if settled else None,
            )
        )
    return tasks


async def test_a_v4_store_is_migrated_and_its_rows_counted_batch_by_batch_while_it_serves(tmp_path):
    path = tmp_path / "gateway.db"
    v4_store(path, old_rows(60))
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store._backfilling  # the migration's backfill, in the background
        await _assert_exact(store, FILTERS)
        assert await store._do(_backfilled)
        await store._do(forget_sqlite)  # and again, a batch at a time, with the store serving between batches
        await write_all(store, plans(random.Random(8), 30, days=(-30, 30)))
        steps = 0
        while not await store._do(lambda conn: rollup.backfill_batch(conn, 7)):
            steps += 1
            await _assert_exact(store, FILTERS[:5])
            if steps in (1, 4):  # a row the batches have passed and one they have not, of each kind
                for passed in (True, False):
                    queued, unknown = await store._do(lambda conn, passed=passed: _old_rows(conn, passed))
                    await store.settle(queued, "succeeded", 1_000, 100_000, False, None, NOW)
                    await store.resolve_unknown(unknown, "voided" if passed else "succeeded", 9, 9, "ops", NOW)
        assert steps >= 8
        await _assert_exact(store, FILTERS)
        assert await store._do(_backfilled)
    finally:
        await store.close()
    reopened = SQLiteStore(str(path))  # a finished backfill has nothing left to do
    await reopened.open()
    try:
        await reopened._backfilling
        await _assert_exact(reopened, FILTERS)
    finally:
        await reopened.close()


def _backfilled(conn: sqlite3.Connection) -> bool:
    return bool(conn.execute("SELECT done >= upto FROM ledger_backfill").fetchone()[0])


def _old_rows(conn: sqlite3.Connection, passed: bool) -> tuple[str, str]:
    """A queued and an unknown row of those that predate the figures, the backfill past them or not yet."""
    where = "tasks.rowid <= done" if passed else "tasks.rowid > done AND tasks.rowid <= upto"
    found = [
        conn.execute(
            f"SELECT task_id FROM tasks, ledger_backfill WHERE status = ? AND {where} LIMIT 1", (status,)
        ).fetchone()[0]
        for status in ("queued", "unknown")
    ]
    return found[0], found[1]


async def _assert_exact(store: SQLiteStore, filters: tuple[LedgerFilter, ...]) -> None:
    for flt in filters:
        for by in GROUP_BY:
            assert as_rows(by, await store.aggregate(by, flt)) == group(await rows(store, flt), by), (by, flt)


async def test_figures_are_read_instead_of_rows_and_their_cost_does_not_grow_with_the_rows(tmp_path):
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    try:
        settled = await store._do(lambda conn: _seed(conn, random.Random(1), 3_000))
        everything, january = LedgerFilter(), LedgerFilter(since=at(0), until=at(31))
        await store.aggregate("team", january)  # the reader reads the schema once, on its first query
        work = {flt: await _steps(store, store.aggregate("team", flt)) for flt in (everything, january)}
        settled += await store._do(lambda conn: _seed(conn, random.Random(2), 6_000))
        for flt in (everything, january):
            chosen = [t for t in settled if flt.since is None or flt.since <= t.created_at < flt.until]
            [figures] = await store.aggregate("team", flt)
            assert (figures.tasks, figures.billed_ms, figures.cost_micros) == (
                len(chosen),
                sum(t.billed_ms or 0 for t in chosen),
                sum(t.cost_micros or 0 for t in chosen),
            )
            assert await _steps(store, store.aggregate("team", flt)) == work[flt]  # three times the rows, no more work
        summed = store._read(
            lambda conn: conn.execute("SELECT team, SUM(cost_micros) FROM tasks GROUP BY 1").fetchall()
        )
        assert work[everything] * 100 < await _steps(store, summed)
    finally:
        await store.close()


def _seed(conn: sqlite3.Connection, rng: random.Random, count: int) -> list[Task]:
    """Settled rows inserted as they are (the figures count them as any settled row): one team, two models,
    the last two months of 2024 and the first two of 2025."""
    tasks = []
    for _ in range(count):
        day = rng.randrange(-61, 59)
        task = admission(NOW, team_name="red", model=rng.choice(("m1", "m2")), created_at=at(day, 7.5)).task
        done = {"billed_ms": rng.randrange(9_000), "cost_micros": rng.randrange(10**6), "settled_at": NOW}
        tasks.append(replace(task, status="succeeded", **done))
    conn.executemany(INSERT_TASK, [task_values(task) for task in tasks])
    return tasks


async def _steps(store: SQLiteStore, read: Awaitable[object]) -> int:
    """The SQLite virtual machine's instructions that a read ran on the reader's connection."""
    counted = 0

    def step() -> int:
        nonlocal counted
        counted += 1
        return 0  # go on

    conn = store._reader._conn  # type: ignore[union-attr]
    conn.set_progress_handler(step, 1)
    try:
        await read
    finally:
        conn.set_progress_handler(None, 1)
    return counted


async def test_the_reader_cannot_write(tmp_path):
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    try:
        with pytest.raises(StoreUnavailable):
            await store._read(lambda conn: conn.execute("DELETE FROM tasks"))
    finally:
        await store.close()
