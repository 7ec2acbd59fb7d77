"""The books hold under any answer: the app in-process against a TokenHub whose answers are drawn at random
(statuses, valid and absurd usage, 4xx/5xx, timeouts, cut-offs, duplicate ids), with client creates,
idempotent retries, polls, cancels, operator resolutions and the background poller, on both stores.
After every step: no 500, no key value in any answer, and the counters agree with the ledger."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store.redis.store import RedisStore
from tests.doubles import make_settings
from tests.tokenhub_script import MAY_HAVE_CREATED, Answer, ScriptedTokenHub, expected_cost, micros

T = TypeVar("T")

# Upstream keys with characters the `th-…` shape does not cover, one not shaped like a TokenHub key at all.
KEYS = {"K1": "th-Ab.c+D/e=F0123456789", "K2": "sk.live+K3y/with=equals==", "K3": "th-Zm9v+YmFy/LmJheg=="}
ADMIN = {"Authorization": "Bearer adm-books-token"}
EXPIRE_AFTER_S = 600
REDIS_LAG_S = 10_000.0
USERS = {"alice": "red", "carol": "red", "bob": "blue"}
VIDEOS = ["https://v.invalid/1.mp4", "https://v.invalid/2.mp4", "https://v.invalid/3.mp4"]
BODIES = [
    {"model": "doubao-seedance-2.0", "prompt": "a fox"},
    {"model": "doubao-seedance-2.0-fast", "prompt": "rain", "duration": 4, "resolution": "480p"},
    {
        "model": "doubao-seedance-2.0",
        "prompt": "edit",
        "duration": 10,
        "video_urls": VIDEOS[:2],
        "video_durations": [2.5, 4],
    },
    {
        "model": "doubao-seedance-2.0",
        "prompt": "remix",
        "duration": 6,
        "resolution": "480p",
        "video_url": VIDEOS[2],
    },  # no durations: 15 s reserved, settled on TokenHub's figure
    {
        "model": "doubao-seedance-2.0-fast",
        "prompt": "long",
        "duration": 15,
        "video_urls": VIDEOS,
        "input_video_duration": 7.25,
    },
]
VALID = len(BODIES)
BODIES += [
    {"model": "doubao-seedance-2.0", "prompt": "tiny", "video_urls": VIDEOS, "input_video_duration": 0.001},
    {"model": "doubao-seedance-2.0", "prompt": "p", "duration": 5.0},
]  # refused before anything is spent


def token(user: str) -> str:
    return f"tgw-books-{user}"


def settings(store_url: str) -> Settings:
    return make_settings(
        store_url,
        keys=KEYS,
        key_options={"max_concurrent_tasks": 4},
        upstream={"cooldown_s": 5, "breaker_failures": 3},
        env={"ADMIN": ADMIN["Authorization"].split()[1]},
        server={"admin_token_env": "ADMIN"},
        poller={"interval_s": 0.001, "expire_after_s": EXPIRE_AFTER_S},
        teams={"red": {"budget_usd": 25, "period": "total"}, "blue": {"video_seconds": 240, "period": "total"}},
        users={
            user: {"team": team, "key": token(user), **({"max_concurrent_tasks": 2} if user == "carol" else {})}
            for user, team in USERS.items()
        },
    )


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


ECHOES = st.sampled_from([None, "raw", "json", "percent"])
FAILURES = (
    st.builds(Answer, st.sampled_from(["timeout", "cut_off", "connect"]))
    | st.builds(Answer, st.just("http"), st.sampled_from([400, 401, 403, 404, 422, 429]), echo=ECHOES)
    | st.builds(Answer, st.just("5xx"), st.sampled_from([500, 502, 503]), echo=ECHOES)
)
CREATE_ANSWERS = weighted(
    (5, st.builds(Answer, st.just("fresh"), echo=ECHOES)),
    (1, st.builds(Answer, st.just("duplicate"), pick=st.integers(0, 7))),
    (1, st.builds(Answer, st.just("no_id"), echo=ECHOES)),
    (3, FAILURES),
)
ABSURD = (
    st.sampled_from([1e14, 10**20, 1e308, 60.001, 45.001, -1, -0.0, 0, 1e-9])  # out of range, or at an edge
    | st.sampled_from([float("nan"), float("inf"), "5", None, True, [], {}])
)  # not a number at all
OUTPUT_S = weighted((2, st.floats(0.5, 60).map(lambda s: round(s, 3)) | st.integers(1, 15)), (1, ABSURD))
INPUT_S = weighted((3, st.floats(0, 45).map(lambda s: round(s, 2))), (1, ABSURD))
USAGE = weighted(
    (4, st.fixed_dictionaries({"video_duration": OUTPUT_S}, optional={"input_video_duration": INPUT_S})),
    (1, st.none() | st.fixed_dictionaries({}, optional={"input_video_duration": INPUT_S})),
)
STATUSES = [
    "queued",
    "running",
    "running",
    "succeeded",
    "succeeded",
    "succeeded",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
]
POLL_ANSWERS = weighted(
    (6, st.builds(Answer, st.just("status"), status=st.sampled_from(STATUSES), usage=USAGE, echo=ECHOES)),
    (1, st.builds(Answer, st.just("garbage"), st.sampled_from([200, 201]))),
    (3, FAILURES),
)
DELETE_ANSWERS = weighted((1, st.builds(Answer, st.just("cancel"), echo=ECHOES)), (1, FAILURES))
USER = st.sampled_from(list(USERS))
VALID_BODY = st.integers(0, VALID - 1)
BODY = st.integers(0, len(BODIES) - 1)
IDEM = st.none() | st.sampled_from(["a", "b"])


def leaked(texts: list[str]) -> list[str]:
    """Key values found in the texts, as sent or once JSON strings and percent-escapes are decoded."""
    seen = list(texts)
    for text in texts:
        try:
            seen += _strings(json.loads(text))
        except ValueError:
            pass
    seen += [unquote(t) for t in seen]
    return [name for name, value in KEYS.items() if any(value in t for t in seen)]


def checked(r: httpx.Response) -> httpx.Response:
    assert r.status_code != 500, (r.request.method, r.request.url.path, r.text)
    assert not leaked([r.text, *(f"{k}: {v}" for k, v in r.headers.items())]), (r.request.url.path, r.text)
    return r


def _strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield k
            yield from _strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from _strings(v)


class Books(RuleBasedStateMachine):
    def __init__(self, store_url: Callable[[str], str], synchronous: str = "NORMAL") -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="thg-books-")
        url = store_url(self.tmp.name)
        self.tokenhub = ScriptedTokenHub()
        store = RedisStore(url, prefix=f"books:{uuid.uuid4().hex[:8]}:") if url.startswith("redis") else None
        # Redis stamps creates and due polls with its own clock. Ours runs well behind it, so every poll the
        # poller defers is due at its next tick, until time jumps past poller.expire_after_s.
        self.lag = REDIS_LAG_S if store else 0.0
        self.now = time.time() - self.lag
        config = settings(url)
        config = replace(config, store=replace(config.store, synchronous=synchronous))  # SQLite's write path
        app = create_app(config, upstream=self.tokenhub, store=store, clock=lambda: self.now, run_poller=False)
        self.gateway = app.gateway
        self.gateway.pool._rng.seed(0)  # key choice and back-off jitter: the same on every replay
        self.gateway.poller._rng.seed(0)
        self.loop = asyncio.new_event_loop()
        self.lifespan = app.router.lifespan_context(app)
        self.run(self.lifespan.__aenter__())
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://gw"
        )
        self.owner: dict[str, str] = {}  # task id → the team whose create recorded it
        self.rows_expected = 0  # creates after which TokenHub may hold a task (and bill it)
        self.idem: dict[tuple[str, str, int], dict[str, Any]] = {}  # (team, key, body) → what was seen
        self.sent: list[tuple[str, int, str]] = []  # idempotent creates, to retry
        self.resolved: dict[str, Any] = {}
        self.unknown_rows: list[str] = []

    def teardown(self) -> None:
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.close()
        self.tmp.cleanup()

    def run(self, work: Awaitable[T]) -> T:
        return self.loop.run_until_complete(work)

    def send(self, method: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
        return checked(self.run(self.http.request(method, path, headers=headers, **kw)))

    def as_user(self, user: str, method: str, path: str, **kw: Any) -> Any:
        return self.send(method, path, {"Authorization": f"Bearer {token(user)}", **kw.pop("headers", {})}, **kw)

    @initialize(
        creates=st.lists(
            st.tuples(USER, VALID_BODY, IDEM, st.lists(CREATE_ANSWERS, max_size=2)), min_size=1, max_size=4
        )
    )
    def some_tasks(self, creates: list[tuple[str, int, str | None, list[Answer]]]) -> None:
        for args in creates:
            self.create(*args)

    @rule(user=USER, body=BODY, idem=IDEM, answers=st.lists(CREATE_ANSWERS, max_size=3))
    def create(self, user: str, body: int, idem: str | None, answers: list[Answer]) -> None:
        if idem and body < VALID:
            self.sent.append((user, body, idem))
        self._create(user, body, idem, answers)

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 50), answers=st.lists(CREATE_ANSWERS, max_size=2))
    def retry(self, pick: int, answers: list[Answer]) -> None:
        self._create(*self.sent[pick % len(self.sent)], answers)

    def _create(self, user: str, body: int, idem: str | None, answers: list[Answer]) -> None:
        team, before = USERS[user], len(self.tokenhub.posts)
        self.tokenhub.creates.extend(answers)
        r = self.as_user(
            user, "POST", "/v1/videos/generations", json=BODIES[body], headers={"Idempotency-Key": idem} if idem else {}
        )
        self.tokenhub.creates.clear()
        posts = self.tokenhub.posts[before:]
        if body >= VALID:
            assert r.status_code == 400 and not posts, r.text
            return
        last = posts[-1].kind if posts else None
        if idem:
            self._idempotency(team, idem, body, r, last)
        if last in MAY_HAVE_CREATED:
            self.rows_expected += 1
        expected = {
            "fresh": {200},
            "duplicate": {502},
            "no_id": {502},
            "5xx": {502},
            "cut_off": {502},
            "timeout": {504},
        }.get(last)
        assert expected is None or r.status_code in expected, (last, r.status_code, r.text)
        if last == "fresh":
            task_id = r.json()["id"]
            assert task_id == posts[-1].task_id and task_id not in self.owner
            self.owner[task_id] = team

    def _idempotency(self, team: str, key: str, body: int, r: Any, last: str | None) -> None:
        """A retry never pays twice: once a create may have made a task, its answer is replayed."""
        seen = self.idem.get((team, key, body))
        replayed = r.headers.get("idempotent-replayed") == "true"
        if replayed:
            assert last is None and seen is not None, r.text
            assert (r.status_code, r.content) == seen["answer"]
        elif last is not None:
            assert seen is None or not seen["paid"], f"{key}: forwarded again after {seen}"
            self.idem[team, key, body] = {"answer": (r.status_code, r.content), "paid": last in MAY_HAVE_CREATED}
        if any(k[:2] == (team, key) and k[2] != body and v["paid"] for k, v in self.idem.items()):
            assert r.status_code == 409 and last is None, r.text

    @precondition(lambda self: self.tokenhub.tasks)
    @rule(pick=st.integers(0, 50), user=USER, answer=POLL_ANSWERS)
    def poll(self, pick: int, user: str, answer: Answer) -> None:
        self._task_call("GET", pick, user, answer)

    @precondition(lambda self: self.tokenhub.tasks)
    @rule(pick=st.integers(0, 50), user=USER, answer=DELETE_ANSWERS)
    def cancel(self, pick: int, user: str, answer: Answer) -> None:
        self._task_call("DELETE", pick, user, answer)

    def _task_call(self, method: str, pick: int, user: str, answer: Answer) -> None:
        task_id = self._script({pick: [answer]})[0]
        calls = self.tokenhub.calls
        r = self.as_user(user, method, f"/v1/videos/generations/{task_id}")
        if self.owner.get(task_id) != USERS[user]:  # another team's task, whoever holds it
            assert r.status_code == 404 and self.tokenhub.calls == calls, r.text

    def _script(self, answers: dict[int, list[Answer]]) -> list[str]:
        """TokenHub's next answers about the tasks picked (by index, in id order); the ids picked."""
        ids = sorted(self.tokenhub.tasks)
        self.tokenhub.answers = {ids[i % len(ids)]: list(a) for i, a in answers.items()}
        self.gateway.polls._recent.clear()  # a step is more than the 1 s coalescing window (real clock)
        return [ids[i % len(ids)] for i in answers]

    @precondition(lambda self: self.tokenhub.tasks)
    @rule(data=st.data())
    def poller_tick(self, data: st.DataObject) -> None:
        n = len(self.tokenhub.tasks)
        plan = data.draw(st.lists(POLL_ANSWERS, min_size=n, max_size=n), label="answers")
        self._script({i: [a] for i, a in enumerate(plan)})
        self.now += 1  # the poller ticks once a second
        self.run(self.gateway.poller.tick())

    @precondition(lambda self: self.tokenhub.tasks)
    @rule(
        pick=st.integers(0, 50),
        answers=st.lists(POLL_ANSWERS | DELETE_ANSWERS, min_size=3, max_size=3),
        cancel=st.booleans(),
    )
    def race(self, pick: int, answers: list[Answer], cancel: bool) -> None:
        """The owner polls (or cancels) while polling again and while the poller ticks: one settlement."""
        task_id = self._script({pick: answers})[0]
        user = next((u for u, t in USERS.items() if t == self.owner[task_id]))
        headers = {"Authorization": f"Bearer {token(user)}"}
        path = f"/v1/videos/generations/{task_id}"
        self.now += 1

        async def together() -> list[Any]:
            return await asyncio.gather(
                self.http.request("DELETE" if cancel else "GET", path, headers=headers),
                self.http.request("GET", path, headers=headers),
                self.gateway.poller.tick(),
            )

        for r in self.run(together())[:2]:
            checked(r)

    @rule(seconds=st.sampled_from([1.5, 1.5, 31, EXPIRE_AFTER_S + 100]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds + (self.lag if seconds > EXPIRE_AFTER_S else 0)
        self.lag = 0.0 if seconds > EXPIRE_AFTER_S else self.lag

    @precondition(lambda self: self.unknown_rows)
    @rule(pick=st.integers(0, 50), seconds=st.sampled_from(["void", 1, 5, 12.5, 60]))
    def operator_resolves(self, pick: int, seconds: Any) -> None:
        ref = self.unknown_rows[pick % len(self.unknown_rows)]
        if seconds == "void":
            r = self.send("POST", f"/admin/tasks/{ref}/void", ADMIN)
        else:
            r = self.send("POST", f"/admin/tasks/{ref}/settle", ADMIN, json={"video_seconds": seconds})
        assert r.status_code == 200, r.text
        self.resolved[ref] = seconds
        again = self.send("POST", f"/admin/tasks/{ref}/void", ADMIN)
        assert (again.status_code, again.json()["error"]["code"]) == (409, "task_not_unknown"), again.text

    def _resolution(self, row: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """A resolved row shows its resolution, by the operator; it is priced as the unknown row it was."""
        resolved = self.resolved.get(row["task_id"])
        if resolved is None:
            assert row["resolved_by"] is None and row["resolved_at"] is None, row
            return row, None
        assert row["status"] == ("voided" if resolved == "void" else "succeeded"), row
        assert row["resolved_by"] == "admin" and row["resolved_at"] is not None, row
        return {**row, "status": "unknown"}, resolved

    def _metrics_agree(self, rows: list[dict[str, Any]]) -> None:
        """The spend counters hold every settled row but an unknown one (counted once resolved)."""
        counted = [r for r in rows if r["settled_at"] is not None and r["status"] != "unknown"]
        registry = self.gateway.metrics.registry
        for metric, figure in (("spend_usd", "cost_usd"), ("video_seconds", "billed_seconds")):
            samples = [m.samples for m in registry.collect() if m.name == f"tokenhub_gateway_{metric}"]
            total = sum(s.value for s in samples[0] if s.name.endswith("_total"))
            assert total == pytest.approx(sum(r[figure] for r in counted), abs=1e-6), metric

    @invariant()
    def books_balance(self) -> None:
        rows = self.send("GET", "/admin/usage", ADMIN).json()["data"]
        teams = {t["name"]: t for t in self.send("GET", "/admin/teams", ADMIN).json()["data"]}
        users = {u: self.as_user(u, "GET", "/v1/usage").json()["user"] for u in USERS}
        keys = self.send("GET", "/admin/keys", ADMIN).json()["data"]
        self.unknown_rows = [r["task_id"] for r in rows if r["status"] == "unknown"]
        assert len(rows) == self.rows_expected, "a create TokenHub may have billed has no ledger row"
        assert set(self.tokenhub.tasks) <= {r["task_id"] for r in rows}
        settled = {r["task_id"] for r in rows if r["settled_at"] is not None}
        assert self.tokenhub.finals <= settled, "a terminal answer was seen and the task is not settled"
        for row in rows:
            if row["settled_at"] is not None:
                shown, resolved = self._resolution(row)
                cost = expected_cost(shown, self.tokenhub.tasks.get(row["task_id"]), resolved)
                assert (micros(row["cost_usd"]), round(row["billed_seconds"] * 1000)) == cost, row
        self._metrics_agree(rows)
        for scope, figures in [("team", teams), ("user", users)]:
            for name, f in figures.items():
                mine = [r for r in rows if r[scope] == name]
                open_rows = [r for r in mine if r["settled_at"] is None]
                assert f["reserved_usd"] >= 0 and f["video_seconds_reserved"] >= 0, f
                assert micros(f["spent_usd"]) == sum(micros(r["cost_usd"]) for r in mine), (name, f)
                assert round(f["video_seconds_spent"] * 1000) == sum(
                    round((r["billed_seconds"] or 0) * 1000) for r in mine
                ), (name, f)
                assert micros(f["reserved_usd"]) == sum(micros(r["estimate_usd"]) for r in open_rows), (name, f)
                assert f["tasks_in_flight"] == len(open_rows), (name, f)
        assert sum(k["tasks_in_flight"] for k in keys) == sum(r["settled_at"] is None for r in rows), keys


@pytest.mark.timeout(600)  # room for shrinking a failure (at most 5 min) before the report
def test_books_balance_on_sqlite() -> None:
    run_state_machine_as_test(lambda: Books(lambda tmp: f"sqlite:///{tmp}/books.db"))


@pytest.mark.timeout(600)
def test_books_balance_on_sqlite_full() -> None:
    """The writer thread of synchronous=FULL (the test above runs the event loop's write path)."""
    run_state_machine_as_test(lambda: Books(lambda tmp: f"sqlite:///{tmp}/books.db", "FULL"))


@pytest.mark.timeout(600)
def test_books_balance_on_redis(redis_url: str) -> None:
    run_state_machine_as_test(lambda: Books(lambda _tmp: redis_url))
