"""Budget alerts (SPEC §15): what a settlement hands the store to check in its own step, and, for each threshold
that step reached first, the log line and the metric of the process that settled.

The store decides (store/budget.py): a threshold is sent once per period across every replica, its webhook
events written to the outbox with the settlement. Here the events are built, one per endpoint that wants
`budget.threshold_reached` for the subject's team, with the spent figures left for the store to put in."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Protocol

import orjson
import structlog

from gateway.metrics import Metrics
from gateway.money import micros_to_usd
from gateway.policy.quota import Subject, period_key
from gateway.settings import Limits, Team, User, WebhookEndpoint
from gateway.store.base import Store, Task
from gateway.store.budget import ALERT_EVENT, SPENT_S, SPENT_USD, AlertWatch, BudgetCheck, Reached, Threshold
from gateway.store.outbox import Item, webhook_topic


class Members(Protocol):
    """The teams and users in force: the Settings' alone, or the directory's (config and store)."""

    @property
    def teams(self) -> Mapping[str, Team]: ...
    @property
    def users(self) -> Mapping[str, User]: ...


def threshold_label(value: float) -> str:
    """The metric's `threshold` label, as configured: 0.8, 1.0."""
    return repr(float(value))


def watch(subject: Subject, team: str, endpoints: Iterable[WebhookEndpoint], now: float) -> AlertWatch | None:
    """A subject's thresholds and their events, or None when it has no budget or no threshold."""
    limits = subject.limits
    budget_ms = None if limits.video_seconds is None else limits.video_seconds * 1000
    if (limits.budget_micros is None and budget_ms is None) or not limits.alert_thresholds:
        return None
    wanting = [ep for ep in endpoints if ep.wants(ALERT_EVENT, team)]
    thresholds = tuple(
        Threshold(value, tuple(_event(ep, subject, team, value, now) for ep in wanting))
        for value in limits.alert_thresholds
    )
    return AlertWatch(subject.scope, subject.name, team, subject.period, limits.budget_micros, budget_ms, thresholds)


def _event(endpoint: WebhookEndpoint, subject: Subject, team: str, value: float, now: float) -> Item:
    limits = subject.limits
    event_id = "evt_" + secrets.token_hex(12)
    payload = {
        "id": event_id,
        "object": "event",
        "type": ALERT_EVENT,
        "created_at": int(now),
        "data": {
            "scope": subject.scope,
            "name": subject.name,
            "team": team,
            "period": subject.period,
            "threshold": value,
            "spent_usd": SPENT_USD,
            "budget_usd": None if limits.budget_micros is None else micros_to_usd(limits.budget_micros),
            "video_seconds_spent": SPENT_S,
            "video_seconds_budget": limits.video_seconds,
        },
    }
    return Item(event_id, webhook_topic(endpoint.name), orjson.dumps(payload), now)


def task_subjects(members: Members, task: Task) -> list[tuple[Subject, str]]:
    """The user and team a settled task was counted against, in the periods it was counted in, with the
    limits in force now (a subject no longer in force has none to check)."""
    out = []
    user = members.users.get(task.user)
    if user is not None and user.team == task.team:
        out.append((Subject("user", user.name, task.user_period, user.limits), task.team))
    team = members.teams.get(task.team)
    if team is not None:
        out.append((Subject("team", team.name, task.team_period, team.limits), task.team))
    return out


def subject_now(members: Members, scope: str, name: str, now: float) -> tuple[Subject, str] | None:
    """A team or user in force, in its current period, with its team's name."""
    found: Team | User | None = members.teams.get(name) if scope == "team" else members.users.get(name)
    if found is None:
        return None
    limits: Limits = found.limits
    team = found.team if isinstance(found, User) else found.name
    return Subject(scope, name, period_key(limits.period, now), limits), team


def budgets_changed(old: Members, new: Members) -> list[tuple[str, str]]:
    """The config's teams and users whose budget or thresholds a reload changed, as (scope, name)."""
    teams = [("team", name) for name, team in new.teams.items() if _changed(old.teams.get(name), team)]
    return teams + [("user", name) for name, user in new.users.items() if _changed(old.users.get(name), user)]


def _changed(was: Team | User | None, now_in_force: Team | User) -> bool:
    return was is not None and _budget(was.limits) != _budget(now_in_force.limits)


def _budget(limits: Limits) -> tuple[object, ...]:
    return (limits.budget_micros, limits.video_seconds, limits.period, limits.alert_thresholds)


class BudgetAlerts:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.log = structlog.get_logger("gateway.budget")

    def check(
        self, subjects: Iterable[tuple[Subject, str]], endpoints: Iterable[WebhookEndpoint], now: float
    ) -> BudgetCheck | None:
        endpoints = tuple(endpoints)
        watches = tuple(found for subject, team in subjects if (found := watch(subject, team, endpoints, now)))
        return BudgetCheck(watches) if watches else None

    async def after_change(
        self, store: Store, subject: tuple[Subject, str] | None, endpoints: Iterable[WebhookEndpoint], now: float
    ) -> list[Reached]:
        """A budget changed: the thresholds what is already spent now passes are sent (once per period)."""
        check = self.check([subject] if subject else [], endpoints, now)
        if check is None:
            return []
        await store.check_budget(check, now)
        self.emit(check)
        return check.reached

    def emit(self, check: BudgetCheck) -> None:
        """The log line and the metric of each threshold this process's step reached first."""
        for reached in check.reached:
            alert = reached.watch
            self.metrics.budget_alerts.labels(alert.scope, threshold_label(reached.threshold)).inc()
            self.log.warning(
                "budget.threshold_reached",
                scope=alert.scope,
                name=alert.name,
                team=alert.team,
                period=alert.period,
                threshold=reached.threshold,
                spent_usd=micros_to_usd(reached.spent_micros),
                budget_usd=None if alert.budget_micros is None else micros_to_usd(alert.budget_micros),
                video_seconds_spent=reached.spent_ms / 1000,
                video_seconds_budget=None if alert.budget_ms is None else alert.budget_ms // 1000,
            )
