"""What every console page shares: who is looking (or a redirect to the sign-in form), the role a page needs, the
CSRF check of every form, templates, error pages, and the security headers on every answer (SPEC §16).

A handler is `async def f(visit: Visit) -> Response`; `Console.page(f, roles)` makes it an endpoint. Errors of
the gateway's tree become HTML pages with their status; nothing a form posts changes anything unless its CSRF
token is the session's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from gateway.console import fmt
from gateway.console.sessions import COOKIE, Networks, Viewer, csrf_ok, current, over_https, set_cookie, trusted_peer
from gateway.console.throttle import SignInThrottle
from gateway.errors import GatewayError, NotFound, RoleDenied, ValidationError
from gateway.http.request import ctx_of, gw, read_body
from gateway.policy.roles import MEMBER, OPERATOR, TEAM_ADMIN

if TYPE_CHECKING:
    from gateway.app import Gateway

EVERYONE = frozenset({MEMBER, TEAM_ADMIN, OPERATOR})
TEAM_ROLES = frozenset({MEMBER, TEAM_ADMIN})
FORM_MAX_BYTES = 16 * 1024
FORM_MAX_FIELDS = 20
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

Handler = Callable[["Visit"], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class FormRefused(GatewayError):
    """A form without the session's CSRF token, or posted from another origin: nothing was changed."""

    status = 403
    type = "invalid_request_error"
    code = "csrf_failed"


@dataclass
class Visit:
    """One request to a page: the gateway, who is looking, the form it posted (POST), and the renderer."""

    request: Request
    gateway: Gateway
    viewer: Viewer
    console: Console
    form: Mapping[str, str] = field(default_factory=dict)

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        return self.console.render(self.request, template, status, viewer=self.viewer, **context)

    def query(self, name: str) -> str:
        return self.request.query_params.get(name, "").strip()


class Console:
    """The console's templates, static files and sign-in throttle: made once per app."""

    def __init__(self) -> None:
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.console", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(fmt.FILTERS)
        self.templates = Jinja2Templates(env=env)
        self.throttle = SignInThrottle()
        folder = resources.files("gateway.console").joinpath("static")
        self.static = {
            item.name: item.read_bytes() for item in folder.iterdir() if item.name.endswith(tuple(STATIC_TYPES))
        }

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("viewer", None)
        return secured(self.templates.TemplateResponse(request, template, context, status_code=status))

    def error(self, request: Request, exc: GatewayError, viewer: Viewer | None = None) -> Response:
        ctx_of(request).error_code = exc.code
        response = self.render(request, "error.html", exc.status, viewer=viewer, error=exc)
        for name, value in exc.headers().items():
            if name.lower() == "retry-after":
                response.headers[name] = value
        return response

    def page(self, handler: Handler, roles: Collection[str] = EVERYONE) -> Endpoint:
        """An endpoint that signs the visitor in (or sends it to the sign-in form), checks its role and, for a
        POST, the form's CSRF token, then runs `handler`."""

        async def endpoint(request: Request) -> Response:
            gateway = gw(request)
            viewer: Viewer | None = None
            try:
                viewer = await current(request, gateway)
                if viewer is None:
                    return secured(RedirectResponse(signin_url(request), 303))
                _note(request, viewer)
                if viewer.role not in roles:
                    raise RoleDenied("Your role does not show this page.")
                networks = gateway.settings.server.console_trusted_proxies
                form = await checked_form(request, viewer.session_id, networks) if request.method == "POST" else {}
                response = await handler(Visit(request, gateway, viewer, self, form))
            except GatewayError as exc:
                response = self.error(request, exc, viewer)
            if viewer is not None and viewer.new:
                hours = gateway.settings.server.console_session_hours
                secure = over_https(request, gateway.settings.server.console_trusted_proxies)
                set_cookie(response, COOKIE, viewer.session_id, int(hours * 3600), secure)
            return secured(response)

        return endpoint

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.static.get(name)
        if body is None:
            return self.error(request, NotFound("No such file.", code="not_found"))
        kind = STATIC_TYPES[name[name.rindex(".") :]]
        response = secured(Response(body, 200, media_type=kind))
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response


def secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def signin_url(request: Request) -> str:
    path = request.url.path
    return "/console/sign-in" + (f"?next={path}" if path.startswith("/console/") and request.method == "GET" else "")


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path of this site, never another origin."""
    if not value or not value.startswith("/console/") or value.startswith("//") or "\\" in value:
        return "/console/"
    parts = urlsplit(value)
    return "/console/" if parts.scheme or parts.netloc else value


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form of at most FORM_MAX_BYTES and FORM_MAX_FIELDS fields (the last of a repeated name)."""
    raw = await read_body(request, FORM_MAX_BYTES)
    try:
        pairs = parse_qsl(raw.decode(), keep_blank_values=True, max_num_fields=FORM_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("The form could not be read.") from None
    return dict(pairs)


async def checked_form(request: Request, secret: str | None, networks: Networks) -> dict[str, str]:
    """The posted form, once its CSRF token is the one of `secret` and it comes from this origin (the Host, or
    the X-Forwarded-Host a trusted proxy sends)."""
    origin = request.headers.get("origin")
    hosts = {request.headers.get("host", "")}
    if trusted_peer(request, networks):
        hosts.add(request.headers.get("x-forwarded-host", ""))
    if origin and origin != "null" and urlsplit(origin).netloc not in hosts:
        raise FormRefused("This form was posted from another site: nothing was changed.")
    form = await read_form(request)
    if not csrf_ok(secret, form.get("csrf")):
        raise FormRefused("This form has expired or did not come from this console: nothing was changed.")
    return form


def _note(request: Request, viewer: Viewer) -> None:
    """The canonical log line names who looked (never the session id)."""
    ctx = ctx_of(request)
    ctx.user = viewer.user or None
    ctx.team = viewer.team or None
