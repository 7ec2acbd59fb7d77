"""What a benchmark run measures: wrk runs, and the readings taken around them from /proc (CPU per process
and per thread, RSS, how busy each core was) and from the fake upstream's counters; the memory run's RSS
samples; py-spy's stacks of a gateway under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_config import CREATE_PATH, SDK_CREATE_PATH, USER_KEY
from processes import BENCH, Lab, Proc, Target, taskset

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY_RUN_MAX_S = 1800
WRK_ERRORS = ("status", "connect", "read", "write", "timeout")
SDK_CREATE = "create-sdk"  # the openai SDK's multipart create; only gateways speak the OpenAI shape


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
    fields = stat[stat.rindex(")") + 2 :].split()
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


def wrk(
    script: str, port: int, script_args: list[str], conns: int, duration: float, core: int | None, timeout_s: int = 5
) -> dict[str, Any]:
    threads = 1 if conns == 1 else 2
    cmd = [
        *taskset(core),
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        f"{timeout_s}s",
        "--latency",
        "-s",
        str(BENCH / script),
        f"http://127.0.0.1:{port}",
        "--",
        *script_args,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 120, env={**os.environ, "BENCH_CONNECTIONS": str(conns)}
    )
    result = wrk_result(out.stdout)
    if result is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    return result


def wrk_result(stdout: str) -> dict[str, Any] | None:
    """The JSON line common.lua's done() prints."""
    return next((json.loads(line[8:]) for line in stdout.splitlines() if line.startswith("WRKJSON ")), None)


def wrk_args(route: str, ids_file: Path | None) -> tuple[str, list[str]]:
    if route == "create":
        return "create.lua", [CREATE_PATH, USER_KEY]
    if route == SDK_CREATE:
        return "create_sdk.lua", [SDK_CREATE_PATH, USER_KEY]
    return "poll.lua", [CREATE_PATH, USER_KEY, str(ids_file)]


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
class Sampler:
    """Measures targets of a Lab; keeps every row, the memory run's figures and the profiles it wrote."""

    lab: Lab
    duration: float
    warmup: float
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Path] = field(default_factory=dict)

    def measure(self, t: Target, route: str, conns: int, round_no: int = 0) -> Row:
        script, sargs = wrk_args(route, t.ids_file)
        load_core = self.lab.load_core
        if self.warmup > 0:
            wrk(script, t.port, sargs, conns, self.warmup, load_core)
        fake0, cores0, ticks0, split0 = self.lab.fake_stats(), core_times(), cpu_ticks(t.pid), thread_split(t.pid)
        r = wrk(script, t.port, sargs, conns, self.duration, load_core)
        ticks1, split1, cores1, fake1 = cpu_ticks(t.pid), thread_split(t.pid), core_times(), self.lab.fake_stats()
        n = r["requests"]
        per_req = [(a - b) / n if n else None for a, b in zip(split1, split0, strict=True)]
        upstream = (fake1["creates"] + fake1["polls"]) - (fake0["creates"] + fake0["polls"])
        row = Row(
            target=t.name,
            route=route,
            conns=conns,
            rps=n / (r["duration_us"] / 1e6),
            p50_ms=r["p50_us"] / 1000,
            p99_ms=r["p99_us"] / 1000,
            raw_p50_ms=r["raw_p50_us"] / 1000,
            raw_p99_ms=r["raw_p99_us"] / 1000,
            cpu_us=(ticks1 - ticks0) / CLK_TCK * 1e6 / n if n else None,
            rss_mb=vm_kb(t.pid, "VmHWM") / 1024,
            errors=sum(r[k] for k in WRK_ERRORS),
            requests=n,
            upstream_per_req=None if t.kind == "direct" else (upstream / n if n else None),
            proxy_core_pct=busy_pct(cores0, cores1, self.lab.proxy_core),
            load_core_pct=busy_pct(cores0, cores1, load_core),
            loop_cpu_us=per_req[0] and per_req[0] / CLK_TCK * 1e6,
            other_cpu_us=per_req[1] and per_req[1] / CLK_TCK * 1e6,
            switches_per_req=per_req[2],
            round=round_no,
        )
        say(
            f"{t.name:26} {route:6} c={conns:<3} {row.rps:9.0f} req/s  p50 {row.p50_ms:7.3f} ms  "
            f"p99 {row.p99_ms:7.3f} ms  cpu {row.cpu_us or 0:7.1f} us/req  errors {row.errors}"
        )
        self.rows.append(row)
        return row

    def memory_run(self, p: Proc, port: int, db: Path, n: int) -> None:
        """RSS of a fresh gateway (p, on port, writing db) while n creates go through it."""
        start_rss = vm_kb(p.pid, "VmRSS") / 1024
        say(f"memory run: {n} creates through a fresh gateway")
        started = time.monotonic()
        samples, out = self.sample_rss(p, port, n, start_rss)
        elapsed = time.monotonic() - started
        result = wrk_result(out) or {}
        time.sleep(2.0)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            tasks = c.execute("SELECT COUNT(*) FROM tasks WHERE task_id IS NOT NULL").fetchone()[0]
        self.memory = {
            "tasks": tasks,
            "requests": result.get("requests", 0),
            "errors": sum(result.get(k, 0) for k in WRK_ERRORS),
            "seconds": elapsed,
            "start_mb": start_rss,
            "end_mb": vm_kb(p.pid, "VmRSS") / 1024,
            "peak_mb": vm_kb(p.pid, "VmHWM") / 1024,
            "samples": samples,
            "target": n,
        }
        say(
            f"memory run: {tasks} tasks in {elapsed:.0f} s, RSS {start_rss:.1f} → "
            f"{self.memory['end_mb']:.1f} MB (peak {self.memory['peak_mb']:.1f} MB)"
        )

    def sample_rss(self, p: Proc, port: int, n: int, start_rss: float) -> tuple[list[tuple[int, float]], str]:
        """(created so far, RSS MB) every second while wrk creates n tasks; and wrk's output."""
        created0 = self.lab.fake_stats()["creates"]
        # Each wrk thread stops itself after its share (create.lua's third argument), but wrk's
        # main thread sleeps out -d: it is interrupted (SIGINT: it then reports) once creates stop.
        cmd = [
            *taskset(self.lab.load_core),
            "wrk",
            "-t2",
            "-c32",
            f"-d{MEMORY_RUN_MAX_S}s",
            "--timeout",
            "5s",
            "-s",
            str(BENCH / "create.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            CREATE_PATH,
            USER_KEY,
            str((n + 1) // 2),
        ]
        load = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "BENCH_CONNECTIONS": "32"},
        )
        samples = [(0, start_rss)]
        try:
            while load.poll() is None:
                time.sleep(1.0)
                done = self.lab.fake_stats()["creates"] - created0
                samples.append((done, vm_kb(p.pid, "VmRSS") / 1024))
                stalled = len(samples) > 3 and samples[-3][0] == done
                if done >= n or stalled:
                    load.send_signal(signal.SIGINT)
                    load.wait(30)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait(5)
        return samples, load.stdout.read() if load.stdout else ""

    def profile(self, t: Target) -> None:
        """py-spy on t while wrk runs creates, then polls, at 32 connections."""
        if shutil.which("py-spy") is None:
            self.lab.unavailable["profile"] = "py-spy is not installed (pip install py-spy)"
            return
        for route in ("create", "poll"):
            out = self.lab.work / f"profile-{t.name}-{route}.folded"
            script, sargs = wrk_args(route, t.ids_file)
            # --nonblocking: py-spy reads stacks without pausing the gateway, and its idle detection
            # (thread state) then works; a paused process looks busy everywhere.
            spy = subprocess.Popen(
                [
                    *taskset(self.lab.load_core),
                    "py-spy",
                    "record",
                    "--pid",
                    str(t.pid),
                    "--rate",
                    "250",
                    "--duration",
                    str(max(1, round(self.duration))),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--full-filenames",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
            wrk(script, t.port, sargs, 32, self.duration, self.lab.load_core)
            spy.wait(60)
            if out.exists():
                self.profiles[f"{t.name} {route}"] = out
                say(f"profile of {route}s under 32 connections: {out}")
