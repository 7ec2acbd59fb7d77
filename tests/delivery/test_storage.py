"""The archive's backends, a directory and S3 (moto on loopback), held to one contract: whole files or nothing,
files opened before they are served, the stream's own failures passed through, every failure of the storage
itself a StoreFailed (a missing bucket included)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.delivery.storage import Backend, LocalBackend, S3Backend, StoreFailed
from gateway.settings import ArchiveSettings
from tests.moto_server import CREDENTIALS

DATA = bytes(range(256)) * 40  # 10,240 bytes


def s3_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, bucket: str | None = None) -> S3Backend:
    moto = request.getfixturevalue("moto")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return S3Backend(ArchiveSettings(url=f"s3://{bucket or moto.bucket()}/archive", endpoint_url=moto.url))


@pytest.fixture(params=["dir", "s3"])
def backend(request, tmp_path, monkeypatch) -> Backend:
    return LocalBackend(str(tmp_path / "videos")) if request.param == "dir" else s3_backend(request, monkeypatch)


async def chunks_of(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def failing(error: Exception) -> AsyncIterator[bytes]:
    yield DATA[:100]
    raise error


async def read(body: AsyncIterator[bytes] | None) -> bytes:
    assert body is not None
    return b"".join([chunk async for chunk in body])


async def test_a_stored_file_is_opened_before_it_is_read(backend):
    await backend.put("red/t1/video.mp4", chunks_of(DATA[:5000], DATA[5000:]), "video/mp4")
    assert await read(await backend.open("red/t1/video.mp4", len(DATA), 0, len(DATA))) == DATA
    assert await read(await backend.open("red/t1/video.mp4", len(DATA), 100, 300)) == DATA[100:300]
    assert await read(await backend.open("red/t1/video.mp4", len(DATA), 0, 0)) == b""


async def test_a_missing_file_or_one_of_another_size_opens_as_none(backend):
    assert await backend.open("red/none/video.mp4", 10, 0, 10) is None
    assert await backend.open("red/none/video.mp4", 0, 0, 0) is None
    await backend.put("red/t2/video.mp4", chunks_of(DATA), "video/mp4")
    assert await backend.open("red/t2/video.mp4", len(DATA) + 1, 0, 10) is None
    assert await backend.open("red/t2/video.mp4", len(DATA) - 1, 0, 0) is None
    await backend.delete("red/t2/video.mp4")
    await backend.delete("red/t2/video.mp4")  # deleting what is not there is no failure
    assert await backend.open("red/t2/video.mp4", len(DATA), 0, 10) is None


@pytest.mark.parametrize(
    "error",
    [ValueError("the download broke"), TimeoutError(), aiohttp.ClientOSError(104, "reset")],
    ids=["ValueError", "TimeoutError", "ClientOSError"],
)
async def test_the_streams_own_failure_passes_through_and_leaves_nothing(backend, error):
    """TimeoutError and aiohttp's ClientOSError are OSErrors: they are the download's failures, not the storage's."""
    with pytest.raises(type(error)):
        await backend.put("red/t3/video.mp4", failing(error), "video/mp4")
    assert await backend.open("red/t3/video.mp4", 100, 0, 100) is None


async def test_a_missing_bucket_is_a_store_failure(request, monkeypatch):
    backend = s3_backend(request, monkeypatch, bucket="no-such-bucket-" + uuid.uuid4().hex[:8])
    with pytest.raises(StoreFailed) as failed:
        await backend.put("red/t4/video.mp4", chunks_of(DATA), "video/mp4")
    assert str(failed.value) == "the object store refused the upload: FileNotFoundError"  # no URL, no body
    with pytest.raises(StoreFailed):
        await backend.put("red/t4/video.mp4", failing(ValueError("also broken")), "video/mp4")
    assert await backend.open("red/t4/video.mp4", len(DATA), 0, 10) is None
    await backend.delete("red/t4/video.mp4")


async def test_a_directory_that_cannot_be_used_is_a_store_failure(tmp_path):
    blocked = tmp_path / "videos"
    blocked.write_text("a file where the directory should be")
    backend = LocalBackend(str(blocked))
    with pytest.raises(StoreFailed):
        await backend.put("red/t5/video.mp4", chunks_of(DATA), "video/mp4")
    assert await backend.open("red/t5/video.mp4", len(DATA), 0, 10) is None
    root = LocalBackend(str(tmp_path / "root"))
    (tmp_path / "root" / "red" / "t6" / "video.mp4").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(StoreFailed):
        await root.delete("red/t6/video.mp4")
    assert await root.open("red/t6/video.mp4", 0, 0, 0) is None
