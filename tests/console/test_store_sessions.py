"""The store's console operations, one contract for SQLite and Redis: sessions kept by their id's SHA-256 until
they expire or are deleted, and the list of `unknown` rows waiting for an operator."""

from __future__ import annotations

import time

from gateway.store.sessions import ConsoleSession
from tests.store.helpers import admitted, created


def a_session(id_sha256: str, now: float, hours: float = 1.0, kind: str = "key") -> ConsoleSession:
    return ConsoleSession(id_sha256, kind, "ab" * 32, now, now + hours * 3600)


async def test_a_session_is_found_until_it_expires(store):
    now = await store.now()
    kept = a_session("1" * 64, now)
    await store.save_session(kept)
    assert await store.get_session("1" * 64, now + 10) == kept
    assert await store.get_session("1" * 64, now + 3600) is None  # expired at expires_at
    assert await store.get_session("2" * 64, now) is None


async def test_a_session_deleted_is_gone_and_deleting_twice_is_harmless(store):
    now = await store.now()
    await store.save_session(a_session("3" * 64, now, kind="operator"))
    await store.delete_session("3" * 64)
    await store.delete_session("3" * 64)
    await store.delete_session("no-such-session")
    assert await store.get_session("3" * 64, now) is None


async def test_saving_again_replaces_a_session(store):
    now = await store.now()
    await store.save_session(a_session("4" * 64, now))
    renewed = ConsoleSession("4" * 64, "sso", "alice", now + 5, now + 7200)
    await store.save_session(renewed)
    assert await store.get_session("4" * 64, now + 3700) == renewed


async def test_sessions_are_shared_by_replicas(replicas):
    one, two = replicas
    now = await one.now()
    await one.save_session(a_session("5" * 64, now))
    assert await two.get_session("5" * 64, now) is not None
    await two.delete_session("5" * 64)
    assert await one.get_session("5" * 64, now) is None


async def test_unknown_rows_are_listed_newest_first_without_their_bodies(store):
    now = time.time()
    settled = await created(store, now - 30)
    await store.settle(settled.task_id, "succeeded", 15_000, 3_000_000, False, b'{"big": "body"}', now - 20)
    older = await admitted(store, now - 10)
    newer = await admitted(store, now - 5)
    assert await store.unknown_tasks(10) == []
    for task, at in ((older, now - 9), (newer, now - 4)):
        await store.mark_unknown(task.rid, at, (502, b'{"error": "cut"}'))
    rows = await store.unknown_tasks(10)
    assert [row.rid for row in rows] == [newer.rid, older.rid]
    assert all(row.status == "unknown" and row.final_body is None for row in rows)
    assert [row.rid for row in await store.unknown_tasks(1)] == [newer.rid]
    await store.resolve_unknown(newer.rid, "voided", 0, 0, "admin", now)
    assert [row.rid for row in await store.unknown_tasks(10)] == [older.rid]
