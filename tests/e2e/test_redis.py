"""Scale-out on Redis end to end (SPEC §2, §4, §5, §10): gateway replicas sharing one real redis-server,
in front of the simulator, with Redis and replicas killed, frozen and restarted under them.

Prices (SPEC §1): `body()` is doubao-seedance-2.0, 720p, 5 s: 5 × $0.20 = $1.00 a task.
Without redis-server these tests fail on CI (CI=true) and are skipped elsewhere."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis as redis_sync

from gateway.store.redis.store import RedisStore
from tests.e2e.harness import KEYS, Gateway, Simulator, body, wait_until
from tests.e2e.helpers import CREATE, NEVER, assert_settled_books, creates, error_of, key_states, ledger, roomy, usage
from tests.redis_server import RedisServer, require_redis_server

PRICE = 1.0
SHORT = "sim:seconds=0.3 a short fox"
TEST_BUDGET_S = 45
pytestmark = pytest.mark.timeout(TEST_BUDGET_S)  # no test may hang the suite
TERMINAL = ("succeeded", "failed", "cancelled", "expired", "unresolved")


class DurableRedisServer(RedisServer):
    """The helper's server with an AOF fsynced on every write, as the README tells operators to run Redis:
    a SIGKILL (kill()) then loses nothing Redis acknowledged, and start() again on the same port and
    directory loads it back."""

    def start(self, timeout_s: float = 10) -> str:
        binary = require_redis_server()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self._dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--logfile",
                str(self._dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self.url


# fixtures


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh Redis per test: every replica uses the default prefix, so tests must not share one."""
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def durable_redis() -> Iterator[DurableRedisServer]:
    require_redis_server()
    server = DurableRedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replicas(make_gateway: Callable[..., Gateway]) -> Callable[..., list[Gateway]]:
    """replicas(server, count=2, **gateway kw) → count gateways on one Redis, started side by side."""

    def make(server: RedisServer, count: int = 2, **kw: Any) -> list[Gateway]:
        kw.setdefault("keys", roomy("key-a", "key-b"))
        gws = [make_gateway(store_url=server.url, name=f"r{i + 1}", start=False, **kw) for i in range(count)]
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(Gateway.start, gws))
        return gws

    return make


# helpers


def create(client: httpx.Client, prompt: str = SHORT) -> str:
    response = client.post(CREATE, json=body(prompt=prompt))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def poll(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = client.get(f"{CREATE}/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def store_unavailable(response: httpx.Response) -> None:
    """SPEC §3: 503 service_unavailable / store_unavailable, with a Retry-After."""
    error_of(response, 503, "service_unavailable", "store_unavailable")
    assert int(response.headers["retry-after"]) >= 1, response.headers


def sim_polls(sim: Simulator, task_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests("poll") if r["task_id"] == task_id]


def settled_lines(*gws: Gateway) -> list[dict[str, Any]]:
    return [line for gw in gws for line in gw.lines() if line.get("event") == "task.settled"]


def ready(gw: Gateway) -> httpx.Response:
    return httpx.get(gw.url + "/readyz", timeout=10)


# two replicas on one Redis


def test_task_created_on_one_replica_is_polled_on_the_other_with_its_key(replicas, redis_server, sim):
    """Tasks created through r1 (on keys drawn at random) are found by r2, forwarded with the key that
    created each one, listed by r2, and still 404 for another team."""
    r1, r2 = replicas(redis_server, keys=roomy("key-a", "key-b", "key-c"))
    with r1.client("alice") as c1, r2.client("alice") as c2, r2.client("bob") as other:
        ids = [create(c1, NEVER) for _ in range(6)]
        for tid in ids:
            assert poll(c2, tid)["id"] == tid
            error_of(other.get(f"{CREATE}/{tid}"), 404, "invalid_request_error", "task_not_found")
        listed = c2.get(CREATE, params={"limit": 100}).json()
        assert sorted(t["id"] for t in listed["data"]) == sorted(ids)
    key_of = {r["task_id"]: r["key"] for r in creates(sim, status=200)}
    for tid in ids:
        polls = sim_polls(sim, tid)
        assert polls and {p["key"] for p in polls} == {key_of[tid]}, (tid, polls)
        assert {p["status"] for p in polls} == {200}


def test_concurrent_creates_across_replicas_admit_exactly_the_budget(replicas, redis_server, sim):
    """Budget $9, 60 creates of $1 at once, 30 through each replica: exactly 9 are admitted and sent
    upstream, the other 51 are 429 budget_exceeded; both replicas report the same reservation."""
    r1, r2 = replicas(redis_server, teams={"red": {"budget_usd": 9.0}}, users={"alice": {"team": "red"}})

    async def burst() -> list[httpx.Response]:
        async with r1.aclient("alice") as c1, r2.aclient("alice") as c2:
            return await asyncio.gather(*(c.post(CREATE, json=body(prompt=NEVER)) for _ in range(30) for c in (c1, c2)))

    replies = asyncio.run(burst())
    codes = Counter(r.status_code for r in replies)
    assert codes == {200: 9, 429: 51}, codes
    for response in replies:
        if response.status_code == 429:
            error_of(response, 429, "insufficient_quota", "budget_exceeded")
    assert len(creates(sim)) == 9
    for gw in (r1, r2):
        assert_settled_books(gw, spent=0.0, reserved=9.0, in_flight=9)


def test_key_throttled_through_one_replica_is_avoided_by_the_other(replicas, redis_server, sim):
    """key-a answers one create 429 (Retry-After: 5) through r1, which moves it to key-b; r2 then shows
    key-a cooling down and sends none of its creates to key-a during the cooldown."""
    r1, r2 = replicas(redis_server)
    sim.fault("key-a", "429", retry_after=5, count=1, routes=["create"])
    with r1.client("alice") as c1:
        for _ in range(40):
            create(c1)
            if creates(sim, "key-a", 429):
                break
        else:
            pytest.fail("r1 never tried key-a")
    throttled_at = creates(sim, "key-a", 429)[0]["time"]
    time.sleep(0.3)  # a replica re-reads shared key health at most every 0.2 s
    state = key_states(r2)["key-a"]
    assert state["state"] == "cooldown", state
    assert state["cooldown_until"] >= throttled_at + 4, state
    with r2.client("alice") as c2:
        for _ in range(12):
            create(c2)
    assert time.time() < throttled_at + 5, "the creates through r2 must fall inside the cooldown"
    later = [r for r in creates(sim) if r["time"] > throttled_at]
    assert len(later) >= 12
    assert {r["key"] for r in later} == {KEYS["key-b"]}, later


def test_task_polled_through_both_replicas_settles_once(replicas, redis_server, sim):
    """A finished task polled at once through r1 and r2 (while both background pollers run) is settled
    exactly once: one task.settled line across both logs, $1 spent on both replicas' /usage."""
    r1, r2 = replicas(redis_server)
    with r1.client("alice") as c1:
        tid = create(c1)
    wait_until(lambda: sim.task(tid)["status"] == "succeeded", timeout=5)

    async def polls() -> list[httpx.Response]:
        async with r1.aclient("alice") as c1, r2.aclient("alice") as c2:
            return await asyncio.gather(*(c.get(f"{CREATE}/{tid}") for _ in range(10) for c in (c1, c2)))

    for _ in range(3):
        replies = asyncio.run(polls())
        assert {(r.status_code, r.json()["status"]) for r in replies} == {(200, "succeeded")}
    time.sleep(1.5)  # give both pollers a tick in which they could settle it again
    lines = [line for line in settled_lines(r1, r2) if line["task_id"] == tid]
    assert len(lines) == 1, lines
    assert (lines[0]["status"], lines[0]["cost_usd"], lines[0]["billed_seconds"]) == ("succeeded", PRICE, 5)
    for gw in (r1, r2):
        assert_settled_books(gw, spent=PRICE)
    finished = sum(gw.metric("tokenhub_gateway_tasks_finished_total", status="succeeded") for gw in (r1, r2))
    assert finished == 1


def test_killed_replica_loses_nothing(replicas, redis_server, sim):
    """r1 is killed (SIGKILL) with three short tasks just created and one create still upstream; r2's
    poller settles the three (succeeded, $1 each) and, after expire_after_s, the create r1 never recorded
    (unresolved at its $1 estimate): nothing stays reserved or in flight."""
    r1, r2 = replicas(redis_server, keys=roomy("key-a"), extra={"poller": {"expire_after_s": 4}})
    sim.fault("key-a", "slow", delay_s=3, count=1, routes=["create"])
    in_flight = threading.Thread(target=_ignore_errors, args=(lambda: _post_once(r1, body()),))
    in_flight.start()
    with r1.client("alice") as c1:
        wait_until(lambda: creates(sim), timeout=5, interval=0.02)
        ids = [create(c1) for _ in range(3)]
        r1.kill()
        in_flight.join(10)
    lines = wait_until(lambda: len(settled_lines(r2)) >= 4 and settled_lines(r2), timeout=12)
    by_status = Counter(line["status"] for line in lines)
    assert by_status == {"succeeded": 3, "unresolved": 1}, lines
    assert {line["task_id"] for line in lines if line["status"] == "succeeded"} == set(ids)
    assert all(line["cost_usd"] == PRICE for line in lines), lines
    assert any(line.get("event") == "task.unresolved" for line in r2.lines())
    assert_settled_books(r2, spent=4 * PRICE)
    rows = ledger(r2)
    assert Counter(r["status"] for r in rows) == {"succeeded": 3, "unresolved": 1}, rows
    lost = next(r for r in rows if r["status"] == "unresolved")
    assert lost["cost_estimated"] is True, lost
    # SPEC §9: the settled line names the task as the ledger does (no upstream id: the gateway's own)
    assert [x["task_id"] for x in lines if x["status"] == "unresolved"] == [lost["task_id"]], (lines, lost)


def _post_once(gw: Gateway, data: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    with gw.client("alice") as client:
        return client.post(CREATE, json=data, headers=headers)


def _ignore_errors(call: Callable[[], Any]) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass  # the replica serving it was killed


# Redis outages


def test_redis_killed_and_restarted_under_traffic(replicas, durable_redis, sim):
    """Creates and polls through two replicas for ~6 s while Redis is SIGKILLed for ~2 s and restarted on
    the same port (AOF, fsync always). No 500 ever; creates during the outage are 503 store_unavailable
    with Retry-After; /readyz is 503 during it and 200 after; afterwards every acknowledged task is in the
    ledger and settled once, and the books (counters, ledger, logs, upstream) agree: nothing double-charged."""
    r1, r2 = replicas(durable_redis, extra={"poller": {"expire_after_s": 6}})
    log: list[dict[str, Any]] = []
    acked: list[str] = []
    stop = threading.Event()

    def traffic(gw: Gateway) -> None:
        with gw.client("alice", timeout=10) as client:
            while not stop.is_set():
                _record(log, "create", lambda: client.post(CREATE, json=body(prompt="sim:seconds=0.5 a fox")), acked)
                if acked:
                    tid = acked[len(log) % len(acked)]
                    _record(log, "poll", lambda tid=tid: client.get(f"{CREATE}/{tid}"), acked)
                time.sleep(0.05)

    workers = [threading.Thread(target=traffic, args=(gw,)) for gw in (r1, r2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.5)
        durable_redis.kill()
        killed = time.monotonic()
        time.sleep(0.3)
        for gw in (r1, r2):
            response = ready(gw)
            assert response.status_code == 503 and "store_unavailable" in response.json()["problems"], response.text
        time.sleep(max(0.0, killed + 2 - time.monotonic()))
        restarting = time.monotonic()
        durable_redis.start()
        wait_until(lambda: all(ready(gw).status_code == 200 for gw in (r1, r2)), timeout=10)
        recovered = time.monotonic()
        time.sleep(2.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)

    assert not [e for e in log if e["status"] is None or (e["status"] >= 500 and e["status"] != 503)], log
    for entry in log:
        if entry["status"] == 503:
            assert entry["code"] == "store_unavailable" and entry["retry_after"], entry
    during = [e for e in log if e["kind"] == "create" and e["start"] > killed and e["end"] < restarting]
    assert during and {e["status"] for e in during} == {503}, during
    after = [e for e in log if e["kind"] == "create" and e["start"] > recovered]
    assert after and {e["status"] for e in after} == {200}, after

    with r1.client("alice") as client:  # clients keep polling: every acknowledged task reaches its end
        for tid in acked:
            wait_until(lambda tid=tid: poll(client, tid)["status"] in TERMINAL, timeout=5, interval=0.2)
    rows = wait_until(lambda: _all_settled(ledger(r1)), timeout=15)  # incl. creates whose id was never recorded
    by_id = {r["task_id"]: r for r in rows}
    assert set(acked) <= set(by_id), set(acked) - set(by_id)
    for tid in acked:
        assert (by_id[tid]["status"], by_id[tid]["cost_usd"]) == ("succeeded", PRICE), by_id[tid]

    counts = Counter(line["task_id"] for line in settled_lines(r1, r2) if line["task_id"])
    assert max(counts.values()) == 1, [t for t, n in counts.items() if n > 1]
    total = round(sum(r["cost_usd"] for r in rows), 6)
    assert_settled_books(r2, spent=total)
    upstream = {r["task_id"] for r in creates(sim, status=200)}
    recorded = {tid for tid in by_id if tid in upstream}
    unrecorded = [r for r in rows if r["task_id"] not in upstream]
    assert set(by_id) - set(upstream) == {r["task_id"] for r in unrecorded}
    assert all(r["status"] == "unresolved" for r in unrecorded), unrecorded
    # every task TokenHub made is accounted: recorded under its id, or as a create whose id was lost
    assert len(upstream - recorded) <= len(unrecorded), (upstream - recorded, unrecorded)
    # ... and nothing is charged that TokenHub never made: the bill is what TokenHub delivered
    assert total == PRICE * len(upstream), (f"charged ${total} for {len(upstream)} tasks TokenHub made", unrecorded)


def _all_settled(rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return rows if rows and all(r["settled_at"] for r in rows) else None


def _record(log: list[dict[str, Any]], kind: str, call: Callable[[], httpx.Response], acked: list[str]) -> None:
    start = time.monotonic()
    entry: dict[str, Any] = {"kind": kind, "start": start, "status": None, "code": None, "retry_after": None}
    try:
        response = call()
    except httpx.HTTPError as exc:
        entry["error"] = repr(exc)
    else:
        entry.update(status=response.status_code, retry_after=response.headers.get("retry-after"))
        if response.status_code >= 400:
            entry["code"] = response.json()["error"]["code"]
        elif kind == "create":
            acked.append(response.json()["id"])
    entry["end"] = time.monotonic()
    log.append(entry)


def test_redis_down_fails_creates_closed_and_cached_polls_still_forward(replicas, durable_redis, sim):
    """Redis killed: creates are 503 store_unavailable through both replicas and nothing goes upstream;
    /readyz is 503 (/healthz stays 200); r1, which has both tasks' records cached, still forwards their
    polls (200, TokenHub's body; one has finished meanwhile); r2, which has never seen them, answers 503.
    Redis back: /readyz 200, the finished task is settled exactly once, creates work again."""
    r1, r2 = replicas(durable_redis)
    with r1.client("alice") as c1, r2.client("alice") as c2:
        running, finishing = create(c1, NEVER), create(c1, "sim:seconds=1.5 a fox")
        for tid in (running, finishing):
            poll(c1, tid)
        durable_redis.kill()
        for client in (c1, c2):
            store_unavailable(client.post(CREATE, json=body()))
        assert len(creates(sim)) == 2
        for gw in (r1, r2):
            response = ready(gw)
            assert response.status_code == 503 and response.json()["problems"] == ["store_unavailable"], response.text
            assert httpx.get(gw.url + "/healthz").status_code == 200
        wait_until(lambda: sim.task(finishing)["status"] == "succeeded", timeout=5)  # also past coalescing
        before = len(sim_polls(sim, running))
        assert poll(c1, running)["status"] == "running"
        assert len(sim_polls(sim, running)) == before + 1
        done = poll(c1, finishing)
        assert done["status"] == "succeeded" and done["data"][0]["video_url"], done
        store_unavailable(c2.get(f"{CREATE}/{finishing}"))

        durable_redis.start()
        wait_until(lambda: all(ready(gw).status_code == 200 for gw in (r1, r2)), timeout=10)
        assert poll(c2, finishing)["status"] == "succeeded"
        lines = wait_until(lambda: [x for x in settled_lines(r1, r2) if x["task_id"] == finishing], timeout=5)
        time.sleep(1.5)  # a background poller tick on each replica
        assert len([x for x in settled_lines(r1, r2) if x["task_id"] == finishing]) == 1, lines
        create(c2)
    assert_settled_books(r1, spent=PRICE, reserved=2 * PRICE, in_flight=2)
    rows = {r["task_id"]: r for r in ledger(r2)}
    assert len(rows) == 3 and rows[finishing]["status"] == "succeeded", rows
    assert rows[running]["settled_at"] is None, rows


def test_hung_redis_fails_creates_closed_and_nothing_is_left_behind(replicas, redis_server, sim):
    """Redis frozen (SIGSTOP): creates (one with an Idempotency-Key) are 503 store_unavailable in bounded time
    and nothing goes upstream; a poll of a task whose record r1 has cached still forwards; /readyz is 503.
    Thawed: /readyz is 200; the refused creates left nothing behind (no reservation, no slot, no ledger row,
    no claimed idempotency key), even though the frozen Redis still holds what they sent; creates work again."""
    (r1,) = replicas(redis_server, count=1)
    with r1.client("alice") as client:
        running = create(client, NEVER)
        time.sleep(0.5)
        assert poll(client, running)["status"] == "running"  # r1 caches the record
        time.sleep(1.1)  # past the poll coalescing window
        asyncio.run(_warm_pool(r1))  # the creates' scripts then reach the frozen Redis on open connections
        redis_server.pause()
        try:
            with ThreadPoolExecutor(5) as pool:
                timed = [
                    pool.submit(_timed, call)
                    for call in (
                        lambda: _post_once(r1, body(), {"Idempotency-Key": "frozen-1"}),
                        lambda: _post_once(r1, body()),
                        lambda: _post_once(r1, body()),
                        lambda: _get_once(r1, f"{CREATE}/{running}"),
                        lambda: ready(r1),
                    )
                ]
                *made, (polled, polled_s), (readiness, _) = (f.result() for f in timed)
        finally:
            redis_server.resume()
        assert polled.status_code == 200 and polled.json()["status"] == "running", polled.text
        assert polled_s < 10, polled_s
        assert readiness.status_code == 503, readiness.text
        for response, seconds in made:
            store_unavailable(response)
            assert seconds < 10, seconds
        assert len(creates(sim)) == 1

        wait_until(lambda: ready(r1).status_code == 200, timeout=10)
        books = ("user", "team")
        try:  # Redis works off what the frozen connections had sent; give the gateway a few ticks to undo it
            wait_until(lambda: all(usage(r1)[s]["tasks_in_flight"] == 1 for s in books), timeout=4)
        except TimeoutError:
            pass
        assert_settled_books(r1, spent=0.0, reserved=PRICE, in_flight=1)
        assert [r["task_id"] for r in ledger(r1)] == [running]
        retried = client.post(CREATE, json=body(), headers={"Idempotency-Key": "frozen-1"})
        assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers, retried.text
    assert len(creates(sim)) == 2


async def _warm_pool(gw: Gateway) -> None:
    """Concurrent reads, so the replica keeps several idle connections to Redis in its pool."""
    async with gw.aclient("alice") as client:
        replies = await asyncio.gather(*(client.get("/usage") for _ in range(16)))
    assert {r.status_code for r in replies} == {200}


def _get_once(gw: Gateway, path: str) -> httpx.Response:
    with gw.client("alice") as client:
        return client.get(path)


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


# one clock


def test_store_clock_is_redis_server_time(redis_server):
    """RedisStore.now() is Redis's TIME (the clock every replica shares), not this process's own."""
    client = redis_sync.Redis.from_url(redis_server.url)

    async def compare() -> tuple[float, float, float]:
        store = RedisStore(redis_server.url)
        await store.open()
        try:
            before = _server_time(client)
            now = await store.now()
            return before, now, _server_time(client)
        finally:
            await store.close()

    try:
        before, now, after = asyncio.run(compare())
    finally:
        client.close()
    assert before - 0.05 <= now <= after + 0.05, (before, now, after)


def _server_time(client: redis_sync.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6
