"""Teams, users, gateway keys and the audit log in the SQLite store (store/base.py's Roster section, SPEC §15).

Each change is one operation on the writer thread: it checks everything before its first write (the writer's
rule for a refusal), then writes the change, its audit row and the roster version together. The version is
also kept in memory, moved on only once the change has committed. A deleted team or user stays as a row
marked deleted (a tombstone), so that roster_changes_since can name it; every row carries the version of its
last change, indexed."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from gateway.errors import Conflict, NotFound, TeamNotEmpty
from gateway.store.budget import BudgetCheck
from gateway.store.roster import limits_dump
from gateway.store.sqlite.books import Books
from gateway.store.sqlite.budget import SCHEMA as BUDGET_SCHEMA
from gateway.store.sqlite.budget import check_budgets
from gateway.store.sqlite.tenancy_reads import (
    KEY_COLS,
    TEAM_COLS,
    USER_COLS,
    SQLiteTenancyReads,
    key_of,
    key_row,
    stored_version,
    team_row,
    user_row,
)
from gateway.tenancy import (
    KEY_CREATE,
    KEY_REVOKE,
    TEAM_CREATE,
    TEAM_DELETE,
    TEAM_UPDATE,
    USER_CREATE,
    USER_DELETE,
    USER_UPDATE,
    ApiKey,
    AuditDraft,
    AuditEntry,
    TeamRecord,
    UserRecord,
    audit_teams,
    created_doc,
    deleted_team,
    email_key,
    email_taken,
    key_doc,
    key_target,
    team_doc,
    team_target,
    user_doc,
    user_target,
)

T = TypeVar("T")
Doc = dict[str, Any] | None
SCHEMA = """
CREATE TABLE IF NOT EXISTS roster_meta (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT OR IGNORE INTO roster_meta VALUES (1, 0);
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY, limits TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    version INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS teams_version ON teams (version);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, team TEXT NOT NULL, role TEXT NOT NULL, email TEXT, limits TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, version INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0, email_key TEXT);
CREATE INDEX IF NOT EXISTS users_team ON users (team) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS users_version ON users (version);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, team TEXT NOT NULL, prefix TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE, label TEXT, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL,
    last_used_at REAL, version INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user, id);
CREATE INDEX IF NOT EXISTS api_keys_team ON api_keys (team, id);
CREATE INDEX IF NOT EXISTS api_keys_version ON api_keys (version);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, before TEXT, after TEXT);
CREATE INDEX IF NOT EXISTS audit_target ON audit (target, id);
CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, id);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE TABLE IF NOT EXISTS audit_teams (
    team TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (team, id)) WITHOUT ROWID
"""
EMAIL_INDEX = "CREATE INDEX IF NOT EXISTS users_email ON users (email_key) WHERE deleted = 0"


def _limits_text(limits: Any) -> str:
    return orjson.dumps(limits_dump(limits)).decode()


def _doc_text(doc: Doc) -> str | None:
    return None if doc is None else orjson.dumps(doc).decode()


def bump(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("UPDATE roster_meta SET version = version + 1 RETURNING version").fetchone()[0]
    return version


def write_audit(conn: sqlite3.Connection, audit: AuditDraft, action: str, target: str, before: Doc, after: Doc) -> int:
    row = conn.execute(
        "INSERT INTO audit (at, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (audit.at, audit.actor, action, target, _doc_text(before), _doc_text(after)),
    ).fetchone()
    entry_id: int = row[0]
    teams = audit_teams(target, before, after)  # a team admin's listing reads its team's rows alone
    conn.executemany("INSERT INTO audit_teams (team, id) VALUES (?, ?)", [(team, entry_id) for team in teams])
    return entry_id


def _missing(what: str, name: str, param: str) -> NotFound:
    return NotFound(f"No {what} {name!r}.", code="not_found", param=param)


# Another live user holding the e-mail key (tenancy.email_key).
_EMAIL_HELD = "SELECT 1 FROM users WHERE email_key=? AND deleted=0 AND name<>? LIMIT 1"


def _revoke_all(conn: sqlite3.Connection, user: str, at: float, version: int) -> list[ApiKey]:
    """Revoke every key issued under the user's name and not revoked yet; the keys revoked."""
    rows = conn.execute(
        f"UPDATE api_keys SET revoked_at=?, version=? WHERE user=? AND revoked_at IS NULL RETURNING {KEY_COLS}",
        (at, version, user),
    )
    return [key_of(row) for row in rows]


class SQLiteTenancy(SQLiteTenancyReads):
    """Mixed into SQLiteStore (its `_do` runs an operation on the writer; `_books` are its counters)."""

    if TYPE_CHECKING:  # provided by SQLiteStore
        _books: Books

    def roster_setup(self, conn: sqlite3.Connection) -> None:
        """The roster's tables, made when absent (an operation: run by open())."""
        for statement in (SCHEMA + ";" + BUDGET_SCHEMA).split(";"):
            if statement.strip():
                conn.execute(statement)
        if "email_key" not in {row[1] for row in conn.execute("PRAGMA table_info(users)")}:  # made before it
            conn.execute("ALTER TABLE users ADD COLUMN email_key TEXT")
            emails = conn.execute("SELECT email, name FROM users WHERE email IS NOT NULL").fetchall()
            conn.executemany("UPDATE users SET email_key=? WHERE name=?", [(email_key(e), n) for e, n in emails])
        conn.execute(EMAIL_INDEX)
        self._roster_version = stored_version(conn)

    async def _change(self, fn: Callable[[sqlite3.Connection], tuple[T, int]]) -> T:
        """Run a change; once it has committed, the version it reached is this store's."""
        result, version = await self._do(fn)
        if version > self._roster_version:
            self._roster_version = version
            if self._roster_event is not None:
                self._roster_event.set()
                self._roster_event = None
        return result

    # teams and users

    async def save_team(self, team: TeamRecord, audit: AuditDraft, create: bool) -> TeamRecord:
        def op(conn: sqlite3.Connection) -> tuple[TeamRecord, int]:
            old = team_row(conn, team.name)
            if create and old:
                raise Conflict(f"A team named {team.name!r} exists already.", param="name")
            if create and conn.execute("SELECT 1 FROM teams WHERE name=? AND deleted=1", (team.name,)).fetchone():
                raise deleted_team(team.name)
            if not create and not old:
                raise _missing("team", team.name, "name")
            kept = replace(team, created_at=old.created_at if old else audit.at, updated_at=audit.at)
            version = bump(conn)
            conn.execute(
                f"INSERT OR REPLACE INTO teams ({TEAM_COLS}, version, deleted) VALUES (?, ?, ?, ?, ?, 0)",
                (kept.name, _limits_text(kept.limits), kept.created_at, kept.updated_at, version),
            )
            action = TEAM_CREATE if create else TEAM_UPDATE
            before = team_doc(old) if old else None
            write_audit(conn, audit, action, team_target(team.name), before, team_doc(kept))
            return kept, version

        return await self._change(op)

    async def delete_team(self, name: str, audit: AuditDraft) -> TeamRecord:
        def op(conn: sqlite3.Connection) -> tuple[TeamRecord, int]:
            old = team_row(conn, name)
            if old is None:
                raise _missing("team", name, "name")
            if conn.execute("SELECT 1 FROM users WHERE team=? AND deleted=0 LIMIT 1", (name,)).fetchone():
                raise TeamNotEmpty(f"The team {name!r} still has users: delete or move them first.", param="name")
            version = bump(conn)
            conn.execute("UPDATE teams SET deleted=1, version=? WHERE name=?", (version, name))
            write_audit(conn, audit, TEAM_DELETE, team_target(name), team_doc(old), None)
            return old, version

        return await self._change(op)

    async def save_user(self, user: UserRecord, audit: AuditDraft, create: bool, team_in_store: bool) -> UserRecord:
        def op(conn: sqlite3.Connection) -> tuple[UserRecord, int]:
            old = user_row(conn, user.name)
            if create and old:
                raise Conflict(f"A user named {user.name!r} exists already.", param="name")
            if not create and not old:
                raise _missing("user", user.name, "name")
            if team_in_store and team_row(conn, user.team) is None:
                raise _missing("team", user.team, "team")
            mail = email_key(user.email) if user.email else None
            if mail and conn.execute(_EMAIL_HELD, (mail, user.name)).fetchone():
                raise email_taken()
            kept = replace(user, created_at=old.created_at if old else audit.at, updated_at=audit.at)
            version = bump(conn)
            conn.execute(
                f"INSERT OR REPLACE INTO users ({USER_COLS}, version, deleted, email_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (kept.name, kept.team, kept.role, kept.email, _limits_text(kept.limits), kept.created_at)
                + (kept.updated_at, version, mail),
            )
            if old and old.team != kept.team:  # its keys move with it
                conn.execute("UPDATE api_keys SET team=?, version=? WHERE user=?", (kept.team, version, kept.name))
            # keys once issued under this name (to a config user since removed) are not the new user's
            revoked = _revoke_all(conn, user.name, audit.at, version) if create else []
            action = USER_CREATE if create else USER_UPDATE
            before = user_doc(old) if old else None
            write_audit(conn, audit, action, user_target(user.name), before, created_doc(kept, revoked))
            return kept, version

        return await self._change(op)

    async def delete_user(self, name: str, audit: AuditDraft) -> tuple[UserRecord, list[ApiKey]]:
        def op(conn: sqlite3.Connection) -> tuple[tuple[UserRecord, list[ApiKey]], int]:
            old = user_row(conn, name)
            if old is None:
                raise _missing("user", name, "name")
            version = bump(conn)
            revoked = _revoke_all(conn, name, audit.at, version)
            conn.execute("UPDATE users SET deleted=1, version=? WHERE name=?", (version, name))
            before = {**user_doc(old), "api_keys": [{"id": k.id, "prefix": k.prefix} for k in revoked]}
            write_audit(conn, audit, USER_DELETE, user_target(name), before, None)
            return (old, revoked), version

        return await self._change(op)

    # keys

    async def add_key(self, key: ApiKey, audit: AuditDraft, user_in_store: bool) -> ApiKey:
        def op(conn: sqlite3.Connection) -> tuple[ApiKey, int]:
            if conn.execute("SELECT 1 FROM api_keys WHERE id=? OR sha256=?", (key.id, key.sha256)).fetchone():
                raise Conflict("A key with this id or value exists already.", param="id")
            kept = replace(key, created_at=audit.at, revoked_at=None, last_used_at=None)
            if user_in_store:
                owner = user_row(conn, key.user)
                if owner is None:
                    raise _missing("user", key.user, "user")
                kept = replace(kept, team=owner.team)
            version = bump(conn)
            conn.execute(
                f"INSERT INTO api_keys ({KEY_COLS}, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*(getattr(kept, c.strip()) for c in KEY_COLS.split(",")), version),
            )
            write_audit(conn, audit, KEY_CREATE, key_target(key.id), None, key_doc(kept))
            return kept, version

        return await self._change(op)

    async def revoke_key(self, key_id: str, audit: AuditDraft) -> ApiKey:
        def op(conn: sqlite3.Connection) -> tuple[ApiKey, int]:
            old = key_row(conn, key_id)
            if old is None:
                raise _missing("key", key_id, "id")
            if old.revoked_at is not None:
                return old, 0  # revoked already: nothing changes
            version = bump(conn)
            conn.execute("UPDATE api_keys SET revoked_at=?, version=? WHERE id=?", (audit.at, version, key_id))
            kept = replace(old, revoked_at=audit.at)
            write_audit(conn, audit, KEY_REVOKE, key_target(key_id), key_doc(old), key_doc(kept))
            return kept, version

        return await self._change(op)

    # the audit log

    async def record_audit(self, audit: AuditDraft, action: str, target: str, before: Doc, after: Doc) -> AuditEntry:
        entry_id = await self._do(lambda conn: write_audit(conn, audit, action, target, before, after))
        return AuditEntry(entry_id, audit.at, audit.actor, action, target, before, after)

    async def check_budget(self, check: BudgetCheck, now: float) -> None:
        if check.watches:
            await self._do(lambda conn: check_budgets(conn, self._books, check, now))
