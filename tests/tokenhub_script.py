"""A scripted TokenHub for the property test of the books: the test chooses every answer before the call
that gets it, and the fake keeps what a real TokenHub would (its tasks, a terminal answer that never
changes). Also what SPEC §4 says a settled ledger row costs, given the answer that settled it."""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import quote

from gateway.errors import ConnectFailed, UpstreamError, UpstreamTimeout
from gateway.upstream.client import Reply

TERMINAL = ("succeeded", "failed", "cancelled", "expired")
# What a create answer means for the money: TokenHub may have made (and billed) a task, or certainly not.
MAY_HAVE_CREATED = frozenset({"fresh", "duplicate", "no_id", "5xx", "timeout", "cut_off"})
PRICE_MICROS = {
    ("doubao-seedance-2.0", "720p"): 200_000,
    ("doubao-seedance-2.0", "480p"): 120_000,
    ("doubao-seedance-2.0-fast", "720p"): 160_000,
    ("doubao-seedance-2.0-fast", "480p"): 100_000,
}
ECHO = "@ECHO@"


@dataclass(frozen=True)
class Answer:
    """One upstream answer. kind: fresh / duplicate / no_id (creates), status / garbage (polls),
    cancel (deletes), and for any call: http (`code`), 5xx (`code`), timeout, cut_off, connect."""

    kind: str
    code: int = 200
    status: str = "running"
    usage: dict[str, Any] | None = None
    echo: str | None = None  # raw / json / percent: the form in which the answer repeats the key
    pick: int = 0  # which earlier id a duplicate repeats


@dataclass
class FakeTask:
    model: str
    status: str = "queued"
    final: bytes | None = None
    usage: dict[str, Any] | None = None


@dataclass
class Post:
    kind: str  # what the answer turned out to be (a duplicate with no earlier id is fresh)
    task_id: str | None


def echoed(key: str, form: str) -> str:
    """The key as an upstream error might repeat it, inside a JSON string."""
    if form == "json":
        return "".join(f"\\u{ord(c):04x}" if c in "-+=." else "\\/" if c == "/" else c for c in key)
    return quote(key, safe="") if form == "percent" else key


def render(data: dict[str, Any], key: str, echo: str | None) -> bytes:
    if echo:
        data = {**data, "message": f"request with key {ECHO} refused"}
    text = json.dumps(data)  # NaN and Infinity go out as TokenHub's JSON encoder might send them
    return text.replace(ECHO, echoed(key, echo or "raw")).encode()


def raised(kind: str) -> Exception:
    return {
        "timeout": UpstreamTimeout("TokenHub did not answer in time."),
        "cut_off": UpstreamError("TokenHub's answer was cut off.", code="upstream_bad_response"),
        "connect": ConnectFailed("Cannot reach TokenHub."),
    }[kind]


@dataclass
class ScriptedTokenHub:
    creates: deque[Answer] = field(default_factory=deque)  # for the next POSTs, in order
    answers: dict[str, list[Answer]] = field(default_factory=dict)  # task id → its next GETs/DELETEs, in order
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    posts: list[Post] = field(default_factory=list)
    finals: set[str] = field(default_factory=set)  # tasks whose terminal answer went out in valid JSON
    calls: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        self.calls += 1
        if method == "POST":
            return self._create(self.creates.popleft() if self.creates else Answer("fresh"), key, body)
        task_id = path.rsplit("/", 1)[1]
        queued = self.answers.get(task_id)
        answer = queued.pop(0) if queued else Answer("cancel" if method == "DELETE" else "status")
        task = self.tasks.get(task_id)
        if task is None:
            return Reply(404, render({"error": {"code": "task_not_found"}}, key, answer.echo), None, 0.001)
        return self._answer(answer, task_id, task, key) or self._observe(answer, task_id, task, key)

    async def close(self) -> None:
        pass

    def _create(self, answer: Answer, key: str, body: bytes | None) -> Reply:
        kind = "fresh" if answer.kind == "duplicate" and not self.tasks else answer.kind
        task_id = None
        if kind == "fresh":
            task_id = f"cgt-{next(self._ids):04d}"
            self.tasks[task_id] = FakeTask(json.loads(body or b"{}").get("model", "?"))
        elif kind == "duplicate":
            task_id = sorted(self.tasks)[answer.pick % len(self.tasks)]
        self.posts.append(Post(kind, task_id))
        if task_id is not None:
            data = {"id": task_id, "object": "video.generation.task", "status": "queued", "created": 0}
            return Reply(200, render(data, key, answer.echo), None, 0.001)
        if kind == "no_id":
            queued = {"object": "video.generation.task", "status": "queued"}
            return Reply(200, render(queued, key, answer.echo), None, 0.001)
        return self._answer(answer, None, None, key)

    def _answer(self, answer: Answer, task_id: str | None, task: FakeTask | None, key: str) -> Reply | None:
        """The answers that say nothing about the task: errors, cut-offs and garbage."""
        if answer.kind in ("timeout", "cut_off", "connect"):
            raise raised(answer.kind)
        if answer.kind in ("http", "5xx"):
            retry = "7" if answer.code == 429 else None
            refused = {"error": {"code": "refused", "id": task_id}}
            return Reply(answer.code, render(refused, key, answer.echo), retry, 0.001)
        if answer.kind == "garbage":
            return Reply(200, b"<html>502 Bad Gateway</html>" if answer.code == 200 else b'{"id": "x"}', None, 0.001)
        return None

    def _observe(self, answer: Answer, task_id: str, task: FakeTask, key: str) -> Reply:
        """A 200 about the task: once terminal, TokenHub's answer never changes."""
        if task.final is None:
            status = task.status
            if answer.kind == "cancel":
                status = "cancelled"
            elif answer.kind == "status":
                status = answer.status
            data: dict[str, Any] = {
                "id": task_id,
                "object": "video.generation.task",
                "model": task.model,
                "status": status,
                "created": 0,
            }
            if status == "succeeded":
                data["data"] = [{"video_url": "https://cdn.invalid/v.mp4", "cover_image_url": None}]
                if answer.usage is not None:
                    data["usage"] = answer.usage
            elif status == "failed":
                data["error"] = {"message": "generation failed"}
            task.status = status
            if status in TERMINAL:
                task.final, task.usage = render(data, key, answer.echo), data.get("usage")
            else:
                return Reply(200, render(data, key, answer.echo), None, 0.001)
        elif answer.kind == "cancel":
            return Reply(409, render({"error": {"code": "task_not_cancellable"}}, key, answer.echo), None, 0.001)
        if strict_json(task.final):
            self.finals.add(task_id)
        return Reply(200, task.final, None, 0.001)


def strict_json(body: bytes) -> bool:
    """Whether the body is JSON without NaN or Infinity, which no JSON parser owes anyone."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        json.loads(body, parse_constant=refuse)
    except ValueError:
        return False
    return True


def _seconds(value: Any, high: int, low_inclusive: bool) -> Decimal | None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (0 <= value if low_inclusive else 0 < value)
        and value <= high
    )
    return Decimal(str(value)) if ok else None


def priced(seconds: Decimal, model: str, resolution: str) -> tuple[int, int]:
    """(micro-dollars, milliseconds) for seconds of video: exact, half up."""
    micros = (seconds * PRICE_MICROS[model, resolution]).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(micros), int((seconds * 1000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def expected_cost(row: dict[str, Any], task: FakeTask | None, resolved: Any) -> tuple[int, int]:
    """What SPEC §4 says a settled row costs (micro-dollars, billed ms): `resolved` is an operator's
    last figure for an unknown row ("void" or output seconds), `task` what TokenHub answered."""
    model = row["model"]
    res = row["resolution"]
    input_s = Decimal(str(row["input_seconds"]))
    estimate = (micros(row["estimate_usd"]), int(input_s * 1000) + row["duration_s"] * 1000)
    status = row["status"]
    if status == "unknown":
        if resolved is None:
            return estimate
        return (0, 0) if resolved == "void" else priced(input_s + Decimal(str(resolved)), model, res)
    if status == "unresolved":
        return estimate
    assert task is not None and task.status == status, f"settled {status} but TokenHub said {task}"
    if status != "succeeded":
        return 0, 0
    usage = task.usage if isinstance(task.usage, dict) else {}
    output = _seconds(usage.get("video_duration"), 60, low_inclusive=False)
    if output is None:
        return estimate
    given = _seconds(usage.get("input_video_duration"), 45, low_inclusive=True)
    return priced(output + (input_s if given is None else given), model, res)


def micros(usd: float | None) -> int:
    return round((usd or 0) * 1_000_000)
