"""The one TokenHub client: a pooled aiohttp session, timeouts, bounded answers, and the key scrubber.

Outcomes a create must tell apart (SPEC §5): a connect failure created nothing upstream and may be
retried on another key; a read timeout or a dropped answer may have created a task and must not."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp.abc import AbstractStreamWriter

from gateway.errors import ConnectFailed, UpstreamError, UpstreamTimeout
from gateway.settings import UpstreamSettings

READ_CHUNK = 64 * 1024
SEND_CHUNK = 64 * 1024


class SlicedBody(aiohttp.BytesPayload):
    """A request body written in slices of itself. aiohttp writes a bytes body joined to the request's headers
    in one new bytes object (on Python before 3.12.9): a second copy of a large body (a create carrying an
    image) while it is sent. The bytes and headers sent are the same."""

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        body = memoryview(self._value)[:content_length]
        for start in range(0, len(body), SEND_CHUNK):
            await writer.write(body[start : start + SEND_CHUNK])


class AnswerTooLarge(UpstreamError):
    """TokenHub answered more than `upstream.max_answer_bytes`: refused, never read whole (SPEC §4).
    TokenHub did answer, with `upstream_status`: the key is not at fault."""

    code = "upstream_bad_response"

    def __init__(self, limit: int, upstream_status: int) -> None:
        super().__init__(f"TokenHub's answer was larger than {limit} bytes (upstream.max_answer_bytes).")
        self.upstream_status = upstream_status


def _char_forms(ch: str) -> bytes:
    """A regex matching one key character in any form a JSON or URL encoder may give it."""
    code = ord(ch)
    forms = [re.escape(ch.encode())]
    if code < 0x80:
        forms += [rb"\\u00" + _any_case(f"{code:02x}"), b"%" + _any_case(f"{code:02x}")]
        if ch == "/":
            forms.append(rb"\\/")
    return b"(?:" + b"|".join(forms) + b")"


def _trie_pattern(values: Iterable[str]) -> bytes:
    """One regex for all the values, their shared prefixes (`th-`) written once: a position that
    starts no key is passed over after one test, not one per key. Longer values win."""
    trie: dict[str, dict[str, Any]] = {}
    for value in values:
        node = trie
        for ch in value:
            node = node.setdefault(ch, {})
        node[""] = {}  # a value ends here

    def emit(node: dict[str, Any]) -> bytes:
        branches = [_char_forms(ch) + emit(child) for ch, child in node.items() if ch]
        if not branches:
            return b""
        joined = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        return b"(?:" + joined + b")?" if "" in node else joined

    return emit(trie)


def _any_case(hex_pair: str) -> bytes:
    return b"".join(f"[{c.lower()}{c.upper()}]".encode() if c.isalpha() else c.encode() for c in hex_pair)


class Scrubber:
    """Removes every configured key value, raw, JSON-escaped or percent-encoded, from a body before a
    client sees it. Only key values: a look-alike (`…/width-1280/…`, a signature with `th-` inside) is
    not a key and is left as sent (SPEC §4). A body with nothing to remove comes back as the same object."""

    def __init__(self, key_values: Iterable[str]) -> None:
        values = {v for v in key_values if v}
        self._pattern = re.compile(_trie_pattern(values)) if values else None

    def __call__(self, body: bytes) -> bytes:
        return self._pattern.sub(b"th-***", body) if self._pattern is not None else body


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
        self._max_answer = settings.max_answer_bytes
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
            sent = SlicedBody(body) if body is not None and len(body) > SEND_CHUNK else body
            async with self._client().request(method, self._base + path, data=sent, headers=headers) as response:
                data = await self._read(response)
                return Reply(response.status, data, response.headers.get("Retry-After"), time.perf_counter() - started)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ConnectFailed(f"Cannot reach TokenHub: {type(exc).__name__}.") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("TokenHub did not answer in time.") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"TokenHub's answer was cut off: {type(exc).__name__}.", code="upstream_bad_response"
            ) from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The answer's body, at most max_answer_bytes of it: a larger one is refused as soon as its
        length is known (declared, or once read that far)."""
        declared = response.content_length
        if declared is not None and declared > self._max_answer:
            raise self._refuse(response)
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(READ_CHUNK):
            size += len(chunk)
            if size > self._max_answer:
                raise self._refuse(response)
            chunks.append(chunk)
        return b"".join(chunks)

    def _refuse(self, response: aiohttp.ClientResponse) -> AnswerTooLarge:
        response.close()  # the connection is dropped, not drained
        return AnswerTooLarge(self._max_answer, response.status)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
