"""moto's standalone S3-compatible server on a free loopback port, once per test run (the archive's tests).

Without `moto[server]` installed these tests fail on CI (CI=true) and are skipped elsewhere."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.procs import free_port, spawn, stop, wait_for

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def require_moto_server() -> None:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        message = 'moto\'s server is not installed (pip install "moto[server]")'
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(tempfile.mkdtemp(prefix="thg-moto-")) / "moto.log"
        self._proc = None

    def start(self) -> MotoServer:
        require_moto_server()
        self._proc = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], self._log)
        wait_for(self._answers, "answering", 30, self._proc)
        return self

    def _answers(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/moto-api/", timeout=1).status == 200
        except OSError:
            return False

    def bucket(self) -> str:
        """A new empty bucket."""
        name = "archive-" + uuid.uuid4().hex[:12]
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/{name}", method="PUT"), timeout=10)
        return name

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
