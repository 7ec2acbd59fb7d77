"""The embedded store: one SQLite file (WAL), written with group commit: on the event loop's thread for
synchronous=NORMAL (looped.py), on a writer thread of its own for FULL (writer.py).

Every operation runs inside the current batch's transaction; the batch commits before any of its
callers is answered, so an acknowledged task survives kill -9 (and power loss with FULL).
Running all operations one at a time on one thread is also what makes check-and-reserve atomic."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from gateway.errors import DuplicateTaskId, IdempotencyConflict, NotFound, StoreUnavailable
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.quota import WINDOW_S, RateState, Rejection, Subject, check, rate_state
from gateway.store.base import (
    IDEM_TTL_S,
    PENDING,
    UNKNOWN,
    Admission,
    IdemRecord,
    Task,
    Usage,
    check_figures,
    check_status,
)
from gateway.store.budget import BudgetCheck
from gateway.store.outbox import Item
from gateway.store.sqlite.books import Books, Windows
from gateway.store.sqlite.budget import check_budgets
from gateway.store.sqlite.ledger import SQLiteLedger
from gateway.store.sqlite.looped import LoopWriter
from gateway.store.sqlite.outbox import SQLiteOutbox, add_items
from gateway.store.sqlite.schema import (
    COLS,
    INSERT_TASK,
    finish_idem,
    migrate,
    row_to_task,
    task_by_ref,
    task_by_rid,
    task_values,
)
from gateway.store.sqlite.sessions import SQLiteSessions
from gateway.store.sqlite.tenancy import SQLiteTenancy
from gateway.store.sqlite.writer import Writer

T = TypeVar("T")


class SQLiteStore(SQLiteLedger, SQLiteOutbox, SQLiteTenancy, SQLiteSessions):
    def __init__(self, path: str, synchronous: str = "NORMAL", clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._books = Books()
        # Rate windows and key health live in this process: SQLite serves one gateway process.
        self._windows = Windows()
        # NORMAL never fsyncs a commit, so its statements cost the loop less than a thread round trip.
        writer: type[Writer] | type[LoopWriter] = Writer if synchronous.upper() == "FULL" else LoopWriter
        self._writer = writer(
            path,
            synchronous,
            on_commit=self._windows.commit,
            on_rollback=self._rolled_back,
            before_commit=self._books.flush,
        )
        self._health: dict[str, KeyHealth] = {}
        self._key_slots: dict[str, int] = {}  # key name → tasks in flight on it
        self._slot_of: dict[str, str] = {}  # rid → key name, for live tasks only

    def _rolled_back(self) -> None:
        self._books.clear()  # each figure is read again from its table
        self._windows.rollback()

    async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(fn)

    async def open(self) -> None:
        try:
            await self._writer.start()
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"Cannot open the SQLite store at {self.path}: {exc}") from None
        await self._writer.prepare(migrate)  # off the event loop: a migration may take long
        await self._do(self.roster_setup)
        await self._do(self.sessions_setup)
        await self._writer.prepare(self._load_windows)
        await self._writer.prepare(self._load_key_slots)
        await self._open_ledger()

    def _load_windows(self, conn: sqlite3.Connection) -> None:
        """Rebuild the last minute's rate windows from the ledger: a restart must not reopen them."""
        self._windows.load(
            conn.execute(
                "SELECT team, user, created_at FROM tasks WHERE created_at > ? ORDER BY created_at",
                (self._clock() - WINDOW_S,),
            )
        )

    async def close(self) -> None:
        await self._close_ledger()
        await self._writer.stop()

    async def ping(self) -> None:
        await self._do(lambda conn: conn.execute("INSERT OR REPLACE INTO in_flight VALUES ('_', 'ping', 0)"))

    async def now(self) -> float:
        return self._clock()

    # creates

    async def idem_get(self, team: str, key: str) -> IdemRecord | None:
        def op(conn: sqlite3.Connection) -> IdemRecord | None:
            row = conn.execute(
                "SELECT body_hash, done, status, body, created_at FROM idempotency WHERE team=? AND key=?", (team, key)
            ).fetchone()
            if row is None or row[4] < self._clock() - IDEM_TTL_S:
                return None
            return IdemRecord(row[0], bool(row[1]), row[2], row[3] or b"", row[4])

        return await self._do(op)

    async def admit(self, adm: Admission, now: float) -> Rejection | None:
        task = adm.task
        check_figures(estimate_micros=task.estimate_micros, estimate_ms=task.estimate_ms, input_ms=task.input_ms)

        return await self._do(lambda conn: self._admit(conn, adm, now))

    def _admit(self, conn: sqlite3.Connection, adm: Admission, now: float) -> Rejection | None:
        # The rate windows' lock is held only while they are read or changed, never over a statement: the
        # event loop's thread reads them for every answer's rate headers and must not wait on SQLite.
        # Only this thread adds to them, so what the check saw still holds when the task is counted.
        task = adm.task
        books = self._books
        windows = self._windows
        for subject in adm.subjects:
            counters = books.counters(conn, subject.scope, subject.name, subject.period)
            in_flight = books.in_flight(conn, subject.scope, subject.name)
            if subject.limits.requests_per_minute:
                with windows.lock:
                    rejection = check(
                        subject,
                        counters,
                        in_flight,
                        windows.live(subject.scope, subject.name, now),
                        now,
                        task.estimate_micros,
                        task.estimate_ms,
                    )
            else:
                rejection = check(subject, counters, in_flight, None, now, task.estimate_micros, task.estimate_ms)
            if rejection:
                return rejection
        if task.idem_key:
            claimed = conn.execute(
                "INSERT INTO idempotency (team, key, body_hash, done, created_at) VALUES (?, ?, ?, 0, ?) "
                "ON CONFLICT (team, key) DO UPDATE SET body_hash=excluded.body_hash, done=0, status=0, "
                "body=NULL, created_at=excluded.created_at WHERE idempotency.created_at < ?",
                (task.team, task.idem_key, adm.body_hash, now, now - IDEM_TTL_S),
            )
            if claimed.rowcount == 0:
                raise IdempotencyConflict(
                    "A request with this Idempotency-Key is still in flight.", code="idempotency_key_in_progress"
                )
        conn.execute(INSERT_TASK, task_values(task))
        for subject in adm.subjects:
            books.add(
                conn,
                subject.scope,
                subject.name,
                subject.period,
                reserved_micros=task.estimate_micros,
                reserved_ms=task.estimate_ms,
            )
            books.bump(conn, subject.scope, subject.name, 1)
            if subject.limits.requests_per_minute:
                # Bounded by time (pruned past WINDOW_S) and by admission stopping at the limit.
                windows.add(subject.scope, subject.name, now)
        return None

    async def cancel_admission(self, rid: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            task = task_by_rid(conn, rid)
            if task is None:
                return
            self._books.release(conn, task)
            conn.execute("DELETE FROM tasks WHERE rid=?", (rid,))
            if task.idem_key:
                conn.execute("DELETE FROM idempotency WHERE team=? AND key=?", (task.team, task.idem_key))
            self._windows.remove("team", task.team, task.created_at)
            self._windows.remove("user", task.user, task.created_at)

        await self._do(op)
        await self.release_key(rid)

    # Key slots live in this process's memory, touched only on the event loop's thread: a create
    # takes and gives back slots without a trip to the writer. The key is written with the task id
    # (a pending create never needs it), and open() counts the slots back from the unsettled tasks.
    # A slot is given back only once the write that frees it has committed.

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

    def _load_key_slots(self, conn: sqlite3.Connection) -> None:
        for rid, key_name in conn.execute(
            "SELECT rid, key_name FROM tasks WHERE settled_at IS NULL AND key_name IS NOT NULL"
        ):
            self._slot_of[rid] = key_name
            self._key_slots[key_name] = self._key_slots.get(key_name, 0) + 1

    async def record_created(self, rid: str, task_id: str, status: str, now: float, reply: tuple[int, bytes]) -> None:
        key_name = self._slot_of.get(rid)

        def op(conn: sqlite3.Connection) -> None:
            try:  # the unique index refuses the statement alone: nothing is written
                row = conn.execute(
                    "UPDATE tasks SET task_id=?, key_name=?, status=?, updated_at=? "
                    "WHERE rid=? AND settled_at IS NULL RETURNING idem_key",
                    (task_id, key_name, status, now, rid),
                ).fetchone()
            except sqlite3.IntegrityError:
                raise DuplicateTaskId("TokenHub answered the create with a task id already in use.") from None
            if row and row[0]:
                finish_idem(conn, rid, reply)

        await self._do(op)

    async def fail_create(self, rid: str, now: float, reply: tuple[int, bytes] | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            task = task_by_rid(conn, rid)
            if task is None or task.settled:
                return
            self._books.release(conn, task)
            conn.execute(
                "UPDATE tasks SET status='create_failed', billed_ms=0, cost_micros=0, "
                "settled_at=?, updated_at=? WHERE rid=?",
                (now, now, rid),
            )
            if reply is not None:
                finish_idem(conn, rid, reply)
            elif task.idem_key:
                conn.execute("DELETE FROM idempotency WHERE team=? AND key=?", (task.team, task.idem_key))

        await self._do(op)
        await self.release_key(rid)

    async def mark_unknown(
        self,
        rid: str,
        now: float,
        reply: tuple[int, bytes] | None,
        items: Sequence[Item] = (),
        alerts: BudgetCheck | None = None,
    ) -> Task:
        def op(conn: sqlite3.Connection) -> tuple[Task, bool]:
            task = task_by_rid(conn, rid)
            if task is None:
                raise NotFound("No such task in the ledger.", param="task_id")
            if task.settled or task.status != PENDING:
                return task, False
            self._books.check_spend(conn, task, task.estimate_micros, task.estimate_ms)
            self._books.release(conn, task)
            self._books.spend(conn, task, task.estimate_micros, task.estimate_ms)
            conn.execute(
                "UPDATE tasks SET status=?, billed_ms=?, cost_micros=?, cost_estimated=1, settled_at=?, "
                "updated_at=? WHERE rid=?",
                (UNKNOWN, task.estimate_ms, task.estimate_micros, now, now, rid),
            )
            if reply is not None:
                finish_idem(conn, rid, reply)
            add_items(conn, items)
            check_budgets(conn, self._books, alerts, now)
            task.status = UNKNOWN
            task.billed_ms = task.estimate_ms
            task.cost_micros = task.estimate_micros
            task.cost_estimated = True
            task.settled_at = task.updated_at = now
            return task, True

        task, changed = await self._do(op)
        if changed:
            await self.release_key(rid)
        return task

    # tasks

    async def get_task(self, task_id: str) -> Task | None:
        def op(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            return row_to_task(row) if row else None

        return await self._do(op)

    async def get_record(self, ref: str) -> Task | None:
        return await self._do(lambda conn: task_by_ref(conn, ref))

    async def set_status(self, task_id: str, status: str, now: float) -> None:
        await self._do(
            lambda conn: conn.execute(
                "UPDATE tasks SET status=?, updated_at=? WHERE task_id=? AND settled_at IS NULL", (status, now, task_id)
            )
        )

    async def settle(
        self,
        task_id: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        estimated: bool,
        final_body: bytes | None,
        now: float,
        items: Sequence[Item] = (),
        alerts: BudgetCheck | None = None,
    ) -> Task | None:
        check_status(status)
        check_figures(billed_ms=billed_ms, cost_micros=cost_micros)

        def op(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id=? OR rid=?", (task_id, task_id)).fetchone()
            if row is None:
                return None
            task = row_to_task(row)
            if task.settled:
                return None
            self._books.check_spend(conn, task, cost_micros, billed_ms)
            self._books.release(conn, task)
            self._books.spend(conn, task, cost_micros, billed_ms)
            conn.execute(
                "UPDATE tasks SET status=?, billed_ms=?, cost_micros=?, cost_estimated=?, "
                "settled_at=?, updated_at=?, final_body=? WHERE rid=?",
                (status, billed_ms, cost_micros, int(estimated), now, now, final_body, task.rid),
            )
            add_items(conn, items)
            check_budgets(conn, self._books, alerts, now)
            task.status = status
            task.billed_ms = billed_ms
            task.cost_micros = cost_micros
            task.cost_estimated = estimated
            task.settled_at = task.updated_at = now
            task.final_body = final_body
            return task

        done = await self._do(op)
        if done is not None:
            await self.release_key(done.rid)
        return done

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        def op(conn: sqlite3.Connection) -> list[Task]:
            rows = conn.execute(
                f"SELECT {COLS} FROM tasks WHERE settled_at IS NULL AND next_poll_at <= ? "
                "ORDER BY next_poll_at LIMIT ?",
                (now, limit),
            ).fetchall()
            leased = [(now + lease_s, r[0]) for r in rows]
            conn.executemany("UPDATE tasks SET next_poll_at=? WHERE rid=?", leased)
            return [row_to_task(r) for r in rows]

        return await self._do(op)

    async def defer_poll(self, rid: str, next_at: float) -> None:
        await self._do(lambda conn: conn.execute("UPDATE tasks SET next_poll_at=? WHERE rid=?", (next_at, rid)))

    async def backlog(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            self._books.flush(conn)  # this batch's changes too
            total: int = conn.execute("SELECT COALESCE(SUM(n), 0) FROM in_flight WHERE scope='team'").fetchone()[0]
            return total

        return await self._do(op)

    # figures

    async def usage(self, subjects: tuple[Subject, ...]) -> list[Usage]:
        return await self._do(
            lambda conn: [
                Usage(
                    replace(self._books.counters(conn, subject.scope, subject.name, subject.period)),
                    self._books.in_flight(conn, subject.scope, subject.name),
                )
                for subject in subjects
            ]
        )

    async def rate_state(self, scope: str, name: str, limit: int, now: float) -> RateState:
        with self._windows.lock:  # in memory: no trip to the writer thread
            return rate_state(limit, self._windows.live(scope, name, now), now)

    # key pool

    async def key_health(self, fresh: bool = False) -> dict[str, KeyHealth]:
        return self._health

    async def save_key_health(self, name: str, health: KeyHealth) -> None:
        self._health[name] = health
