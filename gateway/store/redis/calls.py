"""How the Redis store talks to Redis: the clients for a target, every call through one gate, every failure
mapped to the gateway's errors, and scripts run by their SHA (sent whole to a server that does not know
them yet: a restarted or promoted one). Scripts to a server or a Sentinel's master go through a Pipe
(redis_pipe.py), which also waits for a replica when told to; other commands through redis-py's client."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import DuplicateTaskId, GatewayError, NotFound, RecordRejected, StoreUnavailable, TaskNotUnknown
from gateway.store.redis.pipe import Pipe
from gateway.store.redis.url import CLUSTER, STANDALONE, RedisTarget

T = TypeVar("T")
RETRY_PAUSE_S = 0.05  # a script whose connection was lost runs once more, after this
_BUSY_REPLIES = frozenset(
    {"MISCONF", "BUSY", "NOREPLICAS", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN"}
)  # the server cannot answer or write now


def store_error(exc: Exception) -> GatewayError:
    """A script's refusal (its error reply's first word), a record the server refused, or unavailability."""
    if type(exc) is not ResponseError:  # lost connections, timeouts, ReadOnlyError, ClusterDownError, ...
        return StoreUnavailable(f"The gateway's store failed: {exc.__class__.__name__}.")
    word, rest = str(exc).partition(" ")[::2]
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


# Beyond the gated calls' connections: the Pipe's own, and the roster's pub/sub subscription, which holds one
# for good (without it, a burst of max_connections calls found the pool empty: "Too many connections").
EXTRA_CONNECTIONS = 2


class RedisLink:
    """The redis-py client for a target and, but for a Cluster, the Pipe that carries its scripts."""

    def __init__(
        self,
        target: RedisTarget,
        *,
        timeout_s: float,
        max_connections: int,
        wait_replica: bool,
        connection_class: type | None = None,
    ) -> None:
        self.target = target
        # One retry after a dropped connection or a timeout: a restarted or promoted Redis is reconnected to.
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(EqualJitterBackoff(cap=0.5, base=0.05), 1),
        }
        self._sentinel: Sentinel | None = None
        self.pipe: Pipe | None = None
        if target.mode == CLUSTER:
            self.client: Any = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                username=target.username,
                password=target.password,
                ssl=target.ssl,
                max_connections=max_connections,
                **common,
            )
            return
        if target.mode == STANDALONE:
            extra = {"connection_class": connection_class} if connection_class else {}
            pool = aioredis.ConnectionPool.from_url(
                target.url, max_connections=max_connections + EXTRA_CONNECTIONS, **common, **extra
            )
            self.client = aioredis.Redis.from_pool(pool)
        else:
            user, password = target.sentinel_auth
            self._sentinel = Sentinel(
                target.nodes,
                sentinel_kwargs={
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": timeout_s,
                    "ssl": target.ssl,
                    "username": user,
                    "password": password,
                },
            )
            self.client = self._sentinel.master_for(
                target.master,
                db=target.db,
                username=target.username,
                password=target.password,
                ssl=target.ssl,
                max_connections=max_connections + EXTRA_CONNECTIONS,
                **common,
            )
        self.pipe = Pipe(self.client.connection_pool, timeout_s=timeout_s, wait_replica=wait_replica)

    async def aclose(self) -> None:
        if self.pipe is not None:
            await self.pipe.aclose()
        await self.client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


class Script:
    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


class RedisCalls:
    """At most `max_connections` calls at once; one more waits up to `timeout_s`. KEYS[1] of every script
    is the key prefix: on a Cluster it routes the script to the slot of the prefix's hash tag, which holds
    every key the script touches."""

    def __init__(
        self, link: RedisLink, prefix: str, scripts: dict[str, str], *, timeout_s: float, max_connections: int
    ) -> None:
        self.link = link
        self.prefix = prefix
        self._timeout = timeout_s
        self.scripts = {name: Script(body) for name, body in scripts.items()}
        self._gate = asyncio.Semaphore(max_connections)

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
            await self.do(self.link.client.script_load(script.body))

    async def run(self, name: str, *args: Any, write: bool = False) -> Any:
        """Run a script; `write`: it changes something (with a replica to wait for, it is waited for)."""
        return await self.do(self._run(self.scripts[name], (1, self.prefix, self.prefix, *args), write))

    async def _run(self, script: Script, keys_and_args: tuple[Any, ...], write: bool) -> Any:
        pipe = self.link.pipe
        if pipe is None:  # a Cluster: redis-py routes by the key, follows MOVED, and retries once
            try:
                return await self.link.client.evalsha(script.sha, *keys_and_args)
            except NoScriptError:
                return await self.link.client.eval(script.body, *keys_and_args)
        try:
            return await _piped(pipe, script, keys_and_args, write)
        except (RedisConnectionError, RedisTimeoutError):  # lost: once more, on a new connection
            await asyncio.sleep(RETRY_PAUSE_S)  # every script is safe to run twice
            return await _piped(pipe, script, keys_and_args, write)


async def _piped(pipe: Pipe, script: Script, keys_and_args: tuple[Any, ...], write: bool) -> Any:
    try:
        return await pipe.call("EVALSHA", script.sha, *keys_and_args, write=write)
    except NoScriptError:  # the server never saw it, or lost it: EVAL sends it whole, and caches it
        return await pipe.call("EVAL", script.body, *keys_and_args, write=write)
