"""Gateway key → user and team: SHA-256 lookup, constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from gateway.errors import AuthError, NotFound
from gateway.settings import Secret, Settings, Team, User

KEY_PREFIX = "tgw-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._by_hash = {user.key_sha256: user for user in settings.users.values()}
        self._teams = settings.teams

    def authenticate(self, authorization: str | None) -> tuple[User, Team]:
        scheme, key = (authorization or "").partition(" ")[::2]  # ("Bearer", " ", key) → ("Bearer", key)
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("Missing gateway key: send 'Authorization: Bearer tgw-…'.")
        digest = key_sha256(key.strip())
        user = self._by_hash.get(digest)
        # The dict lookup finds the candidate; the constant-time compare is what admits it.
        if user is None or not hmac.compare_digest(user.key_sha256, digest):
            raise AuthError("Incorrect gateway key provided.")
        return user, self._teams[user.team]


def model_allowed(model: str, user: User, team: Team) -> bool:
    return (team.limits.models is None or model in team.limits.models) and (
        user.limits.models is None or model in user.limits.models
    )


def allowed_models(settings: Settings, user: User, team: Team) -> list[str]:
    return [m for m in settings.pricing if model_allowed(m, user, team)]


def check_token(authorization: str | None, token: Secret | None) -> None:
    """An operator's bearer token (admin routes, /metrics): routes off (404) when none is configured."""
    if token is None:
        raise NotFound("Not found.", code="not_found")
    scheme, given = (authorization or "").partition(" ")[::2]
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
        raise AuthError("Missing or wrong admin token.")
