"""The server protocol's deadlines, on a real uvicorn server in this process and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http.protocol import BODY_GRACE_S
from gateway.serve import uvicorn_config

HEADERS_S, BODY_S = 0.5, 0.8
pytestmark = pytest.mark.timeout(30)


async def fast(request: Request) -> Response:
    return Response(b"fast")


async def echo(request: Request) -> Response:
    return Response(str(len(await request.body())).encode())


async def slow(request: Request) -> Response:
    await asyncio.sleep(HEADERS_S * 2)
    return Response(b"slow")


async def waits_for_its_body(request: Request) -> Response:
    with contextlib.suppress(ClientDisconnect):
        await request.body()
    return Response(b"too late")  # the protocol has answered and let go of the client: dropped


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    app = Starlette(
        routes=[
            Route("/fast", fast, methods=["GET", "POST"]),
            Route("/echo", echo, methods=["POST"]),
            Route("/waits", waits_for_its_body, methods=["POST"]),
            Route("/slow", slow),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", sock.getsockname()[1], 1, header_timeout_s=HEADERS_S, body_timeout_s=BODY_S)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(5)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return s


def until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in data, which ends with a complete one."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (line.partition(b": ") for line in lines[1:]) if k == b"content-length")
        out.append((int(lines[0].split(b" ")[1]), rest[:length]))
        data = rest[length:]
    return out


def assert_timeout_answer(status: int, body: bytes) -> None:
    assert status == 408
    error = json.loads(body)["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "request_timeout", None)


def assert_unfinished_headers_time_out(s: socket.socket, slack: float) -> None:
    """Headers started on `s` and never finished get a 408 at the header deadline, within `slack`."""
    started = time.monotonic()
    s.sendall(b"GET /fast HTTP/1.1\r\n")
    [(status, body)] = responses(until_closed(s))
    assert_timeout_answer(status, body)
    assert HEADERS_S - 0.05 <= time.monotonic() - started <= HEADERS_S + slack


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port):
    s = connect(port)
    started = time.monotonic()
    assert until_closed(s) == b""
    assert HEADERS_S - 0.05 <= time.monotonic() - started <= HEADERS_S + 1


def test_headers_sent_a_byte_at_a_time_get_a_408_at_the_deadline(port):
    s = connect(port)
    started = time.monotonic()
    s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # still sending: the deadline is not an idle timeout
        time.sleep(0.1)
        s.sendall(b"X")
    [(status, body)] = responses(until_closed(s))
    assert_timeout_answer(status, body)
    assert HEADERS_S - 0.05 <= time.monotonic() - started <= HEADERS_S + 1


def test_each_request_on_a_kept_alive_connection_gets_its_own_header_deadline(port):
    s = connect(port)
    s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).endswith(b"fast")
    time.sleep(HEADERS_S + 0.3)  # idle between requests: the keep-alive timeout's business, not this one
    assert_unfinished_headers_time_out(s, 1)


def test_a_header_deadline_earlier_than_the_last_body_deadline_still_holds(port):
    """The connection's one timer is armed for a body deadline when the next request starts: its header
    deadline, earlier, must still be kept, not the body's."""
    s = connect(port)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    time.sleep(HEADERS_S + 0.1)  # the timer set at connect fires into the body's deadline and waits for it
    s.sendall(b"12")
    head = b""
    while not head.endswith(b"2"):
        head += s.recv(65536)
    # the body deadline would come BODY_S + BODY_GRACE_S - HEADERS_S - 0.1 = 1.2 s from here
    assert_unfinished_headers_time_out(s, 0.45)


def test_many_requests_on_one_connection_each_keep_their_deadlines(port):
    s = connect(port)
    for _ in range(50):
        s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).endswith(b"fast")
    time.sleep(HEADERS_S + 0.1)  # the timer armed at connect has fired and found no request under way
    assert_unfinished_headers_time_out(s, 0.45)


def test_late_pipelined_headers_end_the_connection_without_a_408_inside_an_answer(port):
    s = connect(port)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\n")
    assert until_closed(s) == b""


def test_a_body_never_sent_to_a_handler_waiting_for_it_gets_a_408(port):
    s = connect(port)
    s.sendall(b"POST /waits HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    [(status, body)] = responses(until_closed(s))
    assert_timeout_answer(status, body)
    assert BODY_S + BODY_GRACE_S - 0.05 <= time.monotonic() - started <= BODY_S + BODY_GRACE_S + 1


def test_a_body_never_sent_to_a_handler_that_answered_ends_the_connection(port):
    s = connect(port)
    s.sendall(b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    started = time.monotonic()
    assert responses(until_closed(s)) == [(200, b"fast")]  # answered at once; closed at the deadline
    assert BODY_S + BODY_GRACE_S - 0.05 <= time.monotonic() - started <= BODY_S + BODY_GRACE_S + 1


def test_a_slow_request_within_its_deadlines_is_served(port):
    s = connect(port)
    for part in (b"POST /echo HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 6\r\n\r\n"):
        s.sendall(part)
        time.sleep(HEADERS_S / 4)
    for part in (b"12", b"34", b"56"):
        s.sendall(part)
        time.sleep(BODY_S / 4)
    s.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert responses(until_closed(s)) == [(200, b"6"), (200, b"fast")]


def test_uvicorn_config_defaults_to_the_settings_defaults():
    cfg = uvicorn_config(Starlette(), "127.0.0.1", 8080, 10)
    assert (cfg.http.header_timeout_s, cfg.http.body_timeout_s) == (10, 30)
    assert cfg.ws == "none"
