"""The request middleware's count of each request, on a real uvicorn server in this process (the protocol
tells it when a connection ends under a request) and raw sockets: a client that leaves is a 499 logged as
`request.aborted`, never a 500; a crash stays a 500; what the protocol answers itself keeps its status."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from gateway import logs
from gateway.http.asgi import GatewayApp
from gateway.http.protocol import BODY_GRACE_S
from gateway.metrics import Metrics
from gateway.serve import uvicorn_config

HEADERS_S, BODY_S = 1.0, 0.5
ENDS = ("request", "request.aborted")  # the events of a request's one line
pytestmark = pytest.mark.timeout(30)


async def fast(request: Request) -> Response:
    return Response(b"fast")


async def echo(request: Request) -> Response:
    return Response(str(len(await request.body())).encode())


async def slow(request: Request) -> Response:
    await asyncio.sleep(0.5)
    return Response(b"slow")


async def never_reads(request: Request) -> Response:
    await asyncio.sleep(BODY_S + BODY_GRACE_S + 0.3)
    return Response(b"too late")  # the protocol has answered 408 and closed: dropped


async def crash(request: Request) -> Response:
    raise RuntimeError("a bug")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 65536
            await asyncio.sleep(0.05)

    return StreamingResponse(chunks())


ROUTES = [
    Route("/fast", fast),
    Route("/body", echo, methods=["POST"]),
    Route("/chunked", echo, methods=["POST"]),
    Route("/slow", slow),
    Route("/late", never_reads, methods=["POST"]),
    Route("/crash", crash),
    Route("/stream", stream),
]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[int, Metrics]]:
    metrics = Metrics()
    app = GatewayApp(metrics=metrics, routes=ROUTES)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, 1, header_timeout_s=HEADERS_S, body_timeout_s=BODY_S)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield port, metrics
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The log lines, through structlog (the fast path, configured by an earlier test, would bypass it)."""
    monkeypatch.setattr(logs, "_info_out", None)
    with capture_logs() as lines:
        yield lines


def counts(metrics: Metrics, route: str, method: str = "GET") -> dict[str, float]:
    """The request counter's samples for one route (each test has its own), by code."""
    out = {}
    for metric in metrics.registry.collect():
        for sample in metric.samples:
            labels = sample.labels
            if sample.name == "tokenhub_gateway_requests_total" and (labels["route"], labels["method"]) == (
                route,
                method,
            ):
                out[labels["code"]] = sample.value
    return out


def finished(lines: list[dict[str, Any]], route: str) -> dict[str, Any]:
    """The one line that ends the request on `route`, once it is written."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ends = [line for line in lines if line.get("route") == route and line["event"] in ENDS]
        if ends:
            [end] = ends
            return end
        time.sleep(0.02)
    raise TimeoutError(f"no line for {route}: {lines}")


def leave_after(port: int, request: bytes, wait_s: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        time.sleep(wait_s)


def assert_aborted(metrics: Metrics, lines: list[dict[str, Any]], route: str, method: str = "GET") -> None:
    line = finished(lines, route)
    assert (line["event"], line["status"]) == ("request.aborted", 499), line
    assert not [entry for entry in lines if entry["event"] == "request.crashed"]
    assert counts(metrics, route, method) == {"499": 1}


def test_a_client_that_leaves_while_sending_its_body_is_a_499(served, captured):
    port, metrics = served
    leave_after(port, b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", 0.1)
    assert_aborted(metrics, captured, "/body", "POST")


def test_a_client_that_leaves_before_its_answer_is_a_499(served, captured):
    port, metrics = served
    leave_after(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", 0.1)
    assert_aborted(metrics, captured, "/slow")


def test_a_client_that_leaves_a_streamed_answer_is_a_499(served, captured):
    port, metrics = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert_aborted(metrics, captured, "/stream")


def test_a_crash_is_still_a_500(served, captured):
    port, metrics = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /crash HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 500")
    line = finished(captured, "/crash")
    assert (line["event"], line["status"]) == ("request", 500)
    assert [entry["event"] for entry in captured if entry["event"].startswith("request.")] == ["request.crashed"]
    assert counts(metrics, "/crash") == {"500": 1}


def test_a_request_answered_in_full_is_counted_as_answered(served, captured):
    port, metrics = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # Connection: close: the whole answer, however it is split
            answer += chunk
        assert answer.endswith(b"fast")
    line = finished(captured, "/fast")
    assert (line["event"], line["status"]) == ("request", 200)
    assert counts(metrics, "/fast") == {"200": 1}


def test_a_malformed_body_is_the_servers_400_not_a_client_that_left(served, captured):
    port, metrics = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert finished(captured, "/chunked")["event"] == "request"
    assert counts(metrics, "/chunked", "POST") == {"400": 1}


def test_a_body_that_never_comes_is_the_protocols_408_not_a_client_that_left(served, captured):
    port, metrics = served
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    assert finished(captured, "/late")["event"] == "request"
    assert counts(metrics, "/late", "POST") == {"408": 1}
