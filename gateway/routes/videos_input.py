"""The body of an OpenAI-shape create or remix: JSON, or `multipart/form-data` as the openai SDK sends it.

Multipart is parsed as it arrives, within limits: the body limit (`server.max_body_bytes`), one file,
a few short text fields. Starlette spools a file part past 1 MiB to disk through a worker thread. The file
stays there, open, while the fields are in use (`read_fields` is a context): only its first bytes are read
here, to tell its type; its size is known from the parse, so a larger file is refused without being read,
and an image is read from disk only as the body to send is written (openai/upload.py).

A large JSON body is parsed in a worker process (http/workers.py). A long data: URL in `input_reference` does
not come back from it whole: the worker says where it lies in the body's bytes, which the gateway holds anyway,
and the body to send is written from there. The URL is never held twice over (the body's bytes, and a string
parsed from them), whatever the body's size.

`Uploads` bounds the uploads in flight gateway-wide (`server.max_uploads_in_flight`, SPEC §4): a body larger
than UPLOAD_BYTES, or of a size not declared, counts from its arrival until TokenHub answers its create.
A body below it (every create without a file or a data: URL) is not an upload and is never refused here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from gateway.errors import BodyTooLarge, TooManyUploads, ValidationError
from gateway.http.bodies import INLINE_MAX_BYTES, loads_strict
from gateway.http.request import number_over, read_body
from gateway.http.workers import BodyWorkers
from gateway.openai.translate import INPUT, form_fields
from gateway.openai.upload import HEAD_BYTES, Passage, Span, Upload

MAX_FIELDS = 16  # the SDK sends at most five; more is room to name a field the gateway does not take
MAX_FIELD_BYTES = 64 * 1024  # a text field (a 5,000-character prompt is at most 20,000 bytes of UTF-8)
MULTIPART = "multipart/form-data"
UPLOAD_BYTES = 64 * 1024  # a larger body carries a file or a data: URL; a create's text fields are well below
LONG_URL_CHARS = 64 * 1024  # a longer data: URL in a JSON body is read from the body's bytes, not parsed out
URL_TRIES = 8  # places where a long URL's start appears that are compared with the URL, before giving up
URL_START_CHARS = 64  # the start of a long URL looked for in the body
COMPARE_CHARS = 64 * 1024
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')  # what JSON writes escaped: a URL holding one is not its own bytes


class Uploads:
    """The OpenAI-shape uploads in flight in this gateway, within a limit read as each one arrives."""

    def __init__(self) -> None:
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self, request: Request, limit: int) -> Iterator[None]:
        """Held from the body's arrival until the create is answered; 503 (retry shortly) past the limit."""
        if not is_upload(request):
            yield
            return
        if self.in_flight >= limit:
            raise TooManyUploads(
                f"The gateway is taking {self.in_flight} uploads already (limit {limit}); retry shortly.",
                retry_after=1,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def is_upload(request: Request) -> bool:
    declared = request.headers.get("content-length")
    if declared is None:
        return request.headers.get("transfer-encoding") is not None  # chunked: its size is not known
    return not (declared.isascii() and declared.isdigit()) or number_over(declared, UPLOAD_BYTES)


@contextlib.asynccontextmanager
async def read_fields(
    request: Request, limit: int, timeout_s: float, large: BodyWorkers
) -> AsyncIterator[tuple[dict[str, Any], Upload | None]]:
    """(the fields, the `input_reference` file if one was uploaded) of a JSON or multipart body; the file is
    open until the block ends."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    _declared_size(request, limit)
    if media_type == MULTIPART:
        async with _multipart(request, limit) as read:
            yield read
        return
    body = await _json(await read_body(request, limit, timeout_s), large)
    if not isinstance(body, dict):
        raise ValidationError("Expected a JSON object or multipart/form-data as the request body.")
    yield body, None


@contextlib.asynccontextmanager
async def _multipart(request: Request, limit: int) -> AsyncIterator[tuple[dict[str, Any], Upload | None]]:
    try:
        async with contextlib.aclosing(_bounded(request.stream(), limit)) as stream:
            form = await MultiPartParser(
                request.headers, stream, max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
            ).parse()
    except MultiPartException as exc:
        raise ValidationError(f"The multipart body cannot be read: {exc.message}") from None
    try:
        parts = [
            (name, await _upload(value) if isinstance(value, UploadFile) else value)
            for name, value in form.multi_items()
        ]
        yield form_fields(parts)
    finally:
        await form.close()


async def _upload(file: UploadFile) -> Upload:
    await file.seek(0)
    head = await file.read(HEAD_BYTES)  # off the loop once spooled to disk
    size = file.size  # counted by the parser as it wrote the file; else measured
    if size is None:
        size = await asyncio.to_thread(file.file.seek, 0, io.SEEK_END)
    return Upload(file.file, size, head, file.content_type, file.filename)


async def _json(raw: bytes, large: BodyWorkers) -> Any:
    """A JSON body's value, a repeated key refused; a large one parsed in a worker process, a long data: URL
    in it a Passage of `raw`."""
    if len(raw) <= INLINE_MAX_BYTES:
        return loads_strict(raw)
    value, where = await large.run(located_json, raw)
    if where is not None:
        value[INPUT]["image_url"] = Passage(Span(raw, *where))
    return value


def located_json(raw: bytes) -> tuple[Any, tuple[int, int] | None]:
    """(In a worker process.) A JSON body's value, and where in `raw` its long `input_reference.image_url`
    data: URL lies as its own bytes, if it does: the URL is then left out of the value sent back."""
    value = loads_strict(raw)
    reference = value.get(INPUT) if isinstance(value, dict) else None
    if not isinstance(reference, dict):
        return value, None
    url = reference.get("image_url")
    if not isinstance(url, str) or len(url) <= LONG_URL_CHARS or url[:5].lower() != "data:":
        return value, None
    where = _where(raw, url)
    if where is not None:
        reference["image_url"] = None
    return value, where


def _where(raw: bytes, url: str) -> tuple[int, int] | None:
    if not url.isascii() or _ESCAPED.search(url):
        return None
    start = url[:URL_START_CHARS].encode("ascii")
    at = raw.find(start)
    for _ in range(URL_TRIES):
        if at < 0:
            return None
        if _lies_at(raw, at, url):
            return at, at + len(url)
        at = raw.find(start, at + 1)
    return None


def _lies_at(raw: bytes, at: int, url: str) -> bool:
    """Whether raw[at:] starts with the URL's bytes; compared a piece at a time, never encoded whole."""
    view = memoryview(raw)[at : at + len(url)]
    return len(view) == len(url) and all(
        view[i : i + COMPARE_CHARS] == url[i : i + COMPARE_CHARS].encode("ascii")
        for i in range(0, len(url), COMPARE_CHARS)
    )


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The body is larger than {limit} bytes.")
        yield chunk


def _declared_size(request: Request, limit: int) -> None:
    if number_over(request.headers.get("content-length"), limit):
        raise BodyTooLarge(f"The body is larger than {limit} bytes.")
