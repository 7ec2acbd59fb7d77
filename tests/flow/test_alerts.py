"""Budget alerts from a settlement (SPEC §15): the event through the outbox, the log line and the metric, once
per threshold per period; a budget lowered below the spend sends what it now passes."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from gateway.flow.alerts import budgets_changed, watch
from gateway.flow.settlement import Settlement
from gateway.metrics import Metrics
from gateway.policy.quota import Subject
from gateway.settings import Limits, Settings
from gateway.store.outbox import webhook_topic
from gateway.store.sqlite.store import SQLiteStore
from gateway.upstream.client import AnswerTooLarge
from tests.doubles import FakeUpstream, make_settings
from tests.flow.conftest import Running
from tests.store.helpers import admitted, created

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
TEN_SECONDS = {"usage": {"video_duration": 10}}  # with the helpers' 5 s input: 15 s at $0.20, $3


def settings_with(budget_usd: float, thresholds: list[float], webhooks: list[dict[str, Any]] | None = None) -> Settings:
    endpoints = webhooks if webhooks is not None else [{"name": "finance"}]
    return make_settings(
        teams={"marketing": {"budget_usd": budget_usd, "alert_thresholds": thresholds}, "b": {}},
        users={"alice": {"team": "marketing", "key": "tgw-alice-test-key"}},
        webhooks=[{"url": "https://hooks.example/in", "secret_env": "WS", **ep} for ep in endpoints],
        env={"WS": SECRET},
    )


@pytest.fixture
async def sqlite(tmp_path: Path):
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    yield store
    await store.close()


def alerts_counted(metrics: Metrics, scope: str, threshold: str) -> float:
    labels = {"scope": scope, "threshold": threshold}
    return metrics.registry.get_sample_value("tokenhub_gateway_budget_alerts_total", labels) or 0.0


async def settle_one(settlement: Settlement, store: SQLiteStore) -> None:
    task = await created(store, await store.now())
    assert await settlement.settle(task, "succeeded", TEN_SECONDS, b"{}") is not None


async def events(store: SQLiteStore, endpoint: str = "finance") -> list[dict[str, Any]]:
    items = await store.outbox_claim(webhook_topic(endpoint), 100, 2e9, 60)  # past every item's due time
    return [orjson.loads(item.payload) for item in items if b"budget.threshold_reached" in item.payload]


async def test_the_settlement_that_crosses_a_threshold_logs_counts_and_queues_its_event_once(sqlite):
    metrics = Metrics()
    settlement = Settlement(settings_with(10.0, [0.5, 1.0]), sqlite, metrics, lambda: 1_800_000_000.0)
    await settle_one(settlement, sqlite)  # $3
    with capture_logs() as logs:
        await settle_one(settlement, sqlite)  # $6: 0.5 reached
        await settle_one(settlement, sqlite)  # $9: nothing new
    lines = [line for line in logs if line["event"] == "budget.threshold_reached"]
    assert len(lines) == 1
    assert {k: lines[0][k] for k in ("scope", "name", "team", "threshold", "spent_usd", "budget_usd")} == {
        "scope": "team",
        "name": "marketing",
        "team": "marketing",
        "threshold": 0.5,
        "spent_usd": 6.0,
        "budget_usd": 10.0,
    }
    assert alerts_counted(metrics, "team", "0.5") == 1 and alerts_counted(metrics, "team", "1.0") == 0
    [event] = await events(sqlite)
    assert event["type"] == "budget.threshold_reached" and event["object"] == "event"
    assert event["id"].startswith("evt_") and event["created_at"] == 1_800_000_000
    assert event["data"] == {
        "scope": "team",
        "name": "marketing",
        "team": "marketing",
        "period": lines[0]["period"],
        "threshold": 0.5,
        "spent_usd": 6.0,
        "budget_usd": 10.0,
        "video_seconds_spent": 30.0,
        "video_seconds_budget": None,
    }
    assert event["data"]["period"].count("-") == 1  # a month: "2026-12"


async def test_endpoints_get_the_event_only_when_they_want_it(sqlite):
    endpoints = [{"name": "finance"}, {"name": "videos", "events": ["video.completed"]}, {"name": "b", "teams": ["b"]}]
    settlement = Settlement(settings_with(5.0, [0.5], endpoints), sqlite, Metrics(), lambda: 1_800_000_000.0)
    await settle_one(settlement, sqlite)  # $3 of $5
    assert len(await events(sqlite, "finance")) == 1
    assert await events(sqlite, "videos") == [] and await events(sqlite, "b") == []


async def test_a_failed_task_spends_nothing_and_checks_nothing(sqlite):
    metrics = Metrics()
    settlement = Settlement(settings_with(0.0, [0.5, 1.0]), sqlite, metrics, lambda: 1_800_000_000.0)
    task = await created(sqlite, await sqlite.now())
    with capture_logs() as logs:
        await settlement.settle(task, "failed", {}, b"{}")
    assert not [line for line in logs if line["event"] == "budget.threshold_reached"]
    assert alerts_counted(metrics, "team", "0.5") == 0


async def test_a_budget_lowered_below_the_spend_sends_the_thresholds_it_now_passes(sqlite):
    metrics = Metrics()
    settlement = Settlement(settings_with(100.0, [0.5, 0.8, 1.0]), sqlite, metrics, time.time)  # the store's clock
    await settle_one(settlement, sqlite)  # $3 of $100
    assert alerts_counted(metrics, "team", "0.5") == 0
    settlement.settings = settings_with(3.5, [0.5, 0.8, 1.0])  # $3 of $3.50: 0.5 and 0.8 are passed
    await settlement.budget_changed("team", "marketing")
    await settlement.budget_changed("team", "marketing")  # once per period
    assert [alerts_counted(metrics, "team", t) for t in ("0.5", "0.8", "1.0")] == [1, 1, 0]
    assert sorted(e["data"]["threshold"] for e in await events(sqlite)) == [0.5, 0.8]
    await settlement.budget_changed("user", "nobody")  # not in force: nothing to check


def test_a_subject_without_a_budget_or_thresholds_is_not_watched():
    subject = Subject("team", "t", "2026-12", Limits())
    assert watch(subject, "t", (), 0.0) is None
    assert watch(subject._replace(limits=Limits(budget_micros=1, alert_thresholds=())), "t", (), 0.0) is None
    seconds = watch(subject._replace(limits=Limits(video_seconds=60)), "t", (), 0.0)
    assert seconds is not None and seconds.budget_ms == 60_000 and seconds.budget_micros is None
    assert [t.value for t in seconds.thresholds] == [0.8, 1.0] and all(t.items == () for t in seconds.thresholds)


def test_a_reload_names_the_subjects_whose_budget_changed():
    old = settings_with(10.0, [0.5, 1.0])
    assert budgets_changed(old, settings_with(10.0, [0.5, 1.0])) == []
    assert budgets_changed(old, settings_with(5.0, [0.5, 1.0])) == [("team", "marketing")]
    assert budgets_changed(old, settings_with(10.0, [0.9])) == [("team", "marketing")]


async def test_an_unknown_create_charged_its_estimate_alerts_in_its_own_step(sqlite):
    metrics = Metrics()
    settlement = Settlement(settings_with(5.0, [0.5, 1.0]), sqlite, metrics, lambda: 1_800_000_000.0)
    told: list[bool] = []
    settlement.on_outbox = lambda: told.append(True)
    task = await admitted(sqlite, await sqlite.now())  # pending, estimated at $3: 0.6 of $5
    check = settlement.budget_check(task, 1_800_000_000.0)
    assert check is not None
    await sqlite.mark_unknown(task.rid, 1_800_000_000.0, None, (), check)
    with capture_logs() as logs:
        settlement.alerted(check)
    assert [line["threshold"] for line in logs if line["event"] == "budget.threshold_reached"] == [0.5]
    assert alerts_counted(metrics, "team", "0.5") == 1 and told == [True]
    assert [e["data"]["spent_usd"] for e in await events(sqlite)] == [3.0]


async def test_an_operator_billing_an_unknown_row_alerts_on_the_spend_it_adds(sqlite):
    metrics = Metrics()
    settlement = Settlement(settings_with(10.0, [0.5, 1.0]), sqlite, metrics, lambda: 1_800_000_000.0)
    task = await admitted(sqlite, await sqlite.now())
    await sqlite.mark_unknown(task.rid, 1_800_000_000.0, None, ())  # $3 of $10: nothing yet
    with capture_logs() as logs:
        done = await settlement.bill(task.rid, 30, "ops")  # (5 s in + 30 s out) at $0.20: $7
    assert (done.status, done.cost_micros) == ("succeeded", 7_000_000)
    [line] = [line for line in logs if line["event"] == "budget.threshold_reached"]
    assert (line["threshold"], line["spent_usd"]) == (0.5, 7.0)
    assert alerts_counted(metrics, "team", "0.5") == 1
    assert [e["data"]["threshold"] for e in await events(sqlite)] == [0.5]


def test_unknown_creates_through_the_gateway_count_their_budget_alerts(run_app: Callable[..., Running]):
    app = run_app(FakeUpstream(raises=AnswerTooLarge(1024, 200)))  # team red: $10, thresholds 0.8 and 1.0
    with capture_logs() as logs:
        for _ in range(8):  # $1 estimate each: $8 is 0.8 of $10
            assert app.create().status_code == 502
    assert [row["status"] for row in app.ledger()] == ["unknown"] * 8
    reached = [line for line in logs if line["event"] == "budget.threshold_reached"]
    assert [(line["scope"], line["name"], line["threshold"], line["spent_usd"]) for line in reached] == [
        ("team", "red", 0.8, 8.0)
    ]
    assert alerts_counted(app.metrics, "team", "0.8") == 1
