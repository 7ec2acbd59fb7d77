"""The store: one protocol (base.py), an embedded SQLite and a shared Redis implementation."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import StoreSettings
from .base import Admission, IdemRecord, Store, Task


def open_store(settings: StoreSettings, clock: Callable[[], float] = time.time) -> Store:
    """The store a URL names; SQLite serves one process and takes that process's clock."""
    url = settings.url.reveal()
    if url.startswith(("redis://", "rediss://", "redis+", "rediss+")):
        from .redis import RedisStore

        return RedisStore(url)
    from .sqlite import SQLiteStore

    return SQLiteStore(url.removeprefix("sqlite:///") or "gateway.db", settings.synchronous, clock)


__all__ = ["Admission", "IdemRecord", "Store", "Task", "open_store"]
