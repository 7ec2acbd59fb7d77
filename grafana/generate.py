"""Grafana dashboards as code: `python grafana/generate.py` rewrites grafana/dashboards/*.json.

Plain dicts, no dependency. The committed JSON must equal what this writes (tests/test_deploy.py checks);
`--check` exits 1 instead of writing when a file is out of date.

Every query uses only the metrics of SPEC §8. Counters are summed across replicas; gauges that read
shared state (budgets, key state, backlog, tasks in flight) are the same on every replica, so they are
aggregated with max().
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = "tokenhub_gateway_"
TEAM = 'team=~"$team"'
RATE = "[$__rate_interval]"
OPERATIONAL = 'route!~"/healthz|/readyz|/metrics"'
# Template variables → values that make each expression plain PromQL (see panel_queries).
TEST_VALUES = {"$__rate_interval": "1m", "$__range": "1h", "$team": ".*"}
KEY_STATE_CODES = {"ok": 0, "cooldown": 1, "open": 2, "disabled": 3}
KEY_STATE_COLORS = {"ok": "green", "cooldown": "yellow", "open": "orange", "disabled": "red"}


# ---- building blocks -------------------------------------------------------------------------------


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> dict:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "instant": instant,
        "range": not instant,
        "format": "time_series",
    }


def targets(*pairs: tuple[str, str], instant: bool = False) -> list[dict]:
    return [target(e, legend, chr(ord("A") + i), instant=instant) for i, (e, legend) in enumerate(pairs)]


def panel(
    kind: str,
    title: str,
    tgts: list[dict],
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    options: dict | None = None,
    custom: dict | None = None,
    extra: dict | None = None,
) -> dict:
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom or {}}, "overrides": []},
        "options": options or {},
        "gridPos": {"w": w, "h": h},
    }
    p.update(extra or {})
    return p


def timeseries(title: str, tgts: list[dict], unit: str = "short", *, stack: bool = False, **kw) -> dict:
    custom = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    options = {
        "legend": {"calcs": ["mean", "max"], "displayMode": "table", "placement": "right"},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel("timeseries", title, tgts, unit=unit, custom=custom, options=options, **kw)


def stat(
    title: str,
    expr: str,
    unit: str = "short",
    *,
    w: int = 4,
    h: int = 4,
    instant: bool = False,
    warn: float | None = None,
    crit: float | None = None,
    **kw,
) -> dict:
    """A single number; `warn`/`crit` colour it orange/red from those values (the alert thresholds)."""
    options = {
        "colorMode": "value",
        "graphMode": "none" if instant else "area",
        "justifyMode": "auto",
        "textMode": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    }
    p = panel("stat", title, [target(expr, " ", instant=instant)], unit=unit, w=w, h=h, options=options, **kw)
    steps = [{"color": "green", "value": None}]
    steps += [{"color": c, "value": v} for c, v in (("orange", warn), ("red", crit)) if v is not None]
    p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": steps}
    return p


def table(title: str, tgts: list[dict], *, renames: dict[str, str], unit: str = "short", **kw) -> dict:
    """Instant queries joined on their labels; `renames` maps result columns to headers."""
    transformations = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": renames}},
    ]
    for t in tgts:
        t["format"] = "table"
    options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    return panel("table", title, tgts, unit=unit, options=options, extra={"transformations": transformations}, **kw)


def datasource_variable() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def team_variable() -> dict:
    query = f"label_values({M}requests_total, team)"
    return {
        "name": "team",
        "label": "Team",
        "type": "query",
        "datasource": DS,
        "query": query,
        "definition": query,
        "current": {},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tokenhub-gateway"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "timezone": "",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource_variable(), team_variable()]},
        "panels": layout(panels),
    }


def layout(panels: list[dict]) -> list[dict]:
    """Numbers the panels and flows them left to right into rows 24 units wide."""
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, row_h = x + w, max(row_h, h)
    return panels


def quantiles(metric: str, qs: tuple[float, ...], by: str = "") -> list[tuple[str, str]]:
    labels = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({labels}) (rate({M}{metric}_bucket{RATE})))", f"p{round(q * 100)}{suffix}")
        for q in qs
    ]


# ---- dashboards --------------------------------------------------------------------------------------


def overview() -> dict:
    requests = f"{M}requests_total{{{TEAM}}}"
    operational = f"{M}requests_total{{{TEAM}, {OPERATIONAL}}}"
    errors = f'{M}requests_total{{{TEAM}, {OPERATIONAL}, code=~"5.."}}'
    client_errors = f'{M}requests_total{{{TEAM}, {OPERATIONAL}, code=~"4.."}}'
    key_state = f'max by (key) ({M}upstream_key_state{{state="%s"}})'
    key_state_code = " + ".join(f"{key_state % s} * {n}" for s, n in KEY_STATE_CODES.items() if n)
    panels = [
        stat("Requests / s", f"sum(rate({requests}{RATE}))", "reqps"),
        stat(
            "5xx ratio",
            f"sum(rate({errors}{RATE})) / sum(rate({operational}{RATE}))",
            "percentunit",
            warn=0.01,
            crit=0.05,
        ),
        stat("Overhead p99", quantiles("overhead_seconds", (0.99,))[0][0], "s", warn=0.01, crit=0.05),
        stat("Tasks created / min", f"sum(rate({M}tasks_created_total{{{TEAM}}}{RATE})) * 60"),
        stat("Tasks in flight", f"sum(max by (team) ({M}tasks_in_flight{{{TEAM}}}))"),
        stat(
            "Poller backlog",
            f"max({M}poller_backlog)",
            warn=100,
            crit=500,
            description="Tasks awaiting settlement by the background poller (shared state: max).",
        ),
        timeseries(
            "Request rate by route and code",
            targets((f"sum by (route, code) (rate({requests}{RATE}))", "{{route}} {{code}}")),
            "reqps",
        ),
        timeseries(
            "Error ratio (health and metrics routes excluded)",
            targets(
                (f"sum(rate({errors}{RATE})) / sum(rate({operational}{RATE}))", "5xx"),
                (f"sum(rate({client_errors}{RATE})) / sum(rate({operational}{RATE}))", "4xx"),
            ),
            "percentunit",
        ),
        timeseries(
            "Gateway overhead (upstream wait excluded)", targets(*quantiles("overhead_seconds", (0.5, 0.95, 0.99))), "s"
        ),
        timeseries(
            "Request duration p99 by route", targets(*quantiles("request_duration_seconds", (0.99,), by="route")), "s"
        ),
        timeseries(
            "Upstream latency by call", targets(*quantiles("upstream_duration_seconds", (0.5, 0.99), by="route")), "s"
        ),
        timeseries(
            "Upstream requests by key and code",
            targets((f"sum by (key, code) (rate({M}upstream_requests_total{RATE}))", "{{key}} {{code}}")),
            "reqps",
        ),
        timeseries(
            "Tasks created by model and resolution",
            targets(
                (
                    f"sum by (model, resolution) (rate({M}tasks_created_total{{{TEAM}}}{RATE}))",
                    "{{model}} {{resolution}}",
                )
            ),
            "ops",
        ),
        timeseries(
            "Tasks finished by status",
            targets((f"sum by (status) (rate({M}tasks_finished_total{{{TEAM}}}{RATE}))", "{{status}}")),
            "ops",
            stack=True,
        ),
        timeseries(
            "Task duration (create → terminal)",
            targets(*quantiles("task_duration_seconds", (0.5, 0.95), by="model")),
            "s",
        ),
        timeseries(
            "Validation errors by param",
            targets((f"sum by (param) (rate({M}validation_errors_total{RATE}))", "{{param}}")),
            "ops",
        ),
        key_state_history(key_state_code),
        table(
            "Upstream keys now",
            targets((f"max by (key, state) ({M}upstream_key_state) == 1", ""), instant=True),
            renames={"key": "Key", "state": "State", "Value": "Current"},
            w=8,
        ),
        timeseries("Poller backlog over time", targets((f"max({M}poller_backlog)", "backlog")), w=8),
        timeseries(
            "Tasks in flight by team",
            targets((f"max by (team) ({M}tasks_in_flight{{{TEAM}}})", "{{team}}")),
            w=8,
            stack=True,
        ),
        timeseries(
            "Quota rejections by reason",
            targets((f"sum by (reason) (rate({M}quota_rejections_total{{{TEAM}}}{RATE}))", "{{reason}}")),
            "ops",
            w=8,
            stack=True,
        ),
        timeseries(
            "Unknown outcomes (charged at estimate until an operator resolves them)",
            targets(
                (f"sum by (team, reason) (increase({M}tasks_unknown_total{{{TEAM}}}{RATE}))", "{{team}} {{reason}}")
            ),
            w=12,
            stack=True,
            description="Forwarded creates whose outcome the gateway cannot know: check TokenHub's "
            "records, then POST /admin/tasks/{id}/void or /settle.",
        ),
        timeseries(
            "Settlement anomalies by reason",
            targets((f"sum by (reason) (increase({M}settlement_anomalies_total{RATE}))", "{{reason}}")),
            w=12,
            stack=True,
            description="TokenHub figures that were not believed at settlement; the estimate was charged.",
        ),
        timeseries(
            "Budget alerts by scope and threshold",
            targets((f"sum by (scope, threshold) (increase({M}budget_alerts_total{RATE}))", "{{scope}} {{threshold}}")),
            w=24,
            h=6,
            stack=True,
            description="Budget thresholds (alert_thresholds, fractions of a dollar or video-seconds budget) that "
            "teams and users reached, each once per period across replicas; which ones is in the "
            "budget.threshold_reached webhook event and log line.",
        ),
        *deliveries(),
    ]
    return dashboard(
        "tokenhub-gateway-overview",
        "TokenHub Gateway / Overview",
        "Traffic, errors, latency, upstream keys and task flow.",
        panels,
    )


def deliveries() -> list[dict]:
    """What a terminal task leaves behind: archived files (SPEC §12) and webhook events (SPEC §13)."""
    return [
        timeseries(
            "Archive: bytes copied by variant",
            targets((f"sum by (variant) (increase({M}archive_bytes_total{RATE}))", "{{variant}}")),
            "bytes",
            w=12,
            stack=True,
            description="Videos and covers copied from TokenHub's expiring URLs into the archive.",
        ),
        timeseries(
            "Archive: failures by reason",
            targets((f"sum by (reason) (increase({M}archive_failures_total{RATE}))", "{{reason}}")),
            w=12,
            stack=True,
            description="too_large: over max_bytes_per_video, not archived; expired: TokenHub's URL answered "
            "403/404/410 (or 24 h passed); download_failed and store_failed are retried.",
        ),
        timeseries(
            "Webhook deliveries by endpoint and result",
            targets(
                (f"sum by (endpoint, result) (increase({M}webhook_deliveries_total{RATE}))", "{{endpoint}} {{result}}")
            ),
            w=12,
            stack=True,
            description="ok: a 2xx within 10 s; failed: an attempt that will be retried (back-off up to an hour); "
            "gave_up: still failing 24 h after the event.",
        ),
        timeseries(
            "Webhook backlog by endpoint",
            targets((f"max by (endpoint) ({M}webhook_backlog)", "{{endpoint}}")),
            w=12,
            description="Events not yet delivered nor given up (shared state: max).",
        ),
    ]


def key_state_history(expr: str) -> dict:
    mappings = [
        {
            "type": "value",
            "options": {
                str(n): {"text": s, "color": KEY_STATE_COLORS[s], "index": n} for s, n in KEY_STATE_CODES.items()
            },
        }
    ]
    p = panel(
        "state-timeline",
        "Upstream key state",
        targets((expr, "{{key}}")),
        w=16,
        description="ok, cooldown (429), open (circuit breaker) or disabled (401/403 until reload).",
        options={
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.9,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        },
        custom={"fillOpacity": 80, "lineWidth": 0},
    )
    p["fieldConfig"]["defaults"]["mappings"] = mappings
    p["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    return p


def spend() -> dict:
    def by_team(metric: str) -> str:
        return f"max by (team) ({M}{metric}{{{TEAM}}})"

    spend_total = f"{M}spend_usd_total{{{TEAM}}}"
    seconds_total = f"{M}video_seconds_total{{{TEAM}}}"
    budget, remaining = by_team("budget_usd"), by_team("budget_remaining_usd")
    panels = [
        stat("Spend in range", f"sum(increase({spend_total}[$__range]))", "currencyUSD", w=6, instant=True),
        stat("Video seconds in range", f"sum(increase({seconds_total}[$__range]))", "s", w=6, instant=True),
        stat(
            "Quota rejections in range",
            f"sum(increase({M}quota_rejections_total{{{TEAM}}}[$__range]))",
            w=6,
            instant=True,
        ),
        stat("Tasks in flight", f"sum({by_team('tasks_in_flight')})", w=6),
        timeseries(
            "Spend rate by team ($/h)",
            targets((f"sum by (team) (rate({spend_total}{RATE})) * 3600", "{{team}}")),
            "currencyUSD",
            stack=True,
        ),
        table(
            "Spend by team and model in range",
            targets((f"sum by (team, model) (increase({spend_total}[$__range]))", ""), instant=True),
            renames={"team": "Team", "model": "Model", "Value": "Spend (USD)"},
            unit="currencyUSD",
        ),
        timeseries(
            "Billed video seconds by team and model (per hour)",
            targets((f"sum by (team, model) (rate({seconds_total}{RATE})) * 3600", "{{team}} {{model}}")),
            "s",
            stack=True,
        ),
        table(
            "Video seconds by team and model in range",
            targets((f"sum by (team, model) (increase({seconds_total}[$__range]))", ""), instant=True),
            renames={"team": "Team", "model": "Model", "Value": "Video seconds"},
            unit="s",
        ),
        table(
            "Budget per team (current period)",
            targets((budget, ""), (f"{budget} - {remaining}", ""), (remaining, ""), instant=True),
            renames={"team": "Team", "Value #A": "Budget", "Value #B": "Used", "Value #C": "Remaining"},
            unit="currencyUSD",
            description="Used includes reservations of tasks in flight; a negative remainder is overdrawn.",
        ),
        bar_gauge("Budget used", targets((f"1 - {remaining} / ({budget} > 0)", "{{team}}"), instant=True)),
        timeseries(
            "Quota rejections by team and reason",
            targets(
                (f"sum by (team, reason) (rate({M}quota_rejections_total{{{TEAM}}}{RATE}))", "{{team}} {{reason}}")
            ),
            "ops",
            stack=True,
        ),
        timeseries("Tasks in flight by team", targets((by_team("tasks_in_flight"), "{{team}}")), stack=True),
        timeseries("Remaining budget by team", targets((remaining, "{{team}}")), "currencyUSD"),
        timeseries(
            "Tasks finished by team and status",
            targets((f"sum by (team, status) (rate({M}tasks_finished_total{{{TEAM}}}{RATE}))", "{{team}} {{status}}")),
            "ops",
            stack=True,
        ),
    ]
    return dashboard(
        "tokenhub-gateway-spend",
        "TokenHub Gateway / Spend and quotas",
        "Spend, billed seconds, budgets and quota rejections per team.",
        panels,
    )


def bar_gauge(title: str, tgts: list[dict]) -> dict:
    p = panel(
        "bargauge",
        title,
        tgts,
        unit="percentunit",
        description="Share of the budget spent or reserved; teams without a budget are left out.",
        options={
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )
    p["fieldConfig"]["defaults"].update(
        min=0,
        max=1,
        thresholds={
            "mode": "absolute",
            "steps": [
                {"color": "green", "value": None},
                {"color": "orange", "value": 0.75},
                {"color": "red", "value": 0.9},
            ],
        },
    )
    return p


DASHBOARDS = {"overview.json": overview, "spend.json": spend}


# ---- outputs -----------------------------------------------------------------------------------------


def render(build) -> str:
    return json.dumps(build(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def substitute(expr: str) -> str:
    """Replaces Grafana template variables so the expression is plain PromQL."""
    return re.sub(r"\$__rate_interval|\$__range|\$team", lambda m: TEST_VALUES[m.group(0)], expr)


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with variables substituted) for every query of every panel."""
    out = []
    for build in DASHBOARDS.values():
        d = build()
        for p in d["panels"]:
            out.extend((d["title"], p["title"], substitute(t["expr"])) for t in p["targets"])
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path, text = OUT / name, render(build)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not check:
            path.write_text(text, encoding="utf-8")
    verb = "out of date" if check else "written"
    for name in stale:
        print(f"{OUT / name}: {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
