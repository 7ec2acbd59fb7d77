"""Who calls an admin route, and the role table's verdict turned into an answer (SPEC §15)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from gateway.errors import NotFound, RoleDenied
from gateway.http.request import ctx_of, gw, header
from gateway.policy.roles import Action, Actor, Target, Verdict, decide, list_scope
from gateway.tenancy import AuditDraft

if TYPE_CHECKING:
    from gateway.app import Gateway


def caller(request: Request) -> tuple[Gateway, Actor]:
    """The gateway and who calls: the operator's token, or a user's own gateway key (401 for neither; every
    admin route is 404 when no admin token is configured)."""
    gateway = gw(request)
    actor = gateway.auth.actor(header(request, b"authorization"), gateway.settings.server.admin_token)
    if not actor.is_operator:
        ctx = ctx_of(request)
        ctx.user = actor.user
        ctx.team = actor.team
    return gateway, actor


def operator(request: Request) -> Gateway:
    """The operator alone may go on (upstream keys, webhooks, reloads, resolutions)."""
    gateway, actor = caller(request)
    allow(actor, Action.OPERATE)
    return gateway


def allow(
    actor: Actor, action: Action, target: Target = Target(), what: str = "", name: str = "", param: str = ""
) -> None:
    """Go on, or the refusal the table gives: 403 permission_denied, or for another team's `what` (named `name`)
    the very 404 its absence gives (`absent`)."""
    answer(decide(actor, action, target), what or "resource", name, param)


def answer(verdict: Verdict, what: str, name: str = "", param: str = "") -> None:
    if verdict is Verdict.DENY:
        raise RoleDenied("Your role does not allow this.")
    if verdict is Verdict.HIDE:
        raise absent(what, name, param)


def absent(what: str, name: str = "", param: str = "") -> NotFound:
    """The one answer for a team, user or key that does not exist and for one of another team: the same message
    and `param` (the path's: "name", a key's "id"; or the field or query parameter given), so that no answer
    tells a team admin whether another team's team, user or key exists."""
    if what == "key":
        message, param = f"No key with id {name!r}.", param or "id"
    else:
        message, param = f"No {what} named {name!r}.", param or "name"
    return NotFound(message if name else f"No such {what}.", code="not_found", param=param)


def team_scope(actor: Actor, asked: str | None) -> str | None:
    """The team a listing is narrowed to: the one asked (the operator's choice), a team admin's own; another
    team is answered as absent (404), a member refused (403)."""
    verdict, team = list_scope(actor, asked)
    answer(verdict, "team", asked or "", "team")
    return team


async def draft(gateway: Gateway, actor: Actor) -> AuditDraft:
    """Who makes a change, stamped with the store's clock."""
    return AuditDraft(actor.name, await gateway.store.now())
