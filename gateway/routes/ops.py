"""Operational routes: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError, StoreUnavailable
from gateway.http.request import gw, json_response
from gateway.policy.auth import check_token


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway = gw(request)
    problems = []
    try:
        await asyncio.wait_for(gateway.store.ping(), timeout=2)
    except (GatewayError, TimeoutError):
        problems.append("store_unavailable")
    else:
        if await gateway.pool.all_disabled():
            problems.append("all_upstream_keys_disabled")
    if gateway.draining:
        problems.append("shutting_down")
    return json_response(
        {"status": "not_ready" if problems else "ready", "problems": problems}, 503 if problems else 200
    )


async def metrics(request: Request) -> Response:
    gateway = gw(request)
    token = gateway.settings.server.metrics_token
    if token is not None:
        check_token(request.headers.get("authorization"), token)
    try:
        await gateway.refresh_gauges()
    except StoreUnavailable:
        pass  # serve what we have: a scrape must not fail because the store blinked
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
