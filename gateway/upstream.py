"""The one upstream HTTP client: a pooled aiohttp session, timeouts, and error mapping.

Outcomes a create must tell apart (SPEC §5): a connect failure created nothing upstream and may be
retried on another key; a read timeout or a dropped answer may have created a task and must not."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from .config import UpstreamSettings
from .errors import UpstreamError, UpstreamTimeout


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None
    elapsed: float


class ConnectFailed(UpstreamError):
    """Nothing reached the upstream: safe to try another key."""

    code = "upstream_unreachable"


class Upstream(Protocol):
    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply: ...
    async def close(self) -> None: ...


class HttpUpstream:
    """TokenHub over one shared aiohttp session (created lazily inside the running loop)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._base = settings.base_url
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s,
                                              sock_connect=settings.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            # No cookie jar: a cookie one key's answer sets must never ride along with another key's call.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  auto_decompress=True, skip_auto_headers=("User-Agent",))
        return self._session

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            async with self._client().request(method, self._base + path, data=body, headers=headers) as r:
                data = await r.read()
                return Reply(r.status, data, r.headers.get("Retry-After"), time.perf_counter() - started)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(f"Cannot reach TokenHub: {type(exc).__name__}.") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("TokenHub did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"TokenHub's answer was cut off: {type(exc).__name__}.") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
