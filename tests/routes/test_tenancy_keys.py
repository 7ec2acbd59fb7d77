"""Gateway keys as resources, a team admin's reach, and a reload's audit, through the app on SQLite and Redis
(SPEC §15): a key's value shown once, rotation, expiry to the second, idempotent revocation, last use to the
minute; a team admin managing its own team alone (403 for the rest, 404 for other teams' things)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import load_settings
from gateway.store.redis.store import RedisStore
from tests.doubles import FakeClock, FakeUpstream, user_table
from tests.routes.tenancy_helpers import ADMIN_TOKEN, ALICE_KEY, MEL_KEY, Tenancy, error_of, tenancy_app

ISSUED_FIELDS = {"id", "object", "key", "prefix", "label", "user", "team", "created_at", "expires_at"}


@pytest.fixture(params=["sqlite", "redis"])
def tn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    yield from tenancy_app(request, tmp_path)


def test_a_key_is_shown_once_and_then_only_by_id_and_prefix(tn: Tenancy):
    tn.team("green")
    tn.user("gus", "green")
    issued = tn.key("gus", label="ci")
    assert set(issued) == ISSUED_FIELDS
    assert issued["key"].startswith("tgw-") and issued["prefix"] == issued["key"][:8]
    assert issued["id"].startswith("key_") and (issued["object"], issued["user"], issued["team"]) == (
        "api_key",
        "gus",
        "green",
    )
    assert (issued["label"], issued["expires_at"]) == ("ci", None)
    listed = tn.ok(tn.op("GET", "/admin/api-keys", params={"user": "gus"}))["data"]
    shown = {k: v for k, v in issued.items() if k != "key"}
    assert listed == [{**shown, "last_used_at": None, "revoked_at": None, "source": "api"}]
    audit = tn.audit()
    assert issued["key"] not in repr(audit) and issued["key"] not in repr(listed)
    assert audit[-1]["target"] == f"api_key:{issued['id']}" and audit[-1]["after"]["prefix"] == issued["prefix"]


def test_a_key_is_rotated_by_issuing_another_and_revoking_the_old(tn: Tenancy):
    old = tn.key("mel")  # a config user may hold API keys besides its own
    new = tn.key("mel", label="rotated")
    for key in (MEL_KEY, old["key"], new["key"]):
        assert tn.create(key).status_code == 200
    revoked = {"object": "api_key", "id": old["id"], "deleted": True}
    assert tn.ok(tn.op("DELETE", f"/admin/api-keys/{old['id']}")) == revoked
    assert tn.ok(tn.op("DELETE", f"/admin/api-keys/{old['id']}")) == revoked  # idempotent
    assert error_of(tn.create(old["key"]))[:2] == (401, "invalid_api_key")
    assert tn.create(new["key"]).status_code == 200
    assert [row["action"] for row in tn.audit(target=f"api_key:{old['id']}")] == ["api_key.create", "api_key.revoke"]
    keys = {k["id"]: k for k in tn.ok(tn.op("GET", "/admin/api-keys", params={"user": "mel"}))["data"]}
    assert keys["key_config_mel"]["source"] == "config" and keys[old["id"]]["revoked_at"] is not None
    assert error_of(tn.op("DELETE", "/admin/api-keys/key_config_mel")) == (409, "managed_by_config", "id")
    assert error_of(tn.op("DELETE", "/admin/api-keys/key_nope")) == (404, "not_found", "id")


def test_a_key_expires_at_its_second_given_as_iso_or_unix(tn: Tenancy):
    now = int(tn.clock.now)
    at_unix = tn.key("mel", expires_at=now + 30)
    iso = datetime.fromtimestamp(now + 60, UTC).isoformat()
    at_iso = tn.key("mel", expires_at=iso)
    assert (at_unix["expires_at"], at_iso["expires_at"]) == (now + 30, now + 60)
    tn.clock.now = now + 29.9
    assert tn.create(at_unix["key"]).status_code == 200
    tn.clock.now = now + 30
    assert error_of(tn.create(at_unix["key"]))[:2] == (401, "invalid_api_key")
    assert tn.create(at_iso["key"]).status_code == 200
    for past in (now + 30, now - 1, "2001-01-01T00:00:00Z", "next week", True, 1e30, {"at": 1}):
        answer = tn.op("POST", "/admin/users/mel/keys", json={"expires_at": past})
        assert error_of(answer) == (400, "invalid_parameter", "expires_at"), past
    for label in ("", "x" * 201, 5, "tab\there"):
        answer = tn.op("POST", "/admin/users/mel/keys", json={"label": label})
        assert error_of(answer) == (400, "invalid_parameter", "label"), label
    assert error_of(tn.op("POST", "/admin/users/mel/keys", json={"value": "tgw-mine"})) == (
        400,
        "invalid_parameter",
        "value",
    )
    assert error_of(tn.op("POST", "/admin/users/ghost/keys", json={})) == (404, "not_found", "name")
    assert tn.ok(tn.op("POST", "/admin/users/mel/keys"), 201)["user"] == "mel"  # no body at all: no label, no expiry


def test_last_use_is_shown_to_the_minute_and_written_in_bulk(tn: Tenancy):
    issued = tn.key("mel")
    minute = 1_900_000_020  # a whole minute
    tn.clock.now = minute + 59.5
    assert tn.create(issued["key"]).status_code == 200
    shown = {k["id"]: k for k in tn.ok(tn.op("GET", "/admin/api-keys"))["data"]}
    assert shown[issued["id"]]["last_used_at"] == minute  # held in memory, not yet written
    gateway = tn.client.app.gateway  # type: ignore[attr-defined]
    tn.client.portal.call(gateway.roster.touch)  # type: ignore[union-attr]  # what the roster loop does every 45 s
    assert gateway.auth.uses.take() == {}
    stored = tn.client.portal.call(gateway.store.get_key, issued["id"])  # type: ignore[union-attr]
    assert stored.last_used_at == minute


def test_a_team_admin_manages_its_own_teams_members_and_keys(tn: Tenancy):
    made = tn.ok(tn.by(ALICE_KEY, "POST", "/admin/users", json={"name": "rita", "budget_usd": 3}), 201)
    assert (made["team"], made["role"]) == ("red", "member")
    issued = tn.ok(tn.by(ALICE_KEY, "POST", "/admin/users/rita/keys", json={"label": "laptop"}), 201)
    assert tn.create(issued["key"]).status_code == 200
    tn.ok(tn.by(ALICE_KEY, "PATCH", "/admin/users/rita", json={"email": "rita@example.com", "budget_usd": 4}))
    own = tn.ok(tn.by(ALICE_KEY, "POST", "/admin/users/alice/keys", json={}), 201)  # its own, for rotation
    assert tn.create(own["key"]).status_code == 200
    tn.ok(tn.by(ALICE_KEY, "DELETE", f"/admin/api-keys/{own['id']}"))
    tn.ok(tn.by(ALICE_KEY, "DELETE", f"/admin/api-keys/{issued['id']}"))
    tn.ok(tn.by(ALICE_KEY, "DELETE", "/admin/users/rita"))
    assert error_of(tn.create(issued["key"]))[:2] == (401, "invalid_api_key")
    assert {row["actor"] for row in tn.audit()} == {"user:alice"}


def test_a_team_admin_sees_its_own_team_alone(tn: Tenancy):
    tn.team("green")
    tn.user("gus", "green")
    other = tn.key("gus")
    assert tn.create(other["key"]).status_code == 200
    assert tn.create(MEL_KEY).status_code == 200
    alice = ALICE_KEY
    assert [t["name"] for t in tn.ok(tn.by(alice, "GET", "/admin/teams"))["data"]] == ["red"]
    assert tn.ok(tn.by(alice, "GET", "/admin/teams/red"))["reserved_usd"] == 1.0
    assert {u["team"] for u in tn.ok(tn.by(alice, "GET", "/admin/users"))["data"]} == {"red"}
    assert {k["team"] for k in tn.ok(tn.by(alice, "GET", "/admin/api-keys"))["data"]} == {"red"}
    assert {row["team"] for row in tn.ok(tn.by(alice, "GET", "/admin/usage"))["data"]} == {"red"}
    grouped = tn.ok(tn.by(alice, "GET", "/admin/usage", params={"group_by": "team"}))["data"]
    assert [row["team"] for row in grouped] == ["red"]
    audit_targets = {row["target"] for row in tn.audit(alice)}
    assert audit_targets == set()  # the operator's changes so far were all green's
    tn.ok(tn.by(alice, "POST", "/admin/users", json={"name": "rita"}), 201)
    assert [row["target"] for row in tn.audit(alice)] == ["user:rita"]
    first = tn.ok(tn.by(alice, "GET", "/admin/audit", params={"limit": 1}))  # green's rows are not even read
    assert ([row["target"] for row in first["data"]], first["has_more"]) == (["user:rita"], False)
    hidden = [
        ("GET", "/admin/teams/green"),
        ("GET", "/admin/users/gus"),
        ("PATCH", "/admin/users/gus"),
        ("DELETE", "/admin/users/gus"),
        ("POST", "/admin/users/gus/keys"),
        ("DELETE", f"/admin/api-keys/{other['id']}"),
        ("GET", "/admin/users?team=green"),
        ("GET", "/admin/api-keys?team=green"),
        ("GET", "/admin/usage?team=green"),
        ("PATCH", "/admin/teams/green"),
        ("DELETE", "/admin/teams/green"),
    ]
    for method, path in hidden:
        assert error_of(tn.by(alice, method, path, json={}))[:2] == (404, "not_found"), (method, path)
    assert tn.create(other["key"]).status_code == 200  # untouched


def test_a_team_admin_is_refused_what_is_the_operators(tn: Tenancy):
    tn.team("green")
    refused: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/admin/teams", {"name": "blue"}),
        ("PATCH", "/admin/teams/red", {"budget_usd": 1000}),
        ("DELETE", "/admin/teams/red", {}),
        ("POST", "/admin/users", {"name": "boss", "role": "team_admin"}),
        ("PATCH", "/admin/users/alice", {"role": "member"}),
        ("GET", "/admin/keys", {}),
        ("GET", "/admin/webhooks", {}),
        ("POST", "/admin/reload", {}),
        ("POST", "/admin/tasks/cgt-1/void", {}),
        ("POST", "/admin/tasks/cgt-1/settle", {"video_seconds": 1}),
    ]
    for method, path, body in refused:
        answer = tn.by(ALICE_KEY, method, path, json=body)
        assert error_of(answer) == (403, "permission_denied", None), (method, path, answer.text)
    tn.user("amy", "red", role="team_admin")
    rita = tn.user("rita", "red")
    for method, path, body in (("PATCH", "/admin/users/amy", {"email": "a@b.io"}), ("DELETE", "/admin/users/amy", {})):
        assert error_of(tn.by(ALICE_KEY, method, path, json=body))[:2] == (403, "permission_denied")
    promoted = tn.by(ALICE_KEY, "PATCH", "/admin/users/rita", json={"role": "team_admin"})
    assert error_of(promoted)[:2] == (403, "permission_denied")
    assert tn.ok(tn.op("GET", "/admin/users/rita")) == rita
    assert [row["action"] for row in tn.audit()] == ["team.create", "user.create", "user.create"]


def test_a_reload_writes_what_it_changed_to_the_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "gateway.toml"
    config: dict[str, Any] = {
        "server": {"admin_token_env": "ADMIN_TOKEN"},
        "upstream": {"base_url": "http://upstream.invalid/api/v1", "keys": [{"name": "k", "value_env": "UP"}]},
        "store": {"url": f"sqlite:///{tmp_path / 'reload.db'}"},
        "teams": {"red": {"budget_usd": 10.0}},
        "users": {"mel": {"team": "red", **user_table(MEL_KEY)}},
    }
    path.write_text(tomli_w.dumps(config))
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("UP", "th-upstream-value-0001")
    clock = FakeClock(time.time())
    app = create_app(load_settings(path), upstream=FakeUpstream(), clock=clock, run_poller=False)
    with TestClient(app, base_url="http://gw") as client:
        tn = Tenancy(client, clock, FakeUpstream())
        tn.team("green")
        config["teams"] = {"red": {"budget_usd": 20.0}, "green": {"budget_usd": 1.0}}  # green: the config wins now
        path.write_text(tomli_w.dumps(config))
        tn.ok(tn.op("POST", "/admin/reload"))
        rows = tn.audit(target="config")
        assert [(r["actor"], r["action"], (r["before"] or {}).get("name"), r["after"]["name"]) for r in rows] == [
            ("admin", "config.reload", None, "green"),
            ("admin", "config.reload", "red", "red"),
        ]
        assert (rows[1]["before"]["budget_usd"], rows[1]["after"]["budget_usd"]) == (10.0, 20.0)
        green = tn.ok(tn.op("GET", "/admin/teams/green"))
        assert (green["source"], green["budget_usd"]) == ("config", 1.0)
        assert error_of(tn.op("DELETE", "/admin/teams/green"))[:2] == (409, "managed_by_config")


class Reloadable(Tenancy):
    """The app started from a config file on SQLite or Redis: `reload(config)` writes it and reloads."""

    config: dict[str, Any]
    path: Path

    def reload(self, users: dict[str, Any], teams: dict[str, Any] | None = None) -> None:
        self.config["users"] = {name: user_table(key, **fields) for name, (key, fields) in users.items()}
        self.config["teams"] = teams or self.config["teams"]
        self.path.write_text(tomli_w.dumps(self.config))
        assert self.ok(self.op("POST", "/admin/reload"))["status"] == "reloaded"


@pytest.fixture(params=["sqlite", "redis"])
def reloadable(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, Any]], Reloadable]]:
    """Started with `users` (name → (key, fields)), teams red and blue."""
    store, url = None, f"sqlite:///{tmp_path / 'reload.db'}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"reload:{uuid.uuid4().hex[:8]}:")
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("UP", "th-upstream-value-0001")
    clients: list[TestClient] = []

    def start(users: dict[str, Any]) -> Reloadable:
        path = tmp_path / "gateway.toml"
        config: dict[str, Any] = {
            "server": {"admin_token_env": "ADMIN_TOKEN"},
            "upstream": {"base_url": "http://upstream.invalid/api/v1", "keys": [{"name": "k", "value_env": "UP"}]},
            "store": {"url": url},
            "teams": {"red": {}, "blue": {}},
            "users": {name: user_table(key, **fields) for name, (key, fields) in users.items()},
        }
        path.write_text(tomli_w.dumps(config))
        clock, upstream = FakeClock(time.time()), FakeUpstream()
        app = create_app(load_settings(path), upstream=upstream, store=store, clock=clock, run_poller=False)
        client = TestClient(app, base_url="http://gw").__enter__()
        clients.append(client)
        tn = Reloadable(client, clock, upstream)
        tn.config, tn.path = config, path
        return tn

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_a_key_issued_to_a_config_user_goes_with_it_and_never_serves_another_user_of_its_name(
    reloadable: Callable[[dict[str, Any]], Reloadable],
):
    admin = (ALICE_KEY, {"team": "red", "role": "team_admin"})
    tn = reloadable(
        {"alice": admin, "mel": (MEL_KEY, {"team": "red"}), "mo": ("tgw-config-key-of-mo", {"team": "red"})}
    )
    mel, mo = tn.key("mel"), tn.key("mo")  # keys issued through the API to config users
    tn.team("ta")
    tn.user("rob", "ta")
    rob = tn.key("rob")  # an API user's, in an API team
    assert all(tn.create(k["key"]).status_code == 200 for k in (mel, mo, rob))
    # mel leaves the config, mo moves to blue, and the config now declares a rob of its own (in red)
    tn.reload(
        {"alice": admin, "mo": ("tgw-config-key-of-mo", {"team": "blue"}), "rob": ("tgw-config-rob", {"team": "red"})}
    )
    for issued in (mel, mo, rob):
        assert error_of(tn.create(issued["key"]))[:2] == (401, "invalid_api_key"), issued["user"]
    revoked = [row for row in tn.audit(actor="reload") if row["action"] == "api_key.revoke"]
    assert sorted(row["target"] for row in revoked) == sorted(f"api_key:{k['id']}" for k in (mel, mo, rob))
    for issued in (mel, mo, rob):
        listed = tn.ok(tn.op("GET", "/admin/api-keys", params={"user": issued["user"]}))["data"]
        assert [k["revoked_at"] is not None for k in listed if k["id"] == issued["id"]] == [True]
    # a new user of mel's name, made by red's team admin in mel's old team, does not get mel's key back
    tn.ok(tn.by(ALICE_KEY, "POST", "/admin/users", json={"name": "mel"}), 201)
    assert error_of(tn.create(mel["key"]))[:2] == (401, "invalid_api_key")
    assert tn.create(tn.key("mel")["key"]).status_code == 200  # a key of its own serves it
    assert tn.create(tn.key("mo")["key"]).status_code == 200  # and so does a new key for mo, in blue


def test_another_teams_key_is_answered_exactly_as_one_that_does_not_exist(tn: Tenancy):
    tn.team("green")
    tn.user("tina", "green", role="team_admin")
    tina = tn.key("tina")["key"]
    mel = tn.key("mel")  # red's
    for there, nobody in (("key_config_mel", "key_config_nobody"), (mel["id"], "key_" + "0" * 24)):
        found = tn.by(tina, "DELETE", f"/admin/api-keys/{there}")
        absent = tn.by(tina, "DELETE", f"/admin/api-keys/{nobody}")
        assert found.status_code == absent.status_code == 404
        error = absent.json()["error"]
        assert found.json() == {"error": {**error, "message": error["message"].replace(nobody, there)}}
        assert error["param"] == "id"
    assert tn.create(mel["key"]).status_code == 200  # untouched
