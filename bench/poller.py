"""Does the background poller keep up? N tasks in flight that no client polls, each of which must be checked
upstream at least every `poller.interval_s` (+ 1 s). Everything on loopback, started and stopped here.

    python bench/poller.py [--tasks 20000] [--interval-s 15] [--keys 4] [--max-polls-per-second 500]
                           [--concurrency 32] [--measure-s 45] [--store URL] [--create-concurrency 32]

What runs: the simulator (`gateway.simulator`, in a child process of this script that also records the time of
every create, with the id it answered, and of every poll: /_bench/log), and the gateway (`python -m gateway.cli
serve`, SQLite in a temp directory unless --store names a store; `--keys` upstream keys with room for every
task, no team limit, the poller settings from the flags; `--max-polls-per-second` is per key, so the poller's
ceiling is that × --keys). The tasks never end (`sim:never`): created through the gateway, `--create-concurrency`
at once, then left to the poller for --measure-s after the last create.

Per task, from the simulator's record: the gaps between its create and its first check and between two checks
(and, when longer than interval_s, the one from its last check to the end). A gap beyond interval_s is how late
that check came after it was due (SPEC: every task checked within interval_s); over interval_s + 1 s is a miss.
Printed: gap p50/p99/max, lateness p50/max and misses over the whole run, then the same for the gaps that began
once every task existed (no create competing for the gateway), the poller's polls a second then (mean and the
busiest second), and the share of a core the gateway and the simulator used meanwhile; then one JSON line.
The events are kept in the run's directory (events.json) for a closer look.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/poller.py`: the repo root is not on the path
    sys.path.insert(0, str(ROOT))

from tests.procs import answers_http, free_port, spawn, stop, wait_for  # noqa: E402 - needs the repo root

USER_KEY = "tgw-bench-poller-" + hashlib.sha256(b"bench poller").hexdigest()[:24]
CREATE_PATH = "/api/v1/videos/generations"
SIM_TASK_SECONDS = 20.0  # queued for the first fifth of it, then running for ever (sim:never)
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# the simulator, recorded (run in a child process: --serve-simulator PORT)


class Recorder:
    """ASGI middleware over the simulator: (time, "create" | "poll", task id) of each create and poll, kept in
    memory for this run and served from /_bench/log?since=N."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: list[tuple[float, str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/api/v1/videos/generations", "/_bench/log")):
            await self.app(scope, receive, send)
        elif path == "/_bench/log":
            await self._log(scope, send)
        elif scope["method"] == "GET":
            self.events.append((time.time(), "poll", path.rsplit("/", 1)[1]))
            await self.app(scope, receive, send)
        else:
            await self._create(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.time()
        body = bytearray()

        async def kept(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    answer = json.loads(body or b"{}")
                    if isinstance(answer, dict) and "id" in answer:
                        self.events.append((began, "create", answer["id"]))
            await send(message)

        await self.app(scope, receive, kept)

    async def _log(self, scope: Scope, send: Send) -> None:
        query = dict(part.split("=", 1) for part in scope.get("query_string", b"").decode().split("&") if "=" in part)
        payload = json.dumps(self.events[int(query.get("since", 0)) :]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


def serve_simulator(port: int) -> None:
    import uvicorn

    from gateway.simulator.app import create_simulator, uvicorn_config

    app = create_simulator(task_seconds=SIM_TASK_SECONDS)
    uvicorn.Server(uvicorn_config(Recorder(app), "127.0.0.1", port)).run()  # type: ignore[arg-type]


# the run


def gateway_toml(args: argparse.Namespace, port: int, sim_port: int, store_url: str) -> str:
    per_key = math.ceil(args.tasks / args.keys) + 100
    keys = "".join(
        f'[[upstream.keys]]\nname = "k{n}"\nvalue_env = "BENCH_POLLER_KEY_{n}"\nmax_concurrent_tasks = {per_key}\n'
        for n in range(args.keys)
    )
    return f"""[server]
host = "127.0.0.1"
port = {port}
shutdown_grace_s = 2

[upstream]
base_url = "http://127.0.0.1:{sim_port}/api/v1"
connect_timeout_s = 2
timeout_s = 10
{keys}
[store]
url = "{store_url}"

[poller]
interval_s = {args.interval_s}
concurrency = {args.concurrency}
max_polls_per_second = {args.max_polls_per_second}

[teams.bench]

[users.bench]
team = "bench"
key_sha256 = "{hashlib.sha256(USER_KEY.encode()).hexdigest()}"
"""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def create_all(url: str, count: int, at_once: int) -> None:
    import httpx

    gate = asyncio.Semaphore(at_once)
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=at_once)
    ) as client:

        async def one(number: int) -> None:
            async with gate:
                body = {"model": "doubao-seedance-2.0", "prompt": f"sim:never a fox, number {number}"}
                reply = await client.post(CREATE_PATH, json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"create {number} answered {reply.status_code}: {reply.text[:300]}")

        await asyncio.gather(*(one(n) for n in range(count)))


def fetch_log(sim_url: str) -> list[tuple[float, str, str]]:
    import httpx

    return [tuple(event) for event in httpx.get(sim_url + "/_bench/log", timeout=120).json()]  # type: ignore[misc]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else math.nan


def measure(events: list[tuple[float, str, str]], end: float, steady_from: float, interval_s: float) -> dict[str, Any]:
    """Per task, the gaps between its create and its checks; a task not checked for longer than interval_s at
    `end` counts that open gap too."""
    times: dict[str, list[float]] = defaultdict(list)
    created: set[str] = set()
    for at, kind, task_id in sorted(events):
        times[task_id].append(at)
        if kind == "create":
            created.add(task_id)
    gaps: list[float] = []
    steady: list[float] = []  # the gaps that began once every task existed (no create competing)
    open_gaps: list[float] = []
    for task_id in created:
        checks = times[task_id]
        for earlier, later in zip(checks, checks[1:], strict=False):
            gaps.append(later - earlier)
            if earlier >= steady_from:
                steady.append(later - earlier)
        if end - checks[-1] > interval_s:
            open_gaps.append(end - checks[-1])
    polls = [at for at, kind, _ in events if kind == "poll" and steady_from <= at < end]
    per_second = Counter(int(at) for at in polls)
    worst = max(gaps + open_gaps)
    return {
        "tasks": len(created),
        "gaps": len(gaps),
        "gap_p50_s": round(percentile(gaps, 0.5), 3),
        "gap_p99_s": round(percentile(gaps, 0.99), 3),
        "gap_max_s": round(worst, 3),
        "late_p50_s": round(percentile(gaps, 0.5) - interval_s, 3),
        "late_max_s": round(worst - interval_s, 3),
        "misses": sum(1 for gap in gaps + open_gaps if gap > interval_s + 1),
        "steady_gap_p50_s": round(percentile(steady, 0.5), 3),
        "steady_gap_max_s": round(max(steady + open_gaps, default=math.nan), 3),
        "steady_misses": sum(1 for gap in steady + open_gaps if gap > interval_s + 1),
        "unchecked_at_end": len(open_gaps),
        "polls_per_s": round(len(polls) / max(1e-9, end - steady_from), 1),
        "busiest_second_polls": max(per_second.values(), default=0),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="thg-bench-poller-"))
    sim_port, port = free_port(), free_port()
    sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{port}"
    store_url = args.store or f"sqlite:///{work / 'gateway.db'}"
    config = work / "gateway.toml"
    config.write_text(gateway_toml(args, port, sim_port, store_url))
    env = {f"BENCH_POLLER_KEY_{n}": f"th-bench-poller-key-{n:04d}-abcdefgh" for n in range(args.keys)}
    sim = spawn([sys.executable, __file__, "--serve-simulator", str(sim_port)], work / "simulator.log")
    gateway = None
    try:
        wait_for(lambda: answers_http(sim_url + "/_bench/log"), "the simulator answers", 30, sim)
        gateway = spawn(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], work / "gateway.log", env
        )
        wait_for(lambda: answers_http(url + "/healthz"), "the gateway answers", 30, gateway)
        began = time.time()
        asyncio.run(create_all(url, args.tasks, args.create_concurrency))
        created = time.time()
        print(
            f"{args.tasks} tasks created in {created - began:.1f} s; measuring for {args.measure_s} s", file=sys.stderr
        )
        cpu_before = {name: cpu_s(proc.pid) for name, proc in (("gateway", gateway), ("simulator", sim))}
        time.sleep(args.measure_s)
        end = time.time()
        cpu = {
            f"{name}_cpu_share": round((cpu_s(proc.pid) - cpu_before[name]) / (end - created), 2)
            for name, proc in (("gateway", gateway), ("simulator", sim))
        }
        events = fetch_log(sim_url)
        (work / "events.json").write_text(json.dumps(events))  # (time, create | poll, task id), for a closer look
        figures = measure(events, end, created, args.interval_s)
    finally:
        for proc in (gateway, sim):
            if proc is not None:
                stop(proc)
    return {
        "tasks": args.tasks,
        "interval_s": args.interval_s,
        "keys": args.keys,
        "concurrency": args.concurrency,
        "max_polls_per_second_per_key": args.max_polls_per_second,
        "store": store_url.split("://")[0],
        "create_s": round(created - began, 1),
        "measure_s": args.measure_s,
        **figures,
        **cpu,
        "work_dir": str(work),
    }


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['tasks']} tasks, interval_s {result['interval_s']}, {result['keys']} keys × "
        f"{result['max_polls_per_second_per_key']} polls/s, concurrency {result['concurrency']}, {result['store']}\n"
        f"  gap between checks: p50 {result['gap_p50_s']} s, p99 {result['gap_p99_s']} s, max {result['gap_max_s']} s "
        f"({result['gaps']} gaps)\n"
        f"  late after due: p50 {result['late_p50_s']} s, max {result['late_max_s']} s; "
        f"misses (gap > interval_s + 1 s): {result['misses']}\n"
        f"  once every task exists: gap p50 {result['steady_gap_p50_s']} s, max {result['steady_gap_max_s']} s, "
        f"misses {result['steady_misses']}\n"
        f"  polls/s once all exist: {result['polls_per_s']} (busiest second {result['busiest_second_polls']}); "
        f"CPU: gateway {result['gateway_cpu_share']}, simulator {result['simulator_cpu_share']} of a core"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-simulator", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--interval-s", type=float, default=15.0)
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--max-polls-per-second", type=float, default=500.0, help="per upstream key")
    parser.add_argument("--concurrency", type=int, default=32, help="poller.concurrency (its default: 32)")
    parser.add_argument("--measure-s", type=float, default=45.0, help="after the last create")
    parser.add_argument("--create-concurrency", type=int, default=32)
    parser.add_argument("--store", help="a store URL (default: SQLite in the run's temp directory)")
    args = parser.parse_args()
    if args.serve_simulator:
        serve_simulator(args.serve_simulator)
        return
    result = run(args)
    print(report(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
