"""The log stream: the request line's fast path renders what structlog renders, and batching keeps order."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import signal

import pytest
import structlog

from gateway import logs
from gateway.app import create_app
from tests.doubles import FakeUpstream, make_settings


@pytest.fixture(autouse=True)
def restore_logging():
    """These tests configure logging for the whole process: put back what was there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._info_out = None


def configured(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    logs.configure("INFO", stream=buf)
    return buf


def test_the_request_line_is_the_line_structlog_writes(monkeypatch):
    buf = configured(monkeypatch)
    fields = {
        "request_id": "r1",
        "method": "POST",
        "route": "/videos/generations",
        "status": 200,
        "duration_ms": 1.25,
        "team": "red",
        "user": None,
        "cost_usd": 0.8,
        "error_code": None,
    }
    assert logs.info_line("request", dict(fields))
    structlog.get_logger("gateway.request").info("request", **fields)
    fast, chain = (json.loads(line) for line in buf.getvalue().splitlines())
    assert list(fast) == list(chain)  # same keys, same order
    assert fast.pop("timestamp").endswith("Z") and chain.pop("timestamp").endswith("Z")
    assert fast == chain


def test_without_info_lines_the_fast_path_steps_aside(monkeypatch):
    configured(monkeypatch)
    logs.configure("WARNING")
    assert not logs.info_line("request", {"request_id": "r1"})


def test_lines_wait_for_the_batch_and_keep_their_order(monkeypatch):
    buf = configured(monkeypatch)

    async def burst() -> str:
        log = structlog.get_logger("gateway")
        log.info("first")
        logging.getLogger("uvicorn.error").info("second")
        logs.info_line("third", {})
        held = buf.getvalue()  # nothing written yet: one write per batch
        await asyncio.sleep(logs.Batched.FLUSH_EVERY_S * 3)
        return held

    assert asyncio.run(burst()) == ""
    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert events == ["first", "second", "third"]


@pytest.mark.parametrize(
    "ns",
    [
        0,
        1_000,
        999_999_999,
        1_764_594_374_000_000_000,
        1_764_594_374_000_000_999,
        1_764_594_374_123_456_789,
        1_764_594_374_999_999_000,
    ],
)
def test_the_stamp_is_what_the_iso_timestamper_writes(ns):
    us = ns // 1000
    when = datetime.datetime.fromtimestamp(us // 10**6, datetime.timezone.utc).replace(microsecond=us % 10**6)
    stamp = logs.UtcStamp(clock=lambda: ns)
    assert stamp() == stamp() == when.isoformat().replace("+00:00", "Z")


def test_the_stamp_follows_the_clock_across_seconds():
    now = [1_764_594_374_999_999_000]
    stamp = logs.UtcStamp(clock=lambda: now[0])
    assert stamp() == "2025-12-01T13:06:14.999999Z"
    now[0] += 1_000
    assert stamp() == "2025-12-01T13:06:15Z"
    now[0] += 86_400 * 10**9 + 7_000
    assert stamp() == "2025-12-02T13:06:15.000007Z"


class InterruptedStream(io.StringIO):
    """Stdout whose first write is interrupted by SIGUSR1, as a SIGTERM can interrupt a write to a slow pipe:
    the signal's handler then runs in this thread while the log's flush holds its lock."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, text: str) -> int:
        if not self.interrupted:
            self.interrupted = True
            signal.raise_signal(signal.SIGUSR1)
        return super().write(text)


@pytest.mark.timeout(20)
def test_a_shutdown_signal_inside_a_log_write_neither_deadlocks_nor_loses_the_line(tmp_path):
    stream = InterruptedStream()
    logs.configure("INFO", stream=stream)
    gateway = create_app(make_settings(f"sqlite:///{tmp_path / 'gateway.db'}"), upstream=FakeUpstream()).gateway
    previous = signal.signal(signal.SIGUSR1, lambda *_: gateway.begin_drain())  # as GatewayServer.handle_exit does

    async def logged_then_flushed() -> None:
        structlog.get_logger("gateway").info("before.signal")  # flushed by the loop a moment later
        await asyncio.sleep(logs.Batched.FLUSH_EVERY_S * 4)

    try:
        asyncio.run(logged_then_flushed())
    finally:
        signal.signal(signal.SIGUSR1, previous)
    logs.configure("INFO", stream=io.StringIO())
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert stream.interrupted
    assert gateway.draining
    assert events == ["before.signal", "gateway.draining"]
