"""TokenHub's API as data: its routes, its task statuses, what an answer's status and Retry-After mean.

Outcomes a create must tell apart (SPEC §5): a connect failure created nothing upstream and may be
retried on another key; a read timeout or a dropped answer may have created a task and must not."""

from __future__ import annotations

import math
from email.utils import parsedate_to_datetime

# TokenHub's two routes; the path templates are also the `route` label of the upstream metrics.
CREATE_ROUTE = "/videos/generations"
TASK_ROUTE = "/videos/generations/{task_id}"
PROBE_TASK_ID = "cgt-gateway-health-probe"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})

# What an HTTP status from TokenHub means for the request and for the key that sent it.
ACCEPTED = "accepted"  # 2xx
REFUSED = "refused"  # another 3xx/4xx: TokenHub refused the request itself; the key is fine
KEY_REJECTED = "key_rejected"  # 401/403: the key is bad, not the request
THROTTLED = "throttled"  # 429: the key is rate-limited
FAILED = "failed"  # 5xx: TokenHub failed; a create may or may not have happened


def task_path(task_id: str) -> str:
    return f"{CREATE_ROUTE}/{task_id}"


def outcome_of(status: int) -> str:
    if status < 300:
        return ACCEPTED
    if status in (401, 403):
        return KEY_REJECTED
    if status == 429:
        return THROTTLED
    return FAILED if status >= 500 else REFUSED


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_after_s(value: str | None, now: float) -> int:
    """A Retry-After header as whole seconds to pass on to a client (at least 1)."""
    seconds = parse_retry_after(value, now)
    return max(1, min(3600, math.ceil(seconds))) if seconds is not None else 1
