"""Reads and builders the e2e modules share: a gateway's usage, ledger and key states, the simulator's log
of creates, roomy keys, the OpenAI error shape, and the prompt of a task that never finishes."""

from __future__ import annotations

from typing import Any

import httpx

from tests.e2e.harness import KEYS, Gateway, Simulator

CREATE = "/videos/generations"
NEVER = "sim:never a fox that runs forever"
ROOMY = 1000  # slots per key when a test is about health or shared state, not load


def roomy(*names: str, **extra: Any) -> list[dict[str, Any]]:
    """Upstream keys with slots to spare."""
    return [{"name": name, "max_concurrent_tasks": ROOMY, **extra} for name in names]


def creates(sim: Simulator, key: str | None = None, status: int | None = None) -> list[dict[str, Any]]:
    """The simulator's create log, optionally for one key name and one answered status."""
    return [
        entry
        for entry in sim.requests("create")
        if (key is None or entry["key"] == KEYS[key]) and (status is None or entry["status"] == status)
    ]


def key_states(gw: Gateway) -> dict[str, dict[str, Any]]:
    reply = gw.admin("GET", "/admin/keys")
    assert reply.status_code == 200, reply.text
    return {key["name"]: key for key in reply.json()["data"]}


def usage(gw: Gateway, user: str = "alice") -> dict[str, Any]:
    with gw.client(user) as client:
        reply = client.get("/usage")
    assert reply.status_code == 200, reply.text
    return reply.json()


def ledger(gw: Gateway) -> list[dict[str, Any]]:
    reply = gw.admin("GET", "/admin/usage")
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]


def assert_settled_books(gw: Gateway, spent: float, reserved: float = 0.0, in_flight: int = 0) -> None:
    """The user's and the team's spent, reserved and tasks in flight are these."""
    figures = usage(gw)
    for scope in ("user", "team"):
        got = (figures[scope]["spent_usd"], figures[scope]["reserved_usd"], figures[scope]["tasks_in_flight"])
        assert got == (spent, reserved, in_flight), (scope, figures)


def error_of(reply: httpx.Response, status: int, type_: str, code: str) -> None:
    """The answer is an error of this status, type and code."""
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == (type_, code), error
