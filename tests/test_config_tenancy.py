"""The config file's `role`, `email` and `alert_thresholds` (SPEC §6, §15): read into the settings, and every
bad value reported with its location."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, limits_of
from gateway.settings import DEFAULT_ALERT_THRESHOLDS
from tests.doubles import make_settings

KEY = "tgw-config-tenancy-test-key"


def test_role_email_and_alert_thresholds_are_read_with_their_defaults():
    settings = make_settings(
        teams={"red": {"alert_thresholds": [1.0, 0.5, 0.5]}, "blue": {}},
        users={
            "ann": {
                "team": "red",
                "key": KEY,
                "role": "team_admin",
                "email": "ann@example.com",
                "alert_thresholds": [],
            },
            "bob": {"team": "blue", "key": KEY + "b"},
        },
    )
    assert settings.teams["red"].limits.alert_thresholds == (0.5, 1.0)  # sorted, once each
    assert settings.teams["blue"].limits.alert_thresholds == DEFAULT_ALERT_THRESHOLDS
    ann, bob = settings.users["ann"], settings.users["bob"]
    assert (ann.role, ann.email, ann.limits.alert_thresholds) == ("team_admin", "ann@example.com", ())
    assert (bob.role, bob.email) == ("member", None)


@pytest.mark.parametrize(
    "team, user, where",
    [
        ({"alert_thresholds": [0.5, 1.2]}, {}, "teams.red.alert_thresholds"),
        ({"alert_thresholds": [0]}, {}, "teams.red.alert_thresholds"),
        ({"alert_thresholds": 0.8}, {}, "teams.red.alert_thresholds"),
        ({"alert_thresholds": [0.1] * 11}, {}, "teams.red.alert_thresholds"),
        ({}, {"alert_thresholds": ["0.8"]}, "users.ann.alert_thresholds"),
        ({}, {"role": "owner"}, "users.ann.role"),
        ({}, {"role": 1}, "users.ann.role"),
        ({}, {"email": "ann"}, "users.ann.email"),
        ({}, {"email": "a@b"}, "users.ann.email"),
        ({}, {"email": "x" * 250 + "@example.com"}, "users.ann.email"),
        ({}, {"email": "ann@example.com\u202e"}, "users.ann.email"),  # a right-to-left override
        ({}, {"email": "ann\u0000@example.com"}, "users.ann.email"),
        ({"budget_usd": 1e300}, {}, "teams.red.budget_usd"),  # no exact micro-dollar count: a problem, no crash
        ({"budget_usd": float("inf")}, {}, "teams.red.budget_usd"),
        ({"budget_usd": float("nan")}, {}, "teams.red.budget_usd"),
        ({}, {"budget_usd": 1_000_000_001}, "users.ann.budget_usd"),
        ({"role": "team_admin"}, {}, "teams.red.role"),  # a team has no role
    ],
)
def test_a_bad_value_is_a_problem_at_its_location(team: dict, user: dict, where: str):
    with pytest.raises(ConfigError) as caught:
        make_settings(teams={"red": team}, users={"ann": {"team": "red", "key": KEY, **user}})
    assert any(problem.startswith(where + ":") for problem in caught.value.problems), caught.value.problems


def test_limits_from_an_api_body_mean_what_they_mean_in_the_file():
    limits, problems = limits_of({"budget_usd": 2.5, "period": "week", "alert_thresholds": [0.9]}, {"m"})
    assert (limits.budget_micros, limits.period, limits.alert_thresholds, problems) == (2_500_000, "week", (0.9,), [])
    _, problems = limits_of({"budget_usd": -1, "models": ["x"]}, {"m"}, period="day")
    assert [problem.split(":")[0] for problem in problems] == ["budget_usd", "models"]
    assert limits_of({}, {"m"}, period="day")[0].period == "day"  # a user's default: its team's


def test_no_two_config_users_hold_one_email_whatever_its_case():
    users = {
        "ann": {"team": "red", "key": KEY, "email": "Ann@Example.com"},
        "bob": {"team": "red", "key": KEY + "b", "email": "bob@example.com"},
        "cy": {"team": "red", "key": KEY + "c", "email": "ann@example.COM"},
    }
    with pytest.raises(ConfigError) as caught:
        make_settings(teams={"red": {}}, users=users)
    assert caught.value.problems == ["users.cy.email: the same e-mail (in any case) is already used by users.ann"]
    users["cy"]["email"] = "cy@example.com"
    assert make_settings(teams={"red": {}}, users=users).users["cy"].email == "cy@example.com"


def test_a_budget_is_read_up_to_a_billion_dollars_exactly():
    settings = make_settings(teams={"red": {"budget_usd": 1_000_000_000}}, users={})
    assert settings.teams["red"].limits.budget_micros == 10**15
    _, problems = limits_of({"budget_usd": 1e300}, {"m"})
    assert [problem.split(":")[0] for problem in problems] == ["budget_usd"]
