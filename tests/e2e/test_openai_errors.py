"""End-to-end: what the official openai SDK sees when the gateway says no, and what it must not retry
(SPEC §3, §11); idempotency through `extra_headers`; multipart limits; the demo, unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.harness import Gateway, Simulator, free_port, wait_http
from tests.e2e.openai_helpers import FAST, JPEG, MAX_BODY, MP4, PNG, http, requests_to, sdk, wait_status

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("kw", "code", "param"),
    [
        ({"size": "1280*720"}, "invalid_parameter", "size"),
        ({"seconds": "20"}, "invalid_parameter", "seconds"),
        ({"model": "sora-3"}, "invalid_parameter", "model"),
        ({"prompt": "x" * 5001}, "invalid_parameter", "prompt"),
        ({"extra_body": {"style": "noir"}}, "unsupported_parameter", "style"),
        ({"input_reference": ("clip.mp4", MP4, "video/mp4")}, "unsupported_parameter", "input_reference"),
        (
            {"input_reference": ("big.jpg", JPEG + bytes(10 * 1024 * 1024), "image/jpeg")},
            "invalid_parameter",
            "input_reference",
        ),
    ],
)
def test_mapping_errors_name_the_clients_field_and_cost_nothing(openai_gw: Gateway, sim: Simulator, kw, code, param):
    client = sdk(openai_gw, "alice", max_retries=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(**{"prompt": "a fox", **kw})
    assert (info.value.code, info.value.param) == (code, param)
    assert sim.creates() == []
    assert openai_gw.metric("tokenhub_gateway_validation_errors_total", param="style") == 0  # bounded label


def test_spritesheet_is_unsupported_and_other_teams_videos_are_not_found(openai_gw: Gateway, sim: Simulator):
    client, other = sdk(openai_gw, "alice"), sdk(openai_gw, "bob")
    video = client.videos.create_and_poll(prompt=f"{FAST} mine")
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.download_content(video.id, variant="spritesheet")
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "variant")
    for call in (
        lambda: other.videos.retrieve(video.id),
        lambda: other.videos.download_content(video.id),
        lambda: other.videos.delete(video.id),
        lambda: other.videos.remix(video.id, prompt="mine now"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.code == "task_not_found"
    assert client.videos.retrieve(video.id).status == "completed"


def test_features_seedance_lacks_are_routes_not_found(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    clip = ("c.mp4", MP4, "video/mp4")
    for call in (
        lambda: client.videos.edit(prompt="p", video=clip),
        lambda: client.videos.extend(prompt="p", seconds="4", video=clip),
        lambda: client.videos.create_character(name="n", video=clip),
        lambda: client.videos.get_character("char_1"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.code == "route_not_found" and "Seedance" in info.value.message


def test_a_model_the_team_may_not_use_is_permission_denied(openai_gw: Gateway, sim: Simulator):
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(openai_gw, "erin").videos.create(prompt="a fox", model="sora-2")
    assert (info.value.code, info.value.param) == ("model_not_allowed", "model")
    assert sim.creates() == []


def test_not_ready_and_expired_are_answered_once_without_sdk_retries(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice", max_retries=2)
    running = client.videos.create(prompt="sim:seconds=20 still rendering")
    before = requests_to(openai_gw, "GET", "/videos/{video_id}/content")
    with pytest.raises(openai.ConflictError) as info:
        client.videos.download_content(running.id)
    assert info.value.code == "video_not_ready" and info.value.response.headers["x-should-retry"] == "false"
    assert requests_to(openai_gw, "GET", "/videos/{video_id}/content") == before + 1
    with pytest.raises(openai.ConflictError):
        client.videos.remix(running.id, prompt="too soon")
    done = client.videos.create_and_poll(prompt=f"{FAST} soon gone")
    sim.media(ttl_s=0)
    for call in (lambda: client.videos.download_content(done.id), lambda: client.videos.remix(done.id, prompt="gone")):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert (info.value.status_code, info.value.code) == (410, "video_expired")
        assert info.value.response.headers["x-should-retry"] == "false"
    assert len(sim.creates()) == 2  # the remixes of a running and an expired video never went upstream


def test_an_unknown_outcome_is_never_retried_by_the_sdk(openai_gw: Gateway, sim: Simulator):
    sim.create_then_fail("key-a", 502)
    with pytest.raises(openai.InternalServerError) as info:
        sdk(openai_gw, "alice", max_retries=2).videos.create(prompt="a fox")
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert len(sim.creates()) == 1  # one video paid for upstream, not three


def test_budget_and_rate_limits(openai_gw: Gateway, sim: Simulator):
    with pytest.raises(openai.RateLimitError) as info:
        sdk(openai_gw, "carol", max_retries=2).videos.create(prompt="a fox")  # $0.64 > $0.50
    assert info.value.code == "budget_exceeded" and info.value.response.headers["x-should-retry"] == "false"
    assert requests_to(openai_gw, "POST", "/videos") and sim.creates() == []
    slow = sdk(openai_gw, "dave")
    slow.videos.create(prompt=f"{FAST} one a minute")
    with pytest.raises(openai.RateLimitError) as info:
        slow.videos.create(prompt=f"{FAST} two")
    headers = info.value.response.headers
    assert info.value.code == "rate_limit_exceeded" and int(headers["retry-after"]) >= 1
    assert "x-should-retry" not in headers  # a retry after Retry-After is safe


def test_an_idempotent_retry_through_extra_headers_compares_fields_not_boundaries(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    key = {"Idempotency-Key": f"render-{time.time_ns()}"}
    first = client.videos.create(
        prompt=f"{FAST} once", seconds="8", input_reference=("a.png", PNG, "image/png"), extra_headers=key
    )
    again = client.videos.with_raw_response.create(
        prompt=f"{FAST} once",
        seconds="8",
        extra_headers=key,
        input_reference=("other-name", PNG, "application/octet-stream"),
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.parse().model_dump() == {**first.model_dump(), "progress": 0}
    assert len(sim.creates()) == 1
    with pytest.raises(openai.ConflictError) as info:
        client.videos.create(prompt=f"{FAST} once", seconds="4", extra_headers=key)
    assert info.value.code == "idempotency_key_reused"
    with http(openai_gw, "alice") as http_client:
        response = http_client.post(
            "/videos/generations",
            headers=key,
            json={"model": "doubao-seedance-2.0-fast", "prompt": f"{FAST} once", "duration": 8},
        )
    assert (response.status_code, response.json()["error"]["code"]) == (409, "idempotency_key_reused")
    assert len(sim.creates()) == 1 and wait_status(client, first.id, "completed")


def test_multipart_limits(openai_gw: Gateway, sim: Simulator):
    auth = {"Authorization": f"Bearer {openai_gw.user_keys['alice']}"}
    with httpx.Client(base_url=openai_gw.url + "/v1", headers=auth, timeout=30) as http_client:
        two = http_client.post(
            "/videos",
            data={"prompt": "p"},
            files=[("input_reference", ("a.png", PNG)), ("input_reference", ("b.png", PNG))],
        )
        many = http_client.post(
            "/videos", data={f"f{i}": "x" for i in range(40)}, files={"input_reference": ("a", PNG)}
        )
        wrong = http_client.post("/videos", data={"prompt": "p"}, files={"poster": ("a.png", PNG)})
        large = http_client.post("/videos", data={"prompt": "p"}, files={"input_reference": ("a", bytes(MAX_BODY))})
        junk = http_client.post("/videos", content=b"{not json", headers={"Content-Type": "application/json"})
    assert [r.status_code for r in (two, many, wrong, large, junk)] == [400, 400, 400, 413, 400]
    assert (wrong.json()["error"]["param"], large.json()["error"]["code"], junk.json()["error"]["code"]) == (
        "poster",
        "body_too_large",
        "invalid_json",
    )
    assert sim.creates() == []


def test_a_large_upload_never_holds_the_event_loop(openai_gw: Gateway, sim: Simulator):
    image = JPEG + bytes(MAX_BODY - 64 * 1024)  # spooled to disk, then refused as too large an image
    done = threading.Event()

    def upload() -> None:
        try:
            response = httpx.post(
                openai_gw.url + "/v1/videos",
                data={"prompt": "p"},
                timeout=30,
                files={"input_reference": ("a.jpg", image)},
                headers={"Authorization": f"Bearer {openai_gw.user_keys['alice']}"},
            )
            assert response.status_code == 400 and response.json()["error"]["param"] == "input_reference"
        finally:
            done.set()

    latencies = []
    thread = threading.Thread(target=upload)
    with httpx.Client(timeout=5) as probe:
        thread.start()
        while not done.is_set():
            started = time.perf_counter()
            assert probe.get(openai_gw.url + "/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    thread.join()
    latencies.sort()
    assert len(latencies) >= 3 and latencies[int(len(latencies) * 0.9)] < 0.05, latencies


def test_the_demo_serves_an_sdk_app_that_changed_only_its_base_url_and_key(tmp_path):
    port, sim_port = free_port(), free_port()
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
            "0.5",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ready["api_key"])
        video = client.videos.create_and_poll(prompt="A red fox running through snow", seconds="4")
        assert video.status == "completed"
        content = client.videos.download_content(video.id)
        assert content.content[4:8] == b"ftyp" and len(content.content) > 1000
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def test_a_download_cut_upstream_is_cut_for_the_client_and_an_oversized_one_refused(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    video = client.videos.create_and_poll(prompt=f"{FAST} cut short")
    sim.cut("*", routes=("media",))
    with pytest.raises(openai.APIConnectionError):
        client.videos.download_content(video.id)
    assert client.videos.download_content(video.id).content == sim.expected_bytes(video.id)  # the next one is whole
    huge = client.videos.create_and_poll(prompt=f"{FAST} sim:bytes=600000000")
    with pytest.raises(openai.InternalServerError) as info:
        client.videos.download_content(huge.id)
    assert info.value.status_code == 502 and "larger than the gateway serves" in info.value.message
    assert [d["status"] for d in sim.downloads()][-1] == 200  # asked once, not read
