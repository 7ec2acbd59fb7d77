"""Where archived videos live: a local directory or S3-compatible object storage (SPEC §12).

Both take a file as a stream of chunks and make it visible only once all of it has arrived (a temporary file
renamed into place; an S3 multipart upload completed), so a cut-off copy leaves nothing behind. S3 goes
through obstore (Apache Arrow's Rust object_store): native asyncio, streaming multipart uploads, and no
botocore to pin; credentials come from the usual AWS_* variables.

Every failure of the storage itself (obstore's errors, OSError, a missing bucket's FileNotFoundError, anything)
is StoreFailed; an exception raised by the stream being stored (the download's) passes through unchanged, so
the archive counts each under its own reason (SPEC §12). A file is opened before its first byte is served:
`open` answers None when it is gone, and a 200 never dies mid-stream for that (SPEC §4)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from urllib.parse import urlsplit

from gateway.settings import ArchiveSettings

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

READ_CHUNK = 256 * 1024
PART_BYTES = 8 * 1024 * 1024  # an S3 upload holds at most UPLOAD_PARTS parts of this in memory
UPLOAD_PARTS = 2


class StoreFailed(Exception):
    """The archive's storage refused or failed a write, a read or a delete."""


class Backend(Protocol):
    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        """Store the whole stream at `key`; an exception from `chunks` propagates as is and leaves nothing at
        `key`; any failure of the storage is StoreFailed."""

    async def open(self, key: str, size: int, start: int, end: int) -> AsyncIterator[bytes] | None:
        """Bytes [start, end) of the `size`-byte file at `key`, opened before this returns; None when there is
        no such file, or it is not `size` bytes long; StoreFailed when the storage fails to say."""

    async def delete(self, key: str) -> None:
        """Remove the file at `key`, if there is one; StoreFailed when the storage fails to."""


class Source:
    """The stream being stored, remembering what it raised: that is the stream's failure, not the storage's."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.error: Exception | None = None

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self.chunks)
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise

    def failure(self, exc: Exception, what: str) -> Exception:
        """The stream's own exception when it failed, else StoreFailed naming only the storage's error class
        (its message may hold URLs or a response body)."""
        return self.error if self.error is not None else StoreFailed(f"{what}: {exc.__class__.__name__}")


class LocalBackend:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        final = self._path(key)
        part = final.with_name(f".{final.name}.{secrets.token_hex(6)}.part")
        source = Source(chunks)
        try:
            await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
            file = await asyncio.to_thread(open, part, "wb")
            try:
                async for chunk in source:
                    await asyncio.to_thread(file.write, chunk)
                await asyncio.to_thread(_sync_close, file)
            finally:
                file.close()
            await asyncio.to_thread(os.replace, part, final)
        except Exception as exc:
            raise source.failure(exc, "cannot write the archive directory") from None
        finally:
            await asyncio.to_thread(_unlink, part)

    async def open(self, key: str, size: int, start: int, end: int) -> AsyncIterator[bytes] | None:
        try:
            file = await asyncio.to_thread(_open_sized, self._path(key), size)
        except Exception as exc:
            raise StoreFailed(f"cannot read the archive directory: {exc.__class__.__name__}") from None
        return None if file is None else _read_file(file, start, end)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except Exception as exc:
            raise StoreFailed(f"cannot delete from the archive directory: {exc.__class__.__name__}") from None
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


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the write already failed or succeeded; a stray .part file is never served


def _open_sized(path: Path, size: int) -> BinaryIO | None:
    """The file, open, when it is there with `size` bytes; else None."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - handed to the reader, which closes it
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        whole = os.fstat(file.fileno()).st_size == size
    except OSError:
        file.close()
        raise
    if not whole:
        file.close()
        return None
    return file


async def _read_file(file: BinaryIO, start: int, end: int) -> AsyncIterator[bytes]:
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
        source = Source(chunks)
        try:
            await self._obstore.put_async(
                self._store,
                key,
                source,
                attributes={"Content-Type": content_type},
                chunk_size=PART_BYTES,
                max_concurrency=UPLOAD_PARTS,
            )
        except Exception as exc:  # a missing bucket is a builtin FileNotFoundError, not an obstore error
            raise source.failure(exc, "the object store refused the upload") from None

    async def open(self, key: str, size: int, start: int, end: int) -> AsyncIterator[bytes] | None:
        try:
            if start >= end:  # S3 has no empty range: ask whether the object is there
                meta: Any = await self._obstore.head_async(self._store, key)
                return _nothing() if meta["size"] == size else None
            result = await self._obstore.get_async(self._store, key, options={"range": (start, end)})
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreFailed(f"the object store failed a read: {exc.__class__.__name__}") from None
        if result.meta["size"] != size:
            return None
        return _read_object(result.stream(min_chunk_size=READ_CHUNK))

    async def delete(self, key: str) -> None:
        try:
            await self._obstore.delete_async(self._store, key)
        except FileNotFoundError:
            pass  # no such object, or no such bucket: nothing to delete
        except Exception as exc:
            raise StoreFailed(f"the object store failed a delete: {exc.__class__.__name__}") from None


async def _read_object(stream: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield bytes(chunk)


async def _nothing() -> AsyncIterator[bytes]:
    empty: list[bytes] = []
    for chunk in empty:
        yield chunk


def open_backend(settings: ArchiveSettings) -> Backend:
    return LocalBackend(settings.dir) if settings.dir else S3Backend(settings)
