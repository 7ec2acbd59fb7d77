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
from gateway.policy.quota import Subject, period_bounds, subjects_for
from gateway.store.base import Task, Usage


async def create_task(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    ctx = ctx_of(request)
    idem_key = header(request, b"idempotency-key")
    if idem_key is not None and not 0 < len(idem_key) <= 255:
        raise ValidationError("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    server = gateway.settings.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    try:
        checked = await parse_and_validate(
            raw, gateway.settings.pricing, gateway.large_bodies, hashed=idem_key is not None
        )
    except InvalidJSON:
        raise
    except ValidationError as exc:
        gateway.metrics.validation_errors.labels(_bounded_param(exc.param)).inc()
        raise
    req = checked.request
    ctx.model = req.model
    ctx.resolution = req.resolution
    ctx.duration_s = req.duration_s
    meta = seedance_meta(req.aspect_ratio, checked.prompt)  # the prompt: for the team's console page of the task
    return outcome_response(
        await gateway.tasks.create(user, team, checked.body_hash, raw, req, idem_key, ctx, meta=meta)
    )


async def get_task(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    ctx = ctx_of(request)
    task = await gateway.polls.owned(request.path_params["task_id"], team.name)
    ctx.task_id = task.task_id
    ctx.model = task.model
    ctx.resolution = task.resolution
    ctx.duration_s = task.duration_s
    outcome = await gateway.polls.poll(task, ctx)
    headers = await gateway.tasks.rate_headers(subjects_for(user, team, gateway.clock()))
    return Response(outcome.body, outcome.status, {**outcome.headers, **headers}, media_type=JSON)


async def cancel_task(request: Request) -> Response:
    gateway = gw(request)
    _, team = authenticate(request)
    ctx = ctx_of(request)
    task = await gateway.polls.owned(request.path_params["task_id"], team.name)
    ctx.task_id = task.task_id
    ctx.model = task.model
    return outcome_response(await gateway.polls.cancel(task, ctx))


async def list_tasks(request: Request) -> Response:
    gateway = gw(request)
    _, team = authenticate(request)
    query = request.query_params
    limit = int_param(query.get("limit"), "limit", 20, 1, 100)
    tasks, more = await gateway.store.list_tasks(
        team.name, limit, query.get("after") or None, query.get("status") or None
    )
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


def task_item(task: Task) -> dict[str, Any]:
    return {
        "id": task.task_id,
        "object": "video.generation.task",
        "model": task.model,
        "status": task.status,
        "created": int(task.created_at),
        "user": task.user,
        "resolution": task.resolution,
        "duration": task.duration_s,
        "estimated_cost_usd": micros_to_usd(task.estimate_micros),
        "cost_usd": None if task.cost_micros is None else micros_to_usd(task.cost_micros),
        "billed_seconds": None if task.billed_ms is None else task.billed_ms / 1000,
        "settled_at": None if task.settled_at is None else int(task.settled_at),
    }


async def list_models(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    pricing = gateway.settings.pricing
    data = [
        {
            "id": m,
            "object": "model",
            "owned_by": "bytedance",
            "pricing": {res: micros_to_usd(p) for res, p in pricing[m].items()},
        }
        for m in allowed_models(gateway.settings, user, team)
    ]
    return json_response({"object": "list", "data": data})


async def usage(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    now = gateway.clock()
    subjects = subjects_for(user, team, now)
    figures = await gateway.store.usage(subjects)
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


def usage_figures(subject: Subject, usage: Usage) -> dict[str, Any]:
    limits = subject.limits
    counters = usage.counters
    remaining = None
    if limits.budget_micros is not None:
        remaining = micros_to_usd(limits.budget_micros - counters.spent_micros - counters.reserved_micros)
    return {
        "name": subject.name,
        "period": subject.period,
        "spent_usd": micros_to_usd(counters.spent_micros),
        "reserved_usd": micros_to_usd(counters.reserved_micros),
        "budget_usd": None if limits.budget_micros is None else micros_to_usd(limits.budget_micros),
        "remaining_usd": remaining,
        "video_seconds_spent": counters.spent_ms / 1000,
        "video_seconds_reserved": counters.reserved_ms / 1000,
        "video_seconds_budget": limits.video_seconds,
        "tasks_in_flight": usage.in_flight,
        "max_concurrent_tasks": limits.max_concurrent_tasks,
        "requests_per_minute": limits.requests_per_minute,
    }


def _bounded_param(param: str | None) -> str:
    """`content[2].role` → `content[].role`, so the metric label stays bounded."""
    if not param:
        return "body"
    out: list[str] = []
    skip = False
    for ch in param:
        if ch == "[":
            skip = True
            out.append("[]")
        elif ch == "]":
            skip = False
        elif not skip:
            out.append(ch)
    return "".join(out)[:64]
