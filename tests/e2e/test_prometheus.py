"""Observability end to end (SPEC §8, §10): a real Prometheus scrapes a real gateway in front of the simulator.

The gateway serves a mixed workload (successes, a failure, a cancel, a validation error, a quota rejection, an
upstream 429 and 5xx, an unknown route) while Prometheus scrapes it every second with the metrics bearer token.
Then every query of every Grafana panel (grafana/generate.py panel_queries()) is evaluated through Prometheus's
HTTP API and must return at least one series, the spend counter must agree with the ledger, and no label value
may hold a task id, a raw path, a prompt or a key value.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.middleware import route_label
from gateway.routes.table import route_table
from grafana.generate import panel_queries
from tests.conftest import require_binary
from tests.e2e.harness import ADMIN_TOKEN, KEYS, METRICS_TOKEN, Gateway, Process, body, free_port, wait_http, wait_until
from tests.e2e.webhook_receiver import Receiver, new_secret

CREATE = "/videos/generations"
FAST = "doubao-seedance-2.0-fast"
TERMINAL = ("succeeded", "failed", "cancelled", "expired", "unresolved")
SCRAPE_S = 1
UPSTREAM_ROUTES = {"create", "poll", "delete"}  # the `route` label of the upstream metrics
# Every metric of SPEC §8, as the sample names a scrape must show after the workload.
SAMPLES = [
    f"tokenhub_gateway_{n}"
    for n in (
        "requests_total",
        "request_duration_seconds_bucket",
        "upstream_requests_total",
        "upstream_duration_seconds_bucket",
        "tasks_created_total",
        "tasks_finished_total",
        "task_duration_seconds_bucket",
        "tasks_in_flight",
        "video_seconds_total",
        "spend_usd_total",
        "budget_usd",
        "budget_remaining_usd",
        "quota_rejections_total",
        "validation_errors_total",
        "upstream_key_state",
        "overhead_seconds_bucket",
        "poller_backlog",
        "webhook_deliveries_total",
        "webhook_backlog",
        "archive_bytes_total",
        "archive_failures_total",
    )
]


# ---- Prometheus -------------------------------------------------------------------------------------------


class Prometheus(Process):
    """`prometheus` on a loopback port, scraping one gateway with a bearer token read from a file."""

    def __init__(self, binary: str, tmp: Path, target: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = tmp / "metrics_token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "evaluation_interval": f"{SCRAPE_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": "tokenhub-gateway",
                    "metrics_path": "/metrics",
                    "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        (tmp / "prometheus-data").mkdir()
        super().__init__(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
        )

    def start(self) -> None:
        super().start()
        try:
            wait_http(self.url + "/-/ready", timeout=30, proc=self.proc)
            wait_until(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, 30, 0.1)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"prometheus did not become ready: {exc}\n{self.text()[-3000:]}") from exc

    def target(self) -> dict[str, Any] | None:
        active = httpx.get(self.url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return active[0] if active else None

    def wait_target_up(self, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: (target := self.target()) is not None and target["health"] == "up", timeout, 0.2)
        except TimeoutError:
            raise AssertionError(f"the gateway target never came up in Prometheus: {self.target()}") from None

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        return (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {"status": "error", "error": f"HTTP {response.status_code}: {response.text[:200]}"}
        )

    def vector(self, expr: str) -> list[dict[str, Any]]:
        out = self.query(expr)
        assert out.get("status") == "success", (expr, out)
        return out["data"]["result"]

    def scalar_sum(self, expr: str) -> float:
        result = self.vector(expr)
        return sum(float(s["value"][1]) for s in result)


# ---- workload ---------------------------------------------------------------------------------------------


class Workload:
    """What the test sent, so it can be looked for (and must not be found) in label values."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.canary = "canary" + secrets.token_hex(8)
        self.prompts: list[str] = []
        self.task_ids: list[str] = []
        self.to_settle: dict[str, str] = {}  # task id → user

    def prompt(self, marks: str) -> str:
        prompt = f"{marks} {self.canary} a heron lands on a frozen lake, shot {len(self.prompts)}"
        self.prompts.append(prompt)
        return prompt

    def create(self, user: str, marks: str = "sim:seconds=0.5", expect: int | None = 200, **kw: Any) -> httpx.Response:
        with self.gw.client(user) as client:
            response = client.post(CREATE, json=body(prompt=self.prompt(marks), **kw))
        if expect is not None:
            assert response.status_code == expect, response.text
        if response.status_code == 200:
            tid = response.json()["id"]
            self.task_ids.append(tid)
            self.to_settle[tid] = user
        return response

    def settle_all(self, timeout: float = 20.0) -> dict[str, str]:
        """Polls every task through the gateway until terminal; returns task id → status."""
        final: dict[str, str] = {}

        def done() -> bool:
            for tid, user in self.to_settle.items():
                if tid in final:
                    continue
                with self.gw.client(user) as client:
                    response = client.get(f"{CREATE}/{tid}")
                assert response.status_code == 200, response.text
                if response.json()["status"] in TERMINAL:
                    final[tid] = response.json()["status"]
            return len(final) == len(self.to_settle)

        wait_until(done, timeout, 0.25)
        return final


def run_workload(gw: Gateway, sim: Any, workload: Workload) -> None:
    # successes on both teams, several models and resolutions; one video too large for the archive
    workload.create("alice")
    workload.create("alice", "sim:seconds=0.5 sim:bytes=200001")
    workload.create("alice", model=FAST, resolution="480p", duration=4)
    workload.create("alice", resolution="480p")
    workload.create("bob")  # $1.00 of blue's $1.50
    # a failed task and a cancelled one (cancellable while queued: the first 20 % of its 60 s)
    workload.create("alice", "sim:seconds=0.5 sim:fail")
    cancel_id = workload.create("alice", "sim:seconds=60").json()["id"]
    with gw.client("alice") as client:
        response = client.delete(f"{CREATE}/{cancel_id}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    # a validation error, a quota rejection (blue's budget), an unknown route
    response = workload.create("alice", expect=400, duration=99)
    assert response.json()["error"]["param"] == "duration", response.text
    response = workload.create("bob", expect=None)
    assert 400 <= response.status_code < 500 and response.status_code != 404, response.text
    with gw.client("alice") as client:
        assert client.get("/no-such-route").status_code == 404
        assert client.get(f"{CREATE}/cgt-does-not-exist-{workload.canary}").status_code == 404
        assert client.get(CREATE).status_code == 200
        assert client.get("/models").status_code == 200
        assert client.get("/usage").status_code == 200
    # an upstream 429 on key-a (long Retry-After: it stays in cooldown while Prometheus looks)
    sim.fault("key-a", "429", retry_after=30, count=1, routes=["create"])
    for _ in range(16):
        workload.create("alice", model=FAST, resolution="480p", duration=4)
        if any(e["fault"] == "429" for e in sim.requests("create")):
            break
    else:
        raise AssertionError("key-a was never tried first in 16 creates")
    keys = {k["name"]: k["state"] for k in gw.admin("GET", "/admin/keys").json()["data"]}
    assert keys == {"key-a": "cooldown", "key-b": "ok"}, keys
    # an upstream 5xx answered as a gateway 5xx (key-a cools down, so key-b takes the create)
    sim.fault("key-b", "500", count=1, routes=["create"])
    response = workload.create("alice", expect=None)
    sim.clear_faults()
    assert response.status_code >= 500, response.text
    # TokenHub's usage figure out of range: settled at the estimate, counted as an anomaly
    tid = workload.create("alice").json()["id"]
    sim.script_poll(tid, count=None, patch={"status": "succeeded", "usage": {"video_duration": 1e14}})


def keep_busy(gw: Gateway, workload: Workload, seconds: float) -> None:
    """Light client traffic for a few scrapes, so request rates are real numbers rather than 0 / 0."""
    deadline = time.monotonic() + seconds
    with gw.client("alice") as client:
        while time.monotonic() < deadline:
            assert client.get(f"{CREATE}/{workload.task_ids[0]}").status_code == 200
            assert client.get("/usage").status_code == 200
            time.sleep(0.2)


# ---- checks -----------------------------------------------------------------------------------------------


def label_values(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names of a scrape, and every label's values."""
    names: set[str] = set()
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
    return names, values


def allowed_routes() -> set[str]:
    """The route templates the gateway serves, as the middleware labels them."""
    return {route_label({"route": r}) for r in route_table()} | {"unmatched"}


def test_dashboards_against_real_prometheus(make_gateway, sim, tmp_path):
    binary = require_binary("prometheus")
    secret = new_secret()
    receiver = Receiver(secret).__enter__()  # every terminal task is announced to it (webhook panels)
    gw = make_gateway(
        # blue crosses 0.5 of its budget with bob's $1.00 (the budget-alerts panel needs a series)
        teams={"red": {"budget_usd": 100}, "blue": {"budget_usd": 1.5, "alert_thresholds": [0.5, 0.8, 1.0]}},
        users={"alice": {"team": "red"}, "bob": {"team": "blue"}},
        keys=[{"name": "key-a"}, {"name": "key-b"}],
        extra={
            "server": {"metrics_token_env": "GATEWAY_METRICS_TOKEN"},
            "webhooks": [{"name": "render-farm", "url": receiver.url, "secret_env": "WEBHOOK_SECRET"}],
            "archive": {"dir": str(tmp_path / "videos"), "max_bytes_per_video": 200_000},
        },
        start=False,
    )
    gw.env.update(GATEWAY_METRICS_TOKEN=METRICS_TOKEN, WEBHOOK_SECRET=secret)
    gw.start()

    # /metrics needs the token
    assert httpx.get(gw.url + "/metrics", timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(gw.url + "/metrics", headers=wrong, timeout=5).status_code == 401
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert httpx.get(gw.url + "/metrics", headers=auth, timeout=5).status_code == 200

    prom = Prometheus(binary, tmp_path, f"127.0.0.1:{gw.port}", METRICS_TOKEN)
    try:
        prom.start()
        prom.wait_target_up()
        workload = Workload(gw)
        run_workload(gw, sim, workload)
        final = workload.settle_all()
        assert list(final.values()).count("succeeded") >= 5, final
        assert {"failed", "cancelled"} <= set(final.values()), final
        wait_until(lambda: len(receiver.delivered()) >= len(final), 15)
        wait_until(
            lambda: (
                'tokenhub_gateway_archive_failures_total{reason="too_large"} 1.0'
                in httpx.get(gw.url + "/metrics", headers=auth, timeout=5).text
            ),
            10,
        )

        # the ledger, once every task is settled; the create answered 5xx is `unknown`, which the spend
        # metrics count once an operator resolves it (SPEC §4, operator resolutions)
        rows = gw.admin("GET", "/admin/usage").json()["data"]
        for row in rows:
            if row["status"] == "unknown":
                resolved = gw.admin("POST", f"/admin/tasks/{row['task_id']}/settle", json={"video_seconds": 5})
                assert resolved.status_code == 200, resolved.text
        rows = gw.admin("GET", "/admin/usage").json()["data"]
        assert all(r["settled_at"] is not None for r in rows), rows
        ledger_total = sum(r["cost_usd"] or 0 for r in rows)
        ledger_by_team: dict[str, float] = {}
        for row in rows:
            ledger_by_team[row["team"]] = ledger_by_team.get(row["team"], 0) + (row["cost_usd"] or 0)
        assert ledger_total > 0

        # Prometheus has caught up with the settled counters, then a few more scrapes for rate()/increase()
        spend_expr = "sum(tokenhub_gateway_spend_usd_total)"
        try:
            wait_until(lambda: abs(prom.scalar_sum(spend_expr) - ledger_total) < 0.005, 10, 0.25)
        except TimeoutError:
            raise AssertionError(
                f"Prometheus spend {prom.scalar_sum(spend_expr)} never reached the ledger's {ledger_total}"
            ) from None
        keep_busy(gw, workload, 3.5 * SCRAPE_S)

        # every query of every panel returns at least one series
        failures = []
        queries = panel_queries()
        assert len(queries) > 20, queries
        for dashboard, title, expr in queries:
            out = prom.query(expr)
            if out.get("status") != "success":
                failures.append(f"{dashboard} / {title}: {out.get('errorType')} {out.get('error')}\n    {expr}")
            elif not out["data"]["result"]:
                failures.append(f"{dashboard} / {title}: no series\n    {expr}")
        assert not failures, f"{len(failures)} of {len(queries)} panel queries failed:\n" + "\n".join(failures)

        # the spend query agrees with the ledger, in total and per team (and with /usage)
        assert round(prom.scalar_sum(spend_expr), 2) == round(ledger_total, 2)
        prom_by_team = {
            s["metric"]["team"]: float(s["value"][1])
            for s in prom.vector("sum by (team) (tokenhub_gateway_spend_usd_total)")
        }
        for user, team in (("alice", "red"), ("bob", "blue")):
            with gw.client(user) as client:
                spent = client.get("/usage").json()["team"]["spent_usd"]
            assert round(prom_by_team.get(team, 0.0), 2) == round(spent, 2) == round(ledger_by_team[team], 2), (
                team,
                prom_by_team,
                spent,
                ledger_by_team,
            )

        # what the dashboards should show of this workload
        cooling = prom.vector('tokenhub_gateway_upstream_key_state{key="key-a", state="cooldown"} == 1')
        assert cooling, "key-a's cooldown is not visible in Prometheus"
        finished = prom.vector("sum by (status) (tokenhub_gateway_tasks_finished_total)")
        statuses = {s["metric"]["status"] for s in finished}
        assert {"succeeded", "failed", "cancelled"} <= statuses, statuses
        reasons = {s["metric"]["reason"] for s in prom.vector("tokenhub_gateway_quota_rejections_total")}
        assert "budget_usd" in reasons, reasons

        # label hygiene: no task id, raw path, prompt or key value in any label value
        response = httpx.get(gw.url + "/metrics", headers=auth, timeout=5)
        assert response.status_code == 200
        names, values = label_values(response.text)
        missing = [n for n in SAMPLES if n not in names]
        assert not missing, f"metrics with no sample after the workload: {missing}"
        secrets_ = {
            **{f"upstream key {n}": v for n, v in KEYS.items()},
            **{f"gateway key of {u}": v for u, v in gw.user_keys.items()},
            "metrics token": METRICS_TOKEN,
            "admin token": ADMIN_TOKEN,
        }
        forbidden = {
            **{f"task id {t}": t for t in workload.task_ids},
            **{f"prompt {p!r}": p for p in workload.prompts},
            "prompt canary": workload.canary,
            "task-id prefix": "cgt-",
            **secrets_,
        }
        leaks = sorted(
            {
                f"{label}={v!r} holds {what}"
                for label, vs in values.items()
                for v in vs
                for what, bad in forbidden.items()
                if bad in v
            }
        )
        assert not leaks, "\n".join(leaks)
        routes = allowed_routes()
        assert routes >= {"/videos/generations", "/videos/generations/{task_id}", "/metrics"}, routes
        bad_routes = values.get("route", set()) - routes - UPSTREAM_ROUTES
        assert not bad_routes, f"route label values that are not route templates: {bad_routes}"
        assert values.get("key", set()) <= {"key-a", "key-b"}, values.get("key")
        assert values.get("team", set()) <= {"red", "blue", ""}, values.get("team")
    finally:
        prom.stop()
        receiver.__exit__()
