"""Where the gateway's memory goes as tasks pile up: the soak's traffic (bench/soak_load.py, faults included)
against the gateway app and the simulator app, both driven in this process through httpx's ASGI transport.
At even steps of tasks created it counts every large container (bench/census.py) and prints those that grew
at every step, named by who holds them; with --tracemalloc it also diffs the allocations of the last two
steps (well after every bounded cache has filled). Only the webhook deliveries use a socket (to the receiver
on loopback); the archive is off. The summary (JSON) goes to stderr; stdout is the gateway's log.

    [PYTHONPATH=CHECKOUT] python bench/soak_inprocess.py [--tasks 120000] [--steps 4] [--concurrency 16]
        [--store sqlite|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # appended: PYTHONPATH=<a snapshot> measures that checkout's gateway
    sys.path.append(str(ROOT))

from bench import census  # noqa: E402
from bench.soak import growth  # noqa: E402
from bench.soak_load import HttpxSender, Load, books, settle_all  # noqa: E402
from bench.soak_setup import UPSTREAM_TIMEOUT_S, Receiver, gateway_config, gateway_env  # noqa: E402
from gateway import logs  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import parse_settings  # noqa: E402
from gateway.errors import UpstreamError, UpstreamTimeout  # noqa: E402
from gateway.simulator.app import create_simulator  # noqa: E402
from gateway.upstream.client import Reply  # noqa: E402

GATEWAY, SIMULATOR = "http://gateway", "http://simulator"


class SimulatorUpstream:
    """The gateway's upstream as the simulator app in this process, with the gateway's timeout."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        began = time.perf_counter()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                reply = await self.client.request(method, SIMULATOR + "/api/v1" + path, content=body, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout("TokenHub did not answer in time.") from None
        except (OSError, httpx.HTTPError) as exc:  # a reset or cut answer: the simulator drops the connection
            raise UpstreamError(
                f"TokenHub's answer was cut off: {type(exc).__name__}.", code="upstream_bad_response"
            ) from None
        return Reply(reply.status_code, reply.content, reply.headers.get("retry-after"), time.perf_counter() - began)

    async def close(self) -> None:
        pass


class Routed:
    """Requests to the simulator's URL go to its app, the rest to the gateway's (an ASGI transport has no host)."""

    def __init__(self, gateway: HttpxSender, simulator: HttpxSender) -> None:
        self.gateway, self.simulator = gateway, simulator

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        send = self.simulator if url.startswith(SIMULATOR) else self.gateway
        return await send(method, url, headers, body)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.asynccontextmanager
async def apps(store_url: str, receiver: Receiver) -> AsyncIterator[Load]:
    sim_app = create_simulator(task_seconds=1.0, max_tasks=20_000, video_size=4096)  # full early, then flat
    sim = httpx.AsyncClient(transport=httpx.ASGITransport(app=sim_app), timeout=None)
    data = gateway_config(1, SIMULATOR, store_url, receiver.url, None)
    data["upstream"]["media_allow_networks"] = []  # no downloads: the archive is off
    app = create_app(parse_settings(data, gateway_env()), upstream=SimulatorUpstream(sim))
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=60)
        async with client, sim:
            yield Load(Routed(HttpxSender(client), HttpxSender(sim)), GATEWAY, SIMULATOR, 0, random.Random(1))


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
    )


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    receiver = Receiver()
    receiver.start()
    store_url = f"sqlite:///{work / 'gateway.db'}"
    server = None
    if args.store == "redis":
        from tests.redis_server import RedisServer

        server = RedisServer()
        store_url = server.start()
    try:
        async with apps(store_url, receiver) as load:
            load.concurrency = args.concurrency
            steps: list[dict[str, Any]] = []
            snapshots: list[tracemalloc.Snapshot] = []
            moments: list[dict[int, tuple[Any, int]]] = []
            began = time.monotonic()
            work_task = asyncio.create_task(load.run(10 * 24 * 3600))
            for step in range(1, args.steps + 1):
                while load.tasks < args.tasks * step / args.steps and not work_task.done():
                    await asyncio.sleep(1)
                moments.append(census.measure())
                if tracemalloc.is_tracing():
                    snapshots.append(snapshot())
                traced = tracemalloc.get_traced_memory()[0] / 2**20
                at = {"tasks": load.tasks, "s": round(time.monotonic() - began), "rss_mb": round(rss_mb(), 1)}
                steps.append(at | ({"traced_mb": round(traced, 1)} if snapshots else {}))
                print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
            load._deadline = 0  # the clients stop after their current request
            await work_task
            settled = await settle_all(load, timeout=120)
            ledger = await books(load)
            return {
                "steps": steps,
                **load.summary(),
                "settled_after_traffic": settled,
                "books": ledger,
                "growing_containers": census.growers(moments[1:]),
                "largest_containers": census.largest(moments[-1]),
                "growth_by_line": growth(snapshots[-2], snapshots[-1], top=30) if len(snapshots) > 1 else [],
            }
    finally:
        receiver.stop()
        if server is not None:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=120_000, help="tasks created in all")
    parser.add_argument("--steps", type=int, default=4, help="snapshots, at even steps of tasks")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--tracemalloc", action="store_true", help="also diff allocations (several times slower)")
    parser.add_argument("--frames", type=int, default=8, help="frames kept per allocation, with --tracemalloc")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-inprocess-"))
    log = open(work / "gateway.log", "w")  # noqa: SIM115 - the gateway's log lines, for reading later
    os.dup2(log.fileno(), 1)  # the gateway logs to stdout
    sys.stdout = log
    logs.configure()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per in-process request otherwise
    if args.tracemalloc:
        tracemalloc.start(args.frames)
    result = asyncio.run(run(args, work))
    for grown in result["growing_containers"]:
        print(f"grew: {grown['held_by']} ({grown['kind']}): {grown['lengths']}", file=sys.stderr)
    for big in result["largest_containers"]:
        print(f"holds {big['mb']} MB: {big['held_by']} ({big['kind']}, {big['length']})", file=sys.stderr)
    for line in result["growth_by_line"]:
        print(f"{line['kb']:>10} KiB {line['count']:>8}  {' < '.join(reversed(line['frames']))}", file=sys.stderr)
    print(json.dumps(result), file=sys.stderr, flush=True)
    print(f"work directory {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
