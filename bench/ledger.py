"""A year of ledger: seed a store with settled tasks, then time its grouped figures and its export.

    python bench/ledger.py seed --store URL --tasks N [--days 365] [--teams 50] [--seed 1] [--concurrency 64]
        [--stepwise]
    python bench/ledger.py measure --store URL [--gateway] [--repeat 7] [--export-rows 1000000]

`seed` writes N settled tasks spread over the last D days through the store's own operations
(bench/ledger_seed.py says how; on SQLite by its bulk path unless --stepwise) and prints one JSON line.
`measure` times, through the store opened in this process, a calendar month grouped by team and by day,
the last 30 days (partial days at both ends) by team, and all time by team; with --gateway it starts
`python -m gateway.cli serve` on that store and times the same figures through GET /admin/usage, then the
CSV export of the newest --export-rows rows, with the gateway's RSS (/proc/PID/status) before, during
(peak) and after. One JSON line.

URL: sqlite:////absolute/path.db, or redis://127.0.0.1:PORT/0 (a redis-server you started).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/ledger.py`: the repo root is not on the path
    sys.path.insert(0, str(ROOT))

from bench.ledger_seed import Plan, seed  # noqa: E402 - needs the repo root on the path
from gateway.settings import Secret, StoreSettings  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.store.base import LedgerFilter, Store  # noqa: E402
from tests.procs import Process, free_port  # noqa: E402

ADMIN_TOKEN = "adm-bench-ledger"
EXPORT_ROWS = 1_000_000


def open_url(url: str) -> Store:
    return open_store(StoreSettings(Secret(url), "NORMAL"))


def ranges(now: datetime) -> dict[str, tuple[str, LedgerFilter]]:
    """The figures measured: name → (group_by, filter)."""
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (first - timedelta(days=1)).replace(day=1)
    month = LedgerFilter(since=last_month.timestamp(), until=first.timestamp())
    rolling = LedgerFilter(since=(now - timedelta(days=30)).timestamp(), until=now.timestamp())
    return {
        "month_by_team": ("team", month),
        "month_by_day": ("day", month),
        "last_30_days_by_team": ("team", rolling),
        "all_time_by_team": ("team", LedgerFilter()),
    }


def query_of(by: str, flt: LedgerFilter) -> str:
    params = [f"group_by={by}"]
    for name in ("since", "until"):
        moment = getattr(flt, name)
        if moment is not None:
            params.append(f"{name}={datetime.fromtimestamp(moment, UTC).isoformat(timespec='microseconds')}")
    return "&".join(params).replace("+", "%2B")


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    """The first call (cold) and the median and worst of `repeat` more, in ms."""
    samples = []
    for _ in range(repeat + 1):
        began = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - began) * 1000)
    return {
        "first_ms": round(samples[0], 1),
        "median_ms": round(statistics.median(samples[1:]), 1),
        "max_ms": round(max(samples[1:]), 1),
    }


async def measure_store(url: str, repeat: int) -> dict[str, Any]:
    store = open_url(url)
    began = time.perf_counter()
    await store.open()
    opened = time.perf_counter() - began
    try:
        out: dict[str, Any] = {"open_s": round(opened, 2)}
        for name, (by, flt) in ranges(datetime.now(UTC)).items():
            out[name] = await timed(lambda by=by, flt=flt: store.aggregate(by, flt), repeat)
        totals = await store.aggregate("team", LedgerFilter())
        out["rows"] = sum(group.tasks for group in totals)
        days = await store.aggregate("day", LedgerFilter())
        return out | {"days": [(g.key, g.tasks) for g in days]}
    finally:
        await store.close()


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class Gateway:
    """`python -m gateway.cli serve` on the seeded store, admin routes on; nothing upstream is ever called."""

    def __init__(self, url: str, work: Path) -> None:
        self.port = free_port()
        config = work / "gateway.toml"
        config.write_text(
            f"""[server]
host = "127.0.0.1"
port = {self.port}
admin_token_env = "BENCH_ADMIN_TOKEN"

[upstream]
base_url = "http://127.0.0.1:{free_port()}/api/v1"

[[upstream.keys]]
name = "unused"
value_env = "BENCH_UPSTREAM_KEY"

[store]
url = "{url}"

[poller]
interval_s = 86400
"""
        )
        env = {"BENCH_ADMIN_TOKEN": ADMIN_TOKEN, "BENCH_UPSTREAM_KEY": "th-bench-unused"}
        args = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
        self.proc = Process(args, work / "gateway.log", env, ROOT)
        began = time.perf_counter()
        self.proc.start()
        self.proc.wait_http(f"http://127.0.0.1:{self.port}/healthz", timeout=600)
        self.start_s = time.perf_counter() - began
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def export(self, path: str) -> dict[str, Any]:
        """Read a streamed answer chunk by chunk, sampling the gateway's RSS meanwhile."""
        peak = before = rss_kb(self.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, rss_kb(self.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        began = time.perf_counter()
        lines = size = 0
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            reply = conn.getresponse()
            if reply.status != 200:
                raise RuntimeError(f"{path}: {reply.status} {reply.read()[:300]!r}")
            while chunk := reply.read1(1 << 16):
                lines += chunk.count(b"\n")
                size += len(chunk)
        finally:
            conn.close()
            seconds = time.perf_counter() - began
            done.set()
            sampler.join()
        after = rss_kb(self.pid)
        return {
            "rows": lines - 1,
            "mb": round(size / 1e6, 1),
            "seconds": round(seconds, 2),
            "rss_before_mb": round(before / 1024, 1),
            "rss_peak_mb": round(peak / 1024, 1),
            "rss_after_mb": round(after / 1024, 1),
            "rss_growth_mb": round((peak - before) / 1024, 1),
        }

    def stop(self) -> None:
        self.proc.stop()


def export_since(days: list[tuple[str, int]], rows: int) -> str | None:
    """The first day of the newest days holding at least `rows` rows (None: every row is fewer)."""
    total = 0
    for day, tasks in reversed(days):
        total += tasks
        if total >= rows:
            return day
    return None


def measure_gateway(url: str, repeat: int, export_rows: int, days: list[tuple[str, int]]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as work:
        gateway = Gateway(url, Path(work))
        try:
            out: dict[str, Any] = {"start_s": round(gateway.start_s, 2), "rss_idle_mb": rss_kb(gateway.pid) // 1024}
            for name, (by, flt) in ranges(datetime.now(UTC)).items():
                path = "/admin/usage?" + query_of(by, flt)

                async def call(path: str = path) -> None:
                    status, body = await asyncio.to_thread(gateway.get, path)
                    if status != 200:
                        raise RuntimeError(f"{path}: {status} {body[:300]!r}")

                out[name] = asyncio.run(timed(call, repeat))
            since = export_since(days, export_rows)
            out["csv_export"] = gateway.export("/admin/usage?format=csv" + (f"&since={since}" if since else ""))
            out["csv_export"]["since"] = since
            out["rss_end_mb"] = round(rss_kb(gateway.pid) / 1024, 1)
            out["rss_hwm_mb"] = round(rss_kb(gateway.pid, "VmHWM") / 1024, 1)
            return out
        finally:
            gateway.stop()


async def run_seed(args: argparse.Namespace) -> dict[str, Any]:
    store = open_url(args.store)
    await store.open()
    try:
        plan = Plan(args.tasks, args.days, args.teams, args.users_per_team, args.seed)
        figures = await seed(store, plan, args.concurrency, progress=10.0, bulk=False if args.stepwise else None)
    finally:
        await store.close()
    return {"command": "seed", "store": args.store.split("://")[0], **figures, "days": args.days, "teams": args.teams}


def run_measure(args: argparse.Namespace) -> dict[str, Any]:
    store = asyncio.run(measure_store(args.store, args.repeat))
    days = store.pop("days")
    out: dict[str, Any] = {"command": "measure", "store": args.store.split("://")[0], "through_store": store}
    if args.gateway:
        out["through_gateway"] = measure_gateway(args.store, args.repeat, args.export_rows, days)
    return out


def main(argv: list[str] | None = None) -> None:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True)
    seeding = commands.add_parser("seed", help="write N settled tasks through the store's own operations")
    seeding.add_argument("--store", required=True)
    seeding.add_argument("--tasks", type=int, required=True)
    seeding.add_argument("--days", type=int, default=365)
    seeding.add_argument("--teams", type=int, default=50)
    seeding.add_argument("--users-per-team", type=int, default=4)
    seeding.add_argument("--seed", type=int, default=1)
    seeding.add_argument("--concurrency", type=int, default=64, help="tasks written at once")
    seeding.add_argument(
        "--stepwise", action="store_true", help="every task through admit, record_created and settle, also on SQLite"
    )
    measuring = commands.add_parser("measure", help="time grouped figures and the CSV export")
    measuring.add_argument("--store", required=True)
    measuring.add_argument("--gateway", action="store_true", help="also through a gateway process's /admin/usage")
    measuring.add_argument("--repeat", type=int, default=7, help="timed calls per figure after the first")
    measuring.add_argument("--export-rows", type=int, default=EXPORT_ROWS, help="rows in the CSV export")
    args = root.parse_args(argv)
    result = asyncio.run(run_seed(args)) if args.command == "seed" else run_measure(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
