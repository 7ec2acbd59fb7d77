"""The directory (config over the store's roster) and authentication from it (SPEC §15): keys by SHA-256,
revoked and expired keys refused, the config winning a name clash, changes applied in place, uses to the minute."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.errors import AuthError
from gateway.policy.auth import Authenticator, KeyUses, key_sha256
from gateway.policy.directory import Directory, config_changes, rebound_users
from gateway.settings import Limits, Settings
from gateway.tenancy import ApiKey, Roster, RosterChanges, TeamRecord, UserRecord, issue_key
from tests.doubles import FakeClock, make_settings

NOW = 1_800_000_000.0
ALICE_KEY = "tgw-config-key-of-alice"


def config(**users: dict) -> Settings:
    return make_settings(
        teams={"red": {"budget_usd": 10.0, "period": "day"}, "shared": {}},
        users=users or {"alice": {"team": "red", "key": ALICE_KEY, "role": "team_admin", "email": "a@x.io"}},
    )


def api_key(user: str, team: str, **fields) -> tuple[str, ApiKey]:
    value, key = issue_key(user, team, NOW - 100)
    return value, replace(key, **fields)


def bearer(value: str) -> str:
    return f"Bearer {value}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def roster(*keys: ApiKey, teams=(), users=(), version=1) -> Roster:
    return Roster(version, tuple(teams), tuple(users), tuple(keys))


GREEN = TeamRecord("green", Limits(budget_micros=5_000_000, period="week"))
GUS = UserRecord("gus", "green", "member", None, Limits(period="week"))


def test_config_and_store_keys_both_authenticate_with_their_role_and_limits(clock):
    directory = Directory(config())
    value, key = api_key("gus", "green")
    directory.load(roster(key, teams=[GREEN], users=[GUS]))
    auth = Authenticator(directory, clock)
    user, team = auth.authenticate(bearer(ALICE_KEY))
    assert (user.name, user.role, user.email, team.name, team.limits.budget_micros) == (
        "alice",
        "team_admin",
        "a@x.io",
        "red",
        10_000_000,
    )
    user, team = auth.authenticate(bearer(value))
    assert (user.name, user.role, user.key_sha256, team.name, team.limits.period) == (
        "gus",
        "member",
        "",
        "green",
        "week",
    )
    with pytest.raises(AuthError):
        auth.authenticate(bearer(value + "x"))
    with pytest.raises(AuthError):
        auth.authenticate(bearer(key.sha256))  # the stored hash is not a key


def test_an_expired_key_is_refused_from_its_expiry_second_on(clock):
    directory = Directory(config())
    value, key = api_key("gus", "green", expires_at=NOW + 10)
    directory.load(roster(key, teams=[GREEN], users=[GUS]))
    auth = Authenticator(directory, clock)
    clock.now = NOW + 9.999
    assert auth.authenticate(bearer(value))[0].name == "gus"
    clock.now = NOW + 10
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(bearer(value))
    assert directory.key_count() == 1
    assert directory.sweep(clock.now) == 1  # swept from memory, refused before that too
    assert directory.key_count() == 0


def test_changes_apply_in_place_revocations_deletions_and_moves(clock):
    directory = Directory(config())
    first, one = api_key("gus", "green")
    second, two = api_key("gus", "green")
    directory.load(roster(one, two, teams=[GREEN], users=[GUS], version=4))
    auth = Authenticator(directory, clock)
    blue = TeamRecord("blue", Limits(max_concurrent_tasks=3))
    directory.apply(
        RosterChanges(
            5,
            teams=(blue,),
            users=(replace(GUS, team="blue"),),
            keys=(replace(one, revoked_at=NOW), replace(two, team="blue")),  # the store moves keys with their user
        )
    )
    assert directory.version == 5
    with pytest.raises(AuthError):
        auth.authenticate(bearer(first))
    user, team = auth.authenticate(bearer(second))
    assert (user.team, team.name, team.limits.max_concurrent_tasks) == ("blue", "blue", 3)
    directory.apply(RosterChanges(6, deleted_users=("gus",)))
    with pytest.raises(AuthError):  # a key whose user is gone
        auth.authenticate(bearer(second))
    directory.apply(RosterChanges(7, deleted_teams=("green",)))
    assert set(directory.teams) == {"red", "shared", "blue"}
    directory.load(roster(version=2))  # a store replaced: everything of the store anew
    assert (directory.version, set(directory.teams), directory.key_count()) == (2, {"red", "shared"}, 0)


def test_the_config_wins_a_name_clash_and_the_store_record_returns_when_the_config_drops_it(clock):
    directory = Directory(config())
    shadow = TeamRecord("red", Limits(budget_micros=1))
    bob = UserRecord("alice", "red", "member", None, Limits())  # an API user named like a config user
    value, key = api_key("alice", "red")
    directory.load(roster(key, teams=[shadow], users=[bob]))
    assert directory.clashes() == ["team:red", "user:alice"]
    assert directory.teams["red"].limits.budget_micros == 10_000_000
    assert (directory.team_source("red"), directory.user_source("alice")) == ("config", "config")
    user, _ = Authenticator(directory, clock).authenticate(bearer(value))  # a key issued to the name: the config's user
    assert user.role == "team_admin"
    directory.use_settings(make_settings(teams={"shared": {}}, users={"carol": {"team": "shared", "key": "tgw-c"}}))
    assert directory.clashes() == []
    assert directory.teams["red"].limits.budget_micros == 1
    assert (directory.team_source("red"), directory.users["alice"].role) == ("api", "member")
    with pytest.raises(AuthError):  # the config user's own key went with it
        Authenticator(directory, clock).authenticate(bearer(ALICE_KEY))


def test_an_api_key_serves_its_user_only_in_the_team_it_was_issued_in(clock):
    """A config user moved to another team by a reload, or a user made anew under a name a key was once issued
    to, does not inherit the key: nor does a console sign-in by it (Directory.holder)."""
    directory = Directory(config())
    value, key = api_key("alice", "red")  # issued through the API to the config's alice, of red
    directory.load(roster(key, teams=[GREEN]))
    auth = Authenticator(directory, clock)
    assert auth.authenticate(bearer(value))[0].name == "alice"
    moved = {"alice": {"team": "shared", "key": ALICE_KEY, "role": "team_admin"}}
    directory.use_settings(config(**moved))
    with pytest.raises(AuthError):
        auth.authenticate(bearer(value))
    assert directory.holder(bytes.fromhex(key.sha256)) is None
    assert auth.authenticate(bearer(ALICE_KEY))[1].name == "shared"  # its own key goes where the config says
    directory.use_settings(config(carol={"team": "red", "key": "tgw-carol"}))  # alice gone from the config
    directory.apply(RosterChanges(2, users=(UserRecord("alice", "green", "member", None, Limits()),)))
    with pytest.raises(AuthError):  # a new user of the name, in green: not red's key's holder
        auth.authenticate(bearer(value))
    directory.apply(RosterChanges(3, users=(UserRecord("alice", "red", "member", None, Limits()),)))
    assert auth.authenticate(bearer(value))[0].name == "alice"  # of red again: the store revokes such keys


def test_a_reload_names_the_config_users_whose_api_keys_go():
    old = make_settings(
        teams={"red": {}, "blue": {}},
        users={
            "stays": {"team": "red", "key": "tgw-1"},
            "moves": {"team": "red", "key": "tgw-2"},
            "goes": {"team": "red", "key": "tgw-3"},
            "rekeyed": {"team": "red", "key": "tgw-4"},
        },
    )
    new = make_settings(
        teams={"red": {}, "blue": {}},
        users={
            "stays": {"team": "red", "key": "tgw-1", "budget_usd": 5.0},
            "moves": {"team": "blue", "key": "tgw-2"},
            "rekeyed": {"team": "red", "key": "tgw-44"},
            "comes": {"team": "red", "key": "tgw-5"},
        },
    )
    assert rebound_users(old, new) == ["comes", "goes", "moves"]
    assert rebound_users(old, old) == []


def test_a_user_whose_team_is_gone_is_refused(clock):
    directory = Directory(config())
    value, key = api_key("gus", "green")
    directory.load(roster(key, users=[GUS]))  # green exists nowhere
    with pytest.raises(AuthError):
        Authenticator(directory, clock).authenticate(bearer(value))


def test_team_subjects_cover_config_and_store_teams():
    directory = Directory(config())
    directory.load(roster(teams=[GREEN]))
    subjects = {s.name: s for s in directory.team_subjects(NOW)}
    assert set(subjects) == {"red", "shared", "green"}
    assert subjects["green"].period.startswith("2027-W")  # NOW is in 2027; green counts by week


def test_uses_are_kept_to_the_minute_bounded_and_taken_once(clock):
    directory = Directory(config())
    value, key = api_key("gus", "green")
    directory.load(roster(key, teams=[GREEN], users=[GUS]))
    auth = Authenticator(directory, clock)
    clock.now = 1_800_000_059.0
    auth.authenticate(bearer(value))
    auth.authenticate(bearer(ALICE_KEY))  # a config key has no record to touch
    assert auth.uses.take() == {key.id: 1_800_000_000.0 - 1_800_000_000 % 60}
    assert auth.uses.take() == {}
    uses = KeyUses(limit=2)
    for index in range(5):
        uses.note(f"key_{index}", NOW)
    uses.note("key_0", NOW + 120)  # one held already moves on
    assert uses.take() == {"key_0": NOW + 120 - NOW % 60, "key_1": NOW - NOW % 60}


def test_a_reload_is_described_change_by_change_without_key_values():
    old = config()
    new = make_settings(
        teams={"red": {"budget_usd": 20.0, "period": "day"}, "blue": {}},
        users={"alice": {"team": "red", "key": "tgw-rotated", "role": "team_admin", "email": "a@x.io"}},
        keys={"k": "th-another-upstream-value-0002"},
    )
    changes = config_changes(old, new)
    kinds = [
        (before and before["kind"], after and after["kind"], (after or before)["name"]) for before, after in changes
    ]
    assert kinds == [
        (None, "team", "blue"),
        ("team", "team", "red"),
        ("team", None, "shared"),
        ("user", "user", "alice"),
        ("upstream_key", "upstream_key", "k"),
    ]
    red_before, red_after = changes[1]
    assert (red_before["budget_usd"], red_after["budget_usd"]) == (10.0, 20.0)
    text = repr(changes)
    assert "tgw-rotated" not in text and "th-another-upstream-value-0002" not in text
    alice_before, alice_after = changes[3]
    assert (alice_after["key_changed"], "key_changed" in alice_before) == (True, False)
    assert key_sha256("tgw-rotated")[:12] not in text and key_sha256(ALICE_KEY)[:12] not in text
    assert "key_fingerprint" not in text
    budget_only = make_settings(
        teams={"red": {"budget_usd": 10.0, "period": "day"}, "shared": {}},
        users={"alice": {"team": "red", "key": ALICE_KEY, "role": "team_admin", "email": "b@x.io"}},
    )
    ((before, after),) = config_changes(old, budget_only)
    assert (before["email"], after["email"], after["key_changed"]) == ("a@x.io", "b@x.io", False)
    assert changes[4][1]["key"] == "th-…0002"
    assert config_changes(old, config()) == []


def test_a_roster_loaded_by_pages_beside_the_one_in_force_is_taken_under_the_config_of_now(clock):
    directory = Directory(config())
    old_value, old_key = api_key("gus", "green")
    directory.load(roster(old_key, teams=[GREEN], users=[GUS]))
    loaded = directory.fresh()
    value, key = api_key("gus", "green")
    loaded.apply(RosterChanges(3, teams=(GREEN, TeamRecord("red", Limits(budget_micros=1))), users=(GUS,)))
    loaded.apply(RosterChanges(3, keys=(key,)))
    auth = Authenticator(directory, clock)
    assert auth.authenticate(bearer(old_value))[0].name == "gus"  # the one in force serves on meanwhile
    directory.use_settings(make_settings(teams={"shared": {}}, users={}))  # a reload before the load ends
    directory.take(loaded)
    assert (directory.version, directory.key_count(), set(directory.teams)) == (3, 1, {"shared", "green", "red"})
    assert directory.teams["red"].limits.budget_micros == 1  # the config no longer holds red: the store's
    assert auth.authenticate(bearer(value))[0].name == "gus"
    with pytest.raises(AuthError):  # not in the pages: gone
        auth.authenticate(bearer(old_value))
