"""deploy/Dockerfile, built by a real Docker engine and run as an operator would run it.

Non-root, read-only root file system, every capability dropped, the config directory mounted, on a port
other than 8080, against the simulator on the host's loopback (the container shares the host's network).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from tests.e2e.docker_engine import Engine
from tests.e2e.harness import ADMIN_TOKEN, KEYS, Simulator, body, free_port, wait_http, wait_until

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "tokenhub-gateway-test:latest"
STATE_DIR = "/var/lib/tokenhub-gateway"
GRACE_S = 5
# A cold run builds the base image and installs every dependency: far longer than a test's default.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine()
    engine.start()
    yield engine
    if engine.shared:
        engine.docker("image", "prune", "--force", check=False)  # builds superseded by this one
    engine.stop()


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    base = engine.base_image()
    build = ["build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "-f", "deploy/Dockerfile"]
    # The build stage gets a tag of its own, so pruning old images keeps its layers as the next run's cache.
    engine.docker(*build, "--target", "build", "-t", "tokenhub-gateway-test:build", str(ROOT), timeout=600)
    engine.docker(*build, "-t", IMAGE, str(ROOT), timeout=600)
    return IMAGE


class Container:
    def __init__(self, engine: Engine, config_dir: Path, upstream: str) -> None:
        self.engine, self.config_dir = engine, config_dir
        self.name = f"tokenhub-gateway-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream = upstream
        self.user_keys: dict[str, str] = {}
        self.users: dict[str, str] = {}

    def add_user(self, user: str, team: str) -> None:
        self.user_keys[user] = f"tgw-docker-{user}-{uuid.uuid4().hex}"
        self.users[user] = team

    def write_config(self) -> None:
        """Replace gateway.toml as an editor or `git checkout` does: a new file renamed over the old one."""
        users = {
            u: {"team": t, "key_sha256": hashlib.sha256(self.user_keys[u].encode()).hexdigest()}
            for u, t in self.users.items()
        }
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": self.port,
                "admin_token_env": "GATEWAY_ADMIN_TOKEN",
                "shutdown_grace_s": GRACE_S,
            },
            "upstream": {
                "base_url": self.upstream + "/api/v1",
                "timeout_s": 5,
                "keys": [{"name": "key-a", "value_env": "TOKENHUB_KEY_A"}],
            },
            "poller": {"interval_s": 1},
            "teams": {t: {} for t in set(self.users.values())},
            "users": users,
        }
        partial = self.config_dir / "gateway.toml.partial"
        partial.write_text(tomli_w.dumps(config))
        partial.chmod(0o644)
        os.replace(partial, self.config_dir / "gateway.toml")

    def run(self, image: str) -> None:
        self.engine.docker(
            "run",
            "--detach",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            f"{STATE_DIR}:uid=10001,gid=10001,mode=0700",
            "--volume",
            f"{self.config_dir}:/etc/tokenhub-gateway:ro",
            "--env",
            f"TOKENHUB_KEY_A={KEYS['key-a']}",
            "--env",
            f"GATEWAY_ADMIN_TOKEN={ADMIN_TOKEN}",
            # The image's own HEALTHCHECK command, asked every second instead of every 15 s.
            "--health-interval",
            "1s",
            "--health-start-period",
            "0s",
            "--stop-timeout",
            str(GRACE_S * 4),
            image,
        )
        try:
            wait_http(self.url + "/healthz", timeout=30)
        except TimeoutError:
            raise AssertionError(f"the container did not answer:\n{self.logs()}") from None

    def client(self, user: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url + "/api/v1", timeout=15.0, headers={"Authorization": f"Bearer {self.user_keys[user]}"}
        )

    def logs(self) -> str:
        result = self.engine.docker("logs", self.name, check=False)
        return result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def container(
    engine: Engine, image: str, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    config_dir = tmp_path_factory.mktemp("docker-config")
    config_dir.chmod(0o755)  # read by the container's uid 10001
    container = Container(engine, config_dir, simulator.url)
    container.add_user("alice", "red")
    container.write_config()
    container.run(image)
    yield container
    engine.docker("rm", "--force", container.name, check=False)


def test_the_image_holds_no_pip_setuptools_or_compiler(engine, image):
    python = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-m", "pip", "--version", check=False
    )
    assert python.returncode != 0 and "No module named pip" in python.stderr, python.stdout
    script = (
        "import importlib.util as u, os; "
        "print([m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m)], "
        "os.access('/etc/tokenhub-gateway', os.W_OK))"
    )
    found = engine.docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", script)
    assert found.stdout.strip() == "[] False"  # nor may the service user change its config
    tools = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", "command -v pip pip3 gcc cc c++ || true"
    )
    assert tools.stdout.strip() == ""


def test_the_container_runs_unprivileged_on_a_read_only_root(engine, container):
    assert engine.inspect(container.name, "{{.Config.User}}") == "10001:10001"
    status = engine.docker("exec", container.name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001" and int(fields["CapEff"], 16) == 0
    write = engine.docker("exec", container.name, "touch", "/opt/venv/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_a_create_polled_to_succeeded_and_metrics(container, sim):
    with container.client("alice") as client:
        created = client.post("/videos/generations", json=body(prompt="sim:seconds=0.5 a fox"))
        assert created.status_code == 200, created.text
        tid = created.json()["id"]
        done = wait_until(
            lambda: client.get(f"/videos/generations/{tid}").json()["status"] == "succeeded", timeout=15, interval=0.3
        )
        assert done
    assert len(sim.requests()) >= 2  # the create and at least one poll reached the simulator
    metrics = httpx.get(container.url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "tokenhub_gateway_requests_total{" in metrics.text


def test_the_healthcheck_follows_the_configured_port(engine, container):
    assert container.port != 8080

    def settled() -> str | None:
        status = engine.inspect(container.name, "{{.State.Health.Status}}")
        return None if status == "starting" else status

    status = wait_until(settled, timeout=30, interval=0.5)
    assert status == "healthy", engine.inspect(container.name, "{{json .State.Health}}")[-1500:]
    assert "healthcheck" in engine.inspect(container.name, "{{json .Config.Healthcheck.Test}}")


def test_a_replaced_config_file_is_what_a_reload_reads(container):
    container.add_user("carol", "blue")
    with container.client("carol") as client:
        assert client.get("/usage").status_code == 401
        container.write_config()
        reload = httpx.post(
            container.url + "/admin/reload", timeout=15, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert reload.status_code == 200, reload.text
        assert reload.json()["users"] == 2
        created = client.post("/videos/generations", json=body(prompt="sim:seconds=0.5 a heron"))
        assert created.status_code == 200, created.text


def test_docker_stop_drains_and_exits_zero(engine, container):
    started = time.monotonic()
    engine.docker("stop", container.name, timeout=GRACE_S * 6)
    took = time.monotonic() - started
    assert engine.inspect(container.name, "{{.State.ExitCode}}") == "0", container.logs()
    assert took < GRACE_S + 3, f"docker stop took {took:.1f} s (grace {GRACE_S} s)"
