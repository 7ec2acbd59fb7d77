"""create_app(): the gateway's long-lived parts, its routes and its middleware."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
import time
from collections.abc import AsyncIterator, Callable

import prometheus_client
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException

from gateway.config import ConfigError, load_settings
from gateway.console.routes import console_routes
from gateway.delivery.archive import make_archive
from gateway.delivery.content import MediaFetcher
from gateway.delivery.webhooks import Deliverer
from gateway.errors import GatewayError
from gateway.flow.alerts import budgets_changed
from gateway.flow.creates import Tasks
from gateway.flow.poller import Poller
from gateway.flow.polls import Polls, task_records
from gateway.flow.roster import RosterSync
from gateway.flow.settlement import Settlement
from gateway.http.asgi import GatewayApp, on_gateway_error, on_http_error
from gateway.http.workers import BodyWorkers
from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.policy.auth import Authenticator
from gateway.policy.directory import Directory
from gateway.routes.table import route_table
from gateway.routes.videos_input import Uploads
from gateway.settings import Settings
from gateway.store import open_store
from gateway.store.base import Store
from gateway.tenancy import RELOAD
from gateway.upstream.calls import UpstreamCalls
from gateway.upstream.client import HttpUpstream, Upstream
from gateway.upstream.keypool import KeyPool

MAX_LARGE_BODIES = 4


class Gateway:
    """Everything a handler needs, made once per app."""

    def __init__(
        self, settings: Settings, store: Store, upstream: Upstream, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self.directory = Directory(settings)  # the config's teams and users; the store's come with roster.start()
        self.auth = Authenticator(self.directory, clock)
        self.roster = RosterSync(store, self.directory, self.auth.uses, clock)
        self.pool = KeyPool(settings.upstream, store, metrics, clock)
        calls = UpstreamCalls(upstream, self.pool, metrics)
        records = task_records()
        self.settlement = Settlement(settings, store, metrics, clock)
        self.tasks = Tasks(settings, store, calls, self.pool, self.settlement, metrics, records, clock)
        self.polls = Polls(store, calls, self.pool, self.settlement, records, clock)
        self.poller = Poller(
            settings, store, self.tasks, self.polls, self.settlement, self.pool, upstream, metrics, clock
        )
        self.webhooks = Deliverer(store, metrics, clock, settings.webhooks)
        self.archive = make_archive(
            settings.archive, settings.upstream, store, metrics, clock
        )  # a change needs a restart
        self.settlement.archiving = self.archive is not None
        self.settlement.on_outbox = self._wake_outbox
        self.settlement.members = self.directory  # budget alerts check the limits in force, the store's too
        self.large_bodies = BodyWorkers(MAX_LARGE_BODIES)  # parsed and checked in worker processes
        self.large_uploads = asyncio.Semaphore(MAX_LARGE_BODIES)  # OpenAI-shape uploads, checked in threads
        self.uploads = Uploads()  # OpenAI-shape uploads in flight, within server.max_uploads_in_flight
        self.media = MediaFetcher(settings.upstream)  # result files, for the OpenAI shape's /content
        self.draining = False
        self.drain_deadline = math.inf  # time.monotonic() by which a shutdown must be done
        self.log = structlog.get_logger("gateway")

    def _wake_outbox(self) -> None:
        self.webhooks.wake()
        if self.archive:
            self.archive.wake()

    def begin_drain(self) -> None:
        """A shutdown starts (SIGTERM): new requests are refused, the grace period runs from now."""
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.server.shutdown_grace_s
            # Called from the SIGTERM handler, which may have interrupted this thread inside a log write that
            # holds the log's lock: the line is written by the event loop, never from inside the handler.
            say = functools.partial(self.log.info, "gateway.draining", grace_s=self.settings.server.shutdown_grace_s)
            loop = asyncio._get_running_loop()
            if loop is None:
                say()
            else:
                loop.call_soon_threadsafe(say)

    async def reload(self, actor: str = RELOAD) -> list[str]:
        """Re-read the config file; a bad one is refused and the old one stays. What it changed is audited."""
        if not self.settings.source:
            return ["this gateway was not started from a config file"]
        try:
            new = await asyncio.to_thread(load_settings, self.settings.source)
        except ConfigError as exc:
            self.log.warning("config.reload_refused", problems=exc.problems)
            return exc.problems
        if new.store.url != self.settings.store.url:
            self.log.warning("config.store_change_ignored", reason="a store change needs a restart")
        old, self.settings = self.settings, new
        self.tasks.settings = new
        self.settlement.settings = new
        self.poller.settings = new
        await self.roster.reloaded(old, new, actor)
        for scope, name in budgets_changed(old, new):  # a budget lowered below the spend: its alerts
            await self.settlement.budget_changed(scope, name)
        self.pool.apply(new.upstream)
        await self.pool.reenable()
        await self.webhooks.apply(new.webhooks)
        self.log.info("config.reloaded", users=len(new.users), teams=len(new.teams), keys=len(new.upstream.keys))
        return []

    async def refresh_gauges(self) -> None:
        """Gauges that read shared state, refreshed per scrape: O(teams + keys), never O(ledger)."""
        now = self.clock()
        subjects = self.directory.team_subjects(now)
        for subject, usage in zip(subjects, await self.store.usage(subjects), strict=True):
            self.metrics.tasks_in_flight.labels(subject.name).set(usage.in_flight)
            budget = subject.limits.budget_micros
            if budget is not None:
                counters = usage.counters
                self.metrics.budget_usd.labels(subject.name).set(micros_to_usd(budget))
                self.metrics.budget_remaining_usd.labels(subject.name).set(
                    micros_to_usd(budget - counters.spent_micros - counters.reserved_micros)
                )
        await self.pool.refresh_gauges()
        self.metrics.poller_backlog.set(await self.store.backlog())
        await self.webhooks.refresh_backlog()


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    store: Store | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    run_poller: bool = True,
) -> GatewayApp:
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
    metrics = metrics or Metrics()
    store = store if store is not None else open_store(settings.store, clock)
    upstream = upstream or HttpUpstream(settings.upstream)
    gateway = Gateway(settings, store, upstream, metrics, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        await gateway.roster.start()
        roster = asyncio.create_task(gateway.roster.run())
        await gateway.pool.refresh_gauges()
        poller = asyncio.create_task(gateway.poller.run()) if run_poller else None
        webhooks = asyncio.create_task(gateway.webhooks.run()) if run_poller else None
        archive = asyncio.create_task(gateway.archive.run()) if run_poller and gateway.archive else None
        _on_sighup(gateway)
        gateway.log.info(
            "gateway.started",
            store=settings.store.url.reveal().split("://")[0],
            keys=len(settings.upstream.keys),
            users=len(settings.users),
        )
        try:
            yield
        finally:
            gateway.begin_drain()  # when the server stops for a reason other than a signal
            gateway.poller.stop()
            gateway.webhooks.stop()
            gateway.roster.stop()
            if gateway.archive:
                gateway.archive.stop()
            for job in (poller, webhooks, archive, roster):
                if job is not None:
                    await job
            # Creates already forwarded finish, or are recorded as unknown, before the session closes.
            await gateway.tasks.drain(gateway.drain_deadline - time.monotonic())
            await upstream.close()
            await gateway.media.close()
            await store.close()
            gateway.large_bodies.close()
            gateway.log.info("gateway.stopped")

    app = GatewayApp(
        routes=route_table() + (console_routes() if settings.server.console else []),
        lifespan=lifespan,
        metrics=metrics,
        draining=lambda: gateway.draining,
        exception_handlers={GatewayError: on_gateway_error, HTTPException: on_http_error},
    )
    app.router.redirect_slashes = False
    app.gateway = gateway
    return app


def _on_sighup(gateway: Gateway) -> None:
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        job = loop.create_task(gateway.reload())
        background.add(job)
        job.add_done_callback(background.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reload)
