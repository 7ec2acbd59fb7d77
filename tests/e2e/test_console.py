"""The console in a real browser (SPEC §16): Debian's chromium, driven by Playwright, against a real gateway on
SQLite in front of the simulator with the archive on. Each role signs in and opens every page, the figures are
checked against the API, an archived video plays in the page, a key is issued, rotated and revoked, unknown
outcomes are resolved, and no request ever leaves for another origin. A screenshot of each page is saved under
the run's temporary directory (or CONSOLE_SCREENSHOTS), one per role copied into docs/ by hand for the README."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from gateway.console.fmt import seconds, usd
from tests.conftest import require_binary
from tests.e2e.harness import ADMIN_TOKEN, Gateway, Simulator, body, wait_until

CREATE = "/videos/generations"
PROMPT = "sim:seconds=0.3 a paper boat on a rainy street"
SECRET_PROMPT = "sim:seconds=0.3 the storyboard of an unreleased film"
TEAMS = {"red": {"budget_usd": 40, "video_seconds": 600}, "blue": {"budget_usd": 10}}
USERS = {
    "alice": {"team": "red", "role": "team_admin", "email": "alice@example.com"},
    "bob": {"team": "red"},
    "carol": {"team": "blue"},
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium for the module (the only one that drives a browser): Debian's, never a downloaded one."""
    chromium = require_binary("chromium")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def gw(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("console")
    gateway = Gateway(
        tmp=tmp,
        upstream_url=simulator.url,
        name="console",
        teams=TEAMS,
        users=USERS,
        extra={"archive": {"dir": str(tmp / "videos")}, "poller": {"interval_s": 1}},
    )
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def made(gw: Gateway, simulator: Simulator) -> dict[str, str]:
    """bob's tasks (two TokenHub-shape videos, one OpenAI-shape one with its prompt kept, one failure) and
    carol's one, every one settled and every success archived."""
    with gw.client("bob") as client:
        ids = {name: client.post(CREATE, json=body(prompt=PROMPT)).json()["id"] for name in ("first", "second")}
        ids["failed"] = client.post(CREATE, json=body(prompt="sim:seconds=0.3 sim:fail a storm")).json()["id"]
        openai = client.post("/videos", json={"model": "sora-2", "prompt": SECRET_PROMPT, "seconds": "4"})
        ids["openai"] = openai.json()["id"]
    with gw.client("carol") as client:
        ids["carol"] = client.post(CREATE, json=body(prompt=PROMPT)).json()["id"]
    for name, task_id in ids.items():
        wait_until(lambda t=task_id, n=name: settled(gw, "carol" if n == "carol" else "bob", t), 20, 0.1)
    root = gw.tmp / "videos"
    for name in ("first", "second", "openai", "carol"):
        team = "blue" if name == "carol" else "red"
        wait_until(lambda n=name, t=team: (root / t / ids[n] / "video.mp4").exists(), 20, 0.1)
    return ids


def settled(gw: Gateway, user: str, task_id: str) -> bool:
    with gw.client(user) as client:
        return client.get(f"{CREATE}/{task_id}").json()["status"] in ("succeeded", "failed")


class Visit:
    """A browser context with every request it makes noted, signed in as one credential."""

    def __init__(self, gw: Gateway, context: BrowserContext, shots: Path, role: str) -> None:
        self.gw = gw
        self.context = context
        self.shots = shots
        self.role = role
        self.requests: list[str] = []
        context.on("request", lambda request: self.requests.append(request.url))
        self.page: Page = context.new_page()

    def sign_in(self, credential: str) -> Visit:
        self.page.goto(self.gw.url + "/console/sign-in")
        self.page.fill("#credential", credential)
        self.page.click("form[action='/console/sign-in'] button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/console/$"))
        return self

    def open(self, path: str, shot: str | None = None) -> Page:
        answer = self.page.goto(self.gw.url + path)
        assert answer is not None and answer.status == 200, (path, answer and answer.status)
        if shot:
            self.page.screenshot(path=str(self.shots / f"{self.role}-{shot}.png"), full_page=True)
        return self.page

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def same_origin_only(self) -> None:
        origin = urlsplit(self.gw.url).netloc
        strangers = [url for url in self.requests if urlsplit(url).netloc != origin]
        assert self.requests and not strangers, strangers


@pytest.fixture
def visit(browser: Browser, gw: Gateway, shots: Path) -> Iterator[Any]:
    contexts: list[BrowserContext] = []

    def open_visit(role: str, **options: Any) -> Visit:
        options.setdefault("viewport", {"width": 1280, "height": 900})
        context = browser.new_context(**options)
        contexts.append(context)
        return Visit(gw, context, shots, role)

    yield open_visit
    for context in contexts:
        context.close()


def api_usage(gw: Gateway, user: str) -> dict[str, Any]:
    with gw.client(user) as client:
        return dict(client.get("/usage").json())


def period_start() -> str:
    return datetime.now(UTC).strftime("%Y-%m-01")


def grouped(gw: Gateway, by: str, team: str) -> dict[str, dict[str, Any]]:
    answer = gw.admin("GET", "/admin/usage", params={"group_by": by, "team": team, "since": period_start()})
    return {row[by]: row for row in answer.json()["data"]}


def table_rows(page: Page, selector: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row]
        for row in page.eval_on_selector_all(
            f"{selector} tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))"
        )
    ]


def test_a_member_sees_its_figures_tasks_and_videos_as_the_api_gives_them(gw, made, visit):
    bob = visit("member").sign_in(gw.user_keys["bob"])
    usage = api_usage(gw, "bob")
    page = bob.open("/console/", "overview")
    you, team = page.locator("section.budget").all_inner_texts()
    assert usd(usage["user"]["spent_usd"]) in you and seconds(usage["user"]["video_seconds_spent"]) in you
    assert usd(usage["team"]["spent_usd"]) in team and usd(usage["team"]["budget_usd"]) in team
    assert page.locator("svg.chart rect.bar").count() == 30
    by_model = {row[0]: row for row in table_rows(page, "section:has(h2:text('by model')) table")}
    for model, figures in grouped(gw, "model", "red").items():
        assert by_model[model][1] == str(figures["tasks"]) and by_model[model][6] == usd(figures["cost_usd"])

    page = bob.open("/console/tasks", "tasks")
    with gw.client("bob") as client:
        listed = [task["id"] for task in client.get(CREATE, params={"limit": 20}).json()["data"]]
    shown = [row[1] for row in table_rows(page, "table.tasks")]
    assert shown == listed and made["carol"] not in shown
    covers = page.eval_on_selector_all("table.tasks img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert len(covers) == 3 and all(width == 64 for width in covers)  # the archived successes, drawn
    page = bob.open(f"/console/tasks?status=failed&model={body()['model']}")
    assert [row[1] for row in table_rows(page, "table.tasks")] == [made["failed"]]

    page = bob.open(f"/console/tasks/{made['first']}", "task")
    ready = page.evaluate(
        """async () => { const v = document.querySelector('video'); v.muted = true; await v.play();
           while (v.readyState < 2) { await new Promise(r => setTimeout(r, 50)); } return v.readyState; }"""
    )
    assert ready >= 2
    assert "Request id" in page.inner_text("dl.facts") and "settled: succeeded" in page.inner_text("ol.timeline")
    page = bob.open(f"/console/tasks/{made['openai']}")
    assert SECRET_PROMPT in page.inner_text("dl.facts")
    bob.same_origin_only()

    carol = visit("member").sign_in(gw.user_keys["carol"])
    answer = carol.page.goto(gw.url + f"/console/tasks/{made['openai']}")
    assert answer is not None and answer.status == 404 and SECRET_PROMPT not in carol.page.content()
    assert carol.page.goto(gw.url + f"/console/tasks/{made['first']}/video").status == 404


def test_a_team_admin_issues_rotates_and_revokes_keys(gw, made, visit):
    alice = visit("team-admin", permissions=["clipboard-read", "clipboard-write"]).sign_in(gw.user_keys["alice"])
    page = alice.open("/console/team")
    spend = {row[0]: row for row in table_rows(page, "section:has(h2:text('Spend by user')) table")}
    for user, figures in grouped(gw, "user", "red").items():
        assert spend[user][6] == usd(figures["cost_usd"])

    page.select_option("select[name=user]", "bob")
    page.fill("input[name=label]", "render farm")
    page.click("form[action='/console/team/keys'] button[type=submit]")
    value = page.inner_text("#key-value").strip()
    page.click("button.copy")
    assert page.evaluate("navigator.clipboard.readText()") == value
    page.screenshot(path=str(alice.shots / "team-admin-key-shown.png"), full_page=True)
    assert httpx.get(gw.api + "/usage", headers={"Authorization": f"Bearer {value}"}).status_code == 200
    key_id = page.inner_text("dl.facts dd code")

    page = alice.open("/console/team")
    page.click(f"tr[id='{key_id}'] form[action$='/rotate'] button")
    rotated = page.inner_text("#key-value").strip()
    assert rotated != value and "now revoked" in page.inner_text("dl.facts")
    wait_until(
        lambda: httpx.get(gw.api + "/usage", headers={"Authorization": f"Bearer {value}"}).status_code == 401, 1.5
    )
    new_id = page.inner_text("dl.facts dd code")

    page = alice.open("/console/team")
    page.click(f"tr[id='{new_id}'] form[action$='/revoke'] button")
    page.wait_for_url(re.compile(r".*done=revoked"))
    revoked_at = time.monotonic()
    wait_until(
        lambda: httpx.get(gw.api + "/usage", headers={"Authorization": f"Bearer {rotated}"}).status_code == 401, 1.5
    )
    assert time.monotonic() - revoked_at < 1.5
    assert "revoked" in page.inner_text(f"tr[id='{new_id}']")
    page.screenshot(path=str(alice.shots / "team-admin-team.png"), full_page=True)
    audit = gw.admin("GET", "/admin/audit", params={"actor": "user:alice"}).json()["data"]
    assert [row["action"] for row in audit][-4:] == [
        "api_key.create",
        "api_key.create",
        "api_key.revoke",
        "api_key.revoke",
    ]
    alice.same_origin_only()


def test_the_operator_sees_every_team_and_resolves_unknown_outcomes(gw, made, visit, sim):
    sim.create_then_fail("key-a", status=502, count=2)
    with gw.client("bob") as client:
        for _ in range(2):
            assert client.post(CREATE, json=body(prompt=PROMPT)).status_code == 502
    unknown = [row["task_id"] for row in gw.admin("GET", "/admin/usage").json()["data"] if row["status"] == "unknown"]
    assert len(unknown) == 2

    operator = visit("operator").sign_in(ADMIN_TOKEN)
    page = operator.open("/console/", "teams")
    teams = {row[0]: row for row in table_rows(page, "section:has(h2:text('Every team')) table")}
    for team in gw.admin("GET", "/admin/teams").json()["data"]:
        assert teams[team["name"]][2] == usd(team["spent_usd"]) and teams[team["name"]][4] == usd(team["budget_usd"])
    keys = {row[0]: row for row in table_rows(operator.open("/console/keys", "keys"), "table")}
    for key in gw.admin("GET", "/admin/keys").json()["data"]:
        assert keys[key["name"]][1] == key["key"] and keys[key["name"]][2].startswith(key["state"])
    operator.open("/console/webhooks", "webhooks")
    operator.open("/console/audit", "audit")

    page = operator.open("/console/unknown", "unknown")
    listed = [row[0] for row in table_rows(page, "table")]
    assert sorted(listed) == sorted(unknown)
    first, second = unknown
    page.click(f"tr[id='{first}'] form[action$='/void'] button")
    page.wait_for_url(re.compile(r".*done=voided"))
    page.fill(f"tr[id='{second}'] input[name=video_seconds]", "4")
    page.click(f"tr[id='{second}'] form[action$='/settle'] button")
    page.wait_for_url(re.compile(r".*done=settled"))
    assert table_rows(page, "table")[0][0] == "Nothing waits for a decision."
    rows = {row["task_id"]: row for row in gw.admin("GET", "/admin/usage").json()["data"]}
    assert (rows[first]["status"], rows[first]["cost_usd"], rows[first]["resolved_by"]) == ("voided", 0.0, "admin")
    assert (rows[second]["status"], rows[second]["billed_seconds"]) == ("succeeded", 4.0)

    page = operator.open(f"/console/tasks/{made['openai']}")
    assert "Prompt" not in page.inner_text("dl.facts") and SECRET_PROMPT not in page.content()
    page = operator.open("/console/")
    page.click("form[action='/console/reload'] button")
    page.wait_for_url(re.compile(r".*done=reloaded"))
    operator.same_origin_only()


def test_every_page_works_without_javascript(gw, made, visit):
    bob = visit("member", java_script_enabled=False).sign_in(gw.user_keys["bob"])
    assert "Your team" in bob.open("/console/").content()
    assert made["first"] in bob.open("/console/tasks").content()
    alice = visit("team-admin", java_script_enabled=False).sign_in(gw.user_keys["alice"])
    page = alice.open("/console/team")
    page.click("form[action='/console/team/keys'] button[type=submit]")
    assert page.inner_text("#key-value").startswith("tgw-") and page.locator("button.copy").is_hidden()


def test_pages_fit_a_phone(gw, made, visit):
    phone = visit("member-phone", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.sign_in(gw.user_keys["bob"])
    for path, shot in (
        ("/console/", "overview"),
        ("/console/tasks", "tasks"),
        (f"/console/tasks/{made['first']}", "task"),
    ):
        page = phone.open(path, shot)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path


def test_a_revoked_key_ends_its_console_session_within_a_second(gw, made, visit):
    issued = gw.admin("POST", "/admin/users/bob/keys", json={"label": "console"}).json()
    member = visit("member").sign_in(issued["key"])
    member.open("/console/tasks")
    assert gw.admin("DELETE", f"/admin/api-keys/{issued['id']}").status_code == 200
    started = time.monotonic()
    member.page.goto(gw.url + "/console/tasks")
    assert member.page.url.startswith(gw.url + "/console/sign-in") and time.monotonic() - started < 1.0


def test_security_headers_and_a_form_without_its_token(gw, made):
    with httpx.Client(base_url=gw.url, follow_redirects=False) as client:
        form = client.get("/console/sign-in")
        headers = form.headers
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert (headers["x-content-type-options"], headers["x-frame-options"]) == ("nosniff", "DENY")
        assert (
            headers["referrer-policy"] == "same-origin"
            and "frame-ancestors 'none'" in headers["content-security-policy"]
        )
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        signed = client.post("/console/sign-in", data={"csrf": token, "credential": gw.user_keys["alice"]})
        assert signed.status_code == 303 and "samesite=strict" in signed.headers["set-cookie"].lower()
        before = gw.admin("GET", "/admin/api-keys").json()["data"]
        refused = client.post("/console/team/keys", data={"user": "bob", "label": "no token"})
        assert refused.status_code == 403 and refused.headers["x-frame-options"] == "DENY"
        assert gw.admin("GET", "/admin/api-keys").json()["data"] == before
