"""The console's paths under /console (SPEC §16), each with the roles that may open it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.console import member, operator, team
from gateway.console.pages import TEAM_ROLES, Console, Visit, secured
from gateway.console.signin import SignIn
from gateway.errors import NotFound
from gateway.policy.roles import OPERATOR, TEAM_ADMIN

ADMINS = frozenset({TEAM_ADMIN})
OPERATORS = frozenset({OPERATOR})


async def home(visit: Visit) -> Response:
    """The operator's overview is every team; a member's, its own figures."""
    if visit.viewer.role == OPERATOR:
        return await operator.teams(visit)
    return await member.overview(visit)


async def to_home(request: Request) -> Response:
    return secured(RedirectResponse("/console/", 308))


def no_page(console: Console) -> Callable[[Request], Awaitable[Response]]:
    """Any other path or method under /console: the console's own 404 page, with its headers."""

    async def endpoint(request: Request) -> Response:
        return console.error(request, NotFound("There is no such page in the console.", code="route_not_found"))

    return endpoint


def console_routes() -> list[Route]:
    console = Console()
    signin = SignIn(console)
    page = console.page
    table = [
        ("/console/", page(home), ["GET"]),
        ("/console/sign-in", signin.form, ["GET"]),
        ("/console/sign-in", signin.submit, ["POST"]),
        ("/console/sign-out", page(signin.sign_out), ["POST"]),
        ("/console/tasks", page(member.tasks, TEAM_ROLES), ["GET"]),
        ("/console/tasks/{ref}", page(member.task), ["GET"]),
        ("/console/tasks/{ref}/{variant}", page(member.media, TEAM_ROLES), ["GET"]),
        ("/console/team", page(team.team_page, ADMINS), ["GET"]),
        ("/console/team/keys", page(team.issue, ADMINS), ["POST"]),
        ("/console/team/keys/{key_id}/revoke", page(team.revoke, ADMINS), ["POST"]),
        ("/console/team/keys/{key_id}/rotate", page(team.rotate, ADMINS), ["POST"]),
        ("/console/keys", page(operator.keys, OPERATORS), ["GET"]),
        ("/console/webhooks", page(operator.webhooks, OPERATORS), ["GET"]),
        ("/console/unknown", page(operator.unknown, OPERATORS), ["GET"]),
        ("/console/unknown/{ref}/void", page(operator.void, OPERATORS), ["POST"]),
        ("/console/unknown/{ref}/settle", page(operator.settle, OPERATORS), ["POST"]),
        ("/console/audit", page(operator.audit, OPERATORS), ["GET"]),
        ("/console/reload", page(operator.reload, OPERATORS), ["POST"]),
        ("/console/static/{name}", console.static_file, ["GET"]),
        ("/console", to_home, ["GET"]),
        ("/console/{rest:path}", no_page(console), ["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    return [Route(path, endpoint, methods=methods, name="console" + path) for path, endpoint, methods in table]
