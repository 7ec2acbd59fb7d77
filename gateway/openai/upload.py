"""A create's one long string, its image's data: URL, kept out of memory until the body to send is written.

An uploaded file stays where the multipart parser spooled it (on disk past 1 MiB); a data: URL sent in a
JSON body stays in the body's bytes. Where the create's fields and body hold that URL, they hold a `Passage`:
as a str, the URL's start; with it, where the whole URL comes from. `dumps` writes the body to send (and
`sha256_json` hashes the idempotency fingerprint) with the whole URL in place, written chunk by chunk from the
file (base64-encoded) or the request's bytes. A create then holds the body it sends, its source, and a chunk:
never the URL as a string, nor a body made from that string (SPEC §4: an upload holds at most about twice its
size in memory while in flight).

Pure but for reading the file it is handed, already open (`Upload.file`): where that file lives, and reading
it off the event loop when it is on disk, are the caller's.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import orjson

HEAD_BYTES = 16  # what telling an image's type by its bytes needs (12), and a margin
CHUNK_BYTES = 3 * 64 * 1024  # a multiple of 3: the base64 of consecutive chunks is the base64 of the whole
MAX_START_CHARS = 64  # a data: URL's start, when it has no comma to end it


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


@dataclass(frozen=True, slots=True)
class Upload:
    """A multipart file part: its open file (read from its start, whatever its position), its size and its
    first bytes, read already."""

    file: BinaryIO
    size: int
    head: bytes
    content_type: str | None = None
    filename: str | None = None

    @classmethod
    def of(cls, data: bytes, content_type: str | None = None, filename: str | None = None) -> Upload:
        """An upload already in memory."""
        return cls(io.BytesIO(data), len(data), data[:HEAD_BYTES], content_type, filename)

    def chunks(self) -> Iterator[bytes]:
        """The file from its start, in pieces of CHUNK_BYTES (the last one shorter)."""
        self.file.seek(0)
        while chunk := _read_up_to(self.file, CHUNK_BYTES):
            yield chunk

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Image:
    """An uploaded JPEG, PNG or WebP image, as a base64 data: URL."""

    media_type: str
    upload: Upload

    def start(self) -> str:
        return self.prefix() + base64.b64encode(self.upload.head[:3]).decode("ascii")

    def prefix(self) -> str:
        return f"data:{self.media_type};base64,"

    def size(self) -> int:
        return len(self.prefix()) + 4 * -(-self.upload.size // 3)

    def write(self, out: Sink) -> None:
        out.write(self.prefix().encode("ascii"))
        for chunk in self.upload.chunks():
            out.write(base64.b64encode(chunk))  # base64's alphabet needs no escaping in JSON


@dataclass(frozen=True, slots=True)
class Span:
    """A string as it lies in a request's bytes, `body[begin:end]`: ASCII that JSON writes as it is."""

    body: bytes
    begin: int
    end: int

    def start(self) -> str:
        comma = self.body.find(b",", self.begin, self.end)
        cut = comma + 2 if comma >= 0 else self.begin + MAX_START_CHARS
        return self.body[self.begin : min(cut, self.end)].decode("ascii")

    def size(self) -> int:
        return self.end - self.begin

    def write(self, out: Sink) -> None:
        out.write(memoryview(self.body)[self.begin : self.end])


class Passage(str):
    """A long string kept outside the values that hold it. As a str it is the string's start: up to its first
    comma and one character more, all §4 reads of a data: URI (its scheme, media type and `;base64,`, and
    whether data follows), so a check of the start has the verdict of a check of the whole. `dumps` and
    `sha256_json` write the whole of it."""

    source: Image | Span

    def __new__(cls, source: Image | Span) -> Passage:
        passage = super().__new__(cls, source.start())
        passage.source = source
        return passage


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """orjson.dumps(value), with the whole of each Passage in it."""
    if not holds_passage(value):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    pieces = list(_pieces(value, sort_keys))
    size = sum(len(piece) if isinstance(piece, bytes) else piece.size() for piece in pieces)
    out = io.BytesIO()
    out.seek(size - 1)
    out.write(b"\0")  # the buffer made at its final size at once: filled in place, never grown (a copy)
    out.seek(0)
    _write(out, pieces)
    if out.tell() != size:
        raise ValueError("an uploaded file changed size while it was read")
    return out.getvalue()  # the buffer itself, handed over without a copy


def sha256_json(value: Any, *, sort_keys: bool = False) -> str:
    """The SHA-256 of dumps(value), hashed as it is written."""
    digest = _Digest()
    _write(digest, _pieces(value, sort_keys) if holds_passage(value) else [dumps(value, sort_keys=sort_keys)])
    return digest.sha256.hexdigest()


class _Digest:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | memoryview, /) -> None:
        self.sha256.update(data)


def _write(out: Sink, pieces: Iterable[bytes | Image | Span]) -> None:
    for piece in pieces:
        if isinstance(piece, bytes):
            out.write(piece)
        else:
            piece.write(out)


def _pieces(value: Any, sort_keys: bool) -> Iterator[bytes | Image | Span]:
    """orjson's compact JSON in pieces, containers by hand: a Passage is its source, written whole later."""
    if isinstance(value, Passage):
        yield from (b'"', value.source, b'"')
    elif isinstance(value, dict):
        yield b"{"
        for index, key in enumerate(sorted(value) if sort_keys else value):
            yield (b"," if index else b"") + orjson.dumps(key) + b":"
            yield from _pieces(value[key], sort_keys)
        yield b"}"
    elif isinstance(value, list):
        yield b"["
        for index, item in enumerate(value):
            yield b"," if index else b""
            yield from _pieces(item, sort_keys)
        yield b"]"
    else:
        yield orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)


def holds_passage(value: Any) -> bool:
    """Whether a Passage is in `value`, at any depth."""
    stack = [value]  # iterative: a client's JSON nests as deep as orjson allows
    while stack:
        item = stack.pop()
        if isinstance(item, Passage):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _read_up_to(file: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the file: a short read never breaks the 3-byte alignment."""
    chunk = file.read(size)
    if len(chunk) in (0, size):
        return chunk
    parts = [chunk]
    got = len(chunk)
    while got < size and (more := file.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)
