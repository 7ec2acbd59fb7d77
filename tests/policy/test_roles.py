"""The admin routes' permission table (SPEC §15): a case per rule, for the operator, a team admin and a member."""

from __future__ import annotations

import pytest

from gateway.policy.roles import MEMBER, TEAM_ADMIN, THE_OPERATOR, Action, Actor, Target, Verdict, decide, list_scope

ALLOW, DENY, HIDE = Verdict.ALLOW, Verdict.DENY, Verdict.HIDE
ADMIN = Actor(TEAM_ADMIN, "ann", "red")  # red's team admin
MEMBER_BOB = Actor(MEMBER, "bob", "red")
OWN_MEMBER = Target("red", "bob", MEMBER)
PEER_ADMIN = Target("red", "amy", TEAM_ADMIN)
SELF = Target("red", "ann", TEAM_ADMIN)
OTHER = Target("blue", "carl", MEMBER)

CASES = [
    # the team admin's own team: reads, its members, their keys and its own
    (Action.TEAM_LIST, Target(), ALLOW),
    (Action.TEAM_READ, Target("red"), ALLOW),
    (Action.USER_LIST, Target(), ALLOW),
    (Action.USER_READ, Target("red"), ALLOW),
    (Action.KEY_LIST, Target(), ALLOW),
    (Action.AUDIT_READ, Target(), ALLOW),
    (Action.USAGE_READ, Target(), ALLOW),
    (Action.USER_CREATE, Target("red", new_role=MEMBER), ALLOW),
    (Action.USER_CREATE, Target("red"), ALLOW),  # no role asked: a member
    (Action.USER_CHANGE, OWN_MEMBER, ALLOW),
    (Action.USER_CHANGE, Target("red", "bob", MEMBER, new_role=MEMBER), ALLOW),
    (Action.USER_CHANGE, Target("red", "bob", MEMBER, new_team="red"), ALLOW),
    (Action.USER_DELETE, OWN_MEMBER, ALLOW),
    (Action.KEY_ISSUE, OWN_MEMBER, ALLOW),
    (Action.KEY_REVOKE, OWN_MEMBER, ALLOW),
    (Action.KEY_ISSUE, SELF, ALLOW),  # rotating its own key
    (Action.KEY_REVOKE, SELF, ALLOW),
    (Action.USER_CHANGE, SELF, ALLOW),
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, fields=frozenset({"email"})), ALLOW),  # its e-mail
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, TEAM_ADMIN, "red", frozenset({"role", "team"})), ALLOW),
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, new_role=TEAM_ADMIN), ALLOW),  # the role it has
    # what its role does not allow: 403
    (Action.TEAM_CREATE, Target("green"), DENY),
    (Action.TEAM_CHANGE, Target("red"), DENY),  # its own team's limits
    (Action.TEAM_DELETE, Target("red"), DENY),  # its own team
    (Action.USER_CREATE, Target("red", new_role=TEAM_ADMIN), DENY),  # another team admin
    (Action.USER_CHANGE, Target("red", "bob", MEMBER, new_role=TEAM_ADMIN), DENY),  # a promotion
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, new_role=MEMBER), DENY),  # its own role
    (Action.USER_CHANGE, PEER_ADMIN, DENY),
    # its own limits are the operator's to set, as its team's are
    *[
        (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, fields=frozenset({"email", limit})), DENY)
        for limit in ("budget_usd", "video_seconds", "period", "requests_per_minute", "max_concurrent_tasks")
    ],
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, fields=frozenset({"models"})), DENY),
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, fields=frozenset({"alert_thresholds"})), DENY),
    (Action.USER_CHANGE, Target("red", "bob", MEMBER, fields=frozenset({"budget_usd"})), ALLOW),  # a member's
    (Action.USER_DELETE, PEER_ADMIN, DENY),
    (Action.USER_DELETE, SELF, DENY),
    (Action.KEY_ISSUE, PEER_ADMIN, DENY),
    (Action.KEY_REVOKE, PEER_ADMIN, DENY),
    (Action.OPERATE, Target(), DENY),  # upstream keys, webhooks, reloads, void/settle
    # another team's things: as if absent
    (Action.TEAM_READ, Target("blue"), HIDE),
    (Action.TEAM_CHANGE, Target("blue"), HIDE),
    (Action.TEAM_DELETE, Target("blue"), HIDE),
    (Action.USER_READ, OTHER, HIDE),
    (Action.USER_CREATE, Target("blue"), HIDE),
    (Action.USER_CHANGE, OTHER, HIDE),
    (Action.USER_DELETE, OTHER, HIDE),
    (Action.KEY_ISSUE, OTHER, HIDE),
    (Action.KEY_REVOKE, OTHER, HIDE),
    (Action.USER_CHANGE, Target("red", "bob", MEMBER, new_team="blue"), HIDE),  # moving a member away
    (Action.USER_CHANGE, Target("red", "ann", TEAM_ADMIN, new_team="blue"), HIDE),
]


@pytest.mark.parametrize("action, target, verdict", CASES, ids=[f"{a.value}-{i}" for i, (a, _, _) in enumerate(CASES)])
def test_a_team_admin_manages_its_own_team_only(action: Action, target: Target, verdict: Verdict):
    assert decide(ADMIN, action, target) is verdict


@pytest.mark.parametrize("action", list(Action))
def test_the_operator_may_do_everything(action: Action):
    for target in (Target(), OWN_MEMBER, PEER_ADMIN, OTHER, Target("red", new_role=TEAM_ADMIN)):
        assert decide(THE_OPERATOR, action, target) is ALLOW


@pytest.mark.parametrize("action", list(Action))
def test_a_member_is_refused_every_admin_route(action: Action):
    for target in (Target(), Target("red", "bob", MEMBER), OTHER):
        assert decide(MEMBER_BOB, action, target) is DENY


@pytest.mark.parametrize(
    "actor, asked, verdict, team",
    [
        (THE_OPERATOR, None, ALLOW, None),  # every team
        (THE_OPERATOR, "blue", ALLOW, "blue"),
        (THE_OPERATOR, "ghost", ALLOW, "ghost"),  # an absent team lists nothing, for the operator to see
        (ADMIN, None, ALLOW, "red"),  # narrowed to its own
        (ADMIN, "red", ALLOW, "red"),
        (ADMIN, "blue", HIDE, "blue"),
        (MEMBER_BOB, None, DENY, None),
        (MEMBER_BOB, "red", DENY, "red"),
    ],
)
def test_listings_are_narrowed_to_a_team_admins_team(
    actor: Actor, asked: str | None, verdict: Verdict, team: str | None
):
    assert list_scope(actor, asked) == (verdict, team)


def test_audit_names_the_operator_and_users_apart():
    assert THE_OPERATOR.name == "admin"
    assert ADMIN.name == "user:ann"
    assert Actor(TEAM_ADMIN, "admin", "red").name == "user:admin"  # a user named admin is not the operator
