"""WAL checkpoints off the writing thread.

SQLite's automatic checkpoint runs inside the commit that crosses its threshold (1,000 pages, ~85
creates): that commit copies the WAL into the database and fsyncs both (~4 ms a fsync on a cloud disk),
and every create in its batch waits: the 1 % of single requests that took 15× the median. So the
writing connection never checkpoints. This thread, on a connection of its own and at low CPU priority,
runs PASSIVE checkpoints: they copy and fsync without ever taking the write lock. A WAL starts again
from its beginning only when a write begins after a checkpoint copied all of it, and a load with no quiet
moment never lets a PASSIVE round catch up; how the WAL is kept bounded depends on who writes.

The writer thread (synchronous=FULL) may wait: once the WAL holds RESTART_PAGES the round is a RESTART
checkpoint, which holds the writer off while it copies the little the PASSIVE rounds left and fsyncs.

The event loop (synchronous=NORMAL) must never wait on a lock this thread holds, so only PASSIVE
checkpoints run. Two more facts of SQLite's WAL: the write that starts the WAL again fsyncs its new
header, on the writing thread; and it starts it again only if it can take every reader's slot. Hence:
- a pin: a read transaction on a connection of this thread, begun while some frame was not yet copied,
  so that it sits in a reader's slot. The loop's writes then never start the WAL again: they never
  fsync. Each round first moves the pin to the WAL's end, so the pin never holds back the round's copy.
- once the WAL holds RESTART_PAGES, this thread asks the loop to hold its transactions (the loop keeps
  queueing operations in memory: nothing waits on a lock), lets go of the pin, catches up with a PASSIVE
  round, makes one write of its own (which starts the WAL again and fsyncs its header here), pins again
  and lets the loop go on. Its creates wait that long, once every ~RESTART_PAGES pages."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import NamedTuple, Protocol

EVERY_COMMITS = 64  # a create commits twice, ~12 pages in all: ~380 pages a round
EVERY_S = 1.0  # and at least this often while anything was committed
RESTART_PAGES = 4_000  # ~340 creates of the writer thread's; more with the loop's larger batches
HOLD_WAIT_S = 0.1  # how long a restart waits for the loop to stop starting transactions
NICE = 10


class Holdable(Protocol):
    """A writer that can stop starting transactions for a while, without waiting on anything."""

    def hold(self, timeout: float) -> bool:
        """Block the calling thread until the writer holds its transactions (False: not within timeout)."""

    def release(self) -> None:
        """Let the writer go on; called after every hold(), whatever it returned."""


class Checkpointer:
    def __init__(self, path: str, synchronous: str = "NORMAL", writer: Holdable | None = None) -> None:
        self._path = path
        self._sync = synchronous
        self._writer = writer  # None: the writer thread, which RESTART checkpoints may hold off
        self._wake = threading.Event()
        self._stopping = False
        self._commits = 0
        self._frames = 0  # the WAL's length at the last round
        self._caught_up = False  # the last round copied the whole WAL (the pin is at its end)
        self._pin: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self.runs = 0  # checkpoints that ran, for tests
        self.restarts = 0  # WALs started again by this thread's own write
        self.every_s = EVERY_S

    def start(self) -> None:
        conn = self._connect()
        if self._writer is not None:
            self._pin = self._connect()
            try:
                _touch(conn)  # a frame not copied yet, whatever the WAL held: the pin takes a reader's slot
                self._repin()
            except BaseException:
                self._pin.close()
                conn.close()
                raise
        self._thread = threading.Thread(target=self._run, args=(conn,), name="sqlite-checkpoint", daemon=True)
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

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=1000")
        conn.execute(f"PRAGMA synchronous={self._sync}")  # a checkpoint fsyncs under NORMAL and FULL alike
        return conn

    def _run(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(AttributeError, OSError):  # per thread on Linux; elsewhere, as it is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        try:
            while not self._stopping:
                self._wake.wait(self.every_s)
                self._wake.clear()
                if self._commits and not self._stopping:
                    self._commits = 0
                    self._round(conn)
        finally:
            if self._pin is not None:
                self._pin.close()
            conn.close()

    def _round(self, conn: sqlite3.Connection) -> None:
        try:
            if self._writer is None:
                self._round_restarting(conn)
            else:
                self._round_pinned(conn, self._writer)
            self.runs += 1
        except sqlite3.Error:
            pass  # a busy or failing disk: the writer's own commits report it; the next round tries again

    def _round_restarting(self, conn: sqlite3.Connection) -> None:
        restart = self._frames >= RESTART_PAGES
        done = _checkpoint(conn, "RESTART" if restart else "PASSIVE")
        self._frames = 0 if restart and not done.busy else done.frames

    def _round_pinned(self, conn: sqlite3.Connection, writer: Holdable) -> None:
        if self._caught_up:  # moving the pin now could leave it outside a reader's slot
            # Held back by the pin, this one copies nothing: it only reads the WAL's length.
            if _checkpoint(conn, "PASSIVE").frames == self._frames:
                return  # nothing written since
        self._repin()  # some frame is not copied yet: the pin takes a reader's slot
        done = _checkpoint(conn, "PASSIVE")
        self._frames, self._caught_up = done.frames, done.complete
        if done.frames >= RESTART_PAGES:
            self._restart(conn, writer)

    def _restart(self, conn: sqlite3.Connection, writer: Holdable) -> None:
        try:
            if writer.hold(HOLD_WAIT_S):
                self._start_again(conn)
        finally:
            writer.release()

    def _start_again(self, conn: sqlite3.Connection) -> None:
        """With the writer holding its transactions: catch up, and start the WAL again with a write of
        this thread's own."""
        self._unpin()
        try:
            done = _checkpoint(conn, "PASSIVE")  # the loop writes nothing meanwhile
            self._frames, self._caught_up = done.frames, done.complete
            if self._caught_up:  # else a reader of another connection holds it back: a later round tries again
                _touch(conn)
                self._caught_up = False
                self.restarts += 1
        finally:
            self._repin()  # a frame is left to copy (the touch's, or the reader's): the pin takes a slot

    def _repin(self) -> None:
        self._unpin()
        assert self._pin is not None
        self._pin.execute("BEGIN")
        self._pin.execute("SELECT count(*) FROM sqlite_master").fetchall()  # a read: the snapshot is taken

    def _unpin(self) -> None:
        if self._pin is not None and self._pin.in_transaction:
            self._pin.execute("COMMIT")


class Checkpoint(NamedTuple):
    busy: int  # 1: a lock it needed was taken
    frames: int  # the WAL's length
    copied: int  # frames copied into the database, by this checkpoint or earlier ones

    @property
    def complete(self) -> bool:
        return not self.busy and self.copied == self.frames


def _checkpoint(conn: sqlite3.Connection, mode: str) -> Checkpoint:
    # fetchall: a statement left open would keep the WAL from starting again
    return Checkpoint(*conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0])


def _touch(conn: sqlite3.Connection) -> None:
    """One write that changes nothing (the schema version, written back): after a complete checkpoint it
    starts the WAL again, fsyncing its header on this thread."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        conn.execute(f"PRAGMA user_version={int(version)}")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
