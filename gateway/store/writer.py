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
from typing import Any

from ..errors import GatewayError, StoreUnavailable

BATCH_MAX = 256


class Writer:
    """Runs `fn(conn)` operations on its thread; `on_rollback` is told whenever a transaction rolls back."""

    def __init__(self, path: str, synchronous: str, on_rollback: Callable[[], None]) -> None:
        self._path, self._sync, self._on_rollback = path, synchronous, on_rollback
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.conn: sqlite3.Connection | None = None

    def start(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={self._sync}")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread:
            self._queue.put(None)
            self._thread.join(timeout=10)
        if self.conn:
            self.conn.close()

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((fn, fut, loop))
        return fut

    def _run(self) -> None:
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
            self._run_batch(batch)

    def _run_batch(self, batch: list) -> None:
        """One transaction for the whole batch. An operation refuses (a GatewayError) before it writes
        anything, so a refusal leaves the others' work standing; any other failure rolls the batch back
        and every caller in it gets the error."""
        conn, results = self.conn, []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut, loop in batch:
                try:
                    results.append((fut, loop, fn(conn), None))
                except GatewayError as exc:
                    results.append((fut, loop, None, exc))
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to every awaiting caller
            self._on_rollback()
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # a broken connection: every caller gets the original error
            results = [(fut, loop, None, exc) for _fn, fut, loop in batch]
        by_loop: dict[Any, list] = {}
        for fut, loop, value, exc in results:
            by_loop.setdefault(loop, []).append((fut, value, exc))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, items)
            except RuntimeError:  # the loop closed while we worked
                pass


def _resolve_all(items: list) -> None:
    for fut, value, exc in items:
        if fut.done():
            continue
        if isinstance(exc, sqlite3.Error):
            fut.set_exception(StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}."))
        elif exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
