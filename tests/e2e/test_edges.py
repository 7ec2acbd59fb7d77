"""End-to-end: what the gateway does not take on trust from a client (SPEC §4 hardening): bounded work for
huge bodies, strict JSON, the 2 s minimum per reference video, and slow clients cut off by deadline."""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.e2e.harness import Gateway, Simulator, body

CREATE = "/videos/generations"
VID = "https://cdn.example.com/ref.mp4"
pytestmark = pytest.mark.timeout(60)


def error_code(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --- bounded work -----------------------------------------------------------------------------

# GET /healthz back to back on one keep-alive connection until stdin closes; the latencies on stdout.
# A process of its own, so that what it measures is the gateway, not this process sending a large body.
SAMPLER = """
import http.client, json, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
conn, took = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10), []
while not stop.is_set():
    started = time.perf_counter()
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    response.read()
    took.append(time.perf_counter() - started if response.status == 200 else 99.0)
    time.sleep(0.005)
print(json.dumps(took))
"""


def test_a_million_urls_are_refused_without_holding_the_event_loop(make_gateway, sim):
    gw = make_gateway()
    raw = orjson.dumps(body(image_urls=["https://cdn.example.com/a.png"] * 1_000_000))
    sampler = subprocess.Popen(
        [sys.executable, "-c", SAMPLER, str(gw.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        with gw.client("alice", timeout=30) as client:
            time.sleep(0.3)  # samples before the bodies arrive
            refused_in = []
            for _ in range(3):
                started = time.perf_counter()
                err = error_code(client.post(CREATE, content=raw), 400)
                refused_in.append(time.perf_counter() - started)
                assert (err["code"], err["param"]) == ("invalid_parameter", "image_urls")
            time.sleep(0.3)
    finally:
        out, _ = sampler.communicate("", timeout=20)
    lat = sorted(json.loads(out))
    slow = [x for x in lat if x >= 0.050]
    print(
        f"\n{len(raw) / 1e6:.0f} MB body refused in {min(refused_in) * 1000:.0f}-{max(refused_in) * 1000:.0f} ms; "
        f"/healthz meanwhile: {len(lat)} samples, p50 {statistics.median(lat) * 1000:.1f} ms, "
        f"p99 {lat[len(lat) * 99 // 100] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms, {len(slow)} at 50 ms or more"
    )
    assert len(lat) >= 50
    assert len(slow) <= max(1, len(lat) // 100), lat[-5:]  # a rare outlier at most
    assert sim.requests("create") == []


# --- strict JSON ------------------------------------------------------------------------------

DUPLICATED = [
    b'{"model": "doubao-seedance-2.0", "model": "doubao-seedance-2.0-fast", "prompt": "a fox"}',
    b'{"model": "doubao-seedance-2.0", "prompt": "a fox", "content": '
    b'[{"type": "image_url", "image_url": {"url": "https://x.example/a.png", "url": "asset://b"}}]}',
    b'{"model": "doubao-seedance-2.0", "prompt": "a fox", "\\u0070rompt": "a cat"}',
]


@pytest.mark.parametrize("raw", DUPLICATED, ids=["top level", "nested", "escaped key"])
def test_a_repeated_key_is_invalid_json(make_gateway, sim, raw):
    gw = make_gateway()
    with gw.client("alice") as client:
        err = error_code(client.post(CREATE, content=raw), 400)
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_json")
    assert sim.requests("create") == []


def test_a_repeated_key_in_a_large_body_is_invalid_json(make_gateway, sim):
    image = "data:image/png;base64," + "A" * 200_000  # past the inline size: checked in a worker process
    raw = orjson.dumps(body(image_url=image))[:-1] + b', "duration": 5, "duration": 10}'
    gw = make_gateway()
    with gw.client("alice") as client:
        err = error_code(client.post(CREATE, content=raw), 400)
        assert err["code"] == "invalid_json"
        ok = client.post(CREATE, content=orjson.dumps(body(image_url=image)))
        assert ok.status_code == 200, ok.text
    assert len(sim.requests("create")) == 1


def test_each_reference_video_counts_two_seconds(make_gateway, sim):
    gw = make_gateway()
    with gw.client("alice") as client:
        err = error_code(client.post(CREATE, json=body(video_urls=[VID] * 3, input_video_duration=0.001)), 400)
        assert (err["code"], err["param"]) == ("invalid_parameter", "input_video_duration")
        assert client.post(CREATE, json=body(video_urls=[VID] * 3, input_video_duration=6)).status_code == 200
    assert len(sim.requests("create")) == 1


# --- slow clients -----------------------------------------------------------------------------

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 4.0, 5.0
TRICKLE_UNTIL_S = 3.0  # slow clients keep sending a byte now and then: the deadlines do not reset on data
SLOW_EACH = 100


class SlowClients(threading.Thread):
    """Connections that send their headers, or their body, a byte at a time and never finish; each one's
    answer and the moment the gateway closed it are recorded."""

    def __init__(self, gw: Gateway, count: int) -> None:
        super().__init__(daemon=True)
        self.selector = selectors.DefaultSelector()
        self.opened: dict[socket.socket, float] = {}
        self.kind: dict[socket.socket, str] = {}
        self.received: dict[socket.socket, bytes] = {}
        self.closed_after: dict[socket.socket, float] = {}
        key = gw.user_keys["alice"]
        for i in range(count):
            conn = socket.create_connection(("127.0.0.1", gw.port))
            if i % 2:
                self.kind[conn] = "body"
                conn.sendall(
                    f"POST /api/v1{CREATE} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
                )
            else:
                self.kind[conn] = "headers"
                conn.sendall(f"POST /api/v1{CREATE} HTTP/1.1\r\nHost: gw\r\n".encode())
            self.opened[conn], self.received[conn] = time.monotonic(), b""
            self.selector.register(conn, selectors.EVENT_READ)
        self.started = time.monotonic()

    def run(self) -> None:
        next_byte = self.started
        while len(self.closed_after) < len(self.opened) and time.monotonic() - self.started < 20:
            now = time.monotonic()
            if now >= next_byte and now - self.started < TRICKLE_UNTIL_S:
                for conn in self.opened:
                    if conn not in self.closed_after:
                        conn.send(b" " if self.kind[conn] == "body" else b"X")
                next_byte = now + 0.5
            for key, _ in self.selector.select(timeout=0.05):
                conn = key.fileobj
                data = conn.recv(65536)
                self.received[conn] += data
                if not data:
                    self.closed_after[conn] = time.monotonic() - self.opened[conn]
                    self.selector.unregister(conn)
                    conn.close()

    def open_count(self) -> int:
        return len(self.opened) - len(self.closed_after)


def p50_of_creates(client: httpx.Client, count: int = 50) -> float:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.post(CREATE, json=body(prompt="sim:seconds=0.2 a fox"))
        took.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return statistics.median(took)


def answer_of(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, payload = raw.split(b"\r\n\r\n", 1)
    return int(head.split(b" ", 2)[1]), json.loads(payload)


def test_slow_clients_are_cut_off_and_do_not_slow_the_others(make_gateway, sim: Simulator):
    gw = make_gateway(
        keys=[{"name": "key-a", "max_concurrent_tasks": 1000}],
        extra={"server": {"header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S}},
    )
    with gw.client("alice") as client:
        p50_of_creates(client, 5)  # warm
        alone = p50_of_creates(client)
        slow = SlowClients(gw, 2 * SLOW_EACH)
        slow.start()
        crowded = p50_of_creates(client)
        still_open = slow.open_count()
        assert time.monotonic() - slow.started < TRICKLE_UNTIL_S, "creates too slow to overlap the slow clients"
    slow.join(25)
    print(
        f"\np50 of 50 creates: {alone * 1000:.1f} ms alone, {crowded * 1000:.1f} ms beside "
        f"{2 * SLOW_EACH} slow connections"
    )
    assert still_open == 2 * SLOW_EACH
    assert crowded < max(3 * alone, alone + 0.050)
    assert len(slow.closed_after) == 2 * SLOW_EACH
    for conn, kind in slow.kind.items():
        deadline = HEADER_TIMEOUT_S if kind == "headers" else BODY_TIMEOUT_S
        assert deadline - 0.2 <= slow.closed_after[conn] <= deadline + 2.0, (kind, slow.closed_after[conn])
        status, answer = answer_of(slow.received[conn])
        assert status == 408 and answer["error"]["code"] == "request_timeout", slow.received[conn]
    with gw.client("alice") as client:  # the gateway is unharmed
        assert client.post(CREATE, json=body()).status_code == 200
    logged = [line for line in gw.lines() if line.get("event") == "request" and line.get("status") == 408]
    assert len(logged) == SLOW_EACH  # the late bodies reached the create handler, which logs its 408
    assert {line["error_code"] for line in logged} == {"request_timeout"}
