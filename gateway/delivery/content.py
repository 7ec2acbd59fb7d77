"""A video's bytes from TokenHub's result URL, streamed to the client (SPEC §11 `/videos/{id}/content`).

Never buffered whole and never a redirect: each chunk is passed on as it arrives, with the client's own
`Range`. The download has its own session (result URLs live on an object store, not on TokenHub's API),
a connect, idle and total timeout, and a size bound. An object store's 403/404/410 means the signed URL
has expired: 410 `video_expired`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.context import RequestContext
from gateway.delivery.guard import media_session
from gateway.errors import ConnectFailed, RangeNotSatisfiable, UpstreamError, UpstreamTimeout, VideoExpired
from gateway.settings import UpstreamSettings

CHUNK = 64 * 1024
MAX_BYTES = 512 * 1024 * 1024  # per file, as the archive's default max_bytes_per_video (SPEC §12)
TOTAL_TIMEOUT_S = 3600  # a whole download, however slowly the client reads
MAX_REDIRECTS = 3
EXPIRED = frozenset({403, 404, 410})
PASSED_HEADERS = ("content-length", "content-range", "accept-ranges", "etag", "last-modified")
_SINGLE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")
log = structlog.get_logger("gateway.content")


@dataclass
class Download:
    """An answered result-URL request whose body has not been read yet."""

    status: int
    headers: dict[str, str]
    response: aiohttp.ClientResponse
    ctx: RequestContext | None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, cut off past MAX_BYTES; the connection is released however it ends."""
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
                if sent > MAX_BYTES:
                    self._cut("too_large", sent)
                    return
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._cut(type(exc).__name__, sent)
        finally:
            self.response.release()

    def close(self) -> None:
        self.response.release()

    def _cut(self, reason: str, sent: int) -> None:
        # The client then gets a body shorter than its Content-Length, as from any cut download.
        if self.ctx is not None:
            self.ctx.error_code = "content_cut"
        log.warning("content.cut", sent_bytes=sent, reason=reason)


class DownloadResponse(StreamingResponse):
    """A download passed on chunk by chunk; its upstream connection is released however the send ends
    (a client that leaves before the first chunk included)."""

    def __init__(self, download: Download) -> None:
        super().__init__(download.chunks(), download.status, download.headers)
        self.download = download

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.download.close()


class MediaFetcher:
    def __init__(self, settings: UpstreamSettings) -> None:
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
        if range_header and _SINGLE_RANGE.fullmatch(range_header.strip()):
            headers["Range"] = range_header.strip()  # several ranges, or junk, get the whole file
        started = time.perf_counter()
        try:
            response = await self._client().get(url, headers=headers, max_redirects=MAX_REDIRECTS)
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
            if declared.isdigit() and int(declared) > MAX_BYTES:
                response.release()
                raise UpstreamError(
                    f"The video is larger than the gateway serves ({MAX_BYTES} bytes).", code="upstream_bad_response"
                )
            headers["content-type"] = response.headers.get("content-type", "application/octet-stream")
            return Download(status, headers, response, ctx)
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
