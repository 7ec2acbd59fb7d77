"""The embedded store: one SQLite file (WAL), written by one thread with group commit (writer.py).

Every operation runs on the writer thread inside the current batch's transaction; the batch commits
before any of its callers is answered, so an acknowledged task survives kill -9.
Serialising all operations on one thread is also what makes check-and-reserve atomic."""

from __future__ import annotations

import asyncio
import operator
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import IdempotencyConflict, StoreUnavailable
from ..keypool import KeyHealth
from ..quota import WINDOW_S, Counters, RateState, Rejection, Subject, check, rate_state
from .base import IDEM_TTL_S, LIVE, TASK_FIELDS, Admission, IdemRecord, Task, Usage
from .writer import Writer

SCHEMA_VERSION = 1
MIGRATIONS = {
    1: """
    CREATE TABLE tasks (
        rid TEXT PRIMARY KEY, task_id TEXT UNIQUE, team TEXT NOT NULL, user TEXT NOT NULL,
        model TEXT NOT NULL, resolution TEXT NOT NULL, duration_s INTEGER NOT NULL,
        input_ms INTEGER NOT NULL, input_estimated INTEGER NOT NULL, estimate_ms INTEGER NOT NULL,
        estimate_micros INTEGER NOT NULL, team_period TEXT NOT NULL, user_period TEXT NOT NULL,
        created_at REAL NOT NULL, status TEXT NOT NULL, key_name TEXT, idem_key TEXT,
        billed_ms INTEGER, cost_micros INTEGER, cost_estimated INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL, settled_at REAL, next_poll_at REAL NOT NULL DEFAULT 0,
        final_body BLOB);
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
}
BOOKS_MAX = 100_000  # cached figures; past this the cache starts again from the tables
_COLS = ", ".join(TASK_FIELDS)
_INSERT_TASK = f"INSERT INTO tasks ({_COLS}) VALUES ({', '.join('?' * len(TASK_FIELDS))})"
_task_values = operator.attrgetter(*TASK_FIELDS)


def _row_to_task(row: sqlite3.Row | tuple) -> Task:
    t = Task(*row)
    t.input_estimated, t.cost_estimated = bool(t.input_estimated), bool(t.cost_estimated)
    return t


class SQLiteStore:
    def __init__(self, path: str, synchronous: str = "NORMAL",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._books = _Books()
        self._writer = Writer(path, synchronous, on_rollback=self._books.clear)
        # Rate windows and key health live in this process: SQLite serves one gateway process.
        self._windows: dict[tuple[str, str], deque[float]] = {}  # admission times, oldest first
        self._windows_lock = threading.Lock()  # read by rate_state on the event loop's thread
        self._health: dict[str, KeyHealth] = {}
        self._key_slots: dict[str, int] = {}  # key name → tasks in flight on it
        self._slot_of: dict[str, str] = {}  # rid → key name, for live tasks only

    async def _do(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self._writer.submit(fn)

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._writer.start)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"Cannot open the SQLite store at {self.path}: {exc}") from None
        await self._do(_migrate)
        await self._do(self._load_windows)
        await self._do(self._load_key_slots)

    def _load_windows(self, c: sqlite3.Connection) -> None:
        """Rebuild the last minute's rate windows from the ledger: a restart must not reopen them."""
        rows = c.execute("SELECT team, user, created_at FROM tasks WHERE created_at > ? "
                         "ORDER BY created_at", (self._clock() - WINDOW_S,))
        with self._windows_lock:
            for team, user, created in rows:
                for key in (("team", team), ("user", user)):
                    self._windows.setdefault(key, deque()).append(created)

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.stop)

    async def ping(self) -> None:
        await self._do(lambda c: c.execute("INSERT OR REPLACE INTO in_flight VALUES ('_', 'ping', 0)"))

    async def now(self) -> float:
        return self._clock()

    # creates

    async def idem_get(self, team: str, key: str) -> IdemRecord | None:
        def op(c: sqlite3.Connection) -> IdemRecord | None:
            row = c.execute("SELECT body_hash, done, status, body, created_at FROM idempotency "
                            "WHERE team=? AND key=?", (team, key)).fetchone()
            if row is None or row[4] < self._clock() - IDEM_TTL_S:
                return None
            return IdemRecord(row[0], bool(row[1]), row[2], row[3] or b"", row[4])
        return await self._do(op)

    async def admit(self, adm: Admission, now: float) -> Rejection | None:
        def op(c: sqlite3.Connection) -> Rejection | None:
            with self._windows_lock:
                return self._admit(c, adm, now)
        return await self._do(op)

    def _admit(self, c: sqlite3.Connection, adm: Admission, now: float) -> Rejection | None:
        t = adm.task
        for s in adm.subjects:
            window = self._window(s.scope, s.name, now) if s.limits.requests_per_minute else None
            b = self._books
            rejection = check(s, b.counters(c, s.scope, s.name, s.period), b.in_flight(c, s.scope, s.name),
                              window, now, t.estimate_micros, t.estimate_ms)
            if rejection:
                return rejection
        if t.idem_key:
            claimed = c.execute(
                "INSERT INTO idempotency (team, key, body_hash, done, created_at) VALUES (?, ?, ?, 0, ?) "
                "ON CONFLICT (team, key) DO UPDATE SET body_hash=excluded.body_hash, done=0, status=0, "
                "body=NULL, created_at=excluded.created_at WHERE idempotency.created_at < ?",
                (t.team, t.idem_key, adm.body_hash, now, now - IDEM_TTL_S))
            if claimed.rowcount == 0:
                raise IdempotencyConflict("A request with this Idempotency-Key is still in flight.",
                                          code="idempotency_key_in_progress")
        c.execute(_INSERT_TASK, _task_values(t))
        for s in adm.subjects:
            self._books.add(c, s.scope, s.name, s.period, reserved_micros=t.estimate_micros,
                            reserved_ms=t.estimate_ms)
            self._books.bump(c, s.scope, s.name, 1)
            if s.limits.requests_per_minute:
                # Bounded by time (pruned past WINDOW_S) and by admission stopping at the limit.
                self._windows.setdefault((s.scope, s.name), deque()).append(now)
        return None

    def _window(self, scope: str, name: str, now: float) -> deque[float]:
        """The subject's admission times inside the window (caller holds the lock)."""
        window = self._windows.setdefault((scope, name), deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        return window

    async def cancel_admission(self, rid: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            t = _task_by_rid(c, rid)
            if t is None:
                return
            self._books.release(c, t)
            c.execute("DELETE FROM tasks WHERE rid=?", (rid,))
            if t.idem_key:
                c.execute("DELETE FROM idempotency WHERE team=? AND key=?", (t.team, t.idem_key))
            with self._windows_lock:
                for key in (("team", t.team), ("user", t.user)):
                    if t.created_at in self._windows.get(key, ()):
                        self._windows[key].remove(t.created_at)
        await self._do(op)
        await self.release_key(rid)

    # Key slots live in this process's memory, touched only on the event loop's thread: a create
    # takes and gives back slots without a trip to the writer. The key is written with the task id
    # (a pending create never needs it), and open() counts the slots back from the unsettled tasks.

    async def acquire_key(self, rid: str, key_name: str, limit: int) -> bool:
        if rid in self._slot_of or self._key_slots.get(key_name, 0) >= limit:
            return False
        self._key_slots[key_name] = self._key_slots.get(key_name, 0) + 1
        self._slot_of[rid] = key_name
        return True

    async def release_key(self, rid: str) -> None:
        key_name = self._slot_of.pop(rid, None)
        if key_name is not None:
            self._key_slots[key_name] -= 1

    async def key_in_flight(self) -> dict[str, int]:
        return self._key_slots

    def _load_key_slots(self, c: sqlite3.Connection) -> None:
        for rid, key_name in c.execute("SELECT rid, key_name FROM tasks WHERE settled_at IS NULL "
                                       "AND key_name IS NOT NULL"):
            self._slot_of[rid] = key_name
            self._key_slots[key_name] = self._key_slots.get(key_name, 0) + 1

    async def record_created(self, rid: str, task_id: str, status: str, now: float,
                             reply: tuple[int, bytes]) -> None:
        key_name = self._slot_of.get(rid)

        def op(c: sqlite3.Connection) -> None:
            row = c.execute("UPDATE tasks SET task_id=?, key_name=?, status=?, updated_at=? WHERE rid=? "
                            "RETURNING idem_key", (task_id, key_name, status, now, rid)).fetchone()
            if row and row[0]:
                _finish_idem(c, rid, reply)
        await self._do(op)

    async def fail_create(self, rid: str, now: float, reply: tuple[int, bytes] | None) -> None:
        def op(c: sqlite3.Connection) -> None:
            t = _task_by_rid(c, rid)
            if t is None or t.settled:
                return
            self._books.release(c, t)
            c.execute("UPDATE tasks SET status='create_failed', billed_ms=0, cost_micros=0, "
                      "settled_at=?, updated_at=? WHERE rid=?", (now, now, rid))
            if reply is not None:
                _finish_idem(c, rid, reply)
            elif t.idem_key:
                c.execute("DELETE FROM idempotency WHERE team=? AND key=?", (t.team, t.idem_key))
        await self._do(op)
        await self.release_key(rid)

    # tasks

    async def get_task(self, task_id: str) -> Task | None:
        def op(c: sqlite3.Connection) -> Task | None:
            row = c.execute(f"SELECT {_COLS} FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            return _row_to_task(row) if row else None
        return await self._do(op)

    async def set_status(self, task_id: str, status: str, now: float) -> None:
        await self._do(lambda c: c.execute(
            "UPDATE tasks SET status=?, updated_at=? WHERE task_id=? AND settled_at IS NULL",
            (status, now, task_id)))

    async def settle(self, task_id: str, status: str, billed_ms: int, cost_micros: int,
                     estimated: bool, final_body: bytes | None, now: float) -> Task | None:
        def op(c: sqlite3.Connection) -> Task | None:
            row = c.execute(f"SELECT {_COLS} FROM tasks WHERE task_id=? OR rid=?",
                            (task_id, task_id)).fetchone()
            if row is None:
                return None
            t = _row_to_task(row)
            if t.settled:
                return None
            self._books.release(c, t)
            for scope, name, period in (("team", t.team, t.team_period), ("user", t.user, t.user_period)):
                self._books.add(c, scope, name, period, spent_micros=cost_micros, spent_ms=billed_ms)
            c.execute("UPDATE tasks SET status=?, billed_ms=?, cost_micros=?, cost_estimated=?, "
                      "settled_at=?, updated_at=?, final_body=? WHERE rid=?",
                      (status, billed_ms, cost_micros, int(estimated), now, now, final_body, t.rid))
            t.status, t.billed_ms, t.cost_micros, t.cost_estimated = status, billed_ms, cost_micros, estimated
            t.settled_at = t.updated_at = now
            t.final_body = final_body
            return t
        done = await self._do(op)
        if done is not None:
            await self.release_key(done.rid)
        return done

    async def list_tasks(self, team: str, limit: int, after: str | None,
                         status: str | None) -> tuple[list[Task], bool]:
        def op(c: sqlite3.Connection) -> tuple[list[Task], bool]:
            sql, args = f"SELECT {_COLS} FROM tasks WHERE team=? AND task_id IS NOT NULL", [team]
            if after:
                anchor = c.execute("SELECT created_at, rid FROM tasks WHERE task_id=? AND team=?",
                                   (after, team)).fetchone()
                if anchor is None:
                    return [], False
                sql += " AND (created_at < ? OR (created_at = ? AND rid < ?))"
                args += [anchor[0], anchor[0], anchor[1]]
            if status:
                sql += " AND status=?"
                args.append(status)
            rows = c.execute(sql + " ORDER BY created_at DESC, rid DESC LIMIT ?", (*args, limit + 1))
            tasks = [_row_to_task(r) for r in rows]
            return tasks[:limit], len(tasks) > limit
        return await self._do(op)

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        def op(c: sqlite3.Connection) -> list[Task]:
            rows = c.execute(f"SELECT {_COLS} FROM tasks WHERE settled_at IS NULL AND next_poll_at <= ? "
                             "ORDER BY next_poll_at LIMIT ?", (now, limit)).fetchall()
            leased = [(now + lease_s, r[0]) for r in rows]
            c.executemany("UPDATE tasks SET next_poll_at=? WHERE rid=?", leased)
            return [_row_to_task(r) for r in rows]
        return await self._do(op)

    async def defer_poll(self, rid: str, next_at: float) -> None:
        await self._do(lambda c: c.execute("UPDATE tasks SET next_poll_at=? WHERE rid=?", (next_at, rid)))

    async def backlog(self) -> int:
        return await self._do(lambda c: c.execute(
            "SELECT COALESCE(SUM(n), 0) FROM in_flight WHERE scope='team'").fetchone()[0])

    # figures

    async def usage(self, subjects: tuple[Subject, ...]) -> list[Usage]:
        return await self._do(lambda c: [
            Usage(replace(self._books.counters(c, s.scope, s.name, s.period)),
                  self._books.in_flight(c, s.scope, s.name)) for s in subjects])

    async def rate_state(self, scope: str, name: str, limit: int, now: float) -> RateState:
        with self._windows_lock:  # in memory: no trip to the writer thread
            return rate_state(limit, self._window(scope, name, now), now)

    async def ledger(self, since: float | None, until: float | None, team: str | None,
                     user: str | None, model: str | None) -> list[Task]:
        where, args = ["status != 'create_failed'"], []
        for clause, value in (("created_at >= ?", since), ("created_at < ?", until), ("team = ?", team),
                              ("user = ?", user), ("model = ?", model)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT {_COLS} FROM tasks WHERE {' AND '.join(where)} ORDER BY created_at"
        return await self._do(lambda c: [_row_to_task(r) for r in c.execute(sql, args)])

    async def prune(self, before: float) -> int:
        return await self._do(lambda c: c.execute(
            "DELETE FROM tasks WHERE created_at < ? AND settled_at IS NOT NULL", (before,)).rowcount)

    async def purge_idempotency(self, now: float) -> int:
        return await self._do(lambda c: c.execute(
            "DELETE FROM idempotency WHERE created_at < ?", (now - IDEM_TTL_S,)).rowcount)

    # key pool

    async def key_health(self) -> dict[str, KeyHealth]:
        return self._health

    async def save_key_health(self, name: str, health: KeyHealth) -> None:
        self._health[name] = health


def _migrate(c: sqlite3.Connection) -> None:
    version = c.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(f"The store's schema version {version} is newer than this gateway's.")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[v].split(";"):
            if statement.strip():
                c.execute(statement)
        c.execute(f"PRAGMA user_version={v}")


def _task_by_rid(c: sqlite3.Connection, rid: str) -> Task | None:
    row = c.execute(f"SELECT {_COLS} FROM tasks WHERE rid=?", (rid,)).fetchone()
    return _row_to_task(row) if row else None


class _Books:
    """The counters and in-flight counts, written through to their tables and kept in memory so
    that checks read no rows. Touched only on the writer thread; cleared whenever a transaction
    rolls back, after which each figure is read again from its table."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, str], Counters] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def clear(self) -> None:
        self._counters.clear()
        self._in_flight.clear()

    def counters(self, c: sqlite3.Connection, scope: str, name: str, period: str) -> Counters:
        key = (scope, name, period)
        got = self._counters.get(key)
        if got is None:
            row = c.execute("SELECT spent_micros, reserved_micros, spent_ms, reserved_ms FROM counters "
                            "WHERE scope=? AND name=? AND period=?", key).fetchone()
            if len(self._counters) >= BOOKS_MAX:
                self._counters.clear()
            got = self._counters[key] = Counters(*row) if row else Counters()
        return got

    def in_flight(self, c: sqlite3.Connection, scope: str, name: str) -> int:
        got = self._in_flight.get((scope, name))
        if got is None:
            row = c.execute("SELECT n FROM in_flight WHERE scope=? AND name=?", (scope, name)).fetchone()
            if len(self._in_flight) >= BOOKS_MAX:
                self._in_flight.clear()
            got = self._in_flight[(scope, name)] = row[0] if row else 0
        return got

    def add(self, c: sqlite3.Connection, scope: str, name: str, period: str, spent_micros: int = 0,
            reserved_micros: int = 0, spent_ms: int = 0, reserved_ms: int = 0) -> None:
        n = self.counters(c, scope, name, period)
        c.execute("INSERT INTO counters VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, name, period) DO UPDATE "
                  "SET spent_micros=spent_micros+excluded.spent_micros, "
                  "reserved_micros=reserved_micros+excluded.reserved_micros, "
                  "spent_ms=spent_ms+excluded.spent_ms, reserved_ms=reserved_ms+excluded.reserved_ms",
                  (scope, name, period, spent_micros, reserved_micros, spent_ms, reserved_ms))
        n.spent_micros += spent_micros
        n.reserved_micros += reserved_micros
        n.spent_ms += spent_ms
        n.reserved_ms += reserved_ms

    def bump(self, c: sqlite3.Connection, scope: str, name: str, delta: int) -> None:
        n = max(0, self.in_flight(c, scope, name) + delta)
        c.execute("INSERT INTO in_flight VALUES (?, ?, ?) ON CONFLICT (scope, name) DO UPDATE SET n=excluded.n",
                  (scope, name, n))
        self._in_flight[(scope, name)] = n

    def release(self, c: sqlite3.Connection, t: Task) -> None:
        """Give back what a live task holds: its reservation and its in-flight counts (key slots are
        given back in memory by the caller)."""
        if t.status not in LIVE:
            return
        for scope, name, period in (("team", t.team, t.team_period), ("user", t.user, t.user_period)):
            self.add(c, scope, name, period, reserved_micros=-t.estimate_micros, reserved_ms=-t.estimate_ms)
            self.bump(c, scope, name, -1)


def _finish_idem(c: sqlite3.Connection, rid: str, reply: tuple[int, bytes]) -> None:
    c.execute("UPDATE idempotency SET done=1, status=?, body=? WHERE (team, key) IN "
              "(SELECT team, idem_key FROM tasks WHERE rid=? AND idem_key IS NOT NULL)", (*reply, rid))
