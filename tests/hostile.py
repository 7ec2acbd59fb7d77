"""A hostile TokenHub of our own, and a canary: small loopback servers whose every answer a test scripts.

`HostileTokenHub` speaks just enough of TokenHub's API for the gateway: a create answers the next scripted task's
id, a poll answers that task's status and result URLs. Its other paths serve what a test scripts with `serve`
(files of any size, cut or stalled bodies, any status and headers) and `redirect` (a Location to anywhere: the
canary, another scheme, a chain). Everything runs on one event loop in a thread of the test process, so a
test scripts plain Python objects; raw HTTP/1.1, written by hand, so an answer can be as wrong as a test wants.

`Canary` is a TCP server (on 127.0.0.2 by default) that records every connection made to it and answers a
small 200: a test that must not reach it asserts `canary.connections == []`.

Start each once per module with a fixture, and `reset()` between tests:

    @pytest.fixture(scope="module")
    def hub() -> Iterator[HostileTokenHub]:
        with HostileTokenHub() as server:
            yield server

Standard library only; the answers are bounded (a stall ends after `stall_s`, a server stops with its fixture).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

API = "/api/v1/videos/generations"
HEAD_LIMIT = 64 * 1024
SEND_CHUNK = 64 * 1024
DEFAULT_VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16  # 4 KiB and a bit: a small "mp4"


@dataclass
class Reply:
    """One scripted HTTP answer.

    `content_length`: the Content-Length sent (None: the body's real length; -1: no header, the body ends
    with the connection). `cut_after`: close the connection after this many body bytes. `stall_after`: after
    this many body bytes send nothing more for `stall_s` seconds, then close. `delay_s`: wait before answering.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 30.0
    delay_s: float = 0.0


@dataclass
class Request:
    """One request the server received: its method, path (with the query) and headers (names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class ScriptedTask:
    """What a poll of this task answers: `status`, and when it succeeded the result URLs and usage.
    `answer` (raw bytes) replaces the whole poll answer when set; `create` replaces the create's answer."""

    id: str
    status: str = "succeeded"
    video_url: str | None = None
    cover_url: str | None = None
    usage: dict[str, Any] = field(default_factory=lambda: {"video_duration": 5})
    answer: bytes | None = None
    create: Reply | None = None

    def poll_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "object": "video.generation.task", "status": self.status}
        if self.status == "succeeded":
            links = {"video_url": self.video_url, "cover_image_url": self.cover_url}
            body["data"] = [{name: url for name, url in links.items() if url is not None}]
            body["usage"] = self.usage
        return body


class LoopServer:
    """An asyncio server on its own event loop in a daemon thread; `start`/`stop` or a `with` block."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{type(self).__name__}", daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._connected, self.host, 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._call(_cancel_connections(self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> LoopServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def _cancel_connections(loop: asyncio.AbstractEventLoop) -> None:
    current = asyncio.current_task()
    for task in asyncio.all_tasks(loop):
        if task is not current:
            task.cancel()


class Canary(LoopServer):
    """Records every connection (peer address and the first bytes it sent) and answers a small 200."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        super().__init__(host)
        self.connections: list[tuple[str, bytes]] = []

    def __enter__(self) -> Canary:
        self.start()
        return self

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            first = await asyncio.wait_for(reader.read(1024), 2)
        except TimeoutError:
            first = b""
        with self._lock:
            self.connections.append((str(peer), first))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: video/mp4\r\nConnection: close\r\n\r\ncanary"
        )
        await _close(writer)


class HostileTokenHub(LoopServer):
    """TokenHub's two routes, scripted tasks, and any other path as scripted (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._ids = itertools.count(1)
        self._tasks: dict[str, ScriptedTask] = {}
        self._queued: list[ScriptedTask] = []
        self._routes: dict[str, Reply] = {}
        self.requests: list[Request] = []

    def __enter__(self) -> HostileTokenHub:
        self.start()
        return self

    def reset(self) -> None:
        """Forget scripted tasks, paths and the request log (task ids keep counting, so none repeats)."""
        with self._lock:
            self._tasks.clear()
            self._queued.clear()
            self._routes.clear()
            self.requests.clear()

    def next_task(self, **fields: Any) -> ScriptedTask:
        """Script the task the next create makes: any ScriptedTask field. Without a video_url it serves a small
        file of its own at /media/<id>.mp4. Returns the task, which a test may change later (its status...)."""
        task = ScriptedTask(id=fields.pop("id", f"cgt-hostile-{next(self._ids):06d}"), **fields)
        if task.video_url is None:
            task.video_url = self.serve(f"/media/{task.id}.mp4", Reply(body=DEFAULT_VIDEO))
        with self._lock:
            self._queued.append(task)
        return task

    def serve(self, path: str, reply: Reply) -> str:
        """Answer GETs of `path` (with or without a query) with `reply`; the URL to it."""
        with self._lock:
            self._routes[path] = reply
        return self.url + path

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """`path` redirects to `location` (anything: another host, scheme or path); the URL of `path`."""
        return self.serve(path, Reply(status=status, headers={"Location": location}))

    def redirect_chain(self, name: str, hops: int, target: str) -> str:
        """A chain of `hops` redirects, /<name>/1 → /<name>/2 → … → target; the URL of its first link."""
        links = [f"/{name}/{index}" for index in range(1, hops + 1)]
        for link, after in zip(links, [*(self.url + path for path in links[1:]), target], strict=True):
            self.redirect(link, after)
        return self.url + links[0]

    def hits(self, path: str) -> list[Request]:
        """The requests received for `path` (its query ignored)."""
        with self._lock:
            return [request for request in self.requests if request.path.split("?")[0] == path]

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await _read_request(reader):
                with self._lock:
                    self.requests.append(request)
                    reply = self._reply(request)
                await asyncio.sleep(reply.delay_s)
                if not await _send(writer, reply):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            await _close(writer)

    def _reply(self, request: Request) -> Reply:
        path = request.path.split("?")[0]
        if path in self._routes:
            return self._routes[path]
        if request.method == "POST" and path == API:
            return self._create()
        if request.method == "GET" and path.startswith(API + "/"):
            task = self._tasks.get(path.rsplit("/", 1)[1])
            if task is None:
                return _json(404, {"error": {"code": "ResourceNotFound", "message": "no such task"}})
            return Reply(body=task.answer) if task.answer is not None else _json(200, task.poll_body())
        return _json(404, {"error": {"code": "NotFound", "message": path}})

    def _create(self) -> Reply:
        task = self._queued.pop(0) if self._queued else None
        if task is None:
            return _json(500, {"error": {"code": "InternalError", "message": "no task scripted"}})
        self._tasks[task.id] = task
        if task.create is not None:
            return task.create
        return _json(200, {"id": task.id, "object": "video.generation.task", "status": "queued", "created": 0})


def _json(status: int, body: dict[str, Any]) -> Reply:
    return Reply(status=status, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > HEAD_LIMIT:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    return Request(method, path, headers)


async def _send(writer: asyncio.StreamWriter, reply: Reply) -> bool:
    """Write the answer; False when the connection must close after it."""
    headers = {"Connection": "keep-alive", **reply.headers}
    if reply.content_length != -1:
        headers["Content-Length"] = str(len(reply.body) if reply.content_length is None else reply.content_length)
    else:
        headers["Connection"] = "close"
    head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(head.encode("latin-1") + b"\r\n")
    stop_at = min([len(reply.body), *(at for at in (reply.cut_after, reply.stall_after) if at is not None)])
    for start in range(0, stop_at, SEND_CHUNK):
        writer.write(reply.body[start : min(start + SEND_CHUNK, stop_at)])
        await writer.drain()
    await writer.drain()
    if reply.stall_after is not None and reply.stall_after < len(reply.body):
        await asyncio.sleep(reply.stall_s)
        return False
    return stop_at == len(reply.body) and headers["Connection"] != "close"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
