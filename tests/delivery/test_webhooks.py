"""Webhook events, Standard Webhooks signing and the background delivery, against a receiver on loopback."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from aiohttp import web
from openai import OpenAI
from standardwebhooks.webhooks import Webhook
from starlette.testclient import TestClient

from gateway.delivery.webhooks import Deliverer, backoff_s, event_items, headers, redacted, sign
from gateway.metrics import Metrics
from gateway.settings import Secret, WebhookEndpoint
from gateway.store.base import Task
from gateway.store.outbox import Item, webhook_topic
from gateway.store.sqlite.store import SQLiteStore
from tests.doubles import USER_KEY, FakeClock, FakeUpstream, make_settings, make_task
from tests.doubles import body as video_body
from tests.store.helpers import created

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def task(**kw) -> Task:
    return make_task(**kw)


def endpoint(url: str = "https://hooks.example/x", **kw) -> WebhookEndpoint:
    return WebhookEndpoint(kw.pop("name", "render"), Secret(url), Secret(kw.pop("secret", SECRET)), **kw)


# ---- pure parts ---------------------------------------------------------------------------------------


def test_signature_verifies_with_standardwebhooks_and_the_openai_sdk():
    now = time.time()
    [item] = event_items([endpoint()], task(), "succeeded", 5000, 1_000_000, now)
    h = headers(SECRET, item, now)
    assert h["webhook-id"] == item.id and h["webhook-timestamp"] == str(int(now))
    assert Webhook(SECRET).verify(item.payload, h)["data"]["id"] == "cgt-1"
    event = OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.unwrap(item.payload, h)
    assert (event.id, event.type) == (item.id, "video.completed")
    tampered = {**h, "webhook-signature": sign(SECRET, item.id, int(now), item.payload + b" ")}
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(SECRET).verify(item.payload, tampered)


def test_events_follow_each_endpoints_teams_and_types():
    eps = [
        endpoint(name="all"),
        endpoint(name="blue-only", teams=frozenset({"blue"})),
        endpoint(name="failures", events=frozenset({"video.failed"})),
    ]
    done = event_items(eps, task(), "succeeded", 15_000, 3_000_000, 1_800_000_000.5)
    assert [i.topic for i in done] == [webhook_topic("all")]
    body = orjson.loads(done[0].payload)
    assert body == {
        "id": done[0].id,
        "object": "event",
        "type": "video.completed",
        "created_at": 1_800_000_000,
        "data": {
            "id": "cgt-1",
            "status": "completed",
            "tokenhub_status": "succeeded",
            "team": "red",
            "user": "alice",
            "model": "doubao-seedance-2.0",
            "cost_usd": 3.0,
            "video_seconds": 15.0,
        },
    }
    for status in ("failed", "cancelled", "expired", "unresolved", "unknown"):
        got = event_items(eps, task(team="blue", task_id=None), status, 0, 0, 1.0)
        assert [i.topic for i in got] == [webhook_topic(n) for n in ("all", "blue-only", "failures")]
        data = orjson.loads(got[0].payload)["data"]
        assert (data["id"], data["status"], data["tokenhub_status"]) == ("r1", "failed", status)
    ids = [i.id for i in got]
    assert len(set(ids)) == 3 and all(i.startswith("evt_") for i in ids)


def test_back_off_doubles_from_the_first_delay_and_stops_at_an_hour():
    assert [backoff_s(5, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_s(5, 11) == 3600 and backoff_s(5, 10_000) == 3600


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://render.internal/hooks/videos", "https://render.internal/hooks/videos"),
        ("https://user:pa55@render.internal:8443/h?token=abc", "https://***@render.internal:8443/h?***"),
        ("http://[::1]:9000/h", "http://[::1]:9000/h"),
    ],
)
def test_urls_are_shown_without_credentials_or_query(url, shown):
    assert redacted(url) == shown


# ---- delivery -----------------------------------------------------------------------------------------


class Receiver:
    """An aiohttp endpoint on loopback: answers `script` statuses in turn (then 200), after `delay_s`."""

    def __init__(self, script: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.script, self.delay_s = list(script or []), delay_s
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.redirected = 0
        self.now_in, self.most_in = 0, 0

    async def hook(self, request: web.Request) -> web.Response:
        self.now_in += 1
        self.most_in = max(self.most_in, self.now_in)
        try:
            body = await request.read()
            await asyncio.sleep(self.delay_s)
            self.seen.append(({k.lower(): v for k, v in request.headers.items()}, body))
            status = self.script.pop(0) if self.script else 200
            if 300 <= status < 400:
                return web.Response(status=status, headers={"Location": "/elsewhere"})
            return web.Response(status=status)
        finally:
            self.now_in -= 1

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected += 1
        return web.Response(status=200)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        app.router.add_route("*", "/elsewhere", self.elsewhere)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def ids(self) -> list[str]:
        return [h["webhook-id"] for h, _ in self.seen]


@pytest.fixture
async def sqlite(tmp_path):
    s = SQLiteStore(str(tmp_path / "gateway.db"))
    await s.open()
    yield s
    await s.close()


async def enqueue(store, ep: WebhookEndpoint, n: int = 1) -> list[Item]:
    out = []
    for _ in range(n):
        now = time.time()
        t = await created(store, now, task_id="cgt-" + uuid.uuid4().hex[:12])
        these = event_items([ep], t, "succeeded", 1000, 200_000, now)
        assert await store.settle(t.task_id, "succeeded", 1000, 200_000, False, b"{}", now, these)
        out += these
    return out


async def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def running(deliverer: Deliverer):
    job = asyncio.create_task(deliverer.run())
    await asyncio.sleep(0)
    return job


async def stopped(deliverer: Deliverer, job: asyncio.Task) -> None:
    deliverer.stop()
    await asyncio.wait_for(job, 5)


async def test_failed_deliveries_are_retried_with_the_same_id_and_fresh_signatures(sqlite):
    async with Receiver(script=[500, 404]) as rx:
        ep = endpoint(rx.url, retry_initial_s=0.05)
        [item] = await enqueue(sqlite, ep)
        metrics = Metrics()
        d = Deliverer(sqlite, metrics, time.time, (ep,))
        job = await running(d)
        await until(lambda: len(rx.seen) == 3)
        await asyncio.sleep(0.1)
        await stopped(d, job)
    assert rx.ids() == [item.id] * 3
    for h, body in rx.seen:
        assert body == item.payload
        Webhook(SECRET).verify(body, h)
        OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.unwrap(body, h)
    s = (await sqlite.outbox_stats([webhook_topic(ep.name)]))[webhook_topic(ep.name)]
    assert (s.backlog, s.delivered, s.failed, s.gave_up, s.last_error) == (0, 1, 2, 0, "HTTP 404")
    get = metrics.registry.get_sample_value
    labels = {"endpoint": ep.name}
    assert get("tokenhub_gateway_webhook_deliveries_total", {**labels, "result": "ok"}) == 1
    assert get("tokenhub_gateway_webhook_deliveries_total", {**labels, "result": "failed"}) == 2


async def test_a_redirect_is_a_failure_and_is_not_followed(sqlite):
    async with Receiver(script=[307, 302]) as rx:
        ep = endpoint(rx.url, retry_initial_s=0.05)
        await enqueue(sqlite, ep)
        d = Deliverer(sqlite, Metrics(), time.time, (ep,))
        job = await running(d)
        await until(lambda: len(rx.seen) == 3)
        await stopped(d, job)
    assert rx.redirected == 0
    assert (await sqlite.outbox_stats([webhook_topic(ep.name)]))[webhook_topic(ep.name)].failed == 2


async def test_an_endpoint_that_never_succeeds_is_given_up_after_the_window(sqlite):
    async with Receiver(script=[500] * 100) as rx:
        ep = endpoint(rx.url, retry_initial_s=0.05)
        await enqueue(sqlite, ep)
        metrics = Metrics()
        d = Deliverer(sqlite, metrics, time.time, (ep,), window_s=0.5)
        job = await running(d)
        topic = webhook_topic(ep.name)
        await until(
            lambda: (
                metrics.registry.get_sample_value(
                    "tokenhub_gateway_webhook_deliveries_total", {"endpoint": ep.name, "result": "gave_up"}
                )
                == 1
            )
        )
        await stopped(d, job)
    s = (await sqlite.outbox_stats([topic]))[topic]
    assert (s.backlog, s.delivered, s.gave_up) == (0, 0, 1) and s.failed == len(rx.seen) >= 2
    assert len(set(rx.ids())) == 1


async def test_a_slow_endpoint_gets_at_most_max_in_flight_deliveries_at_once(sqlite):
    async with Receiver(delay_s=0.2) as rx:
        ep = endpoint(rx.url, max_in_flight=2)
        sent = await enqueue(sqlite, ep, 8)
        d = Deliverer(sqlite, Metrics(), time.time, (ep,))
        job = await running(d)
        await until(lambda: len(rx.seen) == 8)
        await stopped(d, job)
    assert rx.most_in == 2
    assert sorted(rx.ids()) == sorted(i.id for i in sent)


async def test_no_answer_in_time_is_a_failure(sqlite):
    async with Receiver(delay_s=1.0) as rx:
        ep = endpoint(rx.url, retry_initial_s=30)
        await enqueue(sqlite, ep)
        d = Deliverer(sqlite, Metrics(), time.time, (ep,), timeout_s=0.2)
        job = await running(d)
        topic = webhook_topic(ep.name)
        deadline = time.monotonic() + 5
        while (await sqlite.outbox_stats([topic]))[topic].failed == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await stopped(d, job)
    assert (await sqlite.outbox_stats([topic]))[topic].last_error == "no answer within 0.2 s"


async def test_a_reload_without_the_endpoint_gives_its_events_up(sqlite):
    async with Receiver(script=[500] * 10) as rx:
        ep, other = endpoint(rx.url, retry_initial_s=60), endpoint(rx.url, name="other", retry_initial_s=60)
        await enqueue(sqlite, ep, 2)
        await enqueue(sqlite, other, 1)
        d = Deliverer(sqlite, Metrics(), time.time, (ep, other))
        job = await running(d)
        await until(lambda: len(rx.seen) == 3)
        await d.apply((replace(other, max_in_flight=1),))
        await stopped(d, job)
    stats = await sqlite.outbox_stats([webhook_topic("render"), webhook_topic("other")])
    assert (stats[webhook_topic("render")].backlog, stats[webhook_topic("render")].gave_up) == (0, 2)
    assert (stats[webhook_topic("other")].backlog, stats[webhook_topic("other")].gave_up) == (1, 0)


# ---- settings -----------------------------------------------------------------------------------------

BASE = {
    "upstream": {"base_url": "http://127.0.0.1:1/api/v1", "keys": [{"name": "a", "value_env": "K"}]},
    "teams": {"marketing": {}},
}
ENV = {"K": "th-test-key-0123456789", "WS": SECRET}


def test_the_spec_example_endpoint_parses_with_its_defaults():
    from gateway.config import parse_settings

    spec = {
        "name": "render-farm",
        "url": "https://render.internal/hooks/videos",
        "secret_env": "WS",
        "teams": ["marketing"],
        "events": ["video.completed", "video.failed"],
        "retry_initial_s": 5,
        "max_in_flight": 4,
    }
    [ep] = parse_settings({**BASE, "webhooks": [spec]}, ENV).webhooks
    assert (ep.name, ep.url.reveal(), ep.secret.reveal(), ep.teams) == (
        "render-farm",
        "https://render.internal/hooks/videos",
        SECRET,
        frozenset({"marketing"}),
    )
    [plain] = parse_settings(
        {**BASE, "webhooks": [{"name": "x", "url": "http://h/", "secret_env": "WS"}]}, ENV
    ).webhooks
    assert (plain.teams, plain.events, plain.retry_initial_s, plain.max_in_flight) == (
        None,
        frozenset({"video.completed", "video.failed", "budget.threshold_reached"}),  # absent: every event (§15)
        5,
        4,
    )
    assert parse_settings(BASE, ENV).webhooks == ()
    assert SECRET not in repr(parse_settings({**BASE, "webhooks": [spec]}, ENV))


@pytest.mark.parametrize(
    ("hook", "env", "location"),
    [
        ({"url": "https://h/"}, ENV, "webhooks[0].name"),
        ({"name": "x", "secret_env": "WS"}, ENV, "webhooks[0].url"),
        ({"name": "x", "url": "ftp://h/", "secret_env": "WS"}, ENV, "webhooks[0].url"),
        ({"name": "x", "url": "https://h/"}, ENV, "webhooks[0].secret_env"),
        ({"name": "x", "url": "https://h/", "secret_env": "NOPE"}, ENV, "webhooks[0].secret_env"),
        (
            {"name": "x", "url": "https://h/", "secret_env": "WS"},
            {**ENV, "WS": "not-base64!"},
            "webhooks[0].secret_env",
        ),
        (
            {"name": "x", "url": "https://h/", "secret_env": "WS"},
            {**ENV, "WS": "whsec_c2hvcnQ="},
            "webhooks[0].secret_env",
        ),
        ({"name": "x", "url": "https://h/", "secret_env": "WS", "teams": ["No Team!"]}, ENV, "webhooks[0].teams"),
        (
            {"name": "x", "url": "https://h/", "secret_env": "WS", "events": ["video.created"]},
            ENV,
            "webhooks[0].events",
        ),
        ({"name": "x", "url": "https://h/", "secret_env": "WS", "max_in_flight": 0}, ENV, "webhooks[0].max_in_flight"),
        ({"name": "x", "url": "https://h/", "secret_env": "WS", "retry": 1}, ENV, "webhooks[0].retry"),
    ],
)
def test_endpoint_problems_name_their_setting_and_never_the_secret(hook, env, location):
    from gateway.config import ConfigError, parse_settings

    with pytest.raises(ConfigError) as err:
        parse_settings({**BASE, "webhooks": [hook]}, env)
    assert any(p.startswith(location + ":") for p in err.value.problems), err.value.problems
    assert SECRET not in str(err.value) and "c2hvcnQ" not in str(err.value)


def test_two_endpoints_may_not_share_a_name():
    from gateway.config import ConfigError, parse_settings

    hook = {"name": "x", "url": "https://h/", "secret_env": "WS"}
    with pytest.raises(ConfigError, match=r"webhooks\[1\].name"):
        parse_settings({**BASE, "webhooks": [hook, hook]}, ENV)


def test_an_endpoint_may_name_a_team_the_config_does_not_define():
    from gateway.config import parse_settings

    hook = {"name": "x", "url": "https://h/", "secret_env": "WS", "teams": ["marketing", "growth"]}
    [ep] = parse_settings({**BASE, "webhooks": [hook]}, ENV).webhooks  # growth: a team made through the API
    assert ep.teams == frozenset({"marketing", "growth"})


class ThreadedReceiver:
    """A loopback endpoint in a thread of its own, for an app whose loop runs in the TestClient's thread."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], bytes]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> ThreadedReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_endpoint_naming_a_team_made_through_the_api_gets_its_events(tmp_path):
    from gateway.app import create_app

    admin = {"Authorization": "Bearer adm-webhook-test-token"}
    with ThreadedReceiver() as rx:
        settings = make_settings(
            f"sqlite:///{tmp_path / 'gateway.db'}",
            webhooks=[{"name": "growth-hooks", "url": rx.url, "secret_env": "WS", "teams": ["growth"]}],
            server={"admin_token_env": "ADMIN_TOKEN"},
            env={"ADMIN_TOKEN": "adm-webhook-test-token", "WS": SECRET},
        )
        upstream = FakeUpstream()
        app = create_app(settings, upstream=upstream, clock=FakeClock(time.time()))
        with TestClient(app, base_url="http://gw") as client:
            for path, made in (
                ("/admin/teams", {"name": "growth"}),
                ("/admin/users", {"name": "gus", "team": "growth"}),
            ):
                assert client.post(path, json=made, headers=admin).status_code == 201
            key = client.post("/admin/users/gus/keys", json={}, headers=admin).json()["key"]
            for who in (key, USER_KEY):  # growth's task, then red's: only the first is growth's endpoint's
                answer = client.post(
                    "/v1/videos/generations", json=video_body(), headers={"Authorization": f"Bearer {who}"}
                )
                assert answer.status_code == 200, answer.text
                upstream.finish(answer.json()["id"])
                polled = client.get(
                    f"/v1/videos/generations/{answer.json()['id']}", headers={"Authorization": f"Bearer {who}"}
                )
                assert polled.json()["status"] == "succeeded", polled.text
            deadline = time.monotonic() + 10
            while not rx.seen:
                assert time.monotonic() < deadline, "no delivery in time"
                time.sleep(0.02)
            time.sleep(0.2)  # red's event, were it queued for this endpoint, would have gone by now
    [(headers_seen, payload)] = rx.seen
    event = Webhook(SECRET).verify(payload, headers_seen)
    assert (event["type"], event["data"]["team"], event["data"]["user"]) == ("video.completed", "growth", "gus")
