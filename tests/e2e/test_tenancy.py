"""Teams, users and keys at runtime through the real server on SQLite, driven by `tokenhub-gateway admin` as an
operator and a team admin run it (SPEC §15): onboarding in three commands, a video made with the key, the key
revoked and refused, a team admin's reach, and a reload's changes in the audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.e2e.harness import ADMIN_TOKEN, Gateway, body, wait_until

pytestmark = pytest.mark.timeout(90)


def admin_cli(gw: Gateway, *argv: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    """`tokenhub-gateway admin …` against the gateway, the token from GATEWAY_ADMIN_TOKEN."""
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": token}
    command = [sys.executable, "-m", "gateway.cli", "admin", *argv, "--url", gw.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)


def ok_json(gw: Gateway, *argv: str, token: str = ADMIN_TOKEN) -> Any:
    done = admin_cli(gw, *argv, "--json", token=token)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def create(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        gw.api + "/videos/generations", json=body(), headers={"Authorization": f"Bearer {key}"}, timeout=15
    )


def test_a_team_is_onboarded_in_three_commands_and_its_revoked_key_refused(make_gateway):
    gw = make_gateway()
    made = admin_cli(gw, "teams", "create", "green", "--budget-usd", "20", "--requests-per-minute", "30")
    assert made.returncode == 0, made.stderr
    assert "source" in made.stdout and "api" in made.stdout
    assert admin_cli(gw, "users", "create", "gus", "--team", "green", "--email", "gus@example.com").returncode == 0
    issued = ok_json(gw, "keys", "issue", "gus", "--label", "ci")
    created = create(gw, issued["key"])
    assert created.status_code == 200, created.text
    listing = admin_cli(gw, "keys", "list", "--team", "green")
    assert issued["id"] in listing.stdout and issued["key"] not in listing.stdout
    revoked = admin_cli(gw, "keys", "revoke", issued["id"])
    assert (revoked.returncode, revoked.stdout) == (0, f"deleted api_key {issued['id']}\n")
    refused = create(gw, issued["key"])
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    teams = {row["name"]: row for row in gw.admin("GET", "/admin/teams").json()["data"]}
    green = teams["green"]
    assert (teams["red"]["source"], green["source"], green["spent_usd"] + green["reserved_usd"]) == (
        "config",
        "api",
        1.0,
    )
    audit = admin_cli(gw, "audit")
    for action in ("team.create", "user.create", "api_key.create", "api_key.revoke"):
        assert action in audit.stdout
    assert issued["key"] not in audit.stdout
    again = admin_cli(gw, "teams", "create", "green")
    assert again.returncode == 1 and "409 conflict" in again.stderr


def test_a_team_admin_manages_its_team_with_its_own_key_and_nothing_else(make_gateway):
    gw = make_gateway()
    admin_cli(gw, "teams", "create", "green")
    assert admin_cli(gw, "users", "create", "tina", "--team", "green", "--role", "team_admin").returncode == 0
    tina = ok_json(gw, "keys", "issue", "tina")["key"]
    made = ok_json(gw, "users", "create", "rita", "--budget-usd", "1.5", token=tina)
    assert (made["team"], made["role"], made["budget_usd"]) == ("green", "member", 1.5)
    rita = ok_json(gw, "keys", "issue", "rita", token=tina)["key"]
    assert create(gw, rita).status_code == 200
    assert create(gw, gw.user_keys["alice"]).status_code == 200  # red's spend, not tina's to see
    refused = create(gw, rita)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "budget_exceeded")
    assert [row["name"] for row in ok_json(gw, "teams", "list", token=tina)["data"]] == ["green"]
    ledger = httpx.get(gw.url + "/admin/usage", headers={"Authorization": f"Bearer {tina}"}, timeout=15).json()["data"]
    assert {row["team"] for row in ledger} == {"green"} and len(ledger) == 1
    for argv, status in (
        (("teams", "create", "blue2"), "403 permission_denied"),
        (("users", "show", "alice"), "404 not_found"),
    ):
        done = admin_cli(gw, *argv, token=tina)
        assert done.returncode == 1 and status in done.stderr, (argv, done.stderr)
    as_tina = {"Authorization": f"Bearer {tina}"}
    for method, path, status in (
        ("PATCH", "/admin/teams/green", 403),
        ("GET", "/admin/keys", 403),
        ("POST", "/admin/reload", 403),
        ("GET", "/admin/teams/red", 404),
        ("POST", "/admin/users/alice/keys", 404),
    ):
        answer = httpx.request(method, gw.url + path, headers=as_tina, json={"budget_usd": 1000}, timeout=15)
        assert answer.status_code == status, (method, path, answer.text)
    member = httpx.get(gw.url + "/admin/users", headers={"Authorization": f"Bearer {rita}"}, timeout=15)
    assert (member.status_code, member.json()["error"]["code"]) == (403, "permission_denied")
    rows = ok_json(gw, "audit", token=tina)["data"]
    assert [(row["actor"], row["action"], row["target"]) for row in rows] == [
        ("admin", "team.create", "team:green"),
        ("admin", "user.create", "user:tina"),
        ("admin", "api_key.create", rows[2]["target"]),
        ("user:tina", "user.create", "user:rita"),
        ("user:tina", "api_key.create", rows[4]["target"]),
    ]


def test_a_reload_is_audited_and_the_config_wins_a_name_it_now_declares(make_gateway):
    gw = make_gateway()
    admin_cli(gw, "teams", "create", "teal", "--budget-usd", "9")
    admin_cli(gw, "users", "create", "ted", "--team", "teal")
    ted = ok_json(gw, "keys", "issue", "ted")["key"]
    gw.teams["teal"] = {"budget_usd": 3.0}
    gw.teams["red"] = {"budget_usd": 50.0}
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    rows = wait_until(lambda: ok_json(gw, "audit", "--target", "config")["data"])
    assert {(row["actor"], row["action"], row["after"]["name"]) for row in rows} == {
        ("reload", "config.reload", "red"),
        ("reload", "config.reload", "teal"),
    }
    said = wait_until(lambda: [line for line in gw.lines() if line.get("event") == "tenancy.config_wins"])
    assert said[0]["target"] == "team:teal"
    teal = ok_json(gw, "teams", "show", "teal")
    assert (teal["source"], teal["budget_usd"]) == ("config", 3.0)
    assert create(gw, ted).status_code == 200  # the API user, now in the config's team


def test_a_key_issued_to_a_config_user_dies_with_it_and_never_serves_a_new_user_of_its_name(make_gateway):
    """A config user with a key issued through the API leaves the config: its key is refused and revoked, and a
    user made later under its name, in another team or in its own, does not inherit it. The other way round, an
    API user's key does not pass to a config user of the same name a reload adds."""
    gw = make_gateway()
    issued = gw.admin("POST", "/admin/users/alice/keys", json={"label": "laptop"}).json()
    assert create(gw, issued["key"]).status_code == 200
    assert gw.admin("POST", "/admin/teams", json={"name": "ta"}).status_code == 201
    assert gw.admin("POST", "/admin/users", json={"name": "rob", "team": "ta"}).status_code == 201
    rob = gw.admin("POST", "/admin/users/rob/keys", json={}).json()
    assert create(gw, rob["key"]).status_code == 200
    del gw.users["alice"]
    gw.users["rob"] = {"team": "red"}
    gw.user_keys["rob"] = "tgw-test-config-rob-0123456789abcdef"
    gw.write_config()
    assert gw.admin("POST", "/admin/reload").json()["status"] == "reloaded"
    for key in (issued["key"], rob["key"]):
        refused = create(gw, key)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    rows = gw.admin("GET", "/admin/audit", params={"actor": "reload"}).json()["data"]
    assert {row["target"] for row in rows if row["action"] == "api_key.revoke"} == {
        f"api_key:{issued['id']}",
        f"api_key:{rob['id']}",
    }
    spent_before = {
        t["name"]: t["spent_usd"] + t["reserved_usd"] for t in gw.admin("GET", "/admin/teams").json()["data"]
    }
    assert gw.admin("POST", "/admin/users", json={"name": "alice", "team": "ta"}).status_code == 201
    refused = create(gw, issued["key"])
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    assert gw.admin("DELETE", "/admin/users/alice").status_code == 200
    assert gw.admin("POST", "/admin/users", json={"name": "alice", "team": "red"}).status_code == 201
    assert create(gw, issued["key"]).status_code == 401  # nor in its own team
    spent_after = {
        t["name"]: t["spent_usd"] + t["reserved_usd"] for t in gw.admin("GET", "/admin/teams").json()["data"]
    }
    assert spent_after == spent_before
    assert create(gw, gw.user_keys["rob"]).status_code == 200  # the config's rob, with its own key
