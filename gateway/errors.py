"""The gateway's error tree and its OpenAI-shaped JSON rendering.

GatewayError
├── AuthError                 401 authentication_error / invalid_api_key
├── ValidationError           400 invalid_request_error / invalid_parameter (param)
│   ├── InvalidJSON           400 invalid_json
│   ├── BodyTooLarge          413 body_too_large
│   └── UnsupportedParameter  400 unsupported_parameter (param): no Seedance equivalent
├── PermissionDenied          403 permission_error / model_not_allowed
│   └── RoleDenied            403 permission_denied: what the caller's role does not allow (SPEC §15)
├── NotFound                  404 invalid_request_error / task_not_found (or route_not_found)
├── RequestTimeout            408 invalid_request_error / request_timeout (a slow client)
├── IdempotencyConflict       409 idempotency_key_reused / idempotency_key_in_progress
├── TaskNotUnknown            409 invalid_request_error / task_not_unknown
├── Conflict                  409 invalid_request_error / conflict: a team, user or key of that name or id exists
│   ├── TeamNotEmpty          409 team_not_empty: a team with users cannot be deleted
│   └── ManagedByConfig       409 managed_by_config: the config file declares it; the API cannot change it
├── VideoNotReady             409 invalid_request_error / video_not_ready
├── VideoExpired              410 invalid_request_error / video_expired
├── RangeNotSatisfiable       416 invalid_request_error / range_not_satisfiable
├── QuotaError                429 insufficient_quota / budget_exceeded
├── RateLimited               429 rate_limit_exceeded (+ Retry-After)
├── StoreUnavailable          503 service_unavailable / store_unavailable (+ Retry-After)
├── NoUpstreamKey             503 upstream_unavailable / no_upstream_key (+ Retry-After)
├── RecordRejected            500 server_error / record_rejected
├── ShuttingDown              503 service_unavailable / shutting_down
├── TooManyUploads            503 service_unavailable / too_many_uploads (+ Retry-After)
└── UpstreamError             502 upstream_error / upstream_* codes
    ├── ConnectFailed         502 upstream_unreachable: nothing reached TokenHub
    ├── DuplicateTaskId       502 upstream_bad_response: an id the gateway already holds
    └── UpstreamTimeout       504 upstream_timeout

ResponseCut (not a GatewayError: raised after an answer started, to end it short of its end on purpose)
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    unknown_outcome = False  # set on the answer to a forwarded create whose outcome is unknown

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra_headers = dict(headers or {})
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(self.retry_after)))
        if not self.retry_safe():
            headers["x-should-retry"] = "false"  # the openai SDKs retry 408/409/429/5xx unless told not to
        return headers

    def retry_safe(self) -> bool:
        """False where a blind retry could make things worse (SPEC §11): a create whose outcome is
        unknown (it may be paid for already), an exhausted budget, a conflict, a gone video."""
        return not (
            self.unknown_outcome or self.status in (409, 410) or (self.status == 429 and self.code == "budget_exceeded")
        )


class AuthError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ValidationError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_parameter"


class InvalidJSON(ValidationError):
    code = "invalid_json"


class BodyTooLarge(ValidationError):
    status = 413
    code = "body_too_large"


class UnsupportedParameter(ValidationError):
    code = "unsupported_parameter"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RoleDenied(PermissionDenied):
    """An admin route asked for what the caller's role does not allow (SPEC §15)."""

    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "task_not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class IdempotencyConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class QuotaError(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class StoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "store_unavailable"

    def __init__(self, message: str = "The gateway's store cannot be reached; retry shortly.", **kw: Any) -> None:
        kw.setdefault("retry_after", 1)
        super().__init__(message, **kw)


class NoUpstreamKey(GatewayError):
    status = 503
    type = "upstream_unavailable"
    code = "no_upstream_key"


class ShuttingDown(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"


class TooManyUploads(GatewayError):
    """OpenAI-shape uploads in flight are bounded gateway-wide (server.max_uploads_in_flight)."""

    status = 503
    type = "service_unavailable"
    code = "too_many_uploads"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class ConnectFailed(UpstreamError):
    """Nothing reached the upstream: safe to try another key."""


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class TaskNotUnknown(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "task_not_unknown"


class Conflict(GatewayError):
    """A team, user or key created under a name or id that exists already (SPEC §15)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class TeamNotEmpty(Conflict):
    """A team deleted while users are still in it."""

    code = "team_not_empty"


class ManagedByConfig(Conflict):
    """A change through the admin API to a team, user or key the config file declares (SPEC §15)."""

    code = "managed_by_config"


class VideoNotReady(GatewayError):
    """A video's content or remix asked for before it completed, or a running video deleted."""

    status = 409
    type = "invalid_request_error"
    code = "video_not_ready"


class VideoExpired(GatewayError):
    """TokenHub's result URL has expired and nothing is archived."""

    status = 410
    type = "invalid_request_error"
    code = "video_expired"


class RangeNotSatisfiable(GatewayError):
    status = 416
    type = "invalid_request_error"
    code = "range_not_satisfiable"


class RecordRejected(GatewayError):
    """The store refused one record (a figure out of range, a constraint): that record's request fails,
    nothing of it is written, and every other operation goes on."""

    code = "record_rejected"


class DuplicateTaskId(UpstreamError):
    """TokenHub answered a create with a task id the store already holds."""

    code = "upstream_bad_response"


class ResponseCut(Exception):
    """An answer ended on purpose before its last byte (a download cut upstream, too large, or whose client
    stopped reading): raised after the answer started, so the server closes the connection without a clean end
    of body and no client keeps a truncated file as complete. Not a crash."""
