"""The app on SQLite or Redis with a config team `red` (its team admin `alice`, its member `mel`) and the
operator's token, for the tests of /admin/teams, /admin/users, /admin/api-keys and /admin/audit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.store.redis.store import RedisStore
from tests.doubles import FakeClock, FakeUpstream, body, make_settings

ADMIN_TOKEN = "adm-tenancy-test-token"
ALICE_KEY = "tgw-config-key-of-alice-team-admin"
MEL_KEY = "tgw-config-key-of-mel-member"
CONFIG_TEAMS = {"red": {"budget_usd": 100.0, "period": "day"}}
CONFIG_USERS = {
    "alice": {"team": "red", "key": ALICE_KEY, "role": "team_admin", "email": "alice@example.com"},
    "mel": {"team": "red", "key": MEL_KEY},
}


class Tenancy:
    """The app's client, the fake clock, and calls as the operator or as a gateway key."""

    def __init__(self, client: TestClient, clock: FakeClock, upstream: FakeUpstream) -> None:
        self.client = client
        self.clock = clock
        self.upstream = upstream

    def op(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.by(ADMIN_TOKEN, method, path, **kw)

    def by(self, key: str, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def ok(self, answer: httpx.Response, status: int = 200) -> Any:
        assert answer.status_code == status, answer.text
        return answer.json()

    def team(self, name: str, **limits: Any) -> dict[str, Any]:
        return self.ok(self.op("POST", "/admin/teams", json={"name": name, **limits}), 201)

    def user(self, name: str, team: str, **fields: Any) -> dict[str, Any]:
        return self.ok(self.op("POST", "/admin/users", json={"name": name, "team": team, **fields}), 201)

    def key(self, user: str, **fields: Any) -> dict[str, Any]:
        return self.ok(self.op("POST", f"/admin/users/{user}/keys", json=fields), 201)

    def create(self, key: str) -> httpx.Response:
        """A video create with this gateway key."""
        return self.by(key, "POST", "/v1/videos/generations", json=body())

    def audit(self, key: str | None = None, **query: Any) -> list[dict[str, Any]]:
        """Every audit row the caller may see, through every page."""
        rows: list[dict[str, Any]] = []
        after = None
        while True:
            params = {**query, **({"after": after} if after else {})}
            answer = (
                self.by(key, "GET", "/admin/audit", params=params)
                if key
                else self.op("GET", "/admin/audit", params=params)
            )
            page = self.ok(answer)
            rows += page["data"]
            after = page["next_after"]
            if not page["has_more"]:
                return rows


def error_of(answer: httpx.Response) -> tuple[int, str, str | None]:
    error = answer.json()["error"]
    return answer.status_code, error["code"], error["param"]


def tenancy_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    """The app on the store `request.param` names ("sqlite" or "redis"), its lifespan run."""
    store = None
    url = f"sqlite:///{tmp_path / 'tenancy.db'}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"tenancy:{uuid.uuid4().hex[:8]}:")
    settings = make_settings(
        url,
        teams=CONFIG_TEAMS,
        users=CONFIG_USERS,
        server={"admin_token_env": "ADMIN_TOKEN"},
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
    )
    upstream = FakeUpstream()
    clock = FakeClock(time.time())  # Redis stamps records with its own clock: keep ours near it
    app = create_app(settings, upstream=upstream, store=store, clock=clock, run_poller=False)
    with TestClient(app, base_url="http://gw") as client:
        yield Tenancy(client, clock, upstream)
