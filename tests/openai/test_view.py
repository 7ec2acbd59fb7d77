import time

import httpx2
import openai
import pytest

from gateway.errors import GatewayError, UnsupportedParameter, ValidationError
from gateway.openai.translate import VideoFacts
from gateway.openai.view import (
    TaskFacts,
    content_variant,
    deleted_object,
    poll_after_headers,
    progress,
    size_of,
    video_error,
    video_list,
    video_object,
)

T0 = 1_760_000_000.0
DAY = 24 * 3600
FACTS = VideoFacts("sora-2", "8", "1280x720", "a cat")


def task(status, **kw):
    kw.setdefault("settled_at", T0 + 90 if status not in ("pending", "queued", "running") else None)
    return TaskFacts(
        kw.pop("id", "task_1"),
        status,
        kw.pop("model", "doubao-seedance-2.0-fast"),
        kw.pop("resolution", "720p"),
        kw.pop("aspect_ratio", "16:9"),
        kw.pop("duration_s", 8),
        T0,
        **kw,
    )


# status, OpenAI status, error code, progress, completed_at, expires_at
STATUSES = [
    ("pending", "queued", None, 0, None, None),
    ("queued", "queued", None, 0, None, None),
    ("running", "in_progress", None, "between", None, None),
    ("succeeded", "completed", None, 100, T0 + 90, T0 + 90 + DAY),
    ("failed", "failed", "generation_failed", 100, T0 + 90, None),
    ("cancelled", "failed", "cancelled", 100, T0 + 90, None),
    ("expired", "failed", "expired", 100, T0 + 90, None),
    ("unresolved", "failed", "unresolved", 100, T0 + 90, None),
    ("unknown", "failed", "unknown", 100, T0 + 90, None),
    ("processing", "in_progress", None, "between", None, None),
]


@pytest.mark.parametrize(("status", "shown", "code", "pct", "completed_at", "expires_at"), STATUSES)
def test_every_status(status, shown, code, pct, completed_at, expires_at):
    v = video_object(task(status, video=FACTS), T0 + 30)
    assert (v["status"], v["completed_at"], v["expires_at"]) == (shown, completed_at, expires_at)
    assert (v["error"] or {}).get("code") == code
    if code is not None:
        assert set(v["error"]) == {"code", "message"} and v["error"]["message"]
    assert 0 < v["progress"] < 100 if pct == "between" else v["progress"] == pct


def test_the_video_object_fields():
    v = video_object(
        task("succeeded", id="cgt-1", video=VideoFacts("sora-2-pro", "12", "1792x1024", "p", "vid_0")), T0 + 100
    )
    assert v == {
        "id": "cgt-1",
        "object": "video",
        "model": "sora-2-pro",
        "status": "completed",
        "progress": 100,
        "created_at": int(T0),
        "completed_at": int(T0 + 90),
        "expires_at": int(T0 + 90 + DAY),
        "prompt": "p",
        "seconds": "12",
        "size": "1792x1024",
        "remixed_from_video_id": "vid_0",
        "error": None,
    }


def test_a_tokenhub_shape_task_shows_seedance_names_and_derived_size():
    v = video_object(
        task("queued", model="doubao-seedance-2.0", resolution="480p", aspect_ratio="adaptive", duration_s=5), T0
    )
    assert (v["model"], v["seconds"], v["size"], v["prompt"]) == ("doubao-seedance-2.0", "5", "854x480", None)


def test_expires_at_follows_the_archive_when_archived():
    assert video_object(task("succeeded", archived_until=T0 + 30 * DAY), T0)["expires_at"] == int(T0 + 30 * DAY)
    assert video_object(task("failed", archived_until=T0 + 30 * DAY), T0)["expires_at"] is None


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("failed", "The prompt was rejected by moderation.", "The prompt was rejected by moderation."),
        ("failed", None, "Seedance could not generate this video."),
        ("cancelled", "ignored", "The video was cancelled before it started."),
    ],
)
def test_error_message(status, message, expected):
    assert video_error(status, message)["message"] == expected


@pytest.mark.parametrize(
    ("resolution", "ratio", "size"),
    [
        ("720p", "16:9", "1280x720"),
        ("720p", "9:16", "720x1280"),
        ("720p", "1:1", "720x720"),
        ("720p", "4:3", "960x720"),
        ("720p", "3:4", "720x960"),
        ("720p", "21:9", "1680x720"),
        ("720p", "adaptive", "1280x720"),
        ("720p", None, "1280x720"),
        ("480p", "16:9", "854x480"),
        ("480p", "9:16", "480x854"),
        ("480p", "1:1", "480x480"),
        ("480p", "4:3", "640x480"),
        ("480p", "3:4", "480x640"),
        ("480p", "21:9", "1120x480"),
        ("480p", "adaptive", "854x480"),
        ("1080p", "16:9", "1920x1080"),
    ],
)
def test_size_of_a_tokenhub_shape_task(resolution, ratio, size):
    assert size_of(resolution, ratio) == size


def test_progress_is_monotonic_and_strictly_inside_while_in_progress():
    times = [T0 - 5, T0, T0 + 0.5, *(T0 + 2**k for k in range(20)), T0 + 1e9]
    for expected in (1.0, 54.0, 120.0, 1e6):
        seen = [progress("in_progress", T0, now, expected) for now in times]
        assert seen == sorted(seen) and all(1 <= p <= 99 for p in seen)
        assert seen[0] == seen[1] == 1
    assert progress("in_progress", T0, T0 + 1e9, 54) == 99
    assert progress("in_progress", T0, T0 + 54, 54) == 85


def test_progress_over_a_tasks_life_never_goes_back():
    life = [
        ("queued", T0),
        ("queued", T0 + 3),
        ("running", T0 + 4),
        ("running", T0 + 40),
        ("running", T0 + 400),
        ("succeeded", T0 + 401),
        ("succeeded", T0 + 9999),
    ]
    seen = [video_object(task(status), now)["progress"] for status, now in life]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 100
    assert len(set(seen[2:5])) == 3  # it moves while in progress


# status, code, create forwarded?, x-should-retry: false?
RETRIES = [
    (502, "upstream_server_error", True, True),
    (504, "upstream_timeout", True, True),
    (502, "upstream_bad_response", True, True),
    (500, "internal_error", True, True),
    (503, "store_unavailable", True, True),  # TokenHub answered, the record failed
    (429, "budget_exceeded", False, True),
    (409, "idempotency_key_reused", False, True),
    (409, "idempotency_key_in_progress", False, True),
    (409, "video_not_ready", False, True),
    (410, "video_expired", False, True),
    (429, "rate_limit_exceeded", False, False),
    (503, "no_upstream_key", False, False),
    (503, "store_unavailable", False, False),
    (503, "shutting_down", False, False),
    (502, "upstream_key_rejected", False, False),
    (504, "upstream_timeout", False, False),  # a poll
    (400, "invalid_parameter", False, False),
    (404, "task_not_found", False, False),
    (200, None, True, False),
]


def answer_headers(status: int, code: str | None, forwarded: bool) -> dict[str, str]:
    """The headers of the gateway's error answer with this status and code."""
    err = GatewayError("m", code=code)
    err.status, err.unknown_outcome = status, forwarded and status >= 500
    return {k: v for k, v in err.headers().items() if k == "x-should-retry"}


@pytest.mark.parametrize(("status", "code", "forwarded", "no_retry"), RETRIES)
def test_which_answers_say_do_not_retry(status, code, forwarded, no_retry):
    assert answer_headers(status, code, forwarded) == ({"x-should-retry": "false"} if no_retry else {})


@pytest.mark.parametrize(
    ("status", "header"),
    [
        ("pending", True),
        ("queued", True),
        ("running", True),
        ("succeeded", False),
        ("failed", False),
        ("cancelled", False),
        ("unknown", False),
    ],
)
def test_poll_after_only_on_unfinished_videos(status, header):
    assert poll_after_headers(status, 2000) == ({"openai-poll-after-ms": "2000"} if header else {})


@pytest.mark.parametrize(
    ("value", "variant"), [(None, "video"), ("", "video"), ("video", "video"), ("thumbnail", "thumbnail")]
)
def test_content_variant(value, variant):
    assert content_variant(value) == variant


@pytest.mark.parametrize(
    ("value", "exc_type"),
    [("spritesheet", UnsupportedParameter), ("VIDEO", ValidationError), ("poster", ValidationError)],
)
def test_content_variant_refused(value, exc_type):
    with pytest.raises(exc_type) as info:
        content_variant(value)
    assert (info.value.param, info.type) == ("variant", exc_type)


def test_deleted_object():
    assert deleted_object("cgt-1") == {"id": "cgt-1", "object": "video.deleted", "deleted": True}


def test_video_list():
    a, b = video_object(task("queued", id="a"), T0), video_object(task("succeeded", id="b"), T0)
    assert video_list([a, b], True) == {
        "object": "list",
        "data": [a, b],
        "first_id": "a",
        "last_id": "b",
        "has_more": True,
    }
    assert video_list([], False) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_sdk_list_pages_by_last_id():
    pages = {
        None: ([video_object(task("queued", id="v3"), T0), video_object(task("queued", id="v2"), T0)], True),
        "v2": ([video_object(task("queued", id="v1"), T0)], False),
    }
    afters = []

    def handler(request):
        afters.append(request.url.params.get("after"))
        return httpx2.Response(200, json=video_list(*pages[afters[-1]]))

    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="tgw-test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    assert [v.id for v in client.videos.list(limit=2)] == ["v3", "v2", "v1"]
    assert afters == [None, "v2"]


def test_sdk_create_and_poll_follows_the_objects_and_the_poll_header():
    states = iter(["pending", "queued", "running", "running", "succeeded"])
    polls = []

    def handler(request):
        status = next(states)
        polls.append(request.headers.get("x-stainless-poll-helper"))
        body = video_object(task(status, video=FACTS), T0 + 10 * len(polls))
        headers = poll_after_headers(status, 1)
        return httpx2.Response(200, json=body, headers=headers)

    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="tgw-test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    started = time.monotonic()
    video = client.videos.create_and_poll(prompt="a cat", seconds="8", size="1280x720")
    assert time.monotonic() - started < 2.5  # 1 ms per poll as told, not the SDK's own 1 s each
    assert (video.status, video.progress, video.seconds, video.size, video.model) == (
        "completed",
        100,
        "8",
        "1280x720",
        "sora-2",
    )
    assert polls == [None, "true", "true", "true", "true"]


def test_sdk_does_not_retry_what_the_gateway_marks_so():
    calls = []

    def handler(request):
        calls.append(request)
        err = {"error": {"message": "m", "type": "upstream_error", "code": "upstream_timeout", "param": None}}
        return httpx2.Response(504, json=err, headers=answer_headers(504, "upstream_timeout", True))

    client = openai.OpenAI(
        base_url="http://gateway.test/v1",
        api_key="tgw-test",
        max_retries=2,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
    with pytest.raises(openai.InternalServerError):
        client.videos.create(prompt="a cat")
    assert len(calls) == 1
