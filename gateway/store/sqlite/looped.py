"""The SQLite store's writer for synchronous=NORMAL: operations run on the event loop's own thread, and
everything queued in one loop iteration commits in one transaction (group commit).

In WAL mode with synchronous=NORMAL a COMMIT hands its frames to the OS's page cache and never fsyncs:
checkpoints do, on the Checkpointer's thread, whose pin also keeps the loop's writes from ever starting
the WAL again (the one write that would fsync). A commit then costs some µs of system calls, less than
handing each batch to a thread and its answers back (thread switches, a self-pipe write, the GIL passed
to and fro). Callers are answered only after their batch has committed, so an acknowledged write survives
kill -9 of the process (power loss is what synchronous=FULL and its writer thread are for). The loop runs
one callback at a time, which is what makes each operation atomic.

The loop never waits on a lock: the connection's busy timeout is 0. A transaction that finds the write
lock taken (another process's, or the checkpointer's own short write) is tried again a millisecond later,
its batch kept in memory while the loop goes on; and while the checkpointer starts the WAL again, it asks
the loop to hold its transactions the same way (hold/release)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.store.sqlite.checkpointer import Checkpointer
from gateway.store.sqlite.transactions import BATCH_MAX, Op, Transactions, answer, as_raised, busy
from gateway.store.sqlite.writer import connect

T = TypeVar("T")
BUSY_RETRY_S = 0.001
BUSY_MAX_S = 5.0  # then the batch fails as unavailable, as the writer thread's busy timeout of 5 s does
HOLD_MAX_S = 0.5  # a hold the checkpointer has not released by then ends by itself


class LoopWriter:
    """Runs `fn(conn)` operations on the event loop that started it, one transaction per loop iteration."""

    _loop: asyncio.AbstractEventLoop  # start()'s

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
        self._batch: list[tuple[Op, asyncio.Future[Any]]] = []
        self._scheduled = False  # a flush is due
        self._held = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._busy_since: float | None = None
        self.conn: sqlite3.Connection | None = None
        self.checkpointer = Checkpointer(path, synchronous, writer=self)
        self._tx = Transactions(on_commit, on_rollback, before_commit, self.checkpointer.committed)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        self.conn = connect(self._path, self._sync)
        self.conn.execute("PRAGMA busy_timeout=0")  # never sleep on a lock on the loop's thread: see _begin
        self.checkpointer.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.checkpointer.stop)
        self._resume()
        while self._batch:  # what is queued still commits before the connection closes
            self._flush()
            if self._batch:
                await asyncio.sleep(BUSY_RETRY_S)
        if self.conn:  # the last connection to close checkpoints what is left and removes the WAL: a fsync
            await asyncio.to_thread(self.conn.close)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self._loop.create_future()
        self._batch.append((fn, fut))
        if not self._scheduled and not self._held:
            self._scheduled = True
            self._loop.call_soon(self._flush)  # after every callback already due: this iteration's batch
        return fut

    async def prepare(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Before serving (migrations, rebuilding what memory holds): in a worker thread, so that a long
        migration does not hold the loop. Nothing else runs on the connection yet."""
        ((value, exc),) = await asyncio.to_thread(self._tx.run, self._connection(), [fn])
        if exc is not None:
            raise as_raised(exc)
        result: T = value
        return result

    def _flush(self) -> None:
        self._scheduled = False
        if self._held or not self._batch:
            return
        conn = self._connection()
        if not self._begin(conn):
            return
        batch = self._batch[:BATCH_MAX]
        del self._batch[:BATCH_MAX]
        if self._batch:  # the rest after the loop's other callbacks
            self._scheduled = True
            self._loop.call_soon(self._flush)
        outcomes = self._tx.run(conn, [fn for fn, _fut in batch])
        for (_fn, fut), (value, exc) in zip(batch, outcomes, strict=True):
            answer(fut, value, exc)

    def _begin(self, conn: sqlite3.Connection) -> bool:
        """BEGIN IMMEDIATE; False when another connection holds the write lock: the flush is tried again
        shortly, for up to BUSY_MAX_S. After that the transaction's own BEGIN fails each operation."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if busy(exc):
                now = self._loop.time()
                if self._busy_since is None:
                    self._busy_since = now
                if now - self._busy_since < BUSY_MAX_S:
                    self._scheduled = True
                    self._loop.call_later(BUSY_RETRY_S, self._flush)
                    return False
        self._busy_since = None
        return True

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        return self.conn

    # The checkpointer's thread asks the loop to hold its transactions while it starts the WAL again.

    def hold(self, timeout: float) -> bool:
        taken = threading.Event()
        try:
            self._loop.call_soon_threadsafe(self._take, taken)
        except RuntimeError:  # the loop has closed
            return False
        return taken.wait(timeout)

    def release(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resume)

    def _take(self, taken: threading.Event) -> None:
        # Between two callbacks: no transaction of the loop's is open.
        self._held = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = self._loop.call_later(HOLD_MAX_S, self._resume)
        taken.set()

    def _resume(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._held = False
        if self._batch and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
