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
from gateway.errors import GatewayError, NotFound, ValidationError
from gateway.flow.alerts import BudgetAlerts, Members, subject_now, task_subjects
from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.policy import pricing
from gateway.settings import Settings
from gateway.store.base import UNKNOWN, VOIDED, Store, Task
from gateway.store.budget import BudgetCheck
from gateway.store.outbox import Item

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


def figures(settings: Settings, task: Task, status: str, data: dict[str, Any]) -> Figures:
    """The actual cost of a task at its first terminal status. Only delivered videos cost; a figure
    TokenHub did not give, or gave out of range, falls back to the estimate and is flagged."""
    if status != "succeeded":
        return Figures(0, 0, False)
    if task.resolution not in settings.pricing.get(task.model, {}):
        return Figures(task.estimate_ms, task.estimate_micros, True, "price_removed")
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
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
    input_s = Decimal(task.input_ms) / 1000
    estimated = task.input_estimated
    anomaly: str | None = None
    if "input_video_duration" in usage:
        given = checked_seconds(usage["input_video_duration"], 0, MAX_INPUT_S, low_inclusive=True)
        if given is None:
            anomaly = "input_seconds_invalid"
            estimated = True
        else:
            input_s = given  # TokenHub's own figure wins over the client's
            estimated = False
    billed_ms, cost = pricing.actual(settings.pricing, task.model, task.resolution, input_s, status, output)
    return Figures(billed_ms, cost, estimated, anomaly)


class Settlement:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.log = structlog.get_logger("gateway.tasks")
        self.on_outbox: Callable[[], None] = lambda: None  # told when a settlement left outbox items
        self.archiving = False  # a succeeded task's files are to be copied into the archive
        self.alerts = BudgetAlerts(metrics)
        self.members: Members | None = None  # the teams and users in force (the app's directory); else settings

    async def settle(
        self, task: Task, status: str, data: dict[str, Any] | None, raw: bytes | None, estimated: bool = False
    ) -> Task | None:
        """Replace the task's reservation by its cost, once; None when it was already settled."""
        if estimated:
            charge = Figures(task.estimate_ms, task.estimate_micros, True)
        else:
            charge = figures(self.settings, task, status, data or {})
            if charge.anomaly:
                self.anomaly(charge.anomaly, task)
        now = self.clock()
        items = event_items(self.settings.webhooks, task, status, charge.billed_ms, charge.cost_micros, now)
        if self.archiving and status == "succeeded" and (copy := archive_item(task, data or {}, now)):
            items.append(copy)
        spends = charge.cost_micros > 0 or charge.billed_ms > 0
        check = (
            self.alerts.check(task_subjects(self.members or self.settings, task), self.settings.webhooks, now)
            if spends
            else None
        )
        done = await self.store.settle(
            task.task_id or task.rid,
            status,
            charge.billed_ms,
            charge.cost_micros,
            charge.estimated,
            raw,
            now,
            items,
            check,
        )
        task.status = status
        if done is not None:
            self.settled(done)
            if check:
                self.alerts.emit(check)
            if items or (check and check.reached):
                self.on_outbox()
        return done

    async def budget_changed(self, scope: str, name: str) -> None:
        """A team's or user's limits changed (the admin API, a reload): thresholds now passed are sent. The
        change stands when the store cannot check now; the subject's next settlement sends them then."""
        now = self.clock()
        subject = subject_now(self.members or self.settings, scope, name, now)
        try:
            if await self.alerts.after_change(self.store, subject, self.settings.webhooks, now):
                self.on_outbox()
        except GatewayError as exc:
            self.log.warning("budget.check_failed", scope=scope, name=name, error=exc.code)

    def budget_check(self, task: Task, now: float) -> BudgetCheck | None:
        """What a step that moves the task's spend checks: its user's and team's thresholds (in the periods
        it was counted in), for the store to mark in that step (an unknown create charged, a resolution)."""
        return self.alerts.check(task_subjects(self.members or self.settings, task), self.settings.webhooks, now)

    def alerted(self, check: BudgetCheck | None) -> None:
        """The log line and metric of each threshold a step reached first; the outbox is told of its events."""
        if check is not None and check.reached:
            self.alerts.emit(check)
            self.on_outbox()

    def unknown_items(self, task: Task) -> list[Item]:
        """The events of a create whose outcome is unknown: charged at its estimate (SPEC §4)."""
        return event_items(
            self.settings.webhooks, task, "unknown", task.estimate_ms, task.estimate_micros, self.clock()
        )

    async def void(self, ref: str, resolved_by: str) -> Task:
        """An operator's resolution of an `unknown` row that TokenHub's records show it never billed."""
        return await self._resolve(ref, VOIDED, 0, 0, resolved_by)

    async def bill(self, ref: str, video_seconds: Any, resolved_by: str) -> Task:
        """An operator's resolution of an `unknown` row that TokenHub billed `video_seconds` of output for:
        priced exactly (input seconds as at create), as a succeeded task. `video_seconds` is a finite
        number, 0 < video_seconds <= MAX_OUTPUT_S, else ValidationError."""
        output = checked_seconds(video_seconds, 0, MAX_OUTPUT_S, low_inclusive=False)
        if output is None:
            raise ValidationError(
                f"video_seconds must be a number above 0 and at most {MAX_OUTPUT_S}.", param="video_seconds"
            )
        task = await self.store.get_record(ref)
        if task is None:
            raise NotFound(f"No ledger row {ref!r}.", param="task_id")
        if task.resolution not in self.settings.pricing.get(task.model, {}):
            raise ValidationError(
                f"No price is configured for {task.model} at {task.resolution}.", param="video_seconds"
            )
        billed_ms, cost = pricing.actual(
            self.settings.pricing, task.model, task.resolution, Decimal(task.input_ms) / 1000, "succeeded", output
        )
        return await self._resolve(ref, "succeeded", billed_ms, cost, resolved_by)

    async def _resolve(self, ref: str, status: str, billed_ms: int, cost: int, resolved_by: str) -> Task:
        """Once only (the store refuses a row that is not `unknown`); its resolved figures are counted now,
        as settled() left an unknown create's estimate out of the spend counters."""
        now = self.clock()
        task = await self.store.get_record(ref)
        check = self.budget_check(task, now) if task is not None else None
        done = await self.store.resolve_unknown(ref, status, billed_ms, cost, resolved_by, now, check)
        self.spent(done)
        self.alerted(check)
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
            resolved_by=done.resolved_by,
        )
        return done

    def spent(self, task: Task) -> None:
        """The spend counters: what a settled task cost, in the ledger's figures."""
        metrics = self.metrics
        if task.billed_ms:
            metrics.video_seconds.labels(task.team, task.model, task.resolution).inc(task.billed_ms / 1000)
        if task.cost_micros:
            metrics.spend_usd.labels(task.team, task.model, task.resolution).inc(task.cost_micros / 1_000_000)

    def anomaly(self, reason: str, task: Task) -> None:
        self.metrics.child(self.metrics.settlement_anomalies, reason).inc()
        self.log.warning("task.settlement_anomaly", reason=reason, task_id=task.task_id or task.rid, team=task.team)

    def settled(self, task: Task) -> None:
        """Count and log a task that has just been settled (from any path)."""
        metrics = self.metrics
        metrics.tasks_finished.labels(task.team, task.model, task.resolution, task.status).inc()
        metrics.task_duration.labels(task.model, task.resolution).observe(
            max(0.0, (task.settled_at or 0) - task.created_at)
        )
        if task.status != UNKNOWN:  # counted when an operator resolves it, by the resolved figures
            self.spent(task)
        log = self.log.warning if task.status in ("unresolved", "expired", UNKNOWN) else self.log.info
        log(
            "task.settled",
            task_id=task.task_id or task.rid,
            team=task.team,
            user=task.user,
            model=task.model,
            resolution=task.resolution,
            status=task.status,
            billed_seconds=(task.billed_ms or 0) / 1000,
            cost_usd=micros_to_usd(task.cost_micros or 0),
            estimated=task.cost_estimated,
        )
