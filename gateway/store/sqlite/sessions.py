"""Console sessions in the SQLite store (store/base.py's Console sessions section, SPEC §16), mixed into
SQLiteStore. A session is a row keyed by the SHA-256 of its id; expired rows are swept a few at a time by the
writes that make new ones, so the table holds about as many rows as there are sessions alive. The console's
list of `unknown` rows reads their partial index (schema migration 6) on the reader's connection, off the event
loop."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from gateway.store.base import TASK_FIELDS, UNKNOWN, Task
from gateway.store.sessions import ConsoleSession
from gateway.store.sqlite.schema import row_to_task

T = TypeVar("T")
SWEEP_BATCH = 50  # expired sessions deleted by each new one: more than sign-ins make, so the table stays small
SCHEMA = """
CREATE TABLE IF NOT EXISTS console_sessions (
    id_sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS console_sessions_expiry ON console_sessions (expires_at)
"""
_COLS = "id_sha256, kind, subject, created_at, expires_at"
_ROW_COLS = ", ".join("NULL" if name == "final_body" else name for name in TASK_FIELDS)


class SQLiteSessions:
    """Mixed into SQLiteStore (its `_do` runs an operation on the writer, its `_read` on the reader)."""

    if TYPE_CHECKING:  # provided by SQLiteStore

        async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    def sessions_setup(self, conn: sqlite3.Connection) -> None:
        """The sessions' table, made when absent (an operation: run by open())."""
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)

    async def save_session(self, session: ConsoleSession) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM console_sessions WHERE id_sha256 IN "
                "(SELECT id_sha256 FROM console_sessions WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
                (session.created_at, SWEEP_BATCH),
            )
            conn.execute(
                f"INSERT OR REPLACE INTO console_sessions ({_COLS}) VALUES (?, ?, ?, ?, ?)",
                (session.id_sha256, session.kind, session.subject, session.created_at, session.expires_at),
            )

        await self._do(op)

    async def get_session(self, id_sha256: str, now: float) -> ConsoleSession | None:
        def op(conn: sqlite3.Connection) -> ConsoleSession | None:
            row = conn.execute(
                f"SELECT {_COLS} FROM console_sessions WHERE id_sha256 = ? AND expires_at > ?", (id_sha256, now)
            ).fetchone()
            return None if row is None else ConsoleSession(*row)

        return await self._do(op)

    async def delete_session(self, id_sha256: str) -> None:
        await self._do(lambda conn: conn.execute("DELETE FROM console_sessions WHERE id_sha256 = ?", (id_sha256,)))

    async def unknown_tasks(self, limit: int) -> list[Task]:
        # On the reader: it sees every commit made before this call, and an operator's resolution is committed
        # before its answer, so the list that follows it no longer holds the row.
        sql = f"SELECT {_ROW_COLS} FROM tasks WHERE status = ? ORDER BY created_at DESC LIMIT ?"
        return await self._read(lambda conn: [row_to_task(row) for row in conn.execute(sql, (UNKNOWN, limit))])
