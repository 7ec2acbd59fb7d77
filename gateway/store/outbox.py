"""The durable outbox: work a terminal task leaves behind (one webhook event per endpoint, an archive copy),
written in the same store step that settles the task, then done in the background.

An item belongs to a topic ("webhook:<endpoint name>", "archive"). A replica claims due items of a topic
with a lease; while the lease runs no other replica claims them, and the number of items of a topic leased
at once is bounded, across replicas. An item ends delivered or given up; a failed attempt schedules the
next one. Each store (SQLite, Redis) implements these operations atomically, under one contract test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

WEBHOOK_TOPIC = "webhook:"
ARCHIVE_TOPIC = "archive"
MAX_ERROR_CHARS = 300


def webhook_topic(endpoint: str) -> str:
    return WEBHOOK_TOPIC + endpoint


@dataclass(frozen=True, slots=True)
class Item:
    id: str  # a webhook's event id (its `webhook-id`), the same on every attempt
    topic: str
    payload: bytes
    created_at: float
    attempts: int = 0  # attempts started, this one included once claimed


@dataclass(slots=True)
class TopicStats:
    backlog: int = 0  # items not yet delivered nor given up
    delivered: int = 0
    failed: int = 0  # failed attempts (each retried, or the last one given up)
    gave_up: int = 0
    last_error: str | None = None
    last_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class ArchivedFile:
    """One file of a task in the archive; `key` is its path under the archive's root."""

    task_id: str
    variant: str  # "video" | "cover"
    key: str
    size: int
    content_type: str
    archived_at: float


class Outbox(Protocol):
    async def outbox_claim(self, topic: str, limit: int, now: float, lease_s: float) -> list[Item]:
        """Due items of the topic, leased until now + lease_s: at most `limit` leased at once in all."""

    async def outbox_done(self, item: Item, now: float) -> None: ...
    async def outbox_retry(self, item: Item, next_at: float, error: str, now: float) -> None: ...
    async def outbox_give_up(self, item: Item, error: str, now: float) -> None: ...
    async def outbox_drop_topics(self, prefix: str, keep: frozenset[str], now: float) -> int:
        """Give up every item of the topics under `prefix` that are not in `keep` (endpoints removed)."""

    async def outbox_stats(self, topics: list[str]) -> dict[str, TopicStats]: ...

    async def archive_record(self, file: ArchivedFile) -> None: ...
    async def archive_files(self, task_id: str) -> list[ArchivedFile]: ...
    async def archive_older(self, before: float, limit: int) -> list[ArchivedFile]:
        """Files archived before `before`, oldest first (for retention)."""

    async def archive_forget(self, task_id: str, variant: str) -> None: ...


def clip(error: str) -> str:
    return error[:MAX_ERROR_CHARS]
