"""What waiting for a replica (WAIT 1 after every write) costs a create's store work: a master and one
replica on loopback (core 1), and the Redis store (core 0) doing a create's two writes (the admission,
with its key choice, then the record of the task) at 1 and 32 at once, with and without the wait.

    python bench/redis_wait.py [--creates 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.policy.quota import Subject  # noqa: E402
from gateway.settings import Limits, Secret, UpstreamKey  # noqa: E402
from gateway.store.base import Admission, Task  # noqa: E402
from gateway.store.redis.store import RedisStore  # noqa: E402
from tests.procs import free_port, spawn, stop, wait_port  # noqa: E402

LIMITS = Limits(budget_micros=10**15, requests_per_minute=10**7, max_concurrent_tasks=10**8)
KEYS = tuple(UpstreamKey(name=n, value=Secret(""), max_concurrent_tasks=10**6) for n in ("bench-a", "bench-b"))


def admission(now: float) -> Admission:
    rid = uuid.uuid4().hex
    task = Task(
        rid=rid,
        team="bench",
        user="bench-user",
        model="doubao-seedance-2.0-fast",
        resolution="720p",
        duration_s=5,
        input_ms=0,
        input_estimated=False,
        estimate_ms=5000,
        estimate_micros=800_000,
        team_period="2026-11",
        user_period="2026-11",
        created_at=now,
        updated_at=now,
        next_poll_at=now + 15,
    )
    subjects = (Subject("user", "bench-user", "2026-11", LIMITS), Subject("team", "bench", "2026-11", LIMITS))
    return Admission(task, subjects, None, KEYS, 0.5)


async def creates(store: RedisStore, n: int, concurrency: int) -> tuple[float, float]:
    """Creates per second and CPU µs per create of this process."""

    async def one() -> None:
        now = await store.now()
        adm = admission(now)
        assert await store.admit(adm, now) is None
        await store.record_created(adm.task.rid, "cgt-" + adm.task.rid, "queued", now, (200, b"{}"))

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await worker(50)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    done = n // concurrency * concurrency
    return done / (time.perf_counter() - wall), (time.process_time() - cpu) / done * 1e6


def start_pair(work: Path) -> tuple[list[subprocess.Popen], int]:
    binary = shutil.which("redis-server") or sys.exit("needs redis-server")
    master, replica = free_port(), free_port()
    procs = []
    for port, extra in ((master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])):
        cmd = [
            "taskset",
            "-c",
            "1",
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
            "--dbfilename",
            f"{port}.rdb",
            *extra,
        ]
        procs.append(spawn(cmd, work / f"redis-{port}.log"))
        wait_port(port, 10, procs[-1])
    return procs, master


async def main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="thg-bench-wait-"))
    procs, port = start_pair(work)
    url = f"redis://127.0.0.1:{port}/0"
    rows: dict[tuple[bool, int], list[tuple[float, float]]] = {}
    try:
        time.sleep(1)  # the replica's first sync
        for _ in range(args.rounds):
            for wait in (False, True):
                store = RedisStore(url, prefix=f"{{bench-{uuid.uuid4().hex[:6]}}}:", wait_replica=wait)
                await store.open()
                for conc in (1, 32):
                    rows.setdefault((wait, conc), []).append(await creates(store, args.creates, conc))
                await store.close()
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    print("| WAIT 1 | at once | creates/s (median of rounds) | CPU µs/create | vs no wait |")
    print("|---|---|---|---|---|")
    for (wait, conc), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rate, cpu = sorted(runs)[len(runs) // 2]
        base = sorted(rows[(False, conc)])[len(runs) // 2][0]
        print(f"| {'yes' if wait else 'no'} | {conc} | {rate:.0f} | {cpu:.0f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
