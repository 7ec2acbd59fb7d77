"""What a process keeps of its tasks in memory is bounded by bytes, not by entries: the task records shared by
creates and polls never keep a stored final body, terminal answers and parsed answers are counted by what
they hold, and a kept meta is copied out of orjson's larger buffer."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import orjson
import pytest

from gateway.flow import polls
from gateway.flow.polls import Polled, task_records
from gateway.openai.bridge import PARSED_BODY_FACTOR, PARSED_ENTRY_BYTES, ParsedAnswers, seedance_meta
from gateway.store.base import Task
from tests.doubles import make_task
from tests.flow.conftest import Running


def a_task(rid: str, meta: bytes | None = None, final_body: bytes | None = None) -> Task:
    return make_task(rid=rid, task_id=rid, meta=meta, final_body=final_body)


def test_task_records_are_bounded_by_their_bytes():
    records = task_records(max_bytes=64 * 1024)
    for index in range(100):
        records[f"t{index}"] = a_task(f"t{index}", meta=b"m" * 10_000)
    assert len(records) == 6  # 64 KiB / (10,000 + 512)
    assert records.currsize <= 64 * 1024
    small = task_records(max_bytes=64 * 1024)
    for index in range(1000):
        small[f"t{index}"] = a_task(f"t{index}")
    assert len(small) == 64 * 1024 // polls.TASK_RECORD_BYTES


def test_a_polled_record_keeps_no_final_body_and_polls_still_answer_from_memory_or_store(
    run_app: Callable[..., Running],
):
    first = run_app()
    task_id = first.create().json()["id"]
    first.upstream.finish(task_id)
    done = first.poll(task_id)
    assert done.json()["status"] == "succeeded"
    first.stop()
    app = run_app()  # a restart: nothing in memory
    assert app.poll(task_id).content == done.content  # the row is read from the store, final body and all
    kept = app.gateway.polls.records[task_id]
    assert kept.settled and kept.final_body is None
    app.gateway.polls._final.clear()  # evicted meanwhile: the stored answer is read again, TokenHub not asked
    assert app.poll(task_id).content == done.content
    assert app.upstream.calls == []


def test_terminal_answers_are_bounded_by_their_bytes(run_app: Callable[..., Running]):
    app = run_app()
    final = app.gateway.polls._final
    body = orjson.dumps({"status": "succeeded", "pad": "x" * 100_000})
    for index in range(200):
        final[f"t{index}"] = app.gateway.polls._polled(body)
    assert final.currsize <= polls.FINAL_ANSWERS_BYTES
    assert len(final) == polls.FINAL_ANSWERS_BYTES // (len(body) + polls.FINAL_ENTRY_BYTES)
    scrubbed = Polled(app.gateway.polls._polled(b"x" * 1000).outcome, b"y" * 1000)
    assert polls._polled_bytes(scrubbed) == 2000 + polls.FINAL_ENTRY_BYTES  # both copies counted


def test_parsed_answers_count_what_a_parsed_answer_costs():
    body = orjson.dumps({"status": "succeeded", "data": [{"video_url": "https://cdn.example/v.mp4"}]})
    budget = 10 * (PARSED_BODY_FACTOR * len(body) + PARSED_ENTRY_BYTES)
    answers = ParsedAnswers(max_bytes=budget)
    for index in range(50):
        assert answers.of(a_task(f"t{index}", final_body=body)) == orjson.loads(body)
    assert answers.parsed == 50
    assert answers.of(a_task("t49", final_body=body)) is not None and answers.parsed == 50  # kept
    assert answers.of(a_task("t0", final_body=body)) is not None and answers.parsed == 51  # evicted long ago


@pytest.mark.parametrize("error_chars", [0, 200, 1000, 5000])
def test_parsed_answers_hold_no_more_memory_than_their_budget(error_chars: int):
    """Measured, not counted: what the cache keeps alive stays within its budget, for tiny answers and large."""
    budget = 256 * 1024
    answers = ParsedAnswers(max_bytes=budget)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(2000):
            body = orjson.dumps(
                {
                    "id": f"cgt-{index:08d}",
                    "status": "failed",
                    "error": {"message": "x" * error_chars, "code": "e"},
                    "data": [{"video_url": f"https://cdn.example/v/{index}.mp4?sig=abcdef"}],
                    "usage": {"video_duration": 5},
                }
            )
            answers.of(a_task(f"t{index}", final_body=body))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert answers.parsed == 2000 and held <= budget


def test_a_kept_meta_costs_its_size_not_orjsons_buffer():
    meta = seedance_meta("9:16", "a fox")
    assert meta is not None and orjson.loads(meta) == {"v": 1, "aspect_ratio": "9:16", "prompt": "a fox"}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [seedance_meta("9:16", f"a fox number {index}") for index in range(500)]
        per_meta = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_meta < 512  # orjson's own result holds a 4 KB buffer
