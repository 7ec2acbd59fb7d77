"""Signed webhooks to operator-configured endpoints (SPEC §13): the events a terminal task leaves in the
outbox, and their delivery in the background, Standard Webhooks signed, at least once.

Each attempt is leased in the store, so one replica delivers an event while its lease runs (a crash mid-attempt
lets another deliver it again after LEASE_S: receivers deduplicate on `webhook-id`). The number of attempts at
once per endpoint is bounded by its `max_in_flight`, across replicas. Nothing here is on a request's path:
settling a task only writes its events."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.settings import WebhookEndpoint
from gateway.store.base import Store, Task
from gateway.store.outbox import WEBHOOK_TOPIC, Item, webhook_topic

TIMEOUT_S = 10.0  # a 2xx within this is a delivery
LEASE_S = 2 * TIMEOUT_S  # an attempt's hold on its event; past it, another replica may try
WINDOW_S = 24 * 3600.0  # retried this long after the event, then given up
MAX_BACKOFF_S = 3600.0
TICK_S = 1.0
STOP_WAIT_S = 2.0
USER_AGENT = "tokenhub-gateway-webhooks/1"


def event_type(status: str) -> str:
    return "video.completed" if status == "succeeded" else "video.failed"


def event_items(
    endpoints: Iterable[WebhookEndpoint], task: Task, status: str, billed_ms: int, cost_micros: int, now: float
) -> list[Item]:
    """One event per endpoint that wants this task's terminal status, each with an id of its own."""
    kind = event_type(status)
    items = []
    for ep in endpoints:
        if not ep.wants(kind, task.team):
            continue
        event_id = "evt_" + secrets.token_hex(12)
        payload = {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created_at": int(now),
            "data": {
                "id": task.task_id or task.rid,
                "status": "completed" if kind == "video.completed" else "failed",
                "tokenhub_status": status,
                "team": task.team,
                "user": task.user,
                "model": task.model,
                "cost_usd": micros_to_usd(cost_micros),
                "video_seconds": billed_ms / 1000,
            },
        }
        items.append(Item(event_id, webhook_topic(ep.name), orjson.dumps(payload), now))
    return items


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `webhook-signature`: v1, base64 HMAC-SHA256 of `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, item: Item, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": item.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, item.id, timestamp, item.payload),
    }


def backoff_s(initial: float, attempts: int) -> float:
    """After the n-th failed attempt: initial × 2^(n-1), capped at an hour."""
    return min(MAX_BACKOFF_S, initial * 2.0 ** min(max(0, attempts - 1), 30))


def redacted(url: str) -> str:
    """A URL as an admin may see it: no user name, password or query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?***" if parts.query else "")


class Deliverer:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float],
        endpoints: tuple[WebhookEndpoint, ...],
        window_s: float = WINDOW_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.endpoints = {ep.name: ep for ep in endpoints}
        self.log = structlog.get_logger("gateway.webhooks")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._attempts: dict[asyncio.Task[None], Item] = {}
        self._busy: dict[str, int] = {}  # endpoint → this replica's attempts now
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        self._wake.set()

    async def apply(self, endpoints: tuple[WebhookEndpoint, ...]) -> None:
        """A reload: the events of endpoints no longer configured are given up."""
        self.endpoints = {ep.name: ep for ep in endpoints}
        dropped = await self.store.outbox_drop_topics(
            WEBHOOK_TOPIC, frozenset(webhook_topic(n) for n in self.endpoints), await self.store.now()
        )
        if dropped:
            self.log.warning("webhook.endpoint_removed", gave_up=dropped)
        self.wake()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        )
        try:
            await self._guarded(self.apply(tuple(self.endpoints.values())))
            while not self._stop.is_set():
                self._wake.clear()
                for ep in list(self.endpoints.values()):
                    await self._guarded(self._claim(ep))
                await self._guarded(self.refresh_backlog())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=TICK_S)
                except TimeoutError:
                    pass
        finally:
            await self._finish()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _finish(self) -> None:
        """Attempts still running after STOP_WAIT_S are cut and scheduled again at once."""
        if self._attempts:
            await asyncio.wait(list(self._attempts), timeout=STOP_WAIT_S)
        cut = list(self._attempts.items())
        for job, _ in cut:
            job.cancel()
        for job, item in cut:
            await asyncio.gather(job, return_exceptions=True)
            await self._guarded(self.store.outbox_retry(item, self.clock(), "cut by a shutdown", self.clock()))
        if self._session is not None:
            await self._session.close()

    async def _guarded(self, work: Awaitable[object]) -> None:
        try:
            await work
        except GatewayError as exc:  # the store is away: the next tick tries again
            self.log.warning("webhook.store_failed", error_code=exc.code)
        except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
            self.log.exception("webhook.step_crashed")

    async def _claim(self, ep: WebhookEndpoint) -> None:
        if self._busy.get(ep.name, 0) >= ep.max_in_flight:
            return
        name = ep.name
        items = await self.store.outbox_claim(webhook_topic(name), ep.max_in_flight, await self.store.now(), LEASE_S)
        for item in items:
            self._busy[name] = self._busy.get(name, 0) + 1
            job = asyncio.ensure_future(self._guarded(self._attempt(ep, item)))
            self._attempts[job] = item
            job.add_done_callback(lambda done: self._done(done, name))

    def _done(self, job: asyncio.Task[None], name: str) -> None:
        self._attempts.pop(job, None)
        self._busy[name] -= 1
        self._wake.set()  # room for the next event of this endpoint

    async def _attempt(self, ep: WebhookEndpoint, item: Item) -> None:
        error = await self._post(ep, item)
        now = await self.store.now()
        metrics = self.metrics
        log = self.log.bind(endpoint=ep.name, event_id=item.id, attempt=item.attempts)
        if error is None:
            await self.store.outbox_done(item, now)
            metrics.child(metrics.webhook_deliveries, ep.name, "ok").inc()
            log.info("webhook.delivered")
        elif now >= item.created_at + self.window_s:
            await self.store.outbox_give_up(item, error, now)
            metrics.child(metrics.webhook_deliveries, ep.name, "gave_up").inc()
            log.warning("webhook.gave_up", error=error)
        else:
            next_at = min(now + backoff_s(ep.retry_initial_s, item.attempts), item.created_at + self.window_s)
            await self.store.outbox_retry(item, next_at, error, now)
            metrics.child(metrics.webhook_deliveries, ep.name, "failed").inc()
            log.info("webhook.failed", error=error, retry_in_s=round(next_at - now, 3))

    async def _post(self, ep: WebhookEndpoint, item: Item) -> str | None:
        """None when the endpoint answered 2xx in time, else what went wrong (no URL in it)."""
        session = cast(aiohttp.ClientSession, self._session)  # run() opens it before any attempt
        try:
            async with session.post(
                ep.url.reveal(),
                data=item.payload,
                allow_redirects=False,
                headers=headers(ep.secret.reveal(), item, self.clock()),
            ) as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return f"connection failed: {exc.__class__.__name__}"

    async def refresh_backlog(self) -> None:
        names = list(self.endpoints)
        if not names:
            return
        stats = await self.store.outbox_stats([webhook_topic(n) for n in names])
        for name in names:
            self.metrics.child(self.metrics.webhook_backlog, name).set(stats[webhook_topic(name)].backlog)
