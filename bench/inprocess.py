"""What a create costs the gateway's own code: the app driven in-process through ASGI, no sockets,
against a stub upstream that answers at once, with the real SQLite store and every feature of
`bench/run.py`'s gateway config. Prints CPU µs per create on the event-loop thread and on the others
(the SQLite writer), so a change to the hot path can be measured without HTTP in the way.

    taskset -c 0 python bench/inprocess.py [--creates 20000] [--concurrency 32] [--no-rpm] [--store redis://…]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_config import CREATE_PATH, USER_KEY, gateway_toml, upstream_key_env  # noqa: E402

from gateway import logs  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import load_settings  # noqa: E402
from gateway.serve import tune_gc  # noqa: E402
from gateway.upstream.client import Reply  # noqa: E402

BODY = (
    b'{"model": "doubao-seedance-2.0-fast", "prompt": "A red fox running through fresh snow", '
    b'"duration": 5, "resolution": "720p"}'
)
HEADERS = [
    (b"host", b"gateway"),
    (b"authorization", b"Bearer " + USER_KEY.encode()),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]


class StubUpstream:
    """TokenHub answering every create at once with a new task id."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        await asyncio.sleep(0)
        return Reply(200, b'{"id": "cgt-%d", "status": "queued"}' % next(self._ids), None, 0.0001)

    async def close(self) -> None:
        pass


async def create(app) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CREATE_PATH,
        "raw_path": CREATE_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": HEADERS,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent = False
    status = []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"a create answered {status}")


async def measure(app, creates: int, concurrency: int) -> None:
    async with app.router.lifespan_context(app):
        for _ in range(500):  # warm-up: caches, books, code paths
            await create(app)
        wall, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()

        async def worker(n: int) -> None:
            for _ in range(n):
                await create(app)

        await asyncio.gather(*(worker(creates // concurrency) for _ in range(concurrency)))
        n = creates // concurrency * concurrency
        wall, cpu, loop_cpu = (time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - loop_cpu)
    print(
        f"{n} creates, {concurrency} at a time: {n / wall:.0f}/s; CPU µs per create: "
        f"{cpu / n * 1e6:.1f} in all, {loop_cpu / n * 1e6:.1f} on the event loop, "
        f"{(cpu - loop_cpu) / n * 1e6:.1f} on other threads (the SQLite writer)",
        file=sys.stderr,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--creates", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--no-rpm", action="store_true", help="leave out requests_per_minute (bench/run.py's -norpm)")
    p.add_argument("--store", help="a store URL (e.g. redis://127.0.0.1:6379/0); default a fresh SQLite file")
    args = p.parse_args()
    os.environ.update(upstream_key_env())
    work = Path(tempfile.mkdtemp(prefix="tokenhub-inprocess-"))
    config = work / "gateway.toml"
    config.write_text(gateway_toml(1, 2, args.store or f"sqlite:///{work / 'gateway.db'}", rpm=not args.no_rpm))
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the log lines, written and thrown away
    logs.configure()
    app = create_app(load_settings(str(config)), upstream=StubUpstream(), run_poller=False)
    tune_gc()  # as `serve` does before it starts serving
    import uvloop

    uvloop.run(measure(app, args.creates, args.concurrency))


if __name__ == "__main__":
    main()
