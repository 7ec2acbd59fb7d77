"""/console/sign-in and /console/sign-out: a gateway key or the admin token typed into a form (SPEC §16).

Whatever was wrong (no such key, a revoked or expired one, a mistyped token, an empty field) the answer is the
same page with the same words; an address that keeps failing is answered 429 without its credentials being
looked at (throttle.py). The sign-in form has a CSRF token of its own, tied to a short-lived cookie, since there
is no session yet to tie it to.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.console.pages import Console, Visit, checked_form, safe_next, secured
from gateway.console.sessions import (
    COOKIE,
    KEY,
    OPERATOR_TOKEN,
    SIGNIN_COOKIE,
    SIGNIN_MAX_AGE_S,
    clear_cookie,
    client_address,
    csrf_token,
    current,
    digest,
    new_secret,
    open_session,
    over_https,
    set_cookie,
)
from gateway.errors import AuthError, GatewayError, RateLimited
from gateway.http.request import gw

if TYPE_CHECKING:
    from gateway.app import Gateway

MAX_CREDENTIAL = 512
REFUSED = "That key or token was not accepted."


class SignIn:
    def __init__(self, console: Console) -> None:
        self.console = console

    async def form(self, request: Request) -> Response:
        gateway = gw(request)
        try:
            if await current(request, gateway) is not None:
                return secured(RedirectResponse(safe_next(request.query_params.get("next")), 303))
        except GatewayError as exc:  # a single sign-on header naming no user
            return self.console.error(request, exc)
        return self._form(request, gateway, 200, "")

    async def submit(self, request: Request) -> Response:
        gateway = gw(request)
        networks = gateway.settings.server.console_trusted_proxies
        address = client_address(request, networks)
        try:
            wait = self.console.throttle.retry_after(address)
            if wait:
                raise RateLimited("Too many failed sign-ins from your address: try again later.", retry_after=wait)
            form = await checked_form(request, request.cookies.get(SIGNIN_COOKIE), networks)
            kind, subject = _credential(gateway, form.get("credential", ""))
        except AuthError:
            self.console.throttle.failed(address)
            return self._form(request, gateway, 401, REFUSED)
        except GatewayError as exc:
            return self.console.error(request, exc)
        self.console.throttle.succeeded(address)
        session_id = await open_session(gateway, kind, subject)
        secure = over_https(request, networks)
        response = RedirectResponse(safe_next(form.get("next")), 303)
        set_cookie(response, COOKIE, session_id, int(gateway.settings.server.console_session_hours * 3600), secure)
        clear_cookie(response, SIGNIN_COOKIE, secure)
        return secured(response)

    async def sign_out(self, visit: Visit) -> Response:
        await visit.gateway.store.delete_session(digest(visit.viewer.session_id))
        response = RedirectResponse("/console/sign-in?signed_out=1", 303)
        clear_cookie(response, COOKIE, over_https(visit.request, visit.gateway.settings.server.console_trusted_proxies))
        return response

    def _form(self, request: Request, gateway: Gateway, status: int, message: str) -> Response:
        secret = request.cookies.get(SIGNIN_COOKIE) or new_secret()
        server = gateway.settings.server
        response = self.console.render(
            request,
            "signin.html",
            status,
            csrf=csrf_token(secret),
            message=message,
            next=safe_next(request.query_params.get("next")),
            signed_out=bool(request.query_params.get("signed_out")),
            operator=server.admin_token is not None,
        )
        set_cookie(
            response, SIGNIN_COOKIE, secret, SIGNIN_MAX_AGE_S, over_https(request, server.console_trusted_proxies)
        )
        return response


def _credential(gateway: Gateway, typed: str) -> tuple[str, str]:
    """The session a typed credential opens: (kind, subject). AuthError, alike for every reason, otherwise."""
    value = typed.strip()
    if not value or len(value) > MAX_CREDENTIAL:
        raise AuthError(REFUSED)
    token = gateway.settings.server.admin_token
    if token is not None and hmac.compare_digest(value.encode(), token.reveal().encode()):
        return OPERATOR_TOKEN, digest(value)
    try:
        gateway.auth.authenticate("Bearer " + value)
    except AuthError:
        raise AuthError(REFUSED) from None
    return KEY, digest(value)
