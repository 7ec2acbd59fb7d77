"""TokenHub calls made with one of the pool's keys: each counted, timed and fed to that key's health."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.errors import GatewayError, StoreUnavailable
from gateway.metrics import Metrics
from gateway.settings import UpstreamKey
from gateway.upstream.client import AnswerTooLarge, Reply, Upstream
from gateway.upstream.keypool import KeyPool


class UpstreamCalls:
    def __init__(self, upstream: Upstream, pool: KeyPool, metrics: Metrics) -> None:
        self.upstream = upstream
        self.pool = pool
        self.metrics = metrics

    async def call(
        self, key: UpstreamKey, route: str, method: str, path: str, body: bytes | None, ctx: RequestContext | None
    ) -> Reply:
        """`route` is TokenHub's route template, the `route` label of the upstream metrics."""
        metrics = self.metrics
        try:
            reply = await self.upstream.call(method, path, key.value.reveal(), body)
        except AnswerTooLarge as exc:  # TokenHub answered, the key works: counted as the status it sent
            metrics.child(metrics.upstream_requests, key.name, route, str(exc.upstream_status)).inc()
            await self._report(key.name, exc.upstream_status, None)
            raise
        except GatewayError as exc:
            metrics.child(metrics.upstream_requests, key.name, route, str(exc.status)).inc()
            await self._report(key.name, None, exc.code)
            raise
        metrics.child(metrics.upstream_requests, key.name, route, str(reply.status)).inc()
        metrics.child(metrics.upstream_duration, route).observe(reply.elapsed)
        if ctx is not None:
            ctx.upstream_s += reply.elapsed
            ctx.upstream_status = reply.status
        await self._report(key.name, reply.status, None, reply.retry_after)
        return reply

    async def _report(
        self, key_name: str, status: int | None, error: str | None, retry_after: str | None = None
    ) -> None:
        try:
            await self.pool.report(key_name, status, error, retry_after)
        except StoreUnavailable:
            pass  # key health is advisory; the request itself must not fail for it
