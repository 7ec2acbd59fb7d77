"""What the OpenAI-shape e2e tests share: a gateway config with a team per limit, the official SDK pointed at it."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai

from gateway.simulator.media import cover_bytes, video_bytes
from tests.e2e.harness import Gateway, wait_until

PNG = cover_bytes("reference")  # a real PNG, whatever name and type the upload declares
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4
MP4 = video_bytes("a-clip", 4096)
MAX_BODY = 16 * 1024 * 1024
TEAMS = {
    "red": {},
    "blue": {},
    "poor": {"budget_usd": 0.5},
    "slow": {"requests_per_minute": 1},
    "pro": {"models": ["doubao-seedance-2.0"]},
}
USERS = {
    "alice": {"team": "red"},
    "amy": {"team": "red"},
    "bob": {"team": "blue"},
    "carol": {"team": "poor"},
    "dave": {"team": "slow"},
    "erin": {"team": "pro"},
}
FAST = "sim:seconds=0.5"


def sdk(gw: Gateway, user: str, prefix: str = "/v1", **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=gw.url + prefix, api_key=gw.user_keys[user], timeout=15, **kw)


def http(gw: Gateway, user: str) -> httpx.Client:
    return gw.client(user)


def requests_to(gw: Gateway, method: str, route: str) -> int:
    """Requests the gateway logged for one route template (what the SDK sent, retries included)."""
    return sum(
        1
        for line in gw.lines()
        if line.get("event") == "request" and line["method"] == method and line["route"] == route
    )


def wait_status(c: openai.OpenAI, video_id: str, status: str, timeout: float = 15) -> Any:
    return wait_until(lambda: (v := c.videos.retrieve(video_id)).status == status and v, timeout=timeout, interval=0.1)


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
