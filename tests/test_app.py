"""The app in-process with a fake upstream and an injected clock: settlement, periods, coalescing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import Settings
from tests.doubles import UPSTREAM_KEY, USER_KEY, FakeClock, FakeUpstream, make_settings

NOV_30_23H = 1796079600.0  # 2026-11-30T23:00:00Z


def unit_settings(tmp_path: Path, **team: Any) -> Settings:
    return make_settings(f"sqlite:///{tmp_path / 'unit.db'}", teams={"red": team})


@pytest.fixture
def app_parts(tmp_path: Path) -> Iterator[tuple[TestClient, FakeUpstream, FakeClock, Metrics]]:
    clock = FakeClock(NOV_30_23H)
    upstream = FakeUpstream()
    metrics = Metrics()
    app = create_app(
        unit_settings(tmp_path, budget_usd=2.0), upstream=upstream, clock=clock, metrics=metrics, run_poller=False
    )
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        yield client, upstream, clock, metrics


def create(client: TestClient, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    return client.post(
        "/v1/videos/generations", json={"model": "doubao-seedance-2.0", "prompt": "a fox", **kw}, headers=headers
    )


def test_exact_costs_and_settlement_once(app_parts):
    client, upstream, clock, metrics = app_parts
    tid = create(client).json()["id"]
    assert client.get("/v1/usage").json()["team"]["reserved_usd"] == 1.0
    upstream.finish(tid)
    for _ in range(5):
        clock.now += 1.5  # past the 1 s coalescing window each time
        assert client.get(f"/v1/videos/generations/{tid}").json()["status"] == "succeeded"
    team = client.get("/v1/usage").json()["team"]
    assert (team["spent_usd"], team["reserved_usd"], team["remaining_usd"]) == (1.0, 0.0, 1.0)
    assert (
        metrics.registry.get_sample_value(
            "tokenhub_gateway_spend_usd_total", {"team": "red", "model": "doubao-seedance-2.0", "resolution": "720p"}
        )
        == 1.0
    )
    polls = [c for c in upstream.calls if c[0] == "GET"]
    assert len(polls) == 1  # terminal answers come from the gateway's cache


def test_failed_task_costs_nothing(app_parts):
    client, upstream, clock, _ = app_parts
    tid = create(client, duration=10).json()["id"]
    upstream.finish(tid, "failed")
    client.get(f"/v1/videos/generations/{tid}")
    team = client.get("/v1/usage").json()["team"]
    assert (team["spent_usd"], team["reserved_usd"]) == (0.0, 0.0)


def test_polls_of_a_running_task_reach_upstream_once_per_second(app_parts):
    client, upstream, clock, _ = app_parts
    tid = create(client).json()["id"]
    for _ in range(10):
        client.get(f"/v1/videos/generations/{tid}")
    assert sum(1 for c in upstream.calls if c[0] == "GET") == 1


def test_a_task_counts_in_the_period_it_was_created_in(app_parts):
    client, upstream, clock, _ = app_parts
    first = create(client).json()["id"]
    assert create(client).status_code == 200
    assert create(client).json()["error"]["code"] == "budget_exceeded"  # $2 of $2 reserved in November
    clock.now += 2 * 3600  # 2026-12-01T01:00Z: a new month
    upstream.finish(first)
    client.get(f"/v1/videos/generations/{first}")
    usage = client.get("/v1/usage").json()
    assert usage["period"]["start"].startswith("2026-12-01")
    assert (usage["team"]["spent_usd"], usage["team"]["reserved_usd"]) == (0.0, 0.0)
    assert create(client).status_code == 200  # December's budget is untouched by November's tasks


def test_money_is_exact_in_json(app_parts):
    client, upstream, clock, _ = app_parts
    ids = [
        create(client, model="doubao-seedance-2.0-fast", resolution="480p", duration=4).json()["id"] for _ in range(3)
    ]
    for tid in ids:
        upstream.finish(tid)
        clock.now += 1.5
        client.get(f"/v1/videos/generations/{tid}")
    assert client.get("/v1/usage").json()["team"]["spent_usd"] == 1.2  # 3 × 4 s × $0.10, not 1.2000000000000002


def test_a_broken_store_answers_503_and_charges_nothing(app_parts):
    client, upstream, clock, _ = app_parts
    store = client.app.gateway.store
    store._writer.conn.close()  # what a vanished disk looks like from here: every statement fails
    reply = create(client)
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "store_unavailable" and reply.headers["Retry-After"]
    assert upstream.calls == []  # no spend without accounting
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_an_unexpected_failure_is_an_openai_shaped_500_with_the_request_id(app_parts):
    client, upstream, clock, _ = app_parts
    upstream.raises = RuntimeError("a bug in a transport")
    reply = create(client, headers={"X-Request-Id": "trace-me-1"})
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "server_error"
    assert reply.headers["x-request-id"] == "trace-me-1"
    usage = client.get("/v1/usage").json()["team"]
    # The transport failed after the create was handed to it: TokenHub may have made the task, so it
    # is charged at its estimate and kept as `unknown` for an operator to resolve.
    assert (usage["reserved_usd"], usage["spent_usd"], usage["tasks_in_flight"]) == (0.0, 1.0, 0)


def test_hot_routes_and_the_router_answer_alike(app_parts):
    """Creates and polls skip starlette's router; every neighbouring path and method still gets its answer."""
    client, upstream, clock, metrics = app_parts
    tid = create(client).json()["id"]
    for prefix in ("/v1", "/api/v1"):
        assert client.get(f"{prefix}/videos/generations/{tid}").json()["id"] == tid
        assert client.head(f"{prefix}/videos/generations/{tid}").status_code == 200
        assert client.get(f"{prefix}/videos/generations").json()["data"][0]["id"] == tid
        for method, path, status, code in [
            ("POST", "/videos/generations/", 404, "route_not_found"),
            ("PUT", "/videos/generations", 405, "method_not_allowed"),
            ("POST", f"/videos/generations/{tid}", 405, "method_not_allowed"),
            ("GET", f"/videos/generations/{tid}/more", 404, "route_not_found"),
            ("GET", "/videos/generations/", 404, "route_not_found"),
        ]:
            reply = client.request(method, prefix + path, json={})
            assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), (method, path)
            assert reply.headers["x-request-id"]
    assert client.get("/v1/videos/generations/cgt-nobody").json()["error"]["code"] == "task_not_found"
    reply = client.post(
        "/api/v1/videos/generations", json={"model": "doubao-seedance-2.0"}, headers={"X-Request-Id": "hot-1"}
    )
    assert (reply.status_code, reply.json()["error"]["param"], reply.headers["x-request-id"]) == (
        400,
        "prompt",
        "hot-1",
    )

    def served(route: str, status: str) -> float:
        return (
            metrics.registry.get_sample_value(
                "tokenhub_gateway_requests_total",
                {"route": route, "method": "GET" if "{" in route else "POST", "code": status, "team": "red"},
            )
            or 0
        )

    assert served("/videos/generations/{task_id}", "200") == 2
    assert served("/videos/generations", "200") == 1 and served("/videos/generations", "400") == 1


class Teapot(Exception):
    """An exception some later feature might raise, with a handler registered for it."""


def test_a_registered_handler_answers_on_hot_routes_as_on_every_route(tmp_path):
    from starlette.responses import JSONResponse

    from gateway.http.asgi import handler_for

    async def on_teapot(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"code": "teapot"}}, 418)

    app = create_app(unit_settings(tmp_path), upstream=FakeUpstream(raises=Teapot()), run_poller=False)
    app.add_exception_handler(Teapot, on_teapot)
    assert handler_for({Exception: 1}, Teapot()) == 1 and handler_for({Teapot: 2}, RuntimeError()) is None
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        reply = create(client)  # a hot route
        assert (reply.status_code, reply.json()["error"]["code"]) == (418, "teapot")


def test_middleware_given_to_the_app_wraps_hot_routes_too(tmp_path):
    from starlette.middleware import Middleware

    seen: list[str] = []

    class Tap:
        def __init__(self, app: Any, tag: str) -> None:
            self.app, self.tag = app, tag

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(f"{self.tag} {scope['method']} {scope['path']}")
            await self.app(scope, receive, send)

    app = create_app(unit_settings(tmp_path), upstream=FakeUpstream(), run_poller=False)
    app.user_middleware.insert(0, Middleware(Tap, tag="tap"))
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        tid = create(client).json()["id"]
        client.get(f"/v1/videos/generations/{tid}")
        client.get("/v1/models")
    assert seen == ["tap POST /v1/videos/generations", f"tap GET /v1/videos/generations/{tid}", "tap GET /v1/models"]


def test_while_draining_new_requests_are_refused_and_probes_still_answer(app_parts):
    client, upstream, clock, _ = app_parts
    client.app.gateway.begin_drain()
    reply = create(client)
    assert (reply.status_code, reply.json()["error"]["code"]) == (503, "shutting_down")
    assert reply.headers["connection"] == "close" and reply.headers["retry-after"] == "1"
    assert upstream.calls == []
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["problems"] == ["shutting_down"]


def test_tokenhubs_words_reach_clients_of_either_shape_scrubbed_of_keys(app_parts):
    """The stored answer is TokenHub's own (SPEC §4 "Scrubbing removes keys, not look-alikes"), so every
    way its text reaches a client scrubs it: the TokenHub shape's poll and the OpenAI shape's Video
    objects (a failed video's `error.message` is TokenHub's), live, from memory and listed."""
    client, upstream, clock, _ = app_parts
    tid = create(client).json()["id"]
    upstream.finish(tid, "failed")
    upstream.tasks[tid]["error"] = {"code": "generation_failed", "message": f"key {UPSTREAM_KEY} was used"}
    answers = [
        client.get(f"/v1/videos/{tid}"),
        client.get(f"/v1/videos/generations/{tid}"),
        client.get(f"/v1/videos/generations/{tid}"),
        client.get(f"/v1/videos/{tid}"),
        client.get("/v1/videos"),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert UPSTREAM_KEY not in answer.text, answer.text
        assert "key th-*** was used" in answer.text, answer.text
