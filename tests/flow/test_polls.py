"""Polls (gateway.flow.polls): TokenHub's answer is stored and used as it was sent; what clients see is
scrubbed of the configured key values, once per terminal answer however often it is polled (SPEC §4)."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from gateway.upstream.client import AnswerTooLarge
from tests.doubles import UPSTREAM_KEY
from tests.flow.conftest import Running

# Not keys, though shaped like them: a CDN path and a URL-safe base64 signature with `th-` inside.
RESULT_URL = "https://cdn.example/v/width-1280/month-12x/cgt.mp4?X-Sig=QUJD_th-REVGR0hJ-Sk0"
ECHO = f"key {UPSTREAM_KEY} / {''.join(f'%{ord(ch):02x}' for ch in UPSTREAM_KEY)}"
SHOWN = "key th-*** / th-***"


def finish_with_echo(app: Running, task_id: str) -> None:
    """TokenHub finishes the task with a result URL of look-alikes and the key echoed in a note."""
    app.upstream.finish(task_id)
    app.upstream.tasks[task_id].update(data=[{"video_url": RESULT_URL}], note=ECHO)


def test_a_running_task_is_shown_scrubbed(run_app: Callable[..., Running]):
    app = run_app()
    task_id = app.create().json()["id"]
    app.upstream.tasks[task_id]["note"] = ECHO
    for _ in range(2):  # from TokenHub, then from the coalescing window
        running = app.poll(task_id)
        assert running.json()["note"] == SHOWN and UPSTREAM_KEY not in running.text
    assert len(app.upstream.calls) == 2


def test_the_store_keeps_tokenhubs_answer_and_every_poll_shows_it_scrubbed(run_app: Callable[..., Running]):
    app = run_app()
    task_id = app.create().json()["id"]
    finish_with_echo(app, task_id)
    live = app.poll(task_id)
    assert UPSTREAM_KEY not in live.text
    assert (live.json()["note"], live.json()["data"]) == (SHOWN, [{"video_url": RESULT_URL}])
    assert app.poll(task_id).content == live.content  # from memory
    stored = orjson.loads(app.stored(task_id).final_body)
    assert (stored["note"], stored["data"]) == (ECHO, [{"video_url": RESULT_URL}])  # as TokenHub sent it
    app.stop()
    restarted = run_app()
    assert restarted.poll(task_id).content == live.content  # from the store, scrubbed on the way out
    assert restarted.upstream.calls == []


def test_a_terminal_answer_is_scrubbed_once_however_often_it_is_polled(run_app: Callable[..., Running]):
    app = run_app()
    scrubbed: list[bytes] = []
    scrub = app.gateway.pool.scrub

    def counting(body: bytes) -> bytes:
        scrubbed.append(body)
        return scrub(body)

    app.gateway.pool.scrub = counting
    task_id = app.create().json()["id"]
    finish_with_echo(app, task_id)
    scrubbed.clear()
    for _ in range(20):
        assert app.poll(task_id).json()["note"] == SHOWN
    assert len(scrubbed) == 1


def test_an_oversized_answer_to_a_poll_is_502_and_leaves_the_task_as_it_was(run_app: Callable[..., Running]):
    app = run_app()
    task_id = app.create().json()["id"]
    app.upstream.finish(task_id)
    app.upstream.raises = AnswerTooLarge(1024, 200)
    refused = app.poll(task_id)
    assert (refused.status_code, refused.json()["error"]["code"]) == (502, "upstream_bad_response")
    task = app.stored(task_id)
    assert (task.status, task.settled, task.final_body) == ("queued", False, None)
    assert (
        app.metrics.registry.get_sample_value(
            "tokenhub_gateway_upstream_requests_total",
            {"key": "k", "route": "/videos/generations/{task_id}", "code": "200"},
        )
        == 1
    )  # counted as what TokenHub answered: the key is fine
    app.upstream.raises = None
    assert app.poll(task_id).json()["status"] == "succeeded"
    assert app.stored(task_id).settled
