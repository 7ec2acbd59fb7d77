"""The store: one protocol and its two implementations, which pass one contract suite.

    base     the Store protocol, Task, Admission and the figures' bounds
    outbox   the outbox's items and topics (archive copies, webhook deliveries)
    days     whole UTC days by number: the bounds the per-day ledger figures are read by
    roster   teams, users, gateway keys and audit rows as both stores keep them (tenancy.py's records)
    budget   budget alerts as a settling step checks them: once per threshold per period
    sessions the console's sign-in sessions
    sqlite/  the embedded store (one process)
    redis/   the shared store (several replicas)

May import: policy and the shared nouns.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.settings import StoreSettings
from gateway.store.base import Admission, IdemRecord, Store, Task


def open_store(settings: StoreSettings, clock: Callable[[], float] = time.time) -> Store:
    """The store a URL names; SQLite serves one process and takes that process's clock."""
    url = settings.url.reveal()
    if url.startswith(("redis://", "rediss://", "redis+", "rediss+")):
        from gateway.store.redis.store import RedisStore

        return RedisStore(url)
    from gateway.store.sqlite.store import SQLiteStore

    return SQLiteStore(url.removeprefix("sqlite:///") or "gateway.db", settings.synchronous, clock)


__all__ = ["Admission", "IdemRecord", "Store", "Task", "open_store"]
