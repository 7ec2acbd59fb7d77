"""The SQLite store's batches, on both write paths (the event loop's for synchronous=NORMAL, the writer
thread's for FULL): a refusal or one bad operation fails only itself; the books stay true."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from gateway.errors import DuplicateTaskId, IdempotencyConflict, RecordRejected, StoreUnavailable
from gateway.settings import Limits
from gateway.store.sqlite.looped import LoopWriter
from gateway.store.sqlite.schema import INSERT_TASK, task_values
from gateway.store.sqlite.store import SQLiteStore
from gateway.store.sqlite.transactions import unavailable
from tests.store.helpers import EST_MICROS, EST_MS, admission, admitted, created, figures

RPM = Limits(requests_per_minute=10)


@pytest.fixture(params=["NORMAL", "FULL"])
async def store(request, tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"), request.param)
    await s.open()
    yield s
    await s.close()


async def _one_batch(store: SQLiteStore, *steps):
    """Run the steps' store operations in one batch: the writer is held until all are queued."""
    if isinstance(store._writer, LoopWriter):
        assert await asyncio.to_thread(store._writer.hold, 1.0)  # as the checkpointer holds it
        tasks = [asyncio.ensure_future(step) for step in steps]
        await asyncio.sleep(0.05)  # every step has queued its operation
        store._writer.release()
        return await asyncio.gather(*tasks, return_exceptions=True)
    gate = threading.Event()
    held = store._do(lambda c: gate.wait(5))
    tasks = [asyncio.ensure_future(step) for step in steps]
    await asyncio.sleep(0.05)  # every step has queued its operation behind the held one
    gate.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


def _raise(exc: BaseException):
    def op(c: sqlite3.Connection):
        c.execute("INSERT INTO in_flight VALUES ('team', 'scratch', 1)")  # written, then rolled back
        raise exc

    return op


async def test_a_refusal_leaves_the_others_standing(store, tmp_path):
    now = await store.now()
    await admitted(store, now, idem="k1", body_hash="abc")
    first, second = admission(now), admission(now)
    results = await _one_batch(
        store,
        store.admit(first, now),
        store.admit(admission(now, idem="k1", body_hash="abc"), now),
        store.admit(second, now),
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], IdempotencyConflict)
    user, team = await figures(store, now)
    assert (team.in_flight, team.counters.reserved_micros) == (3, 3 * EST_MICROS)
    await store.close()
    reopened = SQLiteStore(str(tmp_path / "gateway.db"))  # and it was all committed
    await reopened.open()
    try:
        user, team = await figures(reopened, now)
        assert (team.in_flight, team.counters.reserved_micros) == (3, 3 * EST_MICROS)
    finally:
        await reopened.close()


@pytest.mark.parametrize(
    "fault",
    [
        lambda c: c.execute("INSERT INTO no_such_table VALUES (1)"),
        lambda c: c.execute("SELECT ?", (2**70,)),  # an int SQLite cannot hold
        _raise(ValueError("a bug")),
    ],
)
async def test_one_bad_operation_fails_only_itself(store, fault):
    now = await store.now()
    kept = await created(store, now, team=RPM)
    settling = await created(store, now, team=RPM)
    dropped = await admitted(store, now, team=RPM)
    fresh = [admission(now, team=RPM) for _ in range(3)]
    results = await _one_batch(
        store,
        store.admit(fresh[0], now),
        store._do(fault),
        store.admit(fresh[1], now),
        store.settle(settling.task_id, "succeeded", 1000, 200_000, False, None, now),
        store.cancel_admission(dropped.rid),
        store.admit(fresh[2], now),
    )
    assert isinstance(results[1], RecordRejected)
    assert (results[1].status, results[1].code) == (500, "record_rejected")
    assert [results[i] for i in (0, 2, 4, 5)] == [None] * 4 and results[3].status == "succeeded"
    user, team = await figures(store, now, team=RPM)
    assert (team.in_flight, team.counters.reserved_micros, team.counters.spent_micros) == (4, 4 * EST_MICROS, 200_000)
    # each admission counted once in the rate window, the cancelled one not at all
    assert (await store.rate_state("team", "marketing", 10, now)).remaining == 10 - 5
    assert (await store.get_task(kept.task_id)).status == "queued"
    assert {t.rid for t in await store.ledger(None, None, None, None, None)} == {
        kept.rid,
        settling.rid,
        *(a.task.rid for a in fresh),
    }
    assert await store._do(lambda c: c.execute("SELECT n FROM in_flight WHERE name='scratch'").fetchall()) == []


async def test_a_duplicate_id_in_a_batch_fails_only_its_record(store):
    now = await store.now()
    await created(store, now, task_id="cgt-1")
    a, b = await admitted(store, now), await admitted(store, now)
    results = await _one_batch(
        store,
        store.record_created(a.rid, "cgt-2", "queued", now, (200, b"{}")),
        store.record_created(b.rid, "cgt-1", "queued", now, (200, b"{}")),
    )
    assert results[0] is None and isinstance(results[1], DuplicateTaskId)
    assert (await store.get_task("cgt-2")).rid == a.rid


async def test_unavailability_fails_the_batch_and_undoes_memory(store):
    now = await store.now()
    cancelled = await admitted(store, now, team=RPM)
    results = await _one_batch(
        store,
        store.admit(admission(now, team=RPM), now),
        store.admit(admission(now, team=RPM), now),
        store.cancel_admission(cancelled.rid),
        store._do(_raise(sqlite3.OperationalError("disk I/O error"))),
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    user, team = await figures(store, now, team=RPM)  # the books are read again from the tables
    assert (team.in_flight, team.counters.reserved_micros) == (1, EST_MICROS)
    assert (await store.rate_state("team", "marketing", 10, now)).remaining == 9
    assert [t.rid for t in await store.ledger(None, None, None, None, None)] == [cancelled.rid]
    assert await store.admit(admission(now), now) is None  # and the writer goes on


async def test_a_read_only_database_is_unavailable_then_recovers(store):
    now = await store.now()
    await store._do(lambda c: c.execute("PRAGMA query_only=ON"))
    with pytest.raises(StoreUnavailable):
        await store.admit(admission(now), now)
    store._writer.conn.execute("PRAGMA query_only=OFF")  # the writer is idle; no transaction could start
    assert (await figures(store, now))[1].in_flight == 0
    assert await store.admit(admission(now), now) is None


def _error(cls, code: int | None):
    exc = cls("x")
    if code is not None:
        exc.sqlite_errorcode = code
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_error(sqlite3.OperationalError, sqlite3.SQLITE_IOERR | (12 << 8)), True),  # an extended I/O code
        (_error(sqlite3.OperationalError, sqlite3.SQLITE_BUSY), True),
        (_error(sqlite3.OperationalError, sqlite3.SQLITE_READONLY), True),
        (_error(sqlite3.OperationalError, sqlite3.SQLITE_FULL), True),
        (_error(sqlite3.OperationalError, None), True),
        (_error(sqlite3.DatabaseError, sqlite3.SQLITE_CORRUPT), True),
        (sqlite3.ProgrammingError("Cannot operate on a closed database."), True),
        (_error(sqlite3.OperationalError, sqlite3.SQLITE_ERROR), False),  # no such table, a syntax error
        (_error(sqlite3.IntegrityError, sqlite3.SQLITE_CONSTRAINT), False),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), False),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_unavailable(exc, expected):
    assert unavailable(exc) is expected


async def test_an_insert_that_breaks_a_constraint_in_a_batch_fails_alone(store):
    now = await store.now()
    twin = await admitted(store, now)
    results = await _one_batch(
        store, store._do(lambda c: c.execute(INSERT_TASK, task_values(twin))), store.admit(admission(now), now)
    )
    assert isinstance(results[0], RecordRejected) and results[1] is None
    assert (await figures(store, now))[1].in_flight == 2


async def test_a_batch_writes_each_changed_figure_once_and_the_tables_hold_them(store, tmp_path):
    now = await store.now()
    statements: list[str] = []
    store._writer.conn.set_trace_callback(statements.append)
    results = await _one_batch(store, *(store.admit(admission(now), now) for _ in range(20)))
    store._writer.conn.set_trace_callback(None)
    assert results == [None] * 20
    assert sum(s.startswith("INSERT INTO counters") for s in statements) == 2  # the team's, the user's
    assert sum(s.startswith("INSERT INTO in_flight") for s in statements) == 2
    await store.close()
    reopened = SQLiteStore(str(tmp_path / "gateway.db"))  # read back from the tables, not from memory
    await reopened.open()
    user, team = await figures(reopened, now)
    assert (team.in_flight, team.counters.reserved_micros) == (20, 20 * EST_MICROS)
    assert (user.in_flight, user.counters.reserved_ms) == (20, 20 * EST_MS)
    await reopened.close()
