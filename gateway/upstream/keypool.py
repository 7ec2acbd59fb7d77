"""The key pool: the configured upstream keys, their health shared through the store, probes of open keys.

The health arithmetic itself is pure and lives in gateway.policy.keyhealth."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from gateway import tokenhub
from gateway.errors import GatewayError, NoUpstreamKey
from gateway.metrics import Metrics
from gateway.policy.keyhealth import (
    DISABLED,
    HEALTHY,
    OK,
    KeyHealth,
    choose,
    earliest_retry,
    on_probe,
    on_rejected,
    on_reply,
)
from gateway.settings import UpstreamKey, UpstreamSettings
from gateway.tokenhub import parse_retry_after
from gateway.upstream.client import Scrubber, Upstream

if TYPE_CHECKING:
    from gateway.store.base import Store


class KeyPool:
    """The configured keys, their shared health (kept in the store) and the choice per create."""

    def __init__(
        self,
        settings: UpstreamSettings,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._retired: dict[str, UpstreamKey] = {}
        self.successes: dict[str, int] = {}  # bounded by the configured key names
        self.apply(settings)

    def apply(self, settings: UpstreamSettings) -> None:
        """Take a (re)loaded key list; removed keys stay known so their tasks can still be polled."""
        old: dict[str, UpstreamKey] = getattr(self, "by_name", {})
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

    async def health(self, fresh: bool = False) -> dict[str, KeyHealth]:
        return await self._store.key_health(fresh)

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
        await self._update(name, lambda current: on_reply(current, now, status, error, wait, self.settings, self._rng))

    async def probe(self, upstream: Upstream) -> None:
        """Probe keys whose circuit has been open long enough: a poll of an unknown task, 404 = healthy."""
        now = self._clock()
        for name, health in (await self.health()).items():
            key = self.by_name.get(name)
            if key is not None and health.needs_probe(now):
                await self._probe(key, upstream)

    async def _probe(self, key: UpstreamKey, upstream: Upstream) -> None:
        try:
            reply = await upstream.call("GET", tokenhub.task_path(tokenhub.PROBE_TASK_ID), key.value.reveal())
        except GatewayError as exc:
            error = exc.code
            await self._update(key.name, lambda current: on_probe(current, self._clock(), False, error, self.settings))
            return
        status = reply.status
        if status in (401, 403):
            await self._update(key.name, lambda current: on_rejected(current, self._clock(), status))
        else:
            await self._update(
                key.name, lambda current: on_probe(current, self._clock(), status == 404, str(status), self.settings)
            )

    async def reenable(self) -> None:
        """A reload re-enables keys a 401/403 disabled: the operator may have fixed them."""
        for name, health in (await self.health()).items():
            if health.state == DISABLED:
                await self._update(name, lambda current: replace(current, state=OK, failures=0, throttles=0))

    async def refresh_gauges(self) -> None:
        health, now = await self.health(), self._clock()
        for key in self.keys:
            self._metrics.set_key_state(key.name, health.get(key.name, HEALTHY).current(now))

    async def all_disabled(self) -> bool:
        health = await self.health()
        return all(health.get(k.name, HEALTHY).state == DISABLED for k in self.keys)
