"""A batch of the SQLite store's operations in one transaction, on whichever thread runs it (the event
loop's for synchronous=NORMAL, the writer thread's for FULL), and how its failures reach the callers.

An operation refuses (a GatewayError) before it writes anything, so a refusal leaves the others' work
standing. Any other failure rolls the batch back; unless the store itself is unavailable, its operations
then run again one per transaction, so only the operation at fault fails."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import GatewayError, RecordRejected, StoreUnavailable

BATCH_MAX = 256
Op = Callable[[sqlite3.Connection], Any]
Outcome = tuple[Any, BaseException | None]  # an operation's value, or the exception it raised

# sqlite3 looks for an adapter for every parameter that is not an int, float or str, and for None and
# bytes that search fails through two attribute lookups, each raising and clearing an AttributeError:
# ~2.4 µs per statement of a task row. Registered, the same values bind the same way (NULL, BLOB).
sqlite3.register_adapter(type(None), lambda value: None)
sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b itself


class Transactions:
    """Runs batches on one connection. Before each COMMIT `before_commit(conn)` writes what the operations
    kept in memory; after it `on_commit` (then `committed`) or `on_rollback` is called: what operations keep
    in memory must follow what the tables keep."""

    def __init__(
        self,
        on_commit: Callable[[], None],
        on_rollback: Callable[[], None],
        before_commit: Callable[[sqlite3.Connection], None],
        committed: Callable[[], None],
    ) -> None:
        self._on_commit = on_commit
        self._on_rollback = on_rollback
        self._before_commit = before_commit
        self._committed = committed

    def run(self, conn: sqlite3.Connection, ops: Sequence[Op]) -> list[Outcome]:
        """Each operation's outcome, in order. The transaction may already be open (BEGIN IMMEDIATE)."""
        try:
            return self._transaction(conn, ops)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting callers
            self._rollback(conn)
            if len(ops) > 1 and isinstance(exc, Exception) and not unavailable(exc):
                return [self._alone(conn, op) for op in ops]
            return [(None, exc)] * len(ops)

    def _transaction(self, conn: sqlite3.Connection, ops: Sequence[Op]) -> list[Outcome]:
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        results: list[Outcome] = []
        for op in ops:
            try:
                results.append((op(conn), None))
            except GatewayError as exc:
                results.append((None, exc))
        self._before_commit(conn)
        conn.execute("COMMIT")
        self._on_commit()
        self._committed()
        return results

    def _alone(self, conn: sqlite3.Connection, op: Op) -> Outcome:
        try:
            return self._transaction(conn, [op])[0]
        except BaseException as exc:  # noqa: BLE001 - handed to this operation's caller
            self._rollback(conn)
            return None, exc

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # a broken connection: the callers get the original error
        self._on_rollback()


_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_PERM,
    }
)


def unavailable(exc: BaseException) -> bool:
    """The database cannot be written now (disk, lock, read-only, closed), as opposed to one record's fault."""
    if isinstance(exc, sqlite3.ProgrammingError):
        return "closed" in str(exc)
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError)
    return (code & 0xFF) in _UNAVAILABLE


def busy(exc: BaseException) -> bool:
    """Another connection holds the write lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def as_raised(exc: BaseException) -> BaseException:
    """What the caller of an operation sees: the store's own errors, never sqlite3's."""
    if isinstance(exc, GatewayError) or not isinstance(exc, Exception):
        return exc
    if unavailable(exc):
        return StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.")
    return RecordRejected(f"The store refused this record: {exc.__class__.__name__}.")


def answer(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():  # its caller was cancelled; the operation stands
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(as_raised(exc))
