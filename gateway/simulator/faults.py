"""Fault injection for the simulated TokenHub: what a fault is, which request it applies to, and its answer.

Modes that answer instead of the simulator (nothing is created): 429, 401, 403, 500, hang, garbage, reset.
Modes that let the real handler run first (a create still creates its task), then change its answer:
slow (waits before), late (waits after: the task exists while the client waits), answer (a scripted
status and body, or a JSON merge patch over the real body), cut (the body stops halfway and the connection
closes), fixed_id (a create answers a given id; its task is stored under that id when free).
A fault's key "*" applies to every key; its task_id, to the requests of that one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

ROUTES = ("create", "poll", "delete")
MEDIA = "media"  # result-file downloads: they carry no key, so only a fault with key "*" reaches them
ANY_KEY = "*"
BEFORE = ("429", "401", "403", "500", "hang", "garbage", "reset")
AFTER = ("slow", "late", "answer", "cut", "fixed_id")
MODES = BEFORE + AFTER
HANG_S = 3600.0  # a hung request answers 504 after this, unless the client leaves first


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    return json_response({"error": {"code": code, "message": message, "type": type_, **extra}}, status, headers)


class NoAnswer(Response):
    """Sends nothing: the connection was dropped on purpose, or the client has gone."""

    status_code = 0

    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


@dataclass
class Fault:
    key: str
    mode: str
    routes: tuple[str, ...] = ROUTES
    retry_after: int | None = None
    delay_s: float = 1.0
    count: int | None = None  # None: until cleared
    task_id: str | None = None  # only the requests of this task
    status: int | None = None  # answer: the status sent (default: the real answer's)
    body: str | None = None  # answer: the exact text sent
    patch: dict[str, Any] | None = None  # answer: a JSON merge patch (RFC 7386) over the real body
    id: str | None = None  # fixed_id: the id a create answers


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _routes(data: dict[str, Any]) -> tuple[str, ...]:
    default = ["create"] if data["mode"] == "fixed_id" else ["poll", "delete"] if data.get("task_id") else ROUTES
    routes = data.get("routes") or list(default)
    _check(
        isinstance(routes, list) and set(routes) <= {*ROUTES, MEDIA},
        f"routes must be a list drawn from {', '.join((*ROUTES, MEDIA))}",
    )
    _check(MEDIA not in routes or data["key"] == ANY_KEY, 'a media fault needs key "*": downloads carry no key')
    _check(data["mode"] != "fixed_id" or routes == ["create"], "fixed_id applies to creates only")
    _check(not data.get("task_id") or "create" not in routes, "task_id cannot apply to creates")
    return tuple(routes)


class _Answer(NamedTuple):
    """What mode "answer" sends: a status, an exact body, or a patch over the real body."""

    status: int | None
    body: str | None
    patch: dict[str, Any] | None


def _answer_fields(data: dict[str, Any]) -> _Answer:
    given = [name for name in ("body", "raw", "patch") if name in data]
    _check(len(given) <= 1, "give at most one of body, raw and patch")
    _check(not given or data["mode"] == "answer", f"{', '.join(given)} applies to mode answer only")
    status = data.get("status")
    raw = data.get("raw")
    patch = data.get("patch")
    _check(status is None or (type(status) is int and 100 <= status <= 599), "status must be an HTTP status")
    _check(status is None or data["mode"] == "answer", "status applies to mode answer only")
    _check(raw is None or isinstance(raw, str), "raw must be a string")
    _check("patch" not in data or isinstance(patch, dict), "patch must be a JSON object")
    body = orjson.dumps(data["body"]).decode() if "body" in data else raw
    return _Answer(status, body, patch)


def parse_fault(data: Any) -> Fault:
    """The JSON of POST /_sim/faults → a Fault; ValueError names what is wrong."""
    _check(
        isinstance(data, dict) and isinstance(data.get("key"), str) and bool(data["key"]),
        'key is required: the upstream key the fault applies to ("*": every key)',
    )
    _check(data.get("mode") in MODES, f"mode must be one of {', '.join(MODES)}")
    retry_after = data.get("retry_after")
    count = data.get("count")
    task_id = data.get("task_id")
    id_ = data.get("id")
    delay_s = data.get("delay_s", 1.0)
    _check(retry_after is None or (type(retry_after) is int and retry_after >= 0), "retry_after must be an integer ≥ 0")
    _check(count is None or (type(count) is int and count >= 1), "count must be an integer ≥ 1")
    _check(type(delay_s) in (int, float) and delay_s >= 0, "delay_s must be a number ≥ 0")
    _check(task_id is None or (isinstance(task_id, str) and bool(task_id)), "task_id must be a task id")
    _check((data["mode"] == "fixed_id") == (id_ is not None), "id is required with fixed_id, and only there")
    _check(id_ is None or (isinstance(id_, str) and bool(id_)), "id must be a non-empty string")
    routes = _routes(data)
    answer = _answer_fields(data)
    _check(answer.patch is None or MEDIA not in routes, "a patch needs a JSON answer: not for media")
    return Fault(
        data["key"],
        data["mode"],
        routes,
        retry_after,
        float(delay_s),
        count,
        task_id,
        answer.status,
        answer.body,
        answer.patch,
        id_,
    )


class Faults:
    """The active faults by (key, route, task id); one fault may cover several routes and share its count.
    The most specific fault wins: this key before "*", this task before every task."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str, str | None], Fault] = {}

    def set(self, fault: Fault) -> None:
        for route in fault.routes:
            self._active[(fault.key, route, fault.task_id)] = fault

    def take(self, key: str | None, route: str, task_id: str | None = None) -> Fault | None:
        keys = (key, ANY_KEY) if key is not None else (ANY_KEY,)
        tasks = (task_id, None) if task_id is not None else (None,)
        fault = next((found for k in keys for t in tasks if (found := self._active.get((k, route, t)))), None)
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


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _transport(request: Request) -> asyncio.Transport | None:
    # uvicorn's receive is a method of its request cycle, which holds the connection's transport.
    return cast("asyncio.Transport | None", getattr(getattr(request.receive, "__self__", None), "transport", None))


async def _drop_connection(request: Request, message: str, reset: bool = True) -> None:
    """Reset: an RST at once, unsent bytes discarded. Otherwise: what was sent is flushed, then a FIN."""
    transport = _transport(request)
    if transport is None:
        raise ConnectionResetError(f"{message}: this server exposes no connection to drop")
    if not reset:
        transport.close()
    else:
        with contextlib.suppress(AttributeError, OSError):  # linger 0: close with a TCP RST
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    await until_disconnect(request)


async def _hang(request: Request) -> Response:
    try:
        await asyncio.wait_for(until_disconnect(request), HANG_S)
    except TimeoutError:
        return error_response(504, "timeout", "The request timed out (simulated hang).", "server_error")
    return NoAnswer()


async def fault_response(fault: Fault, request: Request) -> Response:
    """The answer of a mode in BEFORE, given instead of the simulator's own."""
    if fault.mode == "hang":
        return await _hang(request)
    if fault.mode == "reset":
        await _drop_connection(request, "simulated reset")
        return NoAnswer()
    if fault.mode == "garbage":
        return Response(b"<html>upstream garbage", 200, media_type="application/json")
    if fault.mode == "429":
        headers = None if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        return error_response(
            429, "rate_limit_exceeded", "Rate limit exceeded; slow down.", "rate_limit_error", headers
        )
    if fault.mode == "401":
        return error_response(401, "invalid_api_key", "Invalid API key.", "authentication_error")
    if fault.mode == "403":
        return error_response(403, "permission_denied", "This key may not use this resource.", "permission_error")
    return error_response(500, "internal_error", "Internal server error (simulated).", "server_error")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = merge_patch(merged.get(name), value)
    return merged


def scripted(fault: Fault, real: Response) -> Response:
    status, real_body = fault.status or real.status_code, getattr(real, "body", b"")  # a stream has none
    if fault.body is not None:
        content = fault.body.encode()
    elif fault.patch is not None:
        content = orjson.dumps(merge_patch(orjson.loads(real_body), fault.patch))
    elif status >= 400 > real.status_code:
        server = status >= 500
        code, type_ = ("internal_error", "server_error") if server else ("invalid_request", "invalid_request_error")
        content = orjson.dumps({"error": {"code": code, "message": f"Simulated {status} answer.", "type": type_}})
    else:
        content = real_body
    return Response(content, status, media_type=real.media_type or "application/json")


class CutOff(Response):
    """The wrapped answer's headers (with its full Content-Length) and half its body, then the connection drops."""

    def __init__(self, inner: Response, request: Request) -> None:
        self.inner, self.request = inner, request
        self.status_code = inner.status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit, sent = 0, 0

        async def cutting_send(message: Message) -> None:
            nonlocal limit, sent
            if message["type"] == "http.response.start":
                length = dict(message.get("headers", [])).get(b"content-length", b"0")
                limit = int(length) // 2
                await send(message)
                return
            part = message.get("body", b"")[: limit - sent]
            sent += len(part)
            await send({"type": "http.response.body", "body": part, "more_body": True})
            if sent >= limit:
                raise _Cut

        with contextlib.suppress(_Cut):
            await self.inner(scope, receive, cutting_send)
        await _drop_connection(self.request, "simulated cut-off", reset=False)


class _Cut(Exception):
    pass


async def after_handler(fault: Fault, request: Request, real: Response) -> Response:
    """The answer of a mode in AFTER, given the real answer."""
    if fault.mode == "late":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until_disconnect(request), fault.delay_s)
            return NoAnswer()
    if fault.mode == "answer":
        return scripted(fault, real)
    if fault.mode == "cut":
        return CutOff(real, request)
    return real
