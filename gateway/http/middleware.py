"""Plain ASGI middleware: request id, timing, the canonical log line and request metrics.

A client that leaves before its answer is complete is no error of the gateway's (SPEC §4): its request is counted
with code 499 and logged as `request.aborted`. The connection knows first: the server protocol marks the request's
scope (ENDED_WITH) when it loses the connection under it, whatever the handler was doing (reading the body, waiting
upstream, streaming a download); a handler that reads a body the client never finished also ends here with
starlette's ClientDisconnect. A crash stays a 500, gone client or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars

from gateway import logs
from gateway.context import RequestContext
from gateway.errors import GatewayError, ResponseCut, ShuttingDown
from gateway.ids import new_id
from gateway.metrics import Metrics

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
PREFIXES = ("/api/v1", "/v1")
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # still answered while shutting down
ENDED_WITH = "gateway.ended_with"  # scope key: the status a request ended with when its connection ended first
CLIENT_CLOSED = 499  # nginx's code for a client that closed its connection before the answer was complete


def request_id_from(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            rid: str = value.decode("latin-1")
            if 0 < len(rid) <= 128 and all(c in _SAFE for c in rid):
                return rid
            break
    return new_id()


def route_label(scope: Scope) -> str:
    """The route template without its /api/v1 or /v1 prefix; never a raw path."""
    route = scope.get("route")
    path: str | None = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    for prefix in PREFIXES:
        if path.startswith(prefix + "/"):
            return path[len(prefix) :]
    return path


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, draining: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.metrics = metrics
        self.draining = draining
        self.log = structlog.get_logger("gateway.request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        ctx = RequestContext(request_id_from(scope))
        scope.setdefault("state", {})["ctx"] = ctx
        bind_contextvars(request_id=ctx.request_id)  # every line logged for this request carries it
        status, started_response = 500, False
        rid_header = (b"x-request-id", ctx.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        try:
            if self.draining() and scope["path"] not in PROBES:
                await self._refuse(
                    send_with_id, ShuttingDown("The gateway is shutting down; retry on another replica.", retry_after=1)
                )
            else:
                await self.app(scope, receive, send_with_id)
            status = scope.get(ENDED_WITH, status)
        except ClientDisconnect:
            status = scope.get(ENDED_WITH, CLIENT_CLOSED)  # nothing to answer: no one is listening
        except ResponseCut:  # ended short on purpose (its reason is in the line's error_code): no crash
            status = scope.get(ENDED_WITH, status)
            raise
        except Exception:
            self.log.exception("request.crashed", request_id=ctx.request_id)
            if started_response:
                raise
            await self._crashed(send_with_id, forwarded=scope["method"] == "POST" and ctx.upstream_key is not None)
        finally:
            self._finish(scope, ctx, status, time.perf_counter() - started)

    @staticmethod
    async def _crashed(send: Send, forwarded: bool) -> None:
        """An unexpected exception becomes an OpenAI-shaped 500 that still carries the request id. After a
        create was forwarded its outcome is unknown (kept and charged as such): a blind retry could pay twice."""
        error = GatewayError("The gateway failed unexpectedly.")
        error.unknown_outcome = forwarded
        await RequestMiddleware._refuse(send, error, close=False)

    @staticmethod
    async def _refuse(send: Send, exc: GatewayError, close: bool = True) -> None:
        body = exc.json()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _finish(self, scope: Scope, ctx: RequestContext, status: int, elapsed: float) -> None:
        route, method = route_label(scope), scope["method"]
        self.metrics.observe_request(
            route, method, str(status), ctx.team or "", elapsed, max(0.0, elapsed - ctx.upstream_s)
        )
        if route in ("/healthz", "/metrics", "/readyz") and status < 400:
            return
        fields = {
            "request_id": ctx.request_id,
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
            "team": ctx.team,
            "user": ctx.user,
            "model": ctx.model,
            "resolution": ctx.resolution,
            "duration_s": ctx.duration_s,
            "task_id": ctx.task_id,
            "upstream_key": ctx.upstream_key,
            "upstream_status": ctx.upstream_status,
            "upstream_ms": round(ctx.upstream_s * 1000, 3) if ctx.upstream_key else None,
            "cost_usd": ctx.cost_usd,
            "error_code": ctx.error_code,
        }
        event = "request.aborted" if status == CLIENT_CLOSED else "request"
        if not logs.info_line(event, fields):
            self.log.info(event, **fields)
