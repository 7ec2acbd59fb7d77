"""Money and secrets under any answer (SPEC §4 "What the gateway does not take on trust"): the real
server on loopback against the simulator, on both stores where the books are kept differently."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.harness import KEYS, Gateway, Simulator, body, wait_until
from tests.redis_server import RedisServer, require_redis_server

CREATE = "/videos/generations"
QUIET_POLLER = {"poller": {"interval_s": 30}}  # only client polls reach upstream, unless a test wants it


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway], store_url: str | None) -> Callable[..., Gateway]:
    def make(**kw: Any) -> Gateway:
        kw.setdefault("teams", {"red": {"budget_usd": 10.0}, "blue": {}})
        return make_gateway(store_url=store_url, **kw)

    return make


def usage(c: httpx.Client) -> dict[str, Any]:
    return c.get("/usage").json()["team"]


def ledger(gw: Gateway, **query: str) -> list[dict[str, Any]]:
    r = gw.admin("GET", "/admin/usage", params=query)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def books_balance(gw: Gateway, c: httpx.Client) -> None:
    """What every test ends with: nothing reserved below zero, spent = Σ ledger costs, in flight = unsettled."""
    team = usage(c)
    rows = [r for r in ledger(gw, team="red")]
    assert team["reserved_usd"] >= 0, team
    assert round(team["spent_usd"], 6) == round(sum(r["cost_usd"] or 0 for r in rows if r["settled_at"]), 6)
    assert team["tasks_in_flight"] == sum(1 for r in rows if r["settled_at"] is None), (team, rows)


def poll_until_settled(c: httpx.Client, task_id: str) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        data = c.get(f"{CREATE}/{task_id}").json()
        return data if data.get("status") in ("succeeded", "failed") else None

    return wait_until(settled, timeout=20, interval=0.2)


# --- figures from TokenHub --------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage_patch",
    [
        {"video_duration": 1e14},
        {"video_duration": "5"},
        {"video_duration": -1},
        {"video_duration": None},
        {"video_duration": 0},
        {"video_duration": 5, "input_video_duration": 1e300},
    ],
)
def test_absurd_usage_settles_at_the_estimate_once(gateway, sim: Simulator, usage_patch):
    """Out-of-range figures settle at the estimate, flagged and counted; later polls change nothing,
    and the $10 team is never admitted more than $10 of work afterwards."""
    gw = gateway(extra=QUIET_POLLER)
    with gw.client("alice") as c:
        tid = c.post(CREATE, json=body(prompt="sim:seconds=0.3 a fox", duration=5)).json()["id"]
        sim.script_poll(tid, count=None, patch={"status": "succeeded", "usage": usage_patch})
        for _ in range(3):
            assert c.get(f"{CREATE}/{tid}").status_code == 200
        row = next(r for r in ledger(gw) if r["task_id"] == tid)
        assert (row["status"], row["cost_usd"], row["cost_estimated"]) == ("succeeded", 1.0, True), row
        team = usage(c)
        assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0), team
        assert gw.metric("tokenhub_gateway_settlement_anomalies_total") >= 1
        admitted = sum(
            c.post(CREATE, json=body(prompt="sim:never x", duration=5)).status_code == 200 for _ in range(12)
        )
        assert admitted == 9  # $1 spent + 9 × $1 reserved = the $10 budget, never more
        books_balance(gw, c)


def test_tokenhub_input_seconds_win_over_the_clients(gateway, sim: Simulator):
    gw = gateway(extra=QUIET_POLLER)
    with gw.client("alice") as c:
        r = c.post(
            CREATE,
            json=body(
                prompt="sim:seconds=0.3 edit", duration=5, video_urls=["https://v.example/a.mp4"], video_durations=[2]
            ),
        )
        tid = r.json()["id"]
        sim.script_poll(
            tid, count=None, patch={"status": "succeeded", "usage": {"video_duration": 5, "input_video_duration": 10}}
        )
        c.get(f"{CREATE}/{tid}")
        row = next(r for r in ledger(gw) if r["task_id"] == tid)
        assert (row["cost_usd"], row["billed_seconds"], row["cost_estimated"]) == (3.0, 15.0, False), row


# --- creates whose outcome is unknown --------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "code", "reason"),
    [
        ("late", 504, "upstream_timeout", "timeout"),
        ("fail", 502, "upstream_server_error", "server_error"),
        ("cut", 502, "upstream_bad_response", "cut_off"),
    ],
)
def test_a_create_with_an_unknown_outcome_is_charged_and_listed(gateway, sim: Simulator, fault, status, code, reason):
    gw = gateway(extra={"upstream": {"timeout_s": 1}})
    if fault == "late":
        sim.late_create("key-a", delay_s=3)
    elif fault == "fail":
        sim.create_then_fail("key-a", status=502)
    else:
        sim.cut("key-a")
    with gw.client("alice") as c:
        r = c.post(CREATE, json=body(duration=5), headers={"Idempotency-Key": f"once-{fault}"})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.headers["x-should-retry"] == "false"
        retry = c.post(CREATE, json=body(duration=5), headers={"Idempotency-Key": f"once-{fault}"})
        assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (status, "true")
        assert retry.headers["x-should-retry"] == "false"  # the SDKs would retry a 5xx replay again
        assert len(sim.created_task_ids()) == 1  # TokenHub made one task, and only one
        rows = ledger(gw)
        assert [(x["status"], x["cost_usd"], x["cost_estimated"]) for x in rows] == [("unknown", 1.0, True)]
        team = usage(c)
        assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0), team
        assert gw.metric("tokenhub_gateway_tasks_unknown_total", team="red", reason=reason) == 1
        books_balance(gw, c)

        ref = rows[0]["task_id"]
        voided = gw.admin("POST", f"/admin/tasks/{ref}/void")
        assert voided.status_code == 200, voided.text
        assert (voided.json()["cost_usd"], voided.json()["cost_estimated"]) == (0.0, False)
        assert usage(c)["spent_usd"] == 0.0
        # A resolved row is final (SPEC §4 "Operator resolutions are strict"): a second resolution is 409.
        for how, resolution in (("void", None), ("settle", {"video_seconds": 4})):
            again = gw.admin("POST", f"/admin/tasks/{ref}/{how}", json=resolution)
            assert (again.status_code, again.json()["error"]["code"]) == (409, "task_not_unknown"), again.text
        assert usage(c)["spent_usd"] == 0.0
        books_balance(gw, c)


def test_admin_resolution_refuses_what_is_not_unknown(gateway, sim: Simulator):
    gw = gateway()
    with gw.client("alice") as c:
        tid = c.post(CREATE, json=body(prompt="sim:never x")).json()["id"]
    r = gw.admin("POST", f"/admin/tasks/{tid}/void")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "task_not_unknown")
    r = gw.admin("POST", "/admin/tasks/cgt-nobody/settle", json={"video_seconds": 5})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "task_not_found")
    r = gw.admin("POST", f"/admin/tasks/{tid}/settle", json={"video_seconds": 1e9})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "video_seconds")


def test_a_duplicate_task_id_is_an_upstream_fault_that_opens_nothing(gateway, sim: Simulator):
    """TokenHub answers a create with an id the gateway holds for another team: 502, an `unknown`
    row, no access to the other team's task, and the poller goes on settling everything else."""
    gw = gateway(extra={"poller": {"interval_s": 1}})
    with gw.client("alice") as alice, gw.client("bob") as bob:
        first = alice.post(CREATE, json=body(prompt="sim:seconds=1 first")).json()["id"]
        sim.fixed_id("key-a", first)
        r = bob.post(CREATE, json=body(prompt="sim:seconds=1 second"))
        assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_bad_response"), r.text
        assert bob.get(f"{CREATE}/{first}").status_code == 404
        assert [x["status"] for x in ledger(gw, team="blue")] == ["unknown"]
        later = bob.post(CREATE, json=body(prompt="sim:seconds=1 third")).json()["id"]
        wait_until(lambda: all(x["settled_at"] for x in ledger(gw)), timeout=20)
        statuses = {x["task_id"]: x["status"] for x in ledger(gw)}
        assert statuses[first] == statuses[later] == "succeeded", statuses


# --- what reaches the client -----------------------------------------------------------------


KEY_FORMS = (
    KEYS["key-a"],
    "".join(f"\\u{ord(ch):04x}" for ch in KEYS["key-a"]),  # JSON-escaped, as the text of a JSON string
    "".join(f"%{ord(ch):02X}" for ch in KEYS["key-a"]),
)
# Look-alikes are not keys (SPEC §4 "Scrubbing removes keys, not look-alikes"): they reach clients as sent.
ECHOED = f"bad key {' / '.join(KEY_FORMS)} / th\\u002dlooks-like-a-key / width-1280"
SHOWN = "bad key th-*** / th-*** / th-*** / th-looks-like-a-key / width-1280"


def echoed_answer(**fields: Any) -> str:
    """TokenHub's answer as JSON text, with a `note` that echoes the key in every form."""
    return json.dumps(fields)[:-1] + f', "note": "{ECHOED}"}}'


def assert_scrubbed(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert not any(form in r.text for form in KEY_FORMS), r.text
    return r.json()


def test_key_values_are_scrubbed_from_everything_clients_see(gateway, sim: Simulator):
    """Creates refused (and their replays), poll errors, live polls and terminal polls (live, then from
    memory): the configured key is removed in every form; nothing else is rewritten. A terminal poll
    from the store after a restart: tests/flow/test_polls.py."""
    gw = gateway(extra=QUIET_POLLER)
    sim.fault("key-a", "answer", routes=["create"], count=1, status=400, raw=echoed_answer(error={"code": "x"}))
    with gw.client("alice") as c:
        once = {"Idempotency-Key": "refused-once"}
        for _ in range(2):  # the answer, then its replay
            assert assert_scrubbed(c.post(CREATE, json=body(), headers=once), 400)["note"] == SHOWN
        task_id = c.post(CREATE, json=body(prompt="sim:never a fox")).json()["id"]
        sim.script_poll(task_id, status=404, raw=echoed_answer(error={"code": "task_not_found"}))
        assert assert_scrubbed(c.get(f"{CREATE}/{task_id}"), 404)["note"] == SHOWN
        sim.script_poll(task_id, raw=echoed_answer(id=task_id, status="running"))
        assert assert_scrubbed(c.get(f"{CREATE}/{task_id}"), 200)["note"] == SHOWN
        time.sleep(1.1)  # past the coalescing window
        sim.script_poll(task_id, raw=echoed_answer(id=task_id, status="succeeded", usage={"video_duration": 5}))
        live = assert_scrubbed(c.get(f"{CREATE}/{task_id}"), 200)
        assert (live["status"], live["note"]) == ("succeeded", SHOWN)
        assert assert_scrubbed(c.get(f"{CREATE}/{task_id}"), 200) == live  # from memory
    assert len(sim.requests("poll")) == 3


def test_result_urls_that_look_like_keys_are_used_and_shown_as_sent(gateway, sim: Simulator):
    """`width-1280`, `month-12x` and a URL-safe signature with `th-` inside are not keys: a result URL
    holding them is stored, shown and fetched exactly as TokenHub sent it (here in the path, which the
    simulator signs, so a rewritten URL is refused)."""
    task_id = f"cgt-width-1280-month-12x-QUJD_th-REVGR0hJ-Sk0-{secrets.token_hex(4)}"
    gw = gateway(extra={**QUIET_POLLER, "upstream": {"media_allow_networks": ["127.0.0.0/8"]}})
    sim.fixed_id("key-a", task_id)
    with gw.client("alice") as c:
        assert c.post(CREATE, json=body(prompt="sim:seconds=0.3 look-alikes")).json()["id"] == task_id
        done = poll_until_settled(c, task_id)
        assert f"/media/{task_id}.mp4?" in done["data"][0]["video_url"], done
        assert c.get(f"{CREATE}/{task_id}").json() == done  # from memory
        content = c.get(f"/videos/{task_id}/content")  # from the stored answer: the task is settled
        assert (content.status_code, content.content) == (200, sim.expected_bytes(task_id)), content.text
    assert [d["path"] for d in sim.downloads()] == [f"/media/{task_id}.mp4"]


# --- answers of any size -----------------------------------------------------------------------

SMALL_ANSWERS = {"upstream": {"max_answer_bytes": 4096}}
PADDING = {"padding": "x" * 5000}  # an answer over SMALL_ANSWERS' limit


def test_an_oversized_answer_to_a_create_is_an_unknown_outcome(make_gateway, sim: Simulator):
    gw = make_gateway(extra=SMALL_ANSWERS)
    sim.fault("key-a", "answer", routes=["create"], count=1, patch=PADDING)
    with gw.client("alice") as c:
        r = c.post(CREATE, json=body(duration=5))
        assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_bad_response"), r.text
        assert r.headers["x-should-retry"] == "false"
        assert len(sim.created_task_ids()) == 1
        assert [(x["status"], x["cost_usd"], x["cost_estimated"]) for x in ledger(gw)] == [("unknown", 1.0, True)]
        team = usage(c)
        assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0), team
        assert gw.metric("tokenhub_gateway_tasks_unknown_total", team="red", reason="too_large") == 1
        assert c.post(CREATE, json=body(duration=5)).status_code == 200  # the key is still fine
        books_balance(gw, c)


def test_an_oversized_answer_to_a_poll_is_502_and_changes_nothing(make_gateway, sim: Simulator):
    gw = make_gateway(extra={**SMALL_ANSWERS, **QUIET_POLLER})
    with gw.client("alice") as c:
        task_id = c.post(CREATE, json=body(prompt="sim:seconds=0.3 a fox", duration=5)).json()["id"]
        wait_until(lambda: sim.task(task_id)["status"] == "succeeded", timeout=10)
        sim.script_poll(task_id, patch=PADDING)
        r = c.get(f"{CREATE}/{task_id}")
        assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream_bad_response"), r.text
        row = next(x for x in ledger(gw) if x["task_id"] == task_id)
        assert (row["status"], row["settled_at"]) == ("queued", None), row
        assert usage(c)["reserved_usd"] == 1.0
        time.sleep(1.1)  # past the coalescing window
        done = c.get(f"{CREATE}/{task_id}").json()
        assert (done["status"], "padding" in done) == ("succeeded", False), done
        row = next(x for x in ledger(gw) if x["task_id"] == task_id)
        assert (row["status"], row["cost_usd"], row["cost_estimated"]) == ("succeeded", 1.0, False), row
        books_balance(gw, c)


def test_numeric_query_parameters_take_ascii_digits_only(gateway, sim: Simulator):
    gw = gateway()
    with gw.client("alice") as c:
        for value in ("²", "١٠", "5x"):
            r = c.get(CREATE, params={"limit": value})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "limit"), (value, r.text)


# --- shutdown --------------------------------------------------------------------------------


def test_sigterm_during_slow_creates_records_each_outcome_and_exits_in_time(make_gateway, sim: Simulator):
    grace = 2
    gw = make_gateway(extra={"server": {"shutdown_grace_s": grace}, "upstream": {"timeout_s": 30}})
    sim.late_create("key-a", delay_s=0.8)  # answers within the grace period: a task
    answers: list[httpx.Response] = []

    def create(prompt: str) -> None:
        with gw.client("alice", timeout=30) as c:
            try:
                answers.append(c.post(CREATE, json=body(prompt=prompt)))
            except httpx.HTTPError:
                pass  # cut by the shutdown deadline

    threads = [threading.Thread(target=create, args=("sim:never quick",))]
    threads[0].start()
    wait_until(lambda: len(sim.creates()) == 1, timeout=5, interval=0.02)
    sim.late_create("key-a", delay_s=10)  # still waiting at the deadline: unknown
    threads.append(threading.Thread(target=create, args=("sim:never slow",)))
    threads[1].start()
    wait_until(lambda: len(sim.creates()) == 2, timeout=5, interval=0.02)
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=grace + 5) == 0
    took = time.monotonic() - started
    assert took <= grace + 1, took
    for t in threads:
        t.join(timeout=10)
    assert any(r.status_code == 200 for r in answers), [r.text for r in answers]
    gw.start()
    with gw.client("alice") as c:
        rows = ledger(gw)
        assert sorted(r["status"] for r in rows) in (["queued", "unknown"], ["running", "unknown"]), rows
        assert not any(r["status"] == "create_failed" for r in rows)
        books = usage(c)
        assert (books["spent_usd"], books["tasks_in_flight"]) == (1.0, 1), books
