"""The roster's records as both stores keep them (exact JSON: money in micro-dollars, times as repr strings),
and a roster put together from pages read at different versions plus the changes since the first of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from gateway.settings import DEFAULT_ALERT_THRESHOLDS, Limits
from gateway.tenancy import ApiKey, AuditDraft, AuditEntry, Roster, RosterChanges, TeamRecord, UserRecord

PAGE = 5_000  # records a store reads in one step while loading a roster


def limits_dump(limits: Limits) -> dict[str, Any]:
    return {
        "budget_micros": limits.budget_micros,
        "video_seconds": limits.video_seconds,
        "period": limits.period,
        "requests_per_minute": limits.requests_per_minute,
        "max_concurrent_tasks": limits.max_concurrent_tasks,
        "models": None if limits.models is None else sorted(limits.models),
        "alert_thresholds": list(limits.alert_thresholds),
    }


def limits_load(doc: dict[str, Any]) -> Limits:
    models = doc.get("models")
    return Limits(
        budget_micros=doc.get("budget_micros"),
        video_seconds=doc.get("video_seconds"),
        period=doc.get("period") or "month",
        requests_per_minute=doc.get("requests_per_minute"),
        max_concurrent_tasks=doc.get("max_concurrent_tasks"),
        models=None if models is None else frozenset(models),
        alert_thresholds=tuple(doc.get("alert_thresholds", DEFAULT_ALERT_THRESHOLDS)),
    )


def team_json(team: TeamRecord) -> bytes:
    return orjson.dumps(
        {
            "name": team.name,
            "limits": limits_dump(team.limits),
            "created_at": team.created_at,
            "updated_at": team.updated_at,
        }
    )


def team_load(raw: bytes | str) -> TeamRecord:
    doc = orjson.loads(raw)
    return TeamRecord(doc["name"], limits_load(doc["limits"]), doc["created_at"], doc["updated_at"])


def user_json(user: UserRecord) -> bytes:
    return orjson.dumps(
        {
            "name": user.name,
            "team": user.team,
            "role": user.role,
            "email": user.email,
            "limits": limits_dump(user.limits),
            "created_at": user.created_at,
            "updated_at": user.updated_at,
        }
    )


def user_load(raw: bytes | str) -> UserRecord:
    doc = orjson.loads(raw)
    return UserRecord(
        doc["name"],
        doc["team"],
        doc["role"],
        doc["email"],
        limits_load(doc["limits"]),
        doc["created_at"],
        doc["updated_at"],
    )


def _time(value: float | None) -> str | None:
    return None if value is None else repr(float(value))


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def key_json(key: ApiKey) -> bytes:
    """A key as a JSON array of strings and nulls only: a Lua script may decode, change and encode it again
    without losing a digit (its JSON library keeps 14 significant digits of a number)."""
    return orjson.dumps(
        [
            key.id,
            key.user,
            key.team,
            key.prefix,
            key.sha256,
            key.label,
            _time(key.created_at),
            _time(key.expires_at),
            _time(key.revoked_at),
        ]
    )


def key_load(raw: bytes | str, last_used_at: float | None = None) -> ApiKey:
    key_id, user, team, prefix, sha256, label, created, expires, revoked = orjson.loads(raw)
    return ApiKey(
        key_id, user, team, prefix, sha256, label, float(created), _float(expires), _float(revoked), last_used_at
    )


def audit_json(
    audit: AuditDraft, action: str, target: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> bytes:
    return orjson.dumps(
        {"at": audit.at, "actor": audit.actor, "action": action, "target": target, "before": before, "after": after}
    )


def audit_load(entry_id: int, raw: bytes | str) -> AuditEntry:
    doc = orjson.loads(raw)
    return AuditEntry(entry_id, doc["at"], doc["actor"], doc["action"], doc["target"], doc["before"], doc["after"])


class RosterParts:
    """A roster read in several steps. Pages read after version v may already hold later changes; applying
    every change after v on top of them (each as it is now) gives the roster at the changes' version."""

    def __init__(self) -> None:
        self.teams: dict[str, TeamRecord] = {}
        self.users: dict[str, UserRecord] = {}
        self.keys: dict[str, ApiKey] = {}

    def add(
        self, teams: Iterable[TeamRecord] = (), users: Iterable[UserRecord] = (), keys: Iterable[ApiKey] = ()
    ) -> None:
        self.teams.update((t.name, t) for t in teams)
        self.users.update((u.name, u) for u in users)
        self.keys.update((k.id, k) for k in keys)

    def apply(self, changes: RosterChanges) -> None:
        self.add(changes.teams, changes.users, changes.keys)
        for name in changes.deleted_teams:
            self.teams.pop(name, None)
        for name in changes.deleted_users:
            self.users.pop(name, None)

    def roster(self, version: int, now: float) -> Roster:
        return Roster(
            version,
            tuple(self.teams.values()),
            tuple(self.users.values()),
            tuple(k for k in self.keys.values() if k.live(now)),
        )


async def roster_of(pages: AsyncIterator[RosterChanges | None]) -> tuple[RosterParts, int]:
    """A store's roster_pages put together whole (Store.load_roster), and the version they reached."""
    parts, version = RosterParts(), 0
    async for page in pages:
        if page is None:  # the store starts again: what was read is forgotten
            parts = RosterParts()
        else:
            parts.apply(page)
            version = page.version
    return parts, version
