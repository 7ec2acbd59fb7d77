"""The SQLite store's ledger: task listings, the ledger's rows, an operator's resolution of an unknown row,
pruning (mixed into SQLiteStore)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from gateway.errors import NotFound, TaskNotUnknown
from gateway.store.base import IDEM_TTL_S, UNKNOWN, Task, check_figures, check_resolution
from gateway.store.sqlite.books import Books
from gateway.store.sqlite.schema import COLS, row_to_task, task_by_ref

T = TypeVar("T")
_ORDERS = {"desc": ("<", "DESC"), "asc": (">", "ASC")}  # order → (after the anchor, ORDER BY direction)


class SQLiteLedger:
    """Mixed into SQLiteStore (its `_do`, which runs an operation on the writer thread, and its `_books`)."""

    if TYPE_CHECKING:  # provided by SQLiteStore
        _books: Books

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

    async def resolve_unknown(
        self, ref: str, status: str, billed_ms: int, cost_micros: int, resolved_by: str, now: float
    ) -> Task:
        check_resolution(status, resolved_by)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)

        def op(conn: sqlite3.Connection) -> Task:
            task = task_by_ref(conn, ref)
            if task is None:
                raise NotFound("No such task in the ledger.", param="task_id")
            if task.status != UNKNOWN:
                raise TaskNotUnknown(f"The task is {task.status}, not unknown: there is nothing to resolve.")
            d_micros = cost_micros - (task.cost_micros or 0)
            d_ms = billed_ms - (task.billed_ms or 0)
            self._books.check_spend(conn, task, d_micros, d_ms)
            self._books.spend(conn, task, d_micros, d_ms)
            conn.execute(
                "UPDATE tasks SET status=?, billed_ms=?, cost_micros=?, cost_estimated=0, resolved_by=?, "
                "resolved_at=?, updated_at=? WHERE rid=?",
                (status, billed_ms, cost_micros, resolved_by, now, now, task.rid),
            )
            task.status = status
            task.billed_ms = billed_ms
            task.cost_micros = cost_micros
            task.cost_estimated = False
            task.resolved_by = resolved_by
            task.resolved_at = task.updated_at = now
            return task

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
