"""The roster's follower (flow/roster.py) over a small stand-in store: it catches up change by change, loads
anew when the changes cannot be had, outlives a store that fails, writes last uses in bulk, and audits a
reload's changes without letting a failing store undo the reload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import pytest

from gateway.errors import StoreUnavailable
from gateway.flow.roster import RosterSync
from gateway.policy.auth import KeyUses
from gateway.policy.directory import Directory
from gateway.settings import Limits
from gateway.tenancy import ApiKey, AuditDraft, RosterChanges, TeamRecord, issue_key
from tests.doubles import make_settings

NOW = 1_800_000_000.0


class RosterStore:
    """The roster part of a store: a version, changes by version, and what the follower writes."""

    def __init__(self) -> None:
        self.version = 0
        self.teams: dict[str, TeamRecord] = {}
        self.changed: dict[int, TeamRecord] = {}
        self.changed_keys: dict[int, ApiKey] = {}
        self.forgotten = False  # the changes since old versions are gone: only a full load serves
        self.failures = 0  # calls of roster_wait that fail before it works again
        self.touched: list[Mapping[str, float]] = []
        self.audits: list[tuple[Any, ...]] = []
        self.audit_fails = False
        self.moved = asyncio.Event()
        self.restarts = 0  # loads whose pages start again before they end
        self.serving: Directory | None = None  # the directory in force, looked at while pages are read
        self.seen_during_load: list[set[str]] = []
        self.keys: dict[str, ApiKey] = {}
        self.revocations: list[tuple[str, str]] = []  # (actor, key id)
        self.revoke_fails = False

    def add_team(self, name: str) -> None:
        self.version += 1
        self.teams[name] = self.changed[self.version] = TeamRecord(name, Limits())
        self.moved.set()

    async def roster_wait(self, version: int, timeout_s: float) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable()
        if self.version == version:
            try:
                await asyncio.wait_for(self.moved.wait(), timeout_s)
            except TimeoutError:
                pass
        self.moved.clear()
        return self.version

    async def roster_changes_since(self, version: int) -> RosterChanges | None:
        if self.forgotten:
            return None
        teams = tuple(team for at, team in self.changed.items() if at > version)
        keys = tuple(key for at, key in self.changed_keys.items() if at > version)
        return RosterChanges(self.version, teams=teams, keys=keys)

    async def roster_pages(self) -> AsyncIterator[RosterChanges | None]:
        """A team a page; `restarts` times a page of a team deleted meanwhile, then a start again (None)."""
        while self.restarts:
            self.restarts -= 1
            yield RosterChanges(self.version, teams=(TeamRecord("ghost", Limits()),))
            yield None
        for team in self.teams.values():
            self.seen_during_load.append(set(self.serving.teams) if self.serving else set())
            yield RosterChanges(self.version, teams=(team,))
        yield RosterChanges(self.version)

    async def list_keys(
        self, user: str | None, team: str | None, limit: int, after: str | None
    ) -> tuple[list[ApiKey], str | None]:
        found = sorted((k for k in self.keys.values() if k.user == user and k.id > (after or "")), key=lambda k: k.id)
        return found[:limit], found[limit - 1].id if len(found) > limit else None

    async def revoke_key(self, key_id: str, audit: AuditDraft) -> ApiKey:
        if self.revoke_fails:
            raise StoreUnavailable()
        if self.keys[key_id].revoked_at is None:
            self.keys[key_id] = replace(self.keys[key_id], revoked_at=audit.at)
            self.revocations.append((audit.actor, key_id))
            self.version += 1
            self.changed_keys[self.version] = self.keys[key_id]
        return self.keys[key_id]

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        self.touched.append(dict(used))

    async def now(self) -> float:
        return NOW

    async def record_audit(self, audit: AuditDraft, *row: Any) -> None:
        if self.audit_fails:
            raise StoreUnavailable()
        self.audits.append((audit.actor, *row))


@pytest.fixture
def store() -> RosterStore:
    return RosterStore()


def follower(store: RosterStore) -> RosterSync:
    return RosterSync(store, Directory(make_settings()), KeyUses(), lambda: NOW, retry_s=0.01)  # type: ignore[arg-type]


async def test_it_loads_then_catches_up_change_by_change_or_anew(store: RosterStore):
    store.add_team("green")
    sync = follower(store)
    await sync.start()
    assert (sync.directory.version, set(sync.directory.teams)) == (1, {"red", "green"})
    store.add_team("blue")
    await sync.catch_up()
    assert (sync.directory.version, set(sync.directory.teams)) == (2, {"red", "green", "blue"})
    store.forgotten = True
    store.add_team("teal")
    await sync.catch_up()
    assert (sync.directory.version, set(sync.directory.teams)) == (3, {"red", "green", "blue", "teal"})


async def test_a_load_reads_pages_beside_the_directory_in_force_and_forgets_pages_that_start_again(
    store: RosterStore,
):
    store.add_team("green")
    sync = follower(store)
    await sync.start()
    store.add_team("blue")
    store.forgotten, store.restarts, store.serving = True, 1, sync.directory  # a whole load, begun twice
    await sync.catch_up()
    assert (sync.directory.version, set(sync.directory.teams)) == (2, {"red", "green", "blue"})  # no ghost
    assert store.seen_during_load[-2:] == [{"red", "green"}] * 2  # requests meanwhile met the roster as it was


async def test_the_loop_follows_the_store_outlives_its_failures_and_writes_uses_on_stop(store: RosterStore):
    sync = follower(store)
    await sync.start()
    running = asyncio.create_task(sync.run())
    store.add_team("green")
    await asyncio.wait_for(_until(lambda: "green" in sync.directory.teams), 2)
    store.failures = 3  # the store away for a while: the directory serves on, the loop goes on
    await asyncio.sleep(0.05)
    store.add_team("blue")
    await asyncio.wait_for(_until(lambda: "blue" in sync.directory.teams), 2)
    sync.uses.note("key_1", NOW + 30)
    sync.stop()
    await asyncio.wait_for(running, 2)
    assert store.touched == [{"key_1": NOW}]  # the minute, written once on the way out


async def test_a_reload_is_audited_change_by_change_and_survives_a_failing_store(store: RosterStore):
    sync = follower(store)
    await sync.start()
    old = sync.directory
    new = make_settings(teams={"red": {"budget_usd": 5.0}, "blue": {}})
    assert await sync.reloaded(make_settings(), new, "reload") == 2
    assert [(actor, action, target, after["name"]) for actor, action, target, _, after in store.audits] == [
        ("reload", "config.reload", "config", "blue"),
        ("reload", "config.reload", "config", "red"),
    ]
    store.audit_fails = True
    again = make_settings(teams={"red": {}})
    assert await sync.reloaded(new, again, "admin") == 2  # counted, not written: the reload stands
    assert old is sync.directory and set(sync.directory.teams) == {"red"}


async def test_a_reload_revokes_the_api_keys_of_config_users_it_removes_moves_or_adds(store: RosterStore):
    """Such a key was issued to someone other than the user of its name now; every page of them goes."""
    users = {"alice": {"team": "red", "key": "tgw-a"}, "mo": {"team": "red", "key": "tgw-m"}}
    old = make_settings(teams={"red": {}, "blue": {}}, users=users)
    issued = {name: [issue_key(name, "red", NOW)[1] for _ in range(3)] for name in ("alice", "mo", "rob", "kept")}
    store.keys = {key.id: key for keys in issued.values() for key in keys}
    store.keys[issued["mo"][0].id] = replace(issued["mo"][0], revoked_at=NOW - 5)  # revoked already
    sync = RosterSync(store, Directory(old), KeyUses(), lambda: NOW, retry_s=0.01)  # type: ignore[arg-type]
    await sync.start()
    new = make_settings(
        teams={"red": {}, "blue": {}},
        users={"mo": {"team": "blue", "key": "tgw-m"}, "rob": {"team": "red", "key": "tgw-r"}},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.flow.roster.KEYS_PAGE", 2)  # more than one page each
        await sync.reloaded(old, new, "admin")
    gone = {key.id for name in ("alice", "mo", "rob") for key in issued[name]} - {issued["mo"][0].id}
    assert {key_id for _, key_id in store.revocations} == gone and len(store.revocations) == len(gone)
    assert {actor for actor, _ in store.revocations} == {"reload"}
    assert all(store.keys[key.id].revoked_at is None for key in issued["kept"])
    assert sync.directory.version == store.version  # caught up with its own revocations
    assert set(sync.directory.users) == {"mo", "rob"}


async def test_a_reload_stands_when_its_revocations_fail(store: RosterStore):
    old = make_settings(teams={"red": {}}, users={"alice": {"team": "red", "key": "tgw-a"}})
    store.keys = {key.id: key for key in (issue_key("alice", "red", NOW)[1],)}
    store.revoke_fails = True
    sync = RosterSync(store, Directory(old), KeyUses(), lambda: NOW, retry_s=0.01)  # type: ignore[arg-type]
    await sync.start()
    assert await sync.reloaded(old, make_settings(teams={"red": {}}, users={}), "reload") == 1
    assert set(sync.directory.users) == set() and store.revocations == []


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.005)
