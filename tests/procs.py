"""Child processes on loopback, for the tests and the benchmark: a free port, a command started with its
output in a log file, waits for a port or an HTTP answer, and a stop with a signal and a timeout.

Standard library only, because bench/run.py imports it too and runs without the test dependencies.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

POLL_S = 0.05


def free_port() -> int:
    """A loopback port nothing listens on right now (chosen by the kernel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(
    args: list[str], log: Path | None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start args with stdout and stderr appended to log (None: discarded). The child gets a session of its
    own, so a Ctrl-C meant for the parent does not reach it: the parent stops it, and reads the log."""
    with open(log if log is not None else os.devnull, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Send sig, wait up to timeout, then SIGKILL; the exit code (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_for(ready: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ready() until it is true; fail early if proc exits meanwhile. `what` completes "before …"."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {what}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} within {timeout} s")
        time.sleep(POLL_S)


def answers_http(url: str, timeout: float = 2.0) -> bool:
    """A GET of url answers below 500: the server is up (a 4xx still is an answer)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    wait_for(lambda: answers_http(url), f"answering {url}", timeout, proc)


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    wait_for(lambda: accepts(port), f"accepting on port {port}", timeout, proc)


class Process:
    """A command with its output appended to a log file; start() and stop() may alternate (a restart
    appends to the same log)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.args = args
        self.log_path = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = spawn(self.args, self.log_path, self.env, self.cwd)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, url: str, timeout: float = 15.0) -> None:
        """wait_http() for this process; a failure names its log."""
        try:
            wait_http(url, timeout, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}; see {self.log_path}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """The exit code, or None when it was not running."""
        if self.proc is None:
            return None
        code, self.proc = stop(self.proc, sig, timeout), None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def text(self) -> str:
        return self.log_path.read_text()
