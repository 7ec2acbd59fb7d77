"""routes.read_body: a body whole, in one message or many, within its size and time limits; the answer an
outcome becomes. A TokenHub-shape create through the app: the prompt it keeps (its team's console shows it,
the operator's pages and the admin routes never do), and its task listed as soon as its create is answered."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.app import create_app
from gateway.context import Outcome
from gateway.errors import BodyTooLarge, RequestTimeout
from gateway.http.request import JSON, outcome_response, read_body
from tests.doubles import USER_KEY, FakeClock, FakeUpstream, body, make_settings

ADMIN_TOKEN = "adm-generations-prompt-token"
CAROL_KEY = "tgw-generations-carol"
PROMPT = "A lighthouse keeper paints storyboard 7 in the fog"
UNKNOWN_PROMPT = "A tram crosses storyboard 9 at night"


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


def app_of(tmp_path, upstream: FakeUpstream):
    settings = make_settings(
        f"sqlite:///{tmp_path / 'generations.db'}",
        server={"admin_token_env": "ADMIN_TOKEN"},
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
        teams={"red": {}, "blue": {}},
        users={"alice": {"team": "red", "key": USER_KEY}, "carol": {"team": "blue", "key": CAROL_KEY}},
    )
    return create_app(settings, upstream=upstream, clock=FakeClock(1_750_000_000.0), run_poller=False)


def browser(app, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", headers=headers)


@asynccontextmanager
async def signed_in(app, credential: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser signed in to the console with `credential`."""
    async with browser(app) as client:
        form = await client.get("/console/sign-in")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text
        signed = await client.post(
            "/console/sign-in", data={"csrf": csrf.group(1), "credential": credential, "next": "/console/"}
        )
        assert signed.status_code == 303, signed.text
        yield client


async def test_a_tokenhub_shape_create_keeps_its_prompt_for_its_own_teams_console_alone(tmp_path):
    upstream = FakeUpstream()
    app = app_of(tmp_path, upstream)
    async with app.router.lifespan_context(app), browser(app, authorization=f"Bearer {USER_KEY}") as api:
        made = await api.post("/v1/videos/generations", json=body(prompt=PROMPT, aspect_ratio="9:16"))
        assert made.status_code == 200, made.text
        task_id = made.json()["id"]
        upstream.status = 500  # the next create's outcome is unknown: it waits on the operator's page
        assert (await api.post("/v1/videos/generations", json=body(prompt=UNKNOWN_PROMPT))).status_code >= 500
        kept = (await app.gateway.store.get_task(task_id)).meta
        assert orjson.loads(kept) == {"v": 1, "aspect_ratio": "9:16", "prompt": PROMPT}
        async with signed_in(app, USER_KEY) as alice:
            own = await alice.get(f"/console/tasks/{task_id}")
        async with signed_in(app, CAROL_KEY) as carol:
            other_team = await carol.get(f"/console/tasks/{task_id}")
        async with signed_in(app, ADMIN_TOKEN) as operator:
            pages = {path: await operator.get(path) for path in ("/console/", f"/console/tasks/{task_id}")}
            for path in ("/console/unknown", "/console/keys", "/console/webhooks", "/console/audit"):
                pages[path] = await operator.get(path)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path in ("/admin/usage", "/admin/usage?format=csv", "/admin/usage?format=json"):
            pages[path] = await api.get(path, headers=admin)
    assert own.status_code == 200 and PROMPT in own.text
    assert other_team.status_code == 404 and PROMPT not in other_team.text
    assert all(page.status_code == 200 for page in pages.values()), {p: r.status_code for p, r in pages.items()}
    assert task_id in pages[f"/console/tasks/{task_id}"].text and "tram" not in pages["/console/"].text
    assert pages["/console/unknown"].text.count("void") >= 1  # the unknown create is listed, without its prompt
    for path, page in pages.items():
        assert PROMPT not in page.text and UNKNOWN_PROMPT not in page.text, path
        assert "storyboard" not in page.text, path


async def test_a_task_is_listed_as_soon_as_its_create_is_answered(tmp_path):
    app = app_of(tmp_path, FakeUpstream())
    async with app.router.lifespan_context(app), browser(app, authorization=f"Bearer {USER_KEY}") as api:

        async def create_then_list() -> bool:
            made = await api.post("/v1/videos/generations", json=body())
            listed = await api.get("/v1/videos/generations", params={"limit": 100})
            return made.json()["id"] in {item["id"] for item in listed.json()["data"]}

        assert all(await asyncio.gather(*(create_then_list() for _ in range(8))))  # the default key holds 10
