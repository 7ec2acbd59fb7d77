"""`tokenhub-gateway admin …` without a gateway: each command's request (method, path, query, body) and how
answers print. The same commands against a running gateway: tests/e2e/test_tenancy.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.admin_cli import cell, change_of, limit_value, list_value, request_of, table
from gateway.cli import parser


def request(*argv: str) -> tuple[str, str, dict | None, object]:
    method, path, query, body, _ = request_of(parser().parse_args(["admin", *argv]))
    return method, path, query, body


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["teams", "list"], ("GET", "/admin/teams", {"team": None}, None)),
        (["teams", "show", "green"], ("GET", "/admin/teams/green", None, None)),
        (
            ["teams", "create", "green", "--budget-usd", "500", "--period", "week", "--models", "a,b"],
            (
                "POST",
                "/admin/teams",
                None,
                {"name": "green", "budget_usd": 500, "period": "week", "models": ["a", "b"]},
            ),
        ),
        (
            ["teams", "change", "green", "--budget-usd", "none", "--alert-thresholds", "0.5,0.9,1"],
            ("PATCH", "/admin/teams/green", None, {"budget_usd": None, "alert_thresholds": [0.5, 0.9, 1]}),
        ),
        (["teams", "change", "green", "--models", "none"], ("PATCH", "/admin/teams/green", None, {"models": None})),
        (["teams", "delete", "green"], ("DELETE", "/admin/teams/green", None, None)),
        (["users", "list", "--team", "green"], ("GET", "/admin/users", {"team": "green"}, None)),
        (
            ["users", "create", "gus", "--team", "green", "--role", "team_admin", "--email", "g@x.io"],
            ("POST", "/admin/users", None, {"name": "gus", "team": "green", "role": "team_admin", "email": "g@x.io"}),
        ),
        (["users", "create", "rita"], ("POST", "/admin/users", None, {"name": "rita"})),  # a team admin's: its team
        (
            ["users", "change", "gus", "--email", "none", "--requests-per-minute", "30"],
            ("PATCH", "/admin/users/gus", None, {"email": None, "requests_per_minute": 30}),
        ),
        (["users", "delete", "gus"], ("DELETE", "/admin/users/gus", None, None)),
        (["keys", "list"], ("GET", "/admin/api-keys", {"user": None, "team": None}, None)),
        (["keys", "list", "--user", "gus"], ("GET", "/admin/api-keys", {"user": "gus", "team": None}, None)),
        (["keys", "issue", "gus"], ("POST", "/admin/users/gus/keys", None, {})),
        (
            ["keys", "issue", "gus", "--label", "ci", "--expires-at", "2031-01-01T00:00:00Z"],
            ("POST", "/admin/users/gus/keys", None, {"label": "ci", "expires_at": "2031-01-01T00:00:00Z"}),
        ),
        (
            ["keys", "issue", "gus", "--expires-at", "1924992000"],
            ("POST", "/admin/users/gus/keys", None, {"expires_at": 1924992000}),
        ),
        (["keys", "revoke", "key_0a1b"], ("DELETE", "/admin/api-keys/key_0a1b", None, None)),
        (["upstream-keys"], ("GET", "/admin/keys", None, None)),
        (
            ["audit", "--target", "team:green", "--limit", "10"],
            (
                "GET",
                "/admin/audit",
                {"since": None, "target": "team:green", "actor": None, "limit": 10, "after": None},
                None,
            ),
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_each_command_is_one_admin_api_call(argv: list[str], expected: tuple):
    assert request(*argv) == expected


def test_the_url_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch):
    assert parser().parse_args(["admin", "teams", "list"]).url == "http://127.0.0.1:8080"
    monkeypatch.setenv("GATEWAY_URL", "http://gw:9000")
    assert parser().parse_args(["admin", "teams", "list"]).url == "http://gw:9000"
    assert parser().parse_args(["admin", "audit", "--url", "http://x:1"]).url == "http://x:1"


@pytest.mark.parametrize(
    "text, value",
    [("5", 5), ("2.5", 2.5), ("none", None), ("Unlimited", None), ("null", None), ("week", "week"), ("-1", -1)],
)
def test_limit_values_are_numbers_null_or_words_for_the_server_to_judge(text: str, value: object):
    assert limit_value(text) == value


def test_lists_are_comma_separated_and_none_clears_them():
    assert list_value("a, b,,c", of_numbers=False) == ["a", "b", "c"]
    assert list_value("0.8,1", of_numbers=True) == [0.8, 1]
    assert list_value("none", of_numbers=True) is None
    assert list_value("", of_numbers=False) == []


def test_tables_line_up_and_show_times_in_utc():
    rows = [
        {"id": "key_1", "created_at": 1924992000, "label": None, "models": ["a", "b"]},
        {"id": "key_22", "created_at": None},
    ]
    assert table(rows, ("id", "created_at", "label", "models")).splitlines() == [
        "id      created_at            label  models",
        "key_1   2031-01-01 00:00:00Z  -      a,b",
        "key_22  -                     -      -",
    ]
    assert table([], ("id",)) == "(none)\n"
    assert (cell(True), cell({"b": 1, "a": 2}), cell(5, "budget_usd")) == ("yes", '{"a":2,"b":1}', "5")


def test_an_audit_row_prints_as_what_changed():
    change = {
        "before": {"name": "g", "budget_usd": 5.0, "period": "day"},
        "after": {"name": "g", "budget_usd": 6.0, "period": "day"},
    }
    assert change_of(change) == "budget_usd: 5.0 → 6.0"
    created = {"before": None, "after": {"id": "key_1", "prefix": "tgw-AbCd"}}
    assert json.loads(change_of(created)) == {"id": "key_1", "prefix": "tgw-AbCd"}


def test_admin_commands_start_without_the_server_the_config_or_the_store():
    """`admin …` talks HTTP only: the CLI imports the rest inside the commands that need it (a fast start)."""
    probe = (
        "import sys\n"
        "from gateway.cli import parser\n"
        "parser().parse_args(['admin', 'teams', 'list'])\n"
        "heavy = ('uvicorn', 'starlette', 'gateway.serve', 'gateway.app', 'gateway.config', 'gateway.store',"
        " 'gateway.routes', 'asyncio')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.strip() == "[]", shown.stdout + shown.stderr
