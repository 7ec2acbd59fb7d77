"""Test doubles and builders the unit tests share, each written once (as httpx's MockTransport, Kinto's testing.py).

- `FakeUpstream`: TokenHub in a dict, handed to `create_app(upstream=...)` or a key pool's probe.
- `FakeClock`: a clock a test moves by hand, handed to anything that takes `clock=`.
- `make_settings`: the frozen settings tree from a small config, as `parse_settings` builds it from TOML.
- `MODEL`, `FAST`, `PRICING` and `body`: the default models, their prices in micros and a valid create body.
- `make_task`: a created task of alice of team red (a 5 s 720p create, TokenHub's id `cgt-1`), fields overridable.
- `upstream_key`, `UPSTREAM_SETTINGS` and `http_date`: upstream keys, the breaker and cooldown settings of a key
  pool (30 s cooldown, 5 failures open the circuit for 30 s) and a Retry-After date, for key-health tests.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from datetime import datetime, timezone
from email.utils import format_datetime
from ipaddress import ip_network
from typing import Any

import orjson

from gateway.config import parse_settings
from gateway.money import usd_to_micros
from gateway.settings import DEFAULT_PRICING, Secret, Settings, UpstreamKey, UpstreamSettings
from gateway.store.base import Task
from gateway.upstream.client import Reply

MODEL = "doubao-seedance-2.0"
FAST = "doubao-seedance-2.0-fast"
PRICING = {model: {res: usd_to_micros(price) for res, price in row.items()} for model, row in DEFAULT_PRICING.items()}
USER_KEY = "tgw-unit-test-key"
UPSTREAM_URL = "http://upstream.invalid/api/v1"
UPSTREAM_KEY = "th-unit-upstream-key-0001"
CALL_SECONDS = 0.001
UPSTREAM_SETTINGS = UpstreamSettings(
    base_url="https://tokenhub.test/api/v1",
    keys=(),
    cooldown_s=30,
    breaker_failures=5,
    breaker_open_s=30,
    media_allow_networks=(ip_network("127.0.0.0/8"),),  # result files from a simulator on loopback
)


def make_task(**fields: Any) -> Task:
    """A task row as the store keeps it; every field can be given."""
    defaults: dict[str, Any] = {
        "rid": "r1",
        "team": "red",
        "user": "alice",
        "model": MODEL,
        "resolution": "720p",
        "duration_s": 5,
        "input_ms": 0,
        "input_estimated": False,
        "estimate_ms": 5000,
        "estimate_micros": 1_000_000,
        "team_period": "p",
        "user_period": "p",
        "created_at": 0.0,
        "task_id": "cgt-1",
    }
    return Task(**{**defaults, **fields})


def body(**fields: Any) -> dict[str, Any]:
    """A valid create body for the default model, with `fields` added or replaced."""
    return {"model": MODEL, "prompt": "a cat surfing", **fields}


def upstream_key(
    name: str, weight: int = 1, max_tasks: int = 10, models: Iterable[str] | None = None, value: str | None = None
) -> UpstreamKey:
    """An upstream key; its value is made from its name unless given."""
    return UpstreamKey(
        name=name,
        value=Secret(value or f"th-{name}-0123456789abcd"),
        weight=weight,
        max_concurrent_tasks=max_tasks,
        models=None if models is None else frozenset(models),
    )


def http_date(timestamp: float) -> str:
    """A timestamp as an HTTP date, the second form of a Retry-After header."""
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc), usegmt=True)


class FakeClock:
    """A clock that stands still until a test moves `now`."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeUpstream:
    """TokenHub in a dict: a create makes a queued task, a poll shows the status the test set with `finish`.

    Given `status`, every call is answered that status with an empty JSON object instead; given `raises`,
    every call raises it. Every call, answered or not, is recorded in `calls` as (method, path, key).
    """

    def __init__(self, status: int | None = None, raises: BaseException | None = None) -> None:
        self.status = status
        self.raises = raises
        self.calls: list[tuple[str, str, str]] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def finish(self, task_id: str, status: str = "succeeded", seconds: float | None = None) -> None:
        """Move a task to `status`; a success bills `seconds`, or the duration it was created with."""
        task = self.tasks[task_id]
        task["status"] = status
        if status == "succeeded":
            task["usage"] = {"video_duration": seconds if seconds is not None else task.pop("_duration")}

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        self.calls.append((method, path, key))
        if self.raises is not None:
            raise self.raises
        if self.status is not None:
            return Reply(self.status, b"{}", None, CALL_SECONDS)
        if method == "POST":
            return self._create(orjson.loads(body or b"{}"))
        task_id = path.rsplit("/", 1)[1]
        if task_id not in self.tasks:
            return Reply(404, b'{"error": {"code": "task_not_found"}}', None, CALL_SECONDS)
        return self._answer(task_id)

    async def close(self) -> None:
        pass

    def _create(self, request: dict[str, Any]) -> Reply:
        task_id = f"cgt-{next(self._ids)}"
        self.tasks[task_id] = {
            "id": task_id,
            "object": "video.generation.task",
            "model": request["model"],
            "status": "queued",
            "created": 0,
            "_duration": request.get("duration", 5),
        }
        return self._answer(task_id)

    def _answer(self, task_id: str) -> Reply:
        shown = {field: value for field, value in self.tasks[task_id].items() if not field.startswith("_")}
        return Reply(200, orjson.dumps(shown), None, CALL_SECONDS)


def make_settings(
    store_url: str | None = None,
    *,
    teams: dict[str, dict[str, Any]] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
    keys: dict[str, str] | None = None,
    key_options: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **tables: Any,
) -> Settings:
    """Settings for one team `red` and its user `alice` (who holds USER_KEY) unless told otherwise.

    `users` maps a name to its table with a `key` in the clear, hashed here into `key_sha256`; `keys` maps
    an upstream key's name to its value, each with `key_options`; `upstream` adds to the upstream table and
    `tables` (server, poller, ...) are passed on as they are. No store URL leaves the store at its default.

    Unlike the real default (no network allowed), result files may be fetched from all of 127.0.0.0/8, so that
    unit tests whose upstream or media server is on loopback keep working; a test of the media guard passes
    its own `upstream={"media_allow_networks": [...]}`.
    """
    keys = keys or {"k": UPSTREAM_KEY}
    users = users if users is not None else {"alice": {"team": "red", "key": USER_KEY}}
    key_envs = {f"UPSTREAM_KEY_{index}": value for index, value in enumerate(keys.values())}
    data: dict[str, Any] = {
        "upstream": {
            "base_url": UPSTREAM_URL,
            "media_allow_networks": ["127.0.0.0/8"],
            "keys": [
                {"name": name, "value_env": env_name, **(key_options or {})}
                for name, env_name in zip(keys, key_envs, strict=True)
            ],
            **(upstream or {}),
        },
        "teams": teams if teams is not None else {"red": {}},
        "users": {name: user_table(**spec) for name, spec in users.items()},
        **tables,
    }
    if store_url is not None:
        data["store"] = {"url": store_url}
    return parse_settings(data, env={**key_envs, **(env or {})})


def user_table(key: str, **fields: Any) -> dict[str, Any]:
    """A user's config table: its fields, with the hash of its key in place of the key."""
    return {**fields, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
