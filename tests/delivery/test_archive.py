"""The video archive against the simulator's real result files, in a local directory and in S3 (moto on
loopback): copies land whole or not at all, ranges are served from them, failures are counted by reason."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx
import pytest

from gateway.delivery.archive import Archive, archive_item, byte_range, file_key, retry_in_s, segment
from gateway.delivery.storage import LocalBackend, S3Backend
from gateway.metrics import Metrics
from gateway.settings import ArchiveSettings
from gateway.store.outbox import ARCHIVE_TOPIC
from gateway.store.sqlite.store import SQLiteStore
from tests.doubles import UPSTREAM_SETTINGS
from tests.e2e.harness import KEYS
from tests.moto_server import CREDENTIALS
from tests.store.helpers import created

SIM_KEY = KEYS["key-a"]


# ---- pure parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=50-500", 100, (50, 100)),
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=9-1", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("items=0-1", 100, None),
    ],
)
def test_byte_ranges(header, size, want):
    assert byte_range(header, size) == want


def test_paths_are_safe_whatever_the_ids():
    assert segment("cgt-2024abc_01.x") == "cgt-2024abc_01.x"
    for bad in ("..", "../etc", "a/b", ".hidden", "", "x" * 200, "a\x00b"):
        assert segment(bad).startswith("x-") and "/" not in segment(bad)
    assert file_key("red", "cgt-1", "video", "video/mp4", "https://h/v.mp4?sig=1") == "red/cgt-1/video.mp4"
    assert file_key("red", "cgt-1", "cover", "image/jpeg", "https://h/c.png") == "red/cgt-1/cover.jpg"
    assert file_key("red", "cgt-1", "cover", "application/octet-stream", "https://h/c.webp?x") == "red/cgt-1/cover.webp"


def test_retries_back_off_from_five_seconds_to_ten_minutes():
    assert [retry_in_s(n) for n in (1, 2, 3)] == [5, 10, 20] and retry_in_s(9) == retry_in_s(90) == 600


# ---- copying, against the simulator -------------------------------------------------------------------


@pytest.fixture(params=["dir", "s3"])
async def archive(request, tmp_path, sim, monkeypatch):
    """An Archive on a fresh SQLite store, backed by a directory or by a new bucket of the moto server."""
    if request.param == "dir":
        settings = ArchiveSettings(dir=str(tmp_path / "videos"), max_bytes_per_video=1 << 20)
        backend = LocalBackend(settings.dir)
    else:
        moto = request.getfixturevalue("moto")
        for k, v in CREDENTIALS.items():
            monkeypatch.setenv(k, v)
        settings = ArchiveSettings(
            url=f"s3://{moto.bucket()}/kept/videos", endpoint_url=moto.url, max_bytes_per_video=1 << 20
        )
        backend = S3Backend(settings)
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    a = Archive(settings, UPSTREAM_SETTINGS, backend, store, Metrics(), time.time)
    a._session = aiohttp.ClientSession()
    yield a
    await a._session.close()
    await store.close()


def sim_task(sim, prompt: str = "sim:seconds=0.1 a heron") -> dict:
    """A task made on the simulator and polled until it succeeded: its final answer."""
    with httpx.Client(base_url=sim.url + "/api/v1", headers={"Authorization": f"Bearer {SIM_KEY}"}) as c:
        tid = c.post("/videos/generations", json={"model": "doubao-seedance-2.0", "prompt": prompt}).json()["id"]
        deadline = time.monotonic() + 10
        while (data := c.get(f"/videos/generations/{tid}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, data
            time.sleep(0.05)
    return data


async def queued(a: Archive, data: dict):
    """The task settled in the store with its archive item, and that item claimed."""
    now = time.time()
    task = await created(a.store, now, task_id=data["id"])
    item = archive_item(task, data, now)
    assert await a.store.settle(task.task_id, "succeeded", 5000, 1_000_000, False, b"{}", now, [item])
    [claimed] = await a.store.outbox_claim(ARCHIVE_TOPIC, 2, now, 60)
    return task, claimed


async def body_of(served) -> bytes:
    return b"".join([chunk async for chunk in served.body])


def metric(a: Archive, name: str, **labels: str) -> float:
    return a.metrics.registry.get_sample_value(f"tokenhub_gateway_{name}_total", labels) or 0


async def test_video_and_cover_are_copied_whole_and_served_with_ranges(archive, sim):
    data = sim_task(sim)
    task, item = await queued(archive, data)
    await archive.copy(item)
    video, cover = sim.expected_bytes(task.task_id), sim.expected_bytes(task.task_id, "cover")
    files = {f.variant: f for f in await archive.store.archive_files(task.task_id)}
    assert (files["video"].size, files["cover"].size) == (len(video), len(cover))
    assert files["video"].key == f"marketing/{task.task_id}/video.mp4"
    assert (files["cover"].key, files["cover"].content_type) == (f"marketing/{task.task_id}/cover.png", "image/png")
    assert metric(archive, "archive_bytes", variant="video") == len(video)
    assert metric(archive, "archive_bytes", variant="cover") == len(cover)
    assert (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 0
    sim.media(ttl_s=0)  # TokenHub's URLs have expired: the archive still serves the files
    assert (await httpx.AsyncClient().get(data["data"][0]["video_url"])).status_code == 403
    whole = await archive.open_range(task, "video", None)
    assert (whole.status, whole.headers["Content-Length"], whole.headers["Content-Type"]) == (
        200,
        str(len(video)),
        "video/mp4",
    )
    assert await body_of(whole) == video
    part = await archive.open_range(task, "video", "bytes=1000-70000")
    assert (part.status, part.headers["Content-Range"]) == (206, f"bytes 1000-{len(video) - 1}/{len(video)}")
    assert await body_of(part) == video[1000:]
    tail = await archive.open_range(task, "cover", "bytes=-16")
    assert (tail.status, await body_of(tail)) == (206, cover[-16:])
    refused = await archive.open_range(task, "video", f"bytes={len(video)}-")
    assert (refused.status, refused.headers["Content-Range"], refused.body) == (416, f"bytes */{len(video)}", None)
    assert await archive.open_range(replace(task, task_id="cgt-never-archived"), "video", None) is None
    await archive.delete(task.task_id)
    assert await archive.store.archive_files(task.task_id) == [] and await leftover(archive) == []
    with pytest.raises(FileNotFoundError):
        [chunk async for chunk in archive.backend.read(files["video"].key, 0, 10)]


async def test_a_file_over_the_limit_is_not_archived_and_is_counted(archive, sim):
    data = sim_task(sim, f"sim:seconds=0.1 sim:bytes={(1 << 20) + 1} a big one")
    task, item = await queued(archive, data)
    await archive.copy(item)
    assert [f.variant for f in await archive.store.archive_files(task.task_id)] == ["cover"]
    assert metric(archive, "archive_failures", reason="too_large") == 1
    assert (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 0  # not retried


async def test_an_expired_source_ends_the_copy_and_is_counted(archive, sim):
    data = sim_task(sim)
    task, item = await queued(archive, data)
    sim.media(ttl_s=0)
    await archive.copy(item)
    assert await archive.store.archive_files(task.task_id) == []
    assert metric(archive, "archive_failures", reason="expired") == 2
    assert (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 0


async def test_a_cut_download_leaves_no_file_and_is_retried(archive, sim, tmp_path):
    data = sim_task(sim, "sim:seconds=0.1 sim:bytes=300000 a river")
    task, item = await queued(archive, data)
    sim.cut("*", routes=("media",), count=1)
    await archive.copy(item)
    assert [f.variant for f in await archive.store.archive_files(task.task_id)] == ["cover"]
    assert metric(archive, "archive_failures", reason="download_failed") == 1
    assert await leftover(archive) == [f"marketing/{task.task_id}/cover.png"]  # nothing partial
    now = time.time()
    assert await archive.store.outbox_claim(ARCHIVE_TOPIC, 2, now + 4, 60) == []
    [again] = await archive.store.outbox_claim(ARCHIVE_TOPIC, 2, now + 5.5, 60)
    await archive.copy(again)
    assert {f.variant for f in await archive.store.archive_files(task.task_id)} == {"video", "cover"}
    assert await body_of(await archive.open_range(task, "video", None)) == sim.expected_bytes(task.task_id)
    assert len([d for d in sim.downloads() if d["path"].endswith(".png")]) == 1  # the cover was not fetched again


async def leftover(a: Archive) -> list[str]:
    """Every object or file in the archive, temporary ones included."""
    if isinstance(a.backend, LocalBackend):
        return sorted(str(p.relative_to(a.backend.root)) for p in Path(a.backend.root).rglob("*") if p.is_file())
    import obstore

    return sorted(m["path"] for m in await obstore.list(a.backend._store).collect_async())


async def test_failures_past_the_window_are_given_up(archive, sim):
    archive.window_s = 0
    data = sim_task(sim)
    task, item = await queued(archive, data)
    sim.fault("*", "500", routes=["media"], count=2)
    await archive.copy(item)
    stats = (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC]
    assert (stats.backlog, stats.gave_up) == (0, 1)
    assert metric(archive, "archive_failures", reason="download_failed") == 2
    assert metric(archive, "archive_failures", reason="expired") == 1


async def test_retention_deletes_old_files_and_keeps_new_ones(archive, sim):
    old_data, new_data = sim_task(sim), sim_task(sim)
    old_task, old_item = await queued(archive, old_data)
    archive.clock = lambda: time.time() - 31 * 86400
    await archive.copy(old_item)
    archive.clock = time.time
    new_task, new_item = await queued(archive, new_data)
    await archive.copy(new_item)
    assert await archive.apply_retention() == 2
    assert await archive.store.archive_files(old_task.task_id) == []
    assert len(await archive.store.archive_files(new_task.task_id)) == 2
    assert await leftover(archive) == sorted(f"marketing/{new_task.task_id}/{n}" for n in ("cover.png", "video.mp4"))
    assert archive.expires_at(await archive.store.archive_files(new_task.task_id)) > time.time() + 29 * 86400


async def test_a_directory_that_cannot_be_written_is_a_store_failure(tmp_path, sim):
    blocked = tmp_path / "videos"
    blocked.write_text("a file where the directory should be")
    settings = ArchiveSettings(dir=str(blocked))
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    a = Archive(settings, UPSTREAM_SETTINGS, LocalBackend(settings.dir), store, Metrics(), time.time)
    a._session = aiohttp.ClientSession()
    try:
        task, item = await queued(a, sim_task(sim))
        await a.copy(item)
        assert metric(a, "archive_failures", reason="store_failed") == 2
        assert (await store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 1  # retried later
    finally:
        await a._session.close()
        await store.close()


async def test_the_running_archive_copies_within_a_tick_of_the_settlement(archive, sim):
    job = asyncio.create_task(archive.run())
    try:
        data = sim_task(sim)
        start = time.monotonic()
        now = time.time()
        task = await created(archive.store, now, task_id=data["id"])
        assert await archive.store.settle(
            task.task_id, "succeeded", 5000, 1_000_000, False, b"{}", now, [archive_item(task, data, now)]
        )
        archive.wake()
        while len(await archive.store.archive_files(task.task_id)) < 2:
            assert time.monotonic() - start < 5
            await asyncio.sleep(0.05)
    finally:
        archive.stop()
        await job
