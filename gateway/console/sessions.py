"""Who is looking at the console: sign-in sessions kept in the store, the CSRF token of each, and the checks that
end a session the moment what it was made from is gone (SPEC §16).

A session id is 32 random bytes in an HttpOnly, SameSite=Strict cookie scoped to /console (Secure over HTTPS);
the store keeps only its SHA-256, so a copy of the store signs no one in. Each request re-checks, in memory, what
the session stands on: the gateway key still live in this replica's directory (a revocation reaches every replica
within a second), the admin token still the same, the single sign-on user still there with that e-mail. The CSRF
token of a form is an HMAC of the session id: tied to the session, never stored, unknowable to another site.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING

import structlog
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import AuthError
from gateway.policy.directory import Directory
from gateway.policy.roles import OPERATOR, THE_OPERATOR, Actor
from gateway.settings import Secret, ServerSettings
from gateway.store.sessions import ConsoleSession
from gateway.tenancy import email_key

if TYPE_CHECKING:
    from gateway.app import Gateway

COOKIE = "tgw_console"
SIGNIN_COOKIE = "tgw_console_signin"  # the sign-in form's own CSRF secret, before there is a session
PATH = "/console"
SIGNIN_MAX_AGE_S = 3600
# ConsoleSession.kind: signed in with a gateway key, the admin token, or a trusted single sign-on header
KEY = "key"
OPERATOR_TOKEN = "operator"
SSO = "sso"
Networks = tuple[IPv4Network | IPv6Network, ...]


@dataclass(frozen=True, slots=True)
class Viewer:
    """A signed-in visitor: its role (policy.roles: operator, team_admin, member), user and team, and the session
    its requests carry."""

    role: str
    user: str
    team: str
    session_id: str  # the cookie's value
    new: bool = False  # made by this request (single sign-on): its answer sets the cookie

    @property
    def actor(self) -> Actor:
        return THE_OPERATOR if self.role == OPERATOR else Actor(self.role, self.user, self.team)

    @property
    def csrf(self) -> str:
        return csrf_token(self.session_id)


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(secret: str) -> str:
    mac = hmac.new(secret.encode(), b"tokenhub-gateway console form", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def csrf_ok(secret: str | None, given: str | None) -> bool:
    """Whether a form's token is the one of this secret (a session id, or the sign-in form's cookie)."""
    if not secret or not given:
        return False
    return hmac.compare_digest(csrf_token(secret).encode(), given.encode())


def identity(
    session: ConsoleSession, directory: Directory, admin_token: Secret | None, now: float
) -> tuple[str, str, str] | None:
    """(role, user, team) as the session stands now, or None when what it was made from is gone: a key revoked,
    expired or of a deleted user, an admin token changed or unset, a single sign-on user deleted or re-mailed."""
    if session.kind == OPERATOR_TOKEN:
        if admin_token is None or not hmac.compare_digest(digest(admin_token.reveal()), session.subject):
            return None
        return OPERATOR, "", ""
    if session.kind == KEY:
        holder = directory.holder(bytes.fromhex(session.subject))
        found = directory.member(holder.user) if holder is not None and holder.live(now) else None
    elif session.kind == SSO:
        found = directory.member(session.subject)
        if found is not None and not found[0].email:
            found = None
    else:
        found = None
    if found is None:
        return None
    user, team = found
    return user.role, user.name, team.name


def sso_user(directory: Directory, email: str) -> str | None:
    """The user a single sign-on e-mail names (whatever its case: tenancy.email_key), None when no user has it or
    when several do. New users may not share an e-mail, but the users in force still can (a store's user and a
    config user added by a reload, rows older than the rule), and a sign-on must never land in another person's
    user: every user in force counts, from the config or the API, whether or not its team still is."""
    wanted = email_key(email.strip())
    named = [user.name for user in directory.users.values() if user.email and email_key(user.email) == wanted]
    if len(named) > 1:
        # The count only: an address is personal data, kept out of the logs.
        structlog.get_logger("gateway.console").warning("console.sso_ambiguous", users=len(named))
        return None
    return named[0] if named and directory.member(named[0]) is not None else None


def trusted_peer(request: Request, networks: Networks) -> bool:
    peer = request.client.host if request.client else ""
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_address(request: Request, networks: Networks) -> str:
    """The address failed sign-ins are counted against: the nearest hop a trusted proxy names, else the peer."""
    peer = request.client.host if request.client else "?"
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded and trusted_peer(request, networks):
        return forwarded.rsplit(",", 1)[-1].strip()[:64] or peer
    return peer


def over_https(request: Request, networks: Networks) -> bool:
    if request.url.scheme == "https":
        return True
    proto = request.headers.get("x-forwarded-proto", "")
    return proto.lower() == "https" and trusted_peer(request, networks)


def sso_email(request: Request, server: ServerSettings) -> str | None:
    """The e-mail a trusted single sign-on proxy sent, None when there is none or the peer is not trusted."""
    if not server.console_trusted_header:
        return None
    value = request.headers.get(server.console_trusted_header)
    if not value or not trusted_peer(request, server.console_trusted_proxies):
        return None
    return value[:254]


def set_cookie(response: Response, name: str, value: str, max_age: int, secure: bool) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PATH, secure=secure, httponly=True, samesite="strict")


def clear_cookie(response: Response, name: str, secure: bool) -> None:
    response.delete_cookie(name, path=PATH, secure=secure, httponly=True, samesite="strict")


async def open_session(gateway: Gateway, kind: str, subject: str) -> str:
    """A new session in the store; its id (for the cookie)."""
    session_id = new_secret()
    now = await gateway.store.now()
    hours = gateway.settings.server.console_session_hours
    await gateway.store.save_session(ConsoleSession(digest(session_id), kind, subject, now, now + hours * 3600))
    return session_id


async def current(request: Request, gateway: Gateway) -> Viewer | None:
    """The signed-in visitor, or None. A session whose ground is gone is deleted; a trusted single sign-on header
    opens a session when there is none."""
    server = gateway.settings.server
    email = sso_email(request, server)
    cookie = request.cookies.get(COOKIE)
    if cookie:
        session = await gateway.store.get_session(digest(cookie), gateway.clock())
        if session is not None:
            who = identity(session, gateway.directory, server.admin_token, gateway.clock())
            if who is not None and not _other_sso_user(session, email, gateway.directory):
                return Viewer(*who, session_id=cookie)
            await gateway.store.delete_session(session.id_sha256)
    if email is None:
        return None
    name = sso_user(gateway.directory, email)
    if name is None:
        raise AuthError("No user of this gateway has the e-mail your sign-on sent.")
    session_id = await open_session(gateway, SSO, name)
    member = gateway.directory.member(name)
    if member is None:
        return None
    return Viewer(member[0].role, name, member[1].name, session_id, new=True)


def _other_sso_user(session: ConsoleSession, email: str | None, directory: Directory) -> bool:
    """A single sign-on session the proxy now says belongs to someone else (another person at this browser)."""
    if session.kind != SSO or email is None:
        return False
    found = directory.member(session.subject)
    return found is None or email_key(found[0].email or "") != email_key(email.strip())
