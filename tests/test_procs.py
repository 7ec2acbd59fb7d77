"""The process helpers shared by the e2e harness, the Redis helper and the benchmark."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.procs import Process, free_port, spawn, stop, wait_for, wait_http, wait_port

PY = sys.executable
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
)


def test_free_port_can_be_bound() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_spawn_appends_output_and_stderr_to_the_log_with_the_extra_environment(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("before\n")
    code = "import os, sys; print(os.environ['EXTRA']); print('err', file=sys.stderr)"
    proc = spawn([PY, "-c", code], log, {"EXTRA": "out"})
    assert proc.wait(10) == 0
    assert log.read_text().split() == ["before", "out", "err"]


def test_stop_returns_the_signal_that_ended_the_process() -> None:
    proc = spawn([PY, "-c", "import time; time.sleep(60)"], None)
    assert stop(proc, timeout=5) == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_the_signal(tmp_path: Path) -> None:
    process = Process([PY, "-c", IGNORE_TERM], tmp_path / "stubborn.log")
    process.start()
    wait_for(lambda: "up" in process.text(), "printing up", 10, process.proc)
    assert process.stop(timeout=0.3) == -signal.SIGKILL
    assert not process.alive() and process.stop() is None


def test_wait_fails_early_when_the_process_exits(tmp_path: Path) -> None:
    process = Process([PY, "-c", "raise SystemExit(3)"], tmp_path / "exits.log")
    process.start()
    with pytest.raises(RuntimeError, match=r"exited with 3 .*; see .*exits\.log"):
        process.wait_http(f"http://127.0.0.1:{free_port()}/", timeout=10)


def test_wait_times_out_when_nothing_answers() -> None:
    with pytest.raises(TimeoutError, match="accepting on port"):
        wait_port(free_port(), timeout=0.2)


def test_wait_http_returns_once_a_server_answers(tmp_path: Path) -> None:
    port = free_port()
    process = Process(
        [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)], tmp_path / "http.log"
    )
    process.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/missing", timeout=15, proc=process.proc)  # a 404 is an answer
    finally:
        process.stop()
