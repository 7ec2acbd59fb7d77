"""SPEC §4 "Shutdown" and "Clients that leave are not errors", through real gateway processes: a keep-alive
connection left idle when SIGTERM arrives is answered 503 `shutting_down` (not reset) until the grace deadline,
with `serve` alone and with `serve --workers 2`; a client that leaves mid-request is a 499 `request.aborted`,
never a 500."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, Simulator, body, wait_until
from tests.e2e.openai_helpers import sdk
from tests.procs import accepts

GRACE_S = 2
HEADERS_S = 1
CREATE = "/api/v1/videos/generations"
pytestmark = pytest.mark.timeout(60)


def connect(gw: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.settimeout(GRACE_S + 5)
    return sock


def exchange(sock: socket.socket, gw: Gateway, path: str = CREATE) -> tuple[http.client.HTTPResponse, bytes]:
    """A GET (a listing by default) on a kept-alive connection, and its whole answer: the connection is free again."""
    auth = f"Authorization: Bearer {gw.user_keys['alice']}\r\n"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode())
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return answer, answer.read()


def kept_alive(gw: Gateway) -> socket.socket:
    sock = connect(gw)
    answer, _ = exchange(sock, gw)
    assert answer.status == 200 and answer.getheader("connection") != "close"
    return sock


def assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b""  # an orderly close, not a reset (a reset raises here)


def drain_an_idle_connection(gw: Gateway) -> None:
    """A connection idle at SIGTERM answers its next request 503 shutting_down and closes (a probe is still
    answered, and closes too); one idle to the end is closed at the deadline; the process exits 0 within the
    grace period and a second."""
    answered, probed, untouched = kept_alive(gw), kept_alive(gw), kept_alive(gw)
    gw.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_until(lambda: not accepts(gw.port), timeout=GRACE_S, interval=0.02)  # the drain has begun
    answer, content = exchange(answered, gw)
    assert (answer.status, json.loads(content)["error"]["code"]) == (503, "shutting_down")
    assert answer.getheader("connection") == "close"
    assert answer.getheader("retry-after") == "1"
    assert answer.getheader("x-request-id")
    assert_closed(answered)
    answer, _ = exchange(probed, gw, "/healthz")
    assert (answer.status, answer.getheader("connection")) == (200, "close")
    assert_closed(probed)
    assert_closed(untouched)
    closed_after = time.monotonic() - signalled
    assert GRACE_S - 0.5 <= closed_after <= GRACE_S + 1, closed_after  # kept until the deadline, then let go
    code = gw.proc.wait(GRACE_S + 3)
    took = time.monotonic() - signalled
    assert code == 0, gw.text()[-2000:]
    assert took <= GRACE_S + 1, took


def test_an_idle_keep_alive_connection_is_answered_503_until_the_deadline(make_gateway):
    gw = make_gateway(extra={"server": {"shutdown_grace_s": GRACE_S}})
    drain_an_idle_connection(gw)


def test_workers_drain_an_idle_keep_alive_connection_the_same_way(make_gateway, redis_url):
    """Workers serve as `serve` does: the same drain, and the configured slow-client deadlines."""
    server = {"shutdown_grace_s": GRACE_S, "header_timeout_s": HEADERS_S}
    gw = make_gateway(start=False, store_url=redis_url, extra={"server": server})
    gw.args = [*gw.args, "--workers", "2"]
    gw.start()
    wait_until(lambda: sum(line.get("event") == "gateway.started" for line in gw.lines()) == 2, timeout=20)
    for _ in range(2):  # on whichever worker each lands
        with connect(gw) as slow:
            started = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert slow.recv(65536).startswith(b"HTTP/1.1 408")
            assert time.monotonic() - started <= HEADERS_S + 1
    drain_an_idle_connection(gw)


# --- clients that leave -------------------------------------------------------------------------------------


def aborted_lines(gw: Gateway, route: str) -> list[dict[str, Any]]:
    return [line for line in gw.lines() if line.get("event") == "request.aborted" and line.get("route") == route]


def assert_counted_as_aborted(gw: Gateway, route: str, method: str) -> dict[str, Any]:
    """One request.aborted line with status 499, counted 499 and never 500; the line."""
    [line] = wait_until(lambda: aborted_lines(gw, route), timeout=10, interval=0.05)
    assert (line["status"], line["team"]) == (499, "red"), line
    assert gw.metric("tokenhub_gateway_requests_total", route=route, method=method, code="499") == 1
    assert gw.metric("tokenhub_gateway_requests_total", route=route, code="500") == 0
    assert not [entry for entry in gw.lines() if entry.get("event") == "request.crashed"]
    return line


def test_a_client_that_leaves_while_sending_its_create_is_a_499(make_gateway, sim: Simulator):
    gw = make_gateway()
    sock = connect(gw)
    auth = f"Authorization: Bearer {gw.user_keys['alice']}\r\n"
    sock.sendall(f'POST {CREATE} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: 1000\r\n\r\n{{"model"'.encode())
    time.sleep(0.2)  # the handler is reading the body
    sock.close()
    assert_counted_as_aborted(gw, "/videos/generations", "POST")
    assert sim.creates() == []


def test_a_client_that_leaves_while_its_create_is_upstream_is_a_499(make_gateway, sim: Simulator):
    gw = make_gateway()
    sim.late_create("key-a", delay_s=1.0)
    sock = connect(gw)
    content = json.dumps(body()).encode()
    auth = f"Authorization: Bearer {gw.user_keys['alice']}\r\n"
    head = f"POST {CREATE} HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: {len(content)}\r\n\r\n"
    sock.sendall(head.encode() + content)
    wait_until(lambda: sim.creates(), timeout=5, interval=0.02)
    sock.close()
    line = assert_counted_as_aborted(gw, "/videos/generations", "POST")
    assert line["task_id"]  # what it made is in its line, as on any create


def test_a_client_that_leaves_a_download_is_a_499(make_gateway, sim: Simulator):
    gw = make_gateway()
    video = sdk(gw, "alice").videos.create_and_poll(prompt="sim:seconds=0.3 sim:bytes=50000000 a long clip")
    with httpx.Client(timeout=10) as client:
        url = f"{gw.url}/v1/videos/{video.id}/content"
        headers = {"Authorization": f"Bearer {gw.user_keys['alice']}"}
        with client.stream("GET", url, headers=headers) as answer:
            assert answer.status_code == 200
            next(answer.iter_raw())  # the download is under way; then the client hangs up
    assert_counted_as_aborted(gw, "/videos/{video_id}/content", "GET")


def test_a_request_answered_in_full_is_counted_as_answered(make_gateway):
    gw = make_gateway()
    with gw.client("alice") as client:
        assert client.get("/videos/generations").status_code == 200
    assert gw.metric("tokenhub_gateway_requests_total", route="/videos/generations", code="200") == 1
    assert gw.metric("tokenhub_gateway_requests_total", code="499") == 0
