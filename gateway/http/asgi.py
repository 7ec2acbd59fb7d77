"""The ASGI app: starlette with the gateway's outer layers, the hot routes dispatched directly, and
errors rendered in one place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, NotFound
from gateway.http.middleware import RequestMiddleware
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.app import Gateway

# An exception handler as the gateway registers them all: async, for HTTP requests.
Handler = Callable[[Request, Exception], Awaitable[Response]]
H = TypeVar("H")


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


# The routes HotRoutes serves, by their Route names (their handlers' names in gateway.routes.generations).
HOT_CREATE = "create_task"
HOT_POLL = "get_task"


class HotRoutes:
    """Creates and polls, the two routes every app calls most, dispatched straight to their handlers;
    every other request (and any other method on these paths) goes on to starlette's router."""

    def __init__(self, app: ASGIApp, table: Sequence[BaseRoute], handlers: Mapping[Any, Handler]) -> None:
        self.app = app
        self.handlers = handlers
        routes = [r for r in table if isinstance(r, Route)]
        self.creates = {r.path: r for r in routes if r.name == HOT_CREATE}
        self.polls = [(r.path.removesuffix("{task_id}"), r) for r in routes if r.name == HOT_POLL]

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


def handler_for(handlers: Mapping[Any, H], exc: Exception) -> H | None:
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
    gateway: Gateway  # set by create_app

    def __init__(self, *, metrics: Metrics, draining: Callable[[], bool] = lambda: False, **kw: Any) -> None:
        self.metrics, self.draining = metrics, draining
        super().__init__(**kw)

    def build_middleware_stack(self) -> ASGIApp:
        handlers = dict(self.exception_handlers)
        inner = ExceptionMiddleware(self.router, handlers=handlers, debug=self.debug)
        # cast: create_app registers async handlers for HTTP requests only (on_gateway_error, on_http_error)
        app: ASGIApp = HotRoutes(inner, self.routes, cast("dict[Any, Handler]", handlers))
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return RequestMiddleware(app, metrics=self.metrics, draining=self.draining)
