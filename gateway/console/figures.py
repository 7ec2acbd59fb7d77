"""The figures the console's overviews show, read from the store's counters and ledger aggregates (SPEC §17:
never by loading tasks): spend against budgets, spend per day as a chart, spend by model and by user."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from gateway.console import fmt
from gateway.console.chart import Bar, bar_chart
from gateway.money import micros_to_usd
from gateway.policy.quota import period_bounds, subjects_for
from gateway.routes.generations import usage_figures
from gateway.routes.ledger import group_row
from gateway.settings import Team, User
from gateway.store.base import Group, LedgerFilter

if TYPE_CHECKING:
    from gateway.app import Gateway

CHART_DAYS = 30


@dataclass(frozen=True, slots=True)
class Period:
    kind: str  # day, week, month or total
    since: float | None  # None: all time
    label: str


def period_of(team: Team, now: float) -> Period:
    start, end = period_bounds(team.limits.period, now)
    if start is None or end is None:
        return Period(team.limits.period, None, "all time")
    return Period(team.limits.period, start.timestamp(), f"{start:%Y-%m-%d} to {end:%Y-%m-%d} (UTC)")


async def budgets(gateway: Gateway, user: User, team: Team) -> tuple[dict[str, Any], dict[str, Any]]:
    """The user's and the team's figures for their periods, as GET /usage gives them."""
    subjects = subjects_for(user, team, gateway.clock())
    mine, ours = await gateway.store.usage(subjects)
    return usage_figures(subjects[0], mine), usage_figures(subjects[1], ours)


async def daily_chart(gateway: Gateway, team: str | None, now: float, days: int = CHART_DAYS) -> Markup:
    """The team's spend (every team's: None) on each of the last `days` UTC days, today included."""
    today = int(now // 86400) * 86400
    since = today - (days - 1) * 86400
    groups = await gateway.store.aggregate("day", LedgerFilter(since=since, team=team))
    spent = {group.key: group.cost_micros for group in groups}
    bars = []
    for index in range(days):
        day = datetime.fromtimestamp(since + index * 86400, UTC).strftime("%Y-%m-%d")
        amount = spent.get(day, 0)
        bars.append(Bar(day, micros_to_usd(amount), fmt.micros(amount)))
    return bar_chart(bars, f"Spend per day, last {days} days", axis=lambda top: fmt.usd(top))


async def grouped(gateway: Gateway, by: str, team: str | None, since: float | None) -> list[dict[str, Any]]:
    """The ledger grouped by model or user since the period's start, largest spend first, as /admin/usage
    writes each group."""
    groups: list[Group] = await gateway.store.aggregate(by, LedgerFilter(since=since, team=team))
    rows = [group_row(by, group) for group in groups]
    return sorted(rows, key=lambda row: (-row["cost_usd"], row[by]))
