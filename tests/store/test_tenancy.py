"""The roster's contract (teams, users, gateway keys, the audit log, the roster version): each test runs against
SQLite and a real Redis; the replica tests run two Redis stores on one server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from gateway.errors import Conflict, NotFound, TeamNotEmpty
from gateway.settings import Limits
from gateway.store.redis.store import RedisStore
from gateway.store.redis.tenancy import Plan
from gateway.store.sqlite.store import SQLiteStore
from gateway.tenancy import (
    CONFIG_RELOAD,
    CONFIG_TARGET,
    OPERATOR,
    RELOAD,
    TEAM_ADMIN,
    AuditDraft,
    TeamRecord,
    UserRecord,
    issue_key,
    user_actor,
)

DOLLAR = 1_000_000


def at(store: Any, actor: str = OPERATOR, offset: float = 0.0) -> AuditDraft:
    return AuditDraft(actor, time.time() + offset)


async def audit_rows(store: Any) -> list[Any]:
    rows, _ = await store.audit_page(None, None, None, 10_000, None)
    return rows


async def team_and_user(store: Any, team: str = "marketing", user: str = "alice") -> None:
    await store.save_team(TeamRecord(team, Limits(budget_micros=500 * DOLLAR)), at(store), True)
    await store.save_user(UserRecord(user, team, limits=Limits(budget_micros=50 * DOLLAR)), at(store), True, True)


async def stored_audit_text(store: Any) -> str:
    """Every audit row as the store keeps it, whole."""
    if isinstance(store, SQLiteStore):
        rows = await store._do(lambda conn: conn.execute("SELECT * FROM audit").fetchall())
        return repr(rows)
    return repr(await store._r.hgetall(store._k("tn:a")))


async def test_a_team_is_created_read_changed_and_deleted_each_with_one_audit_row(store):
    start = await store.roster_version()
    made = await store.save_team(TeamRecord("marketing", Limits(budget_micros=500 * DOLLAR)), at(store), True)
    assert await store.get_team("marketing") == made
    assert made.created_at == made.updated_at > 0
    changed = await store.save_team(
        TeamRecord("marketing", Limits(budget_micros=700 * DOLLAR, period="week", models=frozenset({"m"}))),
        at(store, offset=5),
        False,
    )
    assert changed.created_at == made.created_at and changed.updated_at > made.updated_at
    assert (await store.get_team("marketing")).limits.period == "week"
    assert await store.delete_team("marketing", at(store)) == changed
    assert await store.get_team("marketing") is None
    assert await store.roster_version() == start + 3
    rows = await audit_rows(store)
    assert [(r.action, r.target) for r in rows] == [
        ("team.create", "team:marketing"),
        ("team.update", "team:marketing"),
        ("team.delete", "team:marketing"),
    ]
    assert rows[0].before is None and rows[0].after["budget_usd"] == 500.0
    assert rows[1].before == rows[0].after
    assert rows[1].after["budget_usd"] == 700.0 and rows[1].after["models"] == ["m"]
    assert rows[2].before == rows[1].after and rows[2].after is None
    assert [r.id for r in rows] == sorted({r.id for r in rows})


async def test_refused_changes_write_nothing_not_even_an_audit_row(store):
    await team_and_user(store)
    version, rows = await store.roster_version(), await audit_rows(store)
    with pytest.raises(Conflict):
        await store.save_team(TeamRecord("marketing"), at(store), True)
    with pytest.raises(NotFound):
        await store.save_team(TeamRecord("sales"), at(store), False)
    with pytest.raises(TeamNotEmpty):
        await store.delete_team("marketing", at(store))
    with pytest.raises(NotFound):
        await store.delete_team("sales", at(store))
    with pytest.raises(Conflict):
        await store.save_user(UserRecord("alice", "marketing"), at(store), True, True)
    with pytest.raises(NotFound) as missing_team:
        await store.save_user(UserRecord("bob", "sales"), at(store), True, True)
    assert missing_team.value.param == "team"
    with pytest.raises(NotFound):
        await store.delete_user("bob", at(store))
    with pytest.raises(NotFound) as missing_user:
        await store.add_key(issue_key("bob", "marketing", time.time())[1], at(store), True)
    assert missing_user.value.param == "user"
    with pytest.raises(NotFound):
        await store.revoke_key("key_nope", at(store))
    assert await store.roster_version() == version
    assert await audit_rows(store) == rows
    assert await store.get_user("bob") is None and await store.get_team("sales") is None
    assert (await store.get_team("marketing")).limits.budget_micros == 500 * DOLLAR


async def test_a_team_empties_before_it_is_deleted(store):
    await team_and_user(store)
    with pytest.raises(TeamNotEmpty):
        await store.delete_team("marketing", at(store))
    await store.delete_user("alice", at(store))
    await store.delete_team("marketing", at(store))
    assert await store.get_team("marketing") is None


async def test_a_deleted_teams_name_is_not_taken_by_a_new_team(store):
    """The deleted team's tasks, spend and ledger rows keep its name: a new team of that name would inherit them."""
    await team_and_user(store)
    await store.delete_user("alice", at(store))
    await store.delete_team("marketing", at(store))
    version, rows = await store.roster_version(), await audit_rows(store)
    with pytest.raises(Conflict) as refused:
        await store.save_team(TeamRecord("marketing"), at(store), True)
    assert refused.value.param == "name" and "deleted" in str(refused.value)
    assert await store.get_team("marketing") is None
    assert (await store.roster_version(), await audit_rows(store)) == (version, rows)
    with pytest.raises(NotFound):  # nor is it there to change
        await store.save_team(TeamRecord("marketing"), at(store), False)
    await store.save_team(TeamRecord("marketing-2"), at(store), True)  # another name is free


async def test_a_user_may_belong_to_a_config_team_and_moves_with_its_keys(store):
    await store.save_user(UserRecord("carol", "from-config", role=TEAM_ADMIN), at(store), True, False)
    _, key = issue_key("carol", "from-config", time.time())
    await store.add_key(key, at(store), True)
    await store.save_team(TeamRecord("sales"), at(store), True)
    moved = await store.save_user(UserRecord("carol", "sales", email="c@example.com"), at(store), False, True)
    assert moved.team == "sales" and moved.email == "c@example.com" and moved.role == "member"
    assert (await store.get_key(key.id)).team == "sales"
    assert [k.id for k in (await store.list_keys(None, "sales", 10, None))[0]] == [key.id]
    assert (await store.list_keys(None, "from-config", 10, None))[0] == []
    with pytest.raises(TeamNotEmpty):
        await store.delete_team("sales", at(store))


async def test_deleting_a_user_revokes_its_keys_in_the_same_step(store):
    await team_and_user(store)
    keys = [issue_key("alice", "marketing", time.time())[1] for _ in range(3)]
    for key in keys:
        await store.add_key(key, at(store), True)
    await store.revoke_key(keys[0].id, at(store))
    version = await store.roster_version()
    user, revoked = await store.delete_user("alice", at(store))
    assert user.name == "alice" and sorted(k.id for k in revoked) == sorted(k.id for k in keys[1:])
    assert await store.roster_version() == version + 1
    listed, _ = await store.list_keys("alice", None, 10, None)
    assert len(listed) == 3 and all(k.revoked_at is not None for k in listed)
    assert (await store.load_roster()).keys == ()
    row = (await audit_rows(store))[-1]
    assert row.action == "user.delete" and row.after is None
    assert sorted(row.before["api_keys"], key=lambda k: k["id"]) == sorted(
        ({"id": k.id, "prefix": k.prefix} for k in keys[1:]), key=lambda k: k["id"]
    )


async def test_a_user_made_under_a_name_revokes_the_keys_left_under_it_in_the_same_step(store):
    """Keys issued to a config user the config has since dropped are not a new user's of that name."""
    left = [issue_key("carol", "from-config", time.time())[1] for _ in range(3)]
    for key in left:
        await store.add_key(key, at(store), False)  # a config user's: the store holds no record of it
    await store.revoke_key(left[0].id, at(store))
    start = await store.roster_version()
    await store.save_team(TeamRecord("sales"), at(store), True)
    made = await store.save_user(UserRecord("carol", "sales"), at(store), True, True)
    assert made.team == "sales" and await store.roster_version() == start + 2  # one step for the user
    listed, _ = await store.list_keys("carol", None, 10, None)
    assert len(listed) == 3 and all(key.revoked_at is not None for key in listed)
    assert (await store.load_roster()).keys == ()
    changes = await store.roster_changes_since(start + 1)
    assert sorted(k.id for k in changes.keys if k.revoked_at) == sorted(k.id for k in left[1:])
    row = (await audit_rows(store))[-1]
    assert (row.action, row.target, row.before) == ("user.create", "user:carol", None)
    assert sorted(k["id"] for k in row.after["revoked_api_keys"]) == sorted(k.id for k in left[1:])
    await store.add_key(issue_key("carol", "sales", time.time())[1], at(store), True)
    await store.save_user(UserRecord("carol", "sales", email="c@example.com"), at(store), False, True)
    assert len([k for k in (await store.list_keys("carol", None, 10, None))[0] if k.revoked_at is None]) == 1
    assert "revoked_api_keys" not in (await audit_rows(store))[-1].after  # a change revokes nothing


async def test_no_two_users_hold_one_email_whatever_its_case(store):
    await store.save_team(TeamRecord("sales"), at(store), True)
    await store.save_user(UserRecord("ann", "sales", email="Ann@Example.com"), at(store), True, True)
    await store.save_user(UserRecord("bob", "sales"), at(store), True, True)
    version, rows = await store.roster_version(), await audit_rows(store)
    for user, create in (
        (UserRecord("cy", "sales", email="ann@example.COM"), True),
        (UserRecord("bob", "sales", email="ANN@example.com"), False),
    ):
        with pytest.raises(Conflict) as taken:
            await store.save_user(user, at(store), create, True)
        assert taken.value.param == "email" and "ann" not in str(taken.value).lower()
    assert (await store.roster_version(), await audit_rows(store)) == (version, rows)
    assert await store.get_user("cy") is None and (await store.get_user("bob")).email is None
    await store.save_user(UserRecord("ann", "sales", email="ANN@example.com"), at(store), False, True)  # its own
    await store.save_user(UserRecord("ann", "sales", email="ann@other.io"), at(store), False, True)  # lets go
    await store.save_user(UserRecord("bob", "sales", email="ann@example.com"), at(store), False, True)
    with pytest.raises(Conflict):
        await store.save_user(UserRecord("cy", "sales", email="Ann@Other.io"), at(store), True, True)
    await store.delete_user("ann", at(store))  # a deleted user's e-mail is free again
    await store.save_user(UserRecord("cy", "sales", email="Ann@Other.io"), at(store), True, True)
    assert (await store.get_user("cy")).email == "Ann@Other.io"


async def test_keys_are_added_listed_and_revoked_once(store):
    await team_and_user(store)
    now = time.time()
    value, key = issue_key("alice", "other-team", now, label="ci", expires_at=now + 3600)
    assert value.startswith("tgw-") and key.prefix == value[:8] and key.id.startswith("key_")
    kept = await store.add_key(key, at(store), True)
    assert kept.team == "marketing"  # the user's team, whatever the caller said
    assert kept.expires_at == now + 3600 and kept.label == "ci" and kept.revoked_at is None
    assert await store.get_key(key.id) == kept
    with pytest.raises(Conflict):
        await store.add_key(key, at(store), True)
    _, twin = issue_key("alice", "marketing", now)
    with pytest.raises(Conflict):  # another id, the same value's hash
        await store.add_key(replace(twin, sha256=key.sha256), at(store), True)
    version, rows = await store.roster_version(), len(await audit_rows(store))
    first = await store.revoke_key(key.id, at(store))
    assert first.revoked_at is not None
    again = await store.revoke_key(key.id, at(store, offset=60))
    assert again.revoked_at == first.revoked_at
    assert await store.roster_version() == version + 1
    assert len(await audit_rows(store)) == rows + 1


async def test_key_listings_page_by_id_per_user_and_team(store):
    await team_and_user(store)
    await store.save_user(UserRecord("bob", "marketing"), at(store), True, True)
    now = time.time()
    alice = sorted([(await store.add_key(issue_key("alice", "m", now)[1], at(store), True)).id for _ in range(7)])
    bob = [(await store.add_key(issue_key("bob", "m", now)[1], at(store), True)).id for _ in range(3)]
    seen, after = [], None
    while True:
        page, after = await store.list_keys("alice", None, 3, after)
        assert len(page) <= 3
        seen += [k.id for k in page]
        if after is None:
            break
    assert seen == alice
    team_keys, more = await store.list_keys(None, "marketing", 100, None)
    assert [k.id for k in team_keys] == sorted(alice + bob) and more is None
    both, _ = await store.list_keys("bob", "marketing", 100, None)
    assert sorted(k.id for k in both) == sorted(bob)
    assert (await store.list_keys("bob", "sales", 100, None))[0] == []
    everything, _ = await store.list_keys(None, None, 100, None)
    assert len(everything) == 10


async def test_touch_keys_moves_last_use_forward_in_bulk_without_a_change(store):
    await team_and_user(store)
    now = time.time()
    keys = [await store.add_key(issue_key("alice", "m", now)[1], at(store), True) for _ in range(3)]
    version, rows = await store.roster_version(), len(await audit_rows(store))
    minute = (now // 60) * 60
    await store.touch_keys({keys[0].id: minute, keys[1].id: minute - 60, "key_unknown": minute})
    await store.touch_keys({keys[1].id: minute - 120, keys[0].id: minute - 600})  # older: ignored
    got = {k.id: k.last_used_at for k in (await store.list_keys("alice", None, 10, None))[0]}
    assert got == {keys[0].id: minute, keys[1].id: minute - 60, keys[2].id: None}
    assert (await store.get_key(keys[0].id)).last_used_at == minute
    assert await store.roster_version() == version and len(await audit_rows(store)) == rows
    await store.touch_keys({})


async def test_no_audit_row_holds_a_key_value_or_its_hash(store):
    await team_and_user(store)
    values = []
    for _ in range(2):
        value, key = issue_key("alice", "marketing", time.time())
        values += [value, key.sha256]
        await store.add_key(key, at(store), True)
        await store.revoke_key(key.id, at(store))
    value, key = issue_key("alice", "marketing", time.time())
    values += [value, key.sha256]
    await store.add_key(key, at(store), True)
    await store.delete_user("alice", at(store))
    stored = await stored_audit_text(store)
    assert key.id in stored and key.prefix in stored  # a key appears by id and prefix
    for secret in values:
        assert secret not in stored


async def test_audit_pages_filter_exactly_and_go_on_after_an_id(store):
    t0 = time.time()
    for i in range(5):
        await store.save_team(TeamRecord(f"team-{i}"), AuditDraft(OPERATOR, t0 + i), True)
    await store.save_team(TeamRecord("team-0", Limits(budget_micros=1)), AuditDraft(user_actor("ann"), t0 + 10), False)
    version = await store.roster_version()
    reload = await store.record_audit(AuditDraft(RELOAD, t0 + 11), CONFIG_RELOAD, CONFIG_TARGET, None, {"teams": 2})
    assert await store.roster_version() == version  # a reload's row is not a roster change
    everything = await audit_rows(store)
    assert everything[-1] == reload and len(everything) == 7
    page, after = await store.audit_page(None, None, None, 4, None)
    rest, end = await store.audit_page(None, None, None, 4, after)
    assert page + rest == everything and end is None
    assert [r.action for r in (await store.audit_page(None, "team:team-0", None, 10, None))[0]] == [
        "team.create",
        "team.update",
    ]
    assert [r.target for r in (await store.audit_page(None, None, "user:ann", 10, None))[0]] == ["team:team-0"]
    assert (await store.audit_page(None, "team:team-0", OPERATOR, 10, None))[0] == everything[:1]
    assert (await store.audit_page(None, "team:team", None, 10, None))[0] == []  # exact, not a prefix
    recent = await collect(store, t0 + 3, None, None)
    assert [r.at for r in recent] == [t0 + 3, t0 + 4, t0 + 10, t0 + 11]
    assert await collect(store, t0 + 100, None, None) == []


async def collect(
    store: Any, since: float | None, target: str | None, actor: str | None, team: str | None = None
) -> list[Any]:
    rows, after = [], None
    while True:
        page, after = await store.audit_page(since, target, actor, 2, after, team)
        rows += page
        if after is None:
            return rows


async def test_a_teams_audit_rows_are_its_own_users_keys_and_itself_read_by_its_index(store):
    t0 = time.time()
    for team in ("red", "blue"):
        await store.save_team(TeamRecord(team), AuditDraft(OPERATOR, t0), True)
    await store.save_user(UserRecord("ann", "red"), AuditDraft(OPERATOR, t0 + 1), True, True)
    key = await store.add_key(issue_key("ann", "red", t0)[1], AuditDraft(OPERATOR, t0 + 2), True)
    for i in range(6):  # blue's rows between: a red listing must not read them
        await store.save_user(UserRecord(f"b{i}", "blue"), AuditDraft(OPERATOR, t0 + 3), True, True)
    await store.save_user(UserRecord("ann", "blue"), AuditDraft(user_actor("ann"), t0 + 4), False, True)  # moved
    reload = ({"kind": "team", "name": "red", "budget_usd": 1.0}, {"kind": "team", "name": "red", "budget_usd": 2.0})
    await store.record_audit(AuditDraft(RELOAD, t0 + 5), CONFIG_RELOAD, CONFIG_TARGET, *reload)
    await store.record_audit(AuditDraft(RELOAD, t0 + 5), CONFIG_RELOAD, CONFIG_TARGET, None, {"upstream": 1})
    red = await collect(store, None, None, None, "red")
    assert [(r.action, r.target) for r in red] == [
        ("team.create", "team:red"),
        ("user.create", "user:ann"),
        ("api_key.create", f"api_key:{key.id}"),
        ("user.update", "user:ann"),  # from red to blue: both teams' row
        ("config.reload", "config"),
    ]
    blue = await collect(store, None, None, None, "blue")
    assert len(blue) == 8 and blue[-1].action == "user.update"
    assert [r.action for r in await collect(store, None, "user:ann", None, "red")] == ["user.create", "user.update"]
    assert [r.action for r in await collect(store, t0 + 2, None, user_actor("ann"), "red")] == ["user.update"]
    assert await collect(store, None, None, None, "green") == []
    first, after = await store.audit_page(None, None, None, 2, None, "red")
    assert [r.target for r in first] == ["team:red", "user:ann"] and after == first[-1].id


async def test_the_roster_loads_whole_and_catches_up_by_changes(store):
    await team_and_user(store)
    now = time.time()
    live = await store.add_key(issue_key("alice", "m", now)[1], at(store), True)
    await store.add_key(issue_key("alice", "m", now, expires_at=now - 1)[1], at(store), True)  # expired
    gone = await store.add_key(issue_key("alice", "m", now)[1], at(store), True)
    await store.revoke_key(gone.id, at(store))
    roster = await store.load_roster()
    assert roster.version == await store.roster_version()
    assert [t.name for t in roster.teams] == ["marketing"] and [u.name for u in roster.users] == ["alice"]
    assert [k.id for k in roster.keys] == [live.id]
    assert (await store.roster_changes_since(roster.version)).version == roster.version
    await store.save_team(TeamRecord("sales"), at(store), True)
    await store.save_user(UserRecord("bob", "sales"), at(store), True, True)
    fresh = await store.add_key(issue_key("bob", "sales", now)[1], at(store), True)
    await store.revoke_key(live.id, at(store))
    await store.delete_user("bob", at(store))
    await store.delete_team("sales", at(store))
    changes = await store.roster_changes_since(roster.version)
    assert changes.version == roster.version + 6
    assert changes.teams == () and changes.users == ()
    assert changes.deleted_teams == ("sales",) and changes.deleted_users == ("bob",)
    assert {k.id: k.revoked_at is not None for k in changes.keys} == {live.id: True, fresh.id: True}
    assert await store.roster_changes_since(changes.version + 1) is None  # ahead of the store
    assert (await store.load_roster()).keys == ()


async def test_the_roster_comes_in_pages_of_live_keys_ending_with_the_changes_made_meanwhile(store, monkeypatch):
    for module in ("gateway.store.sqlite.tenancy_reads", "gateway.store.redis.tenancy_reads"):
        monkeypatch.setattr(f"{module}.PAGE", 2)
    await team_and_user(store)
    now = time.time()
    keys = [await store.add_key(issue_key("alice", "m", now)[1], at(store), True) for _ in range(5)]
    await store.revoke_key(keys[0].id, at(store))
    await store.add_key(issue_key("alice", "m", now, expires_at=now - 1)[1], at(store), True)  # expired
    pages, late = [], None
    async for page in store.roster_pages():
        pages.append(page)
        if late is None:  # made while the pages are read: it comes with the last one
            late = await store.add_key(issue_key("alice", "m", now)[1], at(store), True)
    assert None not in pages
    first, *key_pages, last = pages
    assert ([t.name for t in first.teams], [u.name for u in first.users], first.keys) == (["marketing"], ["alice"], ())
    if isinstance(store, SQLiteStore):  # Redis's HSCAN takes PAGE as a hint (a small hash comes whole)
        assert len(key_pages) >= 3 and all(len(p.keys) <= 2 for p in key_pages)
    paged = {k.id for p in key_pages for k in p.keys}  # the late key too, if read after it was made
    assert {k.id for k in keys[1:]} <= paged <= {k.id for k in keys[1:]} | {late.id}
    assert last.version == await store.roster_version() and late.id in {k.id for k in last.keys}
    whole = await store.load_roster()
    assert sorted(k.id for k in whole.keys) == sorted([late.id] + [k.id for k in keys[1:]])


async def test_a_change_wakes_a_waiter_at_once(store):
    version = await store.roster_version()
    started = time.monotonic()
    assert await store.roster_wait(version, 0.2) == version  # nothing changed: the timeout
    assert time.monotonic() - started >= 0.15
    waiter = asyncio.ensure_future(store.roster_wait(version, 5.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await store.save_team(TeamRecord("marketing"), at(store), True)
    assert await waiter == version + 1
    assert time.monotonic() - started < 1.0
    assert await store.roster_wait(version, 5.0) == version + 1  # already moved: answered at once


async def test_a_change_on_one_replica_wakes_the_other_within_a_second(replicas):
    one, other = replicas
    await team_and_user(one)
    roster = await other.load_roster()
    key = await one.add_key(issue_key("alice", "m", time.time())[1], at(one), True)
    seen = await other.roster_wait(roster.version - 1, 1.0)  # behind: at once
    assert seen == roster.version + 1
    waiter = asyncio.ensure_future(other.roster_wait(seen, 5.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await one.revoke_key(key.id, at(one))
    assert await waiter == seen + 1
    assert time.monotonic() - started < 1.0
    changes = await other.roster_changes_since(roster.version)
    assert [(k.id, k.revoked_at is not None) for k in changes.keys] == [(key.id, True)]


async def test_concurrent_changes_on_two_replicas_chain_their_audit_rows(replicas):
    one, other = replicas
    await one.save_team(TeamRecord("marketing"), at(one), True)

    async def bump(store: RedisStore, n: int) -> None:
        for _ in range(n):
            team = await store.get_team("marketing")
            budget = (team.limits.budget_micros or 0) + 1
            await store.save_team(TeamRecord("marketing", Limits(budget_micros=budget)), at(store), False)

    await asyncio.gather(bump(one, 15), bump(other, 15))
    rows = await audit_rows(one)
    updates = [r for r in rows if r.action == "team.update"]
    assert len(updates) == 30 and await one.roster_version() == 31
    for previous, row in zip(rows, rows[1:], strict=False):
        assert row.before == previous.after  # every change saw the one before it: none was lost


async def test_a_change_run_twice_by_a_retry_counts_once(replicas):
    one, _ = replicas
    plan = Plan(at(one), "team.create", "team:marketing")
    plan.hset.append(["tn:t", "marketing", '{"x": 1}'])
    plan.changed.append("t:marketing")
    body = plan.json()
    first = await one._eval("roster_apply", body)
    second = await one._eval("roster_apply", body)
    assert first == second
    assert await one.roster_version() == 1 and len(await audit_rows(one)) == 1
