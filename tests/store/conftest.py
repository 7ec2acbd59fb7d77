"""Fixtures of the store tests: each contract test runs on SQLite (in both of its write paths) and on a real
Redis, one server a run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.store.redis.store import RedisStore
from gateway.store.sqlite.store import SQLiteStore
from tests.redis_server import RedisServer, require_redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    require_redis_server()
    server = RedisServer()
    yield server.start()
    server.stop()


@pytest.fixture(params=["sqlite", "sqlite-full", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[SQLiteStore | RedisStore]:
    """SQLite writes on the event loop's thread with synchronous=NORMAL, on a writer thread with FULL."""
    if request.param.startswith("sqlite"):
        sync = "FULL" if request.param == "sqlite-full" else "NORMAL"
        opened: SQLiteStore | RedisStore = SQLiteStore(str(tmp_path / "gateway.db"), sync)
    else:
        opened = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test:{uuid.uuid4().hex[:8]}:")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[list[RedisStore]]:
    """Two RedisStore instances on one server and one prefix: two gateway replicas."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    pair = [RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)]
    for replica in pair:
        await replica.open()
    yield pair
    for replica in pair:
        await replica.close()
