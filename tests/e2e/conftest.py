"""Fixtures of the e2e tests of the OpenAI shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import Gateway, Simulator
from tests.e2e.openai_helpers import MAX_BODY, TEAMS, USERS


@pytest.fixture(scope="module")
def openai_gw(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = Gateway(
        tmp=tmp_path_factory.mktemp("openai"),
        upstream_url=simulator.url,
        name="openai",
        teams=TEAMS,
        users=USERS,
        extra={"openai": {"poll_after_ms": 100}, "server": {"max_body_bytes": MAX_BODY}, "poller": {"interval_s": 30}},
    )
    g.start()
    yield g
    g.stop()
