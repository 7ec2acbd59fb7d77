"""The SQLite store's ledger reads and clean-up: task listings, the ledger's rows, pruning (mixed into SQLiteStore)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from gateway.store.base import IDEM_TTL_S, Task
from gateway.store.sqlite.schema import COLS, row_to_task

T = TypeVar("T")
_ORDERS = {"desc": ("<", "DESC"), "asc": (">", "ASC")}  # order → (after the anchor, ORDER BY direction)


class SQLiteLedger:
    """Mixed into SQLiteStore (its `_do`, which runs an operation on the writer thread)."""

    if TYPE_CHECKING:  # provided by SQLiteStore

        async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def list_tasks(
        self,
        team: str,
        limit: int,
        after: str | None,
        status: str | None,
        order: str = "desc",
        include_deleted: bool = True,
    ) -> tuple[list[Task], bool]:
        if order not in _ORDERS:
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        past, direction = _ORDERS[order]

        def op(conn: sqlite3.Connection) -> tuple[list[Task], bool]:
            sql, args = f"SELECT {COLS} FROM tasks WHERE team=? AND task_id IS NOT NULL", [team]
            if after:
                anchor = conn.execute(
                    "SELECT created_at, rid FROM tasks WHERE task_id=? AND team=?", (after, team)
                ).fetchone()
                if anchor is None:
                    return [], False
                sql += f" AND (created_at {past} ? OR (created_at = ? AND rid {past} ?))"
                args += [anchor[0], anchor[0], anchor[1]]
            if status:
                sql += " AND status=?"
                args.append(status)
            if not include_deleted:
                sql += " AND deleted_at IS NULL"
            rows = conn.execute(sql + f" ORDER BY created_at {direction}, rid {direction} LIMIT ?", (*args, limit + 1))
            tasks = [row_to_task(r) for r in rows]
            return tasks[:limit], len(tasks) > limit

        return await self._do(op)

    async def mark_deleted(self, task_id: str, now: float) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            conn.execute("UPDATE tasks SET deleted_at=? WHERE task_id=? AND deleted_at IS NULL", (now, task_id))
            row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            return row_to_task(row) if row else None

        return await self._do(op)

    async def ledger(
        self, since: float | None, until: float | None, team: str | None, user: str | None, model: str | None
    ) -> list[Task]:
        where, args = ["status != 'create_failed'"], []
        for clause, value in (
            ("created_at >= ?", since),
            ("created_at < ?", until),
            ("team = ?", team),
            ("user = ?", user),
            ("model = ?", model),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT {COLS} FROM tasks WHERE {' AND '.join(where)} ORDER BY created_at"
        return await self._do(lambda conn: [row_to_task(r) for r in conn.execute(sql, args)])

    async def prune(self, before: float) -> int:
        return await self._do(
            lambda conn: (
                conn.execute("DELETE FROM tasks WHERE created_at < ? AND settled_at IS NOT NULL", (before,)).rowcount
            )
        )

    async def purge_idempotency(self, now: float) -> int:
        return await self._do(
            lambda conn: conn.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEM_TTL_S,)).rowcount
        )
