"""/admin/users/{name}/keys, /admin/api-keys* and /admin/audit: gateway keys as resources, and who changed what
(SPEC §15). A key's value is in one answer only, the one that issues it; the store keeps its SHA-256.

A config user's own key (`key_sha256`) is listed with `source: config` under the id "key_config_NAME"; it cannot
be revoked here (409 managed_by_config): the config file is where it goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ManagedByConfig, ValidationError
from gateway.http.request import int_param, json_response
from gateway.policy.roles import MEMBER, Action, Target
from gateway.routes import ledger
from gateway.routes import tenancy_bodies as bodies
from gateway.routes.access import absent, allow, caller, draft, team_scope
from gateway.routes.tenancy import admin_body, unix, visible_user
from gateway.settings import User
from gateway.tenancy import SOURCE_API, SOURCE_CONFIG, ApiKey, AuditEntry, issue_key

if TYPE_CHECKING:
    from gateway.app import Gateway

CONFIG_KEY_ID = "key_config_"  # + the user's name: never an issued id (those are "key_" + hex)
PAGE_DEFAULT = 100
PAGE_MAX = 1000
MAX_ID = 2**53


def key_view(gateway: Gateway, key: ApiKey) -> dict[str, Any]:
    """A key without its value; last_used_at also counts uses this replica has not written yet."""
    pending = gateway.auth.uses.peek(key.id)
    last_used = max(key.last_used_at or 0.0, pending or 0.0)
    return {
        "id": key.id,
        "object": "api_key",
        "prefix": key.prefix,
        "label": key.label,
        "user": key.user,
        "team": key.team,
        "created_at": unix(key.created_at),
        "expires_at": unix(key.expires_at),
        "last_used_at": unix(last_used),
        "revoked_at": unix(key.revoked_at),
        "source": SOURCE_API,
    }


def config_key_view(user: User) -> dict[str, Any]:
    """A config user's own key: only its hash is known, so no prefix; it lives as long as the config says."""
    return {
        "id": CONFIG_KEY_ID + user.name,
        "object": "api_key",
        "prefix": None,
        "label": None,
        "user": user.name,
        "team": user.team,
        "created_at": None,
        "expires_at": None,
        "last_used_at": None,
        "revoked_at": None,
        "source": SOURCE_CONFIG,
    }


async def issue(request: Request) -> Response:
    gateway, actor = caller(request)
    name = request.path_params["name"]
    user = visible_user(gateway, actor, name)
    allow(actor, Action.KEY_ISSUE, Target(user.team, name, user.role), "user", name)
    label, expires_at = bodies.key_request(await admin_body(request, gateway, empty={}), gateway.clock())
    audit = await draft(gateway, actor)
    value, record = issue_key(name, user.team, audit.at, label, expires_at)
    in_store = gateway.directory.user_source(name) == SOURCE_API
    kept = await gateway.store.add_key(record, audit, user_in_store=in_store)
    await gateway.roster.catch_up()
    shown = key_view(gateway, kept)
    answer = {field: shown[field] for field in ("id", "object", "prefix", "label", "user", "team", "created_at")}
    return json_response({**answer, "key": value, "expires_at": shown["expires_at"]}, 201)


async def list_keys(request: Request) -> Response:
    gateway, actor = caller(request)
    query = request.query_params
    team = team_scope(actor, query.get("team"))
    user = query.get("user") or None
    limit = int_param(query.get("limit"), "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    after = query.get("after") or None
    keys, next_after = await gateway.store.list_keys(user, team, limit, after)
    data = [] if after else [config_key_view(u) for u in _config_users(gateway, user, team)]
    data += [key_view(gateway, key) for key in keys]
    return json_response({"object": "list", "data": data, "has_more": next_after is not None, "next_after": next_after})


async def revoke(request: Request) -> Response:
    gateway, actor = caller(request)
    allow(actor, Action.KEY_LIST)  # a member is refused before anything is looked up
    key_id = request.path_params["id"]
    if key_id.startswith(CONFIG_KEY_ID):
        holder = _config_holder(gateway, key_id)
        allow(actor, Action.KEY_REVOKE, Target(holder.team, holder.name, holder.role), "key", key_id)
        raise ManagedByConfig("This key is the config file's (key_sha256): remove it there and reload.", param="id")
    key = await gateway.store.get_key(key_id)
    if key is None:
        raise absent("key", key_id)
    # A key is its team's, as listed (a key whose user is now of another team is refused, not that team's).
    owner = gateway.directory.users.get(key.user)
    role = owner.role if owner is not None and owner.team == key.team else MEMBER
    allow(actor, Action.KEY_REVOKE, Target(key.team, key.user, role), "key", key_id)
    await gateway.store.revoke_key(key_id, await draft(gateway, actor))
    await gateway.roster.catch_up()
    return json_response({"object": "api_key", "id": key_id, "deleted": True})


def _config_users(gateway: Gateway, user: str | None, team: str | None) -> list[User]:
    found = gateway.directory.config_key_users()
    return [u for u in found if (user is None or u.name == user) and (team is None or u.team == team)]


def _config_holder(gateway: Gateway, key_id: str) -> User:
    holder = gateway.settings.users.get(key_id.removeprefix(CONFIG_KEY_ID))
    if holder is None:
        raise absent("key", key_id)
    return holder


# --- audit -----------------------------------------------------------------------------------------------------


def audit_view(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": unix(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
    }


async def audit(request: Request) -> Response:
    gateway, actor = caller(request)
    allow(actor, Action.AUDIT_READ)
    query = request.query_params
    since = _moment(query.get("since"))
    limit = int_param(query.get("limit"), "limit", PAGE_DEFAULT, 1, PAGE_MAX)
    after = int_param(query.get("after"), "after", 0, 0, MAX_ID) or None
    team = None if actor.is_operator else actor.team  # a team admin's own team alone, read by the team's index
    entries, next_after = await gateway.store.audit_page(
        since, query.get("target") or None, query.get("actor") or None, limit, after, team
    )
    data = [audit_view(entry) for entry in entries]
    return json_response({"object": "list", "data": data, "has_more": next_after is not None, "next_after": next_after})


def _moment(value: str | None) -> float | None:
    """?since=: unix seconds, or an ISO date or date-time (UTC unless it says otherwise)."""
    if not value:
        return None
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else ledger.parse_time(value)
    except (ValueError, OverflowError):
        raise ValidationError("since must be unix seconds or an ISO date or date-time.", param="since") from None
