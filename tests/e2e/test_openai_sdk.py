"""End-to-end: apps on the official openai SDK against a real gateway and simulator (SPEC §11)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.harness import Gateway, Simulator, wait_until
from tests.e2e.openai_helpers import FAST, PNG, data_url, http, requests_to, sdk, wait_status

pytestmark = pytest.mark.timeout(60)


def test_create_maps_size_seconds_model_and_an_uploaded_image(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    raw = client.videos.with_raw_response.create(
        prompt=f"{FAST} a fox",
        model="sora-2-pro",
        seconds="12",
        size="1792x1024",
        input_reference=("ref.bin", PNG, "application/octet-stream"),
    )
    video = raw.parse()
    assert raw.headers["openai-poll-after-ms"] == "100"
    assert (video.object, video.status, video.progress, video.model, video.seconds, video.size, video.prompt) == (
        "video",
        "queued",
        0,
        "sora-2-pro",
        "12",
        "1792x1024",
        f"{FAST} a fox",
    )
    assert video.completed_at is None and video.expires_at is None and video.remixed_from_video_id is None
    sent = sim.task(video.id)["request"]
    assert sent == {
        "model": "doubao-seedance-2.0",
        "prompt": f"{FAST} a fox",
        "duration": 12,
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "content": [{"type": "image_url", "role": "first_frame", "image_url": {"url": data_url(PNG, "image/png")}}],
    }
    row = next(r for r in openai_gw.admin("GET", "/admin/usage").json()["data"] if r["task_id"] == video.id)
    assert (row["model"], row["resolution"], row["duration_s"], row["estimate_usd"]) == (
        "doubao-seedance-2.0",
        "720p",
        12,
        2.4,
    )


def test_defaults_and_a_json_body(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    video = client.videos.create(prompt=f"{FAST} defaults")
    assert (video.model, video.seconds, video.size) == ("sora-2", "4", "720x1280")
    assert sim.task(video.id)["request"] == {
        "model": "doubao-seedance-2.0-fast",
        "prompt": f"{FAST} defaults",
        "duration": 4,
        "resolution": "720p",
        "aspect_ratio": "9:16",
    }
    with httpx.Client(
        base_url=openai_gw.url + "/v1", timeout=15, headers={"Authorization": f"Bearer {openai_gw.user_keys['alice']}"}
    ) as http_client:
        response = http_client.post(
            "/videos",
            json={
                "prompt": f"{FAST} json",
                "seconds": 8,
                "size": "640x480",
                "input_reference": {"image_url": "https://cdn.example.com/a.jpg"},
            },
        )
    assert response.status_code == 200, response.text
    assert (response.json()["seconds"], response.json()["size"]) == ("8", "640x480")
    sent = sim.task(response.json()["id"])["request"]
    assert sent["content"][0]["image_url"] == {"url": "https://cdn.example.com/a.jpg"}
    assert sent["resolution"] == "480p"
    linked = client.videos.create(
        prompt=f"{FAST} linked",  # as form field input_reference[image_url]
        extra_body={"input_reference": {"image_url": "https://cdn.example.com/b.png"}},
    )
    assert sim.task(linked.id)["request"]["content"] == [
        {"type": "image_url", "role": "first_frame", "image_url": {"url": "https://cdn.example.com/b.png"}}
    ]


def test_retrieve_through_every_status_with_progress_that_never_goes_back(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    video = client.videos.create(prompt="sim:seconds=3 a slow fox")
    seen, progress = [], []
    while not seen or seen[-1] not in ("completed", "failed"):
        raw = client.videos.with_raw_response.retrieve(video.id)
        polled = raw.parse()
        unfinished = polled.status in ("queued", "in_progress")
        assert (raw.headers.get("openai-poll-after-ms") == "100") == unfinished
        if polled.status == "in_progress":
            assert 0 < polled.progress < 100
        seen.append(polled.status)
        progress.append(polled.progress)
        time.sleep(0.15)
    assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s] == ["queued", "in_progress", "completed"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert polled.completed_at >= polled.created_at
    assert polled.expires_at - polled.completed_at == pytest.approx(24 * 3600, abs=2)
    failed = client.videos.create_and_poll(prompt=f"{FAST} sim:fail")
    assert (failed.status, failed.progress, failed.error.code, failed.expires_at) == (
        "failed",
        100,
        "generation_failed",
        None,
    )
    assert failed.error.message == "The video could not be generated (simulated failure)."


def test_create_and_poll_then_download_both_variants_and_a_range(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    started = time.monotonic()
    video = client.videos.create_and_poll(prompt=f"{FAST} a fox", seconds="4")
    assert video.status == "completed" and time.monotonic() - started < 3  # the gateway's 100 ms pace
    mp4 = client.videos.with_raw_response.download_content(video.id)
    assert mp4.headers["content-type"] == "video/mp4" and mp4.content == sim.expected_bytes(video.id)
    cover = client.videos.with_raw_response.download_content(video.id, variant="thumbnail")
    assert cover.headers["content-type"] == "image/png"
    assert cover.content == sim.expected_bytes(video.id, "cover")
    part = client.videos.with_raw_response.download_content(video.id, extra_headers={"Range": "bytes=100-1099"})
    size = len(sim.expected_bytes(video.id))
    assert (part.status_code, part.headers["content-range"]) == (206, f"bytes 100-1099/{size}")
    assert part.content == sim.expected_bytes(video.id)[100:1100]
    assert [d["range"] for d in sim.downloads()][-1] == "bytes=100-1099"
    with httpx.Client(
        base_url=openai_gw.url + "/api/v1",
        timeout=15,
        headers={"Authorization": f"Bearer {openai_gw.user_keys['alice']}"},
    ) as http_client:
        response = http_client.get(f"/videos/{video.id}/content", headers={"Range": f"bytes={size}-"})
    assert (response.status_code, response.headers["content-range"], response.json()["error"]["code"]) == (
        416,
        f"bytes */{size}",
        "range_not_satisfiable",
    )


def test_list_pages_both_orders_and_shows_only_the_teams_undeleted_videos(openai_gw: Gateway, sim: Simulator):
    client, other = sdk(openai_gw, "amy"), sdk(openai_gw, "bob")
    ids = [client.videos.create(prompt=f"{FAST} video {i}").id for i in range(3)]
    with http(openai_gw, "amy") as http_client:
        created = http_client.post("/videos/generations", json={"model": "doubao-seedance-2.0", "prompt": "tokenhub"})
        ids.append(created.json()["id"])
    theirs = other.videos.create(prompt=f"{FAST} not yours").id
    mine = [v.id for v in client.videos.list(limit=2)]
    assert theirs not in mine
    assert mine[:4] == ids[::-1]
    page = client.videos.list(limit=2)
    assert ([v.id for v in page.data], page.has_more) == (ids[:1:-1], True)
    assert [v.id for v in client.videos.list(order="asc", limit=100)][-4:] == ids
    wait_status(client, ids[0], "completed")
    client.videos.delete(ids[0])
    assert ids[0] not in [v.id for v in client.videos.list(limit=100)]


def test_delete_queued_running_and_completed(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice", max_retries=2)
    queued = client.videos.create(prompt="sim:seconds=30 waits in the queue")
    assert client.videos.delete(queued.id).model_dump() == {"id": queued.id, "object": "video.deleted", "deleted": True}
    assert sim.task(queued.id)["status"] == "cancelled"
    running = client.videos.create(prompt="sim:never a long one")
    wait_until(lambda: sim.task(running.id)["status"] == "running")
    before = requests_to(openai_gw, "DELETE", "/videos/{video_id}")
    with pytest.raises(openai.ConflictError) as info:
        client.videos.delete(running.id)
    assert info.value.code == "video_not_ready" and info.value.response.headers["x-should-retry"] == "false"
    assert requests_to(openai_gw, "DELETE", "/videos/{video_id}") == before + 1  # the SDK did not retry
    done = client.videos.create_and_poll(prompt=f"{FAST} done")
    client.videos.delete(done.id)
    for call in (
        lambda: client.videos.retrieve(done.id),
        lambda: client.videos.download_content(done.id),
        lambda: client.videos.remix(done.id, prompt="again"),
        lambda: client.videos.delete(done.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with http(openai_gw, "alice") as http_client:  # the TokenHub shape and the ledger keep it
        assert http_client.get(f"/videos/generations/{done.id}").json()["status"] == "succeeded"
        listed = http_client.get("/videos/generations", params={"limit": 100}).json()["data"]
        assert done.id in [t["id"] for t in listed]
    assert done.id in [r["task_id"] for r in openai_gw.admin("GET", "/admin/usage").json()["data"]]


def test_remix_references_the_original_output_and_bills_its_seconds(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice")
    source = client.videos.create_and_poll(prompt=f"{FAST} source", seconds="8", size="1280x720")
    remix = client.videos.remix(source.id, prompt=f"{FAST} the same, at night")
    assert (remix.remixed_from_video_id, remix.seconds, remix.size, remix.model, remix.prompt) == (
        source.id,
        "8",
        "1280x720",
        "sora-2",
        f"{FAST} the same, at night",
    )
    sent = sim.task(remix.id)["request"]
    reference = sent["content"][0]
    assert reference["role"] == "reference_video" and f"/media/{source.id}.mp4?" in reference["video_url"]["url"]
    assert (sent["video_durations"], sent["duration"], sent["model"]) == ([8], 8, "doubao-seedance-2.0-fast")
    row = next(r for r in openai_gw.admin("GET", "/admin/usage").json()["data"] if r["task_id"] == remix.id)
    assert (row["input_seconds"], row["estimate_usd"]) == (8, 2.56)  # (8 in + 8 out) × $0.16
    assert client.videos.poll(remix.id).status == "completed"


def test_one_task_two_shapes(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "alice", prefix="/api/v1")
    with http(openai_gw, "alice") as http_client:
        tid = http_client.post(
            "/videos/generations",
            json={
                "model": "doubao-seedance-2.0",
                "prompt": f"{FAST} guide",
                "duration": 6,
                "resolution": "480p",
                "aspect_ratio": "9:16",
            },
        ).json()["id"]
        video = client.videos.poll(tid)
        assert (video.model, video.seconds, video.size, video.status) == (
            "doubao-seedance-2.0",
            "6",
            "480x854",
            "completed",
        )
        assert client.videos.download_content(tid).read() == sim.expected_bytes(tid)
        vid = client.videos.create_and_poll(prompt=f"{FAST} sdk").id
        task = http_client.get(f"/videos/generations/{vid}").json()
        assert (task["id"], task["object"], task["status"]) == (vid, "video.generation.task", "succeeded")


def test_the_cost_shows_in_usage_metrics_and_logs(openai_gw: Gateway, sim: Simulator):
    client = sdk(openai_gw, "bob")
    with http(openai_gw, "bob") as http_client:
        spent = http_client.get("/usage").json()["user"]["spent_usd"]
        video = client.videos.create_and_poll(prompt=f"{FAST} priced", seconds="5", size="720x1280")
        assert http_client.get("/usage").json()["user"]["spent_usd"] == pytest.approx(spent + 0.8)  # 5 s × $0.16
    assert (
        openai_gw.metric(
            "tokenhub_gateway_requests_total", route="/videos/{video_id}", method="GET", code="200", team="blue"
        )
        >= 1
    )
    assert openai_gw.metric("tokenhub_gateway_tasks_created_total", team="blue", model="doubao-seedance-2.0-fast") >= 1
    line = next(
        x
        for x in openai_gw.lines()
        if x.get("event") == "request" and x["route"] == "/videos" and x["task_id"] == video.id
    )
    assert (line["model"], line["resolution"], line["duration_s"], line["cost_usd"], line["upstream_key"]) == (
        "doubao-seedance-2.0-fast",
        "720p",
        5,
        0.8,
        "key-a",
    )
    assert "priced" not in str(line)
