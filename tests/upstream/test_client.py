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
    assert scrub(b'{"ok": "th\\u002dlooks-like-a-key"}') == b'{"ok": "th-***"}'
    assert scrub(b'{"status": "succeeded", "width": 1280}') == b'{"status": "succeeded", "width": 1280}'
