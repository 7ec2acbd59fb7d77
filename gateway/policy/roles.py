"""Who may do what on the admin routes (SPEC §15): the operator, a team's admin, a member. Pure: a table.

The operator (the admin token) may do everything. A `team_admin` user, with its own gateway key, manages its own
team's `member` users and their keys (its own keys included) and reads its team's figures, ledger and audit; what
belongs to another team is answered as if it did not exist (404), everything else is refused (403). A `member`
calling an admin route is refused (403).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MEMBER = "member"
TEAM_ADMIN = "team_admin"
OPERATOR = "operator"
OPERATOR_ACTOR = "admin"  # how the operator is named in audit rows and in the ledger's resolved_by


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"  # 403 permission_denied
    HIDE = "hide"  # 404: another team's things are answered as if absent


class Action(enum.Enum):
    TEAM_LIST = "team.list"
    TEAM_READ = "team.read"
    TEAM_CREATE = "team.create"
    TEAM_CHANGE = "team.change"
    TEAM_DELETE = "team.delete"
    USER_LIST = "user.list"
    USER_READ = "user.read"
    USER_CREATE = "user.create"
    USER_CHANGE = "user.change"
    USER_DELETE = "user.delete"
    KEY_LIST = "key.list"
    KEY_ISSUE = "key.issue"
    KEY_REVOKE = "key.revoke"
    AUDIT_READ = "audit.read"
    USAGE_READ = "usage.read"
    OPERATE = "operate"  # upstream keys, webhooks, reloads, the void/settle resolutions


# Listings a team admin may read, each narrowed to its own team by the route.
_TEAM_SCOPED_READS = frozenset(
    {Action.TEAM_LIST, Action.USER_LIST, Action.KEY_LIST, Action.AUDIT_READ, Action.USAGE_READ}
)
_USER_ACTIONS = frozenset({Action.USER_CHANGE, Action.USER_DELETE, Action.KEY_ISSUE, Action.KEY_REVOKE})
# What a team admin may set on itself: its e-mail (a name, role or team given only as they are). Its limits are
# the operator's to set, like its team's.
_OWN_FIELDS = frozenset({"email", "name", "role", "team"})


@dataclass(frozen=True, slots=True)
class Actor:
    """Who calls an admin route: the operator, or a user (by its gateway key) with its role and team."""

    role: str  # OPERATOR, TEAM_ADMIN or MEMBER
    user: str = ""
    team: str = ""

    @property
    def name(self) -> str:
        """The audit row's `actor`: "admin" for the operator, "user:NAME" for a user."""
        return OPERATOR_ACTOR if self.role == OPERATOR else f"user:{self.user}"

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR


THE_OPERATOR = Actor(OPERATOR)


@dataclass(frozen=True, slots=True)
class Target:
    """What an action touches: the team it belongs to, the user (and its role now), and what a create or change
    asks for (a role, a team, and the fields a change sets). Empty fields are not part of the action."""

    team: str = ""
    user: str = ""
    role: str = ""
    new_role: str = ""
    new_team: str = ""
    fields: frozenset[str] = frozenset()  # the fields of a change's body (USER_CHANGE)


def decide(actor: Actor, action: Action, target: Target = Target()) -> Verdict:
    if actor.role == OPERATOR:
        return Verdict.ALLOW
    if actor.role != TEAM_ADMIN:
        return Verdict.DENY
    return _team_admin(actor, action, target)


def _team_admin(actor: Actor, action: Action, target: Target) -> Verdict:
    if action in _TEAM_SCOPED_READS:
        return Verdict.ALLOW
    if action in (Action.OPERATE, Action.TEAM_CREATE):
        return Verdict.DENY
    if target.team != actor.team or (target.new_team and target.new_team != actor.team):
        return Verdict.HIDE
    if action in (Action.TEAM_READ, Action.USER_READ):
        return Verdict.ALLOW
    if action in (Action.TEAM_CHANGE, Action.TEAM_DELETE):
        return Verdict.DENY  # its team's limits and existence are the operator's
    if action == Action.USER_CREATE:
        return Verdict.DENY if target.new_role == TEAM_ADMIN else Verdict.ALLOW
    if action in _USER_ACTIONS:
        return _on_user(actor, action, target)
    return Verdict.DENY


def _on_user(actor: Actor, action: Action, target: Target) -> Verdict:
    """A change to a user of its own team, or to that user's keys."""
    if target.user == actor.user:
        if action in (Action.KEY_ISSUE, Action.KEY_REVOKE):
            return Verdict.ALLOW  # rotating its own key
        if action == Action.USER_CHANGE and not _moves(target) and target.fields <= _OWN_FIELDS:
            return Verdict.ALLOW  # its e-mail; never its limits, role or team
        return Verdict.DENY
    if target.role == TEAM_ADMIN or target.new_role == TEAM_ADMIN:
        return Verdict.DENY  # another team admin, or a promotion to one
    return Verdict.ALLOW


def _moves(target: Target) -> bool:
    """A change of role or team (not the ones it has)."""
    return bool(
        (target.new_role and target.new_role != target.role) or (target.new_team and target.new_team != target.team)
    )


def list_scope(actor: Actor, asked: str | None) -> tuple[Verdict, str | None]:
    """A listing's team filter for this actor, and whether it may have it. A team admin's listings are of its
    own team alone: asking for another team is asking for one that does not exist (HIDE)."""
    if actor.is_operator:
        return Verdict.ALLOW, asked
    if actor.role != TEAM_ADMIN:
        return Verdict.DENY, asked
    if asked is not None and asked != actor.team:
        return Verdict.HIDE, asked
    return Verdict.ALLOW, actor.team
