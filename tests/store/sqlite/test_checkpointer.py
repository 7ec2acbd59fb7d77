"""WAL checkpoints on their own thread: the WAL stays bounded on both write paths, and the event loop's
writes (synchronous=NORMAL) never start the WAL again, the one write of theirs that would fsync."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from gateway.store.sqlite import checkpointer
from gateway.store.sqlite.checkpointer import RESTART_PAGES
from gateway.store.sqlite.store import SQLiteStore


@pytest.fixture(params=["NORMAL", "FULL"])
async def store(request, tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"), request.param)
    await s.open()
    yield s
    await s.close()


def wal_header(tmp_path) -> bytes:
    """The WAL's checkpoint sequence and salts: they change whenever the WAL starts again."""
    return (tmp_path / "gateway.db-wal").read_bytes()[12:24]


async def test_checkpoints_run_on_their_own_thread_and_bound_the_wal(store, tmp_path):
    """10,000 commits of two frames each, without a pause: 82 MB of WAL if it never started again."""
    assert await store._do(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    for _ in range(10_000):
        await store.ping()  # one commit each
    assert store._writer.checkpointer.runs > 0
    assert (tmp_path / "gateway.db-wal").stat().st_size < 2.5 * RESTART_PAGES * 4120
    if store._writer.checkpointer._writer is not None:  # the loop's: started again by the checkpointer's write
        assert store._writer.checkpointer.restarts > 0


async def test_under_load_the_checkpointer_starts_the_wal_again_while_the_loop_holds(tmp_path, monkeypatch):
    """Batches of concurrent creates leave no quiet moment: the WAL starts again only because the loop
    holds its transactions for the checkpointer, and every operation queued meanwhile still commits."""
    monkeypatch.setattr(checkpointer, "RESTART_PAGES", 40)
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    try:
        for _ in range(400):  # a commit each, every 64 of them a round
            await asyncio.gather(*(s.ping() for _ in range(10)))
        assert s._writer.checkpointer.restarts > 0
        assert (tmp_path / "gateway.db-wal").stat().st_size < 40 * RESTART_PAGES * 4120
        assert not s._writer._held
    finally:
        await s.close()


async def test_in_a_quiet_moment_the_writer_threads_next_write_starts_the_wal_again(tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"), "FULL")
    await s.open()
    s._writer.checkpointer.every_s = 0.05
    for _ in range(300):  # 600 frames: far below the writer's own checkpoint
        await s.ping()
    await asyncio.sleep(0.5)  # rounds after the last commit: one of them caught up with it
    await s.ping()  # the first write after a complete checkpoint starts the WAL again
    s._writer.checkpointer.stop()  # so that the count below is not refused as busy
    with sqlite3.connect(tmp_path / "gateway.db") as c:
        busy, frames, _ = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and 0 < frames <= 4
    await s.close()


async def test_in_a_quiet_moment_the_loops_next_write_appends_to_the_wal(tmp_path):
    """After a checkpoint that copied the whole WAL, the loop's next write would start it again and fsync
    its header on the loop's thread; the checkpointer's pin keeps it appending instead."""
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    try:
        s._writer.checkpointer.every_s = 0.02
        first = wal_header(tmp_path)
        caught_up = 0
        for _ in range(5):
            for _ in range(100):
                await s.ping()
            await asyncio.sleep(0.3)  # rounds after the last commit: one of them caught up with it
            caught_up += s._writer.checkpointer._caught_up
            await s.ping()
            assert wal_header(tmp_path) == first
        assert caught_up > 0
    finally:
        await s.close()


async def test_closing_stops_the_checkpoint_thread_and_removes_the_wal(store, tmp_path):
    await asyncio.gather(*(store.ping() for _ in range(200)))
    await store.close()
    assert not any(t.name == "sqlite-checkpoint" for t in threading.enumerate())
    assert not (tmp_path / "gateway.db-wal").exists()
