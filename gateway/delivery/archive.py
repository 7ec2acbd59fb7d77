"""The video archive (SPEC §12): a succeeded task's video and cover copied from TokenHub's expiring URLs into
the gateway's own storage, served from there, and deleted after the retention period.

Settling a task as succeeded leaves one "archive" item in the outbox (store/outbox.py) in the same step; one
replica at a time holds its lease and copies both files, streaming with bounded memory and checking the byte
count. A failed copy is retried with back-off (5 s doubling, capped at 10 min) until TokenHub's URL answers
403/404/410 or 24 h have passed. Failures are counted by reason and logged, never shown to API clients.

Deletes win (SPEC §4): a copy records each file, then looks whether the task was deleted meanwhile and, if so,
removes what it recorded; the delete marks the task first, then removes what is recorded. Whichever comes
second sees the other's write, so no file outlives its video."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from gateway.delivery.guard import MAX_HOPS, MediaRefused, media_session
from gateway.delivery.storage import Backend, StoreFailed, open_backend
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.settings import ArchiveSettings, UpstreamSettings
from gateway.store.base import Store, Task
from gateway.store.outbox import ARCHIVE_TOPIC, ArchivedFile, Item

FIRST_RETRY_S = 5.0
MAX_RETRY_S = 600.0
WINDOW_S = 24 * 3600.0
LEASE_S = 30 * 60.0  # longer than a copy of the largest file takes; then another replica may copy it
COPIES_AT_ONCE = 2  # per topic, across replicas
TICK_S = 1.0
RETENTION_EVERY_S = 600.0
CHUNK = 256 * 1024
GONE = frozenset({403, 404, 410})  # TokenHub's signed URL has expired
COVER_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_PLAIN_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
BEYOND = 1 << 62  # past any file's size: what every longer number in a Range means


class CopyFailed(Exception):
    def __init__(self, reason: str, detail: str, final: bool | None = None) -> None:
        super().__init__(detail)
        self.reason = reason  # a label of archive_failures_total
        # final: no retry would mend it (a file too large, an expired URL, a URL the gateway never fetches)
        self.final = final if final is not None else reason in ("too_large", "expired")


def segment(name: str) -> str:
    """A team name or task id as one safe path segment (an id from TokenHub is not trusted to be one)."""
    return name if _SAFE.fullmatch(name) and ".." not in name else "x-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def archive_item(task: Task, data: dict[str, Any], now: float) -> Item | None:
    """The outbox item for a succeeded task's files, or None when TokenHub's answer names none."""
    results = data.get("data")
    first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
    urls = {v: first.get(k) for v, k in (("video", "video_url"), ("cover", "cover_image_url"))}
    urls = {v: u for v, u in urls.items() if isinstance(u, str) and u.startswith(("http://", "https://"))}
    if not urls or not task.task_id:
        return None
    payload = {"task_id": task.task_id, "team": task.team, "urls": urls}
    return Item(
        "arc_" + hashlib.sha256(task.task_id.encode()).hexdigest()[:24], ARCHIVE_TOPIC, orjson.dumps(payload), now
    )


def task_folder(task_id: str) -> str:
    """A task's own folder, whatever id TokenHub chose: the id itself when it is plain (lowercase, so no other
    id shares it on a case-insensitive store), else `x-<readable part>-<digest of the exact id>`; no plain id
    starts with `x-`. Files archived under the older `segment(task_id)` keep their recorded keys."""
    if _PLAIN_ID.fullmatch(task_id) and ".." not in task_id and not task_id.startswith("x-") and task_id[-1] != ".":
        return task_id
    readable = re.sub(r"[^a-z0-9_-]+", "_", task_id.lower())[:40]
    return f"x-{readable}-{hashlib.sha256(task_id.encode()).hexdigest()[:32]}"


def file_key(team: str, task_id: str, variant: str, content_type: str, url: str) -> str:
    if variant == "video":
        name = "video.mp4"
    else:
        ext = COVER_TYPES.get(content_type) or urlsplit(url).path.rpartition(".")[2].lower()
        name = "cover." + (ext if ext.isalnum() and len(ext) <= 5 else "img")
    return f"{segment(team)}/{task_folder(task_id)}/{name}"


def retry_in_s(attempts: int) -> float:
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2.0 ** min(max(0, attempts - 1), 20))


@dataclass
class Served:
    """What `Archive.open_range` answers: a status (200, 206, 416), headers, and the body's chunks."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes] | None = None
    file: ArchivedFile | None = field(default=None, repr=False)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One `bytes=` range → (start, end) exclusive; None: the whole file; "unsatisfiable": 416. Numbers of
    any length are read (int() refuses over 4,300 digits)."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or not (match[1] or match[2]) or (match[1] and match[2] and _below(match[2], match[1])):
        return None
    if not match[1]:
        suffix = _number(match[2])
        return (max(0, size - suffix), size) if suffix > 0 and size > 0 else "unsatisfiable"
    start = _number(match[1])
    end = min(size, _number(match[2]) + 1) if match[2] else size
    return (start, end) if start < size else "unsatisfiable"


def _number(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 18 else BEYOND


def _below(digits: str, other: str) -> bool:
    """Whether one decimal is less than another, exactly, at any length."""
    one = digits.lstrip("0")
    two = other.lstrip("0")
    return (len(one), one) < (len(two), two)


class Archive:
    def __init__(
        self,
        settings: ArchiveSettings,
        upstream: UpstreamSettings,
        backend: Backend,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float],
        window_s: float = WINDOW_S,
        retention_every_s: float = RETENTION_EVERY_S,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.backend = backend
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.window_s = window_s
        self.retention_every_s = retention_every_s
        self.log = structlog.get_logger("gateway.archive")
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._copies: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._next_retention = 0.0

    # serving

    async def open_range(self, task: Task, variant: str, range_header: str | None) -> Served | None:
        """An archived file of the task ("video" or "cover") with one `Range` answered; None when not archived."""
        files = await self.store.archive_files(task.task_id or "")
        archived = next((f for f in files if f.variant == variant), None)
        if archived is None:
            return None
        headers = {"Accept-Ranges": "bytes", "Content-Type": archived.content_type}
        wanted = byte_range(range_header, archived.size)
        if wanted == "unsatisfiable":
            return Served(416, {**headers, "Content-Range": f"bytes */{archived.size}"}, None, archived)
        start, end = wanted if isinstance(wanted, tuple) else (0, archived.size)
        body = await self._open(archived, start, end)
        if body is None:  # gone from storage: the route falls back to TokenHub's URL, else 410
            return None
        if isinstance(wanted, tuple):
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{archived.size}"
        headers["Content-Length"] = str(end - start)
        return Served(206 if isinstance(wanted, tuple) else 200, headers, body, archived)

    async def _open(self, archived: ArchivedFile, start: int, end: int) -> AsyncIterator[bytes] | None:
        """The file opened before anything is answered, so a 200 never dies mid-stream for a missing file."""
        try:
            body = await self.backend.open(archived.key, archived.size, start, end)
        except StoreFailed as exc:
            self.log.warning("archive.read_failed", task_id=archived.task_id, variant=archived.variant, detail=str(exc))
            return None
        if body is None:
            self.log.warning("archive.file_missing", task_id=archived.task_id, variant=archived.variant)
        return body

    def expires_at(self, files: list[ArchivedFile]) -> float | None:
        """When retention deletes the task's files (for the Video object's `expires_at`)."""
        return min(f.archived_at for f in files) + self.settings.retention_days * 86400 if files else None

    async def delete(self, task_id: str) -> None:
        """Remove a task's archived files (a video deleted in the OpenAI shape, also while it was being copied).
        A file the storage fails to delete keeps its record, so retention tries again."""
        for archived in await self.store.archive_files(task_id):
            await self._remove(archived)

    async def _remove(self, archived: ArchivedFile) -> bool:
        try:
            await self.backend.delete(archived.key)
        except StoreFailed as exc:
            self.metrics.child(self.metrics.archive_failures, "store_failed").inc()
            self.log.warning(
                "archive.delete_failed", task_id=archived.task_id, variant=archived.variant, detail=str(exc)
            )
            return False
        await self.store.archive_forget(archived.task_id, archived.variant)
        return True

    # copying

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        self._session = media_session(self.upstream, aiohttp.ClientTimeout(total=None, connect=10, sock_read=60))
        try:
            while not self._stop.is_set():
                self._wake.clear()
                await self._guarded(self._claim())
                if self.clock() >= self._next_retention:
                    self._next_retention = self.clock() + self.retention_every_s
                    await self._guarded(self.apply_retention())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=TICK_S)
                except TimeoutError:
                    pass
        finally:
            for job in list(self._copies):
                job.cancel()  # its lease runs out and the copy is taken up again
            await asyncio.gather(*self._copies, return_exceptions=True)
            await self._session.close()

    async def _guarded(self, work: Awaitable[object]) -> None:
        try:
            await work
        except GatewayError as exc:
            self.log.warning("archive.store_failed", error_code=exc.code)
        except Exception:  # noqa: BLE001 - the loop must outlive any one bad step
            self.log.exception("archive.step_crashed")

    async def _claim(self) -> None:
        if len(self._copies) >= COPIES_AT_ONCE:
            return
        for item in await self.store.outbox_claim(ARCHIVE_TOPIC, COPIES_AT_ONCE, await self.store.now(), LEASE_S):
            job = asyncio.ensure_future(self._guarded(self.copy(item)))
            self._copies.add(job)
            job.add_done_callback(self._copy_done)

    def _copy_done(self, job: asyncio.Task[None]) -> None:
        self._copies.discard(job)
        self._wake.set()

    async def copy(self, item: Item) -> None:
        job = orjson.loads(item.payload)
        if await self._deleted(job["task_id"]):
            await self._discard(item, job["task_id"])
            return
        done = {f.variant for f in await self.store.archive_files(job["task_id"])}
        failure: CopyFailed | None = None
        for variant, url in job["urls"].items():
            if variant in done:
                continue
            try:
                await self._copy_file(job, variant, url)
            except CopyFailed as exc:
                self.metrics.child(self.metrics.archive_failures, exc.reason).inc()
                self.log.warning(
                    "archive.copy_failed",
                    task_id=job["task_id"],
                    variant=variant,
                    reason=exc.reason,
                    detail=str(exc),
                    attempt=item.attempts,
                )
                if not exc.final:
                    failure = exc
            if await self._deleted(job["task_id"]):  # deleted while this file was copied: the delete wins
                await self._discard(item, job["task_id"])
                return
        await self._settle(item, failure)

    async def _deleted(self, task_id: str) -> bool:
        task = await self.store.get_record(task_id)
        return task is None or task.deleted_at is not None

    async def _discard(self, item: Item, task_id: str) -> None:
        await self.delete(task_id)
        await self.store.outbox_done(item, await self.store.now())
        self.log.info("archive.discarded", task_id=task_id, reason="video deleted")

    async def _settle(self, item: Item, failure: CopyFailed | None) -> None:
        now = await self.store.now()
        if failure is None:
            await self.store.outbox_done(item, now)
        elif now >= item.created_at + self.window_s:
            self.metrics.child(self.metrics.archive_failures, "expired").inc()
            await self.store.outbox_give_up(item, str(failure), now)
        else:
            await self.store.outbox_retry(item, now + retry_in_s(item.attempts), str(failure), now)

    async def _copy_file(self, job: dict[str, Any], variant: str, url: str) -> None:
        limit = self.settings.max_bytes_per_video
        session = cast(aiohttp.ClientSession, self._session)  # run() opens it before any copy
        try:
            async with session.get(url, allow_redirects=True, max_redirects=MAX_HOPS) as resp:
                if resp.status in GONE:
                    raise CopyFailed("expired", f"TokenHub's URL answered {resp.status}")
                if resp.status != 200:
                    raise CopyFailed("download_failed", f"TokenHub's URL answered {resp.status}")
                size = resp.content_length
                if size is None:
                    raise CopyFailed("download_failed", "the answer gave no Content-Length to check against")
                if size > limit:
                    raise CopyFailed("too_large", f"{size} bytes is over max_bytes_per_video ({limit})")
                content_type = resp.content_type if variant == "cover" else "video/mp4"
                key = file_key(job["team"], job["task_id"], variant, content_type, url)
                await self.backend.put(key, _exactly(resp.content.iter_chunked(CHUNK), size), content_type)
        except CopyFailed:
            raise
        except StoreFailed as exc:
            raise CopyFailed("store_failed", str(exc)) from None
        except MediaRefused:  # an address or scheme the gateway never fetches: no retry would mend it
            raise CopyFailed("download_failed", "the URL is not one the gateway fetches", final=True) from None
        except Exception as exc:  # aiohttp's errors, a short read, a refused address: anything the download raised
            raise CopyFailed("download_failed", f"the download failed: {exc.__class__.__name__}") from None
        await self.store.archive_record(ArchivedFile(job["task_id"], variant, key, size, content_type, self.clock()))
        self.metrics.child(self.metrics.archive_bytes, variant).inc(size)
        self.log.info("archive.copied", task_id=job["task_id"], variant=variant, bytes=size)

    async def apply_retention(self) -> int:
        """Delete the files archived more than `retention_days` ago (the ledger rows stay)."""
        before = self.clock() - self.settings.retention_days * 86400
        deleted = 0
        while old := await self.store.archive_older(before, 100):
            removed = [await self._remove(archived) for archived in old]
            deleted += sum(removed)
            if not all(removed):  # the storage fails to delete: the next round tries again
                break
        if deleted:
            self.log.info("archive.retention", deleted=deleted)
        return deleted


def make_archive(
    settings: ArchiveSettings | None,
    upstream: UpstreamSettings,
    store: Store,
    metrics: Metrics,
    clock: Callable[[], float],
) -> Archive | None:
    return Archive(settings, upstream, open_backend(settings), store, metrics, clock) if settings else None


class ShortRead(Exception):
    """The download ended before, or ran past, the byte count it announced."""


async def _exactly(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    got = 0
    async for chunk in chunks:
        got += len(chunk)
        if got > size:
            raise ShortRead(f"more than the {size} bytes announced")
        yield chunk
    if got != size:
        raise ShortRead(f"{got} of {size} bytes")
