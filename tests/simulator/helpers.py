"""Helpers of the simulator's tests: a simulator app in-process (or under uvicorn on a loopback port), a client
holding one of its keys, a create, a fault set and a call to its control routes."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from gateway.simulator.app import create_simulator, uvicorn_config

KEY = "th-alice-0001"
OTHER = "th-bob-0002"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "doubao-seedance-2.0", "prompt": "A cat on a beach", "duration": 8, "resolution": "480p"}


def client(app: Starlette, key: str | None = KEY) -> httpx.AsyncClient:
    """A client of the app in-process, holding `key` (None: no Authorization header)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim", headers=headers)


def sim(**kwargs: Any) -> Starlette:
    """A simulator that knows KEY and OTHER unless told other keys."""
    kwargs.setdefault("keys", {KEY, OTHER})
    return create_simulator(**kwargs)


async def create(api: httpx.AsyncClient, prefix: str = "/api/v1", **fields: Any) -> httpx.Response:
    return await api.post(f"{prefix}/videos/generations", json={**BODY, **fields})


@asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """The app under uvicorn on a loopback port, in a thread of its own; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", sock.getsockname()[1]))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


async def fault(app: Starlette, **spec: Any) -> None:
    """Set a fault on KEY's calls."""
    async with client(app, None) as control_client:
        reply = await control_client.post("/_sim/faults", json={"key": KEY, **spec})
        assert reply.status_code == 200, reply.text


async def control(app: Starlette, method: str, path: str, **kw: Any) -> httpx.Response:
    """A call to one of the simulator's control routes (/_sim/...), which take no key."""
    async with client(app, None) as control_client:
        return await control_client.request(method, path, **kw)
