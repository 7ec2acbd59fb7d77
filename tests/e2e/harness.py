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
    """A `python -m gateway.simulator` process, and its control API (SPEC §7; gateway/simulator.py)."""

    def __init__(
        self, tmp: Path, task_seconds: float = 2.0, media_ttl_s: float | None = None, video_size: int | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = [
            *(["--media-ttl-s", str(media_ttl_s)] if media_ttl_s is not None else []),
            *(["--video-size", str(video_size)] if video_size is not None else []),
        ]
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway.simulator",
                "--port",
                str(self.port),
                "--task-seconds",
                str(task_seconds),
                *flags,
            ],
            tmp / f"simulator-{self.port}.log",
        )

    def start(self) -> None:
        super().start()
        wait_http(self.url + "/_sim/requests", proc=self.proc)

    def fault(self, key: str, mode: str, **kw: Any) -> None:
        """Any fault mode of gateway/sim_faults.py; key is a KEYS name, a key value or "*" (every key)."""
        httpx.post(self.url + "/_sim/faults", json={"key": KEYS.get(key, key), "mode": mode, **kw}).raise_for_status()

    def script_poll(self, task_id: str | None = None, *, key: str = "*", count: int | None = 1, **answer: Any) -> None:
        """The next `count` polls of a task (None: of every task) answer `status` and one of `body` (any JSON),
        `raw` (text sent as is: NaN, cut JSON) or `patch` (a JSON merge patch over the real answer: null
        removes a key); count None: until cleared."""
        scope = {"task_id": task_id} if task_id else {}
        self.fault(key, "answer", routes=["poll"], count=count, **scope, **answer)

    def fixed_id(self, key: str, task_id: str, count: int | None = 1) -> None:
        """Creates answer `task_id` (a duplicate when it is taken) and still create their task."""
        self.fault(key, "fixed_id", id=task_id, count=count)

    def late_create(self, key: str, delay_s: float, count: int | None = 1) -> None:
        """Creates make their task at once and answer after `delay_s` (nothing, if the client left first)."""
        self.fault(key, "late", routes=["create"], delay_s=delay_s, count=count)

    def create_then_fail(self, key: str, status: int = 502, count: int | None = 1) -> None:
        """Creates make their task, then answer `status` with an error body."""
        self.fault(key, "answer", routes=["create"], status=status, count=count)

    def cut(self, key: str, routes: tuple[str, ...] = ("create",), count: int | None = 1) -> None:
        """Answers stop halfway through their body and the connection closes (a create still creates);
        routes ("media",) with key "*" cuts downloads."""
        self.fault(key, "cut", routes=list(routes), count=count)

    def clear_faults(self) -> None:
        """Every fault off, and the result-file settings back to the start-up ones, so no test leaks into the next."""
        httpx.delete(self.url + "/_sim/faults").raise_for_status()
        httpx.delete(self.url + "/_sim/media").raise_for_status()

    def requests(self, route: str | None = None) -> list[dict[str, Any]]:
        data = httpx.get(self.url + "/_sim/requests").json()["data"]
        return [r for r in data if route is None or r["route"] == route]

    def creates(self) -> list[dict[str, Any]]:
        """Every create received: "created" the id of the task it made (None: none), "task_id" the id answered,
        "status" (None: no answer sent), "answer" sent / cut / none, "fault", "key", "time"."""
        return httpx.get(self.url + "/_sim/creates").json()["data"]

    def created_task_ids(self) -> list[str]:
        """The tasks that exist upstream (and cost money), whatever their creates answered."""
        return [c["created"] for c in self.creates() if c["created"]]

    def downloads(self) -> list[dict[str, Any]]:
        """Requests for result files (video and cover URLs), with their Range header and status."""
        return httpx.get(self.url + "/_sim/downloads").json()["data"]

    def clear_requests(self) -> None:
        """Both the API request log and the download log."""
        httpx.delete(self.url + "/_sim/requests").raise_for_status()

    def media(self, ttl_s: float | None = None, video_size: int | None = None) -> dict[str, Any]:
        """Result-file settings: ttl_s 0 expires every URL handed out (403); video_size is for tasks created next."""
        settings = {k: v for k, v in (("ttl_s", ttl_s), ("video_size", video_size)) if v is not None}
        r = httpx.post(self.url + "/_sim/media", json=settings)
        r.raise_for_status()
        return r.json()

    def expected_bytes(self, task_id: str, variant: str = "video") -> bytes:
        """The exact bytes of a task's video or cover (variant "cover")."""
        from gateway.simulator.app import cover_bytes, video_bytes

        return cover_bytes(task_id) if variant == "cover" else video_bytes(task_id, self.task(task_id)["video_size"])

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
        Process.__init__(
            self,
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            self.tmp / f"{self.name}-{self.port}.log",
            env,
        )

    def config(self) -> dict[str, Any]:
        keys = self.keys or [{"name": "key-a"}]
        upstream = {
            "base_url": self.upstream_url + "/api/v1",
            "timeout_s": 5,
            "connect_timeout_s": 1,
            "cooldown_s": 1,
            "breaker_open_s": 1,
            # The simulator's address, and no more of loopback: a canary on 127.0.0.2 stays out of reach.
            "media_allow_networks": ["127.0.0.1/32"],
            "keys": [{"value_env": f"TEST_KEY_{k['name'].upper().replace('-', '_')}", **k} for k in keys],
        }
        users = {
            u: {**spec, "key_sha256": hashlib.sha256(self.user_keys[u].encode()).hexdigest()}
            for u, spec in self.users.items()
        }
        store = self.store_url or f"sqlite:///{self.tmp / (self.name + '.db')}"
        data: dict[str, Any] = {
            "server": {"admin_token_env": "GATEWAY_ADMIN_TOKEN", "shutdown_grace_s": 5},
            "upstream": upstream,
            "store": {"url": store},
            "poller": {"interval_s": 1},
            "teams": self.teams,
            "users": users,
        }
        for section, values in self.extra.items():
            data[section] = values if isinstance(values, list) else {**data.get(section, {}), **values}
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
        return httpx.Client(
            base_url=self.api,
            headers={"Authorization": f"Bearer {self.user_keys[user]}"},
            timeout=kw.pop("timeout", 15.0),
            **kw,
        )

    def aclient(self, user: str, **kw: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=kw.pop("max_connections", 200))
        return httpx.AsyncClient(
            base_url=self.api,
            headers={"Authorization": f"Bearer {self.user_keys[user]}"},
            timeout=kw.pop("timeout", 30.0),
            limits=limits,
            **kw,
        )

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, self.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=15.0, **kw
        )

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
