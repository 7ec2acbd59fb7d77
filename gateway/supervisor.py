"""`serve --workers N`: N gateway processes behind one listening socket, for a Redis store, which they
share as replicas do (SQLite's books live in one process).

The parent binds the port and supervises. Each worker is a fresh interpreter (multiprocessing's spawn)
that loads the same config file and serves the shared socket. The parent turns SIGTERM or SIGINT into a
drain of every worker (each drains as `serve` alone does), SIGHUP into a reload of every worker, and
restarts a worker that dies. POST /admin/reload is answered once every worker has reloaded; /metrics
answers for all of them (prometheus_client's multiprocess mode, in a directory the parent makes); a worker
whose parent dies drains and exits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import structlog
from prometheus_client import multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import logs
from gateway.config import load_settings
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.app import Gateway

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_PAUSE_S = 1.0  # a worker that keeps dying is restarted at most this often
PEER_RELOAD_TIMEOUT_S = 10.0
STOP_MARGIN_S = 5.0  # beyond the grace period, before a worker that has not exited is killed


class Supervisor:
    def __init__(self, settings: Settings, n: int, host: str, port: int) -> None:
        from gateway.serve import uvicorn_config

        self.settings = settings
        self.n = n
        self.host = host
        self.port = port
        # no app is loaded from this config ("" names none): it only binds the socket the workers share
        self.sock = uvicorn_config("", host, port, settings.server.shutdown_grace_s).bind_socket()
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: dict[Connection, BaseProcess] = {}  # the parent's end of a worker's pipe → its process
        self.pending: dict[Connection, set[Connection]] = {}  # a reload asker → workers still reloading
        self.log = structlog.get_logger("gateway.workers")
        self._signals: list[int] = []

    def run(self) -> int:
        made_dir = MULTIPROC_ENV not in os.environ
        if made_dir:
            os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="tokenhub-gateway-metrics-")
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self._signals.append(s))
        try:
            for _ in range(self.n):
                self._spawn()
            self.log.info("workers.started", workers=self.n, host=self.host, port=self.port)
            self._supervise(wake_r)
            return self._stop_all()
        finally:
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
            self.sock.close()
            if made_dir:
                shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)

    def _spawn(self) -> None:
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=run_worker,
            name="gateway-worker",
            daemon=False,
            args=(self.settings.source, self.sock, self.host, self.port, theirs),
        )
        proc.start()
        theirs.close()
        self.workers[mine] = proc

    def _supervise(self, wake: socket.socket) -> None:
        while True:
            ready = wait([wake, *self.workers, *(p.sentinel for p in self.workers.values())])
            if wake in ready:
                wake.recv(4096)
            while self._signals:
                sig = self._signals.pop(0)
                if sig != signal.SIGHUP:
                    return
                self._tell(self.workers, ("reload",))
            for conn in [c for c in ready if c in self.workers]:
                self._message(conn)
            for conn, proc in list(self.workers.items()):
                if proc.sentinel in ready or not proc.is_alive():
                    self._exited(conn, proc)

    def _message(self, conn: Connection) -> None:
        try:
            kind, *_ = conn.recv()
        except (EOFError, OSError):
            return  # it is exiting: its sentinel says so
        if kind == "reload-others":
            others = {c for c in self.workers if c is not conn}
            self.pending[conn] = others
            self._tell(others, ("reload",))
        elif kind == "reloaded":
            for waiting in self.pending.values():
                waiting.discard(conn)
        self._answer_reloads()

    def _answer_reloads(self) -> None:
        for asker, waiting in list(self.pending.items()):
            if not waiting:
                del self.pending[asker]
                self._tell([asker], ("others-reloaded",))

    def _tell(self, conns: Iterable[Connection], message: tuple[str, ...]) -> None:
        for conn in list(conns):
            try:
                conn.send(message)
            except OSError:
                pass  # it is exiting: its sentinel says so

    def _exited(self, conn: Connection, proc: BaseProcess) -> None:
        proc.join()
        del self.workers[conn]
        conn.close()
        self.pending.pop(conn, None)
        for waiting in self.pending.values():
            waiting.discard(conn)
        self._answer_reloads()
        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
        self.log.warning("worker.exited", pid=proc.pid, exit_code=proc.exitcode)
        time.sleep(RESTART_PAUSE_S)
        self._spawn()

    def _stop_all(self) -> int:
        """Every worker drains (SIGTERM); one still running after the grace period is killed. The parent's
        copy of the listening socket is closed first: once the workers close theirs, new connections are
        refused (a socket still listening in the parent would take them in, and no worker would answer)."""
        self.sock.close()
        for proc in self.workers.values():
            proc.terminate()
        deadline = time.monotonic() + self.settings.server.shutdown_grace_s + STOP_MARGIN_S
        for proc in self.workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        codes = [p.exitcode for p in self.workers.values()]
        self.log.info("workers.stopped", exit_codes=codes)
        # -SIGTERM: a worker still starting, with nothing to drain
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


class Peers:
    """A worker's side of its pipe to the parent: the parent's reload requests, and the others' reload
    for this worker's POST /admin/reload. A closed pipe means the parent died: this worker drains."""

    def __init__(self, conn: Connection, gateway: Gateway) -> None:
        self.conn = conn
        self.gateway = gateway
        self.loop: asyncio.AbstractEventLoop | None = None
        self._asked: asyncio.Future[None] | None = None
        self._send_lock = threading.Lock()
        threading.Thread(target=self._listen, name="gateway-peers", daemon=True).start()

    def _send(self, message: tuple[str, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _listen(self) -> None:
        while True:
            try:
                kind, *_ = self.conn.recv()
            except (EOFError, OSError):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if kind == "reload":
                self._reload()
                self._send(("reloaded",))
            elif kind == "others-reloaded" and self.loop is not None and self._asked is not None:
                self.loop.call_soon_threadsafe(self._confirm, self._asked)

    @staticmethod
    def _confirm(asked: asyncio.Future[None]) -> None:
        if not asked.done():
            asked.set_result(None)

    def _reload(self) -> None:
        """Reload this worker's config on its event loop (before it serves, it has just read it)."""
        if self.loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.gateway.reload(), self.loop).result(PEER_RELOAD_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the pipe must keep being read whatever a reload does
            structlog.get_logger("gateway.workers").exception("workers.reload_failed")

    async def reload_others(self) -> None:
        self._asked = asyncio.get_running_loop().create_future()
        self._send(("reload-others",))
        try:
            await asyncio.wait_for(self._asked, PEER_RELOAD_TIMEOUT_S)
        except TimeoutError:
            structlog.get_logger("gateway.workers").warning(
                "workers.reload_unconfirmed", timeout_s=PEER_RELOAD_TIMEOUT_S
            )


class ReloadEverywhere:
    """ASGI: a POST /admin/reload that this worker answers 200 (token checked, config taken) is sent on
    once every other worker has reloaded too."""

    def __init__(self, app: ASGIApp, peers: Peers) -> None:
        self.app = app
        self.peers = peers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.peers.loop = asyncio.get_running_loop()
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/admin/reload":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        if held and held[0].get("status") == 200:
            await self.peers.reload_others()
        for message in held:
            await send(message)


def run_worker(source: str, sock: socket.socket, host: str, port: int, conn: Connection) -> None:
    """One worker: the config the parent checked, read again here; the parent's socket."""
    from gateway.app import create_app
    from gateway.serve import GatewayServer, run_until_signalled, tune_gc, uvicorn_config

    settings = load_settings(source)
    logs.configure()
    app = create_app(settings)
    gateway = app.gateway
    cfg = uvicorn_config(
        ReloadEverywhere(app, Peers(conn, gateway)),
        host,
        port,
        settings.server.shutdown_grace_s,
        settings.server.header_timeout_s,
        settings.server.body_timeout_s,
    )
    tune_gc()
    run_until_signalled(GatewayServer(cfg, gateway.begin_drain), sockets=[sock])
