"""Latency through a long run of creates: one gateway (SQLite, bench/run.py's config), N creates at C
connections, then the next pair, on one growing database. Long enough for many WAL checkpoints and
restarts, which a 10 s run of bench/run.py never reaches. Proxy on core 0; wrk and the fake upstream on core 1.

    python bench/long_run.py [--src DIR] N C [N C ...]      e.g. 1000000 32 200000 1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from gateway_config import CREATE_PATH, USER_KEY
from processes import BENCH, ROOT, Lab, taskset
from sampling import wrk_result


def run(lab: Lab, port: int, creates: int, conns: int) -> str:
    threads = 2 if conns > 1 else 1
    cmd = [
        *taskset(lab.load_core),
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        "-d36000s",
        "--timeout",
        "5s",
        "-s",
        str(BENCH / "create.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        CREATE_PATH,
        USER_KEY,
        str(-(-creates // threads)),  # each thread stops after its share
    ]
    started, before = time.monotonic(), lab.fake_stats()["creates"]
    env = {**os.environ, "BENCH_CONNECTIONS": str(conns)}
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while load.poll() is None:  # wrk's main thread sleeps out -d: interrupted (it then reports) once done
        time.sleep(0.5)
        if lab.fake_stats()["creates"] - before >= creates:
            load.send_signal(signal.SIGINT)
            load.wait(30)
    result = wrk_result(load.stdout.read() if load.stdout else "") or {}
    took = time.monotonic() - started
    errors = sum(result.get(k, 0) for k in ("connect", "read", "write", "status", "timeout"))
    p50, p99 = result["p50_us"] / 1000, result["p99_us"] / 1000
    raw50, raw99 = result["raw_p50_us"] / 1000, result["raw_p99_us"] / 1000
    return (
        f"{creates} creates, {conns} conns: {result['requests'] / took:.0f}/s over {took:.0f} s; "
        f"p50 {p50:.3f} ms, p99 {p99:.3f} ms ({p99 / p50:.2f}×); uncorrected {raw50:.3f} / {raw99:.3f} ms "
        f"({raw99 / raw50:.2f}×); max {result['max_us'] / 1000:.1f} ms; errors {errors}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT), help="the checkout whose gateway/ runs (default: this one)")
    p.add_argument("runs", nargs="+", type=int, help="pairs: creates, connections")
    args = p.parse_args()
    if len(args.runs) % 2:
        p.error("runs are pairs: creates, connections")
    work = Path(tempfile.mkdtemp(prefix="tokenhub-long-"))
    lab = Lab(work, 0, 1, src=Path(args.src))
    try:
        lab.start_fake()
        _proc, port = lab.start_gateway("gateway-sqlite", f"sqlite:///{work / 'long.db'}", src=Path(args.src))
        for creates, conns in zip(args.runs[0::2], args.runs[1::2], strict=True):
            print(run(lab, port, creates, conns), flush=True)
        wal = work / "long.db-wal"
        print(f"WAL at the end: {wal.stat().st_size / 1e6:.1f} MB" if wal.exists() else "no WAL", flush=True)
    finally:
        lab.procs.stop_all()
    print(f"logs and database: {work}")


if __name__ == "__main__":
    main()
