"""Quotas and metering end to end: real gateway processes in front of the simulator on loopback.

Prices (SPEC §1): doubao-seedance-2.0 720p $0.20/s, 480p $0.12/s; -fast 720p $0.16/s, 480p $0.10/s.
So `body()` (doubao, 720p, 5 s) costs $1.00 and `FAST_480_4S` costs $0.40.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import ADMIN_TOKEN, Gateway, body, wait_until

CREATE = "/videos/generations"
FAST = "doubao-seedance-2.0-fast"
FAST_480_4S = {"model": FAST, "resolution": "480p", "duration": 4}
REF_VIDEO = "https://media.example.com/reference.mp4"
TERMINAL = ("succeeded", "failed", "cancelled", "expired", "unresolved")
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
MONEY_KEYS = ("spent_usd", "reserved_usd", "budget_usd", "remaining_usd")
REPO = Path(__file__).resolve().parents[2]


# helpers


def burst(gw: Gateway, user: str, bodies: list[dict], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """All creates at once, on one connection pool."""

    async def go() -> list[httpx.Response]:
        async with gw.aclient(user) as client:
            return await asyncio.gather(*(client.post(CREATE, json=b, headers=headers) for b in bodies))

    return asyncio.run(go())


def error_of(response: httpx.Response) -> tuple[str, str]:
    err = response.json()["error"]
    return err["type"], err["code"]


def settled_lines(gw: Gateway, task_id: str | None = None) -> list[dict[str, Any]]:
    return [
        line for line in gw.lines() if line.get("event") == "task.settled" and task_id in (None, line.get("task_id"))
    ]


def wait_settled(gw: Gateway, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    return wait_until(lambda: settled_lines(gw, task_id), timeout)[0]


def poll_terminal(client: httpx.Client, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        response = client.get(f"{CREATE}/{task_id}")
        assert response.status_code == 200, response.text
        return response.json() if response.json()["status"] in TERMINAL else None

    return wait_until(done, timeout, 0.2)


def usage(gw: Gateway, user: str) -> dict[str, Any]:
    with gw.client(user) as client:
        response = client.get("/usage")
    assert response.status_code == 200, response.text
    return response.json()


def admin_team(gw: Gateway, team: str) -> dict[str, Any]:
    response = gw.admin("GET", "/admin/teams")
    assert response.status_code == 200, response.text
    return next(t for t in response.json()["data"] if t["name"] == team)


def ledger_rows(gw: Gateway, **params: str) -> list[dict[str, Any]]:
    response = gw.admin("GET", "/admin/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def total_cost(rows: list[dict[str, Any]]) -> float:
    return round(sum(r["cost_usd"] or 0 for r in rows), 6)


def samples(gw: Gateway, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one metric: its labels and value."""
    out = []
    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', head)), float(value)))
    return out


def create_ok(client: httpx.Client, **kw: Any) -> str:
    response = client.post(CREATE, json=body(**kw))
    assert response.status_code == 200, response.text
    return response.json()["id"]


# exact admission under concurrency

EXACT_FIT = {
    "team_budget_usd": (
        {"red": {"budget_usd": 7.0}},
        {"alice": {"team": "red"}},
        "team",
        "insufficient_quota",
        "budget_exceeded",
    ),
    "team_video_seconds": (
        {"red": {"video_seconds": 35}},
        {"alice": {"team": "red"}},
        "team",
        "insufficient_quota",
        "budget_exceeded",
    ),
    "team_max_concurrent_tasks": (
        {"red": {"max_concurrent_tasks": 7}},
        {"alice": {"team": "red"}},
        "team",
        "rate_limit_exceeded",
        "concurrency_limit_exceeded",
    ),
    "user_budget_usd": (
        {"red": {}},
        {"alice": {"team": "red", "budget_usd": 7.0}},
        "user",
        "insufficient_quota",
        "budget_exceeded",
    ),
}


@pytest.mark.parametrize("case", list(EXACT_FIT))
def test_concurrent_creates_admit_exactly_what_fits(make_gateway, sim, case):
    teams, users, scope, err_type, err_code = EXACT_FIT[case]
    gw = make_gateway(teams=teams, users=users)
    responses = burst(gw, "alice", [body(prompt=f"sim:never burst {i}") for i in range(50)])

    codes = [r.status_code for r in responses]
    assert codes.count(200) == 7, codes
    assert codes.count(429) == 43, codes
    assert {error_of(r) for r in responses if r.status_code == 429} == {(err_type, err_code)}
    assert len(sim.requests("create")) == 7
    assert len({r.json()["id"] for r in responses if r.status_code == 200}) == 7

    figures = usage(gw, "alice")[scope]
    assert figures["reserved_usd"] == 7.0
    assert figures["tasks_in_flight"] == 7
    if case.endswith("budget_usd"):
        assert figures["remaining_usd"] == 0.0
    assert gw.metric("tokenhub_gateway_quota_rejections_total", team="red") == 43
    if case == "team_budget_usd":
        team = admin_team(gw, "red")
        assert (team["budget_usd"], team["reserved_usd"], team["remaining_usd"]) == (7.0, 7.0, 0.0)
        assert gw.metric("tokenhub_gateway_budget_usd", team="red") == team["budget_usd"]
        assert gw.metric("tokenhub_gateway_budget_remaining_usd", team="red") == team["remaining_usd"]


# request rate


def test_requests_per_minute_sliding_window_and_headers(make_gateway, sim):
    gw = make_gateway(teams={"red": {"requests_per_minute": 5}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        responses = [client.post(CREATE, json=body(prompt=f"sim:never rpm {i}")) for i in range(8)]
        assert [r.status_code for r in responses] == [200] * 5 + [429] * 3, [r.text for r in responses]
        for i, response in enumerate(responses[:5]):
            assert response.headers["x-ratelimit-limit-requests"] == "5"
            assert response.headers["x-ratelimit-remaining-requests"] == str(4 - i)
            assert re.fullmatch(r"\d+(\.\d+)?m?s", response.headers["x-ratelimit-reset-requests"])
        for response in responses[5:]:
            assert error_of(response) == ("rate_limit_exceeded", "rate_limit_exceeded")
            assert response.headers["retry-after"].isdigit() and 1 <= int(response.headers["retry-after"]) <= 60

        poll = client.get(f"{CREATE}/{responses[0].json()['id']}")
        assert poll.status_code == 200
        assert all(h in poll.headers for h in RATE_HEADERS), dict(poll.headers)
        assert poll.headers["x-ratelimit-remaining-requests"] == "0"  # polls are not counted
    assert len(sim.requests("create")) == 5
    assert gw.metric("tokenhub_gateway_quota_rejections_total", team="red") == 3


def test_rate_limited_create_carries_rate_headers(make_gateway, sim):
    """SPEC §2: create responses carry the rate headers; the 429 is the one a client most needs them on."""
    gw = make_gateway(teams={"red": {"requests_per_minute": 2}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        responses = [client.post(CREATE, json=body(prompt="sim:never rpm")) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    limited = responses[2]
    assert all(h in limited.headers for h in RATE_HEADERS), dict(limited.headers)
    assert limited.headers["x-ratelimit-limit-requests"] == "2"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"


def test_reload_raising_requests_per_minute_is_enforced(make_gateway, sim):
    gw = make_gateway(teams={"red": {"requests_per_minute": 2}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        create_ok(client, prompt="sim:never before the reload")
        gw.teams["red"]["requests_per_minute"] = 4
        gw.write_config()
        assert gw.admin("POST", "/admin/reload").status_code == 200
        codes = [client.post(CREATE, json=body(prompt="sim:never after the reload")).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]  # 4 in the sliding minute, the one before the reload included
    assert len(sim.requests("create")) == 4


def test_rate_window_survives_restart(make_gateway, sim):
    """§6: at most N creates in any sliding 60 s window; a restart of the one process must not reopen it."""
    gw = make_gateway(teams={"red": {"requests_per_minute": 2}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        create_ok(client, prompt="sim:never one")
        create_ok(client, prompt="sim:never two")
    gw.restart()
    with gw.client("alice") as client:
        response = client.post(CREATE, json=body(prompt="sim:never three"))
    assert response.status_code == 429 and error_of(response) == ("rate_limit_exceeded", "rate_limit_exceeded"), (
        response.text
    )
    assert len(sim.requests("create")) == 2


def test_budget_rejection_does_not_consume_rate(make_gateway, sim):
    gw = make_gateway(teams={"red": {"requests_per_minute": 3, "budget_usd": 2.0}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        big = [client.post(CREATE, json=body(prompt="sim:never big", duration=15)) for _ in range(2)]  # $3.00
        small = [client.post(CREATE, json=body(prompt="sim:never small", **FAST_480_4S)) for _ in range(4)]
    assert [error_of(r) for r in big] == [("insufficient_quota", "budget_exceeded")] * 2
    assert [r.status_code for r in small[:3]] == [200] * 3, [r.text for r in small]
    assert error_of(small[3]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert len(sim.requests("create")) == 3
    assert usage(gw, "alice")["team"]["reserved_usd"] == 1.2


# exact costs


def test_exact_costs_agree_everywhere(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {"budget_usd": 50.0}}, users={"alice": {"team": "red"}}, extra={"poller": {"interval_s": 60}}
    )  # the reserved figures below must not move
    expected = {}  # task id → (status, cost, billed seconds)
    with gw.client("alice") as client:
        expected[create_ok(client, prompt="sim:seconds=0.5 plain")] = ("succeeded", 1.0, 5.0)
        expected[
            create_ok(
                client,
                prompt="sim:seconds=0.5 with a reference video",
                video_urls=[REF_VIDEO],
                video_durations=[5],
                duration=10,
            )
        ] = ("succeeded", 3.0, 15.0)
        expected[create_ok(client, prompt="sim:seconds=0.5 fast", **FAST_480_4S)] = ("succeeded", 0.4, 4.0)
        expected[create_ok(client, prompt="sim:seconds=0.5 sim:fail")] = ("failed", 0.0, 0.0)
        queued = create_ok(client, prompt="sim:seconds=30 to be cancelled")
        expected[queued] = ("cancelled", 0.0, 0.0)
        assert usage(gw, "alice")["team"]["reserved_usd"] == 6.4

        cancel = client.delete(f"{CREATE}/{queued}")
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["status"] == "cancelled"
        assert usage(gw, "alice")["team"]["reserved_usd"] == 5.4
        for tid, (status, _, _) in expected.items():
            assert poll_terminal(client, tid)["status"] == status

    rows = {r["task_id"]: r for r in ledger_rows(gw)}
    for tid, (status, cost, seconds) in expected.items():
        line = wait_settled(gw, tid)
        assert (line["status"], line["cost_usd"], line["billed_seconds"]) == (status, cost, seconds), line
        assert (rows[tid]["status"], rows[tid]["cost_usd"], rows[tid]["billed_seconds"]) == (status, cost, seconds)
        assert len(settled_lines(gw, tid)) == 1
    team = usage(gw, "alice")["team"]
    assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (4.4, 0.0, 0)
    assert team["remaining_usd"] == 45.6
    assert team["video_seconds_spent"] == 24.0
    assert gw.metric("tokenhub_gateway_spend_usd_total", team="red") == pytest.approx(4.4, abs=0.005)
    assert gw.metric("tokenhub_gateway_spend_usd_total", model="doubao-seedance-2.0") == pytest.approx(4.0, abs=0.005)
    assert gw.metric("tokenhub_gateway_spend_usd_total", model=FAST) == pytest.approx(0.4, abs=0.005)
    assert gw.metric("tokenhub_gateway_video_seconds_total", team="red") == pytest.approx(24.0)


def test_reference_video_without_durations_reserves_15_s(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:never reference", video_urls=[REF_VIDEO])
    figures = usage(gw, "alice")
    for scope in ("user", "team"):
        assert figures[scope]["reserved_usd"] == 4.0  # (15 + 5) × 0.20
        assert figures[scope]["tasks_in_flight"] == 1
    (row,) = ledger_rows(gw)
    assert (row["task_id"], row["estimate_usd"], row["input_seconds"], row["cost_usd"]) == (tid, 4.0, 15.0, None)
    (line,) = [
        x for x in gw.lines() if x.get("event") == "request" and x.get("method") == "POST" and x.get("task_id") == tid
    ]
    assert (line["cost_usd"], line["duration_s"], line["team"], line["user"]) == (4.0, 5, "red", "alice")


# settlement exactly once, from any path


def test_concurrent_polls_settle_once(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red"}}, extra={"poller": {"interval_s": 60}})
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:seconds=0.3 polled by many")
    wait_until(lambda: sim.task(tid)["status"] == "succeeded", 5)

    async def polls() -> list[httpx.Response]:
        async with gw.aclient("alice") as client:
            return await asyncio.gather(*(client.get(f"{CREATE}/{tid}") for _ in range(20)))

    responses = asyncio.run(polls())
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["status"] for r in responses} == {"succeeded"}
    assert len({r.content for r in responses}) == 1
    with gw.client("alice") as client:
        assert client.get(f"{CREATE}/{tid}").json()["status"] == "succeeded"

    assert len(settled_lines(gw, tid)) == 1
    assert len(sim.requests("poll")) == 1
    assert usage(gw, "alice")["team"]["spent_usd"] == 1.0
    assert gw.metric("tokenhub_gateway_spend_usd_total", team="red") == 1.0
    assert gw.metric("tokenhub_gateway_tasks_finished_total", team="red") == 1


def test_background_poller_settles_unpolled_task(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:seconds=0.3 never polled by its client")
    line = wait_settled(gw, tid)
    assert (line["status"], line["cost_usd"], line["billed_seconds"]) == ("succeeded", 1.0, 5.0)
    team = usage(gw, "alice")["team"]
    assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0)
    assert {r["task_id"] for r in sim.requests("poll")} == {tid}
    assert not [
        x for x in gw.lines() if x.get("event") == "request" and x.get("method") == "GET" and x.get("task_id") == tid
    ]  # no client poll: the background poller settled it


def test_never_finishing_task_becomes_unresolved(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {"max_concurrent_tasks": 1}},
        users={"alice": {"team": "red"}},
        extra={"poller": {"interval_s": 1, "expire_after_s": 3}},
    )
    with gw.client("alice") as client:
        tid = create_ok(client, prompt="sim:never stuck")
        blocked = client.post(CREATE, json=body(prompt="sim:never second"))
        assert error_of(blocked) == ("rate_limit_exceeded", "concurrency_limit_exceeded")

        line = wait_settled(gw, tid, timeout=12)
        assert (line["status"], line["cost_usd"], line["billed_seconds"], line["estimated"]) == (
            "unresolved",
            1.0,
            5.0,
            True,
        ), line
        assert any(x.get("level") == "warning" and x.get("task_id") == tid for x in gw.lines())
        listed = client.get(CREATE).json()["data"]
        assert [(t["id"], t["status"]) for t in listed] == [(tid, "unresolved")]
        assert usage(gw, "alice")["team"]["tasks_in_flight"] == 0
        assert gw.metric("tokenhub_gateway_tasks_in_flight", team="red") == 0
        assert usage(gw, "alice")["team"]["reserved_usd"] == 0.0
        assert usage(gw, "alice")["team"]["spent_usd"] == 1.0
        (row,) = ledger_rows(gw)
        assert (row["status"], row["cost_usd"], row["cost_estimated"]) == ("unresolved", 1.0, True)
        create_ok(client, prompt="sim:never after the slot was freed")


def test_budget_exactly_consumed_blocks_next_create(make_gateway, sim):
    gw = make_gateway(teams={"red": {"budget_usd": 2.0}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        tids = [create_ok(client, prompt=f"sim:seconds=0.3 spend {i}") for i in range(2)]
        for tid in tids:
            assert poll_terminal(client, tid)["status"] == "succeeded"
        team = usage(gw, "alice")["team"]
        assert (team["spent_usd"], team["reserved_usd"], team["remaining_usd"]) == (2.0, 0.0, 0.0)
        response = client.post(CREATE, json=body(prompt="one too many", **FAST_480_4S))
        assert response.status_code == 429 and error_of(response) == ("insufficient_quota", "budget_exceeded")
    assert len(sim.requests("create")) == 2
    assert admin_team(gw, "red")["remaining_usd"] == 0.0
    assert gw.metric("tokenhub_gateway_budget_remaining_usd", team="red") == 0.0


# idempotency


def test_idempotency_replay_reuse_and_scope(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {}, "blue": {}},
        users={"alice": {"team": "red"}, "carol": {"team": "red"}, "bob": {"team": "blue"}},
    )
    key = {"Idempotency-Key": "order-42"}
    payload = body(prompt="sim:never idempotent", duration=5)
    with gw.client("alice") as client:
        first = client.post(CREATE, json=payload, headers=key)
        again = client.post(CREATE, json=dict(reversed(list(payload.items()))), headers=key)  # same canonical JSON
        other = client.post(CREATE, json={**payload, "duration": 6}, headers=key)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert other.status_code == 409 and error_of(other) == ("invalid_request_error", "idempotency_key_reused")
    with gw.client("carol") as client:  # scoped to the team, any user of it
        same_team = client.post(CREATE, json=payload, headers=key)
    assert same_team.headers.get("idempotent-replayed") == "true" and same_team.content == first.content
    with gw.client("bob") as client:
        other_team = client.post(CREATE, json=payload, headers=key)
    assert other_team.status_code == 200 and "idempotent-replayed" not in other_team.headers
    assert len(sim.requests("create")) == 2
    team = usage(gw, "alice")["team"]
    assert (team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 1)


def test_idempotency_rejections_claim_nothing_and_key_length(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red", "budget_usd": 1.5}})
    small = body(prompt="sim:never", **FAST_480_4S)  # $0.40
    with gw.client("alice") as client:
        over = client.post(CREATE, json=body(prompt="sim:never", duration=10), headers={"Idempotency-Key": "k-quota"})
        assert error_of(over) == ("insufficient_quota", "budget_exceeded")
        after_quota = client.post(CREATE, json=small, headers={"Idempotency-Key": "k-quota"})
        assert after_quota.status_code == 200 and "idempotent-replayed" not in after_quota.headers, after_quota.text

        bad = client.post(CREATE, json={**small, "duration": 3}, headers={"Idempotency-Key": "k-valid"})
        assert bad.status_code == 400 and error_of(bad) == ("invalid_request_error", "invalid_parameter")
        good = client.post(CREATE, json=small, headers={"Idempotency-Key": "k-valid"})
        assert good.status_code == 200 and "idempotent-replayed" not in good.headers, good.text

        too_long = client.post(CREATE, json=small, headers={"Idempotency-Key": "k" * 256})
        assert too_long.status_code == 400 and error_of(too_long)[0] == "invalid_request_error"
        longest = client.post(CREATE, json=small, headers={"Idempotency-Key": "k" * 255})
        assert longest.status_code == 200, longest.text
    assert len(sim.requests("create")) == 3
    assert usage(gw, "alice")["user"]["reserved_usd"] == 1.2


def test_idempotency_duplicate_in_flight(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red"}})
    sim.fault("key-a", "slow", delay_s=1.5, routes=["create"], count=1)
    payload = body(prompt="sim:never slow create")
    responses = burst(gw, "alice", [payload, payload], headers={"Idempotency-Key": "dup"})
    assert sorted(r.status_code for r in responses) == [200, 409], [r.text for r in responses]
    conflict = next(r for r in responses if r.status_code == 409)
    assert error_of(conflict) == ("invalid_request_error", "idempotency_key_in_progress")
    with gw.client("alice") as client:
        later = client.post(CREATE, json=payload, headers={"Idempotency-Key": "dup"})
    assert later.headers.get("idempotent-replayed") == "true"
    assert later.content == next(r for r in responses if r.status_code == 200).content
    assert len(sim.requests("create")) == 1
    assert usage(gw, "alice")["team"]["reserved_usd"] == 1.0


def test_idempotency_replays_a_502(make_gateway, sim):
    gw = make_gateway(teams={"red": {}}, users={"alice": {"team": "red"}})
    sim.fault("key-a", "500", routes=["create"], count=1)
    payload, key = body(prompt="sim:never upstream error"), {"Idempotency-Key": "retry-me"}
    with gw.client("alice") as client:
        first = client.post(CREATE, json=payload, headers=key)
        retry = client.post(CREATE, json=payload, headers=key)
    assert first.status_code == 502 and error_of(first) == ("upstream_error", "upstream_server_error")
    assert retry.status_code == 502 and retry.headers.get("idempotent-replayed") == "true"
    assert retry.content == first.content
    assert len(sim.requests("create")) == 1
    team = usage(gw, "alice")["team"]
    # TokenHub may have made the task before failing: charged at its estimate, once, until resolved.
    assert (team["spent_usd"], team["reserved_usd"], team["tasks_in_flight"]) == (1.0, 0.0, 0)


# figures: /usage, /admin/usage, /admin/teams, the usage CLI


def _decimals(value: Any) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def test_usage_shape_and_exact_money(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {"budget_usd": 10.0, "video_seconds": 100}, "blue": {}},
        users={"alice": {"team": "red", "budget_usd": 5.0}, "bob": {"team": "blue"}},
    )
    with gw.client("alice") as client:
        tids = [create_ok(client, prompt=f"sim:seconds=0.3 cheap {i}", **FAST_480_4S) for i in range(3)]
        for tid in tids:
            poll_terminal(client, tid)
        raw = client.get("/usage")
    data = raw.json()
    assert set(data) >= {"period", "user", "team"}
    assert data["period"]["kind"] == "month"
    start, end = (datetime.fromisoformat(data["period"][k]) for k in ("start", "end"))
    assert start <= datetime.now(UTC) < end
    for scope, name, budget, remaining, seconds_budget in (
        ("user", "alice", 5.0, 3.8, None),
        ("team", "red", 10.0, 8.8, 100),
    ):
        figures = data[scope]
        assert figures["name"] == name
        assert (figures["spent_usd"], figures["reserved_usd"], figures["budget_usd"], figures["remaining_usd"]) == (
            1.2,
            0.0,
            budget,
            remaining,
        )
        assert (figures["video_seconds_spent"], figures["video_seconds_budget"], figures["tasks_in_flight"]) == (
            12.0,
            seconds_budget,
            0,
        )
        assert all(isinstance(figures[k], (int, float)) and _decimals(figures[k]) <= 6 for k in MONEY_KEYS)
    assert "1.2000000000000002" not in raw.text and "1.19999" not in raw.text
    unlimited = usage(gw, "bob")
    assert unlimited["team"]["remaining_usd"] is None and unlimited["user"]["remaining_usd"] is None
    assert unlimited["team"]["budget_usd"] is None and unlimited["team"]["spent_usd"] == 0.0


def _run_usage_cli(gw: Gateway, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(gw.config_path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, **gw.env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_admin_usage_ledger_filters_groups_csv_and_cli(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {"budget_usd": 10.0}, "blue": {}},
        users={"alice": {"team": "red"}, "carol": {"team": "red"}, "bob": {"team": "blue"}},
    )
    plan = [("alice", {}), ("alice", FAST_480_4S), ("carol", FAST_480_4S), ("bob", {})]
    for user, extra in plan:
        with gw.client(user) as client:
            poll_terminal(client, create_ok(client, prompt="sim:seconds=0.3 ledger", **extra))

    rows = ledger_rows(gw)
    assert len(rows) == 4 and total_cost(rows) == 2.8
    assert {r["status"] for r in rows} == {"succeeded"}
    assert total_cost(ledger_rows(gw, team="red")) == 1.8
    assert total_cost(ledger_rows(gw, user="carol")) == 0.4
    assert total_cost(ledger_rows(gw, model=FAST)) == 0.8
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert len(ledger_rows(gw, since=yesterday)) == 4 and ledger_rows(gw, since=tomorrow) == []

    def grouped(by: str) -> dict[str, tuple[int, float]]:
        return {g[by]: (g["tasks"], g["cost_usd"]) for g in ledger_rows(gw, group_by=by)}

    assert grouped("team") == {"red": (3, 1.8), "blue": (1, 1.0)}
    assert grouped("user") == {"alice": (2, 1.4), "carol": (1, 0.4), "bob": (1, 1.0)}
    assert grouped("model") == {"doubao-seedance-2.0": (2, 2.0), FAST: (2, 0.8)}
    assert grouped("day") == {datetime.now(UTC).date().isoformat(): (4, 2.8)}

    by_query = gw.admin("GET", "/admin/usage", params={"format": "csv"})
    by_accept = httpx.get(
        gw.url + "/admin/usage", timeout=15, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Accept": "text/csv"}
    )
    for response in (by_query, by_accept):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        parsed = list(csv.DictReader(io.StringIO(response.text)))
        assert len(parsed) == 4 and {"task_id", "team", "user", "model", "cost_usd"} <= set(parsed[0])
        assert round(sum(float(p["cost_usd"]) for p in parsed), 6) == 2.8
    teams_csv = gw.admin("GET", "/admin/usage", params={"format": "csv", "group_by": "team"})
    assert teams_csv.text.splitlines()[0].startswith("team,")

    red = admin_team(gw, "red")
    assert (red["budget_usd"], red["spent_usd"], red["reserved_usd"], red["remaining_usd"]) == (10.0, 1.8, 0.0, 8.2)
    blue = admin_team(gw, "blue")
    assert (blue["budget_usd"], blue["spent_usd"], blue["remaining_usd"]) == (None, 1.0, None)
    assert gw.metric("tokenhub_gateway_budget_usd", team="red") == 10.0
    assert gw.metric("tokenhub_gateway_budget_remaining_usd", team="red") == 8.2

    cli_rows = json.loads(_run_usage_cli(gw, "--format", "json"))  # a reader beside the running gateway
    assert len(cli_rows) == 4 and total_cost(cli_rows) == 2.8
    assert total_cost(json.loads(_run_usage_cli(gw, "--format", "json", "--team", "red"))) == 1.8
    assert len(json.loads(_run_usage_cli(gw, "--format", "json", "--since", tomorrow))) == 0
    gw.stop()
    cli_csv = list(csv.DictReader(io.StringIO(_run_usage_cli(gw, "--format", "csv"))))
    assert len(cli_csv) == 4 and round(sum(float(r["cost_usd"]) for r in cli_csv), 6) == 2.8
    table = _run_usage_cli(gw, "--format", "table").splitlines()
    assert "cost_usd" in table[0] and len(table) == 5


# model allow-list


def test_model_allow_list(make_gateway, sim):
    gw = make_gateway(
        teams={"red": {"models": [FAST]}, "blue": {}}, users={"alice": {"team": "red"}, "bob": {"team": "blue"}}
    )
    with gw.client("alice") as client:
        denied = client.post(CREATE, json=body(prompt="sim:never not allowed"))
        assert denied.status_code == 403, denied.text
        assert error_of(denied) == ("permission_error", "model_not_allowed")
        assert denied.json()["error"]["param"] == "model"
        models = client.get("/models").json()
        create_ok(client, prompt="sim:never allowed", model=FAST)
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["pricing"]) for m in models["data"]] == [
        (FAST, "model", {"720p": 0.16, "480p": 0.1})
    ]
    with gw.client("bob") as client:
        pricing = {m["id"]: m["pricing"] for m in client.get("/models").json()["data"]}
    assert pricing == {"doubao-seedance-2.0": {"720p": 0.2, "480p": 0.12}, FAST: {"720p": 0.16, "480p": 0.1}}
    assert len(sim.requests("create")) == 1
    assert usage(gw, "alice")["team"]["reserved_usd"] == 0.8


def test_quota_rejection_metrics_by_reason(make_gateway, sim):
    gw = make_gateway(teams={"red": {"budget_usd": 1.5, "max_concurrent_tasks": 2}}, users={"alice": {"team": "red"}})
    with gw.client("alice") as client:
        create_ok(client, prompt="sim:never $1.00")
        over_budget = client.post(CREATE, json=body(prompt="sim:never another $1.00"))
        create_ok(client, prompt="sim:never $0.40", **FAST_480_4S)
        too_many = client.post(CREATE, json=body(prompt="sim:never a third task", **FAST_480_4S))
    assert error_of(over_budget) == ("insufficient_quota", "budget_exceeded")
    assert error_of(too_many) == ("rate_limit_exceeded", "concurrency_limit_exceeded")
    reasons = {
        labels["reason"]: value
        for labels, value in samples(gw, "tokenhub_gateway_quota_rejections_total")
        if labels.get("team") == "red" and value
    }
    assert sorted(reasons.values()) == [1.0, 1.0], reasons  # one budget, one concurrency: two reasons
    team = admin_team(gw, "red")
    assert (team["spent_usd"], team["reserved_usd"], team["remaining_usd"], team["tasks_in_flight"]) == (
        0.0,
        1.4,
        0.1,
        2,
    )
    assert gw.metric("tokenhub_gateway_budget_usd", team="red") == team["budget_usd"] == 1.5
    assert gw.metric("tokenhub_gateway_budget_remaining_usd", team="red") == team["remaining_usd"]
    assert gw.metric("tokenhub_gateway_tasks_in_flight", team="red") == 2
