"""End-to-end: the core client contract (SPEC §2–§4, §9, §10) against real gateway and simulator processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_binary
from tests.e2e.harness import KEYS, Gateway, Simulator, body, free_port, key_name_of, wait_until

CREATE = "/videos/generations"
MODELS = {"doubao-seedance-2.0", "doubao-seedance-2.0-fast"}
CLIENTS = Path(__file__).parent / "clients"
TEST_BUDGET_S = 30
pytestmark = pytest.mark.timeout(TEST_BUDGET_S)  # no test may hang the suite
LOG_FIELDS = (
    "timestamp",
    "level",
    "event",
    "request_id",
    "method",
    "route",
    "status",
    "duration_ms",
    "team",
    "user",
    "model",
    "resolution",
    "duration_s",
    "task_id",
    "upstream_key",
    "upstream_status",
    "upstream_ms",
    "cost_usd",
    "error_code",
)
SETTLED_FIELDS = ("task_id", "team", "user", "model", "resolution", "status", "billed_seconds", "cost_usd")
QUIET_POLLER = {"poller": {"interval_s": 30}}  # only client polls reach upstream
TWO_KEYS = [{"name": "key-a"}, {"name": "key-b"}]


@pytest.fixture(scope="module")
def shared_gw(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the tests that never create a task upstream (validation, auth, request ids)."""
    gw = Gateway(
        tmp=tmp_path_factory.mktemp("core"),
        upstream_url=simulator.url,
        name="shared",
        teams={"red": {}, "blue": {}},
        users={"alice": {"team": "red"}, "bob": {"team": "blue"}},
    )
    gw.start()
    yield gw
    gw.stop()


def prefixed(gw: Gateway, user: str, prefix: str = "/api/v1") -> httpx.Client:
    return httpx.Client(
        base_url=gw.url + prefix, headers={"Authorization": f"Bearer {gw.user_keys[user]}"}, timeout=15.0
    )


def error_of(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    """The OpenAI error shape of SPEC §3, with the given status, type and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "code", "param"}, err
    assert (err["type"], err["code"]) == (type_, code), err
    assert isinstance(err["message"], str) and err["message"]
    return err


def creates(sim: Simulator) -> list[dict[str, Any]]:
    return sim.requests("create")


def polls_of(sim: Simulator, task_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests("poll") if r["task_id"] == task_id]


def create_ok(client: httpx.Client, **kw: Any) -> str:
    response = client.post(CREATE, json=body(**kw))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def poll_until(client: httpx.Client, task_id: str, status: str = "succeeded", timeout: float = 10) -> dict:
    def done() -> dict | None:
        response = client.get(f"{CREATE}/{task_id}")
        assert response.status_code == 200, response.text
        return response.json() if response.json()["status"] == status else None

    return wait_until(done, timeout=timeout, interval=0.2)


def usage_of(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/usage")
    assert response.status_code == 200, response.text
    return response.json()


def assert_nothing_charged(client: httpx.Client) -> None:
    usage = usage_of(client)
    for who in ("user", "team"):
        assert (usage[who]["spent_usd"], usage[who]["reserved_usd"], usage[who]["tasks_in_flight"]) == (0, 0, 0), usage


# --- both prefixes --------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
def test_every_client_route_under_both_prefixes(make_gateway, sim, prefix):
    gw = make_gateway(extra=QUIET_POLLER)
    with prefixed(gw, "alice", prefix) as client:
        response = client.post(CREATE, json=body(prompt="sim:seconds=0.3 a fox"))
        assert response.status_code == 200, response.text
        created = response.json()
        assert created["object"] == "video.generation.task" and created["status"] == "queued"
        tid = created["id"]
        done = poll_until(client, tid)
        assert done["id"] == tid and done["data"][0]["video_url"]
        listed = client.get(CREATE).json()
        assert listed["object"] == "list" and [t["id"] for t in listed["data"]] == [tid]
        assert listed["data"][0]["user"] == "alice" and listed["data"][0]["status"] == "succeeded"
        models = client.get("/models").json()
        assert models["object"] == "list" and {m["id"] for m in models["data"]} == MODELS
        assert next(m for m in models["data"] if m["id"] == "doubao-seedance-2.0")["pricing"] == {
            "720p": 0.2,
            "480p": 0.12,
        }
        usage = usage_of(client)
        assert set(usage) >= {"period", "user", "team"} and usage["user"]["name"] == "alice"
        assert usage["user"]["spent_usd"] == 1.0 and usage["team"]["spent_usd"] == 1.0
    assert [r["path"] for r in creates(sim)] == ["/api/v1/videos/generations"]


# --- validation -----------------------------------------------------------------------------

IMG = "https://cdn.example.com/a.jpg"
VID = "https://cdn.example.com/a.mp4"
BAD_BODIES = [
    ("bad-model", body(model="gpt-4o"), "invalid_parameter", "model"),
    ("empty-prompt", body(prompt=""), "invalid_parameter", "prompt"),
    ("long-prompt", body(prompt="x" * 5001), "invalid_parameter", "prompt"),
    ("duration-3", body(duration=3), "invalid_parameter", "duration"),
    ("duration-16", body(duration=16), "invalid_parameter", "duration"),
    ("duration-string", body(duration="5"), "invalid_parameter", "duration"),
    ("resolution", body(resolution="1080p"), "invalid_parameter", "resolution"),
    ("aspect-ratio", body(aspect_ratio="2:1"), "invalid_parameter", "aspect_ratio"),
    (
        "frame-with-reference",
        body(
            content=[
                {"type": "image_url", "image_url": {"url": IMG}, "role": "first_frame"},
                {"type": "image_url", "image_url": {"url": IMG}, "role": "reference_image"},
            ]
        ),
        "invalid_parameter",
        "content[0].role",
    ),
    ("four-reference-videos", body(video_urls=[VID] * 4), "invalid_parameter", "video_urls"),
    ("audio-only", body(audio_url="https://cdn.example.com/a.mp3"), "invalid_parameter", "audio_url"),
    ("file-url", body(image_url="file:///etc/passwd"), "invalid_parameter", "image_url"),
    ("data-uri-video", body(video_url="data:video/mp4;base64,AAAA"), "invalid_parameter", "video_url"),
    (
        "video-durations-mismatch",
        body(video_urls=[VID, VID], video_durations=[5]),
        "invalid_parameter",
        "video_durations",
    ),
    (
        "text-item-with-role",
        body(content=[{"type": "text", "text": "hi", "role": "first_frame"}]),
        "invalid_parameter",
        "content[0].role",
    ),
    ("non-object", [body()], "invalid_parameter", None),
    ("invalid-json", b'{"model": "doubao-seedance-2.0", "prompt": ', "invalid_json", None),
]


@pytest.mark.parametrize(("payload", "code", "param"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_invalid_body_is_400_and_never_forwarded(shared_gw, sim, payload, code, param):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with shared_gw.client("alice") as client:
        response = client.post(CREATE, content=raw, headers={"Content-Type": "application/json"})
        err = error_of(response, 400, "invalid_request_error", code)
        assert err["param"] == param
        assert_nothing_charged(client)
    assert creates(sim) == []


def test_body_over_max_body_bytes_is_413(make_gateway, sim):
    gw = make_gateway(extra={"server": {"max_body_bytes": 2048}})
    raw = json.dumps(body(prompt="x" * 3000)).encode()
    with gw.client("alice") as client:
        error_of(client.post(CREATE, content=raw), 413, "invalid_request_error", "body_too_large")
        streamed = client.post(CREATE, content=iter([raw[:1000], raw[1000:]]))  # chunked: no Content-Length
        error_of(streamed, 413, "invalid_request_error", "body_too_large")
        assert client.post(CREATE, json=body()).status_code == 200  # a body under the limit still goes through
    assert len(creates(sim)) == 1


# --- forwarding -------------------------------------------------------------------------------


def test_client_json_is_forwarded_unchanged(make_gateway, sim):
    gw = make_gateway(extra=QUIET_POLLER)
    sent = {
        "prompt": "Ein Fuchs läuft durch den Schnee 🦊",
        "x_trace": {"b": [1, 2.5, None, True], "a": "ñ"},
        "watermark": False,
        "model": "doubao-seedance-2.0",
        "duration": 6,
        "seed": -1,
    }
    with gw.client("alice") as client:
        response = client.post(
            CREATE, content=json.dumps(sent, ensure_ascii=False).encode(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
        record = sim.task(response.json()["id"])
        assert response.json() == {
            "id": record["id"],
            "object": "video.generation.task",
            "model": "doubao-seedance-2.0",
            "status": "queued",
            "created": int(record["created"]),
        }
        polled = client.get(f"{CREATE}/{record['id']}").json()
    assert list(record["request"].items()) == list(sent.items())  # same keys, order and values
    assert "resolution" not in record["request"] and "aspect_ratio" not in record["request"]  # no defaults
    assert record["key"] == KEYS["key-a"]
    assert set(polled) >= {"id", "status", "updated", "resolution", "duration"}  # upstream fields pass


# --- auth and ownership ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer tgw-unknown-0000", "alice-key-without-scheme"]
)
def test_bad_gateway_key_is_401_on_every_route(shared_gw, sim, authorization):
    if authorization == "alice-key-without-scheme":
        authorization = shared_gw.user_keys["alice"]
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=shared_gw.api, headers=headers, timeout=15) as client:
        for response in (
            client.post(CREATE, json=body()),
            client.get(CREATE),
            client.get(f"{CREATE}/cgt-123"),
            client.delete(f"{CREATE}/cgt-123"),
            client.get("/models"),
            client.get("/usage"),
        ):
            assert error_of(response, 401, "authentication_error", "invalid_api_key")["param"] is None
    assert sim.requests() == []


def test_other_teams_task_is_404(make_gateway, sim):
    gw = make_gateway(extra=QUIET_POLLER)
    with gw.client("alice") as alice, gw.client("bob") as bob:
        tid = create_ok(alice, prompt="sim:never a fox")
        error_of(bob.get(f"{CREATE}/{tid}"), 404, "invalid_request_error", "task_not_found")
        error_of(bob.delete(f"{CREATE}/{tid}"), 404, "invalid_request_error", "task_not_found")
        assert bob.get(CREATE).json()["data"] == []
        assert sim.requests("poll") == [] and sim.requests("delete") == []
        for method in ("GET", "DELETE"):
            response = alice.request(method, f"{CREATE}/cgt-does-not-exist")
            error_of(response, 404, "invalid_request_error", "task_not_found")
        assert alice.get(f"{CREATE}/{tid}").json()["status"] in ("queued", "running")
        assert [t["id"] for t in alice.get(CREATE).json()["data"]] == [tid]


# --- key affinity and poll coalescing -------------------------------------------------------


def test_every_poll_uses_the_key_that_created_the_task(make_gateway, sim):
    gw = make_gateway(keys=[{"name": "key-a", "max_concurrent_tasks": 5}, {"name": "key-b", "max_concurrent_tasks": 5}])
    with gw.client("alice") as client:
        tids = [create_ok(client, prompt="sim:seconds=1 a fox") for _ in range(8)]
        for tid in tids:
            poll_until(client, tid)
    creators = {tid: key_name_of(sim.task(tid)["key"]) for tid in tids}
    assert set(creators.values()) == {"key-a", "key-b"}  # 8 tasks, 5 slots per key
    for tid, key in creators.items():
        used = [key_name_of(r["key"]) for r in polls_of(sim, tid)]
        assert used and set(used) == {key}, (tid, key, used)


def test_rapid_polls_of_a_running_task_reach_upstream_at_most_once_a_second(make_gateway, sim):
    gw = make_gateway(extra=QUIET_POLLER)
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:never a fox")
        wait_until(lambda: sim.task(tid)["status"] == "running", timeout=5)
        sim.clear_requests()
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: client.get(f"{CREATE}/{tid}"), range(20)))
        elapsed = time.monotonic() - started
    assert [r.status_code for r in answers] == [200] * 20
    assert {r.json()["status"] for r in answers} == {"running"}
    # Within < 1 s at most 2 reach upstream; a loaded machine that stretches the burst allows one more per second.
    assert 1 <= len(polls_of(sim, tid)) <= math.floor(elapsed) + 2, f"the 20 polls took {elapsed:.2f} s"


def test_terminal_task_is_answered_without_upstream(make_gateway, sim):
    gw = make_gateway(extra=QUIET_POLLER)
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:seconds=0.3 a fox")
        final = poll_until(client, tid)
    time.sleep(1.1)  # past the poll-coalescing window: only the terminal cache can answer now
    sim.clear_requests()
    for restarted in (False, True):
        if restarted:
            gw.restart()
        with gw.client("alice") as client:
            answers = [client.get(f"{CREATE}/{tid}") for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        assert all(r.json() == final for r in answers), restarted
    assert polls_of(sim, tid) == []


# --- durability -----------------------------------------------------------------------------


def test_acknowledged_task_survives_kill_9(make_gateway, sim):
    gw = make_gateway(keys=TWO_KEYS)
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:seconds=1.5 a fox")
    gw.kill()
    gw.start()
    with gw.client("alice") as client:
        assert tid in [t["id"] for t in client.get(CREATE).json()["data"]]
        done = poll_until(client, tid)
        assert done["usage"]["video_duration"] == 5
        settled = wait_until(lambda: [x for x in gw.lines() if x["event"] == "task.settled" and x["task_id"] == tid])
        assert len(settled) == 1 and settled[0]["status"] == "succeeded" and settled[0]["cost_usd"] == 1.0
        user = usage_of(client)["user"]
        assert (user["spent_usd"], user["reserved_usd"], user["tasks_in_flight"]) == (1.0, 0, 0), user
    creator = sim.task(tid)["key"]
    assert {r["key"] for r in polls_of(sim, tid)} == {creator}


# --- upstream failures ------------------------------------------------------------------------


def test_upstream_4xx_is_passed_through_scrubbed(make_gateway, sim):
    gw = make_gateway()
    with gw.client("alice") as client:
        response = client.post(CREATE, json=body(prompt="sim:moderation something"))
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": {
                "code": "content_moderation",
                "type": "invalid_request_error",
                "param": "prompt",
                "message": "The request was rejected by content moderation: the prompt may contain sensitive content.",
            }
        }
        assert not any(v in response.text for v in KEYS.values()) and "th-" not in response.text
        assert_nothing_charged(client)
        assert client.get(CREATE).json()["data"] == []
    assert len(creates(sim)) == 1


def test_unreachable_upstream_is_502_and_charges_nothing(make_gateway, sim):
    gw = make_gateway(upstream_url=f"http://127.0.0.1:{free_port()}", keys=TWO_KEYS)
    with gw.client("alice") as client:
        response = client.post(CREATE, json=body())
        error_of(response, 502, "upstream_error", "upstream_unreachable")
        assert_nothing_charged(client)
        assert client.get(CREATE).json()["data"] == []


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("hang", 504, "upstream_timeout"),
        ("garbage", 502, "upstream_bad_response"),
        ("500", 502, "upstream_server_error"),
    ],
)
def test_create_that_may_have_reached_upstream_is_not_retried(make_gateway, sim, mode, status, code):
    gw = make_gateway(keys=TWO_KEYS, extra={"upstream": {"timeout_s": 1}})
    for key in ("key-a", "key-b"):  # whichever key is tried, a retry on the other would show up
        sim.fault(key, mode, routes=["create"])
    with gw.client("alice") as client:
        started = time.monotonic()
        response = client.post(CREATE, json=body())
        error_of(response, status, "upstream_error", code)
        assert time.monotonic() - started < 5  # no retry after the 1 s timeout
    assert len(creates(sim)) == 1


@pytest.mark.parametrize(("mode", "retry_after"), [("401", None), ("403", None), ("429", 7)])
def test_upstream_rejecting_the_only_key_is_503_no_upstream_key(make_gateway, sim, mode, retry_after):
    gw = make_gateway()
    sim.fault("key-a", mode, retry_after=retry_after, routes=["create"])
    with gw.client("alice") as client:
        response = client.post(CREATE, json=body())
        error_of(response, 503, "upstream_unavailable", "no_upstream_key")
        wait = int(response.headers["retry-after"])
        assert (5 <= wait <= 7) if retry_after else wait >= 1
        assert_nothing_charged(client)
    assert len(creates(sim)) == 1


# --- request ids and logs -------------------------------------------------------------------


def test_request_id_is_echoed_when_safe_and_replaced_otherwise(shared_gw, sim):
    safe = "client-42_abc.DEF:7"
    with shared_gw.client("alice") as client:
        assert client.get("/models", headers={"X-Request-Id": safe}).headers["x-request-id"] == safe
        for unsafe in ("has spaces in it", "a" * 300, "semi;colon", 'quote"d'):
            rid = client.get("/models", headers={"X-Request-Id": unsafe}).headers["x-request-id"]
            assert rid and rid != unsafe and len(rid) <= 128 and " " not in rid
        errors = [
            client.get(f"{CREATE}/cgt-nope"),
            client.post(CREATE, json=body(duration=3)),
            httpx.get(shared_gw.api + "/models"),
            client.get("/no-such-route"),
        ]
        fresh = [client.get("/models").headers["x-request-id"] for _ in range(2)]
    assert [r.status_code for r in errors] == [404, 400, 401, 404]
    assert all(r.headers.get("x-request-id") for r in errors)
    assert fresh[0] != fresh[1]
    unauthenticated = httpx.get(shared_gw.api + "/usage", headers={"X-Request-Id": safe})
    assert unauthenticated.status_code == 401 and unauthenticated.headers["x-request-id"] == safe


def test_log_lines_are_json_one_per_request_and_leak_nothing(make_gateway, sim):
    gw = make_gateway(extra=QUIET_POLLER)
    secret_prompt = "A purple walrus juggling seven lanterns"
    sent: dict[str, dict[str, Any]] = {}

    def call(client: httpx.Client, method: str, path: str, expect: dict[str, Any], **kw: Any) -> httpx.Response:
        rid = f"log-{len(sent)}"
        sent[rid] = expect
        return client.request(method, path, headers={"X-Request-Id": rid}, **kw)

    with gw.client("alice") as client:
        response = call(client, "POST", CREATE, {}, json=body(prompt=f"sim:seconds=0.3 {secret_prompt}"))
        tid = response.json()["id"]
        sent["log-0"] = {
            "status": 200,
            "method": "POST",
            "route": CREATE,
            "team": "red",
            "user": "alice",
            "model": "doubao-seedance-2.0",
            "resolution": "720p",
            "duration_s": 5,
            "task_id": tid,
            "upstream_key": "key-a",
            "upstream_status": 200,
            "cost_usd": 1.0,
            "error_code": None,
        }
        time.sleep(0.5)
        poll = {
            "status": 200,
            "method": "GET",
            "route": CREATE + "/{task_id}",
            "task_id": tid,
            "upstream_key": "key-a",
            "upstream_status": 200,
            "team": "red",
            "user": "alice",
        }
        assert call(client, "GET", f"{CREATE}/{tid}", poll).json()["status"] == "succeeded"
        call(client, "GET", CREATE, {"status": 200, "route": CREATE, "team": "red"})
        call(client, "GET", "/models", {"status": 200, "route": "/models"})
        call(client, "GET", "/usage", {"status": 200, "route": "/usage", "user": "alice"})
        call(
            client,
            "POST",
            CREATE,
            {"status": 400, "error_code": "invalid_parameter", "upstream_key": None},
            json=body(prompt=secret_prompt, duration=3),
        )
        call(
            client,
            "POST",
            CREATE,
            {"status": 400, "upstream_status": 400, "upstream_key": "key-a"},
            json=body(prompt=f"sim:moderation {secret_prompt}"),
        )
        call(client, "GET", f"{CREATE}/cgt-nope", {"status": 404, "error_code": "task_not_found"})
    with httpx.Client(base_url=gw.api, headers={"Authorization": "Bearer tgw-wrong-key-0123456789"}) as anon:
        call(anon, "GET", "/models", {"status": 401, "error_code": "invalid_api_key", "team": None})

    lines = gw.lines()  # every stdout line parses as JSON, or this fails
    requests = [x for x in lines if x["event"] == "request"]
    assert sorted(x["request_id"] for x in requests) == sorted(sent)
    for line in requests:
        missing = [f for f in LOG_FIELDS if f not in line]
        assert not missing, (missing, line)
        assert isinstance(line["duration_ms"], (int, float))
        assert {k: line[k] for k in sent[line["request_id"]]} == sent[line["request_id"]], line
    create_line = next(x for x in requests if x["request_id"] == "log-0")
    assert isinstance(create_line["upstream_ms"], (int, float))
    settled = [x for x in lines if x["event"] == "task.settled"]
    assert len(settled) == 1 and {k: settled[0][k] for k in SETTLED_FIELDS} == {
        "task_id": tid,
        "team": "red",
        "user": "alice",
        "model": "doubao-seedance-2.0",
        "resolution": "720p",
        "status": "succeeded",
        "billed_seconds": 5,
        "cost_usd": 1.0,
    }
    text = gw.text()
    forbidden = [*KEYS.values(), *gw.user_keys.values(), "tgw-wrong-key-0123456789", "Bearer", secret_prompt]
    assert [s for s in forbidden if s in text] == []


# --- shutdown -------------------------------------------------------------------------------


def test_sigterm_finishes_the_in_flight_create_and_exits_0(make_gateway, sim):
    gw = make_gateway()
    grace = gw.config()["server"]["shutdown_grace_s"]
    sim.fault("key-a", "slow", delay_s=1.5, routes=["create"])
    answer: dict[str, httpx.Response] = {}

    def create() -> None:
        with gw.client("alice") as client:
            answer["r"] = client.post(CREATE, json=body())

    worker = threading.Thread(target=create)
    worker.start()
    wait_until(lambda: creates(sim), timeout=5, interval=0.02)  # the create is in flight upstream
    gw.proc.send_signal(signal.SIGTERM)
    sent_at = time.monotonic()
    wait_until(lambda: _refused(gw.url + "/healthz"), timeout=2, interval=0.05)  # no new connections
    worker.join(10)
    code = gw.proc.wait(grace + 3)
    took = time.monotonic() - sent_at
    assert answer["r"].status_code == 200, answer["r"].text
    assert code == 0, f"exit code {code} after {took:.1f} s"
    assert took <= grace + 3
    gw.stop()
    gw.start()
    with gw.client("alice") as client:
        assert [t["id"] for t in client.get(CREATE).json()["data"]] == [answer["r"].json()["id"]]


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=0.5)
    except httpx.TransportError:
        return True
    return False


# --- the seed guide's clients -----------------------------------------------------------------


def test_guide_clients_work_with_only_base_url_and_key_changed(make_gateway, sim):
    node = require_binary("node")
    gw = make_gateway()
    env = {**os.environ, "API_BASE": gw.api, "API_KEY": gw.user_keys["alice"]}
    runs = {
        name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in (
            ("python", [sys.executable, str(CLIENTS / "guide_requests.py")]),
            ("node", [node, str(CLIENTS / "guide_fetch.mjs")]),
        )
    }
    out = {}
    for name, proc in runs.items():
        try:
            stdout, stderr = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == 0, (name, stdout, stderr)
        out[name] = stdout
    video = f"{sim.url}/media/cgt-"
    assert "Video ready! Duration: 5s" in out["python"] and f"URL: {video}" in out["python"], out["python"]
    assert f"Video URL: {video}" in out["node"] and "Duration: 5 seconds" in out["node"], out["node"]
    with gw.client("alice") as client:
        assert len(client.get(CREATE).json()["data"]) == 2
        assert usage_of(client)["user"]["spent_usd"] == 2.0
    assert {key_name_of(r["key"]) for r in sim.requests()} == {"key-a"}
