"""A faithful TokenHub stand-in (Seedance 2.0 video tasks) for the demo, tests and benchmarks.

Markers in a prompt steer its task: `sim:fail` ends it failed, `sim:never` keeps it running forever,
`sim:moderation` is refused at create, `sim:seconds=<float>` sets how long it runs, `sim:bytes=<int>` the
size of its video. A succeeded task's `video_url` and `cover_image_url` point at this simulator (signed,
expiring URLs; see gateway.simulator.media, whose `video_bytes` and `cover_bytes` give their exact bytes).
Tests steer it through the unauthenticated control API under `/_sim` (fault modes: gateway.simulator.faults):

    POST   /_sim/faults          {"key" ("*": every key), "mode", "routes"?, "count"?, "task_id"?,
                                  "retry_after"?, "delay_s"?, "status"?, "body"? | "raw"? | "patch"?, "id"?}
    GET    /_sim/faults          the active faults
    DELETE /_sim/faults[/{key}]  clear all, or one key's
    GET    /_sim/requests        the API request log ("status" null: no answer was sent; "answer" sent, cut
                                 or none); DELETE clears it and the download log
    GET    /_sim/creates         every create received: "created" the id of the task it made (null: none)
    GET    /_sim/downloads       the result-file requests, logged like API requests, with their Range
    GET    /_sim/tasks/{id}      a task's full record, with the key that created it and its request body
    GET | POST | DELETE /_sim/media   the result-file settings {"ttl_s", "video_size"}; DELETE restores them
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict
from typing import Any

import orjson
import uvicorn
from cachetools import LRUCache
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import ValidationError
from gateway.money import usd_to_micros
from gateway.policy.validation import validate
from gateway.settings import DEFAULT_PRICING
from gateway.simulator import media as sim_media
from gateway.simulator.faults import BEFORE, MEDIA, CutOff, Faults, NoAnswer, after_handler, fault_response, parse_fault
from gateway.simulator.faults import error_response as _error
from gateway.simulator.faults import json_response as _json
from gateway.simulator.media import DEFAULT_TTL_S, DEFAULT_VIDEO_SIZE, MediaSettings, Signer, cover_bytes, video_bytes
from gateway.simulator.tasks import SECONDS_MARK, SimTask, outcome_of, prompt_text, video_size

__all__ = ["create_simulator", "parse_fault", "video_bytes", "cover_bytes", "uvicorn_config", "run_simulator"]

PREFIXES = ("/api/v1", "/v1")
LOG_SIZE = 10_000

Handler = Callable[[Request, str | None, dict[str, Any]], Awaitable[Response]]


def _bearer(request: Request) -> str | None:
    scheme, token = request.headers.get("authorization", "").partition(" ")[::2]  # the " " between them dropped
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _answer_kind(response: Response) -> str:
    return "none" if isinstance(response, NoAnswer) else "cut" if isinstance(response, CutOff) else "sent"


class Simulator:
    """The state of one simulated TokenHub, and its handlers."""

    def __init__(
        self,
        keys: Collection[str] | None,
        task_seconds: float,
        clock: Callable[[], float],
        max_tasks: int,
        media: MediaSettings,
    ) -> None:
        self.keys = None if keys is None else frozenset(keys)
        self.task_seconds = task_seconds
        self.clock = clock
        self.pricing = {
            model: {res: usd_to_micros(price) for res, price in prices.items()}
            for model, prices in DEFAULT_PRICING.items()
        }
        self.tasks: LRUCache[str, SimTask] = LRUCache(max_tasks)
        self.faults = Faults()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self.downloads: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self.media_defaults = self.media = media
        self.signer = Signer()

    def accepts(self, token: str | None) -> bool:
        if token is None or not token.startswith("th-"):
            return False
        return self.keys is None or token in self.keys

    def endpoint(self, route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        log = self.downloads if route == MEDIA else self.log

        async def endpoint(request: Request) -> Response:
            token = _bearer(request)
            entry = {
                "method": request.method,
                "route": route,
                "path": request.url.path,
                "key": token,
                "task_id": request.path_params.get("task_id"),
                "status": None,
                "fault": None,
                "time": self.clock(),
                "created": None,
                "answer": None,
            }
            if route == MEDIA:
                entry["range"] = request.headers.get("range")
            log.append(entry)
            if route != MEDIA and not self.accepts(token):  # result URLs are signed, not keyed
                response = _error(401, "invalid_api_key", "Missing or invalid API key.", "authentication_error")
            else:
                response = await self._answer(request, route, handler, token, entry)
            entry["status"] = None if isinstance(response, NoAnswer) else response.status_code
            entry["answer"] = _answer_kind(response)
            return response

        return endpoint

    async def _answer(
        self, request: Request, route: str, handler: Handler, token: str | None, entry: dict[str, Any]
    ) -> Response:
        fault = self.faults.take(token, route, request.path_params.get("task_id"))
        if fault is None:
            return await handler(request, token, entry)
        entry["fault"] = fault.mode
        if fault.mode in BEFORE:
            return await fault_response(fault, request)
        if fault.mode == "slow":
            await asyncio.sleep(fault.delay_s)
        if fault.mode == "fixed_id":
            return await self.create(request, token, entry, answer_id=fault.id)
        return await after_handler(fault, request, await handler(request, token, entry))

    async def create(
        self, request: Request, key: str | None, entry: dict[str, Any], answer_id: str | None = None
    ) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "InvalidParameter", "The request body is not valid JSON.", param=None)
        try:
            req = validate(body, self.pricing)
        except ValidationError as exc:
            return _error(400, "InvalidParameter", exc.message, param=exc.param)
        text = prompt_text(body)
        if "sim:moderation" in text:
            return _error(
                400,
                "content_moderation",
                "The request was rejected by content moderation: the prompt may contain sensitive content.",
                param="prompt",
            )
        # A fixed id already taken is answered anyway (a duplicate), but must not replace the task holding it.
        stored_id = answer_id if answer_id and answer_id not in self.tasks else f"cgt-{secrets.token_hex(12)}"
        seconds = SECONDS_MARK.search(text)
        task = SimTask(
            id=stored_id,
            key=str(key),
            model=req.model,
            resolution=req.resolution,
            duration=req.duration_s,
            input_s=float(req.input_s),
            created=self.clock(),
            seconds=float(seconds[1]) if seconds else self.task_seconds,
            outcome=outcome_of(text),
            request=body,
            video_size=video_size(text, self.media.video_size),
        )
        self.tasks[task.id] = task
        entry["task_id"], entry["created"] = answer_id or task.id, task.id
        return _json(
            {
                "id": answer_id or task.id,
                "object": "video.generation.task",
                "model": task.model,
                "status": "queued",
                "created": int(task.created),
            }
        )

    async def poll(self, request: Request, key: str | None, entry: dict[str, Any]) -> Response:
        task = self._owned(request, key)
        return _json(self._task_body(request, task)) if task else _task_not_found(request)

    async def cancel(self, request: Request, key: str | None, entry: dict[str, Any]) -> Response:
        task = self._owned(request, key)
        if task is None:
            return _task_not_found(request)
        now = self.clock()
        status = task.status(now)
        if status != "queued":
            return _error(409, "task_not_cancellable", f"The task is {status}; only a queued task can be cancelled.")
        task.cancelled_at = now
        return _json(self._task_body(request, task))

    def _owned(self, request: Request, key: str | None) -> SimTask | None:
        task = self.tasks.get(request.path_params["task_id"])
        return task if task is not None and task.key == key else None

    def _task_body(self, request: Request, task: SimTask) -> dict[str, Any]:
        # The links name this server as the client reached it, so any client can fetch them.
        base = str(request.base_url).rstrip("/")
        expires = task.updated("succeeded") + self.media.ttl_s
        return task.body(self.clock(), lambda: self.signer.links(base, task.id, expires))

    async def media_file(self, request: Request, variant: str) -> Response:
        now, until = self.clock(), self.signer.valid_until(request)
        if until is None:
            return sim_media.denied("The request signature we calculated does not match the signature you provided.")
        task = self.tasks.get(request.path_params["task_id"])
        if task is None or task.status(now) != "succeeded":
            return sim_media.not_found(request.url.path)
        if now >= min(until, task.updated("succeeded") + self.media.ttl_s):
            return sim_media.denied("Request has expired.")
        return sim_media.serve(request, task.id, variant, task.video_size)

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
            self.downloads.clear()
        return _json({"data": list(self.log)})

    async def creates(self, request: Request) -> Response:
        return _json({"data": [entry for entry in self.log if entry["route"] == "create"]})

    async def download_log(self, request: Request) -> Response:
        return _json({"data": list(self.downloads)})

    async def media_settings(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.media = self.media_defaults
        elif request.method == "POST":
            try:
                self.media = sim_media.parse_media_settings(orjson.loads(await request.body()), self.media)
            except (orjson.JSONDecodeError, ValueError) as exc:
                return _error(400, "InvalidParameter", str(exc))
        return _json(asdict(self.media))

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


def _media_handler(sim: Simulator, variant: str) -> Handler:
    async def handler(request: Request, key: str | None, entry: dict[str, Any]) -> Response:
        return await sim.media_file(request, variant)

    return handler


def _routes(sim: Simulator) -> list[Route]:
    api = [
        ("", "POST", "create", sim.create),
        ("/{task_id}", "GET", "poll", sim.poll),
        ("/{task_id}", "DELETE", "delete", sim.cancel),
    ]
    routes = [
        Route(f"{prefix}/videos/generations{path}", sim.endpoint(name, handler), methods=[method])
        for prefix in PREFIXES
        for path, method, name, handler in api
    ]
    media = [
        Route(f"/media/{{task_id}}.{ext}", sim.endpoint(MEDIA, _media_handler(sim, variant)), methods=["GET", "HEAD"])
        for ext, variant in (("mp4", "video"), ("png", "cover"))
    ]
    return (
        routes
        + media
        + [
            Route("/_sim/faults", sim.add_fault, methods=["POST"]),
            Route("/_sim/faults", sim.list_faults, methods=["GET"]),
            Route("/_sim/faults", sim.clear_faults, methods=["DELETE"]),
            Route("/_sim/faults/{key}", sim.clear_faults, methods=["DELETE"]),
            Route("/_sim/requests", sim.requests, methods=["GET", "DELETE"]),
            Route("/_sim/creates", sim.creates, methods=["GET"]),
            Route("/_sim/downloads", sim.download_log, methods=["GET"]),
            Route("/_sim/media", sim.media_settings, methods=["GET", "POST", "DELETE"]),
            Route("/_sim/tasks/{task_id}", sim.task_record, methods=["GET"]),
        ]
    )


def create_simulator(
    *,
    keys: Collection[str] | None = None,
    task_seconds: float = 3.0,
    clock: Callable[[], float] = time.time,
    max_tasks: int = 200_000,
    media_ttl_s: float = DEFAULT_TTL_S,
    video_size: int = DEFAULT_VIDEO_SIZE,
) -> Starlette:
    """A simulated TokenHub; `keys` None accepts any `th-` key. Its state is `app.state.simulator`.
    `media_ttl_s` is how long result URLs stay valid after a task succeeds; `video_size` a video's bytes."""
    media = sim_media.parse_media_settings({"ttl_s": media_ttl_s, "video_size": video_size}, MediaSettings())
    sim = Simulator(keys, task_seconds, clock, max_tasks, media)
    app = Starlette(routes=_routes(sim), exception_handlers={404: _http_error, 405: _http_error})
    app.state.simulator = sim
    return app


def uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    # "auto" picks uvloop and httptools when installed; a hung request must not block shutdown.
    return uvicorn.Config(
        app, host=host, port=port, loop="auto", http="auto", log_level="warning", timeout_graceful_shutdown=2
    )


def run_simulator(host: str, port: int, **kwargs: Any) -> None:
    """Serve a simulator until interrupted; `kwargs` go to create_simulator."""
    uvicorn.Server(uvicorn_config(create_simulator(**kwargs), host, port)).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator", description="Run a simulated TokenHub API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--task-seconds", type=float, default=3.0)
    parser.add_argument(
        "--key", action="append", dest="keys", help="an accepted th- key (repeatable; default: any th- key)"
    )
    parser.add_argument(
        "--media-ttl-s", type=float, default=DEFAULT_TTL_S, help="how long result URLs stay valid after a task succeeds"
    )
    parser.add_argument("--video-size", type=int, default=DEFAULT_VIDEO_SIZE, help="the bytes of a result video")
    args = parser.parse_args(argv)
    run_simulator(
        args.host,
        args.port,
        keys=args.keys,
        task_seconds=args.task_seconds,
        media_ttl_s=args.media_ttl_s,
        video_size=args.video_size,
    )
