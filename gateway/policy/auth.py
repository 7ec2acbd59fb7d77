"""Gateway key → user and team: SHA-256 lookup in the directory, constant-time comparison, expiry; the caller
of an admin route (the operator's token or a user's own key); when keys were last used, kept in memory."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from gateway.errors import AuthError, NotFound
from gateway.policy.directory import Directory
from gateway.policy.roles import THE_OPERATOR, Actor
from gateway.settings import Secret, Settings, Team, User

MAX_USES_HELD = 200_000  # key ids awaiting their last_used_at write; past it, uses go unrecorded until a flush

KEY_PREFIX = "tgw-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyUses:
    """When each API key was last used, to the minute, held until the next bulk write (Store.touch_keys): no
    store write per request, and at most MAX_USES_HELD ids between two writes."""

    def __init__(self, limit: int = MAX_USES_HELD) -> None:
        self._minutes: dict[str, float] = {}
        self._limit = limit

    def note(self, key_id: str, now: float) -> None:
        minute = now - now % 60
        if self._minutes.get(key_id) != minute and (key_id in self._minutes or len(self._minutes) < self._limit):
            self._minutes[key_id] = minute

    def peek(self, key_id: str) -> float | None:
        """The minute noted for a key and not yet written."""
        return self._minutes.get(key_id)

    def take(self) -> dict[str, float]:
        """Everything noted since the last take."""
        taken, self._minutes = self._minutes, {}
        return taken


class Authenticator:
    """Bearer keys against the directory: a config user's key, or a live key issued through the API."""

    def __init__(self, source: Settings | Directory, clock: Callable[[], float] = time.time) -> None:
        self.directory = source if isinstance(source, Directory) else Directory(source)
        self.clock = clock
        self.uses = KeyUses()

    def authenticate(self, authorization: str | None) -> tuple[User, Team]:
        scheme, key = (authorization or "").partition(" ")[::2]  # ("Bearer", " ", key) → ("Bearer", key)
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("Missing gateway key: send 'Authorization: Bearer tgw-…'.")
        digest = hashlib.sha256(key.strip().encode()).digest()
        holder = self.directory.holder(digest)
        # The dict lookup finds the candidate; the constant-time compare is what admits it.
        if holder is None or not hmac.compare_digest(holder.digest, digest):
            raise AuthError("Incorrect gateway key provided.")
        found = self.directory.member(holder.user)
        if found is None:
            raise AuthError("Incorrect gateway key provided.")
        if holder.key_id:
            now = self.clock()
            if not holder.live(now):
                raise AuthError("This gateway key has expired.")
            self.uses.note(holder.key_id, now)
        return found

    def actor(self, authorization: str | None, token: Secret | None) -> Actor:
        """Who calls an admin route: the operator (its token), or a user by its own gateway key (its role says
        what it may do). Admin routes are off (404) when no token is configured."""
        if _token_check(authorization, token):
            return THE_OPERATOR
        try:
            user, team = self.authenticate(authorization)
        except AuthError:
            raise AuthError("Missing or wrong admin token.") from None
        return Actor(user.role, user.name, team.name)


def model_allowed(model: str, user: User, team: Team) -> bool:
    return (team.limits.models is None or model in team.limits.models) and (
        user.limits.models is None or model in user.limits.models
    )


def allowed_models(settings: Settings, user: User, team: Team) -> list[str]:
    return [m for m in settings.pricing if model_allowed(m, user, team)]


def check_token(authorization: str | None, token: Secret | None) -> None:
    """An operator's bearer token (admin routes, /metrics): routes off (404) when none is configured."""
    if not _token_check(authorization, token):
        raise AuthError("Missing or wrong admin token.")


def _token_check(authorization: str | None, token: Secret | None) -> bool:
    """Whether the bearer is the operator's token; NotFound when none is configured."""
    if token is None:
        raise NotFound("Not found.", code="not_found")
    scheme, given = (authorization or "").partition(" ")[::2]
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.reveal().encode())
