"""The SQLite store's ledger: task listings, the ledger's rows and grouped figures, an operator's resolution
of an unknown row, pruning (mixed into SQLiteStore). Listings, figures and pages are read on the reader's
connection, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

import structlog

from gateway.errors import NotFound, StoreUnavailable, TaskNotUnknown
from gateway.store.base import (
    IDEM_TTL_S,
    TASK_FIELDS,
    UNKNOWN,
    Group,
    LedgerFilter,
    Task,
    check_figures,
    check_resolution,
)
from gateway.store.budget import BudgetCheck
from gateway.store.sqlite import figures, rollup
from gateway.store.sqlite.books import Books
from gateway.store.sqlite.budget import check_budgets
from gateway.store.sqlite.reader import Reader
from gateway.store.sqlite.schema import COLS, row_to_task, task_by_ref

T = TypeVar("T")
_ORDERS = {"desc": ("<", "DESC"), "asc": (">", "ASC")}  # order → (after the anchor, ORDER BY direction)
_PAGE_COLS = ", ".join("NULL" if name in ("final_body", "meta") else name for name in TASK_FIELDS)
BACKFILL_BATCH = 500  # rows counted per operation of the backfill (~3 ms of CPU each)
BACKFILL_RETRY_S = 5.0


class SQLiteLedger:
    """Mixed into SQLiteStore (its `_do`, which runs an operation on the writer thread, its `_books` and `path`)."""

    if TYPE_CHECKING:  # provided by SQLiteStore
        _books: Books
        path: str

        async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    _reader: Reader | None = None
    _backfilling: asyncio.Task[None] | None = None

    async def _open_ledger(self) -> None:
        """Start the reader and, in the background, count the rows that predate the figures."""
        self._reader = Reader(self.path)
        await self._reader.start()
        self._backfilling = asyncio.create_task(self._backfill_forever(), name="sqlite-ledger-backfill")

    async def _close_ledger(self) -> None:
        if self._backfilling is not None:
            self._backfilling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backfilling
            self._backfilling = None
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    async def _backfill(self) -> int:
        """Count every row that predates the figures, a batch per operation (the next open goes on
        from where a stopped one left off); the number of batches it took."""
        batches = 0
        while not await self._do(lambda conn: rollup.backfill_batch(conn, BACKFILL_BATCH)):
            batches += 1
            await asyncio.sleep(0)  # the operations waiting behind it go first
        return batches

    async def _backfill_forever(self) -> None:
        """The backfill until it is done. Figures stay exact meanwhile (rows not counted yet are read as rows),
        so a store that cannot be written now is tried again later, and a failure costs speed, not figures."""
        log = structlog.get_logger("gateway.store")
        while True:
            try:
                if await self._backfill():
                    log.info("store.ledger_backfilled")
                return
            except StoreUnavailable as exc:
                log.warning("store.ledger_backfill_paused", error=str(exc), retry_s=BACKFILL_RETRY_S)
                await asyncio.sleep(BACKFILL_RETRY_S)
            except Exception:  # noqa: BLE001 - logged; the figures are read from the rows instead
                log.exception("store.ledger_backfill_failed")
                return

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise StoreUnavailable("The gateway's store is not open.")
        return await self._reader.read(fn)

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

        # The `unknown` rows have an index of their own (schema migration 6), a few entries however large the
        # ledger: a listing of them walks it rather than every row of the team. Its condition is written out, as
        # a bound value cannot prove that the partial index holds every row asked for.
        rows_of = f"tasks INDEXED BY tasks_unknown WHERE status='{UNKNOWN}' AND" if status == UNKNOWN else "tasks WHERE"

        def op(conn: sqlite3.Connection) -> tuple[list[Task], bool]:
            sql, args = f"SELECT {COLS} FROM {rows_of} team=? AND task_id IS NOT NULL", [team]
            if after:
                anchor = conn.execute(
                    "SELECT created_at, rid FROM tasks WHERE task_id=? AND team=?", (after, team)
                ).fetchone()
                if anchor is None:
                    return [], False
                sql += f" AND (created_at {past} ? OR (created_at = ? AND rid {past} ?))"
                args += [anchor[0], anchor[0], anchor[1]]
            if status and status != UNKNOWN:
                sql += " AND status=?"
                args.append(status)
            if not include_deleted:
                sql += " AND deleted_at IS NULL"
            rows = conn.execute(sql + f" ORDER BY created_at {direction}, rid {direction} LIMIT ?", (*args, limit + 1))
            tasks = [row_to_task(r) for r in rows]
            return tasks[:limit], len(tasks) > limit

        # On the reader, off the event loop: a filter by a rare status walks the team's rows. The reader sees
        # every commit made before this call, and a create is answered only once its row has committed, so a
        # task is listed as soon as its create has been acknowledged.
        return await self._read(op)

    async def mark_deleted(self, task_id: str, now: float) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            conn.execute("UPDATE tasks SET deleted_at=? WHERE task_id=? AND deleted_at IS NULL", (now, task_id))
            row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            return row_to_task(row) if row else None

        return await self._do(op)

    async def resolve_unknown(
        self,
        ref: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        resolved_by: str,
        now: float,
        alerts: BudgetCheck | None = None,
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
            check_budgets(conn, self._books, alerts, now)
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

    async def ledger_page(self, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list[Task], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        query = figures.Query().add("status != 'create_failed'")
        if after:  # one lower bound for the index's range: where the cursor is, unless since is later
            created_at, rid = _parse_cursor(after)
            query.add("(created_at > ? OR rid > ?)", created_at, rid)
            flt = replace(flt, since=created_at if flt.since is None else max(flt.since, created_at))
        figures.filtered(flt, query)
        sql = f"SELECT {_PAGE_COLS} FROM tasks WHERE {query.sql()} ORDER BY created_at, rid LIMIT ?"
        rows = await self._read(lambda conn: conn.execute(sql, (*query.args, limit + 1)).fetchall())
        tasks = [row_to_task(row) for row in rows[:limit]]
        more = len(rows) > limit
        return tasks, f"{tasks[-1].created_at!r}:{tasks[-1].rid}" if more else None

    async def aggregate(self, by: str, flt: LedgerFilter) -> list[Group]:
        return await self._read(lambda conn: figures.aggregate(conn, by, flt))

    async def prune(self, before: float, batch: int = 500) -> int:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        pruned = 0
        while True:  # one short transaction per batch: the writer serves others in between
            deleted = await self._do(lambda conn: rollup.prune_batch(conn, before, batch))
            pruned += deleted
            if deleted < batch:
                return pruned
            await asyncio.sleep(0)

    async def purge_idempotency(self, now: float) -> int:
        return await self._do(
            lambda conn: conn.execute("DELETE FROM idempotency WHERE created_at < ?", (now - IDEM_TTL_S,)).rowcount
        )


def _parse_cursor(after: str) -> tuple[float, str]:
    created_at, _, rid = after.partition(":")
    try:
        return float(created_at), rid
    except ValueError:
        raise ValueError(f"not a cursor this listing gave: {after!r}") from None
