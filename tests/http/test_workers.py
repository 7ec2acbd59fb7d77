"""Worker processes for large bodies: results and errors come back whole, a dead worker costs one request,
and the event loop runs on while a worker parses."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest

from gateway.errors import GatewayError, InvalidJSON, ValidationError
from gateway.http.bodies import INLINE_MAX_BYTES, check, loads_strict, parse_and_validate
from gateway.http.workers import BodyWorkers
from tests.doubles import PRICING, body

pytestmark = pytest.mark.timeout(60)


def exit_now(raw: bytes) -> None:
    os._exit(3)


def worker_pid(raw: bytes) -> int:
    return os.getpid()


@pytest.fixture
async def workers():
    w = BodyWorkers(2)
    yield w
    w.close()


async def test_a_check_in_a_worker_equals_the_check_inline(workers):
    raw = orjson.dumps(body(image_url="data:image/png;base64," + "A" * 2 * INLINE_MAX_BYTES, duration=7))
    assert await parse_and_validate(raw, PRICING, workers) == check(raw, PRICING)
    assert await workers.run(worker_pid, b"") != os.getpid()


async def test_errors_come_back_with_their_code_and_param(workers):
    with pytest.raises(InvalidJSON) as bad_json:
        await workers.run(loads_strict, b'{"a": 1, "a": 2}')
    assert bad_json.value.code == "invalid_json"
    with pytest.raises(ValidationError) as bad_field:
        await workers.run(check, orjson.dumps(body(duration=99)), PRICING)
    assert (bad_field.value.code, bad_field.value.param, bad_field.value.status) == (
        "invalid_parameter",
        "duration",
        400,
    )


async def test_a_worker_that_dies_fails_its_call_only(workers):
    dying = await workers.run(worker_pid, b"")  # idle now: the next call takes it
    with pytest.raises(GatewayError) as err:
        await workers.run(exit_now, b"")
    assert err.value.status == 500
    assert await workers.run(loads_strict, b"[1]") == [1]
    after = {await workers.run(worker_pid, b"") for _ in range(3)}
    assert len(after) == 1 and dying not in after  # a fresh worker took over, and is reused


async def test_at_most_size_calls_run_at_once(workers):
    pids = await asyncio.gather(*(workers.run(worker_pid, b"") for _ in range(6)))
    assert len(set(pids)) <= workers.size


async def test_the_event_loop_runs_on_while_a_worker_parses(workers):
    item = {"type": "image_url", "image_url": {"url": "https://cdn.example.com/a.png"}}
    raw = orjson.dumps(body(content=[item] * 600_000))  # about 0.4 s of orjson.loads holding the GIL
    await workers.run(loads_strict, b"{}")  # started: the measure is of the parse, not of the start
    lags: list[float] = []

    async def tick() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - started - 0.005)

    ticker = asyncio.ensure_future(tick())
    try:
        with pytest.raises(ValidationError):
            await parse_and_validate(raw, PRICING, workers)
    finally:
        ticker.cancel()
    assert len(lags) > 10 and max(lags) < 0.1, max(lags)


async def test_a_caller_that_goes_away_leaves_the_worker_reusable(workers):
    raw = orjson.dumps(body(image_urls=["https://cdn.example.com/a.png"] * 300_000))
    call = asyncio.ensure_future(workers.run(loads_strict, raw))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await workers.run(loads_strict, b'{"ok": true}') == {"ok": True}


async def test_close_stops_idle_workers():
    w = BodyWorkers(1)
    pid = await w.run(worker_pid, b"")
    w.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"worker {pid} still running after close()")
