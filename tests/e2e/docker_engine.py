"""A private Docker engine for the image tests, and a python:3.11-slim stand-in built from Debian's packages.

dockerd runs on its own socket, exec root and data root, without iptables or a bridge: containers share
the host's network and talk to processes on 127.0.0.1. No container registry is needed: the base image is
made by mmdebstrap and `docker import`ed. Between runs, the base's tarball is kept in CACHE under a hash of
its recipe, and the data root (with Docker's layer cache) is kept too, so a warm run rebuilds only what
changed. A second run while one holds the data root gets a throwaway data root instead of waiting.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("TOKENHUB_GATEWAY_TEST_CACHE", "/var/cache/tokenhub-gateway-test"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# The equivalent of python:3.11-slim: Debian 12's Python 3.11 with venv, useradd, and the host's CA
# bundle (so pip inside a build trusts what the host trusts). Changing any of it changes the cache key.
SUITE = "bookworm"
MMDEBSTRAP = [
    "--variant=essential",
    "--include=python3,python3-venv,passwd",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
    f'--customize-hook=mkdir -p "$1{HOST_CA.parent}" && cp {HOST_CA} "$1{HOST_CA}"',
]
IMPORT_CHANGES = ["ENV LANG=C.UTF-8", 'CMD ["python3"]']


def missing(what: str) -> None:
    """No engine: the test fails in CI and is skipped elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI needs a Docker engine: ./scripts/test installs Debian's docker.io)")
    pytest.skip(what)


def _program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        missing(f"{name} is not installed")
    return path


class Engine:
    def __init__(self) -> None:
        if os.geteuid() != 0:
            missing("a private dockerd needs root")
        self.dockerd, self.client, self.mmdebstrap = (_program(n) for n in ("dockerd", "docker", "mmdebstrap"))
        self.run_dir = Path(tempfile.mkdtemp(prefix="thg-dockerd-", dir="/tmp"))  # short: a socket lives here
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.run_dir / 'docker.sock'}",
            "DOCKER_CONFIG": str(self.run_dir / "client"),
            "DOCKER_BUILDKIT": "0",
        }
        self.proc: subprocess.Popen | None = None
        self.data_root, self.shared = self._claim_data_root()

    def _claim_data_root(self) -> tuple[Path, bool]:
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = open(CACHE / "docker.lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return CACHE / "docker", True
        except BlockingIOError:
            return Path(tempfile.mkdtemp(prefix="tokenhub-gateway-docker-", dir="/var/tmp")), False

    def start(self, timeout: float = 60.0) -> None:
        self.log = self.run_dir / "dockerd.log"
        args = [
            self.dockerd,
            "--host",
            self.env["DOCKER_HOST"],
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.run_dir / "exec"),
            "--pidfile",
            str(self.run_dir / "dockerd.pid"),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--log-level=warn",
            # Should it find a system containerd, its containers stay apart from the system engine's.
            "--containerd-namespace=tokenhub-gateway-test",
            "--containerd-plugins-namespace=tokenhub-gateway-test-plugins",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dockerd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.client, *args],
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def inspect(self, name: str, template: str) -> str:
        return self.docker("inspect", "--format", template, name).stdout.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containerd and containers itself
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        # dockerd leaves the host's network namespace bind-mounted in its exec root.
        netns = self.run_dir / "exec" / "netns" / "default"
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False, timeout=30)
        if not self.shared:
            shutil.rmtree(self.data_root, ignore_errors=True)
        self._lock.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def base_image(self) -> str:
        """The imported base, tagged by its recipe's hash: imported from the cached tarball, built if none."""
        recipe = json.dumps([SUITE, MMDEBSTRAP, IMPORT_CHANGES, hashlib.sha256(HOST_CA.read_bytes()).hexdigest()])
        key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        tag = f"tokenhub-gateway-test-base:{key}"
        if self.docker("image", "inspect", tag, check=False).returncode == 0:
            return tag
        tarball = CACHE / f"base-{key}.tar"
        if not tarball.exists():
            self._debootstrap(tarball)
        changes = [a for c in IMPORT_CHANGES for a in ("--change", c)]
        self.docker("import", *changes, str(tarball), tag, timeout=300)
        return tag

    def _debootstrap(self, tarball: Path) -> None:
        partial = tarball.with_name(f"partial-{os.getpid()}-{tarball.name}")
        result = subprocess.run(
            [self.mmdebstrap, "--format=tar", *MMDEBSTRAP, SUITE, str(partial)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        assert result.returncode == 0, f"mmdebstrap failed:\n{result.stderr[-3000:]}"
        for old in CACHE.glob("base-*.tar"):
            old.unlink()  # a superseded recipe's tarball
        partial.rename(tarball)
