"""What handlers share: headers and bodies read cheaply, JSON, authentication, query parameters, answers."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.context import Outcome, RequestContext
from gateway.errors import BodyTooLarge, RequestTimeout, ValidationError
from gateway.http.bodies import INLINE_MAX_BYTES, loads_strict
from gateway.http.workers import BodyWorkers

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.settings import Team, User

JSON = "application/json"


_JSON_TYPE = (b"content-type", JSON.encode())


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type=JSON)


class OutcomeResponse(Response):
    """What `Response(outcome.body, outcome.status, outcome.headers, media_type=JSON)` sends, its header list
    built directly: an outcome's headers are the task flow's extras, never a content-type or content-length of
    their own."""

    def __init__(self, outcome: Outcome) -> None:
        self.status_code = outcome.status
        self.body = outcome.body
        self.background = None
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers.items()]
        if outcome.status >= 200 and outcome.status not in (204, 304):
            raw.append((b"content-length", str(len(outcome.body)).encode()))
        raw.append(_JSON_TYPE)
        self.raw_headers = raw


def outcome_response(outcome: Outcome) -> Response:
    return OutcomeResponse(outcome)


def ctx_of(request: Request) -> RequestContext:
    ctx: RequestContext = request.scope["state"]["ctx"]
    return ctx


def gw(request: Request) -> Gateway:
    gateway: Gateway = request.app.gateway
    return gateway


def header(request: Request, name: bytes) -> str | None:
    """A header's first value (`name` in lower case, as ASGI gives names): a lookup on the create path without
    building starlette's Headers, whose miss raises a KeyError for .get() to catch."""
    for key, value in request.scope["headers"]:
        if key == name:
            found: str = value.decode("latin-1")
            return found
    return None


def authenticate(request: Request) -> tuple[User, Team]:
    user, team = gw(request).auth.authenticate(header(request, b"authorization"))
    ctx = ctx_of(request)
    ctx.user = user.name
    ctx.team = team.name
    return user, team


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The whole body, at most `limit` bytes, arrived within `timeout_s` (or a 408 that ends the connection)."""
    if number_over(header(request, b"content-length"), limit):
        raise BodyTooLarge(f"The body is larger than {limit} bytes.")
    body = io.BytesIO()  # grown chunk by chunk and handed over without a copy: no whole-body memcpy on the loop
    try:
        async with asyncio.timeout(timeout_s):
            # The ASGI messages read here, not through request.stream(): an async generator per body costs more
            # than the rest of the read, and most bodies come in one message, handed over as they are.
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk: bytes = message.get("body", b"")
                more = message.get("more_body", False)
                if body.tell() + len(chunk) > limit:
                    raise BodyTooLarge(f"The body is larger than {limit} bytes.")
                if not more and not body.tell():
                    return chunk
                body.write(chunk)
                if not more:
                    return body.getvalue()
    except TimeoutError:
        raise RequestTimeout(
            f"The body did not arrive within {timeout_s:g} s.", headers={"Connection": "close"}
        ) from None


async def parse_json(raw: bytes, large: BodyWorkers) -> Any:
    """A JSON body, with a repeated key refused; a large one parsed in a worker process (its value comes
    back whole: for bodies whose size is in a few strings, like a create's data: URIs)."""
    if len(raw) <= INLINE_MAX_BYTES:
        return loads_strict(raw)
    return await large.run(loads_strict, raw)


def int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    """A numeric query parameter: ASCII digits only, and never int() of a string longer than `high` could be
    (Python refuses int() past 4,300 digits with a ValueError: a 500)."""
    if value is None or value == "":
        return default
    digits = value.lstrip("0") or "0"
    if not (value.isascii() and value.isdigit()) or len(digits) > len(str(high)) or not low <= int(digits) <= high:
        raise ValidationError(f"{name} must be an integer from {low} to {high}.", param=name)
    return int(digits)


def number_over(declared: str | None, limit: int) -> bool:
    """Whether a declared size (a Content-Length: ASCII digits, of any length) is over `limit`."""
    if not declared or not (declared.isascii() and declared.isdigit()):
        return False
    digits = declared.lstrip("0") or "0"
    return len(digits) > len(str(limit)) or int(digits) > limit
