"""/admin/teams and /admin/users through the app, on SQLite and on Redis (SPEC §15): teams and users made at
runtime beside the config's, their limits in force at once, every bad input a 400 naming its field and changing
nothing, the config's entries read-only, and every change in the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.routes.tenancy_helpers import ALICE_KEY, MEL_KEY, Tenancy, error_of, tenancy_app

LIMITS = {
    "budget_usd": None,
    "video_seconds": None,
    "period": "month",
    "requests_per_minute": None,
    "max_concurrent_tasks": None,
    "models": None,
    "alert_thresholds": [0.8, 1.0],
}


@pytest.fixture(params=["sqlite", "redis"])
def tn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    yield from tenancy_app(request, tmp_path)


def test_a_team_is_created_read_changed_listed_and_deleted(tn: Tenancy):
    made = tn.team("green", budget_usd=5, video_seconds=600, period="week", models=["doubao-seedance-2.0-fast"])
    assert made["name"] == "green" and made["source"] == "api" and made["object"] == "team"
    assert (made["budget_usd"], made["remaining_usd"], made["spent_usd"], made["period_kind"]) == (
        5.0,
        5.0,
        0.0,
        "week",
    )
    assert made["limits"] == {
        **LIMITS,
        "budget_usd": 5.0,
        "video_seconds": 600,
        "period": "week",
        "models": ["doubao-seedance-2.0-fast"],
    }
    assert tn.ok(tn.op("GET", "/admin/teams/green")) == made
    changed = tn.ok(tn.op("PATCH", "/admin/teams/green", json={"budget_usd": 7.5, "models": None, "period": "day"}))
    assert changed["limits"] == {**made["limits"], "budget_usd": 7.5, "models": None, "period": "day"}
    listed = {row["name"]: row for row in tn.ok(tn.op("GET", "/admin/teams"))["data"]}
    assert (listed["red"]["source"], listed["green"]["source"]) == ("config", "api")
    assert listed["green"] == changed
    assert tn.ok(tn.op("DELETE", "/admin/teams/green")) == {"object": "team", "name": "green", "deleted": True}
    assert error_of(tn.op("GET", "/admin/teams/green")) == (404, "not_found", "name")
    assert [row["name"] for row in tn.ok(tn.op("GET", "/admin/teams"))["data"]] == ["red"]


def test_a_user_made_through_the_api_creates_with_its_key_and_its_limits_in_force_at_once(tn: Tenancy):
    tn.team("green", budget_usd=1.5)
    gus = tn.user("gus", "green", email="gus@example.com")
    assert gus == {
        "object": "user",
        "name": "gus",
        "team": "green",
        "role": "member",
        "email": "gus@example.com",
        "source": "api",
        **LIMITS,
        "created_at": gus["created_at"],
        "updated_at": gus["updated_at"],
    }
    key = tn.key("gus")["key"]
    assert tn.create(key).status_code == 200  # $1.00 of the $1.50
    assert error_of(tn.create(key))[:2] == (429, "budget_exceeded")
    tn.ok(tn.op("PATCH", "/admin/teams/green", json={"budget_usd": 10}))
    assert tn.create(key).status_code == 200  # the new limit, in force with the answer that set it
    tn.ok(tn.op("PATCH", "/admin/users/gus", json={"max_concurrent_tasks": 2}))
    assert error_of(tn.create(key))[:2] == (429, "concurrency_limit_exceeded")
    usage = tn.ok(tn.by(key, "GET", "/v1/usage"))
    assert (
        usage["user"]["name"],
        usage["team"]["name"],
        usage["team"]["spent_usd"] + usage["team"]["reserved_usd"],
    ) == (
        "gus",
        "green",
        2.0,
    )


def test_a_users_period_is_its_teams_unless_set(tn: Tenancy):
    assert tn.user("ursula", "red")["period"] == "day"  # red counts by day
    assert tn.user("vic", "red", period="week")["period"] == "week"
    tn.team("green", period="total")
    moved = tn.ok(tn.op("PATCH", "/admin/users/ursula", json={"team": "green", "period": None}))
    assert (moved["team"], moved["period"]) == ("green", "total")


def test_users_list_by_team_and_deleting_one_revokes_its_keys(tn: Tenancy):
    tn.team("green")
    tn.user("gus", "green")
    tn.user("gil", "green", role="team_admin")
    tn.user("ron", "red")
    listed = tn.ok(tn.op("GET", "/admin/users", params={"team": "green"}))["data"]
    assert [(u["name"], u["role"], u["source"]) for u in listed] == [
        ("gil", "team_admin", "api"),
        ("gus", "member", "api"),
    ]
    everyone = [(u["name"], u["source"]) for u in tn.ok(tn.op("GET", "/admin/users"))["data"]]
    assert everyone == [("alice", "config"), ("gil", "api"), ("gus", "api"), ("mel", "config"), ("ron", "api")]
    keys = [tn.key("gus")["key"], tn.key("gus", label="second")["key"]]
    assert all(tn.create(key).status_code == 200 for key in keys)
    assert tn.ok(tn.op("DELETE", "/admin/users/gus")) == {"object": "user", "name": "gus", "deleted": True}
    assert all(error_of(tn.create(key))[:2] == (401, "invalid_api_key") for key in keys)
    revoked = tn.ok(tn.op("GET", "/admin/api-keys", params={"user": "gus"}))["data"]
    assert len(revoked) == 2 and all(key["revoked_at"] for key in revoked)
    assert error_of(tn.op("GET", "/admin/users/gus")) == (404, "not_found", "name")
    assert error_of(tn.op("DELETE", "/admin/teams/green")) == (409, "team_not_empty", "name")
    tn.ok(tn.op("DELETE", "/admin/users/gil"))
    tn.ok(tn.op("DELETE", "/admin/teams/green"))


BAD_TEAMS = [
    ({"name": "Green"}, "name"),
    ({"name": "-green"}, "name"),
    ({"name": "g" * 64}, "name"),
    ({"name": 5}, "name"),
    ({}, "name"),
    ({"name": "green", "budget_usd": -1}, "budget_usd"),
    ({"name": "green", "budget_usd": "10"}, "budget_usd"),
    ({"name": "green", "budget_usd": True}, "budget_usd"),
    ({"name": "green", "budget_usd": 1e12}, "budget_usd"),
    ({"name": "green", "budget_usd": 1e300}, "budget_usd"),  # no exact micro-dollar count: a 400, not a 500
    ({"name": "green", "video_seconds": 1.5}, "video_seconds"),
    ({"name": "green", "requests_per_minute": 0}, "requests_per_minute"),
    ({"name": "green", "max_concurrent_tasks": -2}, "max_concurrent_tasks"),
    ({"name": "green", "period": "year"}, "period"),
    ({"name": "green", "models": ["sora-3"]}, "models"),
    ({"name": "green", "models": "doubao-seedance-2.0"}, "models"),
    ({"name": "green", "alert_thresholds": [0.5, 1.5]}, "alert_thresholds"),
    ({"name": "green", "alert_thresholds": [0]}, "alert_thresholds"),
    ({"name": "green", "alert_thresholds": 0.8}, "alert_thresholds"),
    ({"name": "green", "colour": "green"}, "colour"),
]


@pytest.mark.parametrize("body, param", BAD_TEAMS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_TEAMS)])
def test_a_bad_team_body_is_a_400_naming_its_field_and_makes_nothing(tn: Tenancy, body: dict, param: str):
    assert error_of(tn.op("POST", "/admin/teams", json=body)) == (400, "invalid_parameter", param)
    assert [row["name"] for row in tn.ok(tn.op("GET", "/admin/teams"))["data"]] == ["red"]
    assert tn.audit() == []


BAD_USERS = [
    ({"name": "gus", "team": "nowhere"}, "team"),
    ({"name": "gus"}, "team"),
    ({"name": "gus", "team": "red", "role": "owner"}, "role"),
    ({"name": "gus", "team": "red", "email": "not-an-address"}, "email"),
    ({"name": "gus", "team": "red", "email": 5}, "email"),
    ({"name": "gus", "team": "red", "email": "gus@example.com\u202e"}, "email"),  # a right-to-left override
    ({"name": "gus", "team": "red", "email": "gus@example.com\n"}, "email"),
    ({"name": "gus", "team": "red", "email": "g\u200bus@example.com"}, "email"),  # a zero-width space
    ({"name": "gus", "team": "red", "budget_usd": 1e300}, "budget_usd"),
    ({"name": "gus", "team": "red", "budget_usd": -0.01}, "budget_usd"),
    ({"name": "gus", "team": "red", "key_sha256": "0" * 64}, "key_sha256"),
    ({"name": "Gus", "team": "red"}, "name"),
]


@pytest.mark.parametrize("body, param", BAD_USERS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_USERS)])
def test_a_bad_user_body_is_a_400_naming_its_field_and_makes_nothing(tn: Tenancy, body: dict, param: str):
    assert error_of(tn.op("POST", "/admin/users", json=body)) == (400, "invalid_parameter", param)
    assert error_of(tn.op("GET", "/admin/users/gus")) == (404, "not_found", "name")
    assert tn.audit() == []


def test_a_bad_change_changes_nothing(tn: Tenancy):
    made = tn.team("green", budget_usd=5)
    for body, param in (
        ({"budget_usd": -5}, "budget_usd"),
        ({"budget_usd": 6, "bogus": 1}, "bogus"),
        ({"name": "x"}, "name"),
    ):
        assert error_of(tn.op("PATCH", "/admin/teams/green", json=body)) == (400, "invalid_parameter", param)
    assert tn.ok(tn.op("GET", "/admin/teams/green")) == made
    tn.user("gus", "green")
    assert error_of(tn.op("PATCH", "/admin/users/gus", json={"team": "nowhere"})) == (400, "invalid_parameter", "team")
    assert error_of(tn.op("PATCH", "/admin/users/ghost", json={})) == (404, "not_found", "name")
    assert error_of(tn.op("PATCH", "/admin/teams/ghost", json={})) == (404, "not_found", "name")
    assert [row["action"] for row in tn.audit()] == ["team.create", "user.create"]


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"{", 400, "invalid_json"),
        (b"not json", 400, "invalid_json"),
        (b'{"name": "a", "name": "b"}', 400, "invalid_json"),
        (b"[]", 400, "invalid_parameter"),
        (b'"green"', 400, "invalid_parameter"),
        (b'{"name": "green", "pad": "' + b" " * 65536 + b'"}', 413, "body_too_large"),
    ],
    ids=["cut", "text", "repeated-key", "array", "string", "over-64-KiB"],
)
def test_a_body_that_is_not_one_small_json_object_is_refused(tn: Tenancy, raw: bytes, status: int, code: str):
    answer = tn.op("POST", "/admin/teams", content=raw, headers={"Content-Type": "application/json"})
    assert error_of(answer)[:2] == (status, code)
    assert tn.audit() == []


def test_the_configs_teams_and_users_are_read_only_and_their_names_taken(tn: Tenancy):
    for method, path in (("PATCH", "/admin/teams/red"), ("DELETE", "/admin/teams/red")):
        assert error_of(tn.op(method, path, json={"budget_usd": 1})) == (409, "managed_by_config", "name")
    for method, path in (("PATCH", "/admin/users/mel"), ("DELETE", "/admin/users/mel")):
        assert error_of(tn.op(method, path, json={"budget_usd": 1})) == (409, "managed_by_config", "name")
    assert error_of(tn.op("POST", "/admin/teams", json={"name": "red"})) == (409, "conflict", "name")
    assert error_of(tn.op("POST", "/admin/users", json={"name": "mel", "team": "red"})) == (409, "conflict", "name")
    tn.team("green")
    assert error_of(tn.op("POST", "/admin/teams", json={"name": "green"}))[:2] == (409, "conflict")
    tn.user("gus", "green")
    assert error_of(tn.op("POST", "/admin/users", json={"name": "gus", "team": "red"}))[:2] == (409, "conflict")
    assert tn.ok(tn.op("GET", "/admin/users/mel"))["source"] == "config"
    assert tn.create(MEL_KEY).status_code == 200  # untouched
    assert [row["action"] for row in tn.audit()] == ["team.create", "user.create"]


def test_every_change_is_audited_with_who_what_before_and_after(tn: Tenancy):
    tn.team("green", budget_usd=5)
    tn.ok(tn.op("PATCH", "/admin/teams/green", json={"budget_usd": 6}))
    tn.user("gus", "green")
    tn.ok(tn.by(ALICE_KEY, "POST", "/admin/users", json={"name": "rita"}), 201)  # red's team admin, in red
    tn.ok(tn.op("DELETE", "/admin/users/gus"))
    rows = tn.audit()
    assert [(r["actor"], r["action"], r["target"]) for r in rows] == [
        ("admin", "team.create", "team:green"),
        ("admin", "team.update", "team:green"),
        ("admin", "user.create", "user:gus"),
        ("user:alice", "user.create", "user:rita"),
        ("admin", "user.delete", "user:gus"),
    ]
    assert (rows[1]["before"]["budget_usd"], rows[1]["after"]["budget_usd"]) == (5.0, 6.0)
    assert rows[0]["before"] is None and rows[4]["after"] is None
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert [r["target"] for r in tn.audit(target="team:green")] == ["team:green", "team:green"]
    assert [r["target"] for r in tn.audit(actor="user:alice")] == ["user:rita"]
    assert tn.audit(target="team:gree") == []  # exact, not a prefix
    first = tn.ok(tn.op("GET", "/admin/audit", params={"limit": 2}))
    assert first["has_more"] and len(first["data"]) <= 2
    assert tn.audit(since=str(rows[0]["at"] + 3600)) == []
    assert error_of(tn.op("GET", "/admin/audit", params={"since": "yesterday"})) == (400, "invalid_parameter", "since")
    assert error_of(tn.op("GET", "/admin/audit", params={"limit": "0"})) == (400, "invalid_parameter", "limit")


def test_admin_routes_need_a_token_or_a_team_admins_key(tn: Tenancy):
    assert error_of(tn.by("wrong", "GET", "/admin/users"))[:2] == (401, "invalid_api_key")
    assert error_of(tn.client.get("/admin/teams"))[:2] == (401, "invalid_api_key")
    for method, path in (("GET", "/admin/users"), ("GET", "/admin/teams"), ("POST", "/admin/users/mel/keys")):
        assert error_of(tn.by(MEL_KEY, method, path)) == (403, "permission_denied", None)


def test_a_deleted_teams_name_is_not_given_to_a_new_team(tn: Tenancy):
    """A new team of that name would inherit the deleted one's tasks, spend and ledger rows."""
    tn.team("green", budget_usd=5)
    tn.user("gus", "green")
    key = tn.key("gus")["key"]
    assert tn.create(key).status_code == 200
    tn.ok(tn.op("DELETE", "/admin/users/gus"))
    tn.ok(tn.op("DELETE", "/admin/teams/green"))
    rows = tn.audit()
    assert error_of(tn.op("POST", "/admin/teams", json={"name": "green"})) == (409, "conflict", "name")
    assert error_of(tn.op("GET", "/admin/teams/green")) == (404, "not_found", "name")
    assert tn.audit() == rows
    assert tn.team("green-2")["spent_usd"] == 0.0


def test_an_email_is_one_users_whatever_its_case_config_or_store(tn: Tenancy):
    """A console signs a user in by its e-mail: two users holding one would make the sign-in ambiguous."""
    tn.team("green")
    tn.user("gus", "green", email="Gus@Example.com")
    tn.user("gil", "green")
    rows = tn.audit()
    for body in (
        {"name": "cy", "team": "green", "email": "gus@example.COM"},  # the store's gus
        {"name": "cy", "team": "green", "email": "ALICE@example.com"},  # the config's alice
    ):
        assert error_of(tn.op("POST", "/admin/users", json=body)) == (409, "conflict", "email"), body
    for email in ("GUS@example.com", "alice@EXAMPLE.com"):
        assert error_of(tn.op("PATCH", "/admin/users/gil", json={"email": email})) == (409, "conflict", "email")
    made = tn.by(ALICE_KEY, "POST", "/admin/users", json={"name": "decoy", "email": "gus@example.com"})
    assert error_of(made) == (409, "conflict", "email")  # a team admin cannot take another team's e-mail
    assert "gus" not in made.json()["error"]["message"]  # nor learn whose it is
    assert tn.audit() == rows and tn.ok(tn.op("GET", "/admin/users/gil"))["email"] is None
    tn.ok(tn.op("PATCH", "/admin/users/gus", json={"email": "GUS@example.com"}))  # its own, in another case
    tn.ok(tn.op("PATCH", "/admin/users/gus", json={"email": None}))
    assert tn.ok(tn.op("PATCH", "/admin/users/gil", json={"email": "gus@example.com"}))["email"] == "gus@example.com"


def test_a_member_is_refused_before_its_body_is_read(tn: Tenancy):
    for raw in (b"not json", b'{"name": "x", "bogus": 1}', b"[]"):
        answer = tn.by(MEL_KEY, "POST", "/admin/users", content=raw, headers={"Content-Type": "application/json"})
        assert error_of(answer) == (403, "permission_denied", None), raw


def test_a_team_allowed_no_model_shows_an_empty_list_not_null(tn: Tenancy):
    made = tn.team("green", models=[])
    assert (made["models"], made["limits"]["models"]) == ([], [])
    listed = {row["name"]: row for row in tn.ok(tn.op("GET", "/admin/teams"))["data"]}
    assert (listed["green"]["models"], listed["red"]["models"]) == ([], None)


def test_a_team_admin_changes_its_own_email_and_nothing_else_of_itself(tn: Tenancy):
    for body in ({"budget_usd": 99999}, {"budget_usd": None}, {"max_concurrent_tasks": 100}, {"period": "total"}):
        answer = tn.by(ALICE_KEY, "PATCH", "/admin/users/alice", json={"email": "al@example.com", **body})
        assert error_of(answer) == (403, "permission_denied", None), body
    assert tn.audit() == []
    tn.user("amber", "red", role="team_admin", budget_usd=1)
    amber = tn.key("amber")["key"]
    assert error_of(tn.by(amber, "PATCH", "/admin/users/amber", json={"budget_usd": 99999}))[0] == 403
    changed = tn.ok(tn.by(amber, "PATCH", "/admin/users/amber", json={"email": "amber@example.com"}))
    assert (changed["email"], changed["budget_usd"]) == ("amber@example.com", 1.0)


def test_another_teams_user_is_answered_exactly_as_one_that_does_not_exist(tn: Tenancy):
    tn.team("green")
    tn.user("gus", "green")
    for method, path in (
        ("GET", "/admin/users/{}"),
        ("PATCH", "/admin/users/{}"),
        ("DELETE", "/admin/users/{}"),
        ("POST", "/admin/users/{}/keys"),
    ):
        there = tn.by(ALICE_KEY, method, path.format("gus"), json={})
        nobody = tn.by(ALICE_KEY, method, path.format("nobody"), json={})
        assert there.status_code == nobody.status_code == 404
        assert there.json() == _named(nobody.json(), "nobody", "gus"), (method, path)


def _named(answer: dict, name: str, instead: str) -> dict:
    """An error answer with the name it was asked about replaced."""
    error = answer["error"]
    return {"error": {**error, "message": error["message"].replace(repr(name), repr(instead))}}
