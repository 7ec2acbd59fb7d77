"""WAL checkpoints off the writer's thread.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold (1,000 pages, ~85
creates): that commit copies the WAL into the database and fsyncs both (~4 ms a fsync on a cloud disk),
and every create in its batch waits: the 1 % of single requests that took 15× the median. So the
writer's connection never checkpoints. This thread, on a connection of its own and at low CPU priority,
runs PASSIVE checkpoints: they copy and fsync without ever blocking the writer, and in a quiet moment one
of them catches up with it, after which the next write starts the WAL from its beginning again.
A load with no quiet moment never lets a PASSIVE one catch up, so once the WAL holds RESTART_PAGES the
round is a RESTART checkpoint: it holds the writer off while it copies the little the PASSIVE rounds left
and fsyncs, then the WAL starts again. That bounds the WAL (~16 MB) at one short wait every ~340 creates."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading

EVERY_COMMITS = 64  # a create commits twice, ~12 pages in all: ~380 pages a round
EVERY_S = 1.0  # and at least this often while anything was committed
RESTART_PAGES = 4_000  # ~340 creates
NICE = 10


class Checkpointer:
    def __init__(self, path: str) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self._commits = 0
        self._frames = 0  # the WAL's length at the last round
        self._thread: threading.Thread | None = None
        self.runs = 0  # checkpoints that ran, for tests
        self.every_s = EVERY_S

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer after each commit (on its thread)."""
        self._commits += 1
        if self._commits >= EVERY_COMMITS:
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # per thread on Linux; elsewhere, as it is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._stopping:
                self._wake.wait(self.every_s)
                self._wake.clear()
                if self._commits and not self._stopping:
                    self._commits = 0
                    self._checkpoint(conn)
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        restart = self._frames >= RESTART_PAGES
        try:  # fetchall: a statement left open would keep the WAL from starting again
            ((busy, frames, _),) = conn.execute(
                f"PRAGMA wal_checkpoint({'RESTART' if restart else 'PASSIVE'})"
            ).fetchall()
            self._frames = 0 if restart and not busy else frames
            self.runs += 1
        except sqlite3.Error:
            pass  # a busy or failing disk: the writer's own commits report it; the next round tries again
