"""The upstream client against a real HTTP server on loopback: what it sends, and what it keeps."""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.errors import ConnectFailed, UpstreamTimeout
from gateway.settings import UpstreamSettings
from gateway.upstream.client import HttpUpstream


async def serve(handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # loopback only
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://localhost:{port}/api/v1"  # a host name: a cookie jar ignores IP addresses


async def test_a_cookie_set_for_one_key_never_rides_along_with_the_next_call():
    seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), request.headers.get("Cookie")))
        return web.json_response({"id": "cgt-1"}, headers={"Set-Cookie": "session=of-the-first-key; Path=/"})

    runner, base = await serve(handler)
    upstream = HttpUpstream(UpstreamSettings(base_url=base, keys=()))
    try:
        first = await upstream.call("POST", "/videos/generations", "th-first", b"{}")
        second = await upstream.call("GET", "/videos/generations/cgt-1", "th-second")
    finally:
        await upstream.close()
        await runner.cleanup()
    assert (first.status, second.status) == (200, 200)
    assert seen == [("Bearer th-first", None), ("Bearer th-second", None)]


async def test_connect_failure_and_timeout_are_told_apart():
    async def slow(request: web.Request) -> web.Response:
        import asyncio

        await asyncio.sleep(1.5)
        return web.json_response({})

    runner, base = await serve(slow)
    upstream = HttpUpstream(UpstreamSettings(base_url=base, keys=(), timeout_s=0.3, connect_timeout_s=0.3))
    try:
        try:
            await upstream.call("GET", "/videos/generations/x", "th-k")
        except UpstreamTimeout:
            pass
        else:
            raise AssertionError("a hung upstream must time out")
    finally:
        await upstream.close()
        await runner.cleanup()
    closed = HttpUpstream(UpstreamSettings(base_url=base, keys=(), connect_timeout_s=0.3))  # nothing listens now
    try:
        try:
            await closed.call("POST", "/videos/generations", "th-k", b"{}")
        except ConnectFailed:
            pass
        else:
            raise AssertionError("a refused connection must be ConnectFailed")
    finally:
        await closed.close()


@pytest.mark.parametrize("key", ["th-abc.DEF+/x=yz123", "th-secondkey_456789", "plain-key-without-prefix"])
def test_a_configured_key_is_scrubbed_in_every_form(key):
    from gateway.upstream.client import Scrubber

    scrub = Scrubber([key, "th-other-key-000000"])
    forms = [
        key,
        "".join(f"\\u{ord(c):04x}" for c in key),
        "".join(f"%{ord(c):02X}" for c in key),
        key.replace("/", "\\/"),
    ]
    for form in forms:
        out = scrub(f'{{"error": {{"message": "bad key {form} here"}}}}'.encode())
        assert out == b'{"error": {"message": "bad key th-*** here"}}', form


@pytest.mark.parametrize(
    "text",
    [
        b'{"video_url": "https://cdn.example/v/width-1280/month-12x/a.mp4?X-Sig=QUJD_th-REVGR0hJ-Sk0"}',
        b'{"ok": "th\\u002dlooks-like-a-key", "also": "th%2Dlooks-like-a-key"}',
        b'{"error": {"message": "th-unit-upstream-key-000"}}',  # a key's prefix is not the key
        b'{"status": "succeeded", "width": 1280}',
    ],
)
def test_look_alikes_are_not_keys_and_are_left_as_sent(text):
    """SPEC §4 "Scrubbing removes keys, not look-alikes": the `th-` shape alone scrubs nothing (it broke
    result URLs that the gateway itself then fetched)."""
    from gateway.upstream.client import Scrubber

    assert Scrubber(["th-unit-upstream-key-0001"])(text) is text


def test_no_configured_key_scrubs_nothing():
    from gateway.upstream.client import Scrubber

    text = b'{"error": {"message": "th-anything-at-all"}}'
    assert Scrubber([])(text) is text


# --- answers of any size ---------------------------------------------------------------------

HUGE = 40 * 1024 * 1024
CHUNK = b"x" * 65536


async def stream_huge(request: web.Request, declared: bool) -> web.StreamResponse:
    """40 MiB of answer, with or without a Content-Length; written until the client goes away."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if declared:
        response.content_length = HUGE
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(HUGE // len(CHUNK)):
            await response.write(CHUNK)
    except (ConnectionError, RuntimeError):
        pass  # the client refused the rest
    return response


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_answer_over_max_answer_bytes_is_refused_without_being_read_whole(declared):
    import asyncio
    import time

    from gateway.errors import UpstreamError

    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def huge(request: web.Request) -> web.StreamResponse:
        return await stream_huge(request, declared)

    runner, base = await serve(huge)
    upstream = HttpUpstream(UpstreamSettings(base_url=base, keys=(), max_answer_bytes=1024 * 1024))
    ticking = asyncio.ensure_future(ticker())
    started = time.perf_counter()
    try:
        with pytest.raises(UpstreamError) as refused:
            await upstream.call("GET", "/videos/generations/cgt-1", "th-k")
    finally:
        ticking.cancel()
        await upstream.close()
        await runner.cleanup()
    assert (refused.value.status, refused.value.code) == (502, "upstream_bad_response")
    assert getattr(refused.value, "upstream_status", None) == 200  # TokenHub did answer: the key is fine
    assert time.perf_counter() - started < 2
    assert max(gaps, default=0) < 0.05, max(gaps)  # the loop kept turning: /healthz would have answered


async def test_an_answer_up_to_max_answer_bytes_is_read_whole():
    async def exact(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"y" * 4096)
        await response.write_eof()
        return response

    runner, base = await serve(exact)
    upstream = HttpUpstream(UpstreamSettings(base_url=base, keys=(), max_answer_bytes=4096))
    try:
        reply = await upstream.call("GET", "/videos/generations/cgt-1", "th-k")
    finally:
        await upstream.close()
        await runner.cleanup()
    assert (reply.status, reply.body) == (200, b"y" * 4096)


@pytest.mark.parametrize("size", [2, 64 * 1024, 64 * 1024 + 1, 300_001])
async def test_a_body_arrives_whole_with_its_length_whatever_its_size(size):
    seen = []

    async def handler(request: web.Request) -> web.Response:
        headers = request.headers
        seen.append((headers.get("Content-Length"), headers.get("Content-Type"), "Transfer-Encoding" in headers))
        seen.append(await request.read())
        return web.json_response({})

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)  # sent in slices past 64 KiB
    runner, base = await serve(handler)
    upstream = HttpUpstream(UpstreamSettings(base_url=base, keys=()))
    try:
        reply = await upstream.call("POST", "/videos/generations", "th-k", body)
        again = await upstream.call("POST", "/videos/generations", "th-k", body)  # the same body, sent twice
    finally:
        await upstream.close()
        await runner.cleanup()
    assert (reply.status, again.status) == (200, 200)
    assert seen == [(str(size), "application/json", False), body] * 2
