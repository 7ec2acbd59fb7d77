"""Every metric of the gateway, defined against a registry the app owns (SPEC §8)."""

from __future__ import annotations

import os
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

M = TypeVar("M", bound=MetricWrapperBase)

KEY_STATES = ("ok", "cooldown", "disabled", "open")
# Gateway overhead is sub-millisecond when healthy; upstream calls go up to the timeout (60 s);
# tasks take seconds to tens of minutes.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TASK_BUCKETS = (5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600, 7200)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.registry = registry
        # Set by `serve --workers` for every worker (prometheus_client reads it at import): each worker's
        # samples go to files there, and every /metrics sums them. Gauges of shared state take the latest.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        prefix = "tokenhub_gateway_"
        self.requests = Counter(
            prefix + "requests",
            "Requests answered by the gateway",
            ["route", "method", "code", "team"],
            registry=registry,
        )
        self.request_duration = Histogram(
            prefix + "request_duration_seconds",
            "Whole request time",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_requests = Counter(
            prefix + "upstream_requests", "Calls to TokenHub", ["key", "route", "code"], registry=registry
        )
        self.upstream_duration = Histogram(
            prefix + "upstream_duration_seconds",
            "TokenHub call time",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.tasks_created = Counter(
            prefix + "tasks_created", "Tasks created upstream", ["team", "model", "resolution"], registry=registry
        )
        self.tasks_finished = Counter(
            prefix + "tasks_finished",
            "Tasks settled, by terminal status",
            ["team", "model", "resolution", "status"],
            registry=registry,
        )
        self.task_duration = Histogram(
            prefix + "task_duration_seconds",
            "Create → terminal status",
            ["model", "resolution"],
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.tasks_in_flight = Gauge(
            prefix + "tasks_in_flight",
            "Tasks not yet terminal",
            ["team"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.video_seconds = Counter(
            prefix + "video_seconds",
            "Billed video seconds (an unknown create's once an operator resolves it)",
            ["team", "model", "resolution"],
            registry=registry,
        )
        self.spend_usd = Counter(
            prefix + "spend_usd",
            "Settled spend in US dollars (an unknown create's once an operator resolves it)",
            ["team", "model", "resolution"],
            registry=registry,
        )
        self.budget_usd = Gauge(
            prefix + "budget_usd",
            "Team budget for the current period",
            ["team"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.budget_remaining_usd = Gauge(
            prefix + "budget_remaining_usd",
            "Team budget left (spent and reserved deducted)",
            ["team"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.quota_rejections = Counter(
            prefix + "quota_rejections", "Creates refused by a limit", ["team", "reason"], registry=registry
        )
        self.validation_errors = Counter(
            prefix + "validation_errors", "Creates refused by validation", ["param"], registry=registry
        )
        self.key_state = Gauge(
            prefix + "upstream_key_state",
            "1 for the key's current state",
            ["key", "state"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.overhead = Histogram(
            prefix + "overhead_seconds",
            "Time in the gateway, upstream excluded",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.poller_backlog = Gauge(
            prefix + "poller_backlog", "Tasks awaiting settlement", registry=registry, multiprocess_mode="mostrecent"
        )
        self.settlement_anomalies = Counter(
            prefix + "settlement_anomalies",
            "TokenHub figures not believed at settlement (the estimate was charged)",
            ["reason"],
            registry=registry,
        )
        self.tasks_unknown = Counter(
            prefix + "tasks_unknown",
            "Forwarded creates whose outcome is unknown (charged at their estimate until resolved)",
            ["team", "reason"],
            registry=registry,
        )
        self.archive_bytes = Counter(
            prefix + "archive_bytes", "Bytes copied into the video archive", ["variant"], registry=registry
        )
        self.archive_failures = Counter(
            prefix + "archive_failures", "Archive copies that failed, by reason", ["reason"], registry=registry
        )
        self.webhook_deliveries = Counter(
            prefix + "webhook_deliveries",
            "Webhook delivery attempts, by result",
            ["endpoint", "result"],
            registry=registry,
        )
        self.webhook_backlog = Gauge(
            prefix + "webhook_backlog", "Webhook events not yet delivered nor given up", ["endpoint"], registry=registry
        )
        self.budget_alerts = Counter(
            prefix + "budget_alerts",
            "Budget thresholds reached, once per threshold per period across replicas (SPEC §15)",
            ["scope", "threshold"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str, str], tuple[Counter, Histogram, Histogram]] = {}
        self._labelled: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}

    def exposition(self) -> bytes:
        """What /metrics serves: this registry's samples, or every worker's under `serve --workers`."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
        return generate_latest(merged)

    def observe_request(self, route: str, method: str, code: str, team: str, elapsed: float, overhead: float) -> None:
        """The per-request metrics, through children cached by their (bounded) label values."""
        children = self._children.get((route, method, code, team))
        if children is None:
            children = (
                self.requests.labels(route, method, code, team),
                self.request_duration.labels(route, method),
                self.overhead.labels(route),
            )
            self._children[(route, method, code, team)] = children
        children[0].inc()
        children[1].observe(elapsed)
        children[2].observe(overhead)

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, cached: label values here come from the config and fixed sets."""
        key = (id(metric), labels)
        got = self._labelled.get(key)
        if got is None:
            got = self._labelled[key] = metric.labels(*labels)
        return cast(M, got)

    def set_key_state(self, key: str, state: str) -> None:
        for name in KEY_STATES:
            self.key_state.labels(key, name).set(1 if name == state else 0)
