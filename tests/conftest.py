from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tests.e2e.harness import Gateway, Simulator
from tests.moto_server import MotoServer
from tests.redis_server import RedisServer, require_redis_server

# CI replays the same bounded, seeded examples on every run; a local run explores more and keeps what fails.
hypothesis_settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    stateful_step_count=20,
    deadline=10_000,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.register_profile(
    "dev", max_examples=200, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
)


def require_binary(name: str) -> str:
    """A test that needs a missing program fails in CI and is skipped elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of the module's own (a module that needs one for the whole run overrides this)."""
    require_redis_server()
    server = RedisServer()
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = Simulator(tmp_path_factory.mktemp("sim"), task_seconds=2.0)
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """An S3-compatible server on loopback, started once per test run (tests/moto_server.py)."""
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def sim(simulator: Simulator) -> Simulator:
    """The shared simulator, with faults and its request log cleared for this test."""
    simulator.clear_faults()
    simulator.clear_requests()
    return simulator


@pytest.fixture
def make_gateway(tmp_path: Path, sim: Simulator) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(
        teams: dict[str, Any] | None = None, users: dict[str, Any] | None = None, start: bool = True, **kw: Any
    ) -> Gateway:
        kw.setdefault("upstream_url", sim.url)
        kw.setdefault("name", f"gw{len(started)}")
        gw = Gateway(
            tmp=tmp_path,
            teams=teams or {"red": {}, "blue": {}},
            users=users or {"alice": {"team": "red"}, "bob": {"team": "blue"}},
            **kw,
        )
        if start:
            gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
