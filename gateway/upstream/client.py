"""The one TokenHub client: a pooled aiohttp session, timeouts, and the key scrubber.

Outcomes a create must tell apart (SPEC §5): a connect failure created nothing upstream and may be
retried on another key; a read timeout or a dropped answer may have created a task and must not."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from gateway.errors import ConnectFailed, UpstreamError, UpstreamTimeout
from gateway.settings import UpstreamSettings

# Anything shaped like a TokenHub key, raw, JSON-escaped (`th\u002d…`, `\/`) or percent-encoded.
_ESCAPED = rb"\\u00[0-9a-fA-F]{2}|\\/|%[0-9a-fA-F]{2}"
_KEYISH = rb"th(?:-|\\u002[dD]|%2[dD])(?:[A-Za-z0-9._+/=\-]|" + _ESCAPED + rb"){6,}"


def _char_forms(ch: str) -> bytes:
    """A regex matching one key character in any form a JSON or URL encoder may give it."""
    code = ord(ch)
    forms = [re.escape(ch.encode())]
    if code < 0x80:
        forms += [rb"\\u00" + _any_case(f"{code:02x}"), b"%" + _any_case(f"{code:02x}")]
        if ch == "/":
            forms.append(rb"\\/")
    return b"(?:" + b"|".join(forms) + b")"


def _any_case(hex_pair: str) -> bytes:
    return b"".join(f"[{c.lower()}{c.upper()}]".encode() if c.isalpha() else c.encode() for c in hex_pair)


class Scrubber:
    """Removes every configured key value, and anything shaped like a key, from a body before a
    client sees it. The raw forms are found by one cheap search first; the full regex runs only when a
    body holds one of them or an escape sequence that could hide one."""

    def __init__(self, key_values: Iterable[str]) -> None:
        values = sorted({v for v in key_values if v}, key=len, reverse=True)
        exact = [b"".join(_char_forms(c) for c in v) for v in values]
        self._pattern = re.compile(b"|".join([*exact, _KEYISH]))
        # One scan for every trigger: a key's prefix, an escape, or a configured value as it is.
        self._trigger = re.compile(b"|".join([rb"th-|\\|%", *(re.escape(v.encode()) for v in values)]))

    def __call__(self, body: bytes) -> bytes:
        if self._trigger.search(body):
            return self._pattern.sub(b"th-***", body)
        return body


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None
    elapsed: float


class Upstream(Protocol):
    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply: ...
    async def close(self) -> None: ...


class HttpUpstream:
    """TokenHub over one shared aiohttp session (created lazily inside the running loop)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._base = settings.base_url
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s, sock_connect=settings.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            # No cookie jar: a cookie one key's answer sets must never ride along with another key's call.
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            async with self._client().request(method, self._base + path, data=body, headers=headers) as response:
                data = await response.read()
                return Reply(response.status, data, response.headers.get("Retry-After"), time.perf_counter() - started)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(f"Cannot reach TokenHub: {type(exc).__name__}.") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("TokenHub did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"TokenHub's answer was cut off: {type(exc).__name__}.", code="upstream_bad_response"
            ) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
