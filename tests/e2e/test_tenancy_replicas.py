"""Two gateway replicas on one Redis (SPEC §15): a key issued on one is accepted on the other, a key revoked on
one is refused on the other, and a limit changed on one binds on the other, each within a second. Authentication
stays in memory: the figures measured here are the roster's propagation (Redis pub/sub, a version check as the
safety net), printed with `-s`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.harness import ADMIN_TOKEN, Gateway, body

pytestmark = pytest.mark.timeout(120)
ROUNDS = 50
IN_FORCE_S = 1.0
POLL_S = 0.002
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def until(check: Callable[[], bool], started: float, limit_s: float = 5.0) -> float:
    """Seconds from `started` (time.monotonic) until check() holds; fails past limit_s."""
    while not check():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"not in force after {limit_s} s")
        time.sleep(POLL_S)
    return time.monotonic() - started


def status_with(client: httpx.Client, key: str) -> int:
    """An authenticated route that reads nothing but the directory: GET /models."""
    return client.get("/models", headers={"Authorization": f"Bearer {key}"}).status_code


def figures(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return (
        f"{name}: n={len(seconds)} p50={statistics.median(ordered) * 1000:.1f} ms "
        f"p90={ordered[int(len(ordered) * 0.9)] * 1000:.1f} ms max={ordered[-1] * 1000:.1f} ms"
    )


def pair(make_gateway: Callable[..., Gateway], redis_url: str) -> tuple[Gateway, Gateway]:
    return make_gateway(store_url=redis_url, name="a"), make_gateway(store_url=redis_url, name="b")


def test_a_key_issued_or_revoked_on_one_replica_is_in_force_on_the_other_within_a_second(make_gateway, redis_url):
    a, b = pair(make_gateway, redis_url)
    assert a.admin("POST", "/admin/teams", json={"name": "prop"}).status_code == 201
    assert a.admin("POST", "/admin/users", json={"name": "pia", "team": "prop"}).status_code == 201
    accepted: list[float] = []
    refused: list[float] = []
    answered: list[float] = []  # how much of it was a's own answer
    with (
        httpx.Client(base_url=b.api, timeout=10) as on_b,
        httpx.Client(base_url=a.url, headers=ADMIN, timeout=10) as on_a,
    ):
        for _ in range(ROUNDS):
            started = time.monotonic()
            issued = on_a.post("/admin/users/pia/keys", json={})
            assert issued.status_code == 201, issued.text
            key_id, value = issued.json()["id"], issued.json()["key"]
            accepted.append(until(lambda value=value: status_with(on_b, value) == 200, started))
            started = time.monotonic()
            assert on_a.delete(f"/admin/api-keys/{key_id}").status_code == 200
            answered.append(time.monotonic() - started)
            refused.append(until(lambda value=value: status_with(on_b, value) == 401, started))
    print()
    print(figures("issued on a → accepted on b", accepted))
    print(figures("revoked on a → refused on b", refused))
    print(figures("revoked on a → a's answer", answered))
    assert max(accepted) <= IN_FORCE_S and max(refused) <= IN_FORCE_S, (accepted, refused)


def test_a_limit_changed_or_a_user_deleted_on_one_replica_binds_on_the_other(make_gateway, redis_url):
    a, b = pair(make_gateway, redis_url)
    assert b.admin("POST", "/admin/teams", json={"name": "lim", "budget_usd": 10}).status_code == 201
    assert b.admin("POST", "/admin/users", json={"name": "leo", "team": "lim"}).status_code == 201
    key = b.admin("POST", "/admin/users/leo/keys", json={}).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=a.api, headers=auth, timeout=10) as on_a:
        started = time.monotonic()
        until(lambda: on_a.get("/models").status_code == 200, started)
        assert on_a.post("/videos/generations", json=body()).status_code == 200  # $1.00 of $10
        started = time.monotonic()
        assert b.admin("PATCH", "/admin/teams/lim", json={"budget_usd": 1.5}).status_code == 200
        assert until(lambda: on_a.get("/usage").json()["team"]["budget_usd"] == 1.5, started) <= IN_FORCE_S
        refused = on_a.post("/videos/generations", json=body())
        assert (refused.status_code, refused.json()["error"]["code"]) == (429, "budget_exceeded")
        started = time.monotonic()
        assert b.admin("DELETE", "/admin/users/leo").status_code == 200
        assert until(lambda: on_a.get("/models").status_code == 401, started) <= IN_FORCE_S
    listed = a.admin("GET", "/admin/users", params={"team": "lim"}).json()["data"]
    assert listed == []
