"""The SQLite store's tables: the schema and its forward migrations, and tasks as rows."""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Iterator
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.store.base import TASK_FIELDS, Task
from gateway.store.sqlite.outbox import SCHEMA as OUTBOX_SCHEMA
from gateway.store.sqlite.rollup import SCHEMA as ROLLUP_SCHEMA

SCHEMA_VERSION = 6
# A store made by this version keeps TokenHub's task ids unique through a partial index: a pending row (no id
# yet) is not in it, so a create's admission writes one index page fewer and its record one fewer (measured:
# 10.1 → 8.1 WAL frames a create). A store made before keeps its column constraint (the same rule, its index
# rebuilt only by copying the table, which a start must not do).
MIGRATIONS = {
    1: """
    CREATE TABLE tasks (
        rid TEXT PRIMARY KEY, task_id TEXT, team TEXT NOT NULL, user TEXT NOT NULL,
        model TEXT NOT NULL, resolution TEXT NOT NULL, duration_s INTEGER NOT NULL,
        input_ms INTEGER NOT NULL, input_estimated INTEGER NOT NULL, estimate_ms INTEGER NOT NULL,
        estimate_micros INTEGER NOT NULL, team_period TEXT NOT NULL, user_period TEXT NOT NULL,
        created_at REAL NOT NULL, status TEXT NOT NULL, key_name TEXT, idem_key TEXT,
        billed_ms INTEGER, cost_micros INTEGER, cost_estimated INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL, settled_at REAL, next_poll_at REAL NOT NULL DEFAULT 0,
        final_body BLOB);
    CREATE UNIQUE INDEX tasks_task_id ON tasks (task_id) WHERE task_id IS NOT NULL;
    CREATE INDEX tasks_team_created ON tasks (team, created_at);
    CREATE INDEX tasks_created ON tasks (created_at);
    CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE settled_at IS NULL;
    CREATE TABLE counters (
        scope TEXT NOT NULL, name TEXT NOT NULL, period TEXT NOT NULL,
        spent_micros INTEGER NOT NULL DEFAULT 0, reserved_micros INTEGER NOT NULL DEFAULT 0,
        spent_ms INTEGER NOT NULL DEFAULT 0, reserved_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, name, period));
    CREATE TABLE in_flight (
        scope TEXT NOT NULL, name TEXT NOT NULL, n INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, name));
    CREATE TABLE idempotency (
        team TEXT NOT NULL, key TEXT NOT NULL, body_hash TEXT NOT NULL, done INTEGER NOT NULL,
        status INTEGER NOT NULL DEFAULT 0, body BLOB, created_at REAL NOT NULL,
        PRIMARY KEY (team, key));
    """,
    2: """
    ALTER TABLE tasks ADD COLUMN meta BLOB;
    ALTER TABLE tasks ADD COLUMN deleted_at REAL;
    """,
    3: OUTBOX_SCHEMA,
    4: """
    ALTER TABLE tasks ADD COLUMN resolved_by TEXT;
    ALTER TABLE tasks ADD COLUMN resolved_at REAL;
    """,
    5: ROLLUP_SCHEMA,  # the ledger's per-day figures (rollup.py); no table is rewritten
    # The `unknown` rows waiting for an operator, newest first: a few entries however large the ledger.
    # IF NOT EXISTS: a store opened by a build that made this index outside the migrations keeps it.
    6: "CREATE INDEX IF NOT EXISTS tasks_unknown ON tasks (created_at) WHERE status = 'unknown'",
}
COLS = ", ".join(TASK_FIELDS)
# rolled = 1: the ledger's figures follow every row written from now on (rollup.py).
INSERT_TASK = f"INSERT INTO tasks ({COLS}, rolled) VALUES ({', '.join('?' * len(TASK_FIELDS))}, 1)"
task_values = operator.attrgetter(*TASK_FIELDS)


def row_to_task(row: sqlite3.Row | tuple[Any, ...]) -> Task:
    task = Task(*row)
    task.input_estimated = bool(task.input_estimated)
    task.cost_estimated = bool(task.cost_estimated)
    return task


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(f"The store's schema version {version} is newer than this gateway's.")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in statements(MIGRATIONS[step]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={step}")


def statements(script: str) -> Iterator[str]:
    """The script's statements, one at a time (a trigger's body holds `;` of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def task_by_rid(conn: sqlite3.Connection, rid: str) -> Task | None:
    row = conn.execute(f"SELECT {COLS} FROM tasks WHERE rid=?", (rid,)).fetchone()
    return row_to_task(row) if row else None


def task_by_ref(conn: sqlite3.Connection, ref: str) -> Task | None:
    """By upstream task id, else by rid."""
    row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id=?", (ref,)).fetchone()
    return row_to_task(row) if row else task_by_rid(conn, ref)


def finish_idem(conn: sqlite3.Connection, rid: str, reply: tuple[int, bytes]) -> None:
    conn.execute(
        "UPDATE idempotency SET done=1, status=?, body=? WHERE (team, key) IN "
        "(SELECT team, idem_key FROM tasks WHERE rid=? AND idem_key IS NOT NULL)",
        (*reply, rid),
    )
