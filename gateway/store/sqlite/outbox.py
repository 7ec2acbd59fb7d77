"""The outbox and the archive's bookkeeping in the SQLite store (see outbox.py): operations on the writer
thread, like every other write of that store."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from gateway.store.outbox import ArchivedFile, Item, TopicStats, clip

T = TypeVar("T")
SCHEMA = """
CREATE TABLE outbox (
    id TEXT PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL,
    next_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX outbox_due ON outbox (topic, next_at);
CREATE TABLE outbox_stats (
    topic TEXT PRIMARY KEY, delivered INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    gave_up INTEGER NOT NULL DEFAULT 0, last_error TEXT, last_attempt_at REAL);
CREATE TABLE archive_files (
    task_id TEXT NOT NULL, variant TEXT NOT NULL, key TEXT NOT NULL, size INTEGER NOT NULL,
    content_type TEXT NOT NULL, archived_at REAL NOT NULL, PRIMARY KEY (task_id, variant));
CREATE INDEX archive_files_age ON archive_files (archived_at);
"""


def add_items(conn: sqlite3.Connection, items: Iterable[Item]) -> None:
    """Called inside the step that settles a task: the items are written with it or not at all."""
    conn.executemany(
        "INSERT OR IGNORE INTO outbox (id, topic, payload, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
        [(i.id, i.topic, i.payload, i.created_at, i.created_at) for i in items],
    )


def _count(conn: sqlite3.Connection, topic: str, column: str, error: str | None, now: float) -> None:
    conn.execute("INSERT INTO outbox_stats (topic) VALUES (?) ON CONFLICT (topic) DO NOTHING", (topic,))
    conn.execute(
        f"UPDATE outbox_stats SET {column} = {column} + 1, last_attempt_at = ?, "
        "last_error = COALESCE(?, last_error) WHERE topic = ?",
        (now, error, topic),
    )


class SQLiteOutbox:
    """Mixed into SQLiteStore, whose `_do` runs an operation on the writer thread."""

    if TYPE_CHECKING:  # provided by SQLiteStore

        async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def outbox_claim(self, topic: str, limit: int, now: float, lease_s: float) -> list[Item]:
        def op(conn: sqlite3.Connection) -> list[Item]:
            leased = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE topic=? AND lease_until > ?", (topic, now)
            ).fetchone()[0]
            rows = conn.execute(
                "SELECT id, topic, payload, created_at, attempts FROM outbox WHERE topic=? "
                "AND next_at <= ? AND lease_until <= ? ORDER BY next_at LIMIT ?",
                (topic, now, now, max(0, limit - leased)),
            ).fetchall()
            conn.executemany(
                "UPDATE outbox SET lease_until=?, attempts=attempts + 1 WHERE id=?",
                [(now + lease_s, r[0]) for r in rows],
            )
            return [Item(r[0], r[1], r[2], r[3], r[4] + 1) for r in rows]

        return await self._do(op)

    async def outbox_done(self, item: Item, now: float) -> None:
        await self._end(item, "delivered", None, now)

    async def outbox_give_up(self, item: Item, error: str, now: float) -> None:
        await self._end(item, "gave_up", clip(error), now)

    async def _end(self, item: Item, column: str, error: str | None, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM outbox WHERE id=?", (item.id,)).rowcount:
                if column == "gave_up":
                    _count(conn, item.topic, "failed", error, now)
                _count(conn, item.topic, column, error, now)

        await self._do(op)

    async def outbox_retry(self, item: Item, next_at: float, error: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("UPDATE outbox SET next_at=?, lease_until=0 WHERE id=?", (next_at, item.id)).rowcount:
                _count(conn, item.topic, "failed", clip(error), now)

        await self._do(op)

    async def outbox_drop_topics(self, prefix: str, keep: frozenset[str], now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            gone = [
                t
                for (t,) in conn.execute(
                    "SELECT DISTINCT topic FROM outbox WHERE substr(topic, 1, ?) = ?", (len(prefix), prefix)
                )
                if t not in keep
            ]
            dropped = 0
            for topic in gone:
                count = conn.execute("DELETE FROM outbox WHERE topic=?", (topic,)).rowcount
                conn.execute("INSERT INTO outbox_stats (topic) VALUES (?) ON CONFLICT (topic) DO NOTHING", (topic,))
                conn.execute(
                    "UPDATE outbox_stats SET gave_up = gave_up + ?, last_error = ? WHERE topic = ?",
                    (count, "endpoint removed from the config", topic),
                )
                dropped += count
            return dropped

        return await self._do(op)

    async def outbox_stats(self, topics: list[str]) -> dict[str, TopicStats]:
        def op(conn: sqlite3.Connection) -> dict[str, TopicStats]:
            out = {t: TopicStats() for t in topics}
            marks = ", ".join("?" * len(topics))
            for topic, backlog in conn.execute(
                f"SELECT topic, COUNT(*) FROM outbox WHERE topic IN ({marks}) GROUP BY topic", topics
            ):
                out[topic].backlog = backlog
            for topic, *figures in conn.execute(
                "SELECT topic, delivered, failed, gave_up, last_error, "
                f"last_attempt_at FROM outbox_stats WHERE topic IN ({marks})",
                topics,
            ):
                out[topic] = TopicStats(out[topic].backlog, *figures)
            return out

        return await self._do(op)

    # the archive's files

    async def archive_record(self, file: ArchivedFile) -> None:
        await self._do(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO archive_files VALUES (?, ?, ?, ?, ?, ?)",
                (file.task_id, file.variant, file.key, file.size, file.content_type, file.archived_at),
            )
        )

    async def archive_files(self, task_id: str) -> list[ArchivedFile]:
        return await self._do(
            lambda conn: [
                ArchivedFile(*r)
                for r in conn.execute("SELECT * FROM archive_files WHERE task_id=? ORDER BY variant", (task_id,))
            ]
        )

    async def archive_older(self, before: float, limit: int) -> list[ArchivedFile]:
        return await self._do(
            lambda conn: [
                ArchivedFile(*r)
                for r in conn.execute(
                    "SELECT * FROM archive_files WHERE archived_at < ? ORDER BY archived_at LIMIT ?", (before, limit)
                )
            ]
        )

    async def archive_forget(self, task_id: str, variant: str) -> None:
        await self._do(
            lambda conn: conn.execute("DELETE FROM archive_files WHERE task_id=? AND variant=?", (task_id, variant))
        )
