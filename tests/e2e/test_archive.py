"""The video archive end to end (SPEC §12): real gateways in front of the simulator copy each succeeded task's
files into a local directory or an S3-compatible server (moto on loopback), one replica per task."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, body, wait_until
from tests.moto_server import CREDENTIALS
from tests.redis_server import RedisServer, require_redis_server

CREATE = "/videos/generations"


def create(gw: Gateway, prompt: str = "sim:seconds=0.3 a lighthouse") -> str:
    with gw.client("alice") as client:
        response = client.post(CREATE, json=body(prompt=prompt))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def succeeded_at(gw: Gateway, task_id: str) -> float:
    """Polls until TokenHub's answer is terminal; the time the gateway saw it succeed."""

    def done() -> bool:
        with gw.client("alice") as client:
            return client.get(f"{CREATE}/{task_id}").json()["status"] == "succeeded"

    wait_until(done, 20, 0.05)
    return time.monotonic()


def archived(sim: Any, task_id: str, get: Any) -> None:
    video, cover = sim.expected_bytes(task_id), sim.expected_bytes(task_id, "cover")
    assert get(f"red/{task_id}/video.mp4") == video
    assert get(f"red/{task_id}/cover.png") == cover


def test_succeeded_videos_land_in_the_directory_within_a_poller_interval(make_gateway, sim, tmp_path):
    root = tmp_path / "videos"
    gw = make_gateway(extra={"archive": {"dir": str(root), "max_bytes_per_video": 200_000}})
    polled, unpolled = create(gw), create(gw)  # the second is settled by the background poller alone
    too_big = create(gw, "sim:seconds=0.3 sim:bytes=200001 a long take")
    seen = succeeded_at(gw, polled)
    video = root / "red" / polled / "video.mp4"
    wait_until(lambda: video.exists() and (root / "red" / polled / "cover.png").exists(), 5, 0.02)
    landed_s = time.monotonic() - seen
    assert landed_s < 1.0, f"archived {landed_s:.2f} s after success (poller interval 1 s)"

    def read(key: str) -> bytes | None:
        return (root / key).read_bytes() if (root / key).exists() else None

    wait_until(lambda: read(f"red/{unpolled}/video.mp4") and read(f"red/{too_big}/cover.png"), 15)
    for tid in (polled, unpolled):
        archived(sim, tid, read)
    assert not (root / "red" / too_big / "video.mp4").exists()
    assert not [p for p in root.rglob("*") if p.name.endswith(".part")]
    assert gw.metric("tokenhub_gateway_archive_failures_total", reason="too_large") == 1
    sizes = sum(len(sim.expected_bytes(t)) for t in (polled, unpolled))
    assert gw.metric("tokenhub_gateway_archive_bytes_total", variant="video") == sizes
    with gw.client("alice") as client:  # the TokenHub-shape answer is unchanged: TokenHub's own URLs
        assert client.get(f"{CREATE}/{polled}").json()["data"][0]["video_url"].startswith(sim.url)


def test_succeeded_videos_land_in_s3(make_gateway, sim, moto):
    bucket = moto.bucket()
    gw = make_gateway(extra={"archive": {"url": f"s3://{bucket}/gateway", "endpoint_url": moto.url}}, start=False)
    gw.env.update(CREDENTIALS)
    gw.start()
    tid = create(gw)
    succeeded_at(gw, tid)

    def get(key: str) -> bytes | None:
        response = httpx.get(f"{moto.url}/{bucket}/gateway/{key}", timeout=5)  # moto checks no signature
        return response.content if response.status_code == 200 else None

    wait_until(lambda: get(f"red/{tid}/video.mp4") and get(f"red/{tid}/cover.png"), 10)
    archived(sim, tid, get)


@pytest.fixture
def redis_server():
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_two_replicas_copy_each_video_once(make_gateway, sim, tmp_path, redis_server):
    root = tmp_path / "shared-videos"
    gws = [
        make_gateway(
            store_url=redis_server.url,
            name=f"r{i}",
            start=False,
            keys=[{"name": "key-a", "max_concurrent_tasks": 100}],
            extra={"archive": {"dir": str(root)}},
        )
        for i in (1, 2)
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(Gateway.start, gws))
    tids = [create(gws[i % 2]) for i in range(6)]
    for i, tid in enumerate(tids):  # each replica sees every task succeed
        succeeded_at(gws[i % 2], tid)
        succeeded_at(gws[(i + 1) % 2], tid)
    wait_until(
        lambda: all(
            (root / "red" / t / "cover.png").exists() and (root / "red" / t / "video.mp4").exists() for t in tids
        ),
        15,
    )
    time.sleep(1.5)  # time for a second copy to show up, if there were one
    fetched = [d["path"] for d in sim.downloads() if d["status"] == 200]
    for tid in tids:
        assert sorted(Path(p).name for p in fetched if f"/{tid}." in p) == [f"{tid}.mp4", f"{tid}.png"], fetched
    copies = [line for gw in gws for line in gw.lines() if line.get("event") == "archive.copied"]
    assert len(copies) == 12, copies


def test_content_is_served_from_the_archive_after_tokenhub_url_expired(make_gateway, sim, tmp_path):
    """/videos/{id}/content (the OpenAI shape) reads the archive first: exact bytes, a Range, the
    thumbnail, an `expires_at` at the archive's retention; a deleted video's files are gone."""
    root = tmp_path / "videos"
    gw = make_gateway(extra={"archive": {"dir": str(root), "retention_days": 30}})
    tid = create(gw)
    succeeded_at(gw, tid)
    wait_until(
        lambda: (root / "red" / tid / "video.mp4").exists() and (root / "red" / tid / "cover.png").exists(), 10, 0.05
    )
    sim.media(ttl_s=0)  # every TokenHub result URL now answers 403
    video, cover = sim.expected_bytes(tid), sim.expected_bytes(tid, "cover")
    with gw.client("alice") as client:
        sim.clear_requests()
        whole = client.get(f"/videos/{tid}/content")
        assert (whole.status_code, whole.content) == (200, video)
        part = client.get(f"/videos/{tid}/content", headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content, part.headers["content-range"]) == (
            206,
            video[10:20],
            f"bytes 10-19/{len(video)}",
        )
        thumb = client.get(f"/videos/{tid}/content", params={"variant": "thumbnail"})
        assert (thumb.status_code, thumb.content) == (200, cover)
        bad = client.get(f"/videos/{tid}/content", headers={"Range": f"bytes={len(video) + 5}-"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (416, "range_not_satisfiable")
        assert sim.downloads() == []  # nothing was fetched from TokenHub's URLs
        expires = client.get(f"/videos/{tid}").json()["expires_at"]
        archived_at = (root / "red" / tid / "video.mp4").stat().st_mtime
        assert abs(expires - (archived_at + 30 * 86400)) < 120, expires
        assert client.delete(f"/videos/{tid}").json()["deleted"] is True
    assert not (root / "red" / tid / "video.mp4").exists()
