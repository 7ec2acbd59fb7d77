"""The video archive against the simulator's real result files, in a local directory and in S3 (moto on
loopback): copies land whole or not at all, ranges are served from them, failures are counted by reason."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import aiohttp
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.delivery.archive import Archive, archive_item, byte_range, file_key, retry_in_s, segment, task_folder
from gateway.delivery.storage import Backend, LocalBackend, S3Backend, StoreFailed
from gateway.metrics import Metrics
from gateway.settings import ArchiveSettings
from gateway.store.outbox import ARCHIVE_TOPIC, ArchivedFile
from gateway.store.redis.store import RedisStore
from gateway.store.sqlite.store import SQLiteStore
from tests.doubles import UPSTREAM_SETTINGS
from tests.e2e.harness import KEYS
from tests.moto_server import CREDENTIALS
from tests.store.helpers import created

SIM_KEY = KEYS["key-a"]
UPSTREAM = replace(UPSTREAM_SETTINGS, media_allow_networks=(ip_network("127.0.0.0/8"),))  # the simulator's


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
        # numbers past Python's 4,300-digit int() limit, and padded ones (SPEC §4 "Numbers stay numbers")
        ("bytes=" + "9" * 5000 + "-", 100, "unsatisfiable"),
        ("bytes=0-" + "9" * 5000, 100, (0, 100)),
        ("bytes=-" + "9" * 5000, 100, (0, 100)),
        ("bytes=" + "0" * 5000 + "7-" + "0" * 5000 + "9", 100, (7, 10)),
        ("bytes=" + "9" * 5000 + "-" + "9" * 4999, 100, None),
        ("bytes=\u0663-", 100, None),  # a digit, but not an ASCII one
    ],
    ids=lambda value: f"{value[:20]}...{len(value)}" if isinstance(value, str) and len(value) > 40 else None,
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


def test_task_folders_are_unique_per_task_whatever_the_ids():
    """Ids TokenHub chooses can differ only in case (one folder on a case-insensitive store) or name the folder
    another id was mapped to; each task still gets its own folder."""
    hashed = segment("a b")
    pairs = [("CGT-abc", "cgt-abc"), ("a b", hashed), ("a b", "a_b"), ("cgt-1.", "cgt-1"), ("x-1", "X-1")]
    for one, other in pairs:
        assert task_folder(one).lower() != task_folder(other).lower(), (one, other)
    assert task_folder("cgt-2024abc_01.x") == "cgt-2024abc_01.x"  # a plain id stays readable
    assert task_folder("CGT-Abc").startswith("x-cgt-abc-")


@given(st.text(min_size=1, max_size=140), st.text(min_size=1, max_size=140))
def test_distinct_ids_never_share_a_folder(one, other):
    if one != other:
        assert task_folder(one).lower() != task_folder(other).lower()
    assert "/" not in task_folder(one) and ".." not in task_folder(one) and len(task_folder(one)) <= 128


def test_retries_back_off_from_five_seconds_to_ten_minutes():
    assert [retry_in_s(n) for n in (1, 2, 3)] == [5, 10, 20] and retry_in_s(9) == retry_in_s(90) == 600


# ---- copying, against the simulator -------------------------------------------------------------------


def s3_settings(request, monkeypatch, bucket: str | None = None) -> ArchiveSettings:
    """Settings for a bucket of the moto server (a new one unless named)."""
    moto = request.getfixturevalue("moto")
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    return ArchiveSettings(
        url=f"s3://{bucket or moto.bucket()}/kept/videos", endpoint_url=moto.url, max_bytes_per_video=1 << 20
    )


async def open_store(request, tmp_path, kind: str) -> SQLiteStore | RedisStore:
    if kind == "redis":
        opened: SQLiteStore | RedisStore = RedisStore(
            request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex[:8]}:"
        )
    else:
        opened = SQLiteStore(str(tmp_path / "gateway.db"))
    await opened.open()
    return opened


@pytest.fixture(params=["dir", "s3", "dir+redis"])
async def archive(request, tmp_path, sim, monkeypatch):
    """An Archive on a fresh SQLite (or Redis) store, backed by a directory or by a new bucket of the moto server."""
    if request.param.startswith("dir"):
        settings = ArchiveSettings(dir=str(tmp_path / "videos"), max_bytes_per_video=1 << 20)
        backend: Backend = LocalBackend(settings.dir)
    else:
        settings = s3_settings(request, monkeypatch)
        backend = S3Backend(settings)
    store = await open_store(request, tmp_path, "redis" if request.param.endswith("redis") else "sqlite")
    a = Archive(settings, UPSTREAM, backend, store, Metrics(), time.time)
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
    assert await archive.backend.open(files["video"].key, files["video"].size, 0, 10) is None


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


@pytest.mark.parametrize("where", ["blocked directory", "missing bucket"])
async def test_storage_that_cannot_be_written_is_a_store_failure_retried_then_given_up(
    where, request, tmp_path, sim, monkeypatch
):
    if where == "blocked directory":
        blocked = tmp_path / "videos"
        blocked.write_text("a file where the directory should be")
        settings = ArchiveSettings(dir=str(blocked))
        backend: Backend = LocalBackend(settings.dir)
    else:
        settings = s3_settings(request, monkeypatch, bucket="no-such-bucket-" + uuid.uuid4().hex[:8])
        backend = S3Backend(settings)
    store = SQLiteStore(str(tmp_path / "gateway.db"))
    await store.open()
    a = Archive(settings, UPSTREAM, backend, store, Metrics(), time.time)
    a._session = aiohttp.ClientSession()
    try:
        task, item = await queued(a, sim_task(sim))
        await a.copy(item)
        assert metric(a, "archive_failures", reason="store_failed") == 2
        assert (await store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 1  # retried later
        [again] = await store.outbox_claim(ARCHIVE_TOPIC, 2, time.time() + 5.5, 60)  # after 5 s of back-off
        a.window_s = 0
        await a.copy(again)
        stats = (await store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC]
        assert (stats.backlog, stats.gave_up, metric(a, "archive_failures", reason="expired")) == (0, 1, 1)
        assert metric(a, "archive_failures", reason="store_failed") == 4
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


# ---- second hardening round (SPEC §4 "Media and downloads") --------------------------------------------


class HeldBackend:
    """A backend whose `hold`-th write (0: the video, 1: the cover) waits, its bytes arrived, until `release`."""

    def __init__(self, inner: Backend, hold: int) -> None:
        self.inner = inner
        self.hold = hold
        self.writes = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        data = [chunk async for chunk in chunks]
        self.writes += 1
        if self.writes - 1 == self.hold:
            self.arrived.set()
            await self.release.wait()
        await self.inner.put(key, replay(data), content_type)

    async def open(self, key: str, size: int, start: int, end: int) -> AsyncIterator[bytes] | None:
        return await self.inner.open(key, size, start, end)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


async def replay(data: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in data:
        yield chunk


@pytest.mark.parametrize("held", ["video", "cover"])
async def test_a_video_deleted_while_its_copy_is_in_flight_leaves_no_file_and_no_record(archive, sim, held):
    real = archive.backend
    archive.backend = gate = HeldBackend(real, ("video", "cover").index(held))
    task, item = await queued(archive, sim_task(sim))
    copying = asyncio.create_task(archive.copy(item))
    await asyncio.wait_for(gate.arrived.wait(), 5)
    assert await archive.store.mark_deleted(task.task_id, time.time())  # what DELETE /videos/{id} does
    await archive.delete(task.task_id)
    gate.release.set()
    await asyncio.wait_for(copying, 10)
    archive.backend = real
    assert await archive.store.archive_files(task.task_id) == []
    assert await leftover(archive) == []
    assert (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 0  # not retried
    assert gate.writes == gate.hold + 1  # no file after the deletion was fetched


async def test_a_deleted_video_queued_for_a_copy_is_not_fetched(archive, sim):
    task, item = await queued(archive, sim_task(sim))
    assert await archive.store.mark_deleted(task.task_id, time.time())
    sim.clear_requests()
    await archive.copy(item)
    assert (sim.downloads(), await archive.store.archive_files(task.task_id), await leftover(archive)) == ([], [], [])
    assert (await archive.store.outbox_stats([ARCHIVE_TOPIC]))[ARCHIVE_TOPIC].backlog == 0


async def test_ids_that_shared_a_folder_keep_their_own_files(archive, sim):
    """TokenHub may answer an id that names the folder another id was mapped to: each keeps its own video."""
    unsafe = "cgt-Two Words"
    look_alike = segment(unsafe)  # the folder `unsafe` was archived under before
    for task_id in (unsafe, look_alike):
        sim.fixed_id("key-a", task_id)
        _, item = await queued(archive, sim_task(sim))
        await archive.copy(item)
    for task_id in (unsafe, look_alike):
        task = await archive.store.get_task(task_id)
        assert await body_of(await archive.open_range(task, "video", None)) == sim.expected_bytes(task_id)
    assert len(await leftover(archive)) == 4


async def test_files_archived_under_the_old_keys_stay_readable(archive):
    task = await created(archive.store, time.time(), task_id="cgt-Old")
    old_key = f"marketing/{task.task_id}/video.mp4"  # before keys were unique per task
    await archive.backend.put(old_key, replay([b"old video bytes"]), "video/mp4")
    await archive.store.archive_record(ArchivedFile(task.task_id, "video", old_key, 15, "video/mp4", time.time()))
    assert await body_of(await archive.open_range(task, "video", "bytes=4-")) == b"video bytes"
    await archive.delete(task.task_id)
    assert await leftover(archive) == []


async def vanish(a: Archive, key: str) -> None:
    """Remove a file behind the archive's back (an operator, a lifecycle rule, a lost disk)."""
    if isinstance(a.backend, LocalBackend):
        (a.backend.root / key).unlink()
    else:
        import obstore

        await obstore.delete_async(a.backend._store, key)


async def test_a_vanished_file_is_not_served(archive, sim):
    """open_range finds out before answering, so the route can fall back to TokenHub's URL (else 410)."""
    task, item = await queued(archive, sim_task(sim))
    await archive.copy(item)
    files = {f.variant: f for f in await archive.store.archive_files(task.task_id)}
    await vanish(archive, files["video"].key)
    assert await archive.open_range(task, "video", None) is None
    assert await archive.open_range(task, "video", "bytes=5-9") is None
    assert await body_of(await archive.open_range(task, "cover", None)) == sim.expected_bytes(task.task_id, "cover")


async def test_a_file_of_another_size_is_not_served(archive, sim):
    task, item = await queued(archive, sim_task(sim))
    await archive.copy(item)
    video = next(f for f in await archive.store.archive_files(task.task_id) if f.variant == "video")
    await archive.backend.put(video.key, replay([b"short"]), "video/mp4")  # replaced: a 200 would end early
    assert await archive.open_range(task, "video", None) is None


async def test_retention_goes_on_past_a_file_it_cannot_delete(archive, sim):
    class Refusing:
        def __init__(self, inner: Backend) -> None:
            self.inner = inner

        async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
            await self.inner.put(key, chunks, content_type)

        async def open(self, key: str, size: int, start: int, end: int) -> AsyncIterator[bytes] | None:
            return await self.inner.open(key, size, start, end)

        async def delete(self, key: str) -> None:
            raise StoreFailed("the store refused the delete")

    task, item = await queued(archive, sim_task(sim))
    archive.clock = lambda: time.time() - 31 * 86400
    await archive.copy(item)
    archive.clock = time.time
    real = archive.backend
    archive.backend = Refusing(real)
    assert await asyncio.wait_for(archive.apply_retention(), 5) == 0  # no endless loop over the same rows
    await archive.delete(task.task_id)  # a delete that cannot remove the file keeps its record for later
    assert len(await archive.store.archive_files(task.task_id)) == 2
    archive.backend = real
    assert await archive.apply_retention() == 2 and await leftover(archive) == []


def test_key_digest_is_of_the_exact_id():
    assert task_folder("CGT-Abc").endswith(hashlib.sha256(b"CGT-Abc").hexdigest()[:32])
