"""The gateway's load benchmark, side by side in one run on loopback (see bench/README.md).

    python bench/run.py [--quick] [--duration S] [--out bench/RESULTS.md] [--profile]

Targets, each measured with wrk for creates and polls at 1 and 32 connections:
  direct               wrk → the fake upstream (bench/fake_upstream.py)
  bare-<client>        wrk → starlette pass-through (bench/passthrough.py) → fake, per HTTP client
  gateway-sqlite       wrk → `python -m gateway.cli serve` (every feature on, SQLite store) → fake
  gateway-sqlite-<c>   the same gateway with another upstream client injected (bench/gateway_serve.py)
  gateway-redis        the same on a Redis store, once gateway/store/redis.py exists
The proxy under test is pinned to one core; wrk, the fake upstream (and Redis) to the other.
Then a memory run pushes --tasks creates through a fresh gateway and samples its RSS.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CREATE_PATH = "/api/v1/videos/generations"
USER_KEY = "tgw-bench-" + hashlib.sha256(b"tokenhub-gateway bench user").hexdigest()[:32]
UPSTREAM_KEYS = {"bench-a": "th-bench-upstream-key-aaaa1111", "bench-b": "th-bench-upstream-key-bbbb2222"}
POLL_IDS = 1000
CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")
BASELINE = "bare-aiohttp"
PROFILED = ("gateway-sqlite", "gateway-sqlite-norpm")
MEMORY_RUN_MAX_S = 1800
CLK_TCK = os.sysconf("SC_CLK_TCK")


# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process pinned to one core; stopped by stop(), which every exit path reaches.
    It runs in `src` with `src` first on PYTHONPATH, so `gateway` is imported from there."""

    def __init__(self, name: str, args: list[str], log: Path, core: int | None,
                 env: dict[str, str] | None = None, src: Path = ROOT) -> None:
        pin = ["taskset", "-c", str(core)] if core is not None else []
        self.name, self.log_path = name, log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen([*pin, *args], stdout=self._log, stderr=subprocess.STDOUT, cwd=src,
                                      env={**os.environ, "PYTHONPATH": str(src), **(env or {})},
                                      start_new_session=True)
        self.pid = self.popen.pid  # taskset execs the command: the same pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


class Procs:
    def __init__(self) -> None:
        self.running: list[Proc] = []

    def start(self, *args: Any, **kw: Any) -> Proc:
        p = Proc(*args, **kw)
        self.running.append(p)
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.running:
            self.running.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.running)):
            self.stop(p)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None
            ) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


def wait_ready(proc: Proc, port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log_path}")
        try:
            if request(port, "GET", path)[0] < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not answer {path} within {timeout} s; see {proc.log_path}")


# /proc readings


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    return cpu_ticks_of(Path(f"/proc/{pid}/stat"))


def thread_split(pid: int) -> tuple[int, int, int]:
    """(event-loop thread ticks, other threads' ticks, context switches of all threads) of a process.
    The main thread runs the event loop; the others are the SQLite writer and executor workers."""
    main = other = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ticks = cpu_ticks_of(task / "stat")
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            main += ticks
        else:
            other += ticks
        switches += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return main, other, switches


def cpu_ticks_of(stat_path: Path) -> int:
    stat = stat_path.read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def vm_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]
            out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def busy_pct(before: dict, after: dict, core: int | None) -> float | None:
    if core is None or core not in before:
        return None
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return 100.0 * busy / total if total else None


# wrk


def wrk(script: str, port: int, script_args: list[str], conns: int, duration: float, core: int | None,
        timeout_s: int = 5) -> dict[str, Any]:
    threads = 1 if conns == 1 else 2
    pin = ["taskset", "-c", str(core)] if core is not None else []
    cmd = [*pin, "wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout",
           f"{timeout_s}s", "--latency", "-s", str(BENCH / script), f"http://127.0.0.1:{port}", "--",
           *script_args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                         env={**os.environ, "BENCH_CONNECTIONS": str(conns)})
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")


def wrk_args(route: str, ids_file: Path | None) -> tuple[str, list[str]]:
    if route == "create":
        return "create.lua", [CREATE_PATH, USER_KEY]
    return "poll.lua", [CREATE_PATH, USER_KEY, str(ids_file)]


# targets


@dataclass
class Target:
    name: str
    port: int
    pid: int
    kind: str  # direct | bare | gateway
    client: str = ""
    note: str = ""
    ids_file: Path | None = None


@dataclass
class Row:
    target: str
    route: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    raw_p50_ms: float
    raw_p99_ms: float
    cpu_us: float | None
    rss_mb: float
    errors: int
    requests: int
    upstream_per_req: float | None
    proxy_core_pct: float | None
    load_core_pct: float | None
    loop_cpu_us: float | None = None
    other_cpu_us: float | None = None
    switches_per_req: float | None = None
    ratio: float | None = None
    added_p50_ms: float | None = None
    round: int = 0
    rps_per_round: tuple[float, ...] = ()


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    procs: Procs
    proxy_core: int | None
    load_core: int | None
    rows: list[Row] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    fake: Proc | None = None
    fake_port: int = 0
    memory: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Path] = field(default_factory=dict)
    src: Path = ROOT
    source_at_start: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)  # gateway target → code it started with

    def say(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # the fake upstream

    def start_fake(self) -> None:
        self.fake_port = free_port()
        self.fake = self.procs.start("fake-upstream", [sys.executable, str(BENCH / "fake_upstream.py"),
                                                       "--port", str(self.fake_port)],
                                     self.work / "fake-upstream.log", self.load_core)
        wait_ready(self.fake, self.fake_port, "/_stats")

    def fake_stats(self) -> dict[str, int]:
        return json.loads(request(self.fake_port, "GET", "/_stats")[1])

    # one measured wrk run

    def measure(self, t: Target, route: str, conns: int, round_no: int = 0) -> Row:
        script, sargs = wrk_args(route, t.ids_file)
        if self.args.warmup > 0:
            wrk(script, t.port, sargs, conns, self.args.warmup, self.load_core)
        fake0, cores0, ticks0, split0 = self.fake_stats(), core_times(), cpu_ticks(t.pid), thread_split(t.pid)
        r = wrk(script, t.port, sargs, conns, self.args.duration, self.load_core)
        ticks1, split1, cores1, fake1 = cpu_ticks(t.pid), thread_split(t.pid), core_times(), self.fake_stats()
        n = r["requests"]
        per_req = [(a - b) / n if n else None for a, b in zip(split1, split0, strict=True)]
        upstream = (fake1["creates"] + fake1["polls"]) - (fake0["creates"] + fake0["polls"])
        row = Row(target=t.name, route=route, conns=conns, rps=n / (r["duration_us"] / 1e6),
                  p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000,
                  raw_p50_ms=r["raw_p50_us"] / 1000, raw_p99_ms=r["raw_p99_us"] / 1000,
                  cpu_us=(ticks1 - ticks0) / CLK_TCK * 1e6 / n if n else None,
                  rss_mb=vm_kb(t.pid, "VmHWM") / 1024,
                  errors=r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"], requests=n,
                  upstream_per_req=None if t.kind == "direct" else (upstream / n if n else None),
                  proxy_core_pct=busy_pct(cores0, cores1, self.proxy_core),
                  load_core_pct=busy_pct(cores0, cores1, self.load_core),
                  loop_cpu_us=per_req[0] and per_req[0] / CLK_TCK * 1e6,
                  other_cpu_us=per_req[1] and per_req[1] / CLK_TCK * 1e6, switches_per_req=per_req[2],
                  round=round_no)
        self.say(f"{t.name:26} {route:6} c={conns:<3} {row.rps:9.0f} req/s  p50 {row.p50_ms:7.3f} ms  "
                 f"p99 {row.p99_ms:7.3f} ms  cpu {row.cpu_us or 0:7.1f} us/req  errors {row.errors}")
        self.rows.append(row)
        return row

    def measure_all(self, targets: list[Target]) -> None:
        """Every target, route and connection count, round after round: in each round the targets are
        measured one after the other, so a ratio compares runs minutes apart at most, and a machine
        that slows down for a while slows a whole round, not one target."""
        for round_no in range(1, self.args.rounds + 1):
            for route in ("poll", "create"):
                for conns in (1, 32):
                    for t in targets:
                        self.measure(t, route, conns, round_no)
            self.say(f"round {round_no} of {self.args.rounds} done")

    def synthetic_ids(self, t: Target) -> Path:
        path = self.work / f"ids-{t.name}.txt"
        path.write_text("".join(f"cgt-bench-{i:06d}\n" for i in range(POLL_IDS)))
        return path

    def gateway_ids(self, t: Target) -> Path:
        """Tasks created through the gateway itself, so its team owns them and polls find them."""
        conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
        body = json.dumps({"model": "doubao-seedance-2.0-fast", "prompt": "bench poll task", "duration": 5})
        headers = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"}
        ids = []
        try:
            for _ in range(POLL_IDS):
                status, data = request(t.port, "POST", CREATE_PATH, body.encode(), headers, conn)
                if status != 200:
                    raise RuntimeError(f"{t.name}: a create for the poll ids answered {status}: {data[:300]!r}")
                ids.append(json.loads(data)["id"])
        finally:
            conn.close()
        path = self.work / f"ids-{t.name}.txt"
        path.write_text("".join(i + "\n" for i in ids))
        return path

    # targets

    def direct_target(self) -> Target:
        assert self.fake is not None
        t = Target("direct", self.fake_port, self.fake.pid, "direct",
                   note="the fake upstream itself, sharing the load core with wrk")
        t.ids_file = self.synthetic_ids(t)
        return t

    def start_bare(self, client: str) -> Target | None:
        name = f"bare-{client}"
        if client == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            self.unavailable[name] = "httpx-aiohttp is not installed (pip install httpx-aiohttp)"
            return None
        port = free_port()
        p = self.procs.start(name, [sys.executable, str(BENCH / "passthrough.py"), "--client", client,
                                    "--port", str(port), "--upstream", f"http://127.0.0.1:{self.fake_port}"],
                             self.work / f"{name}.log", self.proxy_core)
        wait_ready(p, port, "/healthz")
        t = Target(name, port, p.pid, "bare", client)
        t.ids_file = self.synthetic_ids(t)
        return t

    def start_gateway(self, name: str, store_url: str, client: str = "aiohttp",
                      rpm: bool = True) -> tuple[Proc, int]:
        port = free_port()
        config = self.work / f"{name}.toml"
        config.write_text(gateway_toml(port, self.fake_port, store_url, rpm))
        env = {f"BENCH_UPSTREAM_KEY_{k[-1].upper()}": v for k, v in UPSTREAM_KEYS.items()}
        if client == "aiohttp":  # the shipped client, through the real command line
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
        else:
            cmd = [sys.executable, str(BENCH / "gateway_serve.py"), "--config", str(config), "--client", client]
        self.fingerprints[name] = code_fingerprint(self.src)
        p = self.procs.start(name, cmd, self.work / f"{name}.log", self.proxy_core, env, self.src)
        wait_ready(p, port, "/healthz")
        return p, port

    def gateway_target(self, name: str, store_url: str, client: str = "aiohttp",
                       rpm: bool = True) -> Target | None:
        if client == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            self.unavailable[name] = "httpx-aiohttp is not installed (pip install httpx-aiohttp)"
            return None
        p, port = self.start_gateway(name, store_url, client, rpm)
        t = Target(name, port, p.pid, "gateway", client)
        t.ids_file = self.gateway_ids(t)
        return t

    def redis_target(self) -> Target | None:
        name = "gateway-redis"
        if not (self.src / "gateway" / "store" / "redis.py").exists():
            self.unavailable[name] = "the gateway has no Redis store yet (gateway/store/redis.py)"
            return None
        if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
            self.unavailable[name] = "needs redis-server (apt-get install -y redis-server) and redis-py"
            return None
        port = free_port()
        redis = self.procs.start("redis-server", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                                  "--save", "", "--appendonly", "no",
                                                  "--dir", str(self.work)],
                                 self.work / "redis.log", self.load_core)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and redis.alive():
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return self.gateway_target(name, f"redis://127.0.0.1:{port}/0")

    # memory: RSS after N tasks through a fresh gateway

    def run_memory(self) -> None:
        n = self.args.tasks
        db = self.work / "memory.db"
        p, port = self.start_gateway("gateway-memory", f"sqlite:///{db}")
        try:
            start_rss = vm_kb(p.pid, "VmRSS") / 1024
            created0 = self.fake_stats()["creates"]
            per_thread = (n + 1) // 2
            pin = ["taskset", "-c", str(self.load_core)] if self.load_core is not None else []
            # Each wrk thread stops itself after its share (create.lua's third argument), but wrk's
            # main thread sleeps out -d: it is interrupted (SIGINT: it then reports) once creates stop.
            cmd = [*pin, "wrk", "-t2", "-c32", f"-d{MEMORY_RUN_MAX_S}s", "--timeout", "5s",
                   "-s", str(BENCH / "create.lua"), f"http://127.0.0.1:{port}", "--",
                   CREATE_PATH, USER_KEY, str(per_thread)]
            self.say(f"memory run: {n} creates through a fresh gateway")
            started = time.monotonic()
            load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "BENCH_CONNECTIONS": "32"})
            samples = [(0, start_rss)]
            try:
                while load.poll() is None:
                    time.sleep(1.0)
                    done = self.fake_stats()["creates"] - created0
                    samples.append((done, vm_kb(p.pid, "VmRSS") / 1024))
                    stalled = len(samples) > 3 and samples[-3][0] == done
                    if done >= n or stalled:
                        load.send_signal(signal.SIGINT)
                        load.wait(30)
            finally:
                if load.poll() is None:
                    load.kill()
                    load.wait(5)
            elapsed = time.monotonic() - started
            out = load.stdout.read() if load.stdout else ""
            result = next((json.loads(line[8:]) for line in out.splitlines() if line.startswith("WRKJSON ")), {})
            time.sleep(2.0)
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                tasks = c.execute("SELECT COUNT(*) FROM tasks WHERE task_id IS NOT NULL").fetchone()[0]
            self.memory = {"tasks": tasks, "requests": result.get("requests", 0),
                           "errors": sum(result.get(k, 0) for k in ("status", "connect", "read", "write",
                                                                     "timeout")),
                           "seconds": elapsed, "start_mb": start_rss, "end_mb": vm_kb(p.pid, "VmRSS") / 1024,
                           "peak_mb": vm_kb(p.pid, "VmHWM") / 1024, "samples": samples, "target": n}
            self.say(f"memory run: {tasks} tasks in {elapsed:.0f} s, RSS {start_rss:.1f} → "
                     f"{self.memory['end_mb']:.1f} MB (peak {self.memory['peak_mb']:.1f} MB)")
        finally:
            self.procs.stop(p)

    # profile: py-spy on the gateway under create and poll load

    def profile(self, t: Target) -> None:
        if shutil.which("py-spy") is None:
            self.unavailable["profile"] = "py-spy is not installed (pip install py-spy)"
            return
        for route in ("create", "poll"):
            out = self.work / f"profile-{t.name}-{route}.folded"
            script, sargs = wrk_args(route, t.ids_file)
            pin = ["taskset", "-c", str(self.load_core)] if self.load_core is not None else []
            # --nonblocking: py-spy reads stacks without pausing the gateway, and its idle detection
            # (thread state) then works; a paused process looks busy everywhere.
            spy = subprocess.Popen([*pin, "py-spy", "record", "--pid", str(t.pid), "--rate", "250",
                                    "--duration", str(max(1, round(self.args.duration))), "--format", "raw",
                                    "--nonblocking", "--full-filenames", "--output", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            wrk(script, t.port, sargs, 32, self.args.duration, self.load_core)
            spy.wait(60)
            if out.exists():
                self.profiles[f"{t.name} {route}"] = out
                self.say(f"profile of {route}s under 32 connections: {out}")


def code_fingerprint(src: Path) -> str:
    """SHA-256 of the gateway package's sources, uncommitted edits included."""
    h = hashlib.sha256()
    for path in sorted((src / "gateway").rglob("*.py")):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def describe_source(src: Path) -> str:
    git = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(src), "status", "--porcelain", "--", "gateway"],
                           capture_output=True,
                           text=True).stdout.strip()
    fingerprint = code_fingerprint(src)
    if git.returncode == 0:
        commit = f"commit {git.stdout.strip()}" + (" with uncommitted changes in gateway/" if dirty else "")
    elif (same := snapshot_of(fingerprint)) is not None:
        commit = f"a snapshot of commit {same}: the same gateway/ sources"
    else:
        commit = "not a git checkout"
    return f"{src} ({commit}); gateway/ sources sha256 {fingerprint}"


def snapshot_of(fingerprint: str) -> str | None:
    """The HEAD commit of this checkout when its gateway/ sources are exactly the ones measured
    (a `git archive` of it, say)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    listed = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "gateway"], capture_output=True)
    if listed.returncode != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=listed.stdout, check=True)
        return head.stdout.strip() if code_fingerprint(Path(tmp)) == fingerprint else None


def gateway_toml(port: int, fake_port: int, store_url: str, rpm: bool = True) -> str:
    """Every feature on, and nothing that could reject a request of the benchmark.
    rpm=False leaves out requests_per_minute only, to show what the rate-limit window costs."""
    digest = hashlib.sha256(USER_KEY.encode()).hexdigest()
    keys = "".join(f"""
[[upstream.keys]]
name = "{name}"
value_env = "BENCH_UPSTREAM_KEY_{name[-1].upper()}"
weight = 1
max_concurrent_tasks = 1000000
""" for name in UPSTREAM_KEYS)
    limits = "budget_usd = 1000000000.0\nvideo_seconds = 1000000000\nmax_concurrent_tasks = 100000000\n"
    if rpm:
        limits += "requests_per_minute = 10000000\n"
    return f"""[server]
host = "127.0.0.1"
port = {port}
shutdown_grace_s = 2

[upstream]
base_url = "http://127.0.0.1:{fake_port}/api/v1"
connect_timeout_s = 2
timeout_s = 10
{keys}
[store]
url = "{store_url}"

[poller]
interval_s = 86400
expire_after_s = 31536000

[teams.bench]
period = "month"
{limits}
[users.bench-user]
team = "bench"
key_sha256 = "{digest}"
{limits}"""


# report


def fmt(v: float | None, spec: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def summarize(raw: list[Row]) -> list[Row]:
    """One row per target, route and connection count: the round with the median req/s. Its ratio to
    the baseline (and its added p50 over direct) is the median of the per-round figures, each taken
    against the baseline's run of the same round."""
    groups: dict[tuple[str, str, int], list[Row]] = collections.defaultdict(list)
    for r in raw:
        groups[(r.target, r.route, r.conns)].append(r)
    by_round = {(r.target, r.route, r.conns, r.round): r for r in raw}
    out = []
    for (target, route, conns), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.rps)
        row = dataclasses.replace(runs[(len(runs) - 1) // 2], rps_per_round=tuple(r.rps for r in
                                                                                   sorted(runs, key=lambda r: r.round)))
        ratios, added = [], []
        for r in runs:
            base = by_round.get((BASELINE, route, conns, r.round))
            if base and base.rps:
                ratios.append(r.rps / base.rps)
            direct = by_round.get(("direct", route, 1, r.round))
            if conns == 1 and direct and target != "direct":
                added.append(r.p50_ms - direct.p50_ms)
        row.ratio = statistics.median(ratios) if ratios else None
        row.added_p50_ms = statistics.median(added) if added else None
        out.append(row)
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def targets_section(rows: list[Row], memory: dict[str, Any], gw: str, title: str) -> list[str]:
    by = {(r.target, r.route, r.conns): r for r in rows}
    if not any(r.target == gw for r in rows):
        return []
    lines = [title, "", "| target | measured | verdict |", "|---|---|---|"]
    for route, need in (("create", 0.6), ("poll", 0.8)):
        for conns in (1, 32):
            r, b = by.get((gw, route, conns)), by.get((BASELINE, route, conns))
            if r and b:
                lines.append(f"| {route}s ≥ {need}× {BASELINE} req/s, {conns} conn | {r.rps:.0f} vs {b.rps:.0f} "
                             f"req/s: **{r.ratio:.2f}×** | {verdict(r.ratio >= need)} |")
    for route in ("create", "poll"):
        r, d = by.get((gw, route, 1)), by.get(("direct", route, 1))
        if r and d:
            lines.append(f"| {route}s, 1 conn: added p50 over direct ≤ 0.5 ms | {r.p50_ms:.3f} vs {d.p50_ms:.3f} ms: "
                         f"**{r.added_p50_ms:.3f} ms** | {verdict(r.added_p50_ms <= 0.5)} |")
    for route in ("create", "poll"):
        r, b = by.get((gw, route, 32)), by.get((BASELINE, route, 32))
        if r:
            x = r.p99_ms / r.p50_ms if r.p50_ms else float("inf")
            raw = r.raw_p99_ms / r.raw_p50_ms if r.raw_p50_ms else float("inf")
            bare = f"; {BASELINE}: {b.p99_ms / b.p50_ms:.1f}×" if b and b.p50_ms else ""
            lines.append(f"| {route}s, 32 conns: p99 ≤ 3× p50 | {r.p99_ms:.2f} / {r.p50_ms:.2f} ms = **{x:.1f}×** "
                         f"(uncorrected {r.raw_p99_ms:.2f} / {r.raw_p50_ms:.2f} = {raw:.1f}×{bare}) "
                         f"| {verdict(x <= 3)} |")
    if memory:
        lines.append(f"| RSS after {memory['tasks']:,} tasks < 150 MB | **{memory['end_mb']:.1f} MB** "
                     f"(peak {memory['peak_mb']:.1f} MB) | "
                     f"{verdict(memory['end_mb'] < 150 and memory['tasks'] >= memory['target'])} |")
    return lines


def client_section(rows: list[Row], unavailable: dict[str, str]) -> list[str]:
    lines = ["## Upstream client, chosen by measurement", "",
             "Each client as the bare pass-through, and inside the gateway (creates and polls, 32 connections).",
             "", "| client | bare create req/s | bare poll req/s | bare create CPU µs/req | gateway create req/s "
             "| gateway poll req/s | gateway create CPU µs/req |", "|---|---|---|---|---|---|---|"]
    by = {(r.target, r.route, r.conns): r for r in rows}
    best = None
    for client in CLIENTS:
        bare = f"bare-{client}"
        gw = "gateway-sqlite" if client == "aiohttp" else f"gateway-sqlite-{client}"
        bc, bp, gc, gp = (by.get((bare, "create", 32)), by.get((bare, "poll", 32)),
                          by.get((gw, "create", 32)), by.get((gw, "poll", 32)))
        if bc is None and gc is None:
            lines.append(f"| {client} | n/a: {unavailable.get(bare, 'not run')} | | | | | |")
            continue
        lines.append(f"| {client} | {fmt(bc and bc.rps, '.0f')} | {fmt(bp and bp.rps, '.0f')} | "
                     f"{fmt(bc and bc.cpu_us, '.0f')} | {fmt(gc and gc.rps, '.0f')} | {fmt(gp and gp.rps, '.0f')} | "
                     f"{fmt(gc and gc.cpu_us, '.0f')} |")
        if bc and (best is None or bc.rps > best[1]):
            best = (client, bc.rps)
    if best:
        lines += ["", f"Fastest bare pass-through on creates: **{best[0]}**."]
    return lines


def memory_section(memory: dict[str, Any]) -> list[str]:
    if not memory:
        return []
    lines = ["## Memory", "",
             f"{memory['tasks']:,} tasks created through a fresh gateway-sqlite (32 connections, "
             f"{memory['seconds']:.0f} s, {memory['errors']} errors): RSS {memory['start_mb']:.1f} MB at start, "
             f"**{memory['end_mb']:.1f} MB** after, peak (VmHWM) {memory['peak_mb']:.1f} MB.", "",
             "| tasks created | RSS MB |", "|---|---|"]
    samples = memory["samples"]
    step = max(1, memory["target"] // 10)
    marks, shown = list(range(0, memory["target"] + 1, step)), set()
    for mark in marks:
        s = min(samples, key=lambda x: abs(x[0] - mark))
        if s[0] not in shown:
            shown.add(s[0])
            lines.append(f"| {s[0]:,} | {s[1]:.1f} |")
    return lines


def machine_lines(args: argparse.Namespace, b: Bench) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    versions = []
    for pkg in ("starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "httpx-aiohttp", "structlog",
                "prometheus-client", "orjson"):
        try:
            from importlib.metadata import version

            versions.append(f"{pkg} {version(pkg)}")
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            versions.append(f"{pkg} –")
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- gateway code: {b.source_at_start}"]
    if len(set(b.fingerprints.values())) > 1 or b.source_at_start != describe_source(b.src):
        lines.append(f"- **warning: the gateway's code changed during this run** (now {describe_source(b.src)}; "
                     f"per target: {', '.join(f'{k} {v}' for k, v in b.fingerprints.items())}): rows mix versions")
    return [*lines,
            f"- machine: nproc {os.cpu_count()}, {cpu}, {platform.system()} {platform.release()}",
            f"- python {platform.python_version()}; {'; '.join(versions)}",
            f"- load: {wrk_v[0] if wrk_v else 'wrk'}; {args.duration:g} s per run after a {args.warmup:g} s "
            f"warm-up; 1 connection = wrk -t1 -c1, 32 connections = wrk -t2 -c32",
            f"- rounds: {args.rounds}; every target stays up and is measured once per round, in turn; a row is the "
            f"round with the median req/s, its ratio the median of the per-round ratios to {BASELINE}",
            f"- pinning: proxy under test on core {b.proxy_core}; wrk, the fake upstream (and Redis) on core "
            f"{b.load_core}"]


def report(args: argparse.Namespace, b: Bench) -> str:
    rows = summarize(b.rows)
    order = {name: i for i, name in enumerate(dict.fromkeys(r.target for r in rows))}
    rows = sorted(rows, key=lambda r: (r.route, r.conns, order[r.target]))
    lines = ["# tokenhub-gateway benchmark", "", "Written by `python bench/run.py"
             + (" --quick" if args.quick else "") + "`; see bench/README.md for what each row is.", "",
             *machine_lines(args, b), ""]
    lines += ["## Results", "",
              "| target | route | conns | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MB | vs bare-aiohttp "
              "| added p50 vs direct ms | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.target} | {r.route} | {r.conns} | {r.rps:.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | "
                     f"{fmt(r.cpu_us, '.0f')} | {r.rss_mb:.1f} | {fmt(r.ratio, '.2f')}× | "
                     f"{fmt(r.added_p50_ms, '.3f')} | {r.errors} |")
    for name, why in b.unavailable.items():
        lines.append(f"| {name} | – | – | n/a: {why} | | | | | | | |")
    lines += ["", *targets_section(rows, b.memory, "gateway-sqlite", "## Targets (gateway-sqlite, every feature on)"),
              "", *targets_section(rows, {}, "gateway-sqlite-norpm",
                                   "### For reference: the same without `requests_per_minute`"),
              "", *client_section(rows, b.unavailable), "",
              *memory_section(b.memory), ""]
    lines += ["## Details", "",
              "p50/p99 are wrk's, which corrects for coordinated omission (a request slower than twice the mean "
              "interval per connection adds synthetic samples); the uncorrected ones are rebuilt exactly from "
              "wrk's histogram. Upstream calls per request counts what reached the fake upstream (polls through "
              "the gateway are coalesced to one upstream call per task per second). Core busy % is from "
              "/proc/stat over the measured window: if the load core is not saturated, neither wrk nor the fake "
              "upstream limited the proxy.", "",
              "| target | route | conns | req/s per round | requests | uncorrected p50 ms | uncorrected p99 ms "
              "| upstream calls/req "
              "| CPU µs/req: loop thread | CPU µs/req: other threads | context switches/req "
              "| proxy core busy % | load core busy % |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_round = ", ".join(f"{x:.0f}" for x in r.rps_per_round)
        lines.append(f"| {r.target} | {r.route} | {r.conns} | {per_round} | {r.requests} | {r.raw_p50_ms:.3f} | "
                     f"{r.raw_p99_ms:.3f} | {fmt(r.upstream_per_req, '.3f')} | {fmt(r.loop_cpu_us, '.0f')} | "
                     f"{fmt(r.other_cpu_us, '.0f')} | {fmt(r.switches_per_req, '.1f')} | "
                     f"{fmt(r.proxy_core_pct, '.0f')} | {fmt(r.load_core_pct, '.0f')} |")
    if b.profiles:
        lines += ["", "## Profile", "", "`--profile` ran py-spy on gateway-sqlite under 32 connections; "
                  "see PROFILE.md beside this file."]
    return "\n".join(lines) + "\n"


def profile_summary(path: Path, top: int = 25) -> list[str]:
    """Self and total share per frame, from py-spy's folded stacks ("f1;f2;f3 count")."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += n
        threads[thread_of(frames)] += n
        self_n[frames[-1]] += n
        for f in set(frames):
            total_n[f] += n
    share = ", ".join(f"{name} {100 * k / samples:.0f} %" for name, k in threads.most_common())
    lines = [f"{samples} samples (not idle): {share}.", "",
             "| by self time | self % | | by total time | total % |", "|---|---|---|---|---|"]
    by_self, by_total = self_n.most_common(top), total_n.most_common(top)
    for i in range(top):
        s = by_self[i] if i < len(by_self) else ("", 0)
        t = by_total[i] if i < len(by_total) else ("", 0)
        lines.append(f"| `{s[0]}` | {100 * s[1] / samples:.1f} | | `{t[0]}` | {100 * t[1] / samples:.1f} |")
    return lines


def thread_of(frames: list[str]) -> str:
    if any(f.startswith("_Writer._run ") for f in frames):
        return "SQLite writer thread"
    return "event loop and other threads"


def short_frame(frame: str) -> str:
    """'handle (/x/site-packages/starlette/routing.py:123)' → 'handle (starlette/routing.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where)
    where = re.sub(r"^/.*/(?=gateway/)", "", where)  # this checkout, or the one --src named
    return f"{name} ({where})" if where else name


def write_profile(b: Bench, out: Path) -> None:
    if not b.profiles:
        return
    lines = ["# Profile of gateway-sqlite under load", "",
             "py-spy (250 Hz, every thread, idle time excluded) while wrk ran 32 connections; written by "
             "`python bench/run.py --profile`. Frames are aggregated by function, lines dropped.", "",
             f"Gateway code: {b.source_at_start}.", ""]
    raw = out.parent / "results" / "raw"  # git-ignored
    raw.mkdir(parents=True, exist_ok=True)
    for label, path in b.profiles.items():
        kept = raw / path.name
        shutil.copyfile(path, kept)
        lines += [f"## {label}s", "", f"Folded stacks: `{kept.relative_to(out.parent)}` (speedscope opens them).",
                  "", *profile_summary(path), ""]
    (out.parent / "PROFILE.md").write_text("\n".join(lines))


# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the gateway against bare pass-throughs, on loopback.")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up, 20,000 tasks in the memory run")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 10; --quick 3)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each run (default 2; --quick 1)")
    p.add_argument("--tasks", type=int, help="creates in the memory run (default 100000; --quick 20000)")
    p.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="the Markdown report (default bench/RESULTS.md)")
    p.add_argument("--profile", action="store_true", help="also run py-spy on gateway-sqlite (PROFILE.md)")
    p.add_argument("--no-gateway-clients", action="store_true",
                   help="skip the gateway with httpx / httpx-aiohttp injected")
    p.add_argument("--rounds", type=int, help="measure every target this many times, interleaved; the report "
                                               "gives medians (default 3; --quick 1)")
    p.add_argument("--only", default="",
                   help="comma-separated rows to run (e.g. bare-aiohttp,gateway-sqlite; 'memory' for the memory "
                        "run); default: all. direct always runs: it is what added p50 is measured against")
    p.add_argument("--src", default=str(ROOT),
                   help="the checkout whose gateway/ is benchmarked (default: this one), e.g. a `git archive` "
                        "snapshot, so edits made meanwhile in the work tree cannot leak into the run")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.tasks = args.tasks or (20_000 if args.quick else 100_000)
    args.only = {name.strip() for name in args.only.split(",") if name.strip()}
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    if shutil.which("wrk") is None:
        print("wrk is not installed; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    pinned = shutil.which("taskset") is not None and len(cores) >= 2
    proxy_core, load_core = (cores[0], cores[1]) if pinned else (None, None)
    if not pinned:
        print("warning: fewer than 2 cores or no taskset: nothing is pinned", file=sys.stderr)
    else:
        os.sched_setaffinity(0, {load_core})  # this script stays off the proxy's core
    work = Path(tempfile.mkdtemp(prefix="tokenhub-bench-"))
    b = Bench(args, work, Procs(), proxy_core, load_core, src=Path(args.src).resolve())
    if not (b.src / "gateway" / "cli.py").exists():
        print(f"--src {b.src}: no gateway/cli.py there", file=sys.stderr)
        return 2
    b.source_at_start = describe_source(b.src)
    b.say(f"work dir {work}; proxy on core {proxy_core}, load on core {load_core}; gateway {b.source_at_start}")
    try:
        b.start_fake()
        # Every target is started first and stays up (idle ones cost nothing), then measured round by round.
        targets = [b.direct_target()]
        for client in CLIENTS:
            if wanted(f"bare-{client}"):
                targets.append(b.start_bare(client))
        if wanted("gateway-sqlite"):
            targets.append(b.gateway_target("gateway-sqlite", f"sqlite:///{work / 'gateway.db'}"))
        if wanted("gateway-sqlite-norpm"):
            targets.append(b.gateway_target("gateway-sqlite-norpm", f"sqlite:///{work / 'gateway-norpm.db'}",
                                            rpm=False))
        if not args.no_gateway_clients:
            for client in CLIENTS[1:]:
                if wanted(f"gateway-sqlite-{client}"):
                    targets.append(b.gateway_target(f"gateway-sqlite-{client}",
                                                    f"sqlite:///{work / ('gateway-' + client + '.db')}", client))
        if wanted("gateway-redis"):
            targets.append(b.redis_target())
        live = [t for t in targets if t is not None]
        b.say(f"targets up: {', '.join(t.name for t in live)}; {args.rounds} round(s)")
        b.measure_all(live)
        if args.profile:
            for t in live:
                if t.name in PROFILED:
                    b.profile(t)
        for p in list(b.procs.running):  # the targets stop; the fake upstream serves the memory run
            if p is not b.fake:
                b.procs.stop(p)
        if wanted("memory"):
            b.run_memory()
    except KeyboardInterrupt:
        b.say("interrupted: writing what was measured")
    finally:
        b.procs.stop_all()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report(args, b)
    out.write_text(text)
    write_profile(b, out)
    print(text)
    b.say(f"wrote {out}; logs and databases in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
