"""Client-facing and operational handlers: plain `async def f(request) -> Response`."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.context import Outcome, RequestContext
from gateway.errors import BodyTooLarge, GatewayError, InvalidJSON, RequestTimeout, StoreUnavailable, ValidationError
from gateway.http.bodies import INLINE_MAX_BYTES, loads_strict, parse_and_validate
from gateway.http.workers import BodyWorkers
from gateway.openai.bridge import seedance_meta
from gateway.policy.auth import allowed_models, check_token
from gateway.policy.pricing import micros_to_usd
from gateway.policy.quota import period_bounds, subjects_for
from gateway.store.base import Task

JSON = "application/json"
_JSON_TYPE = (b"content-type", JSON.encode())


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type=JSON)


class OutcomeResponse(Response):
    """What `Response(o.body, o.status, o.headers, media_type=JSON)` sends, its header list built directly:
    an outcome's headers are the task flow's extras, never a content-type or content-length of their own."""

    def __init__(self, o: Outcome) -> None:
        self.status_code, self.body, self.background = o.status, o.body, None
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in o.headers.items()]
        if o.status >= 200 and o.status not in (204, 304):
            raw.append((b"content-length", str(len(o.body)).encode()))
        raw.append(_JSON_TYPE)
        self.raw_headers = raw


def outcome_response(o: Outcome) -> Response:
    return OutcomeResponse(o)


def ctx_of(request: Request) -> RequestContext:
    return request.scope["state"]["ctx"]


def gw(request: Request) -> Any:
    return request.app.gateway


def header(request: Request, name: bytes) -> str | None:
    """A header's first value (`name` in lower case, as ASGI gives names): a lookup on the create path without
    building starlette's Headers, whose miss raises a KeyError for .get() to catch."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def authenticate(request: Request) -> tuple[Any, Any]:
    user, team = gw(request).auth.authenticate(header(request, b"authorization"))
    ctx = ctx_of(request)
    ctx.user, ctx.team = user.name, team.name
    return user, team


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The whole body, at most `limit` bytes, arrived within `timeout_s` (or a 408 that ends the connection)."""
    declared = header(request, b"content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The body is larger than {limit} bytes.")
    body = io.BytesIO()  # grown chunk by chunk and handed over without a copy: no whole-body memcpy on the loop
    try:
        async with asyncio.timeout(timeout_s):
            # The ASGI messages read here, not through request.stream(): an async generator per body costs more
            # than the rest of the read, and most bodies come in one message, handed over as they are.
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk, more = message.get("body", b""), message.get("more_body", False)
                if body.tell() + len(chunk) > limit:
                    raise BodyTooLarge(f"The body is larger than {limit} bytes.")
                if not more and not body.tell():
                    return chunk
                body.write(chunk)
                if not more:
                    return body.getvalue()
    except TimeoutError:
        raise RequestTimeout(
            f"The body did not arrive within {timeout_s:g} s.", headers={"Connection": "close"}
        ) from None


async def parse_json(raw: bytes, large: BodyWorkers) -> Any:
    """A JSON body, with a repeated key refused; a large one parsed in a worker process (its value comes
    back whole: for bodies whose size is in a few strings, like a create's data: URIs)."""
    if len(raw) <= INLINE_MAX_BYTES:
        return loads_strict(raw)
    return await large.run(loads_strict, raw)


async def create_task(request: Request) -> Response:
    g = gw(request)
    user, team = authenticate(request)
    ctx = ctx_of(request)
    idem_key = header(request, b"idempotency-key")
    if idem_key is not None and not 0 < len(idem_key) <= 255:
        raise ValidationError("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    raw = await read_body(request, g.settings.server.max_body_bytes, g.settings.server.body_timeout_s)
    try:
        checked = await parse_and_validate(raw, g.settings.pricing, g.large_bodies, hashed=idem_key is not None)
    except InvalidJSON:
        raise
    except ValidationError as exc:
        g.metrics.validation_errors.labels(_bounded_param(exc.param)).inc()
        raise
    req = checked.request
    ctx.model, ctx.resolution, ctx.duration_s = req.model, req.resolution, req.duration_s
    return outcome_response(
        await g.tasks.create(
            user, team, checked.body_hash, raw, req, idem_key, ctx, meta=seedance_meta(req.aspect_ratio)
        )
    )


async def get_task(request: Request) -> Response:
    g = gw(request)
    user, team = authenticate(request)
    ctx = ctx_of(request)
    task = await g.polls.owned(request.path_params["task_id"], team.name)
    ctx.task_id, ctx.model, ctx.resolution, ctx.duration_s = (
        task.task_id,
        task.model,
        task.resolution,
        task.duration_s,
    )
    outcome = await g.polls.poll(task, ctx)
    headers = await g.tasks.rate_headers(subjects_for(user, team, g.clock()))
    return Response(outcome.body, outcome.status, {**outcome.headers, **headers}, media_type=JSON)


async def cancel_task(request: Request) -> Response:
    g = gw(request)
    _, team = authenticate(request)
    ctx = ctx_of(request)
    task = await g.polls.owned(request.path_params["task_id"], team.name)
    ctx.task_id, ctx.model = task.task_id, task.model
    return outcome_response(await g.polls.cancel(task, ctx))


async def list_tasks(request: Request) -> Response:
    g = gw(request)
    _, team = authenticate(request)
    q = request.query_params
    limit = int_param(q.get("limit"), "limit", 20, 1, 100)
    tasks, more = await g.store.list_tasks(team.name, limit, q.get("after") or None, q.get("status") or None)
    data = [task_item(t) for t in tasks]
    return json_response(
        {
            "object": "list",
            "data": data,
            "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


def task_item(t: Task) -> dict[str, Any]:
    return {
        "id": t.task_id,
        "object": "video.generation.task",
        "model": t.model,
        "status": t.status,
        "created": int(t.created_at),
        "user": t.user,
        "resolution": t.resolution,
        "duration": t.duration_s,
        "estimated_cost_usd": micros_to_usd(t.estimate_micros),
        "cost_usd": None if t.cost_micros is None else micros_to_usd(t.cost_micros),
        "billed_seconds": None if t.billed_ms is None else t.billed_ms / 1000,
        "settled_at": None if t.settled_at is None else int(t.settled_at),
    }


async def list_models(request: Request) -> Response:
    g = gw(request)
    user, team = authenticate(request)
    data = [
        {
            "id": m,
            "object": "model",
            "owned_by": "bytedance",
            "pricing": {res: micros_to_usd(p) for res, p in g.settings.pricing[m].items()},
        }
        for m in allowed_models(g.settings, user, team)
    ]
    return json_response({"object": "list", "data": data})


async def usage(request: Request) -> Response:
    g = gw(request)
    user, team = authenticate(request)
    now = g.clock()
    subjects = subjects_for(user, team, now)
    figures = await g.store.usage(subjects)
    start, end = period_bounds(team.limits.period, now)
    return json_response(
        {
            "period": {
                "kind": team.limits.period,
                "start": start and start.isoformat(),
                "end": end and end.isoformat(),
            },
            "user": usage_figures(subjects[0], figures[0]),
            "team": usage_figures(subjects[1], figures[1]),
        }
    )


def usage_figures(subject: Any, u: Any) -> dict[str, Any]:
    lim, c = subject.limits, u.counters
    remaining = None
    if lim.budget_micros is not None:
        remaining = micros_to_usd(lim.budget_micros - c.spent_micros - c.reserved_micros)
    return {
        "name": subject.name,
        "period": subject.period,
        "spent_usd": micros_to_usd(c.spent_micros),
        "reserved_usd": micros_to_usd(c.reserved_micros),
        "budget_usd": None if lim.budget_micros is None else micros_to_usd(lim.budget_micros),
        "remaining_usd": remaining,
        "video_seconds_spent": c.spent_ms / 1000,
        "video_seconds_reserved": c.reserved_ms / 1000,
        "video_seconds_budget": lim.video_seconds,
        "tasks_in_flight": u.in_flight,
        "max_concurrent_tasks": lim.max_concurrent_tasks,
        "requests_per_minute": lim.requests_per_minute,
    }


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    g = gw(request)
    problems = []
    try:
        await asyncio.wait_for(g.store.ping(), timeout=2)
    except (GatewayError, TimeoutError):
        problems.append("store_unavailable")
    else:
        if await g.pool.all_disabled():
            problems.append("all_upstream_keys_disabled")
    if g.draining:
        problems.append("shutting_down")
    return json_response(
        {"status": "not_ready" if problems else "ready", "problems": problems}, 503 if problems else 200
    )


async def metrics(request: Request) -> Response:
    g = gw(request)
    token = g.settings.server.metrics_token
    if token is not None:
        check_token(request.headers.get("authorization"), token)
    try:
        await g.refresh_gauges()
    except StoreUnavailable:
        pass  # serve what we have: a scrape must not fail because the store blinked
    return Response(g.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ValidationError(f"{name} must be an integer from {low} to {high}.", param=name)
    return int(value)


def _bounded_param(param: str | None) -> str:
    """`content[2].role` → `content[].role`, so the metric label stays bounded."""
    if not param:
        return "body"
    out, skip = [], False
    for ch in param:
        if ch == "[":
            skip = True
            out.append("[]")
        elif ch == "]":
            skip = False
        elif not skip:
            out.append(ch)
    return "".join(out)[:64]
