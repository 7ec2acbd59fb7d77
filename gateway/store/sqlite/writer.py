"""The SQLite store's writer: one thread, one connection, operations committed in batches.

Callers await futures that are answered only after their batch has committed, so an acknowledged
write survives kill -9; running every operation on the one thread is what makes each of them atomic."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import GatewayError, RecordRejected, StoreUnavailable
from gateway.store.sqlite.checkpointer import Checkpointer

BATCH_MAX = 256
T = TypeVar("T")
# An operation as queued: what to run, the future its caller awaits, and that caller's loop.
_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
# An operation's outcome: its future and loop, then its value or the exception it raised.
_Outcome = tuple[asyncio.Future[Any], asyncio.AbstractEventLoop, Any, BaseException | None]
_Answer = tuple[asyncio.Future[Any], Any, BaseException | None]  # an outcome, grouped by its loop

# sqlite3 looks for an adapter for every parameter that is not an int, float or str, and for None and
# bytes that search fails through two attribute lookups, each raising and clearing an AttributeError:
# ~2.4 µs per statement of a task row. Registered, the same values bind the same way (NULL, BLOB).
sqlite3.register_adapter(type(None), lambda value: None)
sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b itself


class Writer:
    """Runs `fn(conn)` operations on its thread. Before each COMMIT `before_commit(conn)` writes what the
    operations kept in memory; after it `on_commit` or `on_rollback` is called (on this thread): what
    operations keep in memory must follow what the tables keep."""

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
        self._on_commit = on_commit
        self._on_rollback = on_rollback
        self._before_commit = before_commit
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.conn: sqlite3.Connection | None = None
        self.checkpointer = Checkpointer(path)

    def start(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        conn = self.conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._sync}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on their own thread
        self.checkpointer.start()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="sqlite-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
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

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """One transaction for the whole batch. An operation refuses (a GatewayError) before it writes
        anything, so a refusal leaves the others' work standing. Any other failure rolls the batch back;
        unless the store itself is unavailable, its operations then run again one per transaction, so
        only the operation at fault fails."""
        try:
            results = self._transaction(conn, batch)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting callers
            self._rollback(conn)
            if len(batch) > 1 and isinstance(exc, Exception) and not unavailable(exc):
                results = [self._alone(conn, item) for item in batch]
            else:
                results = [(fut, loop, None, exc) for _fn, fut, loop in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for fut, loop, value, error in results:
            by_loop.setdefault(loop, []).append((fut, value, error))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, items)
            except RuntimeError:  # the loop closed while we worked
                pass

    def _transaction(self, conn: sqlite3.Connection, batch: list[_Op]) -> list[_Outcome]:
        results: list[_Outcome] = []
        conn.execute("BEGIN IMMEDIATE")
        for fn, fut, loop in batch:
            try:
                results.append((fut, loop, fn(conn), None))
            except GatewayError as exc:
                results.append((fut, loop, None, exc))
        self._before_commit(conn)
        conn.execute("COMMIT")
        self._on_commit()
        self.checkpointer.committed()
        return results

    def _alone(self, conn: sqlite3.Connection, item: _Op) -> _Outcome:
        try:
            return self._transaction(conn, [item])[0]
        except BaseException as exc:  # noqa: BLE001 - handed to this operation's caller
            self._rollback(conn)
            return item[1], item[2], None, exc

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # a broken connection: the callers get the original error
        self._on_rollback()


_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_PERM,
    }
)


def unavailable(exc: BaseException) -> bool:
    """The database cannot be written now (disk, lock, read-only, closed), as opposed to one record's fault."""
    if isinstance(exc, sqlite3.ProgrammingError):
        return "closed" in str(exc)
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError)
    return (code & 0xFF) in _UNAVAILABLE


def _resolve_all(items: list[_Answer]) -> None:
    for fut, value, exc in items:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(value)
        elif isinstance(exc, GatewayError) or not isinstance(exc, Exception):
            fut.set_exception(exc)
        elif unavailable(exc):
            fut.set_exception(StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}."))
        else:
            fut.set_exception(RecordRejected(f"The store refused this record: {exc.__class__.__name__}."))
