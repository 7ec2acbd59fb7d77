"""Ledger retention (gateway.flow.retention): settled rows past `[ledger] retention_days` are pruned every few
minutes by the poller's upkeep, a window of creation times at a time with a pause after each that deleted
anything, so that no pass keeps the store's writer busy for long."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from gateway.errors import StoreUnavailable
from gateway.flow.retention import DAY_S, PRUNE_EVERY_S, Retention
from gateway.store.base import LedgerFilter
from tests.doubles import FakeClock, FakeUpstream
from tests.flow.test_poller import UpstreamPolls, make_poller, task

BATCH = 100


class PruningStore:
    """Prunable rows by creation time. prune deletes every one created before `before` (as the stores do, in
    transactions of `batch`); ledger_page answers the oldest row."""

    def __init__(self, clock: FakeClock, created: list[float], fail: int = 0) -> None:
        self.clock = clock
        self.created = sorted(created)
        self.calls: list[tuple[float, int, int, float]] = []  # (before, batch, deleted, monotonic time)
        self.fail = fail  # this many calls raise first

    async def now(self) -> float:
        return self.clock()

    async def ledger_page(self, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list, str | None]:
        assert (limit, after) == (1, None) and flt.until is not None
        old = [at for at in self.created if at < flt.until][:1]
        return [task(0, due=at, created_at=at) for at in old], None

    async def prune(self, before: float, batch: int = 500) -> int:
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("the store is away")
        kept = [at for at in self.created if at >= before]
        deleted = len(self.created) - len(kept)
        self.created = kept
        self.calls.append((before, batch, deleted, time.monotonic()))
        return deleted


def history(clock: FakeClock, days: int, per_day: int) -> list[float]:
    """`per_day` rows a day, evenly, over the last `days` days."""
    return [clock.now - n * DAY_S / per_day for n in range(1, days * per_day + 1)]


async def test_a_first_pass_walks_a_long_history_a_window_at_a_time_and_logs_the_count():
    clock = FakeClock()
    store = PruningStore(clock, history(clock, 100, 24 * 4))  # every quarter hour for 100 days
    retention = Retention(store, asyncio.Event(), batch=BATCH, pause_s=0.01)  # type: ignore[arg-type]
    cutoff = clock.now - 30 * DAY_S
    with capture_logs() as logs:
        deleted = await retention.prune(30)
    assert deleted == 70 * 24 * 4 and all(at >= cutoff for at in store.created)
    assert len(store.created) == 30 * 24 * 4  # the rows inside retention stay
    befores = [call[0] for call in store.calls]
    assert befores == sorted(befores) and befores[-1] == cutoff
    assert max(call[2] for call in store.calls) <= 4 * BATCH  # a window never holds much more than a batch
    paused = [later[3] - earlier[3] for earlier, later in zip(store.calls, store.calls[1:], strict=False)]
    assert len(paused) > 5 and min(paused) >= 0.009  # the writer is free between two windows
    assert [(line["event"], line["tasks"]) for line in logs] == [("ledger.pruned", deleted)]


async def test_nothing_to_prune_is_one_call_and_no_log_line():
    clock = FakeClock()
    store = PruningStore(clock, history(clock, 20, 10))
    with capture_logs() as logs:
        assert await Retention(store, asyncio.Event()).prune(30) == 0  # type: ignore[arg-type]
    assert [call[0] for call in store.calls] == [clock.now - 30 * DAY_S] and logs == []


async def test_a_later_pass_starts_where_the_last_one_ended():
    clock = FakeClock()
    store = PruningStore(clock, [clock.now - 35 * DAY_S - n * 3600 for n in range(200)] + [clock.now - DAY_S])
    retention = Retention(store, asyncio.Event(), batch=BATCH, pause_s=0)  # type: ignore[arg-type]
    await retention.prune(30)
    store.calls.clear()
    clock.now += PRUNE_EVERY_S
    store.created.append(clock.now - 30 * DAY_S - 1)  # came of age since
    assert await retention.prune(30) == 1
    assert [call[0] for call in store.calls] == [clock.now - 30 * DAY_S]


async def test_a_stop_ends_a_pass_between_two_windows():
    clock = FakeClock()
    stop = asyncio.Event()
    store = PruningStore(clock, history(clock, 100, 96))
    retention = Retention(store, stop, batch=BATCH, pause_s=10)  # type: ignore[arg-type]
    running = asyncio.ensure_future(retention.prune(30))
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(running, 1) == store.calls[0][2] > 0 and len(store.calls) == 1


async def test_the_poller_prunes_every_few_minutes_only_when_retention_is_set():
    clock = FakeClock()
    for days in (None, 30):
        ledger = {"retention_days": days} if days else None
        poller, _ = make_poller([], clock, UpstreamPolls(FakeUpstream()), ledger=ledger)
        store = PruningStore(clock, [clock.now - 40 * DAY_S] * 3)
        poller.retention.store = store  # type: ignore[assignment]
        for _ in range(2):  # the second upkeep is too soon for another pass
            await poller.upkeep()
            await poller.retention.finish()
        cutoffs = [call[0] for call in store.calls if call[0] == clock.now - 30 * DAY_S]
        assert (len(cutoffs), len(store.created)) == ((0, 3) if days is None else (1, 0))
    clock.now += PRUNE_EVERY_S
    await poller.upkeep()
    await poller.retention.finish()
    assert store.calls[-1][0] == clock.now - 30 * DAY_S


async def test_a_failed_pass_is_logged_and_the_next_one_runs():
    clock = FakeClock()
    store = PruningStore(clock, [clock.now - 40 * DAY_S] * 3, fail=1)
    retention = Retention(store, asyncio.Event())  # type: ignore[arg-type]
    with capture_logs() as logs:
        retention.start_if_due(30, clock.now)
        await retention.finish()
        clock.now += PRUNE_EVERY_S
        retention.start_if_due(30, clock.now)
        await retention.finish()
    assert [line["event"] for line in logs] == ["ledger.prune_failed", "ledger.pruned"]
    assert logs[0]["error_code"] == "store_unavailable" and store.created == []
