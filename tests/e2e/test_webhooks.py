"""Webhooks end to end (SPEC §13): real gateways in front of the simulator, a receiver on loopback that
verifies every delivery with `standardwebhooks` and the openai SDK."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from gateway.delivery.webhooks import LEASE_S
from tests.e2e.harness import Gateway, body, wait_until
from tests.e2e.webhook_receiver import Receiver, new_secret
from tests.redis_server import RedisServer, require_redis_server

CREATE = "/videos/generations"
SHORT = "sim:seconds=0.3 a lighthouse at dusk"


def hooked(make_gateway, secret: str, url: str, start: bool = True, **endpoint: Any) -> Gateway:
    extra, gw_kw = endpoint.pop("extra", {}), endpoint.pop("gw", {})
    spec = {"name": "render-farm", "url": url, "secret_env": "WEBHOOK_SECRET", **endpoint}
    gw = make_gateway(extra={"webhooks": [spec], **extra}, start=False, **gw_kw)
    gw.env["WEBHOOK_SECRET"] = secret
    if start:
        gw.start()
    return gw


def create(gw: Gateway, prompt: str = SHORT, user: str = "alice") -> str:
    with gw.client(user) as client:
        response = client.post(CREATE, json=body(prompt=prompt))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def settle(gw: Gateway, task_id: str, user: str = "alice") -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        with gw.client(user) as client:
            data = client.get(f"{CREATE}/{task_id}").json()
        return data if data["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(terminal, 20, 0.1)


def endpoint_state(gw: Gateway) -> dict[str, Any]:
    response = gw.admin("GET", "/admin/webhooks")
    assert response.status_code == 200, response.text
    [ep] = response.json()["data"]
    return ep


def test_terminal_tasks_are_announced_signed_to_the_configured_endpoint(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret) as rx:
        url = rx.url.replace("http://", "http://hook-user:hook-pass@") + "?token=abc"
        gw = hooked(make_gateway, secret, url, teams=["red"])
        done, failed = create(gw), create(gw, "sim:seconds=0.3 sim:fail a storm")
        queued = create(gw, "sim:seconds=60 a glacier")
        with gw.client("alice") as client:
            assert client.delete(f"{CREATE}/{queued}").json()["status"] == "cancelled"
        create(gw, user="bob")  # team blue: not this endpoint's
        for tid in (done, failed):
            settle(gw, tid)
        wait_until(lambda: len(rx.delivered()) == 3, 15)
        time.sleep(1.5)  # bob's task settles too, by the poller; nothing is sent for it
        assert not rx.rejected, rx.rejected
        events = {e["data"]["id"]: (i, e) for i, e in rx.delivered().items()}
        assert set(events) == {done, failed, queued}, events
        wid, ev = events[done]
        assert ev["id"] == wid and wid.startswith("evt_") and ev["object"] == "event"
        assert ev["type"] == "video.completed" and isinstance(ev["created_at"], int)
        assert ev["data"] == {
            "id": done,
            "status": "completed",
            "tokenhub_status": "succeeded",
            "team": "red",
            "user": "alice",
            "model": "doubao-seedance-2.0",
            "cost_usd": 1.0,
            "video_seconds": 5.0,
        }
        assert (events[failed][1]["type"], events[failed][1]["data"]["tokenhub_status"]) == ("video.failed", "failed")
        assert events[queued][1]["data"]["tokenhub_status"] == "cancelled"
        assert events[failed][1]["data"]["cost_usd"] == 0
        state = endpoint_state(gw)
        assert state["url"] == rx.url.replace("http://", "http://***@") + "?***"
        assert (state["name"], state["backlog"], state["delivered"], state["failed"], state["gave_up"]) == (
            "render-farm",
            0,
            3,
            0,
            0,
        )
        assert state["last_attempt_at"] > 0 and state["last_error"] is None
        raw = gw.admin("GET", "/admin/webhooks").text
        assert secret not in raw and secret.removeprefix("whsec_") not in raw and "hook-pass" not in raw
        assert gw.metric("tokenhub_gateway_webhook_deliveries_total", endpoint="render-farm", result="ok") == 3
        assert gw.metric("tokenhub_gateway_webhook_backlog", endpoint="render-farm") == 0


def test_a_create_whose_outcome_is_unknown_is_announced_as_failed(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret) as rx:
        gw = hooked(make_gateway, secret, rx.url)
        sim.create_then_fail("key-a", status=500)
        with gw.client("alice") as client:
            assert client.post(CREATE, json=body(prompt=SHORT)).status_code == 502
        wait_until(lambda: len(rx.delivered()) == 1, 10)
        [event] = rx.delivered().values()
        [row] = gw.admin("GET", "/admin/usage").json()["data"]
        assert (event["type"], event["data"]["tokenhub_status"], event["data"]["id"]) == (
            "video.failed",
            "unknown",
            row["task_id"],
        )
        assert event["data"]["cost_usd"] == row["cost_usd"] == 1.0  # charged at its estimate


def test_a_failing_receiver_gets_the_same_event_again_until_it_answers(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret, fail_first=2) as rx:
        gw = hooked(make_gateway, secret, rx.url, retry_initial_s=0.5)
        tid = create(gw)
        settle(gw, tid)
        wait_until(lambda: len(rx.delivered()) == 1, 20)
        ids = rx.ids()
        assert len(ids) == 3 and len(set(ids)) == 1, ids
        assert not rx.rejected, rx.rejected
        state = endpoint_state(gw)
        assert (state["delivered"], state["failed"], state["backlog"], state["last_error"]) == (1, 2, 0, "HTTP 500")
        assert gw.metric("tokenhub_gateway_webhook_deliveries_total", endpoint="render-farm", result="failed") == 2


def test_pending_deliveries_survive_a_crash_and_are_delivered_after_the_restart(make_gateway, sim):
    secret = new_secret()
    with Receiver(secret, fail_first=10_000) as rx:
        gw = hooked(make_gateway, secret, rx.url, retry_initial_s=1)
        tids = [create(gw) for _ in range(3)]
        for tid in tids:
            settle(gw, tid)
        wait_until(lambda: len(set(rx.ids())) == 3, 15)
        gw.kill()
        assert endpoint_state_after_restart(gw, rx) == 3
        assert {e["data"]["id"] for e in rx.delivered().values()} == set(tids)
        assert not rx.rejected, rx.rejected


def endpoint_state_after_restart(gw: Gateway, rx: Receiver) -> int:
    first_ids = set(rx.ids())
    rx.fail_first = 0
    gw.start()
    # an attempt cut by the crash holds its event until its lease ends
    wait_until(lambda: len(rx.delivered()) == 3, LEASE_S + 15)
    assert set(rx.delivered()) == first_ids  # the same webhook-ids as before the crash
    return endpoint_state(gw)["delivered"]


@pytest.fixture
def redis_server():
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_two_replicas_on_one_redis_deliver_each_event_once(make_gateway, sim, redis_server):
    secret = new_secret()
    with Receiver(secret) as rx:
        gws = [
            hooked(
                make_gateway,
                secret,
                rx.url,
                max_in_flight=2,
                gw={
                    "store_url": redis_server.url,
                    "name": f"r{i}",
                    "keys": [{"name": "key-a", "max_concurrent_tasks": 100}],
                },
            )
            for i in (1, 2)
        ]
        tids = [create(gws[i % 2]) for i in range(12)]
        for i, tid in enumerate(tids):  # both replicas poll every task, and both pollers run
            settle(gws[i % 2], tid)
            settle(gws[(i + 1) % 2], tid)
        wait_until(lambda: len(rx.delivered()) == 12, 20)
        time.sleep(2)  # time for a duplicate to show up, if there were one
        counts = Counter(rx.ids())
        assert len(counts) == 12 and set(counts.values()) == {1}, counts
        assert {e["data"]["id"] for e in rx.delivered().values()} == set(tids)
        both = [
            gw.metric("tokenhub_gateway_webhook_deliveries_total", endpoint="render-farm", result="ok") for gw in gws
        ]
        assert sum(both) == 12, both
        assert endpoint_state(gws[0])["delivered"] == endpoint_state(gws[1])["delivered"] == 12


def poll_times_ms(gw: Gateway, tids: list[str]) -> list[float]:
    times = []
    with gw.client("alice") as client:
        for tid in tids:
            start = time.perf_counter()
            assert client.get(f"{CREATE}/{tid}").status_code == 200
            times.append((time.perf_counter() - start) * 1000)
    return times


def test_a_slow_receiver_does_not_slow_polls(make_gateway, sim, capsys):
    """The same polls through a gateway without webhooks and one whose receiver takes 5 s per delivery,
    taken in alternation so both see the same machine load."""
    secret = new_secret()
    plain = make_gateway(name="plain")
    with Receiver(secret, delay_s=5) as rx:
        slow = hooked(make_gateway, secret, rx.url, max_in_flight=2, gw={"name": "slow"})
        polled = {}
        for gw in (plain, slow):
            tids = [create(gw, "sim:seconds=0.2 a kite") for _ in range(8)]
            for tid in tids:
                settle(gw, tid)
            polled[gw.name] = tids + [create(gw, "sim:seconds=30 a harbour") for _ in range(2)]
        times: dict[str, list[float]] = {"plain": [], "slow": []}
        for _ in range(20):
            for gw in (plain, slow):
                times[gw.name] += poll_times_ms(gw, polled[gw.name])
        assert endpoint_state(slow)["backlog"] >= 4  # deliveries still waiting on the receiver
        p50 = {name: round(statistics.median(t), 3) for name, t in times.items()}
        with capsys.disabled():
            print(f"\npoll p50 ms, without webhooks / with a 5 s receiver: {p50['plain']} / {p50['slow']}")
        assert p50["slow"] < max(2 * p50["plain"], p50["plain"] + 2), p50
    httpx.get(slow.url + "/healthz", timeout=5).raise_for_status()


def test_the_demo_announces_a_finished_video_to_the_url_it_is_given(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    from tests.e2e.harness import free_port, wait_http

    port, sim_port = free_port(), free_port()
    with Receiver("whsec_" + "A" * 44) as rx:  # the real secret is the demo's: set below from its output
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "demo",
                "--port",
                str(port),
                "--sim-port",
                str(sim_port),
                "--task-seconds",
                "0.3",
                "--data-dir",
                str(tmp_path),
                "--webhook-url",
                rx.url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            ready = json.loads(proc.stdout.readline())
            rx.use_secret(ready["webhook_secret"])
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
            with httpx.Client(
                base_url=ready["gateway"], headers={"Authorization": f"Bearer {ready['api_key']}"}
            ) as client:
                tid = client.post(CREATE, json={"model": "doubao-seedance-2.0-fast", "prompt": "a fox"}).json()["id"]
            wait_until(lambda: len(rx.delivered()) == 1, 20)
            [event] = rx.delivered().values()
            assert (event["type"], event["data"]["id"], event["data"]["team"]) == ("video.completed", tid, "demo")
            assert not rx.rejected, rx.rejected
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0


def upstream_poll_gaps(sim: Any, task_id: str) -> list[float]:
    times = [p["time"] for p in sim.requests("poll") if p["task_id"] == task_id]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_running_tasks_are_checked_upstream_once_per_poller_interval(make_gateway, sim):
    """Prompt events need prompt terminal states: the poller checks every in-flight task at least once per
    `poller.interval_s`; a client polling fast adds at most one upstream call per second (coalesced)."""
    gw = make_gateway(extra={"poller": {"interval_s": 3}})
    quiet, busy = create(gw, "sim:seconds=60 a tide"), create(gw, "sim:seconds=60 a dune")
    deadline = time.monotonic() + 10
    with gw.client("alice") as client:
        while time.monotonic() < deadline:
            assert client.get(f"{CREATE}/{busy}").status_code == 200
            time.sleep(0.1)
    quiet_gaps, busy_gaps = upstream_poll_gaps(sim, quiet), upstream_poll_gaps(sim, busy)
    assert len(quiet_gaps) >= 3 and max(quiet_gaps) <= 3.1, quiet_gaps
    assert len(busy_gaps) >= 8 and min(busy_gaps) >= 0.95, busy_gaps
