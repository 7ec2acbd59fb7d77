"""The processes of a benchmark run: the fake upstream and every proxy under test, each pinned to its core,
started with its log in the run's work directory, waited for, and stopped on every way out."""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_config import CREATE_PATH, USER_KEY, gateway_toml, upstream_key_env
from source import ROOT, code_fingerprint

if str(ROOT) not in sys.path:  # run as `python bench/run.py`: the repo root is not on the path
    sys.path.insert(0, str(ROOT))

from tests.procs import Process, free_port, wait_port  # noqa: E402 - needs the repo root on the path

BENCH = Path(__file__).resolve().parent
POLL_IDS = 1000
CLIENTS = ("aiohttp", "httpx", "httpx-aiohttp")
NO_HTTPX_AIOHTTP = "httpx-aiohttp is not installed (pip install httpx-aiohttp)"


def taskset(core: int | None) -> list[str]:
    """The prefix that pins a command to one core (none when nothing is pinned)."""
    return ["taskset", "-c", str(core)] if core is not None else []


class Proc(Process):
    """A child process pinned to one core, started at once; stopped by Procs, which every exit path reaches.
    It runs in `src` with `src` first on PYTHONPATH, so `gateway` is imported from there."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log: Path,
        core: int | None,
        env: dict[str, str] | None = None,
        src: Path = ROOT,
    ) -> None:
        super().__init__([*taskset(core), *args], log, {"PYTHONPATH": str(src), **(env or {})}, src)
        self.name = name
        self.start()
        assert self.proc is not None
        self.pid = self.proc.pid  # taskset execs the command: the same pid


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


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


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
class Lab:
    """Starts the fake upstream and the targets in front of it; what could not be started is said in
    `unavailable`, and the gateway code each gateway started with in `fingerprints`."""

    work: Path
    proxy_core: int | None
    load_core: int | None
    src: Path = ROOT
    procs: Procs = field(default_factory=Procs)
    fake: Proc | None = None
    fake_port: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)

    def start_fake(self) -> None:
        self.fake_port = free_port()
        self.fake = self.procs.start(
            "fake-upstream",
            [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(self.fake_port)],
            self.work / "fake-upstream.log",
            self.load_core,
        )
        self.fake.wait_http(f"http://127.0.0.1:{self.fake_port}/_stats", 30)

    def fake_stats(self) -> dict[str, int]:
        return json.loads(request(self.fake_port, "GET", "/_stats")[1])

    def stop_targets(self) -> None:
        """Every target stops; the fake upstream stays up (the memory run uses it)."""
        for p in list(self.procs.running):
            if p is not self.fake:
                self.procs.stop(p)

    def direct_target(self) -> Target:
        assert self.fake is not None
        t = Target(
            "direct",
            self.fake_port,
            self.fake.pid,
            "direct",
            note="the fake upstream itself, sharing the load core with wrk",
        )
        t.ids_file = self.synthetic_ids(t)
        return t

    def bare_target(self, client: str) -> Target | None:
        name = f"bare-{client}"
        if client == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            self.unavailable[name] = NO_HTTPX_AIOHTTP
            return None
        port = free_port()
        p = self.procs.start(
            name,
            [
                sys.executable,
                str(BENCH / "passthrough.py"),
                "--client",
                client,
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{self.fake_port}",
            ],
            self.work / f"{name}.log",
            self.proxy_core,
        )
        p.wait_http(f"http://127.0.0.1:{port}/healthz", 30)
        t = Target(name, port, p.pid, "bare", client)
        t.ids_file = self.synthetic_ids(t)
        return t

    def start_gateway(
        self, name: str, store_url: str, client: str = "aiohttp", rpm: bool = True, src: Path | None = None
    ) -> tuple[Proc, int]:
        src = src or self.src
        port = free_port()
        config = self.work / f"{name}.toml"
        config.write_text(gateway_toml(port, self.fake_port, store_url, rpm))
        if client == "aiohttp":  # the shipped client, through the real command line
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
        else:
            cmd = [sys.executable, str(BENCH / "gateway_serve.py"), "--config", str(config), "--client", client]
        self.fingerprints[name] = code_fingerprint(src)
        p = self.procs.start(name, cmd, self.work / f"{name}.log", self.proxy_core, upstream_key_env(), src)
        p.wait_http(f"http://127.0.0.1:{port}/healthz", 30)
        return p, port

    def gateway_target(
        self, name: str, store_url: str, client: str = "aiohttp", rpm: bool = True, src: Path | None = None
    ) -> Target | None:
        if client == "httpx-aiohttp" and importlib.util.find_spec("httpx_aiohttp") is None:
            self.unavailable[name] = NO_HTTPX_AIOHTTP
            return None
        p, port = self.start_gateway(name, store_url, client, rpm, src)
        t = Target(name, port, p.pid, "gateway", client)
        t.ids_file = self.gateway_ids(t)
        return t

    def redis_target(self) -> Target | None:
        name = "gateway-redis"
        if not self.redis_available(name):
            return None
        return self.gateway_target(name, f"redis://127.0.0.1:{self.redis_server()}/0")

    def redis_sentinel_target(self) -> Target | None:
        """A master, a replica of it and one sentinel (all on the load core): the gateway finds the master
        through the sentinel and, as with every Sentinel URL, waits for the replica (WAIT 1) on its writes."""
        name = "gateway-redis-sentinel"
        if not self.redis_available(name):
            return None
        master = self.redis_server()
        self.redis_server("--replicaof", "127.0.0.1", str(master))
        port = free_port()
        conf = self.work / f"sentinel-{port}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.work}\nsentinel monitor bench 127.0.0.1 {master} 1\n")
        sentinel = self.procs.start(
            "redis-sentinel",
            ["redis-server", str(conf), "--sentinel"],
            self.work / f"sentinel-{port}.log",
            self.load_core,
        )
        wait_port(port, 10, sentinel.proc)
        return self.gateway_target(name, f"redis+sentinel://127.0.0.1:{port}/bench/0")

    def redis_available(self, name: str) -> bool:
        store = self.src / "gateway" / "store"
        if not ((store / "redis.py").exists() or (store / "redis" / "store.py").exists()):
            self.unavailable[name] = "the gateway has no Redis store yet (gateway/store/redis/)"
            return False
        if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
            self.unavailable[name] = "needs redis-server (apt-get install -y redis-server) and redis-py"
            return False
        return True

    def redis_server(self, *extra: str) -> int:
        """A redis-server on the load core; its port."""
        port = free_port()
        redis = self.procs.start(
            f"redis-server-{port}",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.work),
                "--dbfilename",
                f"{port}.rdb",
                *extra,
            ],
            self.work / f"redis-{port}.log",
            self.load_core,
        )
        wait_port(port, 10, redis.proc)
        return port

    # the ids polls rotate through

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
