"""A task → OpenAI's Video object, and the headers the openai SDK reads (SPEC §11). Pure.

Decisions where SPEC §11 is silent:

- A task the gateway has recorded but not yet forwarded (`pending`) shows as `queued`.
- `progress` depends only on the time since creation, so no stored state can make it go back:
  1 at the start of `in_progress`, about 85 after the expected generation time, at most 99.
  Every terminal status shows 100, so a progress bar never runs backwards at the end either.
- `completed_at` is when the gateway first saw the task terminal (failed ones included).
- A status the gateway does not know is shown as `in_progress` (TokenHub may add one; it is not terminal
  to the gateway either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.errors import UnsupportedParameter, ValidationError
from gateway.openai.translate import RATIOS, VideoFacts

STATUS = {
    "pending": "queued",
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "expired": "failed",
    "unresolved": "failed",
    "unknown": "failed",
    "voided": "failed",  # an unknown outcome an operator found was never made
}
ERRORS = {
    "failed": ("generation_failed", "Seedance could not generate this video."),
    "cancelled": ("cancelled", "The video was cancelled before it started."),
    "expired": ("expired", "TokenHub gave up on the task before it finished."),
    "unresolved": ("unresolved", "The task did not finish within the gateway's time limit; it was given up."),
    "unknown": (
        "unknown",
        "The gateway could not learn whether this video was created upstream; an operator resolves it.",
    ),
    "voided": ("voided", "The video was not created upstream (an operator checked TokenHub's records)."),
}
UNFINISHED = frozenset({"queued", "in_progress"})
URL_LIFETIME_S = 24 * 3600  # TokenHub's result URLs expire after about a day
NO_RETRY = {"x-should-retry": "false"}


@dataclass(frozen=True, slots=True)
class TaskFacts:
    """What the Video object is built from, whichever shape created the task."""

    id: str
    status: str  # the gateway's (store) status
    model: str  # Seedance's
    resolution: str
    aspect_ratio: str | None  # None or "adaptive": shown as 16:9
    duration_s: int
    created_at: float
    settled_at: float | None = None
    video: VideoFacts | None = None  # kept when created in the OpenAI shape
    error_message: str | None = None  # TokenHub's, for a failed task
    archived_until: float | None = None  # the archive's retention end, when its files are there


def video_object(task: TaskFacts, now: float, *, expected_s: float | None = None) -> dict[str, Any]:
    facts = task.video or facts_of_seedance(task.model, task.duration_s, task.resolution, task.aspect_ratio)
    status = STATUS.get(task.status, "in_progress")
    completed_at = _ts(task.settled_at) if status in ("completed", "failed") else None
    expected = expected_seconds(task.duration_s) if expected_s is None else expected_s
    return {
        "id": task.id,
        "object": "video",
        "model": facts.model,
        "status": status,
        "progress": progress(status, task.created_at, now, expected),
        "created_at": _ts(task.created_at),
        "completed_at": completed_at,
        "expires_at": _expires_at(status, task.settled_at, task.archived_until),
        "prompt": facts.prompt,
        "seconds": facts.seconds,
        "size": facts.size,
        "remixed_from_video_id": facts.remixed_from,
        "error": video_error(task.status, task.error_message),
    }


def facts_of_seedance(
    model: str, duration_s: int, resolution: str, aspect_ratio: str | None, prompt: str | None = None
) -> VideoFacts:
    """How a task created in the TokenHub shape looks in the OpenAI one."""
    return VideoFacts(model, str(duration_s), size_of(resolution, aspect_ratio), prompt)


def size_of(resolution: str, aspect_ratio: str | None) -> str:
    """Seedance's resolution and ratio → "WxH": the shorter side is the resolution's lines, the longer one
    rounded up to an even number of pixels (480p 16:9 → 854x480)."""
    lines = int(resolution[:-1]) if resolution[:-1].isdigit() and resolution.endswith("p") else 720
    ratio = RATIOS.get(aspect_ratio or "", RATIOS["16:9"])
    long_side = 2 * math.ceil(lines * max(ratio, 1 / ratio) / 2 - 1e-9)
    return f"{long_side}x{lines}" if ratio >= 1 else f"{lines}x{long_side}"


def video_error(status: str, message: str | None = None) -> dict[str, str] | None:
    if status not in ERRORS:
        return None
    code, default = ERRORS[status]
    return {"code": code, "message": message if status == "failed" and message else default}


def expected_seconds(duration_s: int) -> float:
    """A rough figure for Seedance's generation time, only for shaping `progress`."""
    return 30.0 + 6.0 * duration_s


def progress(status: str, created_at: float, now: float, expected_s: float) -> int:
    if status == "queued":
        return 0
    if status != "in_progress":
        return 100
    elapsed = max(0.0, now - created_at)
    return min(99, 1 + int(98 * (1 - math.exp(-2 * elapsed / max(expected_s, 1.0)))))


def poll_after_headers(status: str, poll_after_ms: int) -> dict[str, str]:
    """For a create or retrieve answer: the SDK's `create_and_poll` waits this long before polling again."""
    if STATUS.get(status, "in_progress") in UNFINISHED:
        return {"openai-poll-after-ms": str(poll_after_ms)}
    return {}


def content_variant(value: str | None) -> str:
    """`?variant=` of `/videos/{id}/content` → "video" or "thumbnail"."""
    if value in (None, "", "video"):
        return "video"
    if value == "thumbnail":
        return "thumbnail"
    if value == "spritesheet":
        raise UnsupportedParameter("Seedance makes no spritesheet; variant may be video or thumbnail.", param="variant")
    raise ValidationError("variant must be video or thumbnail.", param="variant")


def deleted_object(video_id: str) -> dict[str, Any]:
    return {"id": video_id, "object": "video.deleted", "deleted": True}


def video_list(videos: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A page of `GET /videos`; the SDK asks for the next one with `after=last_id` while `has_more`."""
    return {
        "object": "list",
        "data": videos,
        "first_id": videos[0]["id"] if videos else None,
        "last_id": videos[-1]["id"] if videos else None,
        "has_more": has_more,
    }


def _expires_at(status: str, settled_at: float | None, archived_until: float | None) -> int | None:
    if status != "completed":
        return None
    if archived_until is not None:
        return _ts(archived_until)
    return None if settled_at is None else _ts(settled_at + URL_LIFETIME_S)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)
