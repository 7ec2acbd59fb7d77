"""The console through the app (in process, SQLite, a fake TokenHub): sign-in and its failures, sessions that end
on sign-out, at their expiry or with their key, the CSRF check of every form, single sign-on from trusted
proxies only, and the security headers on every answer (SPEC §16)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.console.pages import SECURITY_HEADERS
from gateway.console.signin import REFUSED
from gateway.console.throttle import MAX_FAILURES
from gateway.http.asgi import GatewayApp
from tests.doubles import USER_KEY, FakeClock, FakeUpstream, body, make_settings

ADMIN_TOKEN = "adm-console-pages-token"
BOB_KEY = "tgw-console-pages-bob"
PROXY = ("10.0.0.5", 40000)


@dataclass
class Console:
    app: GatewayApp
    clock: FakeClock

    def client(self, peer: tuple[str, int] = ("192.0.2.10", 50000), **headers: str) -> httpx.AsyncClient:
        """A browser at `peer`, with its own cookies."""
        transport = httpx.ASGITransport(app=self.app, client=peer)
        return httpx.AsyncClient(transport=transport, base_url="http://gw", headers=headers, follow_redirects=False)


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'console.db'}",
        server={
            "admin_token_env": "ADMIN_TOKEN",
            "console_session_hours": 1,
            "console_trusted_header": "X-Forwarded-Email",
            "console_trusted_proxies": ["10.0.0.0/8"],
        },
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
        teams={"red": {"budget_usd": 100}, "blue": {}},
        users={
            "alice": {"team": "red", "key": USER_KEY, "role": "team_admin", "email": "alice@example.com"},
            "bob": {"team": "red", "key": BOB_KEY},
        },
    )
    clock = FakeClock(1_750_000_000.0)
    app = create_app(settings, upstream=FakeUpstream(), clock=clock, run_poller=False)
    async with app.router.lifespan_context(app):  # the store open, the roster loaded
        yield Console(app, clock)


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, credential: str) -> httpx.Response:
    form = await client.get("/console/sign-in")
    return await client.post(
        "/console/sign-in", data={"csrf": csrf_of(form), "credential": credential, "next": "/console/"}
    )


def secured(response: httpx.Response) -> bool:
    return all(
        response.headers.get(name) == value for name, value in SECURITY_HEADERS.items() if name != "Cache-Control"
    )


async def test_every_answer_carries_the_security_headers(console):
    async with console.client() as client:
        answers = [
            await client.get("/console/"),
            await client.get("/console/sign-in"),
            await client.get("/console/static/console.css"),
        ]
        answers.append(await client.get("/console/static/nothing.css"))
        answers.append(await client.get("/console/no/such/page"))
        answers.append(await client.delete("/console/tasks"))
        assert (await sign_in(client, BOB_KEY)).status_code == 303
        answers += [
            await client.get(path) for path in ("/console/", "/console/tasks", "/console/team", "/console/tasks/x")
        ]
    assert [answer.status_code for answer in answers] == [303, 200, 200, 404, 404, 404, 200, 200, 403, 404]
    assert all(secured(answer) for answer in answers), [dict(a.headers) for a in answers if not secured(a)]
    assert "default-src 'self'" in answers[1].headers["content-security-policy"]
    assert not re.search(r"<script(?![^>]*\bsrc=\"/console/static/)|\sstyle=|\son[a-z]+=", answers[6].text)


async def test_a_signed_in_member_gets_a_strict_cookie_and_its_pages(console):
    async with console.client() as client:
        signed = await sign_in(client, BOB_KEY)
        cookie = signed.headers["set-cookie"]
        assert signed.headers["location"] == "/console/"
        assert (
            "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower()
        )
        assert "secure" not in cookie.lower()  # plain HTTP, no trusted proxy saying otherwise
        assert BOB_KEY not in cookie
        overview = await client.get("/console/")
    assert overview.status_code == 200 and "bob · red" in overview.text


async def test_wrong_credentials_get_the_same_answer_whatever_was_wrong(console):
    answers = []
    for credential in ("", "tgw-nope", ADMIN_TOKEN + "x", "x" * 600, USER_KEY[:-1]):
        async with console.client((f"192.0.2.{len(answers)}", 1)) as client:
            answers.append(await sign_in(client, credential))
    assert {answer.status_code for answer in answers} == {401}
    pages = {re.sub(r'value="[^"]*"', "", answer.text) for answer in answers}
    assert len(pages) == 1 and REFUSED in pages.pop()


async def test_repeated_failures_from_one_address_are_answered_429_even_with_the_right_key(console):
    async with console.client() as client:
        for _ in range(MAX_FAILURES):
            assert (await sign_in(client, "tgw-wrong")).status_code == 401
        blocked = await sign_in(client, BOB_KEY)
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
        assert (await client.get("/console/")).status_code == 303  # not signed in
    async with console.client(("192.0.2.99", 1)) as elsewhere:
        assert (await sign_in(elsewhere, BOB_KEY)).status_code == 303


async def test_a_form_without_its_token_changes_nothing(console):
    async with console.client() as client:
        assert (await sign_in(client, USER_KEY)).status_code == 303
        team = await client.get("/console/team")
        token = csrf_of(team)
        refused = [
            await client.post("/console/team/keys", data={"user": "bob"}),
            await client.post("/console/team/keys", data={"user": "bob", "csrf": token[:-2] + "xx"}),
            await client.post(
                "/console/team/keys", data={"user": "bob", "csrf": token}, headers={"Origin": "http://evil"}
            ),
            await client.post("/console/sign-out", data={}),
        ]
        assert [answer.status_code for answer in refused] == [403, 403, 403, 403]
        assert all(secured(answer) for answer in refused)
        keys = (await client.get("/admin/api-keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()["data"]
        assert [key for key in keys if key["source"] == "api"] == []  # nothing was issued
        assert (await client.get("/console/")).status_code == 200  # still signed in: the sign-out was refused too
        issued = await client.post("/console/team/keys", data={"user": "bob", "csrf": token, "label": "ci"})
        assert issued.status_code == 200 and "tgw-" in issued.text


async def test_sign_in_form_needs_its_own_token(console):
    async with console.client() as client:
        await client.get("/console/sign-in")
        refused = await client.post("/console/sign-in", data={"credential": BOB_KEY})
    assert refused.status_code == 403 and "tgw_console=" not in refused.headers.get("set-cookie", "")


async def test_sign_out_ends_the_session_everywhere_its_cookie_goes(console):
    async with console.client() as client:
        await sign_in(client, BOB_KEY)
        cookie = client.cookies.get("tgw_console")
        out = await client.post("/console/sign-out", data={"csrf": csrf_of(await client.get("/console/"))})
        assert out.status_code == 303
    async with console.client() as stolen:
        stolen.cookies.set("tgw_console", cookie, domain="gw", path="/console")
        assert (await stolen.get("/console/")).status_code == 303


async def test_a_session_ends_after_its_hours(console):
    async with console.client() as client:
        await sign_in(client, BOB_KEY)
        console.clock.now += 3599
        assert (await client.get("/console/")).status_code == 200
        console.clock.now += 2
        assert (await client.get("/console/")).status_code == 303


async def test_a_session_ends_with_its_key(console):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with console.client() as client:
        issued = (await client.post("/admin/users/bob/keys", json={"label": "console"}, headers=admin)).json()
        assert (await sign_in(client, issued["key"])).status_code == 303
        assert (await client.get("/console/tasks")).status_code == 200
        assert (await client.delete(f"/admin/api-keys/{issued['id']}", headers=admin)).status_code == 200
        assert (await client.get("/console/tasks")).status_code == 303  # this replica: at once
        assert (await sign_in(client, issued["key"])).status_code == 401


async def test_single_sign_on_from_a_trusted_proxy_names_the_user_by_email(console):
    async with console.client(PROXY) as client:
        page = await client.get("/console/", headers={"X-Forwarded-Email": "Alice@Example.com"})
        assert page.status_code == 200 and "alice · red" in page.text and "tgw_console=" in page.headers["set-cookie"]
        assert (await client.get("/console/team")).status_code == 200  # the session holds without the header
        other = await client.get("/console/", headers={"X-Forwarded-Email": "nobody@example.com"})
        assert other.status_code == 401
    async with console.client(("192.0.2.50", 1)) as direct:  # not a trusted proxy: the header means nothing
        assert (await direct.get("/console/", headers={"X-Forwarded-Email": "alice@example.com"})).status_code == 303


async def test_the_operator_sees_every_team_and_no_prompt(console):
    async with console.client(authorization=f"Bearer {USER_KEY}") as api:
        created = await api.post(
            "/v1/videos", json={"model": "sora-2", "prompt": "a secret storyboard", "seconds": "4"}
        )
        video_id = created.json()["id"]
    async with console.client() as member:
        await sign_in(member, USER_KEY)
        assert "a secret storyboard" in (await member.get(f"/console/tasks/{video_id}")).text
    async with console.client() as operator:
        assert (await sign_in(operator, ADMIN_TOKEN)).status_code == 303
        teams = await operator.get("/console/")
        task = await operator.get(f"/console/tasks/{video_id}")
        assert (await operator.get(f"/console/tasks/{video_id}/video")).status_code == 403
    assert teams.status_code == 200 and ">red<" in teams.text and ">blue<" in teams.text
    assert task.status_code == 200 and "a secret storyboard" not in task.text


async def test_tasks_filters_are_checked(console):
    async with console.client(authorization=f"Bearer {USER_KEY}") as api:
        for _ in range(3):
            assert (await api.post("/v1/videos/generations", json=body())).status_code == 200
    async with console.client() as client:
        await sign_in(client, BOB_KEY)
        listed = await client.get("/console/tasks")
        assert listed.status_code == 200 and listed.text.count('href="/console/tasks/cgt-') == 3
        assert (await client.get("/console/tasks?status=succeeded")).text.count('href="/console/tasks/cgt-') == 0
        day = "2025-06-15"  # the fake clock's day
        assert (await client.get(f"/console/tasks?day={day}")).text.count('href="/console/tasks/cgt-') == 3
        for bad in ("status=nope", "model=nope", "day=2025-13-01", "after=%3Cx%3E"):
            assert (await client.get(f"/console/tasks?{bad}")).status_code == 400, bad


async def test_server_console_false_turns_it_off(tmp_path):
    settings = make_settings(f"sqlite:///{tmp_path / 'off.db'}", server={"console": False})
    app = create_app(settings, upstream=FakeUpstream(), clock=FakeClock(), run_poller=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for path in ("/console/", "/console/sign-in", "/console/static/console.css"):
                answer = await client.get(path)
                assert answer.status_code == 404 and answer.json()["error"]["code"] == "route_not_found"


async def test_behind_a_trusted_proxy_the_forwarded_host_is_this_origin(console):
    async with console.client(PROXY) as client:
        await sign_in(client, USER_KEY)
        token = csrf_of(await client.get("/console/team"))
        moved = {"Origin": "https://console.example.com", "X-Forwarded-Host": "console.example.com"}
        issued = await client.post("/console/team/keys", data={"user": "bob", "csrf": token}, headers=moved)
        assert issued.status_code == 200
    async with console.client() as direct:  # the same headers from a peer no one trusts: another site's form
        await sign_in(direct, USER_KEY)
        token = csrf_of(await direct.get("/console/team"))
        refused = await direct.post("/console/team/keys", data={"user": "bob", "csrf": token}, headers=moved)
        assert refused.status_code == 403


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_the_request_came_over_https(console):
    async def signed_cookie(client: httpx.AsyncClient) -> str:
        """The session cookie a sign-in sets (the form's own cookie handed back by hand: it may be Secure)."""
        form = await client.get("/console/sign-in")
        secret = form.headers["set-cookie"].split(";")[0]
        answer = await client.post(
            "/console/sign-in", data={"csrf": csrf_of(form), "credential": BOB_KEY}, headers={"cookie": secret}
        )
        assert answer.status_code == 303
        return answer.headers.get_list("set-cookie")[0].lower()

    async with console.client(PROXY, **{"x-forwarded-proto": "https"}) as client:
        assert "tgw_console=" in (cookie := await signed_cookie(client)) and "; secure" in cookie
    async with console.client(**{"x-forwarded-proto": "https"}) as untrusted:
        assert "tgw_console=" in (cookie := await signed_cookie(untrusted)) and "; secure" not in cookie
