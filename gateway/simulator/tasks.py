"""A simulated task: its timeline from a prompt's markers, and what its record shows at a moment."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.simulator import media as sim_media
from gateway.simulator.media import DEFAULT_VIDEO_SIZE

QUEUED_SHARE = 0.2  # share of a task's run time spent queued


SECONDS_MARK = re.compile(r"sim:seconds=(\d+(?:\.\d*)?|\.\d+)")


BYTES_MARK = re.compile(r"sim:bytes=(\d+)")


@dataclass
class SimTask:
    id: str
    key: str
    model: str
    resolution: str
    duration: int
    input_s: float
    created: float
    seconds: float
    outcome: str  # "succeeded", "failed" or "never"
    request: dict[str, Any]
    video_size: int = DEFAULT_VIDEO_SIZE
    cancelled_at: float | None = None

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        elapsed = now - self.created
        if elapsed < self.seconds * QUEUED_SHARE:
            return "queued"
        if elapsed < self.seconds or self.outcome == "never":
            return "running"
        return self.outcome

    def updated(self, status: str) -> float:
        if status == "queued":
            return self.created
        if status == "running":
            return self.created + self.seconds * QUEUED_SHARE
        if status == "cancelled":
            return self.cancelled_at or self.created
        return self.created + self.seconds

    def body(self, now: float, links: Callable[[], dict[str, str]]) -> dict[str, Any]:
        status = self.status(now)
        body = {
            "id": self.id,
            "object": "video.generation.task",
            "model": self.model,
            "status": status,
            "created": int(self.created),
            "updated": int(self.updated(status)),
            "resolution": self.resolution,
            "duration": self.duration,
        }
        if status == "succeeded":
            body["data"] = [links()]
            body["usage"] = {"video_duration": self.duration}
        elif status == "failed":
            body["error"] = {
                "code": "generation_failed",
                "message": "The video could not be generated (simulated failure).",
            }
        return body


def prompt_text(body: dict[str, Any]) -> str:
    content = body.get("content")
    items = content if isinstance(content, list) else []
    parts = [body.get("prompt"), *(item.get("text") for item in items if isinstance(item, dict))]
    return " ".join(part for part in parts if isinstance(part, str))


def outcome_of(text: str) -> str:
    return "failed" if "sim:fail" in text else "never" if "sim:never" in text else "succeeded"


def video_size(text: str, default: int) -> int:
    mark = BYTES_MARK.search(text)
    return min(max(int(mark[1]), sim_media.MIN_VIDEO_SIZE), sim_media.MAX_VIDEO_SIZE) if mark else default
