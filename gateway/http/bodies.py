"""A request body's bytes → strict JSON, and a create's body → a checked request with its idempotency hash.

A body above INLINE_MAX_BYTES is handled in a worker process (gateway.workers): orjson holds the GIL for the
whole of a parse, so a thread would stall the event loop just the same.

Repeated keys (SPEC §4 "Strict JSON"): orjson keeps the last of them, TokenHub may keep the first. Outside
strings, a `:` stands for one object member; orjson writes back one `:` per member it kept plus those inside
the strings it kept. Unless a `\\u` escape could have made a `:`, equal counts in the body and in orjson's
re-serialization (the canonical form, made anyway for the hash) prove that no member was dropped. Otherwise
the strings are blanked out and the remaining `:`s are counted against the members of the parsed value.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple

import orjson

from gateway.errors import InvalidJSON
from gateway.http.workers import BodyWorkers
from gateway.policy.pricing import Pricing
from gateway.policy.validation import VideoRequest, validate

INLINE_MAX_BYTES = 64 * 1024  # the worst body this size (all `[]` or `\\u` escapes) costs the loop < 4 ms
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


class Checked(NamedTuple):
    request: VideoRequest
    # SHA-256 of the canonical body (keys sorted): what an Idempotency-Key is bound to; None when the
    # create came without one, as nothing would read it
    body_hash: str | None
    prompt: str  # the validated prompt (within §4's limit): what the TokenHub shape keeps with its task


def loads_strict(raw: bytes) -> Any:
    """JSON, with a repeated key in any object refused as invalid_json."""
    return _parse(raw)[0]


def check(raw: bytes, pricing: Pricing, hashed: bool = True) -> Checked:
    value, canonical = _parse(raw)
    request = validate(value, pricing)  # a dict with a valid prompt from here on
    return Checked(request, hashlib.sha256(canonical).hexdigest() if hashed else None, value["prompt"])


async def parse_and_validate(raw: bytes, pricing: Pricing, large: BodyWorkers, hashed: bool = True) -> Checked:
    """A create's body → Checked, or InvalidJSON / ValidationError; a large body in a worker process.
    `hashed`: whether the body hash is wanted (only a create with an Idempotency-Key needs it)."""
    if len(raw) <= INLINE_MAX_BYTES:
        return check(raw, pricing, hashed)
    return await large.run(check, raw, {model: dict(row) for model, row in pricing.items()}, hashed)


def _parse(raw: bytes) -> tuple[Any, bytes]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidJSON("The body is not valid JSON.") from None
    canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if _dropped_members(raw, value, canonical):
        raise InvalidJSON("The body repeats a key within one object; each key may appear once.")
    return value, canonical


def _dropped_members(raw: bytes, value: Any, written: bytes) -> bool:
    if b"\\u" not in raw:
        return raw.count(b":") != written.count(b":")
    return _STRING.sub(b'""', raw).count(b":") != _members(value)


def _members(value: Any) -> int:
    """The members of every object in a parsed value; iterative, as nesting is bounded by orjson only."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            total += len(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return total
