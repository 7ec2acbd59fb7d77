"""The simulator's result files: exact bytes per task, Range and HEAD, signed URLs that expire, their knobs."""

from __future__ import annotations

import asyncio
import struct
import zlib
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.simulator.app import cover_bytes, video_bytes
from gateway.simulator.media import CHUNK, COVER_SIZE, DEFAULT_VIDEO_SIZE, parse_range, video_chunks
from tests.doubles import FakeClock
from tests.simulator.helpers import AUTH, KEY, client, control, create, fault, served, sim

T0 = 1_750_000_000.0


async def finished_task(app, clock: FakeClock | None = None, **fields) -> tuple[str, dict]:
    """A task that has succeeded (clock moved past its run time), and its data[0] links."""
    async with client(app) as api:
        task_id = (await create(api, **fields)).json()["id"]
        if clock is not None:
            clock.now += 20
        done = (await api.get(f"/v1/videos/generations/{task_id}")).json()
    assert done["status"] == "succeeded", done
    return task_id, done["data"][0]


def local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def fetch(app, url: str, method: str = "GET", **headers: str) -> httpx.Response:
    async with client(app, None) as api:
        return await api.request(method, local(url), headers=headers)


# --- the bytes ---------------------------------------------------------------------------------


def _boxes(data: bytes) -> list[tuple[bytes, int]]:
    """An MP4's top-level boxes, (kind, size), which must tile the file exactly."""
    boxes, at = [], 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        assert size >= 8
        boxes.append((kind, size))
        at += size
    assert at == len(data)
    return boxes


def test_a_video_is_the_playable_clip_then_free_filler_of_its_own():
    video = video_bytes("cgt-one")
    size, kind, brand = struct.unpack(">I4s4s", video[:12])
    assert (size, kind, brand) == (32, b"ftyp", b"isom") and b"mp41" in video[16:32]
    kinds = [kind for kind, _ in _boxes(video)]
    assert kinds[:2] == [b"ftyp", b"moov"] and b"mdat" in kinds and kinds[-1] == b"free"  # moov first: it streams
    assert len(video) == DEFAULT_VIDEO_SIZE == 64 * 1024
    assert video == video_bytes("cgt-one") and video[40:] != video_bytes("cgt-two")[40:]
    small = video_bytes("cgt-one", 1_000)  # too small for the clip: an ftyp box and mdat filler
    assert len(small) == 1_000 and [kind for kind, _ in _boxes(small)] == [b"ftyp", b"mdat"]


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 10), (5, 45), (40, 41), (CHUNK - 3, CHUNK + 90), (2 * CHUNK + 7, 3 * CHUNK + 40), (0, 3 * CHUNK + 100)],
)
def test_any_slice_of_a_video_is_the_same_slice_of_its_bytes(start, end):
    size = 3 * CHUNK + 100
    assert b"".join(video_chunks("cgt-one", size, start, end)) == video_bytes("cgt-one", size)[start:end]
    assert all(len(chunk) <= CHUNK for chunk in video_chunks("cgt-one", size, start, end))


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    return chunks


def test_a_cover_is_a_valid_png_of_its_own_per_task():
    chunks = _png_chunks(cover_bytes("cgt-one"))
    assert list(chunks) == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (*COVER_SIZE, 8, 2)
    rows = zlib.decompress(chunks[b"IDAT"])
    assert len(rows) == height * (1 + 3 * width) and rows[0] == 0
    assert chunks[b"tEXt"] == b"Comment\x00cgt-one"
    assert cover_bytes("cgt-one") == cover_bytes("cgt-one") != cover_bytes("cgt-two")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes=999-999", (999, 1000)),
        ("bytes=1000-", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=5-2", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=-", None),
        ("bytes=a-b", None),
        ("bytes=-5000", (0, 1000)),
    ],
)
def test_range_header(header, expected):
    assert parse_range(header, 1000) == expected


# --- serving -----------------------------------------------------------------------------------


async def test_links_point_at_the_simulator_itself_and_serve_the_exact_bytes():
    app = sim(task_seconds=0)
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as api:
        task_id = (await create(api)).json()["id"]
        links = (await api.get(f"/v1/videos/generations/{task_id}")).json()["data"][0]
        video, cover = await api.get(links["video_url"]), await api.get(links["cover_image_url"])
    assert links["video_url"].startswith(f"{base}/media/{task_id}.mp4?expires=")
    assert video.status_code == 200 and video.content == video_bytes(task_id)
    assert video.headers["content-type"] == "video/mp4" and video.headers["accept-ranges"] == "bytes"
    assert video.headers["content-length"] == str(DEFAULT_VIDEO_SIZE)
    assert cover.status_code == 200 and cover.content == cover_bytes(task_id)
    assert cover.headers["content-type"] == "image/png"
    assert cover.headers["content-length"] == str(len(cover_bytes(task_id)))


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=0-31", 206, (0, 32)),
        ("bytes=65000-", 206, (65000, 65536)),
        ("bytes=-100", 206, (65436, 65536)),
        ("bytes=70000-", 416, None),
        ("bytes=9-3", 200, (0, 65536)),
    ],
)
async def test_range_requests(header, status, span):
    app = sim(task_seconds=0)
    task_id, links = await finished_task(app)
    reply = await fetch(app, links["video_url"], range=header)
    assert reply.status_code == status and reply.headers["accept-ranges"] == "bytes"
    if span is None:
        assert reply.headers["content-range"] == "bytes */65536" and reply.content == b""
        return
    assert reply.content == video_bytes(task_id)[span[0] : span[1]]
    assert reply.headers["content-length"] == str(span[1] - span[0])
    if status == 206:
        assert reply.headers["content-range"] == f"bytes {span[0]}-{span[1] - 1}/65536"


async def test_a_cover_range_and_head_requests():
    app = sim(task_seconds=0)
    task_id, links = await finished_task(app)
    part = await fetch(app, links["cover_image_url"], range="bytes=1-3")
    video_head = await fetch(app, links["video_url"], "HEAD")
    cover_head = await fetch(app, links["cover_image_url"], "HEAD", range="bytes=0-7")
    assert part.status_code == 206 and part.content == b"PNG"
    assert video_head.status_code == 200 and video_head.content == b""
    assert video_head.headers["content-length"] == "65536" and video_head.headers["content-type"] == "video/mp4"
    assert cover_head.status_code == 206 and cover_head.headers["content-length"] == "8"


async def test_a_large_video_is_sent_in_chunks_never_whole():
    app = sim(task_seconds=0, video_size=5 * CHUNK + 1)
    task_id, links = await finished_task(app)
    url = urlsplit(links["video_url"])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": url.path,
        "raw_path": url.path.encode(),
        "query_string": url.query.encode(),
        "headers": [],
        "server": ("sim", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    sent, requested = [], asyncio.Event()

    async def receive():
        if requested.is_set():
            await asyncio.Event().wait()  # the client never leaves
        requested.set()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    parts = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert sent[0]["status"] == 200 and len(parts) == 6 and max(map(len, parts)) == CHUNK
    assert b"".join(parts) == video_bytes(task_id, 5 * CHUNK + 1)


async def test_unknown_and_unfinished_tasks_are_404():
    clock = FakeClock()
    app = sim(clock=clock, task_seconds=10)
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
    links = app.state.simulator.signer.links("http://sim", task_id, T0 + 1000)
    unfinished = await fetch(app, links["video_url"])
    gone = app.state.simulator.signer.links("http://sim", "cgt-nope", T0 + 1000)
    assert unfinished.status_code == 404 and b"NoSuchKey" in unfinished.content
    assert (await fetch(app, gone["cover_image_url"])).status_code == 404


# --- expiry and signatures ---------------------------------------------------------------------


async def test_links_expire_after_the_ttl():
    clock = FakeClock()
    app = sim(clock=clock, task_seconds=10, media_ttl_s=100)
    task_id, links = await finished_task(app, clock)  # succeeded at T0 + 10, now T0 + 20
    assert f"expires={int(T0) + 110}&" in links["video_url"]
    clock.now = T0 + 109.5
    assert (await fetch(app, links["video_url"])).status_code == 200
    clock.now = T0 + 110
    expired = await fetch(app, links["video_url"])
    assert expired.status_code == 403 and b"Request has expired" in expired.content
    assert expired.headers["content-type"] == "application/xml"


async def test_the_ttl_knob_expires_every_link_at_once_and_restores():
    app = sim(task_seconds=0)
    _, links = await finished_task(app)
    set_ = await control(app, "POST", "/_sim/media", json={"ttl_s": 0})
    assert set_.json() == {"ttl_s": 0.0, "video_size": DEFAULT_VIDEO_SIZE}
    assert (await fetch(app, links["video_url"])).status_code == 403
    assert (await fetch(app, links["cover_image_url"])).status_code == 403
    assert (await control(app, "DELETE", "/_sim/media")).json()["ttl_s"] == 24 * 3600
    assert (await fetch(app, links["video_url"])).status_code == 200


@pytest.mark.parametrize(
    "tamper",
    [
        lambda url: url.replace("expires=", "expires=9"),
        lambda url: url.split("&sig=")[0],
        lambda url: url.split("?")[0],
        lambda url: url.replace(".mp4?", ".png?"),
        lambda url: url[:-1] + "x",
    ],
)
async def test_a_link_changed_in_any_way_is_403(tamper):
    app = sim(task_seconds=0)
    _, links = await finished_task(app)
    reply = await fetch(app, tamper(links["video_url"]))
    assert reply.status_code == 403 and b"AccessDenied" in reply.content


# --- size knobs, faults and the download log ---------------------------------------------------


async def test_video_size_knob_applies_to_new_tasks_and_the_marker_to_one():
    app = sim(task_seconds=0)
    before, before_links = await finished_task(app)
    await control(app, "POST", "/_sim/media", json={"video_size": 1000})
    after, after_links = await finished_task(app)
    marked, marked_links = await finished_task(app, prompt="x sim:bytes=2048")
    assert (await fetch(app, before_links["video_url"])).content == video_bytes(before)
    assert (await fetch(app, after_links["video_url"])).content == video_bytes(after, 1000)
    assert (await fetch(app, marked_links["video_url"])).content == video_bytes(marked, 2048)
    assert (await control(app, "GET", f"/_sim/tasks/{marked}")).json()["video_size"] == 2048


@pytest.mark.parametrize(
    "settings", [{"ttl_s": -1}, {"ttl_s": "1"}, {"video_size": 39}, {"video_size": 1.5}, {"size": 5}, [1]]
)
async def test_bad_media_settings_are_400(settings):
    app = sim()
    assert (await control(app, "POST", "/_sim/media", json=settings)).status_code == 400
    assert (await control(app, "GET", "/_sim/media")).json()["ttl_s"] == 24 * 3600


async def test_media_faults_apply_to_downloads_only():
    app = sim(task_seconds=0)
    task_id, links = await finished_task(app)
    await fault(app, key="*", mode="500", routes=["media"], count=1)
    failed, ok = await fetch(app, links["video_url"]), await fetch(app, links["video_url"])
    async with client(app) as api:
        assert (await api.get(f"/v1/videos/generations/{task_id}")).status_code == 200
    assert (failed.status_code, ok.status_code) == (500, 200)


async def test_a_download_cut_mid_body_under_uvicorn():
    app = sim(task_seconds=0, video_size=4 * CHUNK)
    await fault(app, key="*", mode="cut", routes=["media"])
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as api:
        task_id = (await create(api)).json()["id"]
        links = (await api.get(f"/v1/videos/generations/{task_id}")).json()["data"][0]
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with api.stream("GET", links["video_url"]) as reply:
                async for chunk in reply.aiter_raw():
                    received += chunk
    assert received == video_bytes(task_id, 4 * CHUNK)[: 2 * CHUNK]


async def test_downloads_have_their_own_log_cleared_with_the_requests():
    app = sim(task_seconds=0)
    task_id, links = await finished_task(app)
    await fetch(app, links["video_url"], range="bytes=0-9")
    await fetch(app, links["cover_image_url"], "HEAD")
    downloads = (await control(app, "GET", "/_sim/downloads")).json()["data"]
    requests = (await control(app, "GET", "/_sim/requests")).json()["data"]
    assert [(d["method"], d["route"], d["task_id"], d["range"], d["status"]) for d in downloads] == [
        ("GET", "media", task_id, "bytes=0-9", 206),
        ("HEAD", "media", task_id, None, 200),
    ]
    assert {entry["route"] for entry in requests} == {"create", "poll"} and {entry["key"] for entry in requests} == {
        KEY
    }
    await control(app, "DELETE", "/_sim/requests")
    assert (await control(app, "GET", "/_sim/downloads")).json()["data"] == []
