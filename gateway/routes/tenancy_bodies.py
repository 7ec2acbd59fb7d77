"""The admin API's bodies for teams, users and keys (SPEC §15), checked field by field and turned into records.
No I/O: the routes look up what exists and hand it in.

Limits go through the config reader's own code (config.limits_of), so a limit set through the API means exactly
what it means in gateway.toml (§6). A problem is a 400 naming its field (`param`); an unknown field is one too.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from gateway.config import limits_of
from gateway.errors import ValidationError
from gateway.settings import Limits
from gateway.tenancy import NAME_PATTERN, ROLES, TeamRecord, UserRecord, limits_doc, valid_email, valid_name

LIMIT_FIELDS = (
    "budget_usd",
    "video_seconds",
    "period",
    "requests_per_minute",
    "max_concurrent_tasks",
    "models",
    "alert_thresholds",
)
TEAM_FIELDS = frozenset(LIMIT_FIELDS)
USER_FIELDS = frozenset((*LIMIT_FIELDS, "team", "role", "email"))
KEY_FIELDS = frozenset(("label", "expires_at"))
MAX_LABEL = 200
# Past these a figure is no budget anyone means, and stays exact in every store (store.base.MAX_FIGURE).
MAX_BUDGET_MICROS = 10**15
MAX_COUNT = 10**9
LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z


def fields_of(body: Any, allowed: Collection[str], required: Collection[str] = ()) -> dict[str, Any]:
    """A JSON object with no field but these, and the required ones present."""
    if not isinstance(body, dict):
        raise ValidationError("The body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ValidationError(f"Unknown field {unknown[0]!r}.", param=unknown[0])
    for name in required:
        if body.get(name) is None:
            raise ValidationError(f"{name} is required.", param=name)
    return body


def checked_name(value: Any, param: str = "name") -> str:
    if not valid_name(value):
        raise ValidationError(f"{param} must match {NAME_PATTERN.pattern}.", param=param)
    name: str = value
    return name


def limits_from(doc: Mapping[str, Any], models: set[str], period: str | None = None) -> Limits:
    """Limits from §6's names (a null is unset: unlimited, or the default); `period` is the default period."""
    given = {name: value for name, value in doc.items() if value is not None}
    limits, problems = limits_of(given, models, period)
    if problems:
        field, _, message = problems[0].partition(": ")
        field = field.lstrip(".")
        raise ValidationError(f"{field}: {message}", param=field)
    for field, value, most in (
        ("budget_usd", limits.budget_micros, MAX_BUDGET_MICROS),
        ("video_seconds", limits.video_seconds, MAX_COUNT),
        ("requests_per_minute", limits.requests_per_minute, MAX_COUNT),
        ("max_concurrent_tasks", limits.max_concurrent_tasks, MAX_COUNT),
    ):
        if value is not None and value > most:
            raise ValidationError(f"{field} is larger than any limit the gateway keeps.", param=field)
    return limits


def changed_limits(limits: Limits, body: Mapping[str, Any], models: set[str], period: str | None = None) -> Limits:
    """Limits with the body's fields set over them (null unsets one)."""
    doc = {name: value for name, value in limits_doc(limits).items() if value is not None}
    for name in LIMIT_FIELDS:
        if name in body:
            doc[name] = body[name]
    return limits_from(doc, models, period)


def new_team(body: Any, models: set[str]) -> TeamRecord:
    fields = fields_of(body, TEAM_FIELDS | {"name"}, ("name",))
    name = checked_name(fields["name"])
    return TeamRecord(name, limits_from(_limit_fields(fields), models))


def changed_team(team: TeamRecord, body: Any, models: set[str]) -> TeamRecord:
    fields = fields_of(body, TEAM_FIELDS | {"name"})
    _same_name(fields, team.name)
    return replace(team, limits=changed_limits(team.limits, fields, models))


def new_user(body: Any, models: set[str], team_period: str) -> UserRecord:
    """A user (its team's existence is the caller's to check); its period is its team's unless set."""
    fields = fields_of(body, USER_FIELDS | {"name"}, ("name", "team"))
    name = checked_name(fields["name"])
    team = checked_name(fields["team"], "team")
    limits = limits_from(_limit_fields(fields), models, team_period)
    return UserRecord(name, team, _role(fields.get("role")), _email(fields.get("email")), limits)


def changed_user(user: UserRecord, body: Any, models: set[str], team_period: str) -> UserRecord:
    """`team_period`: the period of the team the user is in after the change (used when its own is unset)."""
    fields = fields_of(body, USER_FIELDS | {"name"})
    _same_name(fields, user.name)
    team = checked_name(fields["team"], "team") if "team" in fields else user.team
    role = _role(fields["role"]) if "role" in fields else user.role
    email = _email(fields["email"]) if "email" in fields else user.email
    limits = changed_limits(user.limits, fields, models, team_period)
    return replace(user, team=team, role=role, email=email, limits=limits)


def key_request(body: Any, now: float) -> tuple[str | None, float | None]:
    """A key's label and expiry (a whole second, in the future)."""
    fields = fields_of(body, KEY_FIELDS)
    return _label(fields.get("label")), _expiry(fields.get("expires_at"), now)


def _limit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: fields[name] for name in LIMIT_FIELDS if name in fields}


def _same_name(fields: Mapping[str, Any], name: str) -> None:
    if "name" in fields and fields["name"] != name:
        raise ValidationError("A name cannot be changed: create another and delete this one.", param="name")


def _role(value: Any) -> str:
    if value is None:
        return ROLES[0]
    if value not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}.", param="role")
    role: str = value
    return role


def _email(value: Any) -> str | None:
    if value is not None and not valid_email(value):
        raise ValidationError("email must be an e-mail address (name@domain), at most 254 characters.", param="email")
    email: str | None = value
    return email


def _label(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_LABEL
        or any(unicodedata.category(c) in ("Cc", "Cf") for c in value)
    ):
        raise ValidationError(f"label must be text of 1 to {MAX_LABEL} characters.", param="label")
    return value


def _expiry(value: Any, now: float) -> float | None:
    """ISO 8601 (UTC unless it says otherwise) or unix seconds, rounded down to its second; in the future."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        second = math.floor(value)
    elif isinstance(value, str):
        second = _iso_second(value)
    else:
        raise ValidationError("expires_at must be an ISO 8601 date-time or unix seconds.", param="expires_at")
    if not now < second <= LAST_SECOND:
        raise ValidationError("expires_at must be in the future (and before the year 10000).", param="expires_at")
    return float(second)


def _iso_second(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError("expires_at must be an ISO 8601 date-time or unix seconds.", param="expires_at") from None
    return math.floor((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
