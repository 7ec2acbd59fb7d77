"""A throw-away `redis-server` on a free loopback port, for the store tests and the e2e tests.

    server = RedisServer()
    url = server.start()        # "redis://127.0.0.1:<port>/0", answering PING
    server.kill()               # crash it (SIGKILL); start() again brings it back on the same port
    server.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.procs import free_port, spawn, stop, wait_for


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def require_redis_server() -> str:
    """The binary's path; without one, fail on CI (CI=true) and skip elsewhere."""
    path = redis_server_path()
    if path is None:
        message = "redis-server is not on PATH (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = Path(tempfile.mkdtemp(prefix="thg-redis-"))
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10) -> str:
        binary = require_redis_server()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._dir),
                            "--save", "", "--appendonly", "no", "--logfile", str(self._dir / "redis.log")], None)
        try:
            wait_for(self._answers, "answering PING", timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port} ({exc}):\n{log}") from None
        return self.url

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Crash the server: nothing is saved, the port is freed."""
        if self._proc:
            stop(self._proc, signal.SIGKILL, 10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers."""
        if self._proc:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self.resume()  # a frozen server would not act on SIGTERM
            stop(self._proc, signal.SIGTERM, 10)
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)
