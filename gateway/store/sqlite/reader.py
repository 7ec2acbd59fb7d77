"""A read-only connection on a thread of its own, for the ledger's heavy reads (figures, listings).

WAL lets it read beside the writer: neither the event loop nor the writer waits for it. Each read runs
in one read transaction, so the several queries of one answer see one snapshot of the store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.errors import StoreUnavailable

T = TypeVar("T")


class Reader:
    def __init__(self, path: str) -> None:
        self._path = path
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        await self._call(self._connect)

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        await asyncio.get_running_loop().run_in_executor(pool, self._disconnect)
        pool.shutdown(wait=False)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(conn) on the reader's thread, inside one read transaction."""
        return await self._call(lambda: self._in_snapshot(fn))

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            raise StoreUnavailable("The gateway's store is closed.")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.") from None

    def _connect(self) -> None:
        uri = Path(self._path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _in_snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("The gateway's store is closed.")
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("ROLLBACK")  # nothing to keep: it only read
