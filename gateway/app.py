"""create_app(): the gateway's long-lived parts, its routes and its middleware."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import prometheus_client
import structlog
from cachetools import LRUCache
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import ConfigError, Settings, load_settings
from gateway.delivery.archive import make_archive
from gateway.delivery.content import MediaFetcher
from gateway.delivery.webhooks import Deliverer
from gateway.errors import GatewayError, NotFound
from gateway.flow.creates import Tasks
from gateway.flow.poller import Poller
from gateway.flow.polls import Polls
from gateway.flow.settlement import Settlement
from gateway.http.middleware import PREFIXES, RequestMiddleware
from gateway.http.workers import BodyWorkers
from gateway.metrics import Metrics
from gateway.policy.auth import Authenticator
from gateway.policy.pricing import micros_to_usd
from gateway.policy.quota import team_subjects
from gateway.routes import admin, videos
from gateway.routes import generations as routes
from gateway.store import open_store
from gateway.store.base import Store, Task
from gateway.upstream.calls import UpstreamCalls
from gateway.upstream.client import HttpUpstream, Upstream
from gateway.upstream.keypool import KeyPool

MAX_LARGE_BODIES = 4


class Gateway:
    """Everything a handler needs, made once per app."""

    def __init__(
        self, settings: Settings, store: Store, upstream: Upstream, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.settings, self.store, self.upstream, self.metrics, self.clock = (settings, store, upstream, metrics, clock)
        self.auth = Authenticator(settings)
        self.pool = KeyPool(settings.upstream, store, metrics, clock)
        calls = UpstreamCalls(upstream, self.pool, metrics)
        records: LRUCache[str, Task] = LRUCache(maxsize=10_000)
        self.settlement = Settlement(settings, store, metrics, clock)
        self.tasks = Tasks(settings, store, calls, self.pool, self.settlement, metrics, records, clock)
        self.polls = Polls(store, calls, self.pool, self.settlement, records, clock)
        self.poller = Poller(
            settings, store, self.tasks, self.polls, self.settlement, self.pool, upstream, metrics, clock
        )
        self.webhooks = Deliverer(store, metrics, clock, settings.webhooks)
        self.archive = make_archive(settings.archive, store, metrics, clock)  # a change needs a restart
        self.settlement.archiving = self.archive is not None
        self.settlement.on_outbox = lambda: (self.webhooks.wake(), self.archive and self.archive.wake())
        self.large_bodies = BodyWorkers(MAX_LARGE_BODIES)  # parsed and checked in worker processes
        self.large_uploads = asyncio.Semaphore(MAX_LARGE_BODIES)  # OpenAI-shape uploads, checked in threads
        self.media = MediaFetcher(settings.upstream)  # result files, for the OpenAI shape's /content
        self.draining = False
        self.drain_deadline = math.inf  # time.monotonic() by which a shutdown must be done
        self.log = structlog.get_logger("gateway")

    def begin_drain(self) -> None:
        """A shutdown starts (SIGTERM): new requests are refused, the grace period runs from now."""
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.settings.server.shutdown_grace_s
            self.log.info("gateway.draining", grace_s=self.settings.server.shutdown_grace_s)

    async def reload(self) -> list[str]:
        """Re-read the config file; a bad one is refused and the old one stays."""
        if not self.settings.source:
            return ["this gateway was not started from a config file"]
        try:
            new = await asyncio.to_thread(load_settings, self.settings.source)
        except ConfigError as exc:
            self.log.warning("config.reload_refused", problems=exc.problems)
            return exc.problems
        if new.store.url != self.settings.store.url:
            self.log.warning("config.store_change_ignored", reason="a store change needs a restart")
        self.settings = self.tasks.settings = self.settlement.settings = self.poller.settings = new
        self.auth = Authenticator(new)
        self.pool.apply(new.upstream)
        await self.pool.reenable()
        await self.webhooks.apply(new.webhooks)
        self.log.info("config.reloaded", users=len(new.users), teams=len(new.teams), keys=len(new.upstream.keys))
        return []

    async def refresh_gauges(self) -> None:
        """Gauges that read shared state, refreshed per scrape: O(teams + keys), never O(ledger)."""
        now = self.clock()
        subjects = team_subjects(self.settings, now)
        for s, u in zip(subjects, await self.store.usage(subjects), strict=True):
            self.metrics.tasks_in_flight.labels(s.name).set(u.in_flight)
            if s.limits.budget_micros is not None:
                c = u.counters
                self.metrics.budget_usd.labels(s.name).set(micros_to_usd(s.limits.budget_micros))
                self.metrics.budget_remaining_usd.labels(s.name).set(
                    micros_to_usd(s.limits.budget_micros - c.spent_micros - c.reserved_micros)
                )
        await self.pool.refresh_gauges()
        self.metrics.poller_backlog.set(await self.store.backlog())
        await self.webhooks.refresh_backlog()


def error_response(exc: GatewayError) -> Response:
    return Response(exc.json(), exc.status, exc.headers(), media_type="application/json")


async def on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    ctx = request.scope.get("state", {}).get("ctx")
    if ctx is not None:
        ctx.error_code = exc.code
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        err = GatewayError("Method not allowed on this route.", code="method_not_allowed")
        err.status, err.type = 405, "invalid_request_error"
    else:
        err = NotFound(f"No route {request.url.path}.", code="route_not_found")
    return await on_gateway_error(request, err)


def route_table() -> list[Route]:
    client = [
        ("/videos/generations", routes.create_task, ["POST"]),
        ("/videos/generations", routes.list_tasks, ["GET"]),
        ("/videos/generations/{task_id}", routes.get_task, ["GET"]),
        ("/videos/generations/{task_id}", routes.cancel_task, ["DELETE"]),
        ("/videos", videos.create_video, ["POST"]),
        ("/videos", videos.list_videos, ["GET"]),
        *((f"/videos/{feature}", videos.not_offered(feature), ["POST"]) for feature in videos.NOT_OFFERED),
        ("/videos/characters/{character_id}", videos.not_offered("characters"), ["GET"]),
        ("/videos/{video_id}", videos.get_video, ["GET"]),
        ("/videos/{video_id}", videos.delete_video, ["DELETE"]),
        ("/videos/{video_id}/content", videos.video_content, ["GET"]),
        ("/videos/{video_id}/remix", videos.remix_video, ["POST"]),
        ("/models", routes.list_models, ["GET"]),
        ("/usage", routes.usage, ["GET"]),
    ]
    table = [Route(prefix + path, fn, methods=methods) for prefix in PREFIXES for path, fn, methods in client]
    return table + [
        Route("/healthz", routes.healthz, methods=["GET"]),
        Route("/readyz", routes.readyz, methods=["GET"]),
        Route("/metrics", routes.metrics, methods=["GET"]),
        Route("/admin/usage", admin.admin_usage, methods=["GET"]),
        Route("/admin/keys", admin.admin_keys, methods=["GET"]),
        Route("/admin/teams", admin.admin_teams, methods=["GET"]),
        Route("/admin/reload", admin.admin_reload, methods=["POST"]),
        Route("/admin/webhooks", admin.admin_webhooks, methods=["GET"]),
        Route("/admin/tasks/{task_id}/void", admin.admin_void_task, methods=["POST"]),
        Route("/admin/tasks/{task_id}/settle", admin.admin_settle_task, methods=["POST"]),
    ]


class HotRoutes:
    """Creates and polls, the two routes every app calls most, dispatched straight to their handlers;
    every other request (and any other method on these paths) goes on to starlette's router."""

    def __init__(self, app: ASGIApp, table: list[Any], handlers: Mapping[Any, Callable]) -> None:
        self.app, self.handlers = app, handlers
        self.creates = {r.path: r for r in table if getattr(r, "endpoint", None) is routes.create_task}
        self.polls = [
            (r.path.removesuffix("{task_id}"), r) for r in table if getattr(r, "endpoint", None) is routes.get_task
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            method, path = scope["method"], scope["path"]
            if method == "POST":
                route = self.creates.get(path)
                if route is not None:
                    await self._handle(route, scope, receive, send)
                    return
            elif method == "GET":
                for prefix, route in self.polls:
                    if path.startswith(prefix):
                        task_id = path[len(prefix) :]
                        if task_id and "/" not in task_id:
                            scope["path_params"] = {"task_id": task_id}
                            await self._handle(route, scope, receive, send)
                            return
                        break
        await self.app(scope, receive, send)

    async def _handle(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = handler_for(self.handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def handler_for(handlers: Mapping[Any, Callable], exc: Exception) -> Callable | None:
    """The registered handler for an exception's class or its nearest base, as starlette looks it up."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


class GatewayApp(Starlette):
    """Starlette with the gateway's own outer layers: the request middleware (ids, log line, metrics,
    an OpenAI-shaped 500), then any `middleware=` given, then the hot routes (errors rendered by the
    same handler table as every route), then starlette's exception handling and router."""

    # The Gateway, as a plain attribute rather than in app.state: every read of app.state costs a failed
    # attribute lookup (an AttributeError made and dropped) before State.__getattr__ finds it.
    gateway: Gateway

    def __init__(self, *, metrics: Metrics, draining: Callable[[], bool] = lambda: False, **kw: Any) -> None:
        self.metrics, self.draining = metrics, draining
        super().__init__(**kw)

    def build_middleware_stack(self) -> ASGIApp:
        handlers = dict(self.exception_handlers)
        inner = ExceptionMiddleware(self.router, handlers=handlers, debug=self.debug)
        app: ASGIApp = HotRoutes(inner, self.routes, handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return RequestMiddleware(app, metrics=self.metrics, draining=self.draining)


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    store: Store | None = None,
    metrics: Metrics | None = None,
    clock: Callable[[], float] = time.time,
    run_poller: bool = True,
) -> GatewayApp:
    prometheus_client.disable_created_metrics()
    metrics = metrics or Metrics()
    store = store if store is not None else open_store(settings.store, clock)
    upstream = upstream or HttpUpstream(settings.upstream)
    gateway = Gateway(settings, store, upstream, metrics, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
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
            if gateway.archive:
                gateway.archive.stop()
            for job in (poller, webhooks, archive):
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
        routes=route_table(),
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
    background: set[asyncio.Task] = set()

    def reload() -> None:
        job = loop.create_task(gateway.reload())
        background.add(job)
        job.add_done_callback(background.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reload)
