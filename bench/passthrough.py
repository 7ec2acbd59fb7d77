"""A bare pass-through on the gateway's stack: starlette under uvicorn (uvloop, httptools, access log
off, one worker), forwarding create and poll to the upstream and answering its bytes. Nothing else:
no auth, validation, store, log line or metric. It is what the gateway's features are measured against.

    python bench/passthrough.py --client aiohttp|httpx|httpx-aiohttp --port N --upstream http://127.0.0.1:M
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CREATE_PATH = "/api/v1/videos/generations"
UPSTREAM_KEY = "th-bench-passthrough-key-0000"
HTTPX_POOL = 256  # both httpx variants: enough keep-alive connections that 32 clients never churn

Forward = Callable[[str, str, bytes | None], Awaitable[tuple[int, bytes]]]


def aiohttp_client(base: str) -> tuple[Forward, Callable[[], Awaitable[None]]]:
    import aiohttp

    # The gateway's own settings (gateway/upstream.py): one session, unlimited pool.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        timeout=aiohttp.ClientTimeout(total=60, sock_connect=5),
        skip_auto_headers=("User-Agent",),
    )

    async def forward(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        async with session.request(method, base + path, data=body, headers=headers(body)) as r:
            return r.status, await r.read()

    return forward, session.close


def httpx_client(base: str, on_aiohttp: bool) -> tuple[Forward, Callable[[], Awaitable[None]]]:
    import httpx

    limits = httpx.Limits(max_connections=HTTPX_POOL, max_keepalive_connections=HTTPX_POOL)
    timeout = httpx.Timeout(60, connect=5)
    if on_aiohttp:
        from httpx_aiohttp import HttpxAiohttpClient

        client: httpx.AsyncClient = HttpxAiohttpClient(limits=limits, timeout=timeout)
    else:
        client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def forward(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        r = await client.request(method, base + path, content=body, headers=headers(body))
        return r.status_code, r.content

    return forward, client.aclose


def headers(body: bytes | None) -> dict[str, str]:
    h = {"Authorization": f"Bearer {UPSTREAM_KEY}", "Accept": "application/json"}
    if body is not None:
        h["Content-Type"] = "application/json"
    return h


def create_app(client: str, upstream: str) -> Starlette:
    state: dict[str, Forward] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if client == "aiohttp":
            forward, close = aiohttp_client(upstream)
        else:
            forward, close = httpx_client(upstream, on_aiohttp=client == "httpx-aiohttp")
        state["forward"] = forward
        try:
            yield
        finally:
            await close()

    async def create(request: Request) -> Response:
        status, data = await state["forward"]("POST", CREATE_PATH, await request.body())
        return Response(data, status, media_type="application/json")

    async def poll(request: Request) -> Response:
        path = f"{CREATE_PATH}/{request.path_params['task_id']}"
        status, data = await state["forward"]("GET", path, None)
        return Response(data, status, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route(CREATE_PATH, create, methods=["POST"]),
            Route(CREATE_PATH + "/{task_id}", poll, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", choices=("aiohttp", "httpx", "httpx-aiohttp"), required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the fake upstream's base URL, e.g. http://127.0.0.1:9001")
    args = p.parse_args()
    app = create_app(args.client, args.upstream.rstrip("/"))
    # The gateway's uvicorn settings (gateway/serve.py uvicorn_config), with loop and parser spelled out.
    uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
            log_level="warning",
        )
    ).run()


if __name__ == "__main__":
    main()
