"""Real processes on loopback ports: the simulator and gateways, started, restarted and killed by tests."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from tests import procs
from tests.procs import free_port, wait_http  # the e2e tests import these two from here too

KEYS = {"key-a": "th-sim-key-aaaaaaaa1111", "key-b": "th-sim-key-bbbbbbbb2222", "key-c": "th-sim-key-cccccccc3333"}
ADMIN_TOKEN = "admin-token-for-tests"
METRICS_TOKEN = "metrics-token-for-tests"


class Process(procs.Process):
    """A test's child process, whose log is read back as JSON lines."""

    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed; a line that is not JSON fails the test that reads it.
        The gateway writes its lines in batches at most 50 ms apart: what happened before this call is in."""
        time.sleep(LOG_BATCH_S)
        out = []
        for raw in self.log_path.read_text().splitlines():
            if raw.strip():
                out.append(json.loads(raw))
        return out


class Simulator(Process):
    def __init__(self, tmp: Path, task_seconds: float = 2.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "gateway.simulator", "--port", str(self.port),
                          "--task-seconds", str(task_seconds)], tmp / f"simulator-{self.port}.log")

    def start(self) -> None:
        super().start()
        wait_http(self.url + "/_sim/requests", proc=self.proc)

    def fault(self, key: str, mode: str, **kw: Any) -> None:
        httpx.post(self.url + "/_sim/faults", json={"key": KEYS.get(key, key), "mode": mode, **kw}).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(self.url + "/_sim/faults").raise_for_status()

    def requests(self, route: str | None = None) -> list[dict[str, Any]]:
        data = httpx.get(self.url + "/_sim/requests").json()["data"]
        return [r for r in data if route is None or r["route"] == route]

    def clear_requests(self) -> None:
        httpx.delete(self.url + "/_sim/requests").raise_for_status()

    def task(self, task_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_sim/tasks/{task_id}").json()


def key_name_of(value: str) -> str:
    return next(name for name, v in KEYS.items() if v == value)


@dataclass
class Gateway(Process):
    """A `tokenhub-gateway serve` process with a generated config; users get fresh keys."""

    tmp: Path = field(default=Path("."))
    upstream_url: str = ""
    teams: dict[str, dict[str, Any]] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    store_url: str | None = None
    name: str = "gw"

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = self.url + "/api/v1"
        self.config_path = self.tmp / f"{self.name}-{self.port}.toml"
        self.user_keys = {u: f"tgw-test-{u}-{hashlib.sha256(u.encode()).hexdigest()[:16]}" for u in self.users}
        env = {f"TEST_KEY_{n.upper().replace('-', '_')}": v for n, v in KEYS.items()}
        env.update(GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN)
        self.write_config()
        Process.__init__(self, [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config_path),
                                "--host", "127.0.0.1", "--port", str(self.port)],
                         self.tmp / f"{self.name}-{self.port}.log", env)

    def config(self) -> dict[str, Any]:
        keys = self.keys or [{"name": "key-a"}]
        upstream = {"base_url": self.upstream_url + "/api/v1", "timeout_s": 5, "connect_timeout_s": 1,
                    "cooldown_s": 1, "breaker_open_s": 1,
                    "keys": [{"value_env": f"TEST_KEY_{k['name'].upper().replace('-', '_')}", **k} for k in keys]}
        users = {u: {**spec, "key_sha256": hashlib.sha256(self.user_keys[u].encode()).hexdigest()}
                 for u, spec in self.users.items()}
        store = self.store_url or f"sqlite:///{self.tmp / (self.name + '.db')}"
        data: dict[str, Any] = {"server": {"admin_token_env": "GATEWAY_ADMIN_TOKEN", "shutdown_grace_s": 5},
                                "upstream": upstream, "store": {"url": store},
                                "poller": {"interval_s": 1}, "teams": self.teams, "users": users}
        for section, values in self.extra.items():
            data[section] = {**data.get(section, {}), **values}
        return data

    def write_config(self) -> None:
        self.config_path.write_text(tomli_w.dumps(self.config()))

    def start(self) -> None:
        Process.start(self)
        self.wait_http(self.url + "/healthz")

    def restart(self, kill: bool = False) -> None:
        self.kill() if kill else self.stop()
        self.start()

    def client(self, user: str, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.user_keys[user]}"},
                            timeout=kw.pop("timeout", 15.0), **kw)

    def aclient(self, user: str, **kw: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=kw.pop("max_connections", 200))
        return httpx.AsyncClient(base_url=self.api, headers={"Authorization": f"Bearer {self.user_keys[user]}"},
                                 timeout=kw.pop("timeout", 30.0), limits=limits, **kw)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             timeout=15.0, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of one metric whose labels include the given ones."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "doubao-seedance-2.0", "prompt": "A red fox running through snow", **kw}


LOG_BATCH_S = 0.2  # gateway.logs.Batched.FLUSH_EVERY_S, and a margin for a busy machine


def wait_until(check: Any, timeout: float = 15.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
