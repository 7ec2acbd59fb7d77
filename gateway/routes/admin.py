"""Admin handlers under /admin: off (404) unless an admin token is configured."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.delivery.webhooks import redacted
from gateway.errors import InvalidJSON, ValidationError
from gateway.http.request import gw, json_response
from gateway.policy.auth import check_token
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.quota import team_subjects
from gateway.routes import ledger
from gateway.routes.generations import usage_figures
from gateway.store.outbox import webhook_topic


def admin(request: Request) -> Any:
    g = gw(request)
    check_token(request.headers.get("authorization"), g.settings.server.admin_token)
    return g


async def admin_usage(request: Request) -> Response:
    g = admin(request)
    q = request.query_params
    by = q.get("group_by")
    if by is not None and by not in ledger.GROUPS:
        raise ValidationError(f"group_by must be one of {', '.join(ledger.GROUPS)}.", param="group_by")
    try:
        since = ledger.parse_time(q["since"]) if q.get("since") else None
        until = ledger.parse_time(q["until"]) if q.get("until") else None
    except ValueError:
        raise ValidationError("since/until must be ISO dates or date-times.", param="since") from None
    tasks = await g.store.ledger(since, until, q.get("team"), q.get("user"), q.get("model"))
    rows = ledger.group(tasks, by) if by else [ledger.row(t) for t in tasks]
    wants_csv = q.get("format") == "csv" or "text/csv" in request.headers.get("accept", "")
    if wants_csv:
        return Response(ledger.to_csv(rows), media_type="text/csv")
    return json_response({"object": "list", "group_by": by, "data": rows})


async def admin_keys(request: Request) -> Response:
    g = admin(request)
    health, in_flight, now = await g.pool.health(), await g.store.key_in_flight(), g.clock()
    data = []
    for key in g.pool.keys:
        h = health.get(key.name, KeyHealth())
        data.append(
            {
                "name": key.name,
                "key": key.value.masked(),
                "state": h.current(now),
                "weight": key.weight,
                "max_concurrent_tasks": key.max_concurrent_tasks,
                "models": sorted(key.models) if key.models else None,
                "tasks_in_flight": in_flight.get(key.name, 0),
                "cooldown_until": h.until if h.current(now) in ("cooldown", "open") else None,
                "last_error": h.last_error,
                "last_error_at": h.last_error_at,
                "successes": g.pool.successes.get(key.name, 0),
                "failures": h.errors,
            }
        )
    return json_response({"object": "list", "data": data})


async def admin_teams(request: Request) -> Response:
    g = admin(request)
    now = g.clock()
    subjects = team_subjects(g.settings, now)
    figures = await g.store.usage(subjects)
    data = [
        {
            **usage_figures(s, u),
            "period_kind": s.limits.period,
            "models": sorted(s.limits.models) if s.limits.models else None,
        }
        for s, u in zip(subjects, figures, strict=True)
    ]
    return json_response({"object": "list", "data": data})


async def admin_reload(request: Request) -> Response:
    g = admin(request)
    problems = await g.reload()
    if problems:
        raise ValidationError(
            "The new config was refused; the old one stays: " + "; ".join(problems),
            param="config",
            code="invalid_config",
        )
    return json_response(
        {
            "status": "reloaded",
            "users": len(g.settings.users),
            "teams": len(g.settings.teams),
            "keys": len(g.settings.upstream.keys),
        }
    )


async def admin_void_task(request: Request) -> Response:
    """An `unknown` row that TokenHub's records show it never billed: its cost becomes 0."""
    g = admin(request)
    task = await g.settlement.resolve(request.path_params["task_id"], None)
    return json_response(ledger.row(task))


async def admin_settle_task(request: Request) -> Response:
    """An `unknown` row priced from the output seconds TokenHub billed: `{"video_seconds": N}`."""
    g = admin(request)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidJSON("The body is not valid JSON.") from None
    if not isinstance(body, dict) or "video_seconds" not in body:
        raise ValidationError('The body must be {"video_seconds": N}.', param="video_seconds")
    task = await g.settlement.resolve(request.path_params["task_id"], body["video_seconds"])
    return json_response(ledger.row(task))


async def admin_webhooks(request: Request) -> Response:
    """The configured endpoints and their deliveries (shared by every replica); never a secret."""
    g = admin(request)
    endpoints = g.settings.webhooks
    stats = await g.store.outbox_stats([webhook_topic(ep.name) for ep in endpoints])
    data = []
    for ep in endpoints:
        s = stats[webhook_topic(ep.name)]
        data.append(
            {
                "name": ep.name,
                "url": redacted(ep.url.reveal()),
                "teams": sorted(ep.teams) if ep.teams is not None else None,
                "events": sorted(ep.events),
                "max_in_flight": ep.max_in_flight,
                "retry_initial_s": ep.retry_initial_s,
                "backlog": s.backlog,
                "delivered": s.delivered,
                "failed": s.failed,
                "gave_up": s.gave_up,
                "last_error": s.last_error,
                "last_attempt_at": s.last_attempt_at,
            }
        )
    return json_response({"object": "list", "data": data})
