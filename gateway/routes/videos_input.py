"""The body of an OpenAI-shape create or remix: JSON, or `multipart/form-data` as the openai SDK sends it.

Multipart is parsed as it arrives, within limits: the body limit (`server.max_body_bytes`), one file,
a few short text fields. Starlette spools a file part past 1 MiB to disk through a worker thread, and it is
read back the same way, so a large upload never holds the event loop. Only the first bytes a reference
image may have (and one more) are read: a larger file is refused by size without being read whole.

`Uploads` bounds the uploads in flight gateway-wide (`server.max_uploads_in_flight`, SPEC §4): a body larger
than UPLOAD_BYTES, or of a size not declared, counts from its arrival until TokenHub answers its create.
A body below it (every create without a file or a data: URL) is not an upload and is never refused here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from gateway.errors import BodyTooLarge, TooManyUploads, ValidationError
from gateway.http.request import number_over, parse_json, read_body
from gateway.http.workers import BodyWorkers
from gateway.openai.translate import MAX_IMAGE_BYTES, Upload, form_fields

MAX_FIELDS = 16  # the SDK sends at most five; more is room to name a field the gateway does not take
MAX_FIELD_BYTES = 64 * 1024  # a text field (a 5,000-character prompt is at most 20,000 bytes of UTF-8)
MULTIPART = "multipart/form-data"
UPLOAD_BYTES = 64 * 1024  # a larger body carries a file or a data: URL; a create's text fields are well below


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


async def read_fields(
    request: Request, limit: int, timeout_s: float, large: BodyWorkers
) -> tuple[dict[str, Any], Upload | None]:
    """(the fields, the `input_reference` file if one was uploaded) of a JSON or multipart body."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    _declared_size(request, limit)
    if media_type == MULTIPART:
        return await _multipart(request, limit)
    body = await parse_json(await read_body(request, limit, timeout_s), large)
    if not isinstance(body, dict):
        raise ValidationError("Expected a JSON object or multipart/form-data as the request body.")
    return body, None


async def _multipart(request: Request, limit: int) -> tuple[dict[str, Any], Upload | None]:
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
    finally:
        await form.close()
    return form_fields(parts)


async def _upload(file: UploadFile) -> Upload:
    data = await file.read(MAX_IMAGE_BYTES + 1)  # off the loop once spooled to disk
    return Upload(data, file.content_type, file.filename)


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
