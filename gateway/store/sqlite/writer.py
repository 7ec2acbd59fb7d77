"""The SQLite store's writer thread, for synchronous=FULL: one thread, one connection, operations
committed in batches (transactions.py).

With FULL every COMMIT waits for an fsync of the WAL; on this thread that wait holds no request's event
loop. Callers await futures that are answered only after their batch has committed, so an acknowledged
write survives power loss; running every operation on the one thread is what makes each of them atomic."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.store.sqlite.checkpointer import Checkpointer
from gateway.store.sqlite.transactions import BATCH_MAX, Op, Transactions, answer

T = TypeVar("T")
# An operation as queued: what to run, the future its caller awaits, and that caller's loop.
_Queued = tuple[Op, asyncio.Future[Any], asyncio.AbstractEventLoop]
_Answer = tuple[asyncio.Future[Any], Any, BaseException | None]  # an outcome, grouped by its loop


def connect(path: str, synchronous: str) -> sqlite3.Connection:
    """The writing connection, for either writer. It never checkpoints: the Checkpointer's thread does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


class Writer:
    """Runs `fn(conn)` operations on its thread, in batches of what queued while the last one ran."""

    def __init__(
        self,
        path: str,
        synchronous: str,
        on_commit: Callable[[], None],
        on_rollback: Callable[[], None],
        before_commit: Callable[[sqlite3.Connection], None] = lambda conn: None,
    ) -> None:
        self._path = path
        self._sync = synchronous
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.conn: sqlite3.Connection | None = None
        self.checkpointer = Checkpointer(path, synchronous)
        self._tx = Transactions(on_commit, on_rollback, before_commit, self.checkpointer.committed)

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        conn = self.conn = connect(self._path, self._sync)
        conn.execute("PRAGMA busy_timeout=5000")  # this thread may wait; no event loop waits with it
        self.checkpointer.start()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="sqlite-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self._thread:
            self._queue.put(None)
            self._thread.join(timeout=10)
        self.checkpointer.stop()
        if self.conn:  # the last connection to close checkpoints what is left and removes the WAL
            self.conn.close()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        return fut

    async def prepare(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Before serving (migrations, rebuilding what memory holds): on this thread, like any operation."""
        return await self.submit(fn)

    def _run(self, conn: sqlite3.Connection) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < BATCH_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Queued]) -> None:
        outcomes = self._tx.run(conn, [fn for fn, _fut, _loop in batch])
        by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for (_fn, fut, loop), (value, error) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((fut, value, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_answer_all, items)
            except RuntimeError:  # the loop closed while we worked
                pass


def _answer_all(items: list[_Answer]) -> None:
    for fut, value, exc in items:
        answer(fut, value, exc)
