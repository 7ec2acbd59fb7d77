"""The outbox and the archive's bookkeeping: one contract, run against SQLite and a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import RecordRejected
from gateway.store.base import MAX_COUNTER
from gateway.store.outbox import ArchivedFile, Item, webhook_topic
from tests.store.helpers import admitted, created, preload_spent

TOPIC = webhook_topic("render-farm")


def items(now: float, n: int = 2, topic: str = TOPIC, tag: str = "") -> list[Item]:
    return [Item(f"evt_{tag}{i}", topic, b'{"n": %d}' % i, now) for i in range(n)]


async def settled_with(store, now: float, these: list[Item]):
    task = await created(store, now)
    return await store.settle(task.task_id, "succeeded", 1000, 200_000, False, b"{}", now, these)


async def test_items_are_written_by_the_settling_call_only(store):
    now = await store.now()
    task = await created(store, now)
    assert await store.settle(task.task_id, "succeeded", 1000, 200_000, False, b"{}", now, items(now, 2, tag="a"))
    # a second settlement of the same task (another replica's poll) writes nothing
    assert (
        await store.settle(task.task_id, "succeeded", 1000, 200_000, False, b"{}", now, items(now, 2, tag="b")) is None
    )
    got = await store.outbox_claim(TOPIC, 10, now, 60)
    assert sorted(i.id for i in got) == ["evt_a0", "evt_a1"]
    assert {i.payload for i in got} == {b'{"n": 0}', b'{"n": 1}'} and all(i.attempts == 1 for i in got)
    assert (await store.outbox_stats([TOPIC]))[TOPIC].backlog == 2


async def test_a_create_marked_unknown_writes_its_items_once(store):
    now = await store.now()
    task = await admitted(store, now)
    done = await store.mark_unknown(task.rid, now, None, items(now, 1, tag="u"))
    assert done.status == "unknown"
    await store.mark_unknown(task.rid, now, None, items(now, 1, tag="again"))  # not pending any more
    assert [i.id for i in await store.outbox_claim(TOPIC, 10, now, 60)] == ["evt_u0"]


async def test_a_refused_settlement_writes_no_item(store):
    now = await store.now()
    task = await created(store, now)
    await preload_spent(store, "team", "marketing", task.team_period, MAX_COUNTER - 10)
    with pytest.raises(RecordRejected):
        await store.settle(task.task_id, "succeeded", 1000, 11, False, None, now, items(now))
    assert await store.outbox_claim(TOPIC, 10, now, 60) == []
    assert (await store.outbox_stats([TOPIC]))[TOPIC].backlog == 0


async def test_claims_are_leased_and_bounded_per_topic(store):
    now = await store.now()
    await settled_with(store, now, items(now, 3))
    first = await store.outbox_claim(TOPIC, 2, now, 60)
    assert len(first) == 2
    assert await store.outbox_claim(TOPIC, 2, now + 1, 60) == []  # two leased: no room
    await store.outbox_done(first[0], now + 1)
    [third] = await store.outbox_claim(TOPIC, 2, now + 1, 60)
    assert third.id not in {i.id for i in first}
    # a lease that ran out (its replica died) frees its room, and the item is due again
    again = await store.outbox_claim(TOPIC, 2, now + 62, 60)
    assert {i.id for i in again} == {first[1].id, third.id}
    assert {i.attempts for i in again} == {2}
    assert await store.outbox_claim(webhook_topic("other"), 5, now + 62, 60) == []


async def test_retry_schedules_and_counts_done_and_give_up_end_an_item(store):
    now = await store.now()
    await settled_with(store, now, items(now, 3))
    a, b, c = await store.outbox_claim(TOPIC, 5, now, 60)
    await store.outbox_retry(a, now + 30, "HTTP 500", now + 1)
    await store.outbox_done(b, now + 2)
    await store.outbox_give_up(c, "HTTP 404", now + 3)
    assert await store.outbox_claim(TOPIC, 5, now + 29, 60) == []
    [later] = await store.outbox_claim(TOPIC, 5, now + 30, 60)
    assert (later.id, later.attempts, later.payload) == (a.id, 2, a.payload)
    s = (await store.outbox_stats([TOPIC]))[TOPIC]
    assert (s.backlog, s.delivered, s.failed, s.gave_up) == (1, 1, 2, 1)
    assert (s.last_error, s.last_attempt_at) == ("HTTP 404", now + 3)
    await store.outbox_done(b, now + 4)  # already ended: counted once
    assert (await store.outbox_stats([TOPIC]))[TOPIC].delivered == 1


async def test_dropping_removed_topics_gives_their_items_up(store):
    now = await store.now()
    kept, gone = webhook_topic("kept"), webhook_topic("gone")
    await settled_with(store, now, items(now, 1, kept, "k") + items(now, 3, gone, "g") + items(now, 1, "archive"))
    assert await store.outbox_drop_topics("webhook:", frozenset({kept}), now) == 3
    stats = await store.outbox_stats([kept, gone])
    assert (stats[kept].backlog, stats[gone].backlog, stats[gone].gave_up) == (1, 0, 3)
    assert await store.outbox_claim(gone, 5, now, 60) == []
    assert len(await store.outbox_claim("archive", 5, now, 60)) == 1  # another kind of topic stays
    assert await store.outbox_drop_topics("webhook:", frozenset({kept}), now) == 0


async def test_two_replicas_never_claim_the_same_item(replicas):
    a, b = replicas
    now = await a.now()
    await settled_with(a, now, items(now, 40))
    claims = await asyncio.gather(*(s.outbox_claim(TOPIC, 40, now, 60) for s in (a, b) for _ in range(4)))
    ids = [i.id for got in claims for i in got]
    assert len(ids) == len(set(ids)) == 40


async def test_archived_files_are_kept_listed_by_age_and_forgotten(store):
    now = await store.now()
    old = ArchivedFile("cgt-1", "video", "red/cgt-1/video.mp4", 1234, "video/mp4", now - 100)
    cover = ArchivedFile("cgt-1", "cover", "red/cgt-1/cover.png", 99, "image/png", now - 100)
    new = ArchivedFile("cgt-2", "video", "red/cgt-2/video.mp4", 10, "video/mp4", now)
    for f in (new, old, cover):
        await store.archive_record(f)
    assert await store.archive_files("cgt-1") == [cover, old]
    assert await store.archive_files("cgt-3") == []
    assert {f.key for f in await store.archive_older(now - 50, 10)} == {old.key, cover.key}
    assert len(await store.archive_older(now + 1, 2)) == 2
    await store.archive_forget("cgt-1", "video")
    assert await store.archive_files("cgt-1") == [cover]
    assert await store.archive_older(now - 50, 10) == [cover]
