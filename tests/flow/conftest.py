"""The app in-process over a FakeUpstream, for the task flow's tests: one store file per test, so a
second app on the same file is a gateway restarted (nothing in memory, everything in the store)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.metrics import Metrics
from tests.doubles import USER_KEY, FakeClock, FakeUpstream, make_settings

ADMIN_TOKEN = "adm-flow-test-token"
CREATE = "/v1/videos/generations"


class Running:
    """One app running: its client, upstream, clock and metrics (the app's Gateway as `gateway`)."""

    def __init__(self, client: TestClient, upstream: FakeUpstream, clock: FakeClock, metrics: Metrics) -> None:
        self.client = client
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics
        self.gateway = client.app.gateway  # type: ignore[attr-defined]

    def stop(self) -> None:
        """The app's shutdown, as a gateway process ends; its memory goes with it."""
        self.client.__exit__(None, None, None)

    def create(self, **fields: Any) -> Any:
        return self.client.post(CREATE, json={"model": "doubao-seedance-2.0", "prompt": "a fox", **fields})

    def poll(self, task_id: str) -> Any:
        return self.client.get(f"{CREATE}/{task_id}")

    def ledger(self) -> list[dict[str, Any]]:
        answer = self.client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    def stored(self, task_id: str) -> Any:
        """The task as the store holds it."""
        return self.client.portal.call(self.gateway.store.get_task, task_id)  # type: ignore[union-attr]


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Starts an app on this test's store file; each call is a fresh process's worth of memory."""
    started: list[Running] = []

    def start(upstream: FakeUpstream | None = None, **upstream_table: Any) -> Running:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'flow.db'}",
            teams={"red": {"budget_usd": 10.0}},
            upstream=upstream_table,
            server={"admin_token_env": "ADMIN_TOKEN"},
            env={"ADMIN_TOKEN": ADMIN_TOKEN},
        )
        fake = upstream or FakeUpstream()
        clock = FakeClock()
        metrics = Metrics()
        app = create_app(settings, upstream=fake, clock=clock, metrics=metrics, run_poller=False)
        client = TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"})
        client.__enter__()
        started.append(Running(client, fake, clock, metrics))
        return started[-1]

    yield start
    for running in started:
        running.stop()
