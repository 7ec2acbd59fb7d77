"""An upstream key's health and the choice of keys: a pure, clock-injected state machine (SPEC §5).

ok ──429──▶ cooldown ──time──▶ ok
ok ──401/403──▶ disabled (until a reload)
ok ──N consecutive 5xx/connect errors/timeouts──▶ open ──time──▶ probe ──404──▶ ok
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from gateway import tokenhub
from gateway.settings import UpstreamKey, UpstreamSettings

OK = "ok"
COOLDOWN = "cooldown"
DISABLED = "disabled"
OPEN = "open"


@dataclass(frozen=True, slots=True)
class KeyHealth:
    state: str = OK
    until: float = 0.0  # end of a cooldown or of an open circuit
    failures: int = 0  # consecutive 5xx / connect errors / timeouts
    throttles: int = 0  # consecutive 429s, for the back-off
    last_error: str | None = None
    last_error_at: float | None = None
    errors: int = 0

    def current(self, now: float) -> str:
        """The state clients see: a cooldown ends by itself; an open circuit waits for its probe."""
        return OK if self.state == COOLDOWN and now >= self.until else self.state

    def usable(self, now: float) -> bool:
        return self.current(now) == OK

    def needs_probe(self, now: float) -> bool:
        return self.state == OPEN and now >= self.until


HEALTHY = KeyHealth()  # a key with no record yet (made once: a frozen dataclass's __init__ is not cheap)


def on_success(health: KeyHealth, now: float) -> KeyHealth:
    """Unchanged (the same object) when there is nothing to reset; disabled or open stays so until a
    reload or a probe. Successes are counted by the pool, not here, so a healthy key costs no write."""
    if health.current(now) == OK and (health.state, health.failures, health.throttles) != (OK, 0, 0):
        return replace(health, state=OK, failures=0, throttles=0)
    return health


def on_throttled(
    health: KeyHealth, now: float, retry_after: float | None, cfg: UpstreamSettings, rng: random.Random
) -> KeyHealth:
    if retry_after is None:
        base = cfg.cooldown_s * (2 ** min(health.throttles, 10)) * rng.uniform(0.8, 1.2)
        retry_after = min(base, cfg.cooldown_s * 10)
    state = health.state if health.state in (DISABLED, OPEN) else COOLDOWN
    return replace(
        health,
        state=state,
        until=max(health.until, now + retry_after) if state == COOLDOWN else health.until,
        throttles=health.throttles + 1,
        last_error="429",
        last_error_at=now,
        errors=health.errors + 1,
    )


def on_rejected(health: KeyHealth, now: float, code: int) -> KeyHealth:
    return replace(health, state=DISABLED, last_error=str(code), last_error_at=now, errors=health.errors + 1)


def on_failure(health: KeyHealth, now: float, error: str, cfg: UpstreamSettings) -> KeyHealth:
    failures = health.failures + 1
    health = replace(health, failures=failures, last_error=error, last_error_at=now, errors=health.errors + 1)
    if health.state == OPEN or (failures >= cfg.breaker_failures and health.state != DISABLED):
        return replace(health, state=OPEN, until=now + cfg.breaker_open_s)
    return health


def on_reply(
    health: KeyHealth,
    now: float,
    status: int | None,
    error: str | None,
    retry_after_s: float | None,
    cfg: UpstreamSettings,
    rng: random.Random,
) -> KeyHealth:
    """One upstream outcome: a status (4xx other than 401/403/429 means the key is fine) or an error."""
    if status is None:  # no answer at all
        return on_failure(health, now, error or "None", cfg)
    outcome = tokenhub.outcome_of(status)
    if outcome == tokenhub.KEY_REJECTED:
        return on_rejected(health, now, status)
    if outcome == tokenhub.THROTTLED:
        return on_throttled(health, now, retry_after_s, cfg, rng)
    if outcome != tokenhub.FAILED:
        return on_success(health, now)
    return on_failure(health, now, error or str(status), cfg)


def on_probe(health: KeyHealth, now: float, healthy: bool, error: str, cfg: UpstreamSettings) -> KeyHealth:
    if healthy:
        return replace(health, state=OK, failures=0, until=0.0)
    return replace(health, until=now + cfg.breaker_open_s, last_error=error, last_error_at=now)


def choose(
    keys: tuple[UpstreamKey, ...],
    health: dict[str, KeyHealth],
    in_flight: dict[str, int],
    model: str,
    now: float,
    rng: random.Random,
) -> list[UpstreamKey]:
    """Usable keys that allow the model and have a free slot, in the order to try them.

    Drawn at random with odds ∝ weight × free share of the key's slots, so idle keys share creates
    by weight and a loaded key is chosen less; every later key is the fallback of the ones before."""
    pool = [
        k
        for k in keys
        if k.allows(model)
        and health.get(k.name, HEALTHY).usable(now)
        and in_flight.get(k.name, 0) < k.max_concurrent_tasks
    ]
    order = []
    while len(pool) > 1:  # the last one left needs no draw
        odds = [k.weight * (1 - in_flight.get(k.name, 0) / k.max_concurrent_tasks) for k in pool]
        pick = rng.choices(range(len(pool)), weights=odds)[0] if sum(odds) > 0 else 0
        order.append(pool.pop(pick))
    return order + pool


def earliest_retry(keys: tuple[UpstreamKey, ...], health: dict[str, KeyHealth], now: float) -> int:
    """Seconds until some key may be usable again (for Retry-After on 503 no_upstream_key)."""
    ends = [
        key_health.until - now
        for k in keys
        if (key_health := health.get(k.name)) and key_health.state in (COOLDOWN, OPEN)
    ]
    return max(1, math.ceil(min(ends))) if ends else 1
