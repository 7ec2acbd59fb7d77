"""A small run of bench/ledger.py's seed-and-measure, on SQLite and on Redis (SPEC §17): thousands of tasks
written through the store's own operations, then a gateway process's /admin/usage and the `usage` command
read them. The grouped figures are exactly the sums of the rows, paging visits every row once, the exports
stream every row, and pruning keeps the figures. Timings are bench/ledger.py's business, not asserted here."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.ledger_seed import Plan, seed
from gateway.policy.quota import Subject
from gateway.settings import Limits, Secret, StoreSettings
from gateway.store import open_store
from gateway.store.base import LedgerFilter
from tests.e2e.harness import ADMIN_TOKEN, Gateway
from tests.redis_server import RedisServer, require_redis_server

REPO = Path(__file__).resolve().parents[2]
TASKS = 3000
UNSETTLED = 40
DAYS = 60
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TERMINAL_FAILED = ("failed", "cancelled", "expired")


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    require_redis_server()
    server = RedisServer()
    yield server.start()
    server.stop()


def seeded(url: str, **plan: Any) -> dict[str, float]:
    async def run() -> dict[str, float]:
        store = open_store(StoreSettings(Secret(url)))
        await store.open()
        try:
            return await seed(store, Plan(TASKS, DAYS, teams=7, users_per_team=3, unsettled=UNSETTLED, **plan))
        finally:
            await store.close()

    return asyncio.run(run())


def every_row(gw: Gateway, limit: int, **query: str) -> list[dict[str, Any]]:
    """The listing followed page by page to its end."""
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        reply = gw.admin(
            "GET", "/admin/usage", params={"limit": str(limit), **query, **({"after": after} if after else {})}
        )
        assert reply.status_code == 200, reply.text
        page = reply.json()
        assert len(page["data"]) <= limit
        rows += page["data"]
        assert page["has_more"] == (page["next_after"] is not None)
        if not page["has_more"]:
            return rows
        after = page["next_after"]


def usd(value: Any) -> Decimal:
    return Decimal(str(value or 0))


def expected_groups(rows: list[dict[str, Any]], by: str) -> dict[str, dict[str, Any]]:
    """The grouped figures, summed here from the rows: exact decimals."""
    sums: dict[str, dict[str, Any]] = defaultdict(
        lambda: (
            {"tasks": 0, "succeeded": 0, "failed": 0, "in_flight": 0}
            | dict.fromkeys(("billed", "cost", "reserved"), Decimal(0))
        )
    )
    for row in rows:
        group = sums[row["created_at"][:10] if by == "day" else row[by]]
        group["tasks"] += 1
        group["succeeded"] += row["status"] == "succeeded"
        group["failed"] += row["status"] in TERMINAL_FAILED
        if row["settled_at"] is None:
            group["in_flight"] += 1
            group["reserved"] += usd(row["estimate_usd"])
        group["billed"] += usd(row["billed_seconds"])
        group["cost"] += usd(row["cost_usd"])
    return dict(sums)


def figures_of(groups: list[dict[str, Any]], by: str) -> dict[str, dict[str, Any]]:
    return {
        g[by]: {
            "tasks": g["tasks"],
            "succeeded": g["succeeded"],
            "failed": g["failed"],
            "in_flight": g["in_flight"],
            "billed": usd(g["billed_seconds"]),
            "cost": usd(g["cost_usd"]),
            "reserved": usd(g["reserved_usd"]),
        }
        for g in groups
    }


def grouped(gw: Gateway, by: str, **query: str) -> list[dict[str, Any]]:
    reply = gw.admin("GET", "/admin/usage", params={"group_by": by, **query})
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def usage_cli(gw: Gateway, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(gw.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **gw.env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_seeded_ledger_reads_back_exactly(make_gateway, store_url: str):
    figures = seeded(store_url)
    assert figures["tasks"] == TASKS
    gw = make_gateway(store_url=store_url)

    rows = every_row(gw, limit=700)
    assert len(rows) == TASKS and len({r["task_id"] for r in rows}) == TASKS  # every row, once
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)  # oldest first
    assert sum(r["settled_at"] is None for r in rows) == UNSETTLED
    assert {r["status"] for r in rows} >= {"succeeded", "failed", "cancelled", "expired", "unknown"}

    for by in ("team", "user", "model", "day"):
        assert figures_of(grouped(gw, by), by) == expected_groups(rows, by), by
    # A window whose edges cut days in two: whole days from the per-day figures, the edges from rows.
    # Whole seconds, as the rows show created_at: a row is in the window exactly when its shown time is.
    now = datetime.now(UTC).replace(microsecond=0)
    since, until = (now - timedelta(days=20, hours=7)).isoformat(), (now - timedelta(days=3, hours=17)).isoformat()
    window = [r for r in rows if since <= r["created_at"] < until]
    assert 0 < len(window) < TASKS
    for by in ("team", "day"):
        assert figures_of(grouped(gw, by, since=since, until=until), by) == expected_groups(window, by), by
    team = rows[0]["team"]
    assert figures_of(grouped(gw, "model", team=team), "model") == expected_groups(
        [r for r in rows if r["team"] == team], "model"
    )
    assert every_row(gw, limit=1000, team=team) == [r for r in rows if r["team"] == team]

    with httpx.stream("GET", gw.url + "/admin/usage", params={"format": "csv"}, headers=ADMIN, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/csv")
        assert "content-length" not in reply.headers  # streamed as it is read, not built whole
        text = b"".join(reply.iter_raw()).decode()
    assert len(text.splitlines()) == TASKS + 1  # the header once
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [r["task_id"] for r in exported] == [r["task_id"] for r in rows]
    assert sum(usd(r["cost_usd"]) for r in exported) == sum(usd(r["cost_usd"]) for r in rows)
    whole = gw.admin("GET", "/admin/usage", params={"format": "json"})
    assert "content-length" not in whole.headers
    assert whole.json() == {"object": "list", "group_by": None, "data": rows, "has_more": False, "next_after": None}

    by_team = json.loads(usage_cli(gw, "--group-by", "team", "--format", "json"))
    assert by_team == grouped(gw, "team")
    assert len(usage_cli(gw, "--format", "csv").splitlines()) == TASKS + 1
    assert len(json.loads(usage_cli(gw, "--format", "json", "--team", team))) == sum(r["team"] == team for r in rows)


def test_pruning_keeps_the_figures(make_gateway, store_url: str):
    seeded(store_url, seed=2)
    gw = make_gateway(store_url=store_url)
    rows = every_row(gw, limit=1000)
    before = {by: grouped(gw, by) for by in ("team", "day")}
    gw.stop()  # the command writes to the store: alone, as an operator would run it

    cut = datetime.fromtimestamp(int(time.time() - DAYS * 86400 / 2), UTC).isoformat()
    old = [r for r in rows if r["created_at"] < cut]
    prunable = {r["task_id"] for r in old if r["settled_at"] is not None and r["status"] != "unknown"}
    assert 0 < len(prunable) < len(old)  # the old `unknown` rows stay
    assert usage_cli(gw, "--prune-before", cut) == f"pruned {len(prunable)} settled tasks created before {cut}\n"

    gw.start()
    kept = every_row(gw, limit=1000)
    assert [r["task_id"] for r in kept] == [r["task_id"] for r in rows if r["task_id"] not in prunable]
    assert {by: grouped(gw, by) for by in ("team", "day")} == before  # the per-day figures keep what was pruned


def test_the_fast_seed_leaves_what_the_gateways_steps_leave(tmp_path: Path):
    """bench/ledger_seed.py's bulk path (SQLite) and the store's own steps, from one plan: the same rows,
    the same grouped figures, the same spent counters."""
    plan = Plan(400, 20, teams=3, users_per_team=2, unsettled=5, run="same", end=time.time())

    async def run(bulk: bool) -> tuple[list[Any], dict[str, Any], list[Any]]:
        store = open_store(StoreSettings(Secret(f"sqlite:///{tmp_path / f'{bulk}.db'}")))
        await store.open()
        try:
            await seed(store, plan, bulk=bulk)
            rows = await store.ledger(None, None, None, None, None)
            groups = {by: await store.aggregate(by, LedgerFilter()) for by in ("team", "user", "model", "day")}
            subjects = sorted(
                {(scope, getattr(t, scope), getattr(t, f"{scope}_period")) for t in rows for scope in ("team", "user")}
            )
            usage = await store.usage(tuple(Subject(scope, name, period, Limits()) for scope, name, period in subjects))
            return rows, groups, usage
        finally:
            await store.close()

    stepped, bulk = asyncio.run(run(False)), asyncio.run(run(True))
    assert sorted(stepped[0], key=lambda t: t.rid) == sorted(bulk[0], key=lambda t: t.rid)
    assert stepped[1:] == bulk[1:]
    assert sum(t.settled_at is None for t in bulk[0]) == 5 and len(bulk[0]) == 400
