"""Result files of the simulated TokenHub: deterministic bytes per task, served like signed object-store URLs.

A video is a real, playable clip (clips/clip.mp4: 1.5 s of 64x64 H.264, made once with ffmpeg, see
clips/README), then a `free` box of filler drawn from the task id up to the video's size: players skip a
`free` box, so every video plays in a browser and still has the size and bytes of its own that tests ask for.
A size too small to hold the clip gets the old shape instead (an `ftyp` box, then one `mdat` box of filler).
A cover is the clip's first frame as a PNG (clips/cover.png) with a comment naming the task. `video_bytes` and
`cover_bytes` give the exact bytes, so tests can compare. A URL carries `expires` and `sig` (an HMAC of its
path and expiry under a secret of this simulator); it answers 403 once expired, or once the current TTL has
run out since the task finished.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import re
import secrets
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

DEFAULT_VIDEO_SIZE = 64 * 1024
MIN_VIDEO_SIZE = 40  # the ftyp box and an mdat header
MAX_VIDEO_SIZE = 2**32 - 1  # one mdat box with a 32-bit size
DEFAULT_TTL_S = 24 * 3600.0
VARIANTS = {"video": ("mp4", "video/mp4"), "cover": ("png", "image/png")}
EXTENSIONS = {ext: variant for variant, (ext, _) in VARIANTS.items()}
CHUNK = 64 * 1024
FTYP = struct.pack(">I4s4sI", 32, b"ftyp", b"isom", 0x200) + b"isomiso2avc1mp41"
COVER_SIZE = (64, 64)  # clips/cover.png
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@functools.cache
def clip(name: str) -> bytes:
    """A file of clips/, read once (package data)."""
    return resources.files("gateway.simulator").joinpath("clips", name).read_bytes()


def _video_head(size: int) -> bytes:
    """The clip and the header of the `free` box that pads it to `size`; below that, an ftyp and an mdat header."""
    playable = clip("clip.mp4")
    if size >= len(playable) + 8:
        return playable + struct.pack(">I4s", size - len(playable), b"free")
    return FTYP + struct.pack(">I4s", size - len(FTYP), b"mdat")


def _filler(task_id: str, block: int) -> bytes:
    return hashlib.shake_128(f"{task_id}:{block}".encode()).digest(CHUNK)


def video_chunks(task_id: str, size: int, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes [start, end) of the task's video, in chunks of at most CHUNK bytes."""
    end = size if end is None else end
    head = _video_head(size)
    if start < len(head):
        yield head[start:end]
        start = len(head)
    while start < end:
        offset = start - len(head)
        block, skip = divmod(offset, CHUNK)
        part = _filler(task_id, block)[skip : skip + end - start]
        yield part
        start += len(part)


def video_bytes(task_id: str, size: int = DEFAULT_VIDEO_SIZE) -> bytes:
    """The exact bytes the simulator serves as this task's video."""
    return b"".join(video_chunks(task_id, size))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def cover_bytes(task_id: str) -> bytes:
    """The exact bytes the simulator serves as this task's cover: the clip's first frame as a PNG, with a comment
    naming the task (so that each cover is a file of its own)."""
    frame = clip("cover.png")
    header_end = 8 + 12 + struct.unpack(">I", frame[8:12])[0]  # the signature and the IHDR chunk
    return frame[:header_end] + _png_chunk(b"tEXt", b"Comment\x00" + task_id.encode()) + frame[header_end:]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """A single `Range` → (start, end) exclusive; None: serve it all (absent, malformed or several ranges);
    "unsatisfiable": 416."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        return (max(0, size - suffix), size) if suffix > 0 and size > 0 else "unsatisfiable"
    start = int(match[1])
    end = min(size, int(match[2]) + 1) if match[2] else size
    if match[2] and int(match[2]) < start:
        return None
    return (start, end) if start < size else "unsatisfiable"


@dataclass
class MediaSettings:
    ttl_s: float = DEFAULT_TTL_S
    video_size: int = DEFAULT_VIDEO_SIZE


def parse_media_settings(data: object, current: MediaSettings) -> MediaSettings:
    """The JSON of POST /_sim/media over the current settings; ValueError names what is wrong."""
    if not isinstance(data, dict) or not set(data) <= {"ttl_s", "video_size"}:
        raise ValueError("the body is an object with ttl_s and/or video_size")
    ttl_s, size = data.get("ttl_s", current.ttl_s), data.get("video_size", current.video_size)
    if type(ttl_s) not in (int, float) or not 0 <= ttl_s < math.inf:
        raise ValueError("ttl_s must be a number ≥ 0")
    if type(size) is not int or not MIN_VIDEO_SIZE <= size <= MAX_VIDEO_SIZE:
        raise ValueError(f"video_size must be an integer from {MIN_VIDEO_SIZE} to {MAX_VIDEO_SIZE}")
    return MediaSettings(float(ttl_s), size)


class Signer:
    """Signed, expiring result URLs; the secret is this simulator's own, so a URL cannot be forged or extended."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(16)

    def _sig(self, path: str, expires: int) -> str:
        return hmac.new(self._secret, f"{path}?{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def links(self, base: str, task_id: str, expires: float) -> dict[str, str]:
        stamp = math.ceil(expires)
        paths = {variant: f"/media/{task_id}.{ext}" for variant, (ext, _) in VARIANTS.items()}
        return {
            f"{name}_url": f"{base}{paths[variant]}?expires={stamp}&sig={self._sig(paths[variant], stamp)}"
            for name, variant in (("video", "video"), ("cover_image", "cover"))
        }

    def valid_until(self, request: Request) -> int | None:
        """The expiry a request's URL was signed with; None when it is missing or forged."""
        expires, sig = request.query_params.get("expires", ""), request.query_params.get("sig", "")
        if not expires.isascii() or not expires.isdigit():
            return None
        return int(expires) if hmac.compare_digest(sig, self._sig(request.url.path, int(expires))) else None


def denied(message: str) -> Response:
    body = f"<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>"
    return Response(body, 403, media_type="application/xml")


def not_found(path: str) -> Response:
    body = f"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>{path}</Key></Error>"
    return Response(body, 404, media_type="application/xml")


def serve(request: Request, task_id: str, variant: str, video_size: int) -> Response:
    """A result file with its headers, one `Range` answered 206; the body streamed, never built whole."""
    cover = cover_bytes(task_id) if variant == "cover" else b""
    size = len(cover) if variant == "cover" else video_size
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(f"{task_id}:{size}".encode()).hexdigest()[:16]}"'}
    wanted = parse_range(request.headers.get("range"), size)
    if wanted == "unsatisfiable":
        return Response(b"", 416, {**headers, "Content-Range": f"bytes */{size}"})
    start, end = wanted if isinstance(wanted, tuple) else (0, size)
    status = 206 if isinstance(wanted, tuple) else 200
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers.update({"Content-Length": str(end - start), "Content-Type": VARIANTS[variant][1]})
    if request.method == "HEAD":
        return Response(None, status, headers)
    chunks = iter([cover[start:end]]) if variant == "cover" else video_chunks(task_id, size, start, end)
    return StreamingResponse(_on_the_loop(chunks), status, headers)


async def _on_the_loop(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    # A chunk costs well under a millisecond: cheaper here than a hop to a worker thread and back.
    for chunk in chunks:
        yield chunk
