"""The Redis store on a Redis Cluster (SPEC §14): three masters started here (`redis-server --cluster-enabled
yes`, `redis-cli --cluster create`), every slot assigned. Every key of the gateway shares its prefix's hash
tag, so every script runs on one slot: the whole store contract of tests/store/test_store.py runs here unchanged,
and two gateway replicas on the cluster admit exactly a budget's worth of a burst of creates."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

import tests.store.test_store as contract
from gateway.store.redis.store import RedisStore
from tests.e2e.harness import body
from tests.e2e.helpers import CREATE, NEVER, assert_settled_books, creates, error_of, roomy
from tests.redis_server import RedisClusterServers, command, require_redis_server
from tests.store.helpers import created

# Every contract test that runs on a store (or on two replicas of one), with the fixtures below.
CONTRACT = [
    name
    for name, fn in vars(contract).items()
    if name.startswith("test_")
    and inspect.isfunction(fn)
    and {"store", "replicas"} & set(inspect.signature(fn).parameters)
]
globals().update({name: getattr(contract, name) for name in CONTRACT})


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    require_redis_server()
    servers = RedisClusterServers()
    servers.start()
    yield servers
    servers.stop()


def _prefix() -> str:
    return f"{{test:{uuid.uuid4().hex[:8]}}}:"


@pytest.fixture
async def store(cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:
    store = RedisStore(cluster.url, prefix=_prefix())
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def replicas(cluster: RedisClusterServers) -> AsyncIterator[list[RedisStore]]:
    """Two stores on one prefix: two gateway replicas, as the contract has them."""
    prefix = _prefix()
    pair = [RedisStore(cluster.url, prefix=prefix), RedisStore(cluster.url, prefix=prefix)]
    for store in pair:
        await store.open()
    yield pair
    for store in pair:
        await store.close()


async def test_every_key_is_on_one_node_in_the_slot_of_the_hash_tag(cluster):
    store = RedisStore(cluster.url, prefix=_prefix())
    await store.open()
    try:
        now = await store.now()
        for _ in range(3):
            await created(store, now)
    finally:
        await store.close()
    keys = {n.port: command(n.port, "keys", store.prefix + "*").split() for n in cluster.nodes}
    holders = [port for port, names in keys.items() if names]
    assert len(holders) == 1 and len(keys[holders[0]]) >= 5, keys
    slots = {command(holders[0], "cluster", "keyslot", k).strip() for k in keys[holders[0]]}
    assert slots == {command(holders[0], "cluster", "keyslot", store.prefix).strip()}, slots


def test_a_prefix_without_a_hash_tag_is_refused(cluster):
    with pytest.raises(ValueError, match="hash tag"):
        RedisStore(cluster.url, prefix="thg:")


def test_two_gateways_on_the_cluster_admit_exactly_the_budget(make_gateway, cluster, sim):
    """Budget $9, 60 creates of $1 at once, 30 through each of two gateway processes on the cluster: exactly
    9 are admitted and sent upstream, 51 are 429 budget_exceeded; both report the same reservation."""
    for node in cluster.nodes:
        command(node.port, "flushall")  # the gateways use the default prefix
    gws = [
        make_gateway(
            teams={"red": {"budget_usd": 9.0}},
            users={"alice": {"team": "red"}},
            store_url=cluster.url,
            keys=roomy("key-a", "key-b"),
            name=f"c{i}",
        )
        for i in (1, 2)
    ]

    async def burst() -> list[httpx.Response]:
        async with gws[0].aclient("alice") as c1, gws[1].aclient("alice") as c2:
            return await asyncio.gather(*(c.post(CREATE, json=body(prompt=NEVER)) for _ in range(30) for c in (c1, c2)))

    replies = asyncio.run(burst())
    assert Counter(r.status_code for r in replies) == {200: 9, 429: 51}
    for reply in replies:
        if reply.status_code == 429:
            error_of(reply, 429, "insufficient_quota", "budget_exceeded")
    assert len(creates(sim)) == 9
    for gw in gws:
        assert_settled_books(gw, spent=0.0, reserved=9.0, in_flight=9)
