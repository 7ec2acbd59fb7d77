"""What bench/soak.py runs against: the simulator, a webhook receiver that fails some deliveries, (a Redis,)
and the gateway with every feature on, each on a free loopback port, its log in the work directory."""

from __future__ import annotations

import base64
import hashlib
import random
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from tests.procs import Process, free_port

ADMIN_TOKEN = "adm-soak-token"
UPSTREAM_KEYS = {"key-a": "th-soak-key-aaaa1111", "key-b": "th-soak-key-bbbb2222", "key-c": "th-soak-key-cccc3333"}
TEAMS: dict[str, dict[str, Any]] = {
    "studio": {},
    "ads": {"budget_usd": 1_000_000.0},
    "social": {"requests_per_minute": 600, "max_concurrent_tasks": 200},
    "labs": {"video_seconds": 100_000_000},
}
USERS = {f"{team}-{n}": team for team in TEAMS for n in (1, 2)}
WEBHOOK_FAILURE = 0.2  # the share of deliveries the receiver answers 500
UPSTREAM_TIMEOUT_S = 3  # a hung upstream request ends as a timeout this soon
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"soak-webhook-secret-0123456789ab").decode()


def user_key(user: str) -> str:
    return "tgw-soak-" + hashlib.sha256(user.encode()).hexdigest()[:32]


class Receiver:
    """Webhook deliveries on loopback: a fifth answered 500 (the gateway retries them), the rest 204."""

    def __init__(self) -> None:
        self.received = 0
        self.failed = 0
        self._rng = random.Random(7)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    fail = receiver._rng.random() < WEBHOOK_FAILURE
                    receiver.received += 1
                    receiver.failed += fail
                self.send_response(500 if fail else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def gateway_config(port: int, sim_url: str, store_url: str, webhook_url: str, archive: Path | None) -> dict[str, Any]:
    """The soak's gateway: three keys, four teams, the archive (unless None) and a webhook endpoint."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": "SOAK_ADMIN_TOKEN"},
        "upstream": {
            "base_url": sim_url + "/api/v1",
            "connect_timeout_s": 2,
            "timeout_s": UPSTREAM_TIMEOUT_S,
            "cooldown_s": 2,
            "breaker_failures": 5,
            "breaker_open_s": 3,
            "media_allow_networks": ["127.0.0.1/32"],
            "keys": [
                {"name": name, "value_env": f"SOAK_KEY_{n}", "max_concurrent_tasks": 2000}
                for n, name in enumerate(UPSTREAM_KEYS)
            ],
        },
        "store": {"url": store_url},
        "poller": {"interval_s": 3},
        "webhooks": [{"name": "soak", "url": webhook_url, "secret_env": "SOAK_WEBHOOK_SECRET", "retry_initial_s": 1}],
        "teams": TEAMS,
        "users": {
            user: {"team": team, "key_sha256": hashlib.sha256(user_key(user).encode()).hexdigest()}
            for user, team in USERS.items()
        },
    }
    if archive is not None:
        config["archive"] = {"dir": str(archive)}
    return config


def gateway_env() -> dict[str, str]:
    """The variables the config names: the admin token, the webhook secret, the upstream keys."""
    env = {"SOAK_ADMIN_TOKEN": ADMIN_TOKEN, "SOAK_WEBHOOK_SECRET": WEBHOOK_SECRET}
    return env | {f"SOAK_KEY_{n}": value for n, value in enumerate(UPSTREAM_KEYS.values())}


class Lab:
    """`src`: the checkout whose gateway (and simulator) runs, e.g. a `git archive` snapshot."""

    def __init__(self, work: Path, store: str, traced: bool, src: Path) -> None:
        self.work = work
        self.store = store
        self.src = src
        self.snapshots = work / "snapshots" if traced else None
        self.sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.receiver = Receiver()
        self.redis: Any = None
        self.sim = Process(
            [
                sys.executable,
                *("-m", "gateway.simulator", "--port", str(self.sim_port), "--task-seconds", "1"),
                *("--video-size", "4096", "--media-ttl-s", "3600"),
            ],
            work / "simulator.log",
            {"PYTHONPATH": str(src)},
            src,
        )
        self.gateway: Process | None = None

    def __enter__(self) -> Lab:
        try:
            self.sim.start()
            self.sim.wait_http(self.sim_url + "/_sim/faults")
            self.receiver.start()
            store_url = f"sqlite:///{self.work / 'gateway.db'}"
            if self.store == "redis":
                from tests.redis_server import RedisServer

                self.redis = RedisServer()
                store_url = self.redis.start()
            config = self.work / "gateway.toml"
            config.write_text(tomli_w.dumps(self.config(store_url)))
            harness = (
                [str(Path(__file__).parent / "soak_gateway.py"), "--snapshots", str(self.snapshots)]
                if self.snapshots
                else ["-m", "gateway.cli", "serve"]
            )
            env = gateway_env() | {"PYTHONPATH": str(self.src)}
            command = [sys.executable, *harness, "--config", str(config)]
            self.gateway = Process(command, self.work / "gateway.log", env, self.src)
            self.gateway.start()
            self.gateway.wait_http(self.url + "/healthz", timeout=60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def config(self, store_url: str) -> dict[str, Any]:
        return gateway_config(self.port, self.sim_url, store_url, self.receiver.url, self.work / "archive")

    @property
    def gateway_pid(self) -> int:
        assert self.gateway is not None and self.gateway.proc is not None
        return self.gateway.proc.pid

    def gateway_signal(self, sig: signal.Signals) -> None:
        assert self.gateway is not None and self.gateway.proc is not None
        self.gateway.proc.send_signal(sig)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.gateway is not None:
            self.gateway.stop(timeout=30)
        self.sim.stop()
        self.receiver.stop()
        if self.redis is not None:
            self.redis.stop()
