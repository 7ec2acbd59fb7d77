"""Admin handlers under /admin: off (404) unless an admin token is configured."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.delivery.webhooks import redacted
from gateway.errors import InvalidJSON, ValidationError
from gateway.http.bodies import loads_strict
from gateway.http.request import JSON, int_param, json_response, read_body
from gateway.policy.keyhealth import KeyHealth
from gateway.routes import ledger
from gateway.routes.access import caller, operator, team_scope
from gateway.routes.tenancy import team_rows
from gateway.store.outbox import webhook_topic

if TYPE_CHECKING:
    from gateway.app import Gateway

OPERATOR = "admin"  # who resolves a row with the admin token, in the ledger's resolved_by
SETTLE_MAX_BYTES = 4096  # {"video_seconds": N} and room to spare


def admin(request: Request) -> Gateway:
    """The operator's routes: a team admin's key is refused (403 permission_denied), as a member's is."""
    return operator(request)


async def admin_usage(request: Request) -> Response:
    """The ledger (SPEC §2, §17): grouped figures from the store's aggregates (`group_by`); else a page of
    rows (`limit`, `after`: the `next_after` of the page before); `format=csv` (or `Accept: text/csv`) and
    `format=json` export every row, streamed from the store's cursor a page at a time. A team admin's
    ledger is its own team's (SPEC §15)."""
    gateway, actor = caller(request)
    query = request.query_params
    by = query.get("group_by")
    if by is not None and by not in ledger.GROUPS:
        raise ValidationError(f"group_by must be one of {', '.join(ledger.GROUPS)}.", param="group_by")
    export = query.get("format") or ("csv" if "text/csv" in request.headers.get("accept", "") else None)
    if export not in (None, "csv", "json"):
        raise ValidationError("format must be csv or json.", param="format")
    flt = ledger.ledger_filter(query)
    flt = replace(flt, team=team_scope(actor, flt.team))
    after = ledger.cursor(query.get("after"))
    for name in ("limit", "after") if by or export else ():
        if query.get(name):
            raise ValidationError(f"{name} pages the listing of rows, not grouped figures or an export.", param=name)
    if by:
        groups = [ledger.group_row(by, figures) for figures in await gateway.store.aggregate(by, flt)]
        if export == "csv":
            return Response(ledger.to_csv(groups), media_type="text/csv")
        return json_response({"object": "list", "group_by": by, "data": groups})
    if export:
        # The first page is read before the answer starts, so a store that cannot answer is a 503, not a cut body.
        first = await ledger.page(gateway.store, flt, ledger.EXPORT_PAGE, None)
        rows = ledger.pages(gateway.store, flt, None, first)
        if export == "csv":
            return StreamingResponse(ledger.csv_stream(rows), media_type="text/csv")
        return StreamingResponse(ledger.json_stream(rows), media_type=JSON)
    limit = int_param(query.get("limit"), "limit", ledger.PAGE_MAX, 1, ledger.PAGE_MAX)
    tasks, next_after = await ledger.page(gateway.store, flt, limit, after)
    return json_response(
        {
            "object": "list",
            "group_by": None,
            "data": [ledger.row(task) for task in tasks],
            "has_more": next_after is not None,
            "next_after": next_after,
        }
    )


async def admin_keys(request: Request) -> Response:
    gateway = admin(request)
    health = await gateway.pool.health(fresh=True)  # another replica may have just changed it
    in_flight = await gateway.store.key_in_flight()
    now = gateway.clock()
    data = []
    for key in gateway.pool.keys:
        key_health = health.get(key.name, KeyHealth())
        data.append(
            {
                "name": key.name,
                "key": key.value.masked(),
                "state": key_health.current(now),
                "weight": key.weight,
                "max_concurrent_tasks": key.max_concurrent_tasks,
                "models": sorted(key.models) if key.models else None,
                "tasks_in_flight": in_flight.get(key.name, 0),
                "cooldown_until": key_health.until if key_health.current(now) in ("cooldown", "open") else None,
                "last_error": key_health.last_error,
                "last_error_at": key_health.last_error_at,
                "successes": gateway.pool.successes.get(key.name, 0),
                "failures": key_health.errors,
            }
        )
    return json_response({"object": "list", "data": data})


async def admin_teams(request: Request) -> Response:
    """Every team, the config's and the store's, with its figures and `source`; a team admin sees its own."""
    gateway, actor = caller(request)
    only = team_scope(actor, None)
    return json_response({"object": "list", "data": await team_rows(gateway, only)})


async def admin_reload(request: Request) -> Response:
    gateway = admin(request)
    problems = await gateway.reload(OPERATOR)
    if problems:
        raise ValidationError(
            "The new config was refused; the old one stays: " + "; ".join(problems),
            param="config",
            code="invalid_config",
        )
    return json_response(
        {
            "status": "reloaded",
            "users": len(gateway.settings.users),
            "teams": len(gateway.settings.teams),
            "keys": len(gateway.settings.upstream.keys),
        }
    )


async def admin_void_task(request: Request) -> Response:
    """An `unknown` row that TokenHub's records show it never billed: `voided`, its cost 0."""
    gateway = admin(request)
    task = await gateway.settlement.void(request.path_params["task_id"], OPERATOR)
    return json_response(ledger.row(task))


async def admin_settle_task(request: Request) -> Response:
    """An `unknown` row priced from the output seconds TokenHub billed, `{"video_seconds": N}`: `succeeded`."""
    gateway = admin(request)
    try:
        body = loads_strict(await read_body(request, SETTLE_MAX_BYTES, gateway.settings.server.body_timeout_s))
    except InvalidJSON:  # 1e400 (a number past a double) and a repeated key included
        raise InvalidJSON(
            'The body must be JSON, {"video_seconds": N}, N a finite number, each key once.', param="video_seconds"
        ) from None
    if not isinstance(body, dict) or "video_seconds" not in body:
        raise ValidationError('The body must be {"video_seconds": N}.', param="video_seconds")
    task = await gateway.settlement.bill(request.path_params["task_id"], body["video_seconds"], OPERATOR)
    return json_response(ledger.row(task))


async def admin_webhooks(request: Request) -> Response:
    """The configured endpoints and their deliveries (shared by every replica); never a secret."""
    gateway = admin(request)
    endpoints = gateway.settings.webhooks
    stats = await gateway.store.outbox_stats([webhook_topic(endpoint.name) for endpoint in endpoints])
    data = []
    for endpoint in endpoints:
        deliveries = stats[webhook_topic(endpoint.name)]
        data.append(
            {
                "name": endpoint.name,
                "url": redacted(endpoint.url.reveal()),
                "teams": sorted(endpoint.teams) if endpoint.teams is not None else None,
                "events": sorted(endpoint.events),
                "max_in_flight": endpoint.max_in_flight,
                "retry_initial_s": endpoint.retry_initial_s,
                "backlog": deliveries.backlog,
                "delivered": deliveries.delivered,
                "failed": deliveries.failed,
                "gave_up": deliveries.gave_up,
                "last_error": deliveries.last_error,
                "last_attempt_at": deliveries.last_attempt_at,
            }
        )
    return json_response({"object": "list", "data": data})
