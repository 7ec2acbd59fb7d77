"""routes.read_body: a body whole, in one message or many, within its size and time limits; the answer an
outcome becomes."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.context import Outcome
from gateway.errors import BodyTooLarge, RequestTimeout
from gateway.http.request import JSON, outcome_response, read_body


def request_of(*messages: dict, headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    """A request whose receive() hands out `messages`, then waits for ever (a client gone quiet)."""
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers or []}, receive)


def chunk(body: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_in_one_message_or_in_many_comes_back_whole():
    assert asyncio.run(read_body(request_of(chunk(b'{"a": 1}')), 100)) == b'{"a": 1}'
    parts = request_of(chunk(b'{"a"', True), chunk(b"", True), chunk(b": 1}"))
    assert asyncio.run(read_body(parts, 100)) == b'{"a": 1}'
    assert asyncio.run(read_body(request_of({"type": "http.request"}), 100)) == b""


def test_a_body_over_the_limit_is_refused_declared_or_not():
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(request_of(chunk(b"x" * 101)), 100))
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(request_of(chunk(b"x" * 60, True), chunk(b"x" * 60)), 100))
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(request_of(headers=[(b"content-length", b"101")]), 100))


def test_a_body_that_stops_arriving_is_a_408_that_ends_the_connection():
    with pytest.raises(RequestTimeout) as caught:
        asyncio.run(read_body(request_of(chunk(b'{"a"', True)), 100, timeout_s=0.05))
    assert caught.value.status == 408 and caught.value.headers()["Connection"] == "close"


def test_a_client_gone_mid_body_is_a_disconnect():
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(request_of(chunk(b'{"a"', True), {"type": "http.disconnect"}), 100))


@pytest.mark.parametrize("status", [200, 202, 204, 304, 101, 400, 429, 503])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Idempotent-Replayed": "true"}, {"Retry-After": "3", "x-should-retry": "false", "Connection": "close"}],
)
def test_an_outcome_is_sent_as_starlette_sends_the_same_json_response(status, headers):
    outcome = Outcome(status, b'{"id": "cgt-1"}', dict(headers))
    ours, theirs = outcome_response(outcome), Response(outcome.body, status, headers, media_type=JSON)
    assert (ours.status_code, ours.body, ours.raw_headers, ours.background) == (
        theirs.status_code,
        theirs.body,
        theirs.raw_headers,
        theirs.background,
    )
