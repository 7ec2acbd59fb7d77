"""videos_bridge: what the OpenAI shape keeps with a task, and what it reads back from TokenHub's answers."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.openai.bridge import (
    ParsedAnswers,
    answer_of,
    decode_meta,
    encode_meta,
    facts_of,
    output_seconds,
    parsed_answers,
    result_url,
    seedance_meta,
    task_facts,
)
from gateway.openai.translate import VideoFacts
from gateway.openai.view import video_object
from gateway.policy.validation import MAX_PROMPT_CHARS
from gateway.store.base import Task
from tests.doubles import FAST, USER_KEY, FakeClock, FakeUpstream, make_settings, make_task

T0 = 1_760_000_000.0
SUCCEEDED = {
    "id": "cgt-1",
    "status": "succeeded",
    "usage": {"video_duration": 5},
    "data": [{"video_url": "https://cdn.example/v.mp4?sig=1", "cover_image_url": "https://cdn.example/c.png"}],
}


def task(**kw) -> Task:
    defaults = {"model": FAST, "estimate_micros": 800_000, "team_period": "2026-11", "user_period": "2026-11"}
    return make_task(**{**defaults, "created_at": T0, "status": "queued", **kw})


@pytest.mark.parametrize(
    "facts", [VideoFacts("sora-2", "8", "1280x720", "a fox"), VideoFacts("sora-2-pro", "4", "720x1280", None, "cgt-0")]
)
def test_meta_round_trip(facts):
    assert decode_meta(encode_meta(facts)) == facts


@pytest.mark.parametrize(
    "meta",
    [
        None,
        b"",
        b"{not json",
        b"[1]",
        b'{"v": 2, "model": "m"}',
        b'{"v": 1, "model": 3, "seconds": "4", "size": "1x1"}',
        b'{"v": 1, "aspect_ratio": "9:16"}',
    ],
)
def test_unreadable_or_foreign_meta_reads_as_none(meta):
    assert decode_meta(meta) is None


@pytest.mark.parametrize(
    ("body", "meta"),
    [({"aspect_ratio": "9:16"}, {"v": 1, "aspect_ratio": "9:16"}), ({"aspect_ratio": "adaptive"}, None), ({}, None)],
)
def test_a_tokenhub_shape_create_keeps_only_a_named_ratio(body, meta):
    kept = seedance_meta(body.get("aspect_ratio"))
    assert (orjson.loads(kept) if kept else None) == meta


@pytest.mark.parametrize(
    ("ratio", "meta"),
    [
        ("9:16", {"v": 1, "aspect_ratio": "9:16", "prompt": "a fox at dawn"}),
        ("adaptive", {"v": 1, "prompt": "a fox at dawn"}),
        (None, {"v": 1, "prompt": "a fox at dawn"}),
    ],
)
def test_a_tokenhub_shape_create_keeps_its_prompt(ratio, meta):
    kept = seedance_meta(ratio, "a fox at dawn")
    assert kept is not None and orjson.loads(kept) == meta
    assert decode_meta(kept) is None  # still read as a TokenHub-shape task


def test_a_kept_prompt_is_bounded_by_the_validation_limit():
    kept = seedance_meta(None, "é" * (MAX_PROMPT_CHARS + 100))
    assert kept is not None and orjson.loads(kept)["prompt"] == "é" * MAX_PROMPT_CHARS


@pytest.mark.parametrize(
    ("meta", "answer", "size"),
    [
        (seedance_meta("9:16"), {"ratio": "1:1"}, "720x1280"),  # what the client asked for wins
        (seedance_meta("9:16", "a fox"), {"ratio": "1:1"}, "720x1280"),
        (seedance_meta(None, "a fox"), {"ratio": "1:1"}, "720x720"),  # a kept prompt names no ratio
        (seedance_meta("adaptive", "a fox"), {}, "1280x720"),
        (None, {"ratio": "1:1"}, "720x720"),
        (None, {"aspect_ratio": "4:3"}, "960x720"),
        (None, {}, "1280x720"),
    ],
)
def test_the_size_of_a_tokenhub_shape_task(meta, answer, size):
    v = video_object(task_facts(task(meta=meta), answer), T0)
    assert (v["size"], v["model"], v["seconds"], v["prompt"]) == (size, "doubao-seedance-2.0-fast", "5", None)
    assert facts_of(task(meta=meta, final_body=orjson.dumps(answer))).size == size


def test_an_openai_shape_task_shows_the_clients_names_and_tokenhubs_error():
    meta = encode_meta(VideoFacts("sora-2", "8", "1792x1024", "a fox", "cgt-0"))
    answer = {"status": "failed", "error": {"message": "x" * 5000}}
    facts = task_facts(task(meta=meta, status="failed", settled_at=T0 + 60), answer)
    v = video_object(facts, T0 + 100)
    assert (v["model"], v["seconds"], v["size"], v["remixed_from_video_id"], v["status"]) == (
        "sora-2",
        "8",
        "1792x1024",
        "cgt-0",
        "failed",
    )
    assert v["error"]["code"] == "generation_failed" and len(v["error"]["message"]) == 1000


def test_the_final_body_stands_in_for_an_answer():
    settled = task(status="succeeded", settled_at=T0 + 60, final_body=orjson.dumps(SUCCEEDED))
    assert video_object(task_facts(settled), T0 + 100)["expires_at"] == int(T0 + 60 + 24 * 3600)


@pytest.mark.parametrize(
    ("answer", "variant", "url"),
    [
        (SUCCEEDED, "video", "https://cdn.example/v.mp4?sig=1"),
        (SUCCEEDED, "thumbnail", "https://cdn.example/c.png"),
        ({"data": [{"video_url": "file:///etc/passwd"}]}, "video", None),
        ({"data": []}, "video", None),
        ({"data": "x"}, "video", None),
        ({}, "video", None),
        (None, "video", None),
    ],
)
def test_result_url(answer, variant, url):
    assert result_url(answer, variant) == url


@pytest.mark.parametrize(
    ("answer", "seconds"),
    [
        (SUCCEEDED, 5.0),
        ({"usage": {"video_duration": True}}, None),
        ({"usage": {"video_duration": "5"}}, None),
        ({"usage": 5}, None),
        (None, None),
    ],
)
def test_output_seconds(answer, seconds):
    assert output_seconds(answer) == seconds


@pytest.mark.parametrize(("body", "parsed"), [(b'{"a": 1}', {"a": 1}), (b"[1]", None), (b"{", None), (None, None)])
def test_answer_of(body, parsed):
    assert answer_of(body) == parsed


def test_the_archives_retention_is_the_expiry_of_an_archived_video():
    settled = task(status="succeeded", settled_at=T0 + 60, final_body=orjson.dumps(SUCCEEDED))
    archived = video_object(task_facts(settled, archived_until=T0 + 30 * 86400), T0 + 100)
    assert archived["expires_at"] == int(T0 + 30 * 86400)
    failed = task(status="failed", settled_at=T0 + 60)
    assert video_object(task_facts(failed, archived_until=T0 + 30 * 86400), T0 + 100)["expires_at"] is None


def test_a_stored_final_body_is_parsed_once_and_again_when_it_changes():
    answers = ParsedAnswers()
    settled = task(status="succeeded", settled_at=T0 + 60, final_body=orjson.dumps(SUCCEEDED))
    first = answers.of(settled)
    assert first == SUCCEEDED and answers.of(settled) is first
    assert answers.of(task(status="succeeded", settled_at=T0 + 60, final_body=orjson.dumps(SUCCEEDED))) is first
    assert answers.parsed == 1
    changed = orjson.dumps({**SUCCEEDED, "status": "failed"})
    assert answers.of(task(status="failed", settled_at=T0 + 60, final_body=changed))["status"] == "failed"
    assert answers.of(task(rid="r2", status="succeeded", settled_at=T0 + 60, final_body=settled.final_body)) == first
    assert answers.parsed == 3
    assert answers.of(task()) is None and answers.of(task(final_body=b"[1]")) is None


def test_the_parsed_answers_are_bounded_by_their_bodies_bytes():
    answers = ParsedAnswers(max_bytes=4096)
    big = task(status="succeeded", settled_at=T0, final_body=orjson.dumps({"pad": "x" * 5000}))
    answers.of(big)
    answers.of(big)
    assert answers.parsed == 2  # larger than the whole cache: parsed, never kept
    small = [
        task(rid=f"r{i}", status="succeeded", settled_at=T0, final_body=orjson.dumps(SUCCEEDED)) for i in range(20)
    ]
    for one in small:
        answers.of(one)
    answers.of(small[0])
    assert answers.parsed == 2 + 20 + 1  # the oldest was let go
    answers.of(small[-1])
    assert answers.parsed == 23


def test_a_video_of_an_openai_shape_task_reads_no_final_body():
    meta = encode_meta(VideoFacts("sora-2", "8", "1792x1024", "a fox"))
    settled = task(meta=meta, status="succeeded", settled_at=T0 + 60, final_body=b'{"status": "succeeded", "x": 1}')
    before = parsed_answers().parsed
    assert video_object(task_facts(settled), T0 + 100)["size"] == "1792x1024"
    assert parsed_answers().parsed == before


def test_listings_parse_each_stored_final_body_once(tmp_path: Path):
    """Through the app: TokenHub-shape tasks (their size comes from TokenHub's answer) listed twice."""
    upstream = FakeUpstream()
    settings = make_settings(f"sqlite:///{tmp_path / 'list.db'}")
    app = create_app(settings, upstream=upstream, clock=FakeClock(T0), run_poller=False)
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        ids = []
        for status in ("succeeded", "failed", "succeeded"):
            created = client.post("/v1/videos/generations", json={"model": "doubao-seedance-2.0", "prompt": "a fox"})
            task_id = created.json()["id"]
            upstream.finish(task_id, status)
            assert client.get(f"/v1/videos/generations/{task_id}").json()["status"] == status
            ids.append(task_id)
        first = client.get("/v1/videos").json()
        parsed = parsed_answers().parsed
        for _ in range(3):
            assert client.get("/v1/videos").json() == first
        assert parsed_answers().parsed == parsed
    assert [video["id"] for video in first["data"]] == ids[::-1]
    assert [video["status"] for video in first["data"]] == ["completed", "failed", "completed"]
