"""A soak: mixed traffic against the simulator with faults, for long enough to see whether the gateway's memory
settles, then the books checked. Everything on loopback, started and stopped here.

    python bench/soak.py [--minutes 60] [--concurrency 16] [--store sqlite|redis] [--tracemalloc] [--src DIR]

What runs: the simulator (`python -m gateway.simulator`, short tasks, small videos); a webhook receiver in this
process that fails a fifth of its deliveries; the gateway (`python -m gateway.cli serve`: three upstream keys,
four teams, the archive on a local directory, a webhook endpoint, a short upstream timeout so a hung request
ends as a timeout). The traffic, `--concurrency` clients at once: TokenHub-shaped creates (some with an
Idempotency-Key sent twice, some to fail, some cancelled at once), half of them polled to the end and the rest
left to the poller; OpenAI-shaped creates polled to the end, their content downloaded, some deleted; listings,
/usage, /models, admin figures. Every few seconds a fault is set on the simulator: 429s on creates, 5xx and
hangs (timeouts) on polls and creates, garbage, cut answers, slow result files.

Every 10 s the gateway's RSS is sampled (/proc/PID/status). At the end the faults are cleared, the poller
settles what is left, and the books are checked per team: spent (/admin/teams) = Σ the costs of the settled
rows of the period (the CSV export) = the grouped figure (/admin/usage?group_by=team), nothing reserved and
nothing in flight. One JSON line: traffic by route and status, 500s, RSS start/warm/end, the books.

--tracemalloc runs the gateway under bench/soak_gateway.py and diffs its allocations between the middle and
the end of the run: the top lines of growth are printed to stderr and put in the JSON (`growth_by_line`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak_load import AiohttpSender, Load, books, settle_all  # noqa: E402
from bench.soak_setup import Lab  # noqa: E402

SAMPLE_S = 10.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, load: Load, began: float, samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    while True:
        samples.append(
            {"t_s": round(time.monotonic() - began, 1), "tasks": load.tasks, "rss_mb": round(rss_mb(pid), 1)}
        )
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
            return
        except TimeoutError:
            pass


def snapshot(lab: Lab, number: int) -> tracemalloc.Snapshot:
    """Ask the harness for a snapshot and wait for it to be written."""
    assert lab.snapshots is not None
    done = lab.snapshots / f"snapshot-{number}.done"
    lab.gateway_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 300
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway wrote no snapshot")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(lab.snapshots / f"snapshot-{number}.pickle"))


def growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot, top: int = 25) -> list[dict[str, Any]]:
    """The allocation sites that grew most between two snapshots, with the frames that led to them."""
    out = []
    for stat in last.compare_to(first, "traceback")[:top]:
        frames = [f"{frame.filename.replace(str(ROOT) + '/', '')}:{frame.lineno}" for frame in stat.traceback]
        out.append({"kb": round(stat.size_diff / 1024, 1), "count": stat.count_diff, "frames": frames[-6:]})
    return out


def summary_of(samples: list[dict[str, float]]) -> dict[str, Any]:
    rss = [s["rss_mb"] for s in samples]
    half = len(rss) // 2
    return {
        "rss_start_mb": rss[0],
        "rss_warm_mb": rss[half],
        "rss_end_mb": rss[-1],
        "rss_max_mb": max(rss),
        "growth_last_half_mb": round(rss[-1] - rss[half], 1),
        "samples": samples,
    }


async def soak(args: argparse.Namespace, lab: Lab) -> dict[str, Any]:
    stop = asyncio.Event()
    samples: list[dict[str, float]] = []
    began = time.monotonic()
    first = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        load = Load(AiohttpSender(http), lab.url, lab.sim_url, args.concurrency, random.Random(args.seed))
        sampler = asyncio.create_task(sample_rss(lab.gateway_pid, load, began, samples, stop))
        work = asyncio.create_task(load.run(args.minutes * 60))
        if args.tracemalloc:
            await asyncio.sleep(args.minutes * 30)
            first = await asyncio.to_thread(snapshot, lab, 1)
        await work
        settled = await settle_all(load, timeout=120)
        ledger = await books(load)
        stop.set()
        await sampler
    out: dict[str, Any] = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "store": args.store,
        **load.summary(),
        "settled_after_traffic": settled,
        "books": ledger,
        **summary_of(samples),
    }
    if first is not None:
        out["growth_by_line"] = growth(first, await asyncio.to_thread(snapshot, lab, 2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long the traffic runs (default 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once (default 16)")
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--seed", type=int, default=1, help="the traffic's random choices")
    parser.add_argument("--tracemalloc", action="store_true", help="diff the gateway's allocations (slower)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store, archive)")
    parser.add_argument(
        "--src", default=str(ROOT), help="the checkout whose gateway runs (default this one), e.g. a git archive"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    print(f"soak: work directory {work}", file=sys.stderr)
    with Lab(work, args.store, args.tracemalloc, Path(args.src).resolve()) as lab:
        result = asyncio.run(soak(args, lab))
    if args.tracemalloc:
        for line in result["growth_by_line"]:
            print(f"{line['kb']:>10} KiB {line['count']:>8}  {' < '.join(reversed(line['frames']))}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
