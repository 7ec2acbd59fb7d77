"""A faithful TokenHub stand-in (Seedance 2.0 video tasks) for the demo, tests and benchmarks.

Markers in a prompt steer its task: `sim:fail` ends it failed, `sim:never` keeps it running forever,
`sim:moderation` is refused at create, `sim:seconds=<float>` sets how long it runs.
Tests switch faults on per upstream key through the unauthenticated control API under `/_sim`:

    POST   /_sim/faults          {"key", "mode", "retry_after"?, "delay_s"?, "count"?, "routes"?}
    GET    /_sim/faults          the active faults
    DELETE /_sim/faults[/{key}]  clear all, or one key's
    GET    /_sim/requests        the API request log ("status" null: no answer was sent); DELETE clears it
    GET    /_sim/tasks/{id}      a task's full record, with the key that created it and its request body
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import uvicorn
from cachetools import LRUCache
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.config import DEFAULT_PRICING
from gateway.errors import ValidationError
from gateway.pricing import usd_to_micros
from gateway.validation import validate

PREFIXES = ("/api/v1", "/v1")
ROUTES = ("create", "poll", "delete")
MODES = ("429", "401", "403", "500", "hang", "slow", "garbage", "reset")
MEDIA_BASE = "https://cdn.tokenhub-sim.invalid/videos"
QUEUED_SHARE = 0.2   # share of a task's run time spent queued
HANG_S = 3600.0      # a hung request answers 504 after this, unless the client leaves first
LOG_SIZE = 10_000
_SECONDS_MARK = re.compile(r"sim:seconds=(\d+(?:\.\d*)?|\.\d+)")

Handler = Callable[[Request, str, dict], Awaitable[Response]]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def _error(status: int, code: str, message: str, type_: str = "invalid_request_error",
           headers: dict[str, str] | None = None, **extra: Any) -> Response:
    return _json({"error": {"code": code, "message": message, "type": type_, **extra}}, status, headers)


class _NoAnswer(Response):
    """Sends nothing: the connection was dropped on purpose, or the client has gone."""

    status_code = 0

    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


@dataclass
class SimTask:
    id: str
    key: str
    model: str
    resolution: str
    duration: int
    input_s: float
    created: float
    seconds: float
    outcome: str  # "succeeded", "failed" or "never"
    request: dict[str, Any]
    cancelled_at: float | None = None

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        elapsed = now - self.created
        if elapsed < self.seconds * QUEUED_SHARE:
            return "queued"
        if elapsed < self.seconds or self.outcome == "never":
            return "running"
        return self.outcome

    def updated(self, status: str) -> float:
        if status == "queued":
            return self.created
        if status == "running":
            return self.created + self.seconds * QUEUED_SHARE
        if status == "cancelled":
            return self.cancelled_at or self.created
        return self.created + self.seconds

    def body(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        body = {"id": self.id, "object": "video.generation.task", "model": self.model,
                "status": status, "created": int(self.created), "updated": int(self.updated(status)),
                "resolution": self.resolution, "duration": self.duration}
        if status == "succeeded":
            body["data"] = [{"video_url": f"{MEDIA_BASE}/{self.id}.mp4",
                             "cover_image_url": f"{MEDIA_BASE}/{self.id}.jpg"}]
            body["usage"] = {"video_duration": self.duration}
        elif status == "failed":
            body["error"] = {"code": "generation_failed",
                             "message": "The video could not be generated (simulated failure)."}
        return body


@dataclass
class Fault:
    key: str
    mode: str
    routes: tuple[str, ...] = ROUTES
    retry_after: int | None = None
    delay_s: float = 1.0
    count: int | None = None  # None: until cleared


def parse_fault(data: Any) -> Fault:
    """The JSON of POST /_sim/faults → a Fault; ValueError names what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("key"), str) or not data["key"]:
        raise ValueError("key is required: the upstream key the fault applies to")
    if data.get("mode") not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    routes = data.get("routes") or list(ROUTES)
    if not isinstance(routes, list) or not set(routes) <= set(ROUTES):
        raise ValueError(f"routes must be a list drawn from {', '.join(ROUTES)}")
    retry_after, count = data.get("retry_after"), data.get("count")
    delay_s = data.get("delay_s", 1.0)
    if retry_after is not None and (type(retry_after) is not int or retry_after < 0):
        raise ValueError("retry_after must be an integer ≥ 0")
    if count is not None and (type(count) is not int or count < 1):
        raise ValueError("count must be an integer ≥ 1")
    if type(delay_s) not in (int, float) or delay_s < 0:
        raise ValueError("delay_s must be a number ≥ 0")
    return Fault(data["key"], data["mode"], tuple(routes), retry_after, float(delay_s), count)


class Faults:
    """The active faults by (key, route); one fault may cover several routes and share its count."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str], Fault] = {}

    def set(self, fault: Fault) -> None:
        for route in fault.routes:
            self._active[(fault.key, route)] = fault

    def take(self, key: str, route: str) -> Fault | None:
        fault = self._active.get((key, route))
        if fault is not None and fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self._drop(lambda f: f is fault)
        return fault

    def clear(self, key: str | None = None) -> None:
        self._drop(lambda f: key is None or f.key == key)

    def listing(self) -> list[Fault]:
        return list({id(f): f for f in self._active.values()}.values())

    def _drop(self, match: Callable[[Fault], bool]) -> None:
        self._active = {k: f for k, f in self._active.items() if not match(f)}


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _prompt_text(body: dict[str, Any]) -> str:
    content = body.get("content")
    items = content if isinstance(content, list) else []
    parts = [body.get("prompt"), *(item.get("text") for item in items if isinstance(item, dict))]
    return " ".join(part for part in parts if isinstance(part, str))


def _outcome(text: str) -> str:
    return "failed" if "sim:fail" in text else "never" if "sim:never" in text else "succeeded"


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _hang(request: Request) -> Response:
    try:
        await asyncio.wait_for(_until_disconnect(request), HANG_S)
    except TimeoutError:
        return _error(504, "timeout", "The request timed out (simulated hang).", "server_error")
    return _NoAnswer()


async def _reset(request: Request) -> Response:
    # uvicorn's receive is a method of its request cycle, which holds the connection's transport.
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionResetError("simulated reset: this server exposes no connection to drop")
    with contextlib.suppress(AttributeError, OSError):  # linger 0: close with a TCP RST
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await _until_disconnect(request)
    return _NoAnswer()


async def _fault_response(fault: Fault, request: Request) -> Response:
    if fault.mode == "hang":
        return await _hang(request)
    if fault.mode == "reset":
        return await _reset(request)
    if fault.mode == "garbage":
        return Response(b"<html>upstream garbage", 200, media_type="application/json")
    if fault.mode == "429":
        headers = None if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        return _error(429, "rate_limit_exceeded", "Rate limit exceeded; slow down.",
                      "rate_limit_error", headers)
    if fault.mode == "401":
        return _error(401, "invalid_api_key", "Invalid API key.", "authentication_error")
    if fault.mode == "403":
        return _error(403, "permission_denied", "This key may not use this resource.", "permission_error")
    return _error(500, "internal_error", "Internal server error (simulated).", "server_error")


class Simulator:
    """The state of one simulated TokenHub, and its handlers."""

    def __init__(self, keys: Collection[str] | None, task_seconds: float,
                 clock: Callable[[], float], max_tasks: int) -> None:
        self.keys = None if keys is None else frozenset(keys)
        self.task_seconds = task_seconds
        self.clock = clock
        self.pricing = {model: {res: usd_to_micros(price) for res, price in prices.items()}
                        for model, prices in DEFAULT_PRICING.items()}
        self.tasks: LRUCache[str, SimTask] = LRUCache(max_tasks)
        self.faults = Faults()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    def accepts(self, token: str | None) -> bool:
        if token is None or not token.startswith("th-"):
            return False
        return self.keys is None or token in self.keys

    def endpoint(self, route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            token = _bearer(request)
            entry = {"method": request.method, "route": route, "path": request.url.path, "key": token,
                     "task_id": request.path_params.get("task_id"), "status": None, "fault": None,
                     "time": self.clock()}
            self.log.append(entry)
            response = await self._answer(request, route, handler, token, entry)
            entry["status"] = None if isinstance(response, _NoAnswer) else response.status_code
            return response
        return endpoint

    async def _answer(self, request: Request, route: str, handler: Handler, token: str | None,
                      entry: dict[str, Any]) -> Response:
        if not self.accepts(token):
            return _error(401, "invalid_api_key", "Missing or invalid API key.", "authentication_error")
        assert token is not None
        fault = self.faults.take(token, route)
        if fault is not None:
            entry["fault"] = fault.mode
            if fault.mode != "slow":
                return await _fault_response(fault, request)
            await asyncio.sleep(fault.delay_s)
        return await handler(request, token, entry)

    async def create(self, request: Request, key: str, entry: dict[str, Any]) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "InvalidParameter", "The request body is not valid JSON.", param=None)
        try:
            req = validate(body, self.pricing)
        except ValidationError as exc:
            return _error(400, "InvalidParameter", exc.message, param=exc.param)
        text = _prompt_text(body)
        if "sim:moderation" in text:
            return _error(400, "content_moderation", "The request was rejected by content moderation: "
                          "the prompt may contain sensitive content.", param="prompt")
        mark = _SECONDS_MARK.search(text)
        task = SimTask(id=f"cgt-{secrets.token_hex(12)}", key=key, model=req.model,
                       resolution=req.resolution, duration=req.duration_s, input_s=float(req.input_s),
                       created=self.clock(), seconds=float(mark[1]) if mark else self.task_seconds,
                       outcome=_outcome(text), request=body)
        self.tasks[task.id] = task
        entry["task_id"] = task.id
        return _json({"id": task.id, "object": "video.generation.task", "model": task.model,
                      "status": "queued", "created": int(task.created)})

    async def poll(self, request: Request, key: str, entry: dict[str, Any]) -> Response:
        task = self._owned(request, key)
        return _json(task.body(self.clock())) if task else _task_not_found(request)

    async def cancel(self, request: Request, key: str, entry: dict[str, Any]) -> Response:
        task = self._owned(request, key)
        if task is None:
            return _task_not_found(request)
        now = self.clock()
        status = task.status(now)
        if status != "queued":
            return _error(409, "task_not_cancellable",
                          f"The task is {status}; only a queued task can be cancelled.")
        task.cancelled_at = now
        return _json(task.body(now))

    def _owned(self, request: Request, key: str) -> SimTask | None:
        task = self.tasks.get(request.path_params["task_id"])
        return task if task is not None and task.key == key else None

    # The control API, for tests: no auth.

    async def add_fault(self, request: Request) -> Response:
        try:
            fault = parse_fault(orjson.loads(await request.body()))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _error(400, "InvalidParameter", str(exc))
        self.faults.set(fault)
        return _json({"fault": asdict(fault)})

    async def list_faults(self, request: Request) -> Response:
        return _json({"data": [asdict(f) for f in self.faults.listing()]})

    async def clear_faults(self, request: Request) -> Response:
        self.faults.clear(request.path_params.get("key"))
        return _json({"cleared": True})

    async def requests(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.log.clear()
        return _json({"data": list(self.log)})

    async def task_record(self, request: Request) -> Response:
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return _task_not_found(request)
        return _json({**asdict(task), "status": task.status(self.clock())})


def _task_not_found(request: Request) -> Response:
    return _error(404, "task_not_found", f"Task {request.path_params['task_id']} was not found.")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else "method_not_allowed"
    return _error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")


def _routes(sim: Simulator) -> list[Route]:
    api = [("", "POST", "create", sim.create), ("/{task_id}", "GET", "poll", sim.poll),
           ("/{task_id}", "DELETE", "delete", sim.cancel)]
    routes = [Route(f"{prefix}/videos/generations{path}", sim.endpoint(name, handler), methods=[method])
              for prefix in PREFIXES for path, method, name, handler in api]
    return routes + [
        Route("/_sim/faults", sim.add_fault, methods=["POST"]),
        Route("/_sim/faults", sim.list_faults, methods=["GET"]),
        Route("/_sim/faults", sim.clear_faults, methods=["DELETE"]),
        Route("/_sim/faults/{key}", sim.clear_faults, methods=["DELETE"]),
        Route("/_sim/requests", sim.requests, methods=["GET", "DELETE"]),
        Route("/_sim/tasks/{task_id}", sim.task_record, methods=["GET"]),
    ]


def create_simulator(*, keys: Collection[str] | None = None, task_seconds: float = 3.0,
                     clock: Callable[[], float] = time.time, max_tasks: int = 200_000) -> Starlette:
    """A simulated TokenHub; `keys` None accepts any `th-` key. Its state is `app.state.simulator`."""
    sim = Simulator(keys, task_seconds, clock, max_tasks)
    app = Starlette(routes=_routes(sim), exception_handlers={404: _http_error, 405: _http_error})
    app.state.simulator = sim
    return app


def uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    # "auto" picks uvloop and httptools when installed; a hung request must not block shutdown.
    return uvicorn.Config(app, host=host, port=port, loop="auto", http="auto",
                          log_level="warning", timeout_graceful_shutdown=2)


def run_simulator(host: str, port: int, **kwargs: Any) -> None:
    """Serve a simulator until interrupted; `kwargs` go to create_simulator."""
    uvicorn.Server(uvicorn_config(create_simulator(**kwargs), host, port)).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator",
                                     description="Run a simulated TokenHub API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--task-seconds", type=float, default=3.0)
    parser.add_argument("--key", action="append", dest="keys",
                        help="an accepted th- key (repeatable; default: any th- key)")
    args = parser.parse_args(argv)
    run_simulator(args.host, args.port, keys=args.keys, task_seconds=args.task_seconds)


if __name__ == "__main__":
    main()
