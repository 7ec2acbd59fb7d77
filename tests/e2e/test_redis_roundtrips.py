"""What a create and a poll cost in round trips to Redis (SPEC §14), counted on the wire: the app in-process
with a fake upstream, on a real redis-server, through a connection class that notes every send.

A create is its admission (admission, key choice, key health and rate windows in one script) and the record
of its task; a poll of a terminal task costs none; a process that has never seen a task reads it once."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from redis.asyncio import Connection
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store.redis.prelude import PRELUDE
from gateway.store.redis.scripts import SCRIPTS
from gateway.store.redis.store import RedisStore
from gateway.upstream.client import Reply
from tests.doubles import USER_KEY, FakeUpstream, make_settings

SCRIPT_OF = {hashlib.sha1((PRELUDE + body).encode()).hexdigest().encode(): name for name, body in SCRIPTS.items()}
CREATE = "/v1/videos/generations"
RPM = 100


def round_trip_of(command: Any) -> str:
    """A send's first command, by script name for EVALSHA/EVAL ("pipeline" marks several in one send)."""
    raw = command if isinstance(command, bytes) else b"".join(bytes(c) for c in command)
    parts = raw.split(b"\r\n")
    name = parts[2].upper().decode()
    if name == "EVALSHA":
        name = SCRIPT_OF.get(parts[4], "unknown script")
    return name + (" (pipeline)" if raw.count(b"\r\n*") else "")


def counting(sent: list[str]) -> type[Connection]:
    class Counting(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(round_trip_of(command))
            await super().send_packed_command(command, check_health)

    return Counting


def settings(url: str) -> Settings:
    limits = {"budget_usd": 1000.0, "requests_per_minute": RPM, "max_concurrent_tasks": 100}
    return make_settings(
        url,
        keys={"a": "th-unit-upstream-key-000a", "b": "th-unit-upstream-key-000b"},
        teams={"red": limits},
        users={"alice": {"team": "red", "key": USER_KEY, **limits}},
    )


def gateway(url: str, prefix: str, upstream: FakeUpstream, sent: list[str]) -> TestClient:
    # rate_cache_s: the test's polls must not depend on how fast a busy machine runs them
    store = RedisStore(url, prefix, connection_class=counting(sent), rate_cache_s=60)
    app = create_app(settings(url), upstream=upstream, store=store, run_poller=False)
    return TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"})


BACKGROUND = frozenset({"clock", "HELLO", "CLIENT", "SUBSCRIBE", "GET", "roster_changes"})


def without_clock(sent: list[str]) -> list[str]:
    """Not per request, so left out: the store reads Redis's clock every few seconds, and the roster's
    background wait subscribes on a connection of its own and reads the roster version (GET) every second."""
    return [s for s in sent if s not in BACKGROUND]


def test_a_create_is_two_round_trips_and_a_terminal_poll_none(redis_url):
    prefix, upstream = f"{{rt-{uuid.uuid4().hex[:8]}}}:", FakeUpstream()
    sent: list[str] = []
    with gateway(redis_url, prefix, upstream, sent) as client:
        assert client.post(CREATE, json={"model": "doubao-seedance-2.0", "prompt": "a fox"}).status_code == 200
        sent.clear()
        replies = [client.post(CREATE, json={"model": "doubao-seedance-2.0", "prompt": "a fox"}) for _ in range(5)]
        assert [r.status_code for r in replies] == [200] * 5
        assert without_clock(sent) == ["admit", "record_created"] * 5, sent
        # the rate headers come from the admission itself, exact
        assert replies[-1].headers["x-ratelimit-remaining-requests"] == str(RPM - 6)

        tid = replies[0].json()["id"]
        upstream.finish(tid)
        sent.clear()
        assert client.get(f"{CREATE}/{tid}").json()["status"] == "succeeded"
        assert without_clock(sent) == ["settle"], sent
        sent.clear()
        for _ in range(3):
            response = client.get(f"{CREATE}/{tid}")
            assert response.json()["status"] == "succeeded"
            assert response.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert without_clock(sent) == [], sent

        running = replies[1].json()["id"]
        client.get(f"{CREATE}/{running}")
        sent.clear()
        for _ in range(3):  # coalesced: answered from the last upstream answer, no store read either
            assert client.get(f"{CREATE}/{running}").json()["status"] == "queued"
        assert without_clock(sent) == [], sent

    other: list[str] = []  # another process (a second worker or replica) that never saw the task
    with gateway(redis_url, prefix, upstream, other) as c2:
        other.clear()
        assert c2.get(f"{CREATE}/{tid}").json()["status"] == "succeeded"
        assert sorted(without_clock(other)) == sorted(["get"] + ["ZCOUNT (pipeline)"] * 2), other
        other.clear()
        for _ in range(3):
            assert c2.get(f"{CREATE}/{tid}").json()["status"] == "succeeded"
        assert without_clock(other) == [], other


def test_a_failed_first_key_costs_the_fallback_its_own_round_trips(redis_url):
    """Only when the key the admission took fails (a 429 here) does a create read the pool and take another slot."""
    prefix, upstream = f"{{rt-{uuid.uuid4().hex[:8]}}}:", ThrottlingUpstream()
    sent: list[str] = []
    with gateway(redis_url, prefix, upstream, sent) as client:
        sent.clear()
        response = client.post(CREATE, json={"model": "doubao-seedance-2.0", "prompt": "a fox"})
        assert response.status_code == 200, response.text
        # the 429 saved as the key's health, its slot given back, the pool's load read, the other key's slot
        assert without_clock(sent) == ["admit", "HSET", "release_key", "HGETALL", "acquire_key", "record_created"], sent
    assert len({key for method, _, key in upstream.calls if method == "POST"}) == 2


class ThrottlingUpstream(FakeUpstream):
    """The first create answers 429, whatever its key: the gateway moves it to the other key."""

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Any:
        if method == "POST" and not any(m == "POST" for m, _, _ in self.calls):
            self.calls.append((method, path, key))
            return Reply(429, b'{"error": {"message": "slow down"}}', "5", 0.001)
        return await super().call(method, path, key, body)
