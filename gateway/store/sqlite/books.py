"""What the SQLite store keeps in memory: counters and in-flight counts (written to their tables once
per transaction) and rate windows (rebuilt from the ledger at start). Both follow the writer's transactions."""

from __future__ import annotations

import bisect
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable

from gateway.errors import RecordRejected
from gateway.policy.quota import WINDOW_S, Counters
from gateway.store.base import LIVE, MAX_COUNTER, Task

BOOKS_MAX = 100_000  # cached figures; past this the cache starts again from the tables


_WRITE_COUNTERS = (
    "INSERT INTO counters VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, name, period) DO UPDATE "
    "SET spent_micros=excluded.spent_micros, reserved_micros=excluded.reserved_micros, "
    "spent_ms=excluded.spent_ms, reserved_ms=excluded.reserved_ms"
)
_WRITE_IN_FLIGHT = "INSERT INTO in_flight VALUES (?, ?, ?) ON CONFLICT (scope, name) DO UPDATE SET n=excluded.n"


class Books:
    """The counters and in-flight counts, kept in memory so that checks read no rows, and written to
    their tables by flush() just before each commit: once per figure a batch changed, however many of
    its operations changed it (under load a batch holds dozens of creates of the same team and user).
    Touched only by the thread that runs the batches (the event loop's, or the writer's under FULL);
    cleared whenever a transaction rolls back, after which each figure is read again from its table."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, str], Counters] = {}
        self._in_flight: dict[tuple[str, str], int] = {}
        self._changed_counters: set[tuple[str, str, str]] = set()
        self._changed_in_flight: set[tuple[str, str]] = set()

    def clear(self) -> None:
        self._counters.clear()
        self._in_flight.clear()
        self._changed_counters.clear()
        self._changed_in_flight.clear()

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write what changed since the last flush (inside the transaction, before its COMMIT)."""
        if self._changed_counters:
            conn.executemany(
                _WRITE_COUNTERS,
                [
                    (*key, n.spent_micros, n.reserved_micros, n.spent_ms, n.reserved_ms)
                    for key in self._changed_counters
                    for n in (self._counters[key],)
                ],
            )
            self._changed_counters.clear()
        if self._changed_in_flight:
            conn.executemany(_WRITE_IN_FLIGHT, [(*key, self._in_flight[key]) for key in self._changed_in_flight])
            self._changed_in_flight.clear()

    def counters(self, conn: sqlite3.Connection, scope: str, name: str, period: str) -> Counters:
        key = (scope, name, period)
        got = self._counters.get(key)
        if got is None:
            row = conn.execute(
                "SELECT spent_micros, reserved_micros, spent_ms, reserved_ms FROM counters "
                "WHERE scope=? AND name=? AND period=?",
                key,
            ).fetchone()
            if len(self._counters) >= BOOKS_MAX:
                self.flush(conn)
                self._counters.clear()
            got = self._counters[key] = Counters(*row) if row else Counters()
        return got

    def in_flight(self, conn: sqlite3.Connection, scope: str, name: str) -> int:
        got = self._in_flight.get((scope, name))
        if got is None:
            row = conn.execute("SELECT n FROM in_flight WHERE scope=? AND name=?", (scope, name)).fetchone()
            if len(self._in_flight) >= BOOKS_MAX:
                self.flush(conn)
                self._in_flight.clear()
            got = self._in_flight[(scope, name)] = row[0] if row else 0
        return got

    def add(
        self,
        conn: sqlite3.Connection,
        scope: str,
        name: str,
        period: str,
        spent_micros: int = 0,
        reserved_micros: int = 0,
        spent_ms: int = 0,
        reserved_ms: int = 0,
    ) -> None:
        counters = self.counters(conn, scope, name, period)
        self._changed_counters.add((scope, name, period))
        counters.spent_micros += spent_micros
        counters.reserved_micros += reserved_micros
        counters.spent_ms += spent_ms
        counters.reserved_ms += reserved_ms

    def bump(self, conn: sqlite3.Connection, scope: str, name: str, delta: int) -> None:
        count = max(0, self.in_flight(conn, scope, name) + delta)
        self._in_flight[(scope, name)] = count
        self._changed_in_flight.add((scope, name))

    def release(self, conn: sqlite3.Connection, task: Task) -> None:
        """Give back what a live task holds: its reservation and its in-flight counts (key slots are
        given back in memory by the caller)."""
        if task.status not in LIVE:
            return
        for scope, name, period in owners(task):
            self.add(conn, scope, name, period, reserved_micros=-task.estimate_micros, reserved_ms=-task.estimate_ms)
            self.bump(conn, scope, name, -1)

    def check_spend(self, conn: sqlite3.Connection, task: Task, micros: int, ms: int) -> None:
        """Refuse, before anything is written, a spend that would take a counter past MAX_COUNTER."""
        for scope, name, period in owners(task):
            counters = self.counters(conn, scope, name, period)
            if counters.spent_micros + micros > MAX_COUNTER or counters.spent_ms + ms > MAX_COUNTER:
                raise RecordRejected(f"The store refused a spend that would overflow the {scope}'s counters.")

    def spend(self, conn: sqlite3.Connection, task: Task, micros: int, ms: int) -> None:
        for scope, name, period in owners(task):
            self.add(conn, scope, name, period, spent_micros=micros, spent_ms=ms)


def owners(task: Task) -> tuple[tuple[str, str, str], ...]:
    """The subjects a task is counted against, each in the period the task was created in."""
    return ("team", task.team, task.team_period), ("user", task.user, task.user_period)


class Windows:
    """Each subject's admission times inside the last WINDOW_S, oldest first. Changed by the thread that runs
    the batches, inside a transaction (and undone when it rolls back); pruned and read on the event loop's thread too,
    hence the lock."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self.lock = threading.Lock()
        self._undo: list[tuple[deque[float], float, bool]] = []  # (window, time, added) since the last commit

    def live(self, scope: str, name: str, now: float) -> deque[float]:
        """The subject's admission times inside the window (caller holds the lock)."""
        window = self._windows.setdefault((scope, name), deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        return window

    def load(self, admissions: Iterable[tuple[str, str, float]]) -> None:
        with self.lock:
            for team, user, at in admissions:
                for key in (("team", team), ("user", user)):
                    self._windows.setdefault(key, deque()).append(at)

    def add(self, scope: str, name: str, at: float) -> None:
        with self.lock:
            window = self._windows.setdefault((scope, name), deque())
            window.append(at)
            self._undo.append((window, at, True))

    def remove(self, scope: str, name: str, at: float) -> None:
        with self.lock:
            window = self._windows.get((scope, name))
            if window is not None and at in window:
                window.remove(at)
                self._undo.append((window, at, False))

    def commit(self) -> None:
        self._undo.clear()

    def rollback(self) -> None:
        with self.lock:
            while self._undo:
                window, at, added = self._undo.pop()
                if not added:
                    bisect.insort(window, at)
                elif at in window:  # unless pruned out of the window meanwhile
                    window.remove(at)
