"""The one place sessions that fetch result URLs are made: TokenHub's answers name those URLs, so they are
untrusted (SPEC §4, media and downloads)."""

from __future__ import annotations

import aiohttp

from gateway.settings import UpstreamSettings

MAX_REDIRECTS = 3


def media_session(settings: UpstreamSettings, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A session for result files: no cookies, no decompression (the bytes pass on exactly as stored)."""
    return aiohttp.ClientSession(
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
