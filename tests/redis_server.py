"""Throw-away Redis servers on free loopback ports, for the store tests and the e2e tests.

server = RedisServer()
url = server.start()        # "redis://127.0.0.1:<port>/0", answering PING
server.kill()               # crash it (SIGKILL); start() again brings it back on the same port
server.stop()

cluster = RedisClusterServers()   # three masters, every slot assigned (redis-cli --cluster create)
url = cluster.start()             # "redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>"

sentinel = SentinelServers()      # a master, a replica and three sentinels watching them
url = sentinel.start()            # "redis+sentinel://127.0.0.1:<s1>,...,127.0.0.1:<s3>/gateway/0"
sentinel.master                   # the RedisServer that is master now (it changes with a failover)
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
    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = args
        self._dir = Path(tempfile.mkdtemp(prefix="thg-redis-"))
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10) -> str:
        binary = require_redis_server()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._proc = spawn(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self._dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self._dir / "redis.log"),
                *self.args,
            ],
            None,
        )
        try:
            wait_for(self.answers, "answering PING", timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            log = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port} ({exc}):\n{log}") from None
        return self.url

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
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


def command(port: int, *args: str) -> str:
    """One command through redis-cli, its answer as text."""
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def info(port: int, *args: str) -> dict[str, str]:
    """INFO (or CLUSTER INFO, SENTINEL ...) lines of `field:value` as a dict."""
    lines = command(port, *args).splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def _pairs(text: str) -> dict[str, str]:
    """redis-cli's rendering of a flat name/value reply (SENTINEL MASTER) as a dict."""
    lines = text.splitlines()
    return dict(zip(lines[::2], lines[1::2], strict=False))


class RedisClusterServers:
    """Three `redis-server --cluster-enabled yes` nodes made one cluster by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer() for _ in range(masters)]
        for node in self.nodes:
            node.args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node._dir / "nodes.conf"),
                "--cluster-port",
                str(free_port()),
                "--cluster-node-timeout",
                "2000",
            )
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30) -> str:
        for node in self.nodes:
            node.start()
        try:
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=True,
            )
            wait_for(self._ok, "the cluster's state is ok on every node", timeout_s)
        except (subprocess.SubprocessError, RuntimeError, TimeoutError):
            self.stop()
            raise
        return self.url

    def _ok(self) -> bool:
        return all(info(n.port, "cluster", "info").get("cluster_state") == "ok" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def require_redis_sentinel() -> str:
    """The binary's path; without one, fail on CI (CI=true) and skip elsewhere."""
    path = shutil.which("redis-sentinel")
    if path is None:
        message = "redis-sentinel is not on PATH (apt-get install redis-sentinel)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class SentinelServers:
    """A master, a replica of it and three sentinels (quorum 2) that fail over half a second after the
    master stops answering."""

    MASTER_NAME = "gateway"

    def __init__(self, down_after_ms: int = 500) -> None:
        self.servers = [RedisServer(), RedisServer()]
        self.servers[1].args = ("--replicaof", "127.0.0.1", str(self.servers[0].port))
        self.ports = [free_port() for _ in range(3)]
        self.down_after_ms = down_after_ms
        self._dir = Path(tempfile.mkdtemp(prefix="thg-sentinel-"))
        self._procs: list[subprocess.Popen] = []
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{self.MASTER_NAME}/0"

    def start(self, timeout_s: float = 30) -> str:
        binary = require_redis_sentinel()
        for server in self.servers:
            server.start()
        for port in self.ports:
            conf = self._dir / f"sentinel-{port}.conf"
            conf.write_text(f"""port {port}
bind 127.0.0.1
dir {self._dir}
logfile {self._dir / f"sentinel-{port}.log"}
sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.servers[0].port} 2
sentinel down-after-milliseconds {self.MASTER_NAME} {self.down_after_ms}
sentinel failover-timeout {self.MASTER_NAME} 5000
""")
            self._procs.append(spawn([binary, str(conf)], None))
        try:
            wait_for(self._watching, "every sentinel knows the replica and the other sentinels", timeout_s)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self.url

    def _watching(self) -> bool:
        try:
            views = [_pairs(command(p, "sentinel", "master", self.MASTER_NAME)) for p in self.ports]
            linked = info(self.servers[1].port, "info", "replication").get("master_link_status") == "up"
        except subprocess.SubprocessError:
            return False
        return linked and all(v.get("num-slaves") == "1" and v.get("num-other-sentinels") == "2" for v in views)

    def healthy(self) -> bool:
        """Every sentinel names one master, which answers as one, and the other server is its replica,
        linked, and seen as up by every sentinel (so that a failover can pick it)."""
        try:
            named = {command(p, "sentinel", "get-master-addr-by-name", self.MASTER_NAME).split()[1] for p in self.ports}
            if len(named) != 1:
                return False
            master = int(named.pop())
            replica = next(s for s in self.servers if s.port != master)
            link = info(replica.port, "info", "replication")
            views = [command(p, "sentinel", "replicas", self.MASTER_NAME) for p in self.ports]
        except (subprocess.SubprocessError, IndexError, StopIteration):
            return False
        return (
            link.get("role") == "slave"
            and link.get("master_port") == str(master)
            and link.get("master_link_status") == "up"
            and all(str(replica.port) in v and "s_down" not in v and "disconnected" not in v for v in views)
        )

    @property
    def replica(self) -> RedisServer:
        master = self.master
        return next(s for s in self.servers if s is not master)

    @property
    def master(self) -> RedisServer:
        """The server the sentinels name as master now."""
        port = int(command(self.ports[0], "sentinel", "get-master-addr-by-name", self.MASTER_NAME).split()[1])
        return next(s for s in self.servers if s.port == port)

    def failed_over(self, old: RedisServer) -> bool:
        """Every sentinel names a master other than `old`, and that master says it is one."""
        try:
            named = {command(p, "sentinel", "get-master-addr-by-name", self.MASTER_NAME).split()[1] for p in self.ports}
            return (
                len(named) == 1
                and named != {str(old.port)}
                and info(int(named.pop()), "info", "replication").get("role") == "master"
            )
        except (subprocess.SubprocessError, IndexError):
            return False

    def stop(self) -> None:
        for proc in self._procs:
            stop(proc, signal.SIGTERM, 10)
        self._procs.clear()
        for server in self.servers:
            server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
