"""What a team admin manages (SPEC §15, §16): its team's spend by user, its users and their gateway keys: issue
(the value shown once, with a copy button), revoke, rotate (a new key for the same user, then the old one
revoked). Each change goes through the same role table, store operations, audit rows and roster catch-up as the
admin API's routes (routes/tenancy_keys.py), with the team admin as the audit row's actor."""

from __future__ import annotations

from starlette.responses import RedirectResponse, Response

from gateway.console import figures
from gateway.console.member import member_of
from gateway.console.pages import Visit
from gateway.errors import NotFound, ValidationError
from gateway.policy.roles import MEMBER, Action, Target
from gateway.routes.access import allow, draft
from gateway.routes.tenancy_bodies import key_request
from gateway.routes.tenancy_keys import config_key_view, key_view
from gateway.settings import User
from gateway.tenancy import SOURCE_API, ApiKey, issue_key

KEYS_SHOWN = 500  # keys listed on the page, newest ids last; the admin API pages through the rest
DONE = {"revoked": "The key was revoked: it is refused on every replica within a second."}


async def team_page(visit: Visit) -> Response:
    gateway = visit.gateway
    _, team = member_of(visit)
    period = figures.period_of(team, gateway.clock())
    users = sorted((u for u in gateway.directory.users.values() if u.team == team.name), key=lambda u: u.name)
    keys, more = await gateway.store.list_keys(None, team.name, KEYS_SHOWN, None)
    config_keys = [config_key_view(u) for u in gateway.directory.config_key_users() if u.team == team.name]
    return visit.render(
        "team.html",
        title=f"Team {team.name}",
        period=period,
        by_user=await figures.grouped(gateway, "user", team.name, period.since),
        users=users,
        keys=config_keys + [key_view(gateway, key) for key in keys],
        more_keys=more is not None,
        done=DONE.get(visit.query("done")),
    )


async def issue(visit: Visit) -> Response:
    user = _team_user(visit, visit.form.get("user", ""))
    expires = visit.form.get("expires_days", "").strip()
    body: dict[str, object] = {"label": visit.form.get("label", "").strip() or None}
    if expires:
        if not (expires.isascii() and expires.isdigit() and 0 < int(expires) <= 3650):
            raise ValidationError("Expires in: a whole number of days from 1 to 3650.", param="expires_days")
        body["expires_at"] = int(visit.gateway.clock()) + int(expires) * 86400
    label, expires_at = key_request(body, visit.gateway.clock())
    return await _issued(visit, user, label, expires_at, replaced=None)


async def revoke(visit: Visit) -> Response:
    key = await _team_key(visit, Action.KEY_REVOKE)
    await _revoke(visit, key)
    return RedirectResponse("/console/team?done=revoked", 303)


async def rotate(visit: Visit) -> Response:
    """A new key for the key's user (same label and lifetime left), shown once; then the old one revoked."""
    key = await _team_key(visit, Action.KEY_REVOKE)
    user = _team_user(visit, key.user)
    expires_at = key.expires_at if key.expires_at and key.expires_at > visit.gateway.clock() else None
    response = await _issued(visit, user, key.label, expires_at, replaced=key)
    await _revoke(visit, key)
    return response


async def _issued(
    visit: Visit, user: User, label: str | None, expires_at: float | None, replaced: ApiKey | None
) -> Response:
    gateway = visit.gateway
    allow(visit.viewer.actor, Action.KEY_ISSUE, Target(user.team, user.name, user.role), "user")
    audit = await draft(gateway, visit.viewer.actor)
    value, record = issue_key(user.name, user.team, audit.at, label, expires_at)
    in_store = gateway.directory.user_source(user.name) == SOURCE_API
    kept = await gateway.store.add_key(record, audit, user_in_store=in_store)
    await gateway.roster.catch_up()
    response = visit.render(
        "key_shown.html", title="New key", key=key_view(gateway, kept), value=value, replaced=replaced
    )
    response.headers["Cache-Control"] = "no-store"
    return response


async def _revoke(visit: Visit, key: ApiKey) -> None:
    gateway = visit.gateway
    await gateway.store.revoke_key(key.id, await draft(gateway, visit.viewer.actor))
    await gateway.roster.catch_up()


def _team_user(visit: Visit, name: str) -> User:
    user = visit.gateway.directory.users.get(name.strip())
    if user is None or user.team != visit.viewer.team:
        raise NotFound("No such user in your team.", code="not_found", param="user")
    return user


async def _team_key(visit: Visit, action: Action) -> ApiKey:
    """A key of the viewer's team that the role table lets it touch (another team's is answered as absent)."""
    gateway = visit.gateway
    key = await gateway.store.get_key(visit.request.path_params["key_id"])
    if key is None or key.team != visit.viewer.team:
        raise NotFound("No such key in your team.", code="not_found", param="id")
    owner = gateway.directory.users.get(key.user)
    role = owner.role if owner else MEMBER
    allow(visit.viewer.actor, action, Target(key.team, key.user, role), "key")
    if key.revoked_at is not None:
        raise ValidationError("This key is revoked already.", param="id")
    return key
