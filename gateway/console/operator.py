"""What the operator sees and does (SPEC §16): every team against its budget, the upstream keys and their health
(as GET /admin/keys), webhook endpoints and their backlog (as GET /admin/webhooks), the `unknown` outcomes with
their void and settle forms (as POST /admin/tasks/{id}/void|settle), the audit log, and a reload. Never a prompt:
no page here reads one."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import RedirectResponse, Response

from gateway.console import figures
from gateway.console.pages import Visit
from gateway.delivery.webhooks import redacted
from gateway.errors import ValidationError
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.roles import OPERATOR_ACTOR
from gateway.routes import ledger
from gateway.routes.tenancy import team_rows
from gateway.routes.tenancy_keys import audit_view
from gateway.store.outbox import webhook_topic

UNKNOWN_SHOWN = 100
AUDIT_PAGE = 100
AUDIT_DAYS = 7  # the audit log opens on the last week; ?since= goes further back
DONE = {
    "voided": "The task was voided: its cost is now 0.",
    "settled": "The task was settled at the seconds TokenHub billed.",
    "reloaded": "The config was reloaded.",
}


async def teams(visit: Visit) -> Response:
    gateway = visit.gateway
    rows = await team_rows(gateway)
    return visit.render(
        "operator_teams.html",
        title="Teams",
        teams=sorted(rows, key=lambda row: row["name"]),
        chart=await figures.daily_chart(gateway, None, gateway.clock()),
        done=DONE.get(visit.query("done")),
        problems=None,
    )


async def keys(visit: Visit) -> Response:
    gateway = visit.gateway
    health = await gateway.pool.health(fresh=True)
    in_flight = await gateway.store.key_in_flight()
    now = gateway.clock()
    rows = []
    for key in gateway.pool.keys:
        state = health.get(key.name, KeyHealth())
        current = state.current(now)
        rows.append(
            {
                "name": key.name,
                "key": key.value.masked(),
                "state": current,
                "weight": key.weight,
                "max_concurrent_tasks": key.max_concurrent_tasks,
                "models": sorted(key.models) if key.models else None,
                "tasks_in_flight": in_flight.get(key.name, 0),
                "until": state.until if current in ("cooldown", "open") else None,
                "last_error": state.last_error,
                "last_error_at": state.last_error_at,
                "successes": gateway.pool.successes.get(key.name, 0),
                "failures": state.errors,
            }
        )
    return visit.render("operator_keys.html", title="Upstream keys", keys=rows)


async def webhooks(visit: Visit) -> Response:
    gateway = visit.gateway
    endpoints = gateway.settings.webhooks
    stats = await gateway.store.outbox_stats([webhook_topic(endpoint.name) for endpoint in endpoints])
    rows = [
        {"name": endpoint.name, "url": redacted(endpoint.url.reveal()), "stats": stats[webhook_topic(endpoint.name)]}
        for endpoint in endpoints
    ]
    return visit.render("operator_webhooks.html", title="Webhooks", endpoints=rows)


async def unknown(visit: Visit) -> Response:
    rows = await visit.gateway.store.unknown_tasks(UNKNOWN_SHOWN)
    return visit.render(
        "operator_unknown.html",
        title="Unknown outcomes",
        rows=[ledger.row(task) for task in rows],
        done=DONE.get(visit.query("done")),
    )


async def void(visit: Visit) -> Response:
    await visit.gateway.settlement.void(visit.request.path_params["ref"], OPERATOR_ACTOR)
    return RedirectResponse("/console/unknown?done=voided", 303)


async def settle(visit: Visit) -> Response:
    typed = visit.form.get("video_seconds", "").strip()
    try:
        seconds = float(typed) if len(typed) <= 20 else math.nan
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ValidationError(
            "video_seconds must be a number: the output seconds TokenHub billed.", param="video_seconds"
        )
    await visit.gateway.settlement.bill(visit.request.path_params["ref"], seconds, OPERATOR_ACTOR)
    return RedirectResponse("/console/unknown?done=settled", 303)


async def audit(visit: Visit) -> Response:
    gateway = visit.gateway
    since_text = visit.query("since")
    since = _since(since_text, gateway.clock())
    after_text = visit.query("after")
    after = int(after_text) if after_text.isascii() and after_text.isdigit() and len(after_text) < 16 else None
    entries, next_after = await gateway.store.audit_page(since, None, None, AUDIT_PAGE, after)
    return visit.render(
        "operator_audit.html",
        title="Audit log",
        entries=[_entry(audit_view(entry)) for entry in entries],
        since=since,
        next_link={"since": since_text, "after": str(next_after)} if next_after is not None else None,
    )


async def reload(visit: Visit) -> Response:
    problems = await visit.gateway.reload(OPERATOR_ACTOR)
    if not problems:
        return RedirectResponse("/console/?done=reloaded", 303)
    gateway = visit.gateway
    return visit.render(
        "operator_teams.html",
        422,
        title="Teams",
        teams=sorted(await team_rows(gateway), key=lambda row: row["name"]),
        chart=await figures.daily_chart(gateway, None, gateway.clock()),
        done=None,
        problems=problems,
    )


def _since(text: str, now: float) -> float:
    if not text:
        return now - AUDIT_DAYS * 86400
    try:
        return ledger.parse_time(text)
    except (ValueError, OverflowError):
        raise ValidationError("since must be a date, YYYY-MM-DD.", param="since") from None


def _entry(view: dict[str, Any]) -> dict[str, Any]:
    """An audit row with its before/after as short lines of `field: value` (what changed first)."""
    before, after = view["before"] or {}, view["after"] or {}
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    return {**view, "changed": [(name, before.get(name), after.get(name)) for name in changed]}
