"""Commands to one Redis server (or a Sentinel's master) over one connection, pipelined across requests.

Every write to a socket and every wake-up of Redis costs more than the command itself (on a VM, a loopback
write is ~100 µs of the gateway's CPU); so the commands that concurrent requests issue while a batch is out
go together in the next batch, one write and one read for all of them. Redis answers in order; a batch's
replies resolve its callers. With a replica to wait for, a batch that holds a write ends with WAIT 1: one
acknowledgement covers every write in it, and those writes' callers hear back only once it came.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

WAIT_MS = 100  # how long a batch's writes wait for a replica's acknowledgement
LAG_PAUSE_S = 5.0  # after a replica missed WAIT_MS: batches stop waiting this long, then try again
_Call = tuple[tuple[Any, ...], asyncio.Future[Any], bool]  # a command, its caller's future, whether it writes


class Pipe:
    """`pool`: a redis-py connection pool (a server's, or a Sentinel's master pool, whose connections find
    the master again after a failover); this holds one of its connections."""

    def __init__(self, pool: Any, *, timeout_s: float, wait_replica: bool) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.wait_replica = wait_replica
        self._conn: Any = None
        self._queue: list[_Call] = []
        self._pump: asyncio.Task[None] | None = None
        self._lagging_until = 0.0
        self.log = structlog.get_logger("gateway.store")

    async def call(self, *command: Any, write: bool = False) -> Any:
        """The command's reply (an error reply raised as ResponseError); `write`: wait for a replica.
        A reply that takes more than timeout_s, queueing included, is a TimeoutError (a command not yet
        sent then is not sent at all)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future, write))
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            raise RedisTimeoutError(f"no answer from Redis within {self.timeout_s} s") from None

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = [item for item in self._queue if not item[1].done()], []
                if batch:
                    await self._exchange(batch)
        finally:
            self._pump = None

    async def _exchange(self, batch: list[_Call]) -> None:
        commands = [command for command, _, _ in batch]
        waits = self.wait_replica and any(w for _, _, w in batch) and time.monotonic() >= self._lagging_until
        if waits:
            commands.append(("WAIT", 1, WAIT_MS))
        replies: list[Any] = []
        try:
            conn = await self._connection()
            await conn.send_packed_command([pack(c) for c in commands], check_health=False)
            for _, future, write in batch:
                replies.append(await _reply(conn))
                if not (write and waits):
                    _settle(future, replies[-1])
            if waits:
                self._acknowledged(await _reply(conn))
        except BaseException as exc:  # the connection is lost or cut: every caller still waiting hears it
            await self._drop()
            for _, future, _ in batch:
                _fail(future, exc if isinstance(exc, Exception) else RedisConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future, write), reply in zip(batch, replies, strict=True):
            if write and waits:
                _settle(future, reply)

    def _acknowledged(self, replicas: Any) -> None:
        if isinstance(replicas, int) and replicas < 1:
            self._lagging_until = time.monotonic() + LAG_PAUSE_S
            self.log.warning("store.replica_lagging", waited_ms=WAIT_MS, pause_s=LAG_PAUSE_S)

    async def _connection(self) -> Any:
        if self._conn is None:
            self._conn = await self.pool.get_connection()
        elif not self._conn.is_connected:
            await self._conn.connect()
        return self._conn

    async def _drop(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self._conn is not None:
            await self.pool.release(self._conn)
            self._conn = None
        await self.pool.disconnect()


def pack(command: tuple[Any, ...]) -> bytes:
    """A command in RESP (redis-py's packer costs several times this on the hot path)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            arg = repr(arg).encode()
        elif not isinstance(arg, bytes | bytearray | memoryview):
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


async def _reply(conn: Any) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as exc:  # an error reply: that command's, the connection goes on
        return exc


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():
        return  # its caller gave up
    if isinstance(reply, ResponseError):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
