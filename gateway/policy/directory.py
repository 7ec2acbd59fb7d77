"""The teams, users and gateway keys in force: the config file's, read-only, over the store's roster. Pure.

A name both declare is the config's (SPEC §15): the store's record is kept aside, unused, and reported in
`clashes` so that the caller can say so. Keys are found by their SHA-256: a config user's `key_sha256`, and every
live key issued through the API (revoked ones are dropped, expired ones refused by the caller and swept).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from gateway.policy.quota import Subject, period_key
from gateway.settings import Settings, Team, UpstreamKey, User
from gateway.tenancy import (
    SOURCE_API,
    SOURCE_CONFIG,
    ApiKey,
    Roster,
    RosterChanges,
    TeamRecord,
    UserRecord,
    email_key,
    limits_doc,
)


class Holder(NamedTuple):
    """Who a gateway key's SHA-256 belongs to, and what authentication needs of it: the user, and for a key
    issued through the API its id (for last_used_at), expiry and team. One per live key, so kept small."""

    digest: bytes  # the key's SHA-256, 32 bytes
    user: str
    key_id: str = ""  # "" for a config user's own key
    expires_at: float | None = None
    team: str = ""  # an API key's team (ApiKey.team); "" for a config user's own key

    def live(self, now: float) -> bool:
        """Refused from its expiry second on (a config user's key never expires)."""
        return self.expires_at is None or now < self.expires_at

    def fits(self, user: User) -> bool:
        """An API key serves its user only in the team it was issued in (the store moves it along with an API
        user): a config user of the same name moved by a reload, or a user made anew under a name once held in
        another team, does not inherit it."""
        return not self.key_id or self.team == user.team


class Directory:
    """Mutable, held by one process: changed in place by `load`, `apply` and `use_settings`, read on every
    request. Its maps are as large as the roster (one entry per team, user and live key), never more."""

    def __init__(self, settings: Settings) -> None:
        self.version = -1  # the roster version applied; -1 before the first load
        self.teams: dict[str, Team] = {}
        self.users: dict[str, User] = {}
        self._api_teams: dict[str, TeamRecord] = {}
        self._api_users: dict[str, UserRecord] = {}
        self._keys: dict[bytes, Holder] = {}  # live API keys by SHA-256
        self._config_teams: Mapping[str, Team] = {}
        self._config_users: Mapping[str, User] = {}
        self._config_keys: dict[bytes, Holder] = {}  # a config user's own key by its SHA-256
        self._config_emails: dict[str, str] = {}  # email_key → the config user holding it
        self.use_settings(settings)

    # --- what the request path reads ----------------------------------------------------------------------

    def holder(self, digest: bytes) -> Holder | None:
        """The key of this SHA-256, while it fits its user (Holder.fits): one that does not is as unknown."""
        found = self._config_keys.get(digest) or self._keys.get(digest)
        if found is None or not found.key_id:
            return found
        user = self.users.get(found.user)
        return found if user is not None and found.fits(user) else None

    def member(self, name: str) -> tuple[User, Team] | None:
        """A user in force and its team (None when either is gone: its keys are then refused)."""
        user = self.users.get(name)
        team = self.teams.get(user.team) if user is not None else None
        return None if user is None or team is None else (user, team)

    # --- what the admin routes read -----------------------------------------------------------------------

    def team_source(self, name: str) -> str:
        return SOURCE_CONFIG if name in self._config_teams else SOURCE_API

    def user_source(self, name: str) -> str:
        return SOURCE_CONFIG if name in self._config_users else SOURCE_API

    def api_team(self, name: str) -> TeamRecord | None:
        return self._api_teams.get(name)

    def api_user(self, name: str) -> UserRecord | None:
        return self._api_users.get(name)

    def config_email_user(self, email: str) -> str | None:
        """The config user holding this e-mail, whatever its case (the store's are the store's to check)."""
        return self._config_emails.get(email_key(email))

    def config_key_users(self) -> list[User]:
        """The config users whose own key (`key_sha256`) is in force."""
        return [self._config_users[holder.user] for holder in self._config_keys.values()]

    def team_subjects(self, now: float) -> tuple[Subject, ...]:
        """Every team in force in its current period (gauges, /admin/teams)."""
        return tuple(Subject("team", t.name, period_key(t.limits.period, now), t.limits) for t in self.teams.values())

    def clashes(self) -> list[str]:
        """The store's teams and users hidden by a config entry of the same name: "team:NAME", "user:NAME"."""
        teams = [f"team:{name}" for name in self._api_teams if name in self._config_teams]
        return teams + [f"user:{name}" for name in self._api_users if name in self._config_users]

    def key_count(self) -> int:
        return len(self._keys)

    # --- changes ------------------------------------------------------------------------------------------

    def use_settings(self, settings: Settings) -> None:
        """The config's teams and users (at start-up and on every reload)."""
        self._settings = settings
        self._config_teams = settings.teams
        self._config_users = settings.users
        self._config_keys = {
            bytes.fromhex(user.key_sha256): Holder(bytes.fromhex(user.key_sha256), user.name)
            for user in settings.users.values()
            if user.key_sha256
        }
        self._config_emails = {email_key(u.email): u.name for u in settings.users.values() if u.email}
        self._merge()

    def _merge(self) -> None:
        """The teams and users in force: the config's, and the store's whose names the config does not hold."""
        self.teams = dict(self._config_teams)
        self.users = dict(self._config_users)
        for team in self._api_teams.values():
            self._put_team(team)
        for user in self._api_users.values():
            self._put_user(user)

    def load(self, roster: Roster) -> None:
        """Everything of the store anew (at start-up, or when the changes since a version are not to be had)."""
        self._api_teams = {}
        self._api_users = {}
        self._keys = {}
        self.teams = dict(self._config_teams)
        self.users = dict(self._config_users)
        self._apply(roster.teams, roster.users, roster.keys, (), ())
        self.version = roster.version

    def fresh(self) -> Directory:
        """An empty roster over the same config: a whole roster is loaded into it a page at a time (its `apply`)
        while this one serves on, then handed over by `take`; no whole Roster is ever held beside it."""
        return Directory(self._settings)

    def take(self, loaded: Directory) -> None:
        """The store's part of a directory loaded by pages (see `fresh`), under this one's config (which a
        reload may have changed meanwhile)."""
        self._api_teams = loaded._api_teams
        self._api_users = loaded._api_users
        self._keys = loaded._keys
        self.version = loaded.version
        self._merge()

    def apply(self, changes: RosterChanges) -> None:
        """What changed since `version`, each record as it is now."""
        self._apply(changes.teams, changes.users, changes.keys, changes.deleted_teams, changes.deleted_users)
        self.version = changes.version

    def sweep(self, now: float) -> int:
        """Drop the keys expired by now (refused already; this keeps the map to live keys). How many went."""
        expired = [holder for holder in self._keys.values() if not holder.live(now)]
        for holder in expired:
            del self._keys[holder.digest]
        return len(expired)

    def _apply(
        self,
        teams: Iterable[TeamRecord],
        users: Iterable[UserRecord],
        keys: Iterable[ApiKey],
        deleted_teams: Iterable[str],
        deleted_users: Iterable[str],
    ) -> None:
        for name in deleted_users:
            self._api_users.pop(name, None)
            if name not in self._config_users:
                self.users.pop(name, None)
        for name in deleted_teams:
            self._api_teams.pop(name, None)
            if name not in self._config_teams:
                self.teams.pop(name, None)
        for team in teams:
            self._api_teams[team.name] = team
            self._put_team(team)
        for user in users:
            self._api_users[user.name] = user
            self._put_user(user)
        for key in keys:
            digest = bytes.fromhex(key.sha256)
            if key.revoked_at is not None:
                self._keys.pop(digest, None)
            else:  # names interned: a user's hundred keys share one string, not a hundred copies
                self._keys[digest] = Holder(digest, sys.intern(key.user), key.id, key.expires_at, sys.intern(key.team))

    def _put_team(self, team: TeamRecord) -> None:
        if team.name not in self._config_teams:
            self.teams[team.name] = Team(team.name, team.limits)

    def _put_user(self, user: UserRecord) -> None:
        if user.name not in self._config_users:
            self.users[user.name] = User(user.name, user.team, "", user.limits, user.role, user.email)


def config_changes(old: Settings, new: Settings) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """What a reload changes among the config's teams, users and upstream keys, as (before, after) views for
    audit rows (None: absent on that side). A user's key shows only as whether it changed ("key_changed", on a
    user kept by the reload), an upstream key's value masked (th-…abcd): never a value, nor a part of its hash."""
    changes: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = []
    sides: tuple[tuple[Mapping[str, Any], Mapping[str, Any], Callable[[Any], dict[str, Any]]], ...] = (
        (old.teams, new.teams, _team_view),
        (old.users, new.users, _user_view),
        ({k.name: k for k in old.upstream.keys}, {k.name: k for k in new.upstream.keys}, _upstream_view),
    )
    for before, after, view in sides:
        for name in sorted(set(before) | set(after)):
            was = view(before[name]) if name in before else None
            now = view(after[name]) if name in after else None
            if was is not None and now is not None and view is _user_view:
                key_changed = before[name].key_sha256 != after[name].key_sha256
                if was == now and not key_changed:
                    continue
                now["key_changed"] = key_changed
            if was != now:
                changes.append((was, now))
    return changes


def rebound_users(old: Settings, new: Settings) -> list[str]:
    """The config users a reload removes, moves to another team, or adds (a name that may have been an API
    user's): the keys issued through the API under each name were issued to someone else than the user of
    that name now, and go (flow/roster.py revokes them)."""
    names = set(old.users) ^ set(new.users)
    names.update(name for name in set(old.users) & set(new.users) if old.users[name].team != new.users[name].team)
    return sorted(names)


def _team_view(team: Team) -> dict[str, Any]:
    return {"kind": "team", "name": team.name, **limits_doc(team.limits)}


def _user_view(user: User) -> dict[str, Any]:
    return {
        "kind": "user",
        "name": user.name,
        "team": user.team,
        "role": user.role,
        "email": user.email,
        **limits_doc(user.limits),
    }


def _upstream_view(key: UpstreamKey) -> dict[str, Any]:
    return {
        "kind": "upstream_key",
        "name": key.name,
        "key": key.value.masked(),
        "weight": key.weight,
        "max_concurrent_tasks": key.max_concurrent_tasks,
        "models": None if key.models is None else sorted(key.models),
    }
