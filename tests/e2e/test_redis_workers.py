"""`serve --workers 2` on Redis (SPEC §14): two gateway processes on one port, supervised by a third. The
key-pool tests of test_keypool.py and the budget race of test_quota.py run here through it unchanged, on one
redis-server started for the module; then what is particular to workers: both serve, /metrics sums them, a
dead worker is replaced, SIGTERM drains them all, a killed parent takes them down, SQLite refuses."""

from __future__ import annotations

import asyncio
import collections
import inspect
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import procs
from tests.e2e import test_keypool, test_quota
from tests.e2e.harness import Gateway, Simulator, body, wait_until
from tests.e2e.helpers import NEVER, creates, roomy
from tests.redis_server import command

globals().update({n: fn for n, fn in vars(test_keypool).items() if n.startswith("test_") and inspect.isfunction(fn)})


@pytest.mark.parametrize("case", ["team_budget_usd", "user_budget_usd"])
def test_concurrent_creates_admit_exactly_what_fits(make_gateway, sim, case):
    """test_quota.py's budget race, through one gateway of two workers."""
    test_quota.test_concurrent_creates_admit_exactly_what_fits(make_gateway, sim, case)


@dataclass
class Workers(Gateway):
    """The harness's gateway, served by `--workers N`."""

    workers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.args = [*self.args, "--workers", str(self.workers)]

    def start(self) -> None:
        """Started once every worker has started its gateway (the port answers as soon as one has)."""
        started = self._started() if self.log_path.exists() else 0
        Gateway.start(self)
        wait_until(lambda: self._started() >= started + self.workers, timeout=20)

    def _started(self) -> int:
        return sum(line.get("event") == "gateway.started" for line in self.lines())

    def worker_pids(self) -> list[int]:
        """The serving processes: the parent's children other than multiprocessing's resource tracker."""
        pid = self.proc.pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(k) for k in kids if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]


@pytest.fixture
def make_gateway(tmp_path: Path, sim: Simulator, redis_url: str) -> Iterator[Callable[..., Workers]]:
    """tests/conftest.py's make_gateway, for gateways of two workers on the module's Redis (emptied first)."""
    command(int(redis_url.rsplit(":", 1)[1].split("/")[0]), "flushall")
    started: list[Workers] = []

    def make(
        teams: dict[str, Any] | None = None, users: dict[str, Any] | None = None, start: bool = True, **kw: Any
    ) -> Workers:
        kw.setdefault("upstream_url", sim.url)
        kw.setdefault("name", f"gw{len(started)}")
        kw.setdefault("store_url", redis_url)
        gw = Workers(
            tmp=tmp_path,
            teams=teams or {"red": {}, "blue": {}},
            users=users or {"alice": {"team": "red"}, "bob": {"team": "blue"}},
            **kw,
        )
        if start:
            gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def test_two_replicas_of_two_workers_admit_exactly_the_budget(make_gateway, sim):
    """Budget $9, 60 creates of $1 at once, 15 through each of four processes (two gateways of two workers):
    exactly 9 are admitted and sent upstream, 51 are 429 budget_exceeded."""
    gws = [
        make_gateway(
            teams={"red": {"budget_usd": 9.0}},
            users={"alice": {"team": "red"}},
            keys=roomy("key-a", "key-b"),
            name=f"w{i}",
            start=False,
        )
        for i in (1, 2)
    ]
    for gw in gws:
        gw.start()

    async def burst() -> list[httpx.Response]:
        async with gws[0].aclient("alice") as c1, gws[1].aclient("alice") as c2:
            return await asyncio.gather(
                *(c.post("/videos/generations", json=body(prompt=NEVER)) for _ in range(30) for c in (c1, c2))
            )

    replies = asyncio.run(burst())
    assert collections.Counter(r.status_code for r in replies) == {200: 9, 429: 51}
    assert {r.json()["error"]["code"] for r in replies if r.status_code == 429} == {"budget_exceeded"}
    assert len(creates(sim)) == 9
    for gw in gws:
        with gw.client("alice") as client:
            team = client.get("/usage").json()["team"]
        assert (team["reserved_usd"], team["tasks_in_flight"]) == (9.0, 9), team


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_both_workers_serve_and_metrics_count_them_all(make_gateway, sim):
    gw = make_gateway(keys=roomy("key-a"))
    pids = gw.worker_pids()
    before = {pid: cpu_ticks(pid) for pid in pids}

    async def burst() -> list[int]:
        async with gw.aclient("alice") as client:
            return [
                r.status_code
                for r in await asyncio.gather(*(client.post("/videos/generations", json=body()) for _ in range(120)))
            ]

    assert asyncio.run(burst()) == [200] * 120
    assert all(cpu_ticks(pid) > before[pid] for pid in pids), (before, {p: cpu_ticks(p) for p in pids})
    assert gw.metric("tokenhub_gateway_requests_total", route="/videos/generations", code="200") == 120
    assert gw.metric("tokenhub_gateway_tasks_created_total") == 120
    with gw.client("alice") as client:
        assert client.get("/usage").json()["team"]["tasks_in_flight"] == 120
    assert gw.metric("tokenhub_gateway_tasks_in_flight", team="red") == 120  # one sample, not one per worker


def test_a_dead_worker_is_replaced_and_sigterm_drains_them_all(make_gateway, sim):
    gw = make_gateway()
    first, second = gw.worker_pids()
    subprocess.run(["kill", "-9", str(first)], check=True)
    wait_until(lambda: gw._started() == 3, timeout=15)  # the replacement's gateway too
    assert len(gw.worker_pids()) == 2 and second in gw.worker_pids() and first not in gw.worker_pids()
    with gw.client("alice") as client:
        for _ in range(10):
            assert client.post("/videos/generations", json=body()).status_code == 200
    pids = gw.worker_pids()
    assert gw.stop() == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    lines = gw.lines()
    assert [x["exit_code"] for x in lines if x.get("event") == "worker.exited"] == [-9]
    assert sum(x.get("event") == "gateway.stopped" for x in lines) == 2


def test_workers_of_a_killed_parent_exit_and_free_the_port(make_gateway, sim):
    gw = make_gateway()
    pids = gw.worker_pids()
    gw.proc.kill()
    gw.proc.wait(5)
    wait_until(lambda: not [pid for pid in pids if Path(f"/proc/{pid}").exists()], timeout=10)
    gw.proc = None
    gw.start()  # the same port again
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_sqlite_refuses_workers(tmp_path, sim):
    gw = Workers(tmp=tmp_path, upstream_url=sim.url, teams={"red": {}}, users={"alice": {"team": "red"}})
    procs.Process.start(gw)
    assert gw.proc.wait(30) == 2
    assert "serve --workers 2 needs a Redis store" in gw.text() and "SQLite" in gw.text(), gw.text()
