"""Teams, users and gateway keys made at runtime (SPEC §15): the records the store keeps, the audit of every
change, and the roster every replica authenticates from. Pure: imports only settings and errors.

A team or user made through the admin API is kept by the store (`source: api`); the config file's own stay in
Settings (`source: config`) and win over a store record of the same name. A gateway key issued through the API
is kept by its SHA-256 alone: its value is shown once, when issued, and never stored, logged or audited (an
audit row names a key by its `id` and `prefix` only).

Every change to the store's teams, users and keys is one atomic store operation that also writes its one audit
row and moves the roster version on by one, so a replica that holds the roster at version v catches up with
`roster_changes_since(v)` (store/base.py)."""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import Conflict
from gateway.settings import DEFAULT_ALERT_THRESHOLDS as DEFAULT_ALERT_THRESHOLDS  # a record's default
from gateway.settings import Limits, User

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # team and user names, matched whole
MEMBER = "member"
TEAM_ADMIN = "team_admin"
ROLES = (MEMBER, TEAM_ADMIN)
SOURCE_API = "api"
SOURCE_CONFIG = "config"
KEY_VALUE_PREFIX = "tgw-"  # a gateway key's value: "tgw-" + 43 URL-safe characters
KEY_ID_PREFIX = "key_"
KEY_SHOWN_CHARS = 8  # the `prefix` shown for a key: "tgw-AbCd"

# Who made a change (AuditEntry.actor): the operator's admin token, a team admin by its user, a reload.
OPERATOR = "admin"
RELOAD = "reload"

# What a change did (AuditEntry.action), and to what (AuditEntry.target: "team:NAME", "user:NAME",
# "api_key:ID" or "config").
TEAM_CREATE = "team.create"
TEAM_UPDATE = "team.update"
TEAM_DELETE = "team.delete"
USER_CREATE = "user.create"
USER_UPDATE = "user.update"
USER_DELETE = "user.delete"
KEY_CREATE = "api_key.create"
KEY_REVOKE = "api_key.revoke"
CONFIG_RELOAD = "config.reload"
CONFIG_TARGET = "config"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


EMAIL_PATTERN = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")  # name@domain.tld: a console's sign-in matches it


def valid_email(email: object) -> bool:
    """name@domain.tld, at most 254 characters, none of them a control, format (such as a right-to-left
    override), unassigned or private-use character: an address shown in tables and matched at sign-in."""
    return (
        isinstance(email, str)
        and len(email) <= 254
        and EMAIL_PATTERN.fullmatch(email) is not None
        and not any(unicodedata.category(c).startswith("C") for c in email)
    )


def email_key(email: str) -> str:
    """What makes two e-mail addresses the same one: they match whatever their case. A console signs a user in
    by its e-mail, so no two users (config or store) hold the same key."""
    return email.casefold()


def shared_emails(users: Iterable[User]) -> list[tuple[str, str]]:
    """(user, the earlier user with the same e-mail) for each user whose e-mail an earlier one holds."""
    first: dict[str, str] = {}
    return [
        (user.name, first[key])
        for user in users
        if user.email and (key := email_key(user.email)) and first.setdefault(key, user.name) != user.name
    ]


def email_taken() -> Conflict:
    """A user given an e-mail another user holds (it does not say whose: that user may be of another team)."""
    return Conflict("Another user has this e-mail address (whatever its case).", param="email")


def deleted_team(name: str) -> Conflict:
    """A team made under the name of one deleted: the old team's tasks, spend and ledger rows keep the name."""
    return Conflict(
        f"A team named {name!r} was deleted: its tasks and ledger rows keep the name, so no new team takes it.",
        param="name",
    )


def user_actor(name: str) -> str:
    """The actor of a change a team admin made with its own gateway key."""
    return "user:" + name


def team_target(name: str) -> str:
    return "team:" + name


def user_target(name: str) -> str:
    return "user:" + name


def key_target(key_id: str) -> str:
    return "api_key:" + key_id


def audit_teams(target: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """The teams an audit row concerns, indexed by the stores for a team admin's listing: the team it targets,
    and on either side of the change the team of a user or key, or a team itself (a reload's "kind": "team").
    A user moved between teams concerns both."""
    teams = {target.removeprefix("team:")} if target.startswith("team:") else set()
    for doc in (before, after):
        if doc:
            teams.update(t for t in (doc.get("team"), doc.get("name") if doc.get("kind") == "team" else None) if t)
    return sorted(t for t in teams if isinstance(t, str))


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """A team made through the admin API. The store stamps created_at (kept across changes) and updated_at
    with the change's AuditDraft.at."""

    name: str
    limits: Limits = Limits()
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user made through the admin API, in one team (an API team or a config team). Its limits apply
    together with its team's; its `period` is its team's unless set."""

    name: str
    team: str
    role: str = MEMBER  # one of ROLES
    email: str | None = None
    limits: Limits = Limits()
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A gateway key issued through the API: its SHA-256, never its value. `team` is its user's team, kept in
    step by the store when an API user moves to another team. Times are unix seconds; `last_used_at` is
    to the minute (written in bulk by touch_keys, never once per request)."""

    id: str  # "key_" + random
    user: str
    team: str
    prefix: str  # the value's first KEY_SHOWN_CHARS characters: "tgw-AbCd"
    sha256: str  # lowercase hex SHA-256 of the whole value
    label: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def live(self, now: float) -> bool:
        """Not revoked, and not expired: a key is refused from its expiry second on."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def key_sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def issue_key(
    user: str, team: str, now: float, label: str | None = None, expires_at: float | None = None
) -> tuple[str, ApiKey]:
    """A fresh key: its value (to show once, then forget) and its record (to hand to Store.add_key)."""
    value = KEY_VALUE_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=KEY_ID_PREFIX + secrets.token_hex(12),
        user=user,
        team=team,
        prefix=value[:KEY_SHOWN_CHARS],
        sha256=key_sha256(value),
        label=label,
        created_at=now,
        expires_at=expires_at,
    )
    return value, record


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """Who makes a change, and when (unix seconds, from Store.now()): what the admin routes hand to a store
    operation, which writes the audit row (action, target, before, after) from what it changes."""

    actor: str  # OPERATOR, user_actor(name) or RELOAD
    at: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log. `id` grows with every row (pages go `after` it); `before` and `after` are
    JSON-able dicts (the *_doc functions below), None for what did not exist before or after the change."""

    id: int
    at: float
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Roster:
    """A snapshot of the store's teams, users and keys at one roster version: what a replica builds its
    in-memory directory from. `keys` holds the keys neither revoked nor expired when it was loaded (their
    last_used_at is not part of a roster: it may be None there; list_keys and get_key give it)."""

    version: int
    teams: tuple[TeamRecord, ...]
    users: tuple[UserRecord, ...]
    keys: tuple[ApiKey, ...]


@dataclass(frozen=True, slots=True)
class RosterChanges:
    """What changed after a roster version, up to `version`: each team, user and key created or changed
    since, as it is now (a revoked key with its revoked_at), and the names of teams and users deleted since
    (a name deleted then created again is in `teams`/`users`, not in the deleted ones)."""

    version: int
    teams: tuple[TeamRecord, ...] = ()
    users: tuple[UserRecord, ...] = ()
    keys: tuple[ApiKey, ...] = ()
    deleted_teams: tuple[str, ...] = ()
    deleted_users: tuple[str, ...] = ()


# The JSON-able views an audit row's before/after hold: limits under §6's names, never a key's value or hash.


def limits_doc(limits: Limits) -> dict[str, Any]:
    budget = limits.budget_micros
    return {
        "budget_usd": None if budget is None else round(budget / 1_000_000, 6),
        "video_seconds": limits.video_seconds,
        "period": limits.period,
        "requests_per_minute": limits.requests_per_minute,
        "max_concurrent_tasks": limits.max_concurrent_tasks,
        "models": None if limits.models is None else sorted(limits.models),
        "alert_thresholds": list(limits.alert_thresholds),
    }


def team_doc(team: TeamRecord) -> dict[str, Any]:
    return {"name": team.name, **limits_doc(team.limits)}


def user_doc(user: UserRecord) -> dict[str, Any]:
    return {"name": user.name, "team": user.team, "role": user.role, "email": user.email, **limits_doc(user.limits)}


def created_doc(user: UserRecord, revoked: Iterable[ApiKey]) -> dict[str, Any]:
    """A user's `after`, with the keys its create revoked (issued under its name to a user no longer there)."""
    keys = [{"id": key.id, "prefix": key.prefix} for key in revoked]
    return {**user_doc(user), "revoked_api_keys": keys} if keys else user_doc(user)


def key_doc(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "user": key.user,
        "team": key.team,
        "label": key.label,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }
