"""Between a stored task and OpenAI's Video object: what the OpenAI shape keeps with a task (its `meta`),
and what it reads back from TokenHub's answers (result URLs, output seconds, ratio, error). Pure.

Decisions where SPEC §11 is silent:

- The meta keeps the client's model name, seconds, size, prompt and remix source; a meta that cannot be
  read (written by a newer gateway, or damaged) shows the task as one created in the TokenHub shape.
- A TokenHub-shape create keeps its `aspect_ratio` in the meta when it names one (TokenHub's answers do
  not say it); without one, a ratio in TokenHub's answer (`ratio`, else `aspect_ratio`) is used, else 16:9.
  It keeps its `prompt` too (cut at §4's limit, which validation already enforces), for the console's page
  of the task, shown to the task's own team only; a Video object of such a task does not show it.
- A stored final body is parsed once (`stored_answer`), not on every listing: the parsed answers are kept in
  one LRU keyed by the task's rid and the body's length and hash (hashing is a small fraction of parsing),
  bounded by what they cost in memory (about three times the body, measured), shared by every route of the
  process and never changed by a reader. A Video object reads the answer only for what the meta does not say
  (a failed task's error, a ratio).
"""

from __future__ import annotations

import threading
from typing import Any

import orjson
from cachetools import LRUCache

from gateway.openai.translate import VideoFacts
from gateway.openai.view import TaskFacts, facts_of_seedance
from gateway.policy.validation import MAX_PROMPT_CHARS
from gateway.store.base import Task

META_VERSION = 1
MAX_ERROR_CHARS = 1_000
URL_FIELDS = {"video": "video_url", "thumbnail": "cover_image_url"}
PARSED_ANSWERS_BYTES = 8 * 1024 * 1024  # what the parsed answers kept may cost in memory, in bytes
PARSED_BODY_FACTOR = 3  # a parsed answer's dicts and strings cost about twice its body (tracemalloc), plus the key
PARSED_ENTRY_BYTES = 1_280  # what an entry costs beyond that (its dicts, key and LRU links; tracemalloc)


def _kept(data: bytes) -> bytes:
    """orjson's output copied to its exact size: a result kept for long (a meta in the task cache) would
    otherwise hold the larger buffer orjson wrote it in (about 4 KB of RSS each, measured with orjson 3.13)."""
    return memoryview(data).tobytes()


def encode_meta(facts: VideoFacts) -> bytes:
    return _kept(
        orjson.dumps(
            {
                "v": META_VERSION,
                "model": facts.model,
                "seconds": facts.seconds,
                "size": facts.size,
                "prompt": facts.prompt,
                "remixed_from": facts.remixed_from,
            }
        )
    )


def seedance_meta(ratio: str | None, prompt: str | None = None) -> bytes | None:
    """What a TokenHub-shape create keeps: its aspect ratio when not the default (for the OpenAI shape), and
    its prompt (for its team's console); None when there is neither."""
    doc: dict[str, Any] = {"v": META_VERSION}
    if ratio not in (None, "adaptive"):
        doc["aspect_ratio"] = ratio
    if prompt:
        doc["prompt"] = prompt[:MAX_PROMPT_CHARS]
    return _kept(orjson.dumps(doc)) if len(doc) > 1 else None


def decode_meta(meta: bytes | None) -> VideoFacts | None:
    doc = _meta_doc(meta)
    if doc is None or "model" not in doc:
        return None
    fields: list[Any] = [doc.get(name) for name in ("model", "seconds", "size", "prompt", "remixed_from")]
    if not all(isinstance(f, str) for f in fields[:3]) or not all(f is None or isinstance(f, str) for f in fields[3:]):
        return None
    return VideoFacts(*fields)


def _meta_doc(meta: bytes | None) -> dict[str, Any] | None:
    if not meta:
        return None
    try:
        doc = orjson.loads(meta)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and doc.get("v") == META_VERSION else None


def answer_of(body: bytes | None) -> dict[str, Any] | None:
    """TokenHub's task answer as a dict, or None when there is none or it is not an object."""
    if not body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _entry_bytes(entry: tuple[int, dict[str, Any] | None]) -> int:
    return entry[0]


class ParsedAnswers:
    """Stored final bodies → TokenHub's answers, each parsed once while it stays among the most recent."""

    def __init__(self, max_bytes: int = PARSED_ANSWERS_BYTES) -> None:
        self.max_bytes = max_bytes
        self.parsed = 0  # bodies parsed: the misses
        self._answers: LRUCache[tuple[str, int, int], tuple[int, dict[str, Any] | None]] = LRUCache(
            maxsize=max_bytes, getsizeof=_entry_bytes
        )
        self._lock = threading.Lock()  # a remix's translation may run in a worker thread

    def of(self, task: Task) -> dict[str, Any] | None:
        """The task's stored final body, parsed (None when there is none or it is not an object)."""
        body = task.final_body
        if not body:
            return None
        key = (task.rid, len(body), hash(body))
        with self._lock:
            entry = self._answers.get(key)
        if entry is not None:
            return entry[1]
        entry = (PARSED_BODY_FACTOR * len(body) + PARSED_ENTRY_BYTES, answer_of(body))
        with self._lock:
            self.parsed += 1
            if entry[0] <= self.max_bytes:
                self._answers[key] = entry
        return entry[1]


_PARSED = ParsedAnswers()


def stored_answer(task: Task) -> dict[str, Any] | None:
    """TokenHub's final answer of a settled task, parsed once per process (callers must not change it)."""
    return _PARSED.of(task)


def parsed_answers() -> ParsedAnswers:
    """The process's cache of parsed final bodies (tests read `parsed`)."""
    return _PARSED


def task_facts(task: Task, answer: dict[str, Any] | None = None, *, archived_until: float | None = None) -> TaskFacts:
    """What the Video object is built from: the stored task, TokenHub's latest answer when known (else the
    stored final one, read only when the Video needs it), and when the archive's retention deletes the
    task's files (`Archive.expires_at` of its archived files; None when not archived or no archive).
    Every route that answers a Video passes the same facts, so a list item equals the retrieve."""
    video = decode_meta(task.meta)
    needs_answer = task.status == "failed" or (video is None and _kept_ratio(task) is None)
    if answer is None and needs_answer:
        answer = stored_answer(task)
    answer = answer or {}
    return TaskFacts(
        id=task.task_id or task.rid,
        status=task.status,
        model=task.model,
        resolution=task.resolution,
        aspect_ratio=_ratio(task, answer),
        duration_s=task.duration_s,
        created_at=task.created_at,
        settled_at=task.settled_at,
        video=video,
        error_message=_error_message(answer),
        archived_until=archived_until,
    )


def facts_of(task: Task) -> VideoFacts:
    """The client-facing names of a task, whichever shape created it (a remix's defaults)."""
    return decode_meta(task.meta) or facts_of_seedance(
        task.model, task.duration_s, task.resolution, _ratio(task, stored_answer(task) or {})
    )


def result_url(answer: dict[str, Any] | None, variant: str) -> str | None:
    """TokenHub's URL of a succeeded task's video ("video") or cover ("thumbnail")."""
    items = (answer or {}).get("data")
    item = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
    url = item.get(URL_FIELDS[variant])
    return url if isinstance(url, str) and url.startswith(("https://", "http://")) else None


def output_seconds(answer: dict[str, Any] | None) -> float | None:
    usage = (answer or {}).get("usage")
    value = usage.get("video_duration") if isinstance(usage, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _kept_ratio(task: Task) -> str | None:
    kept = (_meta_doc(task.meta) or {}).get("aspect_ratio")
    return kept if isinstance(kept, str) else None


def _ratio(task: Task, answer: dict[str, Any]) -> str | None:
    kept = _kept_ratio(task)
    if kept is not None:
        return kept
    for name in ("ratio", "aspect_ratio"):
        given = answer.get(name)
        if isinstance(given, str):
            return given
    return None


def _error_message(answer: dict[str, Any]) -> str | None:
    error = answer.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return message[:MAX_ERROR_CHARS] if isinstance(message, str) and message else None
