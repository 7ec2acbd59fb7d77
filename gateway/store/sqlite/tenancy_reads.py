"""What the SQLite store reads of the roster and the audit log, the bulk record of keys' last use, and the wait
for a roster change (mixed into SQLiteStore through SQLiteTenancy; the tables: tenancy.py). Listings page by
an index and, like a roster's load (in steps of PAGE keys), are read on the reader's connection (reader.py),
off the event loop and beside the writer; a single record and the changes since a version, small and
indexed, are read by the writer."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from gateway.store.base import ROSTER_CHANGES_MAX
from gateway.store.roster import PAGE, limits_load, roster_of
from gateway.tenancy import ApiKey, AuditEntry, Roster, RosterChanges, TeamRecord, UserRecord

T = TypeVar("T")
TEAM_COLS = "name, limits, created_at, updated_at"
USER_COLS = "name, team, role, email, limits, created_at, updated_at"
KEY_COLS = "id, user, team, prefix, sha256, label, created_at, expires_at, revoked_at, last_used_at"


def team_of(row: tuple[Any, ...]) -> TeamRecord:
    return TeamRecord(row[0], limits_load(orjson.loads(row[1])), row[2], row[3])


def user_of(row: tuple[Any, ...]) -> UserRecord:
    return UserRecord(row[0], row[1], row[2], row[3], limits_load(orjson.loads(row[4])), row[5], row[6])


def key_of(row: tuple[Any, ...]) -> ApiKey:
    """RETURNING gives a REAL column's value as bound (1000 for 1000.0): times are made floats again."""
    created, expires, revoked, used = (None if t is None else float(t) for t in row[6:10])
    return ApiKey(row[0], row[1], row[2], row[3], row[4], row[5], created or 0.0, expires, revoked, used)


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    before = None if row[5] is None else orjson.loads(row[5])
    after = None if row[6] is None else orjson.loads(row[6])
    return AuditEntry(row[0], row[1], row[2], row[3], row[4], before, after)


def team_row(conn: sqlite3.Connection, name: str) -> TeamRecord | None:
    row = conn.execute(f"SELECT {TEAM_COLS} FROM teams WHERE name=? AND deleted=0", (name,)).fetchone()
    return team_of(row) if row else None


def user_row(conn: sqlite3.Connection, name: str) -> UserRecord | None:
    row = conn.execute(f"SELECT {USER_COLS} FROM users WHERE name=? AND deleted=0", (name,)).fetchone()
    return user_of(row) if row else None


def key_row(conn: sqlite3.Connection, key_id: str) -> ApiKey | None:
    row = conn.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE id=?", (key_id,)).fetchone()
    return key_of(row) if row else None


def stored_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("SELECT version FROM roster_meta").fetchone()[0]
    return version


class SQLiteTenancyReads:
    """Mixed into SQLiteStore (its `_do` runs an operation on the writer; `_clock` is its clock)."""

    _roster_version = 0  # as committed; set by roster_setup, moved on by every change
    _roster_event: asyncio.Event | None = None  # set (and dropped) when the version moves

    if TYPE_CHECKING:  # provided by SQLiteStore
        _clock: Callable[[], float]

        async def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...
        async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    # reads

    async def get_team(self, name: str) -> TeamRecord | None:
        return await self._do(lambda conn: team_row(conn, name))

    async def get_user(self, name: str) -> UserRecord | None:
        return await self._do(lambda conn: user_row(conn, name))

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await self._do(lambda conn: key_row(conn, key_id))

    async def list_keys(
        self, user: str | None, team: str | None, limit: int, after: str | None
    ) -> tuple[list[ApiKey], str | None]:
        where = ["id > ?"]
        params: list[Any] = [after or ""]
        for column, value in (("user", user), ("team", team)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {KEY_COLS} FROM api_keys WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        rows = await self._read(lambda conn: conn.execute(sql, (*params, limit + 1)).fetchall())
        keys = [key_of(row) for row in rows[:limit]]
        return keys, keys[-1].id if len(rows) > limit else None

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        if not used:
            return
        rows = [(at, key_id, at) for key_id, at in used.items()]
        await self._do(
            lambda conn: conn.executemany(
                "UPDATE api_keys SET last_used_at=? WHERE id=? AND (last_used_at IS NULL OR last_used_at < ?)", rows
            )
        )

    async def audit_page(
        self,
        since: float | None,
        target: str | None,
        actor: str | None,
        limit: int,
        after: int | None,
        team: str | None = None,
    ) -> tuple[list[AuditEntry], int | None]:
        def op(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows, key = "audit a", "a.id"
            where: list[str] = []
            params: list[Any] = []
            if team is not None:  # walked along the team's index (audit_teams) in id order: no other team's rows
                rows, key = "audit_teams m JOIN audit a ON a.id = m.id", "m.id"
                where.append("m.team = ?")
                params.append(team)
            where.append(f"{key} > ?")
            params.append(after or 0)
            if since is not None:
                # rows are written in time order: the first at or after `since` bounds the ids from below
                first = conn.execute("SELECT id FROM audit WHERE at >= ? ORDER BY at LIMIT 1", (since,)).fetchone()
                if first is None:
                    return []
                where += [f"{key} >= ?", "a.at >= ?"]
                params += [first[0], since]
            for column, value in (("target", target), ("actor", actor)):
                if value is not None:
                    where.append(f"a.{column} = ?")
                    params.append(value)
            sql = f"SELECT a.* FROM {rows} WHERE {' AND '.join(where)} ORDER BY {key} LIMIT ?"
            return conn.execute(sql, (*params, limit + 1)).fetchall()

        rows = await self._read(op)
        entries = [_entry(row) for row in rows[:limit]]
        return entries, entries[-1].id if len(rows) > limit else None

    # the roster

    async def roster_version(self) -> int:
        return self._roster_version

    async def roster_wait(self, version: int, timeout_s: float) -> int:
        if self._roster_version == version:
            if self._roster_event is None:
                self._roster_event = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._roster_event.wait()
            except TimeoutError:
                pass
        return self._roster_version

    async def roster_changes_since(self, version: int) -> RosterChanges | None:
        def op(conn: sqlite3.Connection) -> RosterChanges | None:
            now_at = stored_version(conn)
            if version > now_at:
                return None
            cap = (version, ROSTER_CHANGES_MAX + 1)
            teams = conn.execute(f"SELECT {TEAM_COLS}, deleted FROM teams WHERE version > ? LIMIT ?", cap).fetchall()
            users = conn.execute(f"SELECT {USER_COLS}, deleted FROM users WHERE version > ? LIMIT ?", cap).fetchall()
            keys = conn.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE version > ? LIMIT ?", cap).fetchall()
            if len(teams) + len(users) + len(keys) > ROSTER_CHANGES_MAX:
                return None
            return RosterChanges(
                now_at,
                teams=tuple(team_of(r) for r in teams if not r[-1]),
                users=tuple(user_of(r) for r in users if not r[-1]),
                keys=tuple(key_of(r) for r in keys),
                deleted_teams=tuple(r[0] for r in teams if r[-1]),
                deleted_users=tuple(r[0] for r in users if r[-1]),
            )

        return await self._do(op)

    async def load_roster(self) -> Roster:
        parts, version = await roster_of(self.roster_pages())
        return parts.roster(version, self._clock())

    async def roster_pages(self) -> AsyncIterator[RosterChanges | None]:
        """Read in steps of PAGE keys on the reader, then brought to one version by the changes since."""
        while True:
            start = self._roster_version  # as committed: pages read after it are as new or newer
            teams, users = await self._read(self._teams_and_users)
            yield RosterChanges(start, teams=tuple(teams), users=tuple(users))
            after = ""
            while True:
                page = await self._read(functools.partial(_live_keys, after=after))
                now = self._clock()
                yield RosterChanges(start, keys=tuple(key for key in page if key.live(now)))
                if len(page) < PAGE:
                    break
                after = page[-1].id
            changes = await self.roster_changes_since(start)
            if changes is not None:
                yield changes
                return
            yield None

    @staticmethod
    def _teams_and_users(conn: sqlite3.Connection) -> tuple[list[TeamRecord], list[UserRecord]]:
        teams = [team_of(r) for r in conn.execute(f"SELECT {TEAM_COLS} FROM teams WHERE deleted=0")]
        return teams, [user_of(r) for r in conn.execute(f"SELECT {USER_COLS} FROM users WHERE deleted=0")]


def _live_keys(conn: sqlite3.Connection, after: str) -> list[ApiKey]:
    rows = conn.execute(
        f"SELECT {KEY_COLS} FROM api_keys WHERE id > ? AND revoked_at IS NULL ORDER BY id LIMIT ?", (after, PAGE)
    )
    return [key_of(row) for row in rows]
