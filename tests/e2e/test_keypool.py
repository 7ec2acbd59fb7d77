"""The upstream key pool end to end (SPEC §3, §5): a real gateway in front of the simulator on loopback.

Which key served a create is read from the simulator's request log, which records the key value sent."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
from typing import Any

import httpx
import pytest

from tests.e2e.harness import ADMIN_TOKEN, KEYS, body, free_port, key_name_of, wait_until
from tests.e2e.helpers import NEVER, creates, key_states, roomy

SHORT = "sim:seconds=0.2 a short fox"


def create(client: httpx.Client, prompt: str = SHORT, expect: int | None = 200) -> httpx.Response:
    response = client.post("/videos/generations", json=body(prompt=prompt))
    if expect is not None:
        assert response.status_code == expect, response.text
    return response


def create_until(
    client: httpx.Client, done: Any, prompt: str = SHORT, limit: int = 80, pause: float = 0.02
) -> list[httpx.Response]:
    """Successful creates, paced, until `done()` holds; the pool chooses keys at random."""
    made = []
    for _ in range(limit):
        made.append(create(client, prompt))
        if done():
            return made
        time.sleep(pause)
    raise AssertionError(f"condition not met after {limit} creates")


def error_of(response: httpx.Response) -> tuple[str, str]:
    err = response.json()["error"]
    return err["type"], err["code"]


# 429: cooldown


def test_throttled_key_cools_down_for_retry_after_then_recovers(make_gateway, sim):
    """key-a answers creates 429 with Retry-After: 2. Clients never see it: the create moves to key-b;
    key-a is tried at most once per 2 s cooldown; after the fault clears it serves creates again.
    The upstream request counter matches the simulator's log per key and status."""
    gw = make_gateway(keys=roomy("key-a", "key-b"))
    sim.fault("key-a", "429", retry_after=2, routes=["create"])
    with gw.client("alice") as client:
        create_until(client, lambda: creates(sim, "key-a", 429))
        assert key_states(gw)["key-a"]["state"] == "cooldown"
        assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="cooldown") == 1
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline:
            create(client)
            time.sleep(0.02)
        throttled = sorted(r["time"] for r in creates(sim, "key-a", 429))
        gaps = [b - a for a, b in zip(throttled, throttled[1:], strict=False)]
        assert all(g >= 1.9 for g in gaps), gaps
        assert not creates(sim, "key-a", 200)
        assert len(creates(sim, "key-b", 200)) >= 20

        sim.clear_faults()
        wait_until(lambda: key_states(gw)["key-a"]["state"] == "ok", timeout=4)
        assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="ok") == 1
        create_until(client, lambda: creates(sim, "key-a", 200))

    for key in ("key-a", "key-b"):
        for code in (200, 429):
            seen = len(creates(sim, key, code))
            assert (
                gw.metric(
                    "tokenhub_gateway_upstream_requests_total", key=key, route="/videos/generations", code=str(code)
                )
                == seen
            ), (key, code)
    assert (
        gw.metric("tokenhub_gateway_upstream_requests_total", key="key-a", route="/videos/generations", code="429") >= 1
    )


def test_throttle_without_retry_after_backs_off_exponentially(make_gateway, sim):
    """A 429 without Retry-After cools key-a for cooldown_s (1 s in the harness) ± 20 % jitter, the next
    one for twice that; once the fault clears the key recovers by itself."""
    gw = make_gateway(keys=roomy("key-a", "key-b"))
    sim.fault("key-a", "429", routes=["create"])
    with gw.client("alice") as client:
        create_until(client, lambda: creates(sim, "key-a", 429))
        key_a = key_states(gw)["key-a"]
        assert key_a["state"] == "cooldown"
        assert 0.8 - 1e-6 <= key_a["cooldown_until"] - key_a["last_error_at"] <= 1.2 + 1e-6, key_a

        create_until(client, lambda: len(creates(sim, "key-a", 429)) >= 2, limit=200)
        first, second = sorted(r["time"] for r in creates(sim, "key-a", 429))
        assert second - first >= 0.75
        key_a = key_states(gw)["key-a"]
        assert 1.6 - 1e-6 <= key_a["cooldown_until"] - key_a["last_error_at"] <= 2.4 + 1e-6, key_a

        sim.clear_faults()
        wait_until(lambda: key_states(gw)["key-a"]["state"] == "ok", timeout=4)
        create_until(client, lambda: creates(sim, "key-a", 200))


# 401: disabled until a reload


def _revoke_key_a(client: httpx.Client, gw: Any, sim: Any) -> None:
    """key-a answers creates 401: exactly one create tries it, then it is disabled for creates."""
    sim.clear_requests()
    sim.fault("key-a", "401", routes=["create"])
    create_until(client, lambda: creates(sim, "key-a"))
    for _ in range(10):
        create(client)
    assert [r["status"] for r in creates(sim, "key-a")] == [401]
    assert key_states(gw)["key-a"]["state"] == "disabled"
    assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="disabled") == 1
    assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="ok") == 0

    sim.clear_faults()  # fixed upstream, but the gateway waits for a reload
    for _ in range(10):
        create(client)
    assert [r["status"] for r in creates(sim, "key-a")] == [401]
    assert key_states(gw)["key-a"]["state"] == "disabled"


def test_revoked_key_is_disabled_until_reload_or_sighup(make_gateway, sim):
    """A 401 disables key-a for creates even after the fault clears, while its existing task is still
    polled with key-a; POST /admin/reload re-enables it, and so does SIGHUP."""
    gw = make_gateway(keys=roomy("key-a", "key-b"))
    with gw.client("alice") as client:
        create_until(client, lambda: creates(sim, "key-a", 200), prompt=NEVER)
        old_task = creates(sim, "key-a", 200)[0]["task_id"]

        _revoke_key_a(client, gw, sim)
        sim.clear_requests()
        time.sleep(1.1)  # past the poll coalescing window
        response = client.get(f"/videos/generations/{old_task}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "running"
        polls = [p for p in sim.requests("poll") if p["task_id"] == old_task]
        assert polls and {p["key"] for p in polls} == {KEYS["key-a"]}
        assert {p["status"] for p in polls} == {200}

        response = gw.admin("POST", "/admin/reload")
        assert response.status_code == 200, response.text
        assert key_states(gw)["key-a"]["state"] == "ok"
        assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="ok") == 1
        create_until(client, lambda: creates(sim, "key-a", 200))

        _revoke_key_a(client, gw, sim)
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: key_states(gw)["key-a"]["state"] == "ok", timeout=5)
        create_until(client, lambda: creates(sim, "key-a", 200))


# no key left


def test_all_keys_throttled_is_503_and_nothing_charged(make_gateway, sim):
    """Every key 429 (Retry-After: 5) → 503 no_upstream_key with Retry-After 1–6 s; each key was tried once,
    nothing is reserved or spent, and /readyz stays 200 (cooldowns never make the gateway unready)."""
    gw = make_gateway(keys=[{"name": "key-a"}, {"name": "key-b"}, {"name": "key-c"}])
    for key in KEYS:
        sim.fault(key, "429", retry_after=5, routes=["create"])
    with gw.client("alice") as client:
        for _ in range(2):
            response = create(client, expect=503)
            assert error_of(response) == ("upstream_unavailable", "no_upstream_key")
            assert 1 <= int(response.headers["retry-after"]) <= 6, response.headers
        assert sorted(key_name_of(r["key"]) for r in creates(sim)) == ["key-a", "key-b", "key-c"]
        assert {k["state"] for k in key_states(gw).values()} == {"cooldown"}
        usage = client.get("/usage").json()
        for scope in ("user", "team"):
            assert usage[scope]["reserved_usd"] == 0 and usage[scope]["spent_usd"] == 0, usage
            assert usage[scope]["tasks_in_flight"] == 0, usage
    assert httpx.get(gw.url + "/readyz").status_code == 200


def test_all_keys_revoked_makes_gateway_unready(make_gateway, sim):
    """Every key 401 or 403 → 503 no_upstream_key and /readyz 503; a reload re-enables the keys."""
    gw = make_gateway(keys=[{"name": "key-a"}, {"name": "key-b"}, {"name": "key-c"}])
    for key, mode in (("key-a", "401"), ("key-b", "401"), ("key-c", "403")):
        sim.fault(key, mode, routes=["create"])
    with gw.client("alice") as client:
        response = create(client, expect=503)
        assert error_of(response) == ("upstream_unavailable", "no_upstream_key")
        assert len(creates(sim)) == 3
    assert {k["state"] for k in key_states(gw).values()} == {"disabled"}
    response = httpx.get(gw.url + "/readyz")
    assert response.status_code == 503, response.text
    assert "all_upstream_keys_disabled" in response.json()["problems"]
    sim.clear_faults()
    assert gw.admin("POST", "/admin/reload").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200


# not retried when the upstream may have created something


@pytest.mark.parametrize(
    ("mode", "upstream", "status", "code"),
    [
        ("500", {}, 502, "upstream_server_error"),
        ("hang", {"timeout_s": 1}, 504, "upstream_timeout"),
        ("reset", {}, 502, None),  # the request was read: TokenHub may have created the task
    ],
)
def test_create_that_may_have_reached_upstream_is_not_retried(make_gateway, sim, mode, upstream, status, code):
    """Every key faulty; a 5xx, a read timeout or a connection dropped after the request was read is sent
    upstream exactly once (a retry could pay for the same video twice), and the client gets 502/504."""
    gw = make_gateway(keys=[{"name": "key-a"}, {"name": "key-b"}], extra={"upstream": upstream})
    for key in ("key-a", "key-b"):
        sim.fault(key, mode, routes=["create"])
    with gw.client("alice") as client:
        response = create(client, expect=status)
    assert response.json()["error"]["type"] == "upstream_error"
    if code:
        assert response.json()["error"]["code"] == code
    time.sleep(0.3)
    assert len(creates(sim)) == 1, creates(sim)


def test_connect_failure_is_retried_on_every_key(make_gateway, sim):
    """Nothing listens upstream: a connect failure created nothing, so each key is tried once before
    the client gets 502 upstream_unreachable (counted by the upstream request metric per key)."""
    gw = make_gateway(
        keys=[{"name": "key-a"}, {"name": "key-b"}, {"name": "key-c"}], upstream_url=f"http://127.0.0.1:{free_port()}"
    )
    with gw.client("alice") as client:
        response = create(client, expect=502)
        assert error_of(response) == ("upstream_error", "upstream_unreachable")
        usage = client.get("/usage").json()
        assert usage["user"]["reserved_usd"] == 0 and usage["user"]["spent_usd"] == 0
    for key in KEYS:
        assert gw.metric("tokenhub_gateway_upstream_requests_total", key=key, route="/videos/generations") == 1, key


# circuit breaker


def test_breaker_opens_and_gateway_probes_before_clients_use_key(make_gateway, sim):
    """Three consecutive 500s on key-a open its circuit; creates go to key-b; after breaker_open_s the
    gateway polls an unknown task id with key-a itself (404 = healthy) and only then do creates use key-a."""
    gw = make_gateway(keys=roomy("key-a", "key-b"), extra={"upstream": {"breaker_failures": 3, "breaker_open_s": 1}})
    sim.fault("key-a", "500", routes=["create"], count=3)
    created: set[str] = set()
    with gw.client("alice") as client:
        for _ in range(80):
            response = client.post("/videos/generations", json=body(prompt=SHORT))
            if response.status_code == 200:
                created.add(response.json()["id"])
            else:
                assert response.status_code == 502 and error_of(response)[1] == "upstream_server_error", response.text
            if len(creates(sim, "key-a", 500)) == 3:
                break
        else:
            raise AssertionError("key-a never saw three creates")
        opened = max(r["time"] for r in creates(sim, "key-a", 500))
        assert key_states(gw)["key-a"]["state"] == "open"
        assert gw.metric("tokenhub_gateway_upstream_key_state", key="key-a", state="open") == 1
        for _ in range(5):
            created.add(create(client).json()["id"])

        wait_until(lambda: key_states(gw)["key-a"]["state"] == "ok", timeout=5)
        for response in create_until(client, lambda: creates(sim, "key-a", 200)):
            created.add(response.json()["id"])

    after = [r for r in sim.requests() if r["key"] == KEYS["key-a"] and r["time"] > opened]
    assert after, "key-a was never used again"
    probe = after[0]
    assert probe["route"] == "poll" and probe["method"] == "GET", probe
    assert probe["task_id"] not in created and probe["status"] == 404, probe
    assert probe["time"] - opened >= 0.9, "probed before breaker_open_s"
    assert [r["status"] for r in creates(sim, "key-a")][:3] == [500, 500, 500]


# polls


def test_polls_use_the_creating_key(make_gateway, sim):
    """20 tasks spread over three keys; every poll of a task reaches the simulator with its creator's key."""
    gw = make_gateway(keys=roomy("key-a", "key-b", "key-c"))
    with gw.client("alice") as client:
        ids = [create(client, prompt=NEVER).json()["id"] for _ in range(20)]
        time.sleep(1.1)  # past the poll coalescing window of the background poller
        for tid in ids:
            response = client.get(f"/videos/generations/{tid}")
            assert response.status_code == 200 and response.json()["id"] == tid, response.text
    creator = {r["task_id"]: r["key"] for r in creates(sim, status=200)}
    assert set(creator) == set(ids)
    assert len(set(creator.values())) == 3
    polls = collections.defaultdict(set)
    for poll in sim.requests("poll"):
        polls[poll["task_id"]].add(poll["key"])
    for tid in ids:
        assert polls[tid] == {creator[tid]} == {sim.task(tid)["key"]}, tid


def test_creates_only_use_keys_that_allow_the_model(make_gateway, sim):
    """key-a only allows the fast model: full-model creates never reach it, fast ones may;
    a model no key allows is 503 no_upstream_key."""
    gw = make_gateway(
        keys=[
            {"name": "key-a", "models": ["doubao-seedance-2.0-fast"]},
            {"name": "key-b", "models": ["doubao-seedance-2.0"]},
        ]
    )
    with gw.client("alice") as client:
        for _ in range(10):
            create(client)
        assert {key_name_of(r["key"]) for r in creates(sim)} == {"key-b"}
        sim.clear_requests()
        for _ in range(5):
            response = client.post("/videos/generations", json=body(model="doubao-seedance-2.0-fast", prompt=SHORT))
            assert response.status_code == 200, response.text
        assert {key_name_of(r["key"]) for r in creates(sim)} == {"key-a"}
    gw.keys = [{"name": "key-a", "models": ["doubao-seedance-2.0-fast"]}]
    gw.write_config()
    assert gw.admin("POST", "/admin/reload").status_code == 200
    with gw.client("alice") as client:
        response = create(client, expect=503)
    assert error_of(response) == ("upstream_unavailable", "no_upstream_key")


# load


def test_concurrent_creates_never_exceed_key_slots(make_gateway, sim):
    """200 concurrent creates against 3 keys × 10 slots with tasks that never end: exactly 30 are created
    (10 per key, never more), the rest are 503 no_upstream_key."""
    gw = make_gateway(keys=[{"name": n, "max_concurrent_tasks": 10} for n in KEYS])

    async def burst() -> list[httpx.Response]:
        async with gw.aclient("alice") as client:
            return await asyncio.gather(
                *(client.post("/videos/generations", json=body(prompt=NEVER)) for _ in range(200))
            )

    replies = asyncio.run(burst())
    codes = collections.Counter(r.status_code for r in replies)
    assert codes == {200: 30, 503: 170}, codes
    assert {error_of(r) for r in replies if r.status_code == 503} == {("upstream_unavailable", "no_upstream_key")}
    per_key = collections.Counter(key_name_of(r["key"]) for r in creates(sim))
    assert per_key == {"key-a": 10, "key-b": 10, "key-c": 10}, per_key
    assert {k: s["tasks_in_flight"] for k, s in key_states(gw).items()} == {n: 10 for n in KEYS}


def test_creates_follow_key_weights(make_gateway, sim):
    """Weights 1, 2, 3 and slots far beyond the load (so only the weight matters): 600 short creates,
    8 at a time, split 1/6, 2/6, 3/6 within ±0.07 each (≥ 3.2 standard deviations at n = 600)."""
    gw = make_gateway(
        keys=[
            {"name": n, "weight": w, "max_concurrent_tasks": 100_000}
            for n, w in (("key-a", 1), ("key-b", 2), ("key-c", 3))
        ]
    )
    total = 600

    async def run() -> None:
        gate = asyncio.Semaphore(8)
        async with gw.aclient("alice") as client:

            async def one() -> int:
                async with gate:
                    return (
                        await client.post("/videos/generations", json=body(prompt="sim:seconds=0.1 a quick fox"))
                    ).status_code

            assert set(await asyncio.gather(*(one() for _ in range(total)))) == {200}

    asyncio.run(run())
    per_key = collections.Counter(key_name_of(r["key"]) for r in creates(sim, status=200))
    assert sum(per_key.values()) == total
    for name, share in (("key-a", 1 / 6), ("key-b", 2 / 6), ("key-c", 3 / 6)):
        assert abs(per_key[name] / total - share) <= 0.07, per_key


# admin view


def test_admin_keys_masks_values_and_needs_the_token(make_gateway, sim):
    """/admin/keys shows names and `th-…abcd` masks, never a value; no token or a wrong one → 401;
    a gateway whose admin token variable is unset answers 404. Metrics and logs hold no value either."""
    gw = make_gateway(keys=[{"name": "key-a"}, {"name": "key-b"}, {"name": "key-c"}])
    with gw.client("alice") as client:
        create(client)
    response = gw.admin("GET", "/admin/keys")
    assert response.status_code == 200
    for value in KEYS.values():
        assert value not in response.text
        assert value not in httpx.get(gw.url + "/metrics").text
        assert value not in gw.text()
    for key in response.json()["data"]:
        assert re.fullmatch(r"th-…[0-9A-Za-z]{4}", key["key"]) and key["key"].endswith(KEYS[key["name"]][-4:]), key
    assert [k["name"] for k in response.json()["data"]] == ["key-a", "key-b", "key-c"]

    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": ADMIN_TOKEN}):
        response = httpx.get(gw.url + "/admin/keys", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"

    off = make_gateway(extra={"server": {"admin_token_env": "UNSET_VAR_FOR_TEST"}})
    assert off.admin("GET", "/admin/keys").status_code == 404
    assert off.admin("POST", "/admin/reload").status_code == 404


# reload


def test_reload_removing_key_keeps_polling_its_tasks(make_gateway, sim):
    """A reload drops key-b while a task it created is running: polls of that task still go upstream with
    key-b's value (remembered from the old config); new creates use key-a only."""
    gw = make_gateway(keys=roomy("key-a", "key-b"))
    with gw.client("alice") as client:
        create_until(client, lambda: creates(sim, "key-b", 200), prompt=NEVER)
        task_b = creates(sim, "key-b", 200)[0]["task_id"]

        gw.keys = roomy("key-a")
        gw.write_config()
        response = gw.admin("POST", "/admin/reload")
        assert response.status_code == 200 and response.json()["keys"] == 1, response.text
        assert list(key_states(gw)) == ["key-a"]

        sim.clear_requests()
        time.sleep(1.1)  # past the poll coalescing window
        response = client.get(f"/videos/generations/{task_b}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "running"
        for _ in range(5):
            create(client)
    polls = [p for p in sim.requests("poll") if p["task_id"] == task_b]
    assert polls and {p["key"] for p in polls} == {KEYS["key-b"]}
    assert {p["status"] for p in polls} == {200}
    assert {key_name_of(r["key"]) for r in creates(sim)} == {"key-a"}
