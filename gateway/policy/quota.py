"""Limits policy: periods, the check behind check-and-reserve, and the figures of /usage. No I/O."""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from gateway.errors import GatewayError, QuotaError, RateLimited
from gateway.settings import Limits, Settings, Team, User

WINDOW_S = 60
# period → the UTC day last asked for, [start, end), and its key: a create asks four times, nearly always that day
_latest: dict[str, tuple[float, float, str]] = {}
_NO_DAY = (0.0, 0.0, "")


def period_key(period: str, now: float) -> str:
    """The UTC calendar period a moment falls in: '2026-11-26', '2026-W48', '2026-11' or 'total'."""
    start, end, key = _latest.get(period, _NO_DAY)
    if start <= now < end:
        return key
    if period == "total":
        return "total"
    day = int(now // 86400)
    key = _period_of_day(period, day)
    _latest[period] = (day * 86400.0, (day + 1) * 86400.0, key)
    return key


@functools.lru_cache(maxsize=64)
def _period_of_day(period: str, day: int) -> str:
    midnight = datetime.fromtimestamp(day * 86400, timezone.utc)
    if period == "day":
        return midnight.strftime("%Y-%m-%d")
    if period == "week":
        iso = midnight.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    return midnight.strftime("%Y-%m")


def period_bounds(period: str, now: float) -> tuple[datetime | None, datetime | None]:
    if period == "total":
        return None, None
    midnight = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return midnight, midnight + timedelta(days=1)
    if period == "week":
        start = midnight - timedelta(days=midnight.weekday())
        return start, start + timedelta(days=7)
    start = midnight.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


class Subject(NamedTuple):
    """A team or user whose limits a create must pass, with the period it is counted in.
    NamedTuples, this and RateState: made twice per create each, at a fifth of a frozen dataclass's cost."""

    scope: str  # "team" | "user"
    name: str
    period: str
    limits: Limits


def subjects_for(user: User, team: Team, now: float) -> tuple[Subject, Subject]:
    """The user and the team a create is counted against, each in its current period."""
    return (
        Subject("user", user.name, period_key(user.limits.period, now), user.limits),
        Subject("team", team.name, period_key(team.limits.period, now), team.limits),
    )


def team_subjects(settings: Settings, now: float) -> tuple[Subject, ...]:
    """Every configured team in its current period (for gauges and /admin/teams)."""
    return tuple(Subject("team", t.name, period_key(t.limits.period, now), t.limits) for t in settings.teams.values())


@dataclass(slots=True)
class Counters:
    spent_micros: int = 0
    reserved_micros: int = 0
    spent_ms: int = 0
    reserved_ms: int = 0


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # the bounded `reason` label of tokenhub_gateway_quota_rejections_total
    error: GatewayError


class RateState(NamedTuple):
    limit: int
    remaining: int
    reset_s: float


def rate_state(limit: int, window: Sequence[float], now: float) -> RateState:
    """The sliding 60 s window of one subject; `window` holds admission times, oldest first."""
    cutoff = now - WINDOW_S  # older ones have left the window
    start = 0 if not window or window[0] > cutoff else bisect.bisect_right(window, cutoff)
    live = len(window) - start
    return state_of(limit, live, window[len(window) - limit] if live >= limit else None, now)


def state_of(limit: int, live: int, boundary: float | None, now: float) -> RateState:
    """From a count: `boundary` is the admission `limit` places from the newest (None below the limit);
    one is admitted again once it leaves the window."""
    reset = boundary + WINDOW_S - now if boundary is not None and live >= limit else 0.0
    return RateState(limit, max(0, limit - live), max(0.0, reset))


def retry_after(reset_s: float) -> int:
    return min(WINDOW_S, max(1, math.ceil(reset_s)))


def _who(subject: Subject) -> str:
    return f"{subject.scope} {subject.name!r}"


def check(
    subject: Subject,
    counters: Counters,
    in_flight: int,
    window: Sequence[float] | None,
    now: float,
    estimate_micros: int,
    estimate_ms: int,
) -> Rejection | None:
    """The first limit this create would break for this subject, or None.
    Its twin for Redis, which must check the same way inside one script, is ADMIT in store/redis/scripts.py."""
    limits = subject.limits
    if limits.requests_per_minute is not None:
        rate = rate_state(limits.requests_per_minute, window or (), now)
        if rate.remaining <= 0:
            msg = f"Rate limit of {limits.requests_per_minute} creates per minute reached for {_who(subject)}."
            return Rejection("rate_limit", RateLimited(msg, retry_after=retry_after(rate.reset_s)))
    if limits.max_concurrent_tasks is not None and in_flight >= limits.max_concurrent_tasks:
        return Rejection(
            "concurrency",
            RateLimited(
                f"{_who(subject)} already has {in_flight} tasks in flight (limit {limits.max_concurrent_tasks}).",
                code="concurrency_limit_exceeded",
            ),
        )
    if limits.budget_micros is not None:
        used = counters.spent_micros + counters.reserved_micros
        if used + estimate_micros > limits.budget_micros:
            left = max(0, limits.budget_micros - used) / 1e6
            msg = (
                f"Budget of ${limits.budget_micros / 1e6:.2f} for {_who(subject)} would be exceeded: this task "
                f"is estimated at ${estimate_micros / 1e6:.2f}, ${left:.2f} remains this period."
            )
            return Rejection("budget_usd", QuotaError(msg))
    if limits.video_seconds is not None:
        used_ms = counters.spent_ms + counters.reserved_ms
        if used_ms + estimate_ms > limits.video_seconds * 1000:
            msg = (
                f"Video-seconds budget of {limits.video_seconds} s for {_who(subject)} would be exceeded "
                f"({used_ms / 1000:g} s used, this task needs {estimate_ms / 1000:g} s)."
            )
            return Rejection("video_seconds", QuotaError(msg))
    return None
