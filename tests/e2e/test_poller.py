"""The background poller end to end: a real gateway over the simulator settles a few hundred tasks no client
polls, checking each within `poller.interval_s` + 1 s of its creation and of its last check, so each is
settled within interval_s + 1 s of finishing upstream. A poller doing a fixed 64 checks a one-second tick
cannot: these tasks need about 150 checks a second."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Gateway, Simulator, body, wait_until
from tests.e2e.helpers import roomy

TASKS = 300
INTERVAL_S = 3.0
RUN_S = 6.0  # each task's time upstream
AT_ONCE = 16


@pytest.fixture
def gateway(simulator: Simulator, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(
        tmp=tmp_path,
        upstream_url=simulator.url,
        name="poller",
        teams={"t": {}},
        users={"u": {"team": "t"}},
        keys=roomy("key-a"),
        extra={"poller": {"interval_s": INTERVAL_S, "concurrency": 8, "max_polls_per_second": 400}},
    )
    gw.start()
    yield gw
    gw.stop()


def create_unpolled(gw: Gateway, count: int) -> list[str]:
    """`count` creates, AT_ONCE at a time; their task ids. Nobody polls them."""

    async def go() -> list[str]:
        gate = asyncio.Semaphore(AT_ONCE)
        async with gw.aclient("u") as client:

            async def one(number: int) -> str:
                async with gate:
                    reply = await client.post(
                        "/videos/generations", json=body(prompt=f"a fox {number} sim:seconds={RUN_S}")
                    )
                assert reply.status_code == 200, reply.text
                return str(reply.json()["id"])

            return await asyncio.gather(*(one(n) for n in range(count)))

    return asyncio.run(go())


def timelines(sim: Simulator, task_ids: set[str]) -> dict[str, list[tuple[float, str]]]:
    """Per task, the simulator's (time, route) of its create and of every poll, in order."""
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for entry in sim.requests():
        task_id = entry["created"] if entry["route"] == "create" else entry["task_id"]
        if task_id in task_ids and entry["route"] in ("create", "poll"):
            out[task_id].append((entry["time"], entry["route"]))
    return {task_id: sorted(events) for task_id, events in out.items()}


def ledger_rows(gw: Gateway, task_ids: set[str]) -> dict[str, Any]:
    """The ledger's rows of these tasks, every page of them."""
    rows: dict[str, Any] = {}
    params = {"team": "t"}
    while True:
        reply = gw.admin("GET", "/admin/usage", params=params)
        assert reply.status_code == 200, reply.text
        page = reply.json()
        rows.update((row["task_id"], row) for row in page["data"] if row["task_id"] in task_ids)
        if not page.get("next_after"):
            return rows
        params = {"team": "t", "after": page["next_after"]}


def test_tasks_no_client_polls_are_checked_and_settled_within_the_interval_and_a_second(
    simulator: Simulator, gateway: Gateway
):
    task_ids = set(create_unpolled(gateway, TASKS))
    assert len(task_ids) == TASKS

    def all_settled() -> bool:
        rows = ledger_rows(gateway, task_ids)
        return len(rows) == TASKS and all(row["settled_at"] for row in rows.values())

    wait_until(all_settled, timeout=RUN_S + 4 * INTERVAL_S + 10, interval=0.5)
    assert {row["status"] for row in ledger_rows(gateway, task_ids).values()} == {"succeeded"}
    seen = timelines(simulator, task_ids)
    assert len(seen) == TASKS
    for task_id, events in seen.items():
        assert events[0][1] == "create" and len(events) >= 2, (task_id, events)
        gaps = [later[0] - earlier[0] for earlier, later in zip(events, events[1:], strict=False)]
        finished = events[0][0] + RUN_S
        # Checked within interval_s + 1 s of its creation and of each check before; the first check after
        # it finished settled it (so within interval_s + 1 s of finishing), and it was not polled again.
        assert max(gaps) <= INTERVAL_S + 1, (task_id, gaps)
        assert [at for at, _ in events[1:] if at >= finished] == [events[-1][0]], (task_id, events)
