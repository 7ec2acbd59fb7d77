"""Settlement: a task's actual cost from TokenHub's figures, checked before they touch the books,
and the one place a settled task is counted and logged (SPEC §4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from gateway.delivery.archive import archive_item
from gateway.delivery.webhooks import event_items
from gateway.errors import NotFound, ValidationError
from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.policy import pricing
from gateway.settings import Settings
from gateway.store.base import Store, Task

MAX_OUTPUT_S = 60  # TokenHub's figures outside these bounds are not believed (SPEC §4)
MAX_INPUT_S = 45


@dataclass(frozen=True, slots=True)
class Figures:
    """What a terminal answer bills: milliseconds, micro-dollars, whether it is an estimate, and why
    TokenHub's own figures were not used (a bounded label), if they were not."""

    billed_ms: int
    cost_micros: int
    estimated: bool
    anomaly: str | None = None


def checked_seconds(value: Any, low: float, high: float, low_inclusive: bool) -> Decimal | None:
    """A figure from TokenHub as exact seconds, or None when it is not a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
        return None
    return Decimal(str(value))


def figures(settings: Settings, task: Task, status: str, data: dict) -> Figures:
    """The actual cost of a task at its first terminal status. Only delivered videos cost; a figure
    TokenHub did not give, or gave out of range, falls back to the estimate and is flagged."""
    if status != "succeeded":
        return Figures(0, 0, False)
    if task.resolution not in settings.pricing.get(task.model, {}):
        return Figures(task.estimate_ms, task.estimate_micros, True, "price_removed")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    raw_output = usage.get("video_duration")
    output = checked_seconds(raw_output, 0, MAX_OUTPUT_S, low_inclusive=False)
    if output is None:
        reason = (
            "output_seconds_missing"
            if raw_output is None
            else (
                "output_seconds_zero"
                if raw_output == 0 and not isinstance(raw_output, bool)
                else "output_seconds_invalid"
            )
        )
        return Figures(task.estimate_ms, task.estimate_micros, True, reason)
    input_s, estimated, anomaly = Decimal(task.input_ms) / 1000, task.input_estimated, None
    if "input_video_duration" in usage:
        given = checked_seconds(usage["input_video_duration"], 0, MAX_INPUT_S, low_inclusive=True)
        if given is None:
            anomaly, estimated = "input_seconds_invalid", True
        else:
            input_s, estimated = given, False  # TokenHub's own figure wins over the client's
    ms, cost = pricing.actual(settings.pricing, task.model, task.resolution, input_s, status, output)
    return Figures(ms, cost, estimated, anomaly)


class Settlement:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.settings, self.store, self.metrics, self.clock = settings, store, metrics, clock
        self.log = structlog.get_logger("gateway.tasks")
        self.on_outbox: Callable[[], None] = lambda: None  # told when a settlement left outbox items
        self.archiving = False  # a succeeded task's files are to be copied into the archive

    async def settle(
        self, task: Task, status: str, data: dict | None, raw: bytes | None, estimated: bool = False
    ) -> Task | None:
        """Replace the task's reservation by its cost, once; None when it was already settled."""
        if estimated:
            f = Figures(task.estimate_ms, task.estimate_micros, True)
        else:
            f = figures(self.settings, task, status, data or {})
            if f.anomaly:
                self.anomaly(f.anomaly, task)
        now = self.clock()
        items = event_items(self.settings.webhooks, task, status, f.billed_ms, f.cost_micros, now)
        if self.archiving and status == "succeeded" and (copy := archive_item(task, data or {}, now)):
            items.append(copy)
        done = await self.store.settle(
            task.task_id or task.rid, status, f.billed_ms, f.cost_micros, f.estimated, raw, now, items
        )
        task.status = status
        if done is not None:
            self.settled(done)
            if items:
                self.on_outbox()
        return done

    def unknown_items(self, task: Task) -> list:
        """The events of a create whose outcome is unknown: charged at its estimate (SPEC §4)."""
        return event_items(
            self.settings.webhooks, task, "unknown", task.estimate_ms, task.estimate_micros, self.clock()
        )

    async def resolve(self, ref: str, video_seconds: Any) -> Task:
        """An operator's resolution of an `unknown` row, once TokenHub's own records are checked:
        `video_seconds` None voids it; else it is priced exactly (input seconds as at create)."""
        task = await self.store.get_record(ref)
        if task is None:
            raise NotFound(f"No ledger row {ref!r}.", param="task_id")
        if video_seconds is None:
            billed_ms, cost = 0, 0
        else:
            output = checked_seconds(video_seconds, 0, MAX_OUTPUT_S, low_inclusive=False)
            if output is None:
                raise ValidationError(
                    f"video_seconds must be a number above 0 and at most {MAX_OUTPUT_S}.", param="video_seconds"
                )
            if task.resolution not in self.settings.pricing.get(task.model, {}):
                raise ValidationError(
                    f"No price is configured for {task.model} at {task.resolution}.", param="video_seconds"
                )
            billed_ms, cost = pricing.actual(
                self.settings.pricing, task.model, task.resolution, Decimal(task.input_ms) / 1000, "succeeded", output
            )
        done = await self.store.resolve_unknown(ref, billed_ms, cost, self.clock())
        self.log.info(
            "task.settled",
            task_id=done.task_id or done.rid,
            team=done.team,
            user=done.user,
            model=done.model,
            resolution=done.resolution,
            status=done.status,
            billed_seconds=(done.billed_ms or 0) / 1000,
            cost_usd=micros_to_usd(done.cost_micros or 0),
            estimated=done.cost_estimated,
            resolved="void" if video_seconds is None else "settle",
        )
        return done

    def anomaly(self, reason: str, task: Task) -> None:
        self.metrics.child(self.metrics.settlement_anomalies, reason).inc()
        self.log.warning("task.settlement_anomaly", reason=reason, task_id=task.task_id or task.rid, team=task.team)

    def settled(self, t: Task) -> None:
        """Count and log a task that has just been settled (from any path)."""
        m = self.metrics
        m.tasks_finished.labels(t.team, t.model, t.resolution, t.status).inc()
        m.task_duration.labels(t.model, t.resolution).observe(max(0.0, (t.settled_at or 0) - t.created_at))
        if t.billed_ms:
            m.video_seconds.labels(t.team, t.model, t.resolution).inc(t.billed_ms / 1000)
        if t.cost_micros:
            m.spend_usd.labels(t.team, t.model, t.resolution).inc(t.cost_micros / 1_000_000)
        log = self.log.warning if t.status in ("unresolved", "expired", "unknown") else self.log.info
        log(
            "task.settled",
            task_id=t.task_id or t.rid,
            team=t.team,
            user=t.user,
            model=t.model,
            resolution=t.resolution,
            status=t.status,
            billed_seconds=(t.billed_ms or 0) / 1000,
            cost_usd=micros_to_usd(t.cost_micros or 0),
            estimated=t.cost_estimated,
        )
