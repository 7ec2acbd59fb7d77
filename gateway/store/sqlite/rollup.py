"""The ledger's per-day and per-month figures in the SQLite store, kept as rows settle.

ledger_days and ledger_months hold, per (day or month, team, user, model), the settled rows' tasks,
succeeded, failed, billed_ms and cost_micros (create_failed rows count nothing). Triggers keep them in the
very statement that settles a row, whatever op does it (settle, mark_unknown, fail_create, an insert of a
settled row), and move them by the difference when a counted row's figures change (resolve_unknown).
Deleting a row (retention) leaves them as they are.

The figures follow a row (COUNTED) when it has `rolled` set, as every row written by this schema has from
its insert, or when the backfill has passed it: rows that predate the figures are counted by the backfill
in short batches, walking the rowids they had when the schema changed (ledger_backfill: done of upto). So
the backfill writes figures only, never the rows themselves."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

# A row's day, as days since 1970-01-01 UTC: the date Python's datetime.fromtimestamp gives, which rounds
# to the microsecond, half to even (so a row 0.4 µs before midnight belongs to the next day).
DAY_S = 86_400
FAILED = "('failed', 'cancelled', 'expired')"
FIGURES = ("tasks", "succeeded", "failed", "billed_ms", "cost_micros")
COUNTED = "(rolled = 1 OR rowid <= (SELECT done FROM ledger_backfill))"  # rows the figures follow once settled
_TABLES = {"ledger_days": "day", "ledger_months": "month"}
_SUMS = ", ".join(f"{f} = {f} + excluded.{f}" for f in FIGURES)


def day_of(column: str) -> str:
    whole = f"CAST({column} AS INTEGER)"
    return f"(({whole} + (({column} - {whole}) * 1000000.0 >= 999999.5)) / {DAY_S})"


def month_of(day: str) -> str:
    """The month of a day number, as the number yyyymm."""
    return f"CAST(strftime('%Y%m', ({day}) * {DAY_S}, 'unixepoch') AS INTEGER)"


def _period(table: str, created_at: str) -> str:
    return day_of(created_at) if _TABLES[table] == "day" else month_of(day_of(created_at))


def _upsert(table: str) -> str:
    return f"ON CONFLICT ({_TABLES[table]}, team, user, model) DO UPDATE SET {_SUMS}"


def _table(name: str) -> str:
    return f"""
    CREATE TABLE {name} (
        {_TABLES[name]} INTEGER NOT NULL, team TEXT NOT NULL, user TEXT NOT NULL, model TEXT NOT NULL,
        tasks INTEGER NOT NULL, succeeded INTEGER NOT NULL, failed INTEGER NOT NULL,
        billed_ms INTEGER NOT NULL, cost_micros INTEGER NOT NULL,
        PRIMARY KEY ({_TABLES[name]}, team, user, model)) WITHOUT ROWID;"""


def _add_row(row: str, sign: str) -> str:
    """Statements (of a trigger's body) that add `sign` × the row's figures to its day and its month."""
    return "".join(
        f"""
        INSERT INTO {table} SELECT {_period(table, f"{row}.created_at")}, {row}.team, {row}.user, {row}.model,
            {sign}, {sign} * ({row}.status = 'succeeded'), {sign} * ({row}.status IN {FAILED}),
            {sign} * COALESCE({row}.billed_ms, 0), {sign} * COALESCE({row}.cost_micros, 0)
        WHERE {row}.status != 'create_failed' {_upsert(table)};"""
        for table in _TABLES
    )


# Written between the `;`-separated statements of a migration: see schema.statements().
SCHEMA = f"""
ALTER TABLE tasks ADD COLUMN rolled INTEGER NOT NULL DEFAULT 0;
{"".join(_table(name) for name in _TABLES)}
CREATE TABLE ledger_backfill (done INTEGER NOT NULL, upto INTEGER NOT NULL);
INSERT INTO ledger_backfill SELECT 0, COALESCE(MAX(rowid), 0) FROM tasks;
CREATE TRIGGER ledger_settle AFTER UPDATE OF settled_at ON tasks
WHEN OLD.settled_at IS NULL AND NEW.settled_at IS NOT NULL
    AND (NEW.rolled = 1 OR NEW.rowid <= (SELECT done FROM ledger_backfill))
BEGIN {_add_row("NEW", "1")}
END;
CREATE TRIGGER ledger_insert_settled AFTER INSERT ON tasks
WHEN NEW.settled_at IS NOT NULL AND NEW.rolled = 1
BEGIN {_add_row("NEW", "1")}
END;
CREATE TRIGGER ledger_refigure AFTER UPDATE OF status, billed_ms, cost_micros, created_at, team, user, model ON tasks
WHEN OLD.settled_at IS NOT NULL AND NEW.settled_at IS NOT NULL
    AND (OLD.rolled = 1 OR OLD.rowid <= (SELECT done FROM ledger_backfill))
BEGIN {_add_row("OLD", "-1")} {_add_row("NEW", "1")}
END;
"""


def count_rows(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> None:
    """Add to the figures the settled rows matching `where` that they do not follow yet."""
    for table in _TABLES:
        conn.execute(
            f"INSERT INTO {table} SELECT {_period(table, 'created_at')}, team, user, model, COUNT(*), "
            f"SUM(status = 'succeeded'), SUM(status IN {FAILED}), SUM(COALESCE(billed_ms, 0)), "
            f"SUM(COALESCE(cost_micros, 0)) FROM tasks WHERE ({where}) AND NOT {COUNTED} "
            f"AND settled_at IS NOT NULL AND status != 'create_failed' GROUP BY 1, 2, 3, 4 {_upsert(table)}",
            args,
        )


def backfill_batch(conn: sqlite3.Connection, batch: int) -> bool:
    """Count the next `batch` rows that predate the figures; True once none is left."""
    row: tuple[int, int] = conn.execute("SELECT done, upto FROM ledger_backfill").fetchone()
    done, upto = row
    if done >= upto:
        return True
    rows = conn.execute(
        "SELECT rowid FROM tasks WHERE rowid > ? AND rowid <= ? ORDER BY rowid LIMIT ?", (done, upto, batch)
    ).fetchall()
    last: int = rows[-1][0] if len(rows) == batch else upto
    count_rows(conn, "rowid > ? AND rowid <= ?", (done, last))
    conn.execute("UPDATE ledger_backfill SET done = ?", (last,))
    return last >= upto


def prune_batch(conn: sqlite3.Connection, before: float, batch: int) -> int:
    """Delete up to `batch` settled rows, none `unknown`, created before `before`, oldest first; a row
    the backfill has not reached yet is counted first, so the figures keep every deleted row."""
    rows = conn.execute(
        f"SELECT rowid, {COUNTED} FROM tasks WHERE created_at < ? AND settled_at IS NOT NULL "
        "AND status != 'unknown' ORDER BY created_at LIMIT ?",
        (before, batch),
    ).fetchall()
    uncounted = [rowid for rowid, counted in rows if not counted]
    if uncounted:
        count_rows(conn, "rowid IN (SELECT value FROM json_each(?))", (_json_list(uncounted),))
    conn.execute("DELETE FROM tasks WHERE rowid IN (SELECT value FROM json_each(?))", (_json_list(r[0] for r in rows),))
    return len(rows)


def _json_list(numbers: Iterable[int]) -> str:
    """Many rowids as one parameter (json_each), however many there are."""
    return "[" + ",".join(map(str, numbers)) + "]"
