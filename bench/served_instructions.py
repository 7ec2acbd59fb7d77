"""Instructions per create of a real server, counted by callgrind: the bare aiohttp pass-through and the
gateway (`python -m gateway.cli serve`, bench/run.py's config), each under valgrind on core 0, with the fake
upstream on core 1 outside it. A client sends SMALL, then LARGE creates over 16 keep-alive connections
to a fresh server each time, and the difference divided by LARGE - SMALL leaves out start-up and shutdown.

Wall-clock ratios on a shared machine move by tens of percent between runs; these counts repeat, so the
ratio of the two is the figure to compare commits by (it leaves out system calls and cache misses).
Needs valgrind; takes 5–10 minutes.

    python bench/served_instructions.py [--src DIR ...] [--small 320] [--large 1280]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway_config import CREATE_PATH, USER_KEY, gateway_toml, upstream_key_env
from processes import Lab
from source import ROOT

from tests.procs import free_port

BENCH = Path(__file__).resolve().parent
BODY = json.dumps(
    {
        "model": "doubao-seedance-2.0-fast",
        "prompt": "A red fox running through fresh snow",
        "duration": 5,
        "resolution": "720p",
    }
).encode()
HEADERS = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
CONNECTIONS = 16
START_S = 600  # python under valgrind imports slowly


def creates(port: int, n: int, route: str = "create") -> None:
    """n creates (or polls: each connection creates one task, then polls it) over CONNECTIONS connections,
    once the server answers; every one must succeed."""
    deadline = time.monotonic() + START_S
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/healthz")
            c.getresponse().read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    failed: list[int] = []

    def worker(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        method, path, body = "POST", CREATE_PATH, BODY
        if route == "poll":
            conn.request("POST", CREATE_PATH, body=BODY, headers=HEADERS)
            task_id = json.loads(conn.getresponse().read())["id"]
            method, path, body = "GET", f"{CREATE_PATH}/{task_id}", None
        for _ in range(count):
            conn.request(method, path, body=body, headers=HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failed.append(response.status)

    threads = [threading.Thread(target=worker, args=(n // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise RuntimeError(f"{len(failed)} creates failed, e.g. {failed[:5]}")


def counted(cmd: list[str], src: Path, port: int, n: int, work: Path, env: dict[str, str], route: str) -> int:
    """Instructions of the server process `cmd` over its whole life, having answered n creates (or polls)."""
    log = work / f"valgrind-{port}.log"
    with open(log, "w") as err:
        p = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                "valgrind",
                "--tool=callgrind",
                "--dump-instr=no",
                "--collect-jumps=no",
                f"--callgrind-out-file={work / f'callgrind-{port}'}",
                *cmd,
            ],
            cwd=src,
            env={**os.environ, **env, "PYTHONPATH": str(src)},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        creates(port, n - n % CONNECTIONS, route)
        p.send_signal(signal.SIGTERM)
        p.wait(300)
    finally:
        if p.poll() is None:
            p.kill()
    found = re.search(r"Collected : (\d+)", log.read_text())
    if found is None:
        raise RuntimeError(f"valgrind printed no count: see {log}")
    return int(found.group(1))


def per_create(
    name: str,
    command: Callable[[int], list[str]],
    src: Path,
    small: int,
    large: int,
    work: Path,
    env: dict[str, str],
    route: str = "create",
) -> float:
    counts = []
    for n in (small, large):
        port = free_port()
        counts.append(counted(command(port), src, port, n, work, env, route))
    figure = (counts[1] - counts[0]) / (large - small)
    print(f"{name:24s} {figure:>12,.0f} instructions per {route}  ({src})", flush=True)
    return figure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--src",
        action="append",
        type=Path,
        help="a checkout whose gateway/ is counted (repeatable; default this one), e.g. a `git archive` snapshot",
    )
    p.add_argument("--route", choices=("create", "poll"), default="create", help="what the client sends")
    p.add_argument("--small", type=int, default=320)
    p.add_argument("--large", type=int, default=1280)
    args = p.parse_args()
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tokenhub-served-"))
    lab = Lab(work, proxy_core=0, load_core=1)
    try:
        lab.start_fake()
        fake_port = lab.fake_port
        upstream = f"http://127.0.0.1:{fake_port}"
        bare = per_create(
            "bare-aiohttp",
            lambda port: [
                python,
                str(BENCH / "passthrough.py"),
                "--client",
                "aiohttp",
                "--port",
                str(port),
                "--upstream",
                upstream,
            ],
            ROOT,
            args.small,
            args.large,
            work,
            {},
            args.route,
        )

        def gateway(port: int) -> list[str]:
            config = work / f"gateway-{port}.toml"
            config.write_text(gateway_toml(port, fake_port, f"sqlite:///{work / f'gateway-{port}.db'}"))
            return [python, "-m", "gateway.cli", "serve", "--config", str(config)]

        for src in args.src or [ROOT]:
            figure = per_create(
                "gateway-sqlite", gateway, src.resolve(), args.small, args.large, work, upstream_key_env(), args.route
            )
            print(f"{'':24s} bare-aiohttp / gateway-sqlite = {bare / figure:.3f}", flush=True)
    finally:
        lab.procs.stop_all()
    print(f"logs and counts: {work}")


if __name__ == "__main__":
    main()
