"""The record of one request (what the routes and the task flow learn while handling it, for the one
log line the request middleware writes when it ends) and what the task flow answers a route. Neither
belongs to the HTTP shell: the task flow fills them the same way for a route and for the poller."""

from __future__ import annotations


class RequestContext:
    """What a handler learns about a request, for the one log line written when it ends."""

    __slots__ = (
        "request_id",
        "team",
        "user",
        "model",
        "resolution",
        "duration_s",
        "task_id",
        "upstream_key",
        "upstream_status",
        "upstream_s",
        "cost_usd",
        "error_code",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.team: str | None = None
        self.user: str | None = None
        self.model: str | None = None
        self.resolution: str | None = None
        self.duration_s: int | None = None
        self.task_id: str | None = None
        self.upstream_key: str | None = None
        self.upstream_status: int | None = None
        self.upstream_s = 0.0
        self.cost_usd: float | None = None
        self.error_code: str | None = None


class Outcome:
    """What the task flow answers a route: a status and body bytes, plus extra headers."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
