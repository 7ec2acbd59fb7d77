"""A video's bytes from TokenHub's result URL, streamed to the client (SPEC §11 `/videos/{id}/content`).

Never buffered whole and never a redirect: each chunk is passed on as it arrives, with the client's own
`Range`. The download has its own session (result URLs live on an object store, not on TokenHub's API),
a connect, idle and total timeout, and a size bound. An object store's 403/404/410 means the signed URL
has expired: 410 `video_expired`.

Fair downloads (SPEC §4): a client that reads nothing for `server.send_timeout_s` has its download ended, and
`DownloadSlots` keeps at most `server.max_downloads_per_team` running per team. A download cut short (upstream,
or past the size bound) raises after the answer started, so the client's connection closes without a clean
end of body: no client keeps a truncated video as complete.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import anyio
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from gateway.context import RequestContext
from gateway.delivery.guard import MAX_HOPS, media_session
from gateway.errors import (
    ConnectFailed,
    RangeNotSatisfiable,
    RateLimited,
    ResponseCut,
    UpstreamError,
    UpstreamTimeout,
    VideoExpired,
)
from gateway.settings import UpstreamSettings

CHUNK = 64 * 1024
MAX_BYTES = 512 * 1024 * 1024  # per file, as the archive's default max_bytes_per_video (SPEC §12)
TOTAL_TIMEOUT_S = 3600  # a whole download, however slowly the client reads
EXPIRED = frozenset({403, 404, 410})
PASSED_HEADERS = ("content-length", "content-range", "accept-ranges", "etag", "last-modified")
SAFE_IMAGE = "application/octet-stream"  # a cover whose type is not an image's
MAX_RANGE_DIGITS = 15  # 10**15 bytes is past the end of any file served: a longer number means the same
_SINGLE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
log = structlog.get_logger("gateway.content")


def single_range(header: str | None) -> str | None:
    """A client's `Range` as the gateway passes it on: one `bytes=` range, each number cut to MAX_RANGE_DIGITS
    (a longer one stands for 10**15, past any file's end, so it means what the client asked); None (the whole
    file) for several ranges or junk. A number of any length never reaches int()."""
    match = _SINGLE_RANGE.fullmatch((header or "").strip())
    if match is None or not (match[1] or match[2]):
        return None
    first, last = (_bounded_number(text) for text in match.groups())
    if first and last and int(last) < int(first):
        return None  # invalid, ignored as RFC 9110 says: the whole file
    return f"bytes={first}-{last}"


def _bounded_number(text: str) -> str:
    digits = text.lstrip("0") or text[:1]  # "" stays "", "000" is "0"
    return digits if len(digits) <= MAX_RANGE_DIGITS else str(10**MAX_RANGE_DIGITS)


def image_type(declared: str | None) -> str:
    """A cover's content type as served: the declared one when it is an image's (not SVG, which runs
    scripts when opened), else application/octet-stream."""
    media_type = (declared or "").partition(";")[0].strip().lower()
    if media_type.startswith("image/") and not media_type.startswith("image/svg"):
        return declared or SAFE_IMAGE
    return SAFE_IMAGE


class DownloadCut(ResponseCut):
    """A download ended before its last byte (cut upstream, too large, or its client stopped reading). Raised
    after the answer started, so the server closes the connection without a clean end of body."""


class DownloadSlots:
    """Downloads running per team, within a limit read as each one starts (a reload applies at once).
    A team's entry goes when its count drops to 0: the map holds only the teams downloading now."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}

    def claim(self, team: str, limit: int) -> Slot:
        running = self._running.get(team, 0)
        if running >= limit:
            raise RateLimited(
                f"Team {team} already has {running} downloads running (limit {limit}).",
                code="concurrency_limit_exceeded",
                retry_after=1,
            )
        self._running[team] = running + 1
        return Slot(self, team)

    def running(self, team: str) -> int:
        return self._running.get(team, 0)

    def _release(self, team: str) -> None:
        left = self._running.get(team, 0) - 1
        if left > 0:
            self._running[team] = left
        else:
            self._running.pop(team, None)


class Slot:
    """One claimed download; released once, however the download ends."""

    def __init__(self, slots: DownloadSlots, team: str) -> None:
        self._slots: DownloadSlots | None = slots
        self._team = team

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self._team)
            self._slots = None

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Download:
    """An answered result-URL request whose body has not been read yet."""

    status: int
    headers: dict[str, str]
    response: aiohttp.ClientResponse
    ctx: RequestContext | None
    max_bytes: int = MAX_BYTES

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk; DownloadCut past max_bytes or when the upstream cuts it. The connection
        is released however it ends."""
        sent = 0
        try:
            while True:
                started = time.perf_counter()
                chunk = await self.response.content.read(CHUNK)
                if self.ctx is not None:
                    self.ctx.upstream_s += time.perf_counter() - started
                if not chunk:
                    return
                sent += len(chunk)
                if sent > self.max_bytes:
                    raise self._cut("too_large", sent)
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._cut(type(exc).__name__, sent) from None
        finally:
            self.response.release()

    def close(self) -> None:
        self.response.release()

    def _cut(self, reason: str, sent: int) -> DownloadCut:
        if self.ctx is not None:
            self.ctx.error_code = "content_cut"
        log.warning("content.cut", sent_bytes=sent, reason=reason)
        return DownloadCut(reason)


class Delivery(StreamingResponse):
    """A file streamed to a client. Each send must be taken within `send_timeout_s` (a client that reads
    nothing holds no upstream connection and no download slot for longer); `finish` runs however the send
    ends: done, cut, timed out, or the client gone."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        status: int,
        headers: Mapping[str, str],
        send_timeout_s: float,
        finish: Callable[[], None],
    ) -> None:
        super().__init__(chunks, status, headers)
        self.send_timeout_s = send_timeout_s
        self.finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx: RequestContext | None = scope.get("state", {}).get("ctx")

        async def timed_send(message: Message) -> None:
            try:
                with anyio.fail_after(self.send_timeout_s):
                    await send(message)
            except TimeoutError:
                if ctx is not None:
                    ctx.error_code = "send_timeout"
                log.warning("content.send_timeout", send_timeout_s=self.send_timeout_s)
                raise DownloadCut("send_timeout") from None

        try:
            await super().__call__(scope, receive, timed_send)
        finally:
            self.finish()


class DownloadResponse(Delivery):
    """A download passed on chunk by chunk; its upstream connection is released however the send ends
    (a client that leaves before the first chunk included), then `finish` runs."""

    def __init__(self, download: Download, send_timeout_s: float, finish: Callable[[], None]) -> None:
        self.download = download
        self._then = finish
        super().__init__(download.chunks(), download.status, download.headers, send_timeout_s, self._finish)

    def _finish(self) -> None:
        try:
            self.download.close()
        finally:
            self._then()


class MediaFetcher:
    """Result files, fetched for `/content` and remix; `downloads` counts those running per team."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.downloads = DownloadSlots()
        self.max_bytes = MAX_BYTES  # a larger file is refused, or cut where it passes the bound
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(
            total=TOTAL_TIMEOUT_S, sock_connect=settings.connect_timeout_s, sock_read=settings.timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = media_session(self._settings, self._timeout)
        return self._session

    async def open(self, url: str, range_header: str | None = None, ctx: RequestContext | None = None) -> Download:
        """Request a result file: 200 or 206 answered with its body still to read; anything else raised."""
        headers = {"Accept-Encoding": "identity"}
        wanted = single_range(range_header)
        if wanted is not None:
            headers["Range"] = wanted  # several ranges, or junk, get the whole file
        started = time.perf_counter()
        try:
            response = await self._client().get(url, headers=headers, max_redirects=MAX_HOPS)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(f"Cannot reach the video's storage: {type(exc).__name__}.") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("The video's storage did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"The video's storage failed: {type(exc).__name__}.", code="upstream_bad_response"
            ) from None
        if ctx is not None:
            ctx.upstream_s += time.perf_counter() - started
        return self._checked(response, ctx)

    async def available(self, url: str) -> None:
        """Raise VideoExpired (or the download's error) unless the URL still serves its file."""
        (await self.open(url, "bytes=0-0")).close()

    def _checked(self, response: aiohttp.ClientResponse, ctx: RequestContext | None) -> Download:
        status = response.status
        if status in (200, 206):
            headers = {k: response.headers[k] for k in PASSED_HEADERS if k in response.headers}
            declared = headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
                response.release()
                raise UpstreamError(
                    f"The video is larger than the gateway serves ({self.max_bytes} bytes).",
                    code="upstream_bad_response",
                )
            headers["content-type"] = response.headers.get("content-type", "application/octet-stream")
            return Download(status, headers, response, ctx, self.max_bytes)
        response.release()
        if status in EXPIRED:
            raise VideoExpired(
                "This video's content is no longer available: TokenHub's URL has expired and the gateway kept no copy."
            )
        if status == 416:
            size = response.headers.get("content-range")
            raise RangeNotSatisfiable(
                "The requested range is outside the video.",
                headers={"Content-Range": size} if size else None,
                param="Range",
            )
        code = "upstream_server_error" if status >= 500 else "upstream_bad_response"
        raise UpstreamError(f"The video's storage answered {status}.", code=code)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
