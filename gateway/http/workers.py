"""Worker processes for CPU-heavy work on a large request body, away from the event loop's process.

A parse holds the GIL from its start to its end (orjson: 0.15 s for a body of a million URLs), so a thread
would stall the event loop just the same. The body travels to a worker over a socket, written by a thread
straight from the bytes object: only the call and its result are pickled, because pickling the body would
copy it while holding the GIL (~40 ms for 32 MB here). Workers start on first use and are reused.

    python -m gateway.workers FD    a worker, serving calls on the connected socket FD until it closes
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar, cast

from gateway.errors import GatewayError

WORKER_NICENESS = 10  # a busy worker yields the CPU to the event loop's process
T = TypeVar("T")


class BodyWorkers:
    """fn(body, *args) in a worker process, at most `size` at once; fn's exception is raised to the caller."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._gate = asyncio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._closed = False

    async def run(self, fn: Callable[..., T], body: bytes, *args: Any) -> T:
        await self._gate.acquire()
        worker = self._idle.pop() if self._idle else _Worker()
        job = asyncio.ensure_future(asyncio.to_thread(worker.call, fn, body, args))
        job.add_done_callback(lambda done: self._returned(worker, done))
        try:  # shielded: a caller that goes away leaves the worker to finish, and to be reused
            ok, value = await asyncio.shield(job)
        except (OSError, EOFError):
            raise GatewayError("The body could not be checked; nothing was charged.") from None
        if not ok:
            raise value
        return cast(T, value)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().stop()

    def _returned(self, worker: _Worker, job: asyncio.Future[tuple[bool, Any]]) -> None:
        self._gate.release()
        if self._closed or job.cancelled() or job.exception() is not None:
            worker.stop()  # a worker that died or broke off mid-call is not trusted with another
        else:
            self._idle.append(worker)


class _Worker:
    """One worker process; used by one thread at a time."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None

    def call(self, fn: Callable[..., Any], body: bytes, args: tuple[Any, ...]) -> tuple[bool, Any]:
        if self.conn is None:
            self._start()
        assert self.conn is not None
        self.conn.send((fn, args))
        self.conn.send_bytes(body)
        reply: tuple[bool, Any] = self.conn.recv()
        return reply

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()  # an idle worker exits on its own when its socket closes
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        # the worker finds modules where this process does, so a pickled call names the same function
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.http.workers", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.conn = Connection(ours.detach())


def serve(fd: int) -> None:
    conn = Connection(fd)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    while True:
        try:
            fn, args = conn.recv()
            body = conn.recv_bytes()
        except (EOFError, OSError):
            return
        gc.disable()  # parsed JSON holds no cycles: collections during a large parse only double its time
        try:
            reply = (True, fn(body, *args))
        except Exception as exc:
            reply = (False, exc)
        finally:
            gc.enable()
        del body
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    from gateway.http.workers import serve as serve_calls  # by the package's name, as pickled calls refer to it

    serve_calls(int(sys.argv[1]))
