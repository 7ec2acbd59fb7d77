"""/admin/teams/{name} and /admin/users*: teams and users made at runtime, beside the config's (SPEC §15).

The config file's teams and users are shown with `source: config` and cannot be changed here (409
managed_by_config); the store's (`source: api`) are created, changed and deleted, each change one store operation
with its audit row, applied to this replica's directory right after it (and to the others' within a second).
The list of teams is GET /admin/teams (routes/admin.py), built from `team_rows` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import Conflict, InvalidJSON, ManagedByConfig, NotFound, ValidationError
from gateway.http.bodies import loads_strict
from gateway.http.request import json_response, read_body
from gateway.policy.quota import Subject
from gateway.policy.roles import Action, Actor, Target
from gateway.routes import tenancy_bodies as bodies
from gateway.routes.access import absent, allow, caller, draft, team_scope
from gateway.routes.generations import usage_figures
from gateway.settings import Team, User
from gateway.store.base import Usage
from gateway.tenancy import SOURCE_API, UserRecord, email_taken, limits_doc

if TYPE_CHECKING:
    from gateway.app import Gateway

ADMIN_MAX_BYTES = 64 * 1024


async def admin_body(request: Request, gateway: Gateway, empty: Any = None) -> Any:
    """A JSON body of at most 64 KiB (413 past it, 400 invalid_json for what is not JSON); `empty` stands for
    no body at all where one is optional."""
    raw = await read_body(request, ADMIN_MAX_BYTES, gateway.settings.server.body_timeout_s)
    if empty is not None and not raw.strip():
        return empty
    try:
        return loads_strict(raw)
    except InvalidJSON:
        raise InvalidJSON("The body must be JSON (an object, each key once).") from None


def unix(moment: float | None) -> int | None:
    return None if not moment else int(moment)


def models_of(gateway: Gateway) -> set[str]:
    return set(gateway.settings.pricing)


# --- teams -----------------------------------------------------------------------------------------------------


def team_row(gateway: Gateway, subject: Subject, usage: Usage) -> dict[str, Any]:
    """A team with its figures for the period (as GET /admin/teams has always shown them), its limits under §6's
    names, and where it is declared."""
    directory = gateway.directory
    record = directory.api_team(subject.name) if directory.team_source(subject.name) == SOURCE_API else None
    limits = subject.limits
    return {
        "object": "team",
        **usage_figures(subject, usage),
        "period_kind": limits.period,
        "models": None if limits.models is None else sorted(limits.models),  # [] allows none: not null
        "alert_thresholds": list(limits.alert_thresholds),
        "source": directory.team_source(subject.name),
        "limits": limits_doc(limits),
        "created_at": unix(record.created_at) if record else None,
        "updated_at": unix(record.updated_at) if record else None,
    }


async def team_rows(gateway: Gateway, only: str | None = None) -> list[dict[str, Any]]:
    """Every team in force (or the one named), config teams first, with figures read in one store call."""
    subjects = tuple(s for s in gateway.directory.team_subjects(gateway.clock()) if only is None or s.name == only)
    figures = await gateway.store.usage(subjects)
    return [team_row(gateway, subject, usage) for subject, usage in zip(subjects, figures, strict=True)]


async def team_answer(gateway: Gateway, name: str, status: int = 200) -> Response:
    rows = await team_rows(gateway, name)
    if not rows:  # deleted meanwhile by another caller
        raise absent("team", name)
    return json_response(rows[0], status)


async def get_team(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    allow(actor, Action.TEAM_READ, Target(team=name), "team", name)
    return await team_answer(gateway, name)


async def create_team(request: Request) -> Response:
    gateway, actor = caller(request)
    allow(actor, Action.TEAM_CREATE)
    team = bodies.new_team(await admin_body(request, gateway), models_of(gateway))
    if team.name in gateway.settings.teams:
        raise Conflict(f"The config file declares a team named {team.name!r}.", param="name")
    await gateway.store.save_team(team, await draft(gateway, actor), create=True)
    await gateway.roster.catch_up()
    return await team_answer(gateway, team.name, 201)


async def change_team(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    allow(actor, Action.TEAM_CHANGE, Target(team=name), "team", name)
    _not_config(name in gateway.settings.teams, "team", name)
    body = await admin_body(request, gateway)
    record = await gateway.store.get_team(name)
    if record is None:
        raise absent("team", name)
    changed = bodies.changed_team(record, body, models_of(gateway))
    await gateway.store.save_team(changed, await draft(gateway, actor), create=False)
    await gateway.roster.catch_up()
    await gateway.settlement.budget_changed("team", name)  # a budget lowered below the spend: its alerts
    return await team_answer(gateway, name)


async def delete_team(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    allow(actor, Action.TEAM_DELETE, Target(team=name), "team", name)
    _not_config(name in gateway.settings.teams, "team", name)
    await gateway.store.delete_team(name, await draft(gateway, actor))
    await gateway.roster.catch_up()
    return json_response({"object": "team", "name": name, "deleted": True})


# --- users -----------------------------------------------------------------------------------------------------


def user_view(gateway: Gateway, user: User) -> dict[str, Any]:
    directory = gateway.directory
    source = directory.user_source(user.name)
    record = directory.api_user(user.name) if source == SOURCE_API else None
    return {
        "object": "user",
        "name": user.name,
        "team": user.team,
        "role": user.role,
        "email": user.email,
        "source": source,
        **limits_doc(user.limits),
        "created_at": unix(record.created_at) if record else None,
        "updated_at": unix(record.updated_at) if record else None,
    }


def known_user(gateway: Gateway, name: str) -> User:
    user = gateway.directory.users.get(name)
    if user is None:
        raise absent("user", name)
    return user


def known_team(gateway: Gateway, name: str) -> Team:
    """A user's team: one that exists (else a 400 naming the field)."""
    team = gateway.directory.teams.get(name)
    if team is None:
        raise ValidationError(f"No team named {name!r}.", param="team")
    return team


async def list_users(request: Request) -> Response:
    gateway, actor = caller(request)
    team = team_scope(actor, request.query_params.get("team"))
    users = sorted(gateway.directory.users.values(), key=lambda user: user.name)
    data = [user_view(gateway, user) for user in users if team is None or user.team == team]
    return json_response({"object": "list", "data": data})


async def get_user(request: Request) -> Response:
    gateway, actor = caller(request)
    user = visible_user(gateway, actor, request.path_params["name"], Action.USER_READ)
    return json_response(user_view(gateway, user))


async def create_user(request: Request) -> Response:
    gateway, actor = caller(request)
    allow(actor, Action.USER_LIST)  # a member is refused before its body is read
    body = await admin_body(request, gateway)
    if not actor.is_operator and isinstance(body, dict) and "team" not in body:
        body = {**body, "team": actor.team}  # a team admin's users are of its team
    fields = bodies.fields_of(body, bodies.USER_FIELDS | {"name"}, ("name", "team"))
    team_name = bodies.checked_name(fields["team"], "team")
    new_role = str(fields.get("role") or "")
    allow(actor, Action.USER_CREATE, Target(team=team_name, new_role=new_role), "team", team_name, "team")
    user = bodies.new_user(fields, models_of(gateway), known_team(gateway, team_name).limits.period)
    if user.name in gateway.settings.users:
        raise Conflict(f"The config file declares a user named {user.name!r}.", param="name")
    await _save_user(gateway, actor, user, create=True)
    return json_response(user_view(gateway, known_user(gateway, user.name)), 201)


async def change_user(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    user = visible_user(gateway, actor, name, Action.USER_READ)
    body = await admin_body(request, gateway)
    fields = bodies.fields_of(body, bodies.USER_FIELDS | {"name"})
    moved_to = bodies.checked_name(fields["team"], "team") if "team" in fields else ""
    target = Target(user.team, name, user.role, str(fields.get("role") or ""), moved_to, frozenset(fields))
    allow(actor, Action.USER_CHANGE, target, "team", moved_to, "team")  # hidden: only another team moved to
    _not_config(name in gateway.settings.users, "user", name)
    record = await gateway.store.get_user(name)
    if record is None:
        raise absent("user", name)
    period = known_team(gateway, moved_to or record.team).limits.period
    await _save_user(gateway, actor, bodies.changed_user(record, fields, models_of(gateway), period), create=False)
    return json_response(user_view(gateway, known_user(gateway, name)))


async def delete_user(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    user = visible_user(gateway, actor, name, Action.USER_READ)
    allow(actor, Action.USER_DELETE, Target(user.team, name, user.role), "user", name)
    _not_config(name in gateway.settings.users, "user", name)
    await gateway.store.delete_user(name, await draft(gateway, actor))
    await gateway.roster.catch_up()
    return json_response({"object": "user", "name": name, "deleted": True})


def visible_user(gateway: Gateway, actor: Actor, name: str, action: Action = Action.USER_READ) -> User:
    """A user the caller may see (another team's is answered as absent)."""
    allow(actor, Action.USER_LIST)  # a member is refused before anything is looked up
    user = known_user(gateway, name)
    allow(actor, action, Target(team=user.team), "user", name)  # the same 404 as for no such user
    return user


async def _save_user(gateway: Gateway, actor: Actor, user: UserRecord, create: bool) -> None:
    """The store checks that no other user of its own holds the e-mail; the config's are checked here."""
    holder = gateway.directory.config_email_user(user.email) if user.email else None
    if holder is not None and holder != user.name:
        raise email_taken()
    in_store = gateway.directory.team_source(user.team) == SOURCE_API
    try:
        await gateway.store.save_user(user, await draft(gateway, actor), create=create, team_in_store=in_store)
    except NotFound as exc:
        if exc.param != "team":
            raise
        raise ValidationError(f"No team named {user.team!r}.", param="team") from None  # deleted meanwhile
    await gateway.roster.catch_up()
    if not create:
        await gateway.settlement.budget_changed("user", user.name)  # a budget lowered below the spend: its alerts


def _not_config(declared: bool, what: str, name: str) -> None:
    if declared:
        raise ManagedByConfig(
            f"The config file declares the {what} {name!r}: change it there and reload.", param="name"
        )
