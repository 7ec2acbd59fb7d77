"""The gateway's load benchmark, side by side in one run on loopback (see bench/README.md).

    python bench/run.py [--quick] [--duration S] [--out bench/RESULTS.md] [--profile]

Targets, each measured with wrk for creates and polls at 1 and 32 connections (gateway-sqlite also for
the openai SDK's multipart create, route create-sdk):
  direct               wrk → the fake upstream (bench/fake_upstream.py)
  bare-<client>        wrk → starlette pass-through (bench/passthrough.py) → fake, per HTTP client
  gateway-sqlite       wrk → `python -m gateway.cli serve` (every feature on, SQLite store) → fake
  gateway-sqlite-<c>   the same gateway with another upstream client injected (bench/gateway_serve.py)
  gateway-sqlite-baseline  the gateway of another checkout (--baseline DIR), measured beside this one
  gateway-redis        the same on a Redis store
  gateway-redis-sentinel  the same through a Sentinel, to a master with a replica it waits for (WAIT 1)
The proxy under test is pinned to one core; wrk, the fake upstream (and Redis) to the other.
Then a memory run pushes --tasks creates through a fresh gateway and samples its RSS.

This file is the command line and the order of things; processes.py starts and stops what runs,
sampling.py measures it, report.py writes the Markdown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from processes import BENCH, CLIENTS, ROOT, Lab, Target
from report import report, write_profile
from sampling import SDK_CREATE, Sampler, say
from source import describe_source

PROFILED = ("gateway-sqlite", "gateway-sqlite-norpm")
SDK_TARGETS = ("gateway-sqlite",)  # the OpenAI shape's create, next to the TokenHub-shaped one


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the gateway against bare pass-throughs, on loopback.")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up, 20,000 tasks in the memory run")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 10; --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each run (default 2; --quick 1)")
    p.add_argument("--tasks", type=int, help="creates in the memory run (default 100000; --quick 20000)")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="the Markdown report (default bench/RESULTS.md)")
    p.add_argument("--profile", action="store_true", help="also run py-spy on gateway-sqlite (PROFILE.md)")
    p.add_argument(
        "--no-gateway-clients", action="store_true", help="skip the gateway with httpx / httpx-aiohttp injected"
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="measure every target this many times, interleaved; the report gives medians (default 3; --quick 1)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated rows to run (e.g. bare-aiohttp,gateway-sqlite; 'memory' for the memory "
        "run); default: all. direct always runs: it is what added p50 is measured against",
    )
    p.add_argument(
        "--src",
        default=str(ROOT),
        help="the checkout whose gateway/ is benchmarked (default: this one), e.g. a `git archive` "
        "snapshot, so edits made meanwhile in the work tree cannot leak into the run",
    )
    p.add_argument(
        "--issued-keys",
        type=int,
        default=0,
        help="also measure gateway-sqlite-keys: the same gateway on a store holding this many gateway keys "
        "issued through the admin API (bench/issued_keys.py), in the same rounds",
    )
    p.add_argument(
        "--baseline",
        help="another checkout (e.g. a `git archive` of an earlier commit) whose gateway is measured in the same "
        "rounds as gateway-sqlite-baseline, so a change is compared before and after in one run",
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.tasks = args.tasks or (20_000 if args.quick else 100_000)
    args.only = {name.strip() for name in args.only.split(",") if name.strip()}
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def pick_cores() -> tuple[int | None, int | None]:
    """(proxy core, load core); this script moves to the load core, off the proxy's."""
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cores) < 2:
        print("warning: fewer than 2 cores or no taskset: nothing is pinned", file=sys.stderr)
        return None, None
    os.sched_setaffinity(0, {cores[1]})
    return cores[0], cores[1]


def start_targets(lab: Lab, args: argparse.Namespace) -> list[Target]:
    """Every target --only asks for (direct always), started and ready; the ones that cannot run are left
    out and said in lab.unavailable."""

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    def db(name: str) -> str:
        return f"sqlite:///{lab.work / (name + '.db')}"

    targets: list[Target | None] = [lab.direct_target()]
    targets += [lab.bare_target(c) for c in CLIENTS if wanted(f"bare-{c}")]
    if wanted("gateway-sqlite"):
        targets.append(lab.gateway_target("gateway-sqlite", db("gateway")))
    if args.issued_keys:
        from issued_keys import seed_keys

        seeded = seed_keys(lab.work / "gateway-keys.db", args.issued_keys)
        targets.append(lab.gateway_target("gateway-sqlite-keys", seeded))
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        targets.append(lab.gateway_target("gateway-sqlite-baseline", db("gateway-baseline"), src=baseline))
    if wanted("gateway-sqlite-norpm"):
        targets.append(lab.gateway_target("gateway-sqlite-norpm", db("gateway-norpm"), rpm=False))
    if not args.no_gateway_clients:
        targets += [
            lab.gateway_target(f"gateway-sqlite-{c}", db(f"gateway-{c}"), c)
            for c in CLIENTS[1:]
            if wanted(f"gateway-sqlite-{c}")
        ]
    if wanted("gateway-redis"):
        targets.append(lab.redis_target())
    if wanted("gateway-redis-sentinel"):
        targets.append(lab.redis_sentinel_target())
    return [t for t in targets if t is not None]


def measure_rounds(sampler: Sampler, targets: list[Target], rounds: int) -> None:
    """Every target, route and connection count, round after round: in each round the targets are
    measured one after the other, so a ratio compares runs minutes apart at most, and a machine
    that slows down for a while slows a whole round, not one target."""
    for round_no in range(1, rounds + 1):
        for route in ("poll", "create", SDK_CREATE):
            for conns in (1, 32):
                for t in targets:
                    if route != SDK_CREATE or t.name in SDK_TARGETS:
                        sampler.measure(t, route, conns, round_no)
        say(f"round {round_no} of {rounds} done")


def memory_run(lab: Lab, sampler: Sampler, tasks: int) -> None:
    """RSS after `tasks` creates through a fresh gateway."""
    db = lab.work / "memory.db"
    p, port = lab.start_gateway("gateway-memory", f"sqlite:///{db}")
    try:
        sampler.memory_run(p, port, db, tasks)
    finally:
        lab.procs.stop(p)


def run(args: argparse.Namespace, lab: Lab, sampler: Sampler) -> None:
    """Every target is started first and stays up (idle ones cost nothing), then measured round by round."""
    try:
        lab.start_fake()
        live = start_targets(lab, args)
        say(f"targets up: {', '.join(t.name for t in live)}; {args.rounds} round(s)")
        measure_rounds(sampler, live, args.rounds)
        if args.profile:
            for t in live:
                if t.name in PROFILED:
                    sampler.profile(t)
        lab.stop_targets()
        if not args.only or "memory" in args.only:
            memory_run(lab, sampler, args.tasks)
    except KeyboardInterrupt:
        say("interrupted: writing what was measured")
    finally:
        lab.procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    proxy_core, load_core = pick_cores()
    work = Path(tempfile.mkdtemp(prefix="tokenhub-bench-"))
    lab = Lab(work, proxy_core, load_core, src=Path(args.src).resolve())
    if not (lab.src / "gateway" / "cli.py").exists():
        print(f"--src {lab.src}: no gateway/cli.py there", file=sys.stderr)
        return 2
    sampler = Sampler(lab, args.duration, args.warmup)
    source_at_start = describe_source(lab.src)
    say(f"work dir {work}; proxy on core {proxy_core}, load on core {load_core}; gateway {source_at_start}")
    run(args, lab, sampler)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report(args, lab, sampler, source_at_start)
    out.write_text(text)
    write_profile(sampler.profiles, source_at_start, out)
    print(text)
    say(f"wrote {out}; logs and databases in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
