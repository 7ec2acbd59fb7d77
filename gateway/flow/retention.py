"""Ledger retention (`[ledger] retention_days`): settled rows older than that are deleted in the background.

A store's prune deletes everything created before a moment, in short transactions (scripts) of `batch` rows.
So that a pass never keeps the SQLite writer or Redis busy for long either, it moves that moment forward from
the oldest row a window at a time, sized to hold about a batch, and pauses after each window that deleted
anything: the first pass over a long history is spread out, later ones find a few minutes' worth. The store
keeps the per-day figures of what it deletes, and never deletes an unsettled or `unknown` row."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import structlog

from gateway.errors import GatewayError
from gateway.store.base import LedgerFilter, Store

DAY_S = 86_400
PRUNE_EVERY_S = 300  # a pass every few minutes
PRUNE_BATCH = 500  # rows per store transaction (script)
PRUNE_PAUSE_S = 0.2  # after a window that deleted rows: the writer serves everyone else meanwhile
FIRST_WINDOW_S = 3600.0
WINDOWS_S = (60.0, 30 * DAY_S)  # the narrowest and widest window


class Retention:
    """Prunes the ledger every PRUNE_EVERY_S in the background; `stop` (the poller's) ends a pass between
    two windows."""

    def __init__(
        self, store: Store, stop: asyncio.Event, batch: int = PRUNE_BATCH, pause_s: float = PRUNE_PAUSE_S
    ) -> None:
        self.store = store
        self.batch = batch
        self.pause_s = pause_s
        self._stop = stop
        self._next_at = 0.0
        self._pruned_to: float | None = None  # every prunable row created before this is gone
        self._running: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("gateway.ledger")

    def start_if_due(self, retention_days: int | None, now: float) -> None:
        """Start a pass when retention is on, the last one started PRUNE_EVERY_S ago, and none runs."""
        if retention_days is None or now < self._next_at or self._running is not None:
            return
        self._next_at = now + PRUNE_EVERY_S
        self._running = asyncio.ensure_future(self._pass(retention_days))

    async def finish(self) -> None:
        """Wait for a pass under way (stopped, it ends after its current window)."""
        if self._running is not None:
            await self._running

    async def _pass(self, retention_days: int) -> None:
        try:
            await self.prune(retention_days)
        except GatewayError as exc:
            self.log.warning("ledger.prune_failed", error_code=exc.code)
        except Exception:  # noqa: BLE001 - the next pass tries again
            self.log.exception("ledger.prune_crashed")
        finally:
            self._running = None

    async def prune(self, retention_days: int) -> int:
        """Delete the settled rows created more than `retention_days` ago; the count deleted."""
        cutoff = await self.store.now() - retention_days * DAY_S
        edge = self._pruned_to if self._pruned_to is not None else await self._oldest(cutoff)
        window = FIRST_WINDOW_S
        deleted = 0
        while True:
            edge = min(cutoff, edge + window)
            done = await self.store.prune(edge, self.batch)
            self._pruned_to = edge
            deleted += done
            window = _next_window(window, done, self.batch)
            if edge >= cutoff or (done and not await self._pause()) or self._stop.is_set():
                break
        if deleted:
            cutoff_at = datetime.fromtimestamp(cutoff, timezone.utc).isoformat(timespec="seconds")
            self.log.info("ledger.pruned", tasks=deleted, created_before=cutoff_at, retention_days=retention_days)
        return deleted

    async def _oldest(self, cutoff: float) -> float:
        """Where a first pass starts: the oldest row's creation (one row read), or the cutoff itself."""
        rows, _ = await self.store.ledger_page(LedgerFilter(until=cutoff), 1, None)
        return min(cutoff, rows[0].created_at) if rows else cutoff

    async def _pause(self) -> bool:
        """Wait between two windows; False when the poller stops meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=self.pause_s)
        except TimeoutError:
            return True
        return False


def _next_window(window: float, deleted: int, batch: int) -> float:
    """Wider after a window that held less than a batch, narrower after one that held several."""
    if deleted < batch:
        window *= 2
    elif deleted > 2 * batch:
        window /= 2
    return min(WINDOWS_S[1], max(WINDOWS_S[0], window))
