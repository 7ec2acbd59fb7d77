"""How the Redis store talks to Redis: the redis-py client for a target, every call through one gate,
every failure mapped to the gateway's errors, scripts run by their SHA (sent whole to a server that does
not know them yet: a restarted or promoted one), and, with a replica to wait for, writes acknowledged
only once a replica has them."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import EqualJitterBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ..errors import (
    DuplicateTaskId,
    GatewayError,
    NotFound,
    RecordRejected,
    StoreUnavailable,
    TaskNotUnknown,
)
from .redis_url import SENTINEL, STANDALONE, RedisTarget

T = TypeVar("T")
WAIT_MS = 100  # how long a write waits for a replica's acknowledgement
LAG_PAUSE_S = 5.0  # after a replica missed WAIT_MS: writes stop waiting this long, then try again
_BUSY_REPLIES = frozenset({"MISCONF", "BUSY", "NOREPLICAS", "LOADING", "MASTERDOWN", "CLUSTERDOWN",
                           "TRYAGAIN"})  # the server cannot answer or write now


def store_error(exc: Exception) -> GatewayError:
    """A script's refusal (its error reply's first word), a record the server refused, or unavailability."""
    if type(exc) is not ResponseError:  # lost connections, timeouts, ReadOnlyError, ClusterDownError, ...
        return StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.")
    word, _, rest = str(exc).partition(" ")
    if word in _BUSY_REPLIES:
        return StoreUnavailable(f"The gateway's store cannot write now: {word}.")
    if word == "DUPLICATE":
        return DuplicateTaskId("TokenHub answered the create with a task id already in use.")
    if word == "NOTFOUND":
        return NotFound("No such task in the ledger.", param="task_id")
    if word == "NOTUNKNOWN":
        return TaskNotUnknown(f"The task is {rest}, not unknown: there is nothing to resolve.")
    reason = rest if word == "REJECTED" else "a script error"
    return RecordRejected(f"The store refused this record ({reason}).")


class RedisLink:
    """The client for a target, and whatever else must be closed with it (a Sentinel's own clients)."""

    def __init__(self, target: RedisTarget, *, timeout_s: float, max_connections: int,
                 connection_class: type | None = None) -> None:
        self.target = target
        # One retry after a dropped connection or a timeout: a restarted or promoted Redis is reconnected to.
        common: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                  "retry": Retry(EqualJitterBackoff(cap=0.5, base=0.05), 1)}
        self._sentinel: Sentinel | None = None
        if target.mode == STANDALONE:
            extra = {"connection_class": connection_class} if connection_class else {}
            pool = aioredis.ConnectionPool.from_url(target.url, max_connections=max_connections, **common, **extra)
            self.client: Any = aioredis.Redis.from_pool(pool)
        elif target.mode == SENTINEL:
            user, password = target.sentinel_auth
            self._sentinel = Sentinel(target.nodes, sentinel_kwargs={
                "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "ssl": target.ssl,
                "username": user, "password": password})
            self.client = self._sentinel.master_for(
                target.master, db=target.db, username=target.username, password=target.password,
                ssl=target.ssl, max_connections=max_connections, **common)
        else:
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], username=target.username,
                password=target.password, ssl=target.ssl, max_connections=max_connections, **common)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


class Script:
    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


class RedisCalls:
    """At most `max_connections` calls at once (so the pool never runs dry); one more waits up to `timeout_s`.
    KEYS[1] of every script is the key prefix: on a Cluster it routes the script to the slot of the prefix's
    hash tag, which holds every key the script touches."""

    def __init__(self, client: Any, prefix: str, scripts: dict[str, str], *, timeout_s: float,
                 max_connections: int, wait_replica: bool) -> None:
        self.client, self.prefix, self._timeout = client, prefix, timeout_s
        self.scripts = {name: Script(body) for name, body in scripts.items()}
        self._gate = asyncio.Semaphore(max_connections)
        self.wait_replica = wait_replica
        self._lagging_until = 0.0
        self.log = structlog.get_logger("gateway.store")

    async def do(self, aw: Awaitable[T]) -> T:
        try:
            if self._gate.locked():
                async with asyncio.timeout(self._timeout):
                    await self._gate.acquire()
            else:
                await self._gate.acquire()
        except TimeoutError:
            if asyncio.iscoroutine(aw):
                aw.close()  # never to run
            raise StoreUnavailable("The gateway's store is too slow: every connection is busy.") from None
        try:
            return await aw
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise store_error(exc) from None
        finally:
            self._gate.release()

    async def load(self) -> None:
        """Every script into the server's cache (on a Cluster, every primary's), so that a first call of
        each is not a NOSCRIPT round trip; a server restarted or promoted later gets them as they run."""
        for script in self.scripts.values():
            await self.do(self.client.script_load(script.body))

    async def run(self, name: str, *args: Any, write: bool = False) -> Any:
        """Run a script; a write waits for a replica (WAIT 1) when the store was told one exists."""
        script = self.scripts[name]
        if write and self.wait_replica and time.monotonic() >= self._lagging_until:
            return await self.do(self._run_and_wait(script, args))
        return await self.do(self._run(script, args))

    async def _run(self, script: Script, args: tuple) -> Any:
        keys_and_args = (1, self.prefix, self.prefix, *args)
        try:
            return await self.client.evalsha(script.sha, *keys_and_args)
        except NoScriptError:  # the server never saw it, or lost it: EVAL sends it whole, and caches it
            return await self.client.eval(script.body, *keys_and_args)

    async def _run_and_wait(self, script: Script, args: tuple) -> Any:
        """The script and WAIT in one round trip; a replica that misses WAIT_MS pauses waiting a while."""
        keys_and_args = (1, self.prefix, self.prefix, *args)
        reply, acked = await self._pipeline(("EVALSHA", script.sha, *keys_and_args))
        if isinstance(reply, NoScriptError):
            reply, acked = await self._pipeline(("EVAL", script.body, *keys_and_args))
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, int) and acked < 1:
            self._lagging_until = time.monotonic() + LAG_PAUSE_S
            self.log.warning("store.replica_lagging", waited_ms=WAIT_MS, pause_s=LAG_PAUSE_S)
        return reply

    async def _pipeline(self, command: tuple) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.execute_command("WAIT", 1, WAIT_MS)
            return await pipe.execute(raise_on_error=False)
