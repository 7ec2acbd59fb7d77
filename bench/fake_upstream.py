"""A fast fake TokenHub for the benchmark: raw asyncio (uvloop) HTTP/1.1 with keep-alive.

    POST /api/v1/videos/generations        → a queued task with a unique id (cgt-<run>-<counter>)
    GET  /api/v1/videos/generations/{id}   → a fixed running-task body for that id
    GET  /_stats                           → {"creates": N, "polls": N, "other": N}

No framework, no JSON encoder on the hot path: it must never be what the benchmark measures
(bench/run.py reports its own req/s, called directly, beside every proxy)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time

PREFIX = b"/api/v1/videos/generations"
MODEL = b"doubao-seedance-2.0-fast"


class Counts:
    creates = polls = other = 0


def response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class FakeTokenHub(asyncio.Protocol):
    run_tag = os.urandom(3).hex().encode()
    counter = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop > 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            line = bytes(self.buf[: self.buf.find(b"\r\n")])
            del self.buf[:total]
            method, path, _ = line.split(b" ", 2)
            self.transport.write(self.answer(method, path))

    def answer(self, method: bytes, path: bytes) -> bytes:
        now = str(int(time.time())).encode()
        if method == b"POST" and path == PREFIX:
            Counts.creates += 1
            FakeTokenHub.counter += 1
            task_id = b"cgt-" + self.run_tag + b"-" + str(FakeTokenHub.counter).encode()
            return response(
                b"200 OK",
                b'{"id":"'
                + task_id
                + b'","object":"video.generation.task","model":"'
                + MODEL
                + b'","status":"queued","created":'
                + now
                + b"}",
            )
        if method == b"GET" and path.startswith(PREFIX + b"/"):
            Counts.polls += 1
            task_id = path[len(PREFIX) + 1 :]
            return response(
                b"200 OK",
                b'{"id":"'
                + task_id
                + b'","object":"video.generation.task","model":"'
                + MODEL
                + b'","status":"running","created":'
                + now
                + b"}",
            )
        if method == b"GET" and path == b"/_stats":
            return response(
                b"200 OK", b'{"creates":%d,"polls":%d,"other":%d}' % (Counts.creates, Counts.polls, Counts.other)
            )
        Counts.other += 1
        return response(
            b"404 Not Found",
            b'{"error":{"message":"not found","type":"invalid_request_error","code":"not_found","param":null}}',
        )


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(FakeTokenHub, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
