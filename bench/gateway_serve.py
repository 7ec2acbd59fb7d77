"""The gateway exactly as `tokenhub-gateway serve` runs it, but with another upstream HTTP client
injected through create_app(upstream=...): httpx's default transport, or httpx on httpx-aiohttp.
The shipped client (plain aiohttp, gateway/upstream.py) is benchmarked through the real CLI instead.

    python bench/gateway_serve.py --config gateway.toml --client httpx|httpx-aiohttp
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from gateway import logs
from gateway.app import create_app
from gateway.config import ConfigError, load_settings
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.serve import GatewayServer, uvicorn_config
from gateway.settings import UpstreamSettings
from gateway.upstream.client import ConnectFailed, Reply

HTTPX_POOL = 256  # as in bench/passthrough.py


class HttpxUpstream:
    """gateway.upstream.client.Upstream over one httpx.AsyncClient, with the same error mapping as HttpUpstream."""

    def __init__(self, settings: UpstreamSettings, on_aiohttp: bool) -> None:
        self._base = settings.base_url
        self._limits = httpx.Limits(max_connections=HTTPX_POOL, max_keepalive_connections=HTTPX_POOL)
        self._timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        self._on_aiohttp = on_aiohttp
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # made inside the running loop, like HttpUpstream's session
            if self._on_aiohttp:
                from httpx_aiohttp import HttpxAiohttpClient

                self._client = HttpxAiohttpClient(limits=self._limits, timeout=self._timeout)
            else:
                self._client = httpx.AsyncClient(limits=self._limits, timeout=self._timeout)
        return self._client

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        try:
            r = await self._http().request(method, self._base + path, content=body, headers=headers)
        except httpx.ConnectError as exc:
            raise ConnectFailed(f"Cannot reach TokenHub: {type(exc).__name__}.") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("TokenHub did not answer in time.") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"TokenHub's answer was cut off: {type(exc).__name__}.") from None
        return Reply(r.status_code, r.content, r.headers.get("retry-after"), time.perf_counter() - started)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--client", choices=("httpx", "httpx-aiohttp"), required=True)
    args = p.parse_args()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    logs.configure()
    app = create_app(settings, upstream=HttpxUpstream(settings.upstream, args.client == "httpx-aiohttp"))
    cfg = uvicorn_config(app, settings.server.host, settings.server.port, settings.server.shutdown_grace_s)
    GatewayServer(cfg, app.gateway.begin_drain).run()  # drains as `serve` does
    return 0


if __name__ == "__main__":
    sys.exit(main())
