"""The soak's traffic (bench/soak.py, bench/soak_inprocess.py): clients of both API shapes, faults set on the
simulator as it runs, and at the end the settling of what is left and the check of the books. Requests go
through a `Sender`: aiohttp to real processes, or httpx to the apps in this process."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
import httpx
import orjson

from bench.soak_setup import ADMIN_TOKEN, UPSTREAM_KEYS, USERS, user_key

CREATE = "/v1/videos/generations"
VIDEOS = "/v1/videos"
MODELS = ("doubao-seedance-2.0", "doubao-seedance-2.0-fast")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired", "unresolved", "unknown"})
KEY_A, KEY_B, KEY_C = UPSTREAM_KEYS.values()
FAULT_EVERY_S = 8.0
# What the simulator is told to do now and then: each for a few requests, then it answers normally again.
FAULTS: tuple[dict[str, Any], ...] = (
    {"key": KEY_A, "mode": "429", "routes": ["create"], "count": 20, "retry_after": 1},
    {"key": KEY_C, "mode": "429", "routes": ["poll"], "count": 10, "retry_after": 1},
    {"key": "*", "mode": "500", "routes": ["poll"], "count": 10},
    {"key": KEY_B, "mode": "500", "routes": ["create"], "count": 3},
    {"key": "*", "mode": "hang", "routes": ["poll"], "count": 3},
    {"key": KEY_B, "mode": "hang", "routes": ["create"], "count": 1},
    {"key": "*", "mode": "garbage", "routes": ["poll"], "count": 5},
    {"key": KEY_C, "mode": "cut", "routes": ["create"], "count": 1},
    {"key": "*", "mode": "answer", "routes": ["create"], "status": 502, "count": 2},
    {"key": "*", "mode": "reset", "routes": ["poll"], "count": 3},
    {"key": KEY_A, "mode": "late", "routes": ["create"], "delay_s": 5, "count": 1},
    {"key": "*", "mode": "slow", "routes": ["media"], "delay_s": 2, "count": 20},
    {"key": "*", "mode": "cut", "routes": ["media"], "count": 3},
)


class Sender(Protocol):
    async def __call__(self, method: str, url: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        """One request (`body` sent as JSON unless None) → status and body; a client failure raises."""


class AiohttpSender:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        async with self.session.request(method, url, headers=headers, json=body) as reply:
            return reply.status, await reply.read()


class HttpxSender:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self, method: str, url: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
        reply = await self.client.request(method, url, headers=headers, json=body)
        return reply.status_code, reply.content


CLIENT_ERRORS = (aiohttp.ClientError, httpx.HTTPError, TimeoutError)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Load:
    def __init__(self, send: Sender, url: str, sim_url: str, concurrency: int, rng: random.Random) -> None:
        self.send = send
        self.url = url
        self.sim_url = sim_url
        self.concurrency = concurrency
        self.rng = rng
        self.statuses: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.tasks = 0  # creates answered with a task
        self._count = 0
        self._deadline = 0.0

    async def call(
        self, method: str, path: str, route: str, user: str | None = None, json: Any = None, **headers: str
    ) -> tuple[int, bytes]:
        """One request; its status counted under its route (a client-side failure as `error`)."""
        auth = {"Authorization": f"Bearer {user_key(user)}"} if user else ADMIN
        try:
            status, body = await self.send(method, self.url + path, auth | headers, json)
        except CLIENT_ERRORS as exc:
            self.statuses[f"{route} error:{type(exc).__name__}"] += 1
            return 0, b""
        self.statuses[f"{route} {status}"] += 1
        return status, body

    async def run(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds
        await asyncio.gather(self._faults(), *(self._client(n) for n in range(self.concurrency)))

    def _going(self) -> bool:
        return time.monotonic() < self._deadline

    async def _faults(self) -> None:
        while self._going():
            await asyncio.sleep(FAULT_EVERY_S)
            fault = self.rng.choice(FAULTS)
            status, body = await self.send("POST", self.sim_url + "/_sim/faults", {}, fault)
            if status != 200:
                raise RuntimeError(f"the simulator refused a fault: {status} {body!r}")
            self.faults[f"{fault['mode']}:{'/'.join(fault['routes'])}"] += 1

    async def _client(self, number: int) -> None:
        users = sorted(USERS)
        while self._going():
            user = users[(number + self._count) % len(users)]
            pick = self.rng.random()
            if pick < 0.65:
                await self._tokenhub(user)
            elif pick < 0.85:
                await self._openai(user)
            else:
                await self._reads(user)

    def _prompt(self) -> str:
        self._count += 1
        fail = " sim:fail" if self.rng.random() < 0.08 else ""
        return f"soak {self._count} a fox in the snow sim:seconds={self.rng.uniform(0.05, 1.0):.2f}{fail}"

    async def _tokenhub(self, user: str) -> None:
        body = {
            "model": self.rng.choice(MODELS),
            "prompt": self._prompt(),
            "duration": self.rng.randint(4, 8),
            "resolution": self.rng.choice(("720p", "480p")),
        }
        headers = {"Idempotency-Key": f"soak-{self._count}"} if self.rng.random() < 0.1 else {}
        status, raw = await self.call("POST", CREATE, "create", user, body, **headers)
        if headers and self.rng.random() < 0.5:  # the client retries: replayed, or in progress
            await self.call("POST", CREATE, "create_retry", user, body, **headers)
        if status != 200:
            return
        self.tasks += 1
        path = f"{CREATE}/{orjson.loads(raw)['id']}"
        pick = self.rng.random()
        if pick < 0.1:
            await self.call("DELETE", path, "cancel", user)
        elif pick < 0.5:  # one look, soon after; the poller settles the task
            await asyncio.sleep(self.rng.uniform(0.05, 0.5))
            await self.call("GET", path, "poll", user)
        elif pick < 0.65:
            await self._poll(path, "poll", user, "status", TERMINAL)

    async def _poll(self, path: str, route: str, user: str, field: str, done: frozenset[str]) -> dict[str, Any]:
        """Poll until the answer's `field` is one of `done` (30 s at most)."""
        give_up = time.monotonic() + 30
        data: dict[str, Any] = {}
        while time.monotonic() < give_up:
            await asyncio.sleep(self.rng.uniform(0.1, 0.4))
            status, raw = await self.call("GET", path, route, user)
            if status == 200:
                data = orjson.loads(raw)
                if data.get(field) in done:
                    break
        return data

    async def _openai(self, user: str) -> None:
        body = {"model": "sora-2", "prompt": self._prompt(), "seconds": "4", "size": "1280x720"}
        status, raw = await self.call("POST", VIDEOS, "video_create", user, body)
        if status != 200:
            return
        self.tasks += 1
        path = f"{VIDEOS}/{orjson.loads(raw)['id']}"
        pick = self.rng.random()
        if pick < 0.5:
            await asyncio.sleep(self.rng.uniform(0.05, 0.5))
            await self.call("GET", path, "video_get", user)
        elif pick < 0.75:
            video = await self._poll(path, "video_get", user, "status", frozenset({"completed", "failed"}))
            if video.get("status") == "completed" and self.rng.random() < 0.4:
                await self.call("GET", f"{path}/content", "video_content", user)
        if self.rng.random() < 0.2:
            await self.call("DELETE", path, "video_delete", user)

    async def _reads(self, user: str) -> None:
        pick = self.rng.random()
        if pick < 0.3:
            await self.call("GET", CREATE + "?limit=20", "list", user)
        elif pick < 0.5:
            await self.call("GET", VIDEOS + "?limit=10", "video_list", user)
        elif pick < 0.8:
            await self.call("GET", "/v1/usage", "usage", user)
        elif pick < 0.9:
            await self.call("GET", "/v1/models", "models", user)
        elif pick < 0.97:
            await self.call("GET", "/admin/usage?group_by=team", "admin_usage")
        else:
            await self.call("GET", "/admin/teams", "admin_teams")

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "requests": sum(self.statuses.values()),
            "status_500": sum(n for key, n in self.statuses.items() if key.endswith(" 500")),
            "by_route_status": dict(sorted(self.statuses.items())),
            "faults_set": dict(sorted(self.faults.items())),
        }


async def _get(load: Load, path: str) -> Any:
    status, body = await load.send("GET", load.url + path, ADMIN, None)
    if status != 200:
        raise RuntimeError(f"{path}: {status} {body[:300]!r}")
    return body


async def settle_all(load: Load, timeout: float) -> dict[str, Any]:
    """Clear the faults and wait for the poller to settle every task: nothing reserved, nothing in flight."""
    await load.send("DELETE", load.sim_url + "/_sim/faults", {}, None)
    began = time.monotonic()
    while True:
        teams = orjson.loads(await _get(load, "/admin/teams"))["data"]
        busy = {t["name"]: t["tasks_in_flight"] for t in teams if t["tasks_in_flight"] or t["reserved_usd"]}
        if not busy or time.monotonic() - began > timeout:
            return {"seconds": round(time.monotonic() - began, 1), "still_in_flight": busy}
        await asyncio.sleep(1)


async def books(load: Load) -> dict[str, Any]:
    """Per team: spent this period = Σ the costs of its settled rows of the period (read from the streamed CSV
    export) = the store's grouped figure; and the rows that are still not settled."""
    since = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).date().isoformat()
    teams = orjson.loads(await _get(load, "/admin/teams"))["data"]
    spent = {t["name"]: Decimal(str(t["spent_usd"])) for t in teams}
    figures = orjson.loads(await _get(load, f"/admin/usage?group_by=team&since={since}"))["data"]
    grouped = {g["team"]: Decimal(str(g["cost_usd"])) for g in figures}
    rows: Counter[str] = Counter()
    summed: dict[str, Decimal] = {}
    unsettled: Counter[str] = Counter()
    text = (await _get(load, f"/admin/usage?format=csv&since={since}")).decode()
    for row in csv.DictReader(io.StringIO(text)):
        rows[row["team"]] += 1
        if not row["settled_at"]:
            unsettled[row["status"]] += 1
            continue
        summed[row["team"]] = summed.get(row["team"], Decimal(0)) + Decimal(row["cost_usd"] or "0")
    names = sorted(set(spent) | set(summed))
    per_team = {
        team: {
            "rows": rows[team],
            "spent_usd": str(spent.get(team, 0)),
            "rows_cost_usd": str(summed.get(team, 0)),
            "grouped_cost_usd": str(grouped.get(team, 0)),
        }
        for team in names
    }
    exact = all(spent.get(team, 0) == summed.get(team, 0) == grouped.get(team, 0) for team in names)
    return {"exact": exact, "unsettled_rows": dict(unsettled), "teams": per_team}
