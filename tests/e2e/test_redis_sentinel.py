"""The Redis store behind Redis Sentinel (SPEC §14): a master, a replica and three sentinels started here
once for the module (tests/redis_server.py), gateways given a `redis+sentinel://` URL.

Writes wait for the replica (WAIT 1), so a failover loses nothing the gateway acknowledged; the master
killed under traffic makes creates 503 store_unavailable (never a 500) until the sentinels promote the
replica, and creates succeed again after it. Without redis-sentinel these tests fail on CI and are
skipped elsewhere."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway.store.redis.pipe import WAIT_MS
from gateway.store.redis.store import RedisStore
from tests.e2e.harness import Gateway, body, wait_until
from tests.e2e.helpers import CREATE, NEVER, assert_settled_books, creates, ledger, roomy
from tests.redis_server import SentinelServers, command, info, require_redis_sentinel, require_redis_server
from tests.store.helpers import admission

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def servers() -> Iterator[SentinelServers]:
    require_redis_server()
    require_redis_sentinel()
    setup = SentinelServers()
    setup.start()
    yield setup
    setup.stop()


@pytest.fixture
def sentinel(servers: SentinelServers) -> SentinelServers:
    """The setup healthy again (a server killed by an earlier test restarted: the sentinels make it the
    master's replica), and empty."""
    for server in servers.servers:
        if not server.answers():
            server.start()
    wait_until(servers.healthy, timeout=30, interval=0.2)
    command(servers.master.port, "flushall")
    return servers


def wait_calls(port: int) -> int:
    stats = info(port, "info", "commandstats").get("cmdstat_wait", "calls=0")
    return int(stats.split(",")[0].removeprefix("calls="))


async def test_writes_wait_for_the_replica_and_stop_waiting_while_it_lags(sentinel):
    """Every write the store makes is followed by WAIT 1 in the same round trip; a replica that misses the
    wait (frozen here) costs one write WAIT_MS and the store stops waiting for a while (logged)."""
    master, replica = sentinel.master, sentinel.replica
    store = RedisStore(sentinel.url, prefix="{wait}:")
    await store.open()
    try:
        now = await store.now()
        before = wait_calls(master.port)
        for _ in range(5):
            adm = admission(now)
            assert await store.admit(adm, now) is None
            await store.record_created(adm.task.rid, "cgt-" + adm.task.rid, "queued", now, (200, b"{}"))
            assert command(replica.port, "exists", "{wait}:t:" + adm.task.rid).strip() == "1"
        assert wait_calls(master.port) - before == 10
        replica.pause()
        try:
            with capture_logs() as logs:
                started = time.monotonic()
                assert await store.admit(admission(now), now) is None
                lagged = time.monotonic() - started
                started = time.monotonic()
                for _ in range(3):
                    assert await store.admit(admission(now), now) is None
                after = (time.monotonic() - started) / 3
        finally:
            replica.resume()
        assert lagged >= WAIT_MS / 1000 > after, (lagged, after)
        assert [e["event"] for e in logs if e["event"].startswith("store.")] == ["store.replica_lagging"]
    finally:
        await store.close()


def test_master_killed_under_traffic_fails_over_and_loses_nothing_acknowledged(make_gateway, sentinel, sim):
    """Creates and polls through two gateways while the master is SIGKILLed: no 500 ever; creates in the half
    second before the sentinels may act are 503 store_unavailable with Retry-After; once the replica is
    promoted, creates succeed again; and every task acknowledged is in the books on the new master: its
    $1 reserved, its slot counted, its ledger row, and nothing created upstream that was not acknowledged."""
    gws = [
        make_gateway(
            teams={"red": {}},
            users={"alice": {"team": "red"}},
            store_url=sentinel.url,
            keys=roomy("key-a", "key-b"),
            name=f"s{i}",
            start=False,
        )
        for i in (1, 2)
    ]
    for gw in gws:
        gw.start()
    log: list[dict[str, Any]] = []
    acked: list[str] = []
    stop = threading.Event()
    workers = [threading.Thread(target=_traffic, args=(gw, log, acked, stop)) for gw in gws]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.5)
        old = sentinel.master
        old.kill()
        killed = time.monotonic()
        wait_until(lambda: sentinel.failed_over(old), timeout=20, interval=0.05)
        promoted = time.monotonic()
        time.sleep(2.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)

    assert not [e for e in log if e["status"] is None or (e["status"] >= 500 and e["status"] != 503)], log
    for entry in log:
        if entry["status"] == 503:
            assert entry["code"] == "store_unavailable" and entry["retry_after"], entry
    create_log = [e for e in log if e["kind"] == "create"]
    during = [e for e in create_log if e["start"] > killed + 0.05 and e["end"] < promoted]
    assert {e["status"] for e in during} <= {503}, during  # refused while there is no master, never a 500
    if promoted - killed > 1.5:  # long enough for some create to start and end inside the failover
        assert during, (promoted - killed, create_log[-5:])
    after = [e for e in create_log if e["start"] > promoted + 1.0]
    assert after and {e["status"] for e in after} == {200}, after

    # creates refused during the failover are undone, and tasks made upstream while the store was away
    # recorded, by each gateway's poller once the store answers
    total = float(len(acked))
    wait_until(lambda: all(_books(gw) == (total, len(acked)) for gw in gws), timeout=15, interval=0.3)
    assert_settled_books(gws[0], spent=0.0, reserved=total, in_flight=len(acked))
    assert sorted(r["task_id"] for r in ledger(gws[1])) == sorted(acked)
    assert sorted(r["task_id"] for r in creates(sim, status=200)) == sorted(acked)


def _books(gw: Gateway) -> tuple[float, int]:
    with gw.client("alice") as client:
        team = client.get("/usage").json()["team"]
    return team["reserved_usd"], team["tasks_in_flight"]


def _traffic(gw: Gateway, log: list[dict[str, Any]], acked: list[str], stop: threading.Event) -> None:
    with gw.client("alice", timeout=10) as client:
        while not stop.is_set():
            _record(log, "create", lambda: client.post(CREATE, json=body(prompt=NEVER)), acked)
            if acked:
                tid = acked[len(log) % len(acked)]
                _record(log, "poll", lambda tid=tid: client.get(f"{CREATE}/{tid}"), acked)
            time.sleep(0.02)


def _record(log: list[dict[str, Any]], kind: str, call: Callable[[], httpx.Response], acked: list[str]) -> None:
    entry: dict[str, Any] = {"kind": kind, "start": time.monotonic(), "status": None, "code": None, "retry_after": None}
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
