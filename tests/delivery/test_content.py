"""delivery/content.py: Range values of any length, cover types, per-team download slots, and downloads cut
short (upstream, or past the size bound) that end the client's answer without a clean end of body."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest

from gateway.delivery.content import (
    SAFE_IMAGE,
    Delivery,
    DownloadCut,
    DownloadResponse,
    DownloadSlots,
    MediaFetcher,
    image_type,
    single_range,
)
from gateway.errors import RateLimited
from gateway.settings import UpstreamSettings
from tests.hostile import HostileTokenHub, Reply

HUGE = "9" * 5000  # Python 3.11 refuses int() of a string over 4,300 digits
PAST_ANY_END = str(10**15)


@pytest.mark.parametrize(
    ("header", "passed"),
    [
        (None, None),
        ("", None),
        ("bytes=0-99", "bytes=0-99"),
        ("bytes=100-", "bytes=100-"),
        ("bytes=-500", "bytes=-500"),
        (" bytes=007-010 ", "bytes=7-10"),
        ("bytes=0-0", "bytes=0-0"),
        ("bytes=5-2", None),  # invalid: the whole file
        ("bytes=0-1,5-9", None),  # several ranges: the whole file
        ("bytes=-", None),
        ("items=0-9", None),
        ("bytes=²-", None),
        (f"bytes={HUGE}-", f"bytes={PAST_ANY_END}-"),
        (f"bytes=0-{HUGE}", f"bytes=0-{PAST_ANY_END}"),
        (f"bytes=-{HUGE}", f"bytes=-{PAST_ANY_END}"),
        (f"bytes={'0' * 5000}1-", "bytes=1-"),
        (f"bytes={HUGE}-{HUGE}", f"bytes={PAST_ANY_END}-{PAST_ANY_END}"),
    ],
)
def test_a_range_of_any_length_is_passed_on_bounded(header, passed):
    assert single_range(header) == passed


@pytest.mark.parametrize(
    ("declared", "served"),
    [
        ("image/png", "image/png"),
        ("image/jpeg; charset=binary", "image/jpeg; charset=binary"),
        ("IMAGE/WEBP", "IMAGE/WEBP"),
        ("text/html", SAFE_IMAGE),
        ("text/html; x=image/png", SAFE_IMAGE),
        ("image/svg+xml", SAFE_IMAGE),
        ("application/javascript", SAFE_IMAGE),
        ("", SAFE_IMAGE),
        (None, SAFE_IMAGE),
    ],
)
def test_a_cover_keeps_its_type_only_when_it_is_an_image(declared, served):
    assert image_type(declared) == served


def test_download_slots_stop_at_the_limit_per_team_and_forget_a_team_at_zero():
    slots = DownloadSlots()
    first = slots.claim("red", 2)
    second = slots.claim("red", 2)
    with pytest.raises(RateLimited) as refused:
        slots.claim("red", 2)
    assert (refused.value.status, refused.value.code) == (429, "concurrency_limit_exceeded")
    assert refused.value.headers()["Retry-After"] == "1" and "x-should-retry" not in refused.value.headers()
    with slots.claim("blue", 2):  # another team is not held back
        assert slots.running("blue") == 1
    first.release()
    first.release()  # once only, however often it is called
    assert slots.running("red") == 1
    second.release()
    assert slots._running == {}


def chunked(data: bytes, size: int = 1000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def hub() -> Iterator[HostileTokenHub]:
    with HostileTokenHub() as server:
        yield server


def fetcher() -> MediaFetcher:
    return MediaFetcher(
        UpstreamSettings(
            base_url="http://127.0.0.1:9/api/v1",
            keys=(),
            timeout_s=5,
            media_allow_networks=(ip_network("127.0.0.0/8"),),
        )
    )


async def served(fetch: MediaFetcher, url: str, send_timeout_s: float = 5.0) -> tuple[list[dict[str, Any]], bool]:
    """(the ASGI messages a download sends, whether its slot was released) for one GET of `url`."""
    sent: list[dict[str, Any]] = []
    released = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        response = DownloadResponse(await fetch.open(url), send_timeout_s, released.set)
        with pytest.raises(DownloadCut):
            await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    finally:
        await fetch.close()
    return sent, released.is_set()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_download_cut_upstream_raises_after_the_answer_started_instead_of_ending_cleanly(hub, framing):
    data = bytes(range(256)) * 64
    body, headers, length = chunked(data), {"Transfer-Encoding": "chunked"}, -1
    if framing == "content-length":
        body, headers, length = data, {}, None
    url = hub.serve(f"/cut-{framing}.mp4", Reply(body=body, headers=headers, content_length=length, cut_after=5000))
    sent, released = asyncio.run(served(fetcher(), url))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert all(message.get("more_body") for message in sent[1:])  # never a clean end of body
    assert 0 < sum(len(message.get("body", b"")) for message in sent[1:]) < len(data)
    assert released


def test_a_download_past_the_size_bound_is_cut_not_ended_cleanly(hub):
    data = bytes(200_000)
    framed = Reply(body=chunked(data, 16_384), headers={"Transfer-Encoding": "chunked"}, content_length=-1)
    url = hub.serve("/endless.mp4", framed)
    fetch = fetcher()
    fetch.max_bytes = 100_000
    sent, released = asyncio.run(served(fetch, url))
    assert all(message.get("more_body") for message in sent[1:])
    assert sum(len(message.get("body", b"")) for message in sent[1:]) <= 100_000
    assert released


def test_a_client_that_takes_nothing_for_the_send_timeout_ends_the_delivery():
    finished = []

    async def chunks() -> Any:
        while True:
            yield b"x" * 1024

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def stuck_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)  # the client's socket is full: the server waits for it to drain

    async def run() -> None:
        response = Delivery(chunks(), 200, {}, 0.2, lambda: finished.append(True))
        with pytest.raises(DownloadCut):
            await asyncio.wait_for(response({"type": "http"}, receive, stuck_send), 5)

    asyncio.run(run())
    assert finished == [True]
