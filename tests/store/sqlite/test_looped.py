"""The event loop's write path (synchronous=NORMAL): one transaction per loop iteration, and a loop that
never waits on a lock (a busy database, the checkpointer's hold) while its operations wait in memory."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from gateway.errors import StoreUnavailable
from gateway.store.sqlite import looped
from gateway.store.sqlite.looped import LoopWriter
from gateway.store.sqlite.store import SQLiteStore
from tests.store.helpers import EST_MICROS, admission, figures


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    assert isinstance(s._writer, LoopWriter)
    yield s
    await s.close()


class Ticks:
    """Counts the loop's iterations while it runs: a loop asleep on a lock would count none."""

    def __init__(self) -> None:
        self.n = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.n += 1
            await asyncio.sleep(0.001)

    def stop(self) -> int:
        self._task.cancel()
        return self.n


async def test_what_one_iteration_queues_commits_once(store):
    now = await store.now()
    statements: list[str] = []
    store._writer.conn.set_trace_callback(statements.append)
    results = await asyncio.gather(*(store.admit(admission(now), now) for _ in range(20)))
    store._writer.conn.set_trace_callback(None)
    assert results == [None] * 20
    assert statements.count("COMMIT") == 1
    assert (await figures(store, now))[1].in_flight == 20


async def test_operations_run_on_the_loops_own_thread(store):
    assert await store._do(lambda c: threading.get_ident()) == threading.get_ident()


async def test_opening_runs_its_work_off_the_loop(store):
    assert await store._writer.prepare(lambda c: threading.get_ident()) != threading.get_ident()


async def test_a_busy_database_waits_in_memory_while_the_loop_goes_on(store, tmp_path):
    other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    now = await store.now()
    ticks = Ticks()
    admitting = asyncio.ensure_future(store.admit(admission(now), now))
    await asyncio.sleep(0.2)
    assert not admitting.done()
    other.execute("COMMIT")
    assert await admitting is None
    assert ticks.stop() > 20  # the loop ran all along
    assert (await figures(store, now))[1].counters.reserved_micros == EST_MICROS
    other.close()


async def test_a_database_busy_for_too_long_is_unavailable(store, tmp_path, monkeypatch):
    monkeypatch.setattr(looped, "BUSY_MAX_S", 0.1)
    other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    now = await store.now()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.admit(admission(now), now)
    assert time.monotonic() - started < 2
    other.execute("ROLLBACK")
    other.close()
    assert await store.admit(admission(now), now) is None  # and the store goes on
    assert (await figures(store, now))[1].in_flight == 1


async def test_a_hold_keeps_operations_queued_until_released(store):
    assert await asyncio.to_thread(store._writer.hold, 1.0)
    now = await store.now()
    ticks = Ticks()
    admitting = asyncio.ensure_future(store.admit(admission(now), now))
    await asyncio.sleep(0.1)
    assert not admitting.done() and ticks.n > 10
    store._writer.release()
    assert await admitting is None
    ticks.stop()


async def test_a_hold_never_released_ends_by_itself(store, monkeypatch):
    monkeypatch.setattr(looped, "HOLD_MAX_S", 0.1)
    assert await asyncio.to_thread(store._writer.hold, 1.0)
    now = await store.now()
    assert await asyncio.wait_for(store.admit(admission(now), now), 2) is None


async def test_closing_commits_what_is_queued(tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    now = await s.now()
    assert await asyncio.to_thread(s._writer.hold, 1.0)  # as if the checkpointer held it as close began
    admitting = [asyncio.ensure_future(s.admit(admission(now), now)) for _ in range(3)]
    await asyncio.sleep(0)
    await s.close()
    assert await asyncio.gather(*admitting) == [None] * 3
    reopened = SQLiteStore(str(tmp_path / "gateway.db"))
    await reopened.open()
    assert (await figures(reopened, now))[1].in_flight == 3
    await reopened.close()
