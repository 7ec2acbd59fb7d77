"""SPEC §10 durability, through a real gateway process on SQLite: kill -9 under 32 concurrent creates, then a
restart on the same database. Every create answered 200 is in the ledger, reserved or settled, and the team's
figures are exactly the sum over its rows: nothing was reserved twice, nothing lost. On both write paths:
the event loop's (synchronous=NORMAL, the default) and the writer thread's (FULL)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, body, free_port
from tests.e2e.helpers import CREATE, roomy, usage

CLIENTS = 32
RUN_S = 2.5  # long enough for the first tasks to finish (the simulator's take 2 s)
pytestmark = pytest.mark.timeout(60)


class Load:
    """CLIENTS threads creating without a pause until stopped; what each create was answered."""

    def __init__(self, gw: Gateway) -> None:
        self.answered: list[str] = []  # task ids answered 200
        self.refused: list[int] = []  # any other status
        self.cut = 0  # requests the kill cut off
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(gw,)) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _run(self, gw: Gateway) -> None:
        with gw.client("alice", timeout=10) as client:
            while not self._stop.is_set():
                try:
                    reply = client.post(CREATE, json=body(duration=5))
                except httpx.TransportError:
                    with self._lock:
                        self.cut += 1
                    continue
                with self._lock:
                    if reply.status_code == 200:
                        self.answered.append(reply.json()["id"])
                    else:
                        self.refused.append(reply.status_code)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def ledger_rows(gw: Gateway) -> list[dict[str, Any]]:
    reply = gw.admin("GET", "/admin/usage", params={"format": "json"})  # every row, however many
    assert reply.status_code == 200, reply.text
    rows: list[dict[str, Any]] = reply.json()["data"]
    return rows


def micros(usd: float | None) -> int:
    return round((usd or 0) * 1_000_000)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_every_answered_create_survives_kill_9(make_gateway, synchronous: str) -> None:
    gw = make_gateway(keys=roomy("key-a", max_concurrent_tasks=100_000), extra={"store": {"synchronous": synchronous}})
    load = Load(gw)
    time.sleep(RUN_S)
    with gw.client("alice") as client:  # a client's poll of a finished task settles it, mid-load
        polled = [client.get(f"{CREATE}/{task_id}").json() for task_id in load.answered[:8]]
    finished = {task["id"] for task in polled if task["status"] == "succeeded"}
    gw.kill()  # SIGKILL, creates in flight
    load.stop()
    assert load.cut > 0 and len(load.answered) > CLIENTS, (load.cut, len(load.answered))
    assert load.refused == []

    # The same database; TokenHub out of reach, so that no poll settles a task while the books are read.
    gw.upstream_url = f"http://127.0.0.1:{free_port()}"
    gw.write_config()
    gw.start()
    rows = ledger_rows(gw)
    by_id = {r["task_id"]: r for r in rows}
    assert len(by_id) == len(rows)  # one row per create
    lost = [task_id for task_id in load.answered if task_id not in by_id]
    assert not lost, f"{len(lost)} of {len(load.answered)} answered creates are not in the ledger"
    for task_id in load.answered:
        row = by_id[task_id]
        assert row["status"] != "pending" and micros(row["estimate_usd"]) > 0, row
    # Rows settled before the kill count what they cost, all others what they reserved, each once.
    team = usage(gw)["team"]
    open_rows = [r for r in rows if r["settled_at"] is None]
    assert micros(team["reserved_usd"]) == sum(micros(r["estimate_usd"]) for r in open_rows)
    assert micros(team["spent_usd"]) == sum(micros(r["cost_usd"]) for r in rows if r["settled_at"])
    assert team["tasks_in_flight"] == len(open_rows)
    assert finished and all(by_id[task_id]["settled_at"] for task_id in finished)
    assert open_rows
