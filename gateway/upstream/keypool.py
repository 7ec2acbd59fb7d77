"""Upstream key choice and health: a pure, clock-injected state machine (SPEC §5).

ok ──429──▶ cooldown ──time──▶ ok
ok ──401/403──▶ disabled (until a reload)
ok ──N consecutive 5xx/connect errors/timeouts──▶ open ──time──▶ probe ──404──▶ ok
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gateway.config import UpstreamKey, UpstreamSettings
from gateway.errors import GatewayError, NoUpstreamKey
from gateway.upstream import client as tokenhub
from gateway.upstream.client import Scrubber, Upstream, parse_retry_after

if TYPE_CHECKING:
    from gateway.store.base import Store

OK, COOLDOWN, DISABLED, OPEN = "ok", "cooldown", "disabled", "open"


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


def on_success(h: KeyHealth, now: float) -> KeyHealth:
    """Unchanged (the same object) when there is nothing to reset; disabled or open stays so until a
    reload or a probe. Successes are counted by the pool, not here, so a healthy key costs no write."""
    if h.current(now) == OK and (h.state, h.failures, h.throttles) != (OK, 0, 0):
        return replace(h, state=OK, failures=0, throttles=0)
    return h


def on_throttled(
    h: KeyHealth, now: float, retry_after: float | None, cfg: UpstreamSettings, rng: random.Random
) -> KeyHealth:
    if retry_after is None:
        base = cfg.cooldown_s * (2 ** min(h.throttles, 10)) * rng.uniform(0.8, 1.2)
        retry_after = min(base, cfg.cooldown_s * 10)
    state = h.state if h.state in (DISABLED, OPEN) else COOLDOWN
    return replace(
        h,
        state=state,
        until=max(h.until, now + retry_after) if state == COOLDOWN else h.until,
        throttles=h.throttles + 1,
        last_error="429",
        last_error_at=now,
        errors=h.errors + 1,
    )


def on_rejected(h: KeyHealth, now: float, code: int) -> KeyHealth:
    return replace(h, state=DISABLED, last_error=str(code), last_error_at=now, errors=h.errors + 1)


def on_failure(h: KeyHealth, now: float, error: str, cfg: UpstreamSettings) -> KeyHealth:
    failures = h.failures + 1
    h = replace(h, failures=failures, last_error=error, last_error_at=now, errors=h.errors + 1)
    if h.state == OPEN or (failures >= cfg.breaker_failures and h.state != DISABLED):
        return replace(h, state=OPEN, until=now + cfg.breaker_open_s)
    return h


def on_reply(
    h: KeyHealth,
    now: float,
    status: int | None,
    error: str | None,
    retry_after_s: float | None,
    cfg: UpstreamSettings,
    rng: random.Random,
) -> KeyHealth:
    """One upstream outcome: a status (4xx other than 401/403/429 means the key is fine) or an error."""
    outcome = tokenhub.outcome_of(status) if status is not None else tokenhub.FAILED
    if outcome == tokenhub.KEY_REJECTED:
        return on_rejected(h, now, status)
    if outcome == tokenhub.THROTTLED:
        return on_throttled(h, now, retry_after_s, cfg, rng)
    if outcome != tokenhub.FAILED:
        return on_success(h, now)
    return on_failure(h, now, error or str(status), cfg)


def on_probe(h: KeyHealth, now: float, healthy: bool, error: str, cfg: UpstreamSettings) -> KeyHealth:
    if healthy:
        return replace(h, state=OK, failures=0, until=0.0)
    return replace(h, until=now + cfg.breaker_open_s, last_error=error, last_error_at=now)


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
    ends = [h.until - now for k in keys if (h := health.get(k.name)) and h.state in (COOLDOWN, OPEN)]
    return max(1, math.ceil(min(ends))) if ends else 1


class KeyPool:
    """The configured keys, their shared health (kept in the store) and the choice per create."""

    def __init__(
        self,
        settings: UpstreamSettings,
        store: Store,
        metrics: Any,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store, self._metrics, self._clock = store, metrics, clock
        self._rng = rng or random.Random()
        self._retired: dict[str, UpstreamKey] = {}
        self.successes: dict[str, int] = {}  # bounded by the configured key names
        self.apply(settings)

    def apply(self, settings: UpstreamSettings) -> None:
        """Take a (re)loaded key list; removed keys stay known so their tasks can still be polled."""
        old = getattr(self, "by_name", {})
        self.settings = settings
        self.keys = settings.keys
        self.by_name = {k.name: k for k in settings.keys}
        for name, key in old.items():
            if name not in self.by_name:
                self._retired[name] = key
        for name in self.by_name:
            self._retired.pop(name, None)
        self.scrub = Scrubber(k.value.reveal() for k in (*self.keys, *self._retired.values()))

    def key_for(self, name: str | None) -> UpstreamKey | None:
        return self.by_name.get(name) or self._retired.get(name) if name else None

    async def health(self) -> dict[str, KeyHealth]:
        return await self._store.key_health()

    def offer(self, model: str) -> tuple[tuple[UpstreamKey, ...], float]:
        """The keys that allow the model and a draw in [0, 1), for a store that chooses one with the
        admission (as choose() does, on the health and load it reads there)."""
        return tuple(k for k in self.keys if k.allows(model)), self._rng.random()

    async def candidates(self, model: str) -> list[UpstreamKey]:
        health, in_flight = await self.health(), await self._store.key_in_flight()
        return choose(self.keys, health, in_flight, model, self._clock(), self._rng)

    async def no_key_error(self, model: str) -> NoUpstreamKey:
        health, now = await self.health(), self._clock()
        wait = earliest_retry(tuple(k for k in self.keys if k.allows(model)), health, now)
        return NoUpstreamKey("No upstream TokenHub key can take this request now; retry later.", retry_after=wait)

    async def _update(self, name: str, change: Callable[[KeyHealth], KeyHealth]) -> None:
        health = (await self.health()).get(name, HEALTHY)
        new = change(health)
        if new is health:
            return
        await self._store.save_key_health(name, new)
        now = self._clock()
        if new.current(now) != health.current(now):
            self._metrics.set_key_state(name, new.current(now))

    async def report(
        self, name: str, status: int | None, error: str | None = None, retry_after: str | None = None
    ) -> None:
        """Feed one upstream outcome (an HTTP status, or an error with no status) to the key's health."""
        now = self._clock()
        if status is not None and tokenhub.outcome_of(status) in (tokenhub.ACCEPTED, tokenhub.REFUSED):
            self.successes[name] = self.successes.get(name, 0) + 1  # this process's answers
        wait = parse_retry_after(retry_after, now) if status == 429 else None
        await self._update(name, lambda h: on_reply(h, now, status, error, wait, self.settings, self._rng))

    async def probe(self, upstream: Upstream) -> None:
        """Probe keys whose circuit has been open long enough: a poll of an unknown task, 404 = healthy."""
        now = self._clock()
        for name, h in (await self.health()).items():
            key = self.by_name.get(name)
            if key is None or not h.needs_probe(now):
                continue
            try:
                reply = await upstream.call("GET", tokenhub.task_path(tokenhub.PROBE_TASK_ID), key.value.reveal())
                status, healthy, error = reply.status, reply.status == 404, str(reply.status)
            except GatewayError as exc:
                status, healthy, error = None, False, exc.code
            if status in (401, 403):
                await self._update(name, lambda h, s=status: on_rejected(h, self._clock(), s))
            else:
                await self._update(
                    name, lambda h, ok=healthy, e=error: on_probe(h, self._clock(), ok, e, self.settings)
                )

    async def reenable(self) -> None:
        """A reload re-enables keys a 401/403 disabled: the operator may have fixed them."""
        for name, h in (await self.health()).items():
            if h.state == DISABLED:
                await self._update(name, lambda h: replace(h, state=OK, failures=0, throttles=0))

    async def refresh_gauges(self) -> None:
        health, now = await self.health(), self._clock()
        for key in self.keys:
            self._metrics.set_key_state(key.name, health.get(key.name, HEALTHY).current(now))

    async def all_disabled(self) -> bool:
        health = await self.health()
        return all(health.get(k.name, HEALTHY).state == DISABLED for k in self.keys)
