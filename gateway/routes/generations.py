"""Client-facing and operational handlers: plain `async def f(request) -> Response`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import InvalidJSON, ValidationError
from gateway.http.bodies import parse_and_validate
from gateway.http.request import (
    JSON,
    authenticate,
    ctx_of,
    gw,
    header,
    int_param,
    json_response,
    outcome_response,
    read_body,
)
from gateway.money import micros_to_usd
from gateway.openai.bridge import seedance_meta
from gateway.policy.auth import allowed_models
from gateway.policy.quota import period_bounds, subjects_for
from gateway.store.base import Task


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
