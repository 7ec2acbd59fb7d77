"""SPEC §3's error shape, with §2's request id and §3/§11's retry headers, on every path that sends an error:
a table of provocations run through one assertion, then a slow client's 408s from a real server on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.serve import uvicorn_config
from gateway.upstream.client import Reply
from tests.doubles import USER_KEY, FakeUpstream, make_settings
from tests.procs import free_port, wait_for

REQUEST_ID = "shape-check-1"
TEAMS = {"red": {}, "fastonly": {"models": ["doubao-seedance-2.0-fast"]}, "broke": {"budget_usd": 0.5},
         "slow": {"requests_per_minute": 1}, "busy": {"max_concurrent_tasks": 1}}  # fmt: skip
KEYS = {**{team: f"tgw-shape-{team}" for team in TEAMS}, "red": USER_KEY}
TOKENS = {**KEYS, "admin": "shape-admin-token", "metrics": "shape-metrics-token", "bad": "tgw-nobody"}
CREATE = "/v1/videos/generations"
Provocation = Callable[[TestClient], Any]


def gateway_settings(directory: Path, admin: bool = True, **server: Any) -> Any:
    tokens = {"admin_token_env": "SHAPE_ADMIN", "metrics_token_env": "SHAPE_METRICS"} if admin else {}
    return make_settings(
        f"sqlite:///{directory / 'shape.db'}",
        teams=TEAMS,
        users={team: {"team": team, "key": KEYS[team]} for team in TEAMS},
        server={**tokens, "max_body_bytes": 4096, **server},
        env={"SHAPE_ADMIN": TOKENS["admin"], "SHAPE_METRICS": TOKENS["metrics"]},
    )


# retry_after: §3's "+ Retry-After"; no_retry: §3/§11's `x-should-retry: false` (a blind retry could do harm)
Expected = namedtuple("Expected", "status type code param retry_after no_retry", defaults=(None, False, False))
AUTH = Expected(401, "authentication_error", "invalid_api_key")
INVALID = Expected(400, "invalid_request_error", "invalid_parameter")
NOT_JSON = INVALID._replace(code="invalid_json")
UNSUPPORTED = INVALID._replace(code="unsupported_parameter")
TOO_LARGE = Expected(413, "invalid_request_error", "body_too_large")
NO_TASK = Expected(404, "invalid_request_error", "task_not_found")
NO_ROUTE = NO_TASK._replace(code="route_not_found")
NO_METHOD = Expected(405, "invalid_request_error", "method_not_allowed")
CONFLICT = Expected(409, "invalid_request_error", "", no_retry=True)
RATE = Expected(429, "rate_limit_exceeded", "rate_limit_exceeded", retry_after=True)
UNAVAILABLE = Expected(503, "service_unavailable", "", retry_after=True)


def assert_error_shape(status: int, headers: Any, body: bytes, expected: Expected, request_id: str | None) -> None:
    assert status == expected.status
    assert headers.get("content-type", "").split(";")[0].strip() == "application/json"
    document = json.loads(body)
    assert list(document) == ["error"]
    error = document["error"]
    assert sorted(error) == ["code", "message", "param", "type"]
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"], error["param"]) == (expected.type, expected.code, expected.param)
    if expected.retry_after:
        assert int(headers.get("retry-after", "0")) >= 1
    assert headers.get("x-should-retry") == ("false" if expected.no_retry else None)
    if request_id is not None:
        assert headers.get("x-request-id") == request_id  # §2: the client's own id, echoed


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(gateway_settings(tmp_path), upstream=FakeUpstream(), run_poller=False)
    with TestClient(app, base_url="http://gw", headers={"X-Request-Id": REQUEST_ID}) as test_client:
        yield test_client


def send(method: str, path: str, auth: str | None = "red", **options: Any) -> Provocation:
    """A request; `{id}` in path becomes the id of team red's newest task."""
    headers = {"Authorization": f"Bearer {TOKENS[auth]}"} if auth else {}
    headers.update(options.pop("headers", None) or {})

    def provoke(client: TestClient) -> Any:
        newest = send("GET", CREATE)(client).json()["data"][0]["id"] if "{id}" in path else ""
        return client.request(method, path.format(id=newest), headers=headers, **options)

    return provoke


def create(team: str = "red", headers: dict | None = None, **fields: Any) -> Provocation:
    body = {"model": "doubao-seedance-2.0", "prompt": "a fox", **fields}
    return send("POST", CREATE, team, json=body, headers=headers)


def upstream(status: int | None, retry_after: str | None = None) -> Provocation:
    async def call(*_args: Any, **_kw: Any) -> Reply:
        if status is None:
            raise RuntimeError("a bug in a transport")
        return Reply(status, b'{"error": {"message": "upstream says no"}}', retry_after, 0.001)

    return lambda client: setattr(client.app.gateway.upstream, "call", call)


def steps(*provocations: Provocation) -> Provocation:
    return lambda client: [provoke(client) for provoke in provocations][-1]


def admin_switched_off(_client: TestClient) -> Any:
    with tempfile.TemporaryDirectory() as directory:
        app = create_app(gateway_settings(Path(directory), admin=False), upstream=FakeUpstream(), run_poller=False)
        with TestClient(app, base_url="http://gw", headers={"X-Request-Id": REQUEST_ID}) as other_client:
            return send("GET", "/admin/keys", "admin")(other_client)


def row(description: str, provoke: Provocation, expected: Any, param: str | None = None, **changes: Any) -> Any:
    return pytest.param(provoke, expected._replace(param=param, **changes), id=description)


def hot_rows(path: str) -> list[Any]:
    return [
        row(f"POST {path}: bad key", send("POST", path, "bad", json={}), AUTH),
        row(f"POST {path}: not JSON", send("POST", path, content=b"{"), NOT_JSON),
        row(f"POST {path}: invalid", send("POST", path, json={}), INVALID, "model"),
        row(f"POST {path}: too large", send("POST", path, content=b" " * 5000), TOO_LARGE),
        row(f"GET {path}/<id>: no key", send("GET", f"{path}/cgt-1", None), AUTH),
        row(f"GET {path}/<id>: unknown", send("GET", f"{path}/cgt-nobody"), NO_TASK, "task_id"),
    ]


IDEMPOTENT, POLL = {"Idempotency-Key": "k1"}, CREATE + "/{id}"
ROWS = [
    *hot_rows("/v1/videos/generations"),
    *hot_rows("/api/v1/videos/generations"),
    row("long Idempotency-Key", create(headers={"Idempotency-Key": "k" * 256}), INVALID, "Idempotency-Key"),
    row("list: bad limit", send("GET", f"{CREATE}?limit=x"), INVALID, "limit"),
    row("model not allowed", create("fastonly"), Expected(403, "permission_error", "model_not_allowed"), "model"),
    row("budget exceeded", create("broke"), Expected(429, "insufficient_quota", "budget_exceeded", no_retry=True)),
    row("rate exceeded", steps(create("slow"), create("slow")), RATE),
    row("concurrency", steps(create("busy"), create("busy")), Expected(429, "rate_limit_exceeded",
        "concurrency_limit_exceeded")),
    row("idempotency key reused", steps(create(headers=IDEMPOTENT), create(headers=IDEMPOTENT, duration=6)), CONFLICT,
        code="idempotency_key_reused"),
    row("openai: bad size", send("POST", "/api/v1/videos", json={"prompt": "x", "size": "big"}), INVALID, "size"),
    row("openai: unknown video", send("GET", "/v1/videos/video_nope"), NO_TASK, "video_id"),
    row("openai: spritesheet", send("GET", "/v1/videos/v/content?variant=spritesheet"), UNSUPPORTED, "variant"),
    row("openai: text upload", send("POST", "/v1/videos", data={"prompt": "x"},
        files={"input_reference": ("a.txt", b"hello", "text/plain")}), UNSUPPORTED, "input_reference"),
    row("openai: edits not offered", send("POST", "/v1/videos/edits", json={}), NO_ROUTE),
    row("openai: content not ready", steps(create(), send("GET", "/v1/videos/{id}/content")), CONFLICT,
        code="video_not_ready"),
    row("admin: no token", send("GET", "/admin/keys", None), AUTH),
    row("admin: wrong token", send("GET", "/admin/teams", "bad"), AUTH),
    row("admin: switched off", admin_switched_off, NO_TASK, code="not_found"),
    row("admin: settle bad body", send("POST", "/admin/tasks/t/settle", "admin", json=[1]), INVALID, "video_seconds"),
    row("admin: void unknown id", send("POST", "/admin/tasks/t/void", "admin"), NO_TASK, "task_id"),
    row("admin: void a known task", steps(create(), send("POST", "/admin/tasks/{id}/void", "admin")), CONFLICT,
        code="task_not_unknown"),
    row("admin: bad group_by", send("GET", "/admin/usage?group_by=x", "admin"), INVALID, "group_by"),
    row("metrics: no token", send("GET", "/metrics", None), AUTH),
    row("unknown path", send("GET", "/nowhere"), NO_ROUTE),
    row("wrong method", send("DELETE", "/v1/models"), NO_METHOD),
    row("wrong method on a hot path", send("PUT", "/api/v1/videos/generations"), NO_METHOD),
    row("store unavailable", steps(lambda client: client.app.gateway.store._writer.conn.close(), create()),
        UNAVAILABLE, code="store_unavailable"),  # the store's connection closed under it, as in tests/test_app.py
    row("upstream 5xx on create", steps(upstream(500), create()), Expected(502, "upstream_error",
        "upstream_server_error", no_retry=True)),
    row("upstream 401 on create", steps(upstream(401), create()), UNAVAILABLE, type="upstream_unavailable",
        code="no_upstream_key"),
    row("upstream 429 on poll", steps(create(), upstream(429, "7"), send("GET", POLL)), RATE),
    row("upstream 403 on poll", steps(create(), upstream(403), send("GET", POLL)), Expected(502, "upstream_error",
        "upstream_key_rejected")),
    row("shutting down", steps(lambda client: client.app.gateway.begin_drain(), create()), UNAVAILABLE,
        code="shutting_down"),
    row("transport crash after a create was forwarded", steps(upstream(None), create()), Expected(500, "server_error",
        "internal_error"), no_retry=True),  # kept as `unknown` and charged: a blind retry could pay twice
]  # fmt: skip


@pytest.mark.parametrize(("provoke", "expected"), ROWS)
def test_every_error_is_openai_shaped(client: TestClient, provoke: Provocation, expected: Expected) -> None:
    response = provoke(client)
    assert_error_shape(response.status_code, response.headers, response.content, expected, REQUEST_ID)


STALLED = "{} HTTP/1.1\r\nX-Request-Id: " + REQUEST_ID + "\r\nAuthorization: Bearer {}\r\nContent-Length: 9\r\n\r\n{{"
SLOW_CLIENTS = {  # a request cut short (STALLED: whole headers, 1 byte of a 9-byte body); who sends the 408
    "headers never finished, protocol's 408": "GET /v1/models HTTP/1.1\r\nHost: gw\r\n",
    "create body never sent, route's 408": STALLED.format(f"POST {CREATE}", USER_KEY),
    "admin body never sent, protocol's 408": STALLED.format("POST /admin/tasks/t/settle", TOKENS["admin"]),
}


@pytest.fixture(scope="module")
def slow_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Any, bytes]]]:
    """The gateway under uvicorn with its own protocol on 127.0.0.1, every slow client sent at once."""
    deadlines = {"header_timeout_s": 0.5, "body_timeout_s": 0.8}
    settings = gateway_settings(tmp_path_factory.mktemp("served"), **deadlines)
    port = free_port()
    app = create_app(settings, upstream=FakeUpstream(), run_poller=False)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, 1, **deadlines))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the gateway serving", 10)
    connections = {name: socket.create_connection(("127.0.0.1", port), timeout=10) for name in SLOW_CLIENTS}
    for name, connection in connections.items():
        connection.sendall(SLOW_CLIENTS[name].encode())
    responses = {name: http.client.HTTPResponse(connection) for name, connection in connections.items()}
    for response in responses.values():
        response.begin()
    yield {name: (response, response.read()) for name, response in responses.items()}
    for connection in connections.values():
        connection.close()
    server.should_exit = True
    thread.join(5)


@pytest.mark.parametrize("name", SLOW_CLIENTS)
def test_a_slow_client_gets_an_openai_shaped_408(slow_answers: dict, name: str) -> None:
    response, body = slow_answers[name]
    timed_out = Expected(408, "invalid_request_error", "request_timeout")
    assert_error_shape(response.status, response.headers, body, timed_out, None)  # the request id: below
    assert response.headers.get("connection") == "close"


@pytest.mark.parametrize("name", SLOW_CLIENTS)
def test_a_slow_client_408_carries_the_request_id(slow_answers: dict, name: str) -> None:
    request_id = slow_answers[name][0].headers.get("x-request-id")
    if REQUEST_ID in SLOW_CLIENTS[name]:
        assert request_id == REQUEST_ID  # the client's own, its headers having arrived
    else:
        assert request_id  # a new one
