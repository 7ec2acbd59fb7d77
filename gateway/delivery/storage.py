"""Where archived videos live: a local directory or S3-compatible object storage (SPEC §12).

Both take a file as a stream of chunks and make it visible only once all of it has arrived (a temporary file
renamed into place; an S3 multipart upload completed), so a cut-off copy leaves nothing behind. S3 goes
through obstore (Apache Arrow's Rust object_store): native asyncio, streaming multipart uploads, and no
botocore to pin; credentials come from the usual AWS_* variables."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast
from urllib.parse import urlsplit

from gateway.settings import ArchiveSettings

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

READ_CHUNK = 256 * 1024
PART_BYTES = 8 * 1024 * 1024  # an S3 upload holds at most UPLOAD_PARTS parts of this in memory
UPLOAD_PARTS = 2


class StoreFailed(Exception):
    """The archive's storage refused or failed a write."""


class Backend(Protocol):
    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        """Store the whole stream at `key`; an exception from `chunks` leaves nothing at `key`."""

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the file at `key`; FileNotFoundError when there is none."""

    async def delete(self, key: str) -> None:
        """Remove the file at `key`, if there is one."""


class LocalBackend:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        final = self._path(key)
        part = final.with_name(f".{final.name}.{secrets.token_hex(6)}.part")
        try:
            await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
            file = await asyncio.to_thread(open, part, "wb")
        except OSError as exc:
            raise StoreFailed(f"cannot write the archive directory: {exc.strerror}") from None
        try:
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(file.write, chunk)
                await asyncio.to_thread(_sync_close, file)
            finally:
                file.close()
            await asyncio.to_thread(os.replace, part, final)
        except OSError as exc:
            raise StoreFailed(f"cannot write the archive directory: {exc.strerror}") from None
        finally:
            part.unlink(missing_ok=True)

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(open, self._path(key), "rb")
        try:
            await asyncio.to_thread(file.seek, start)
            while start < end:
                chunk = await asyncio.to_thread(file.read, min(READ_CHUNK, end - start))
                if not chunk:
                    return
                start += len(chunk)
                yield chunk
        finally:
            file.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        for folder in (path.parent, path.parent.parent):  # <task>/ and <team>/, once empty
            if folder == self.root:
                break
            try:
                await asyncio.to_thread(folder.rmdir)
            except OSError:
                break


def _sync_close(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


class S3Backend:
    def __init__(self, settings: ArchiveSettings) -> None:
        import obstore
        from obstore.store import S3Store

        self._obstore = obstore
        where = urlsplit(cast(str, settings.url))  # config sets exactly one of dir and url
        config: S3Config = {"region": settings.region}
        client_options: ClientConfig | None = None
        if settings.endpoint_url:
            config["endpoint"] = settings.endpoint_url
            config["virtual_hosted_style_request"] = False
            if settings.endpoint_url.startswith("http://"):
                client_options = {"allow_http": True}
        self._store = S3Store(
            where.netloc, prefix=where.path.strip("/") or None, config=config, client_options=client_options
        )

    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        try:
            await self._obstore.put_async(
                self._store,
                key,
                chunks,
                attributes={"Content-Type": content_type},
                chunk_size=PART_BYTES,
                max_concurrency=UPLOAD_PARTS,
            )
        except self._obstore.exceptions.BaseError as exc:
            raise StoreFailed(f"the object store refused the upload: {exc.__class__.__name__}") from None

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        if start >= end:
            return
        result = await self._obstore.get_async(self._store, key, options={"range": (start, end)})
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        try:
            await self._obstore.delete_async(self._store, key)
        except FileNotFoundError:
            pass


def open_backend(settings: ArchiveSettings) -> Backend:
    return LocalBackend(settings.dir) if settings.dir else S3Backend(settings)
