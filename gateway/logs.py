"""The one structlog configuration: JSON lines on stdout, uvicorn's own messages included."""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor

_SECRET_HEADERS = ("authorization",)
_UTC = datetime.timezone.utc


def _drop_secrets(_: object, __: str, event: EventDict) -> EventDict:
    for name in _SECRET_HEADERS:
        event.pop(name, None)
    return event


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


class Batched:
    """Where structlog writes: lines are gathered in memory and leave in one write at most every
    FLUSH_EVERY_S (or once MAX_PENDING characters wait), not in one write each. Off the event loop
    (start-up, other threads) a line leaves at once; what waits is written at exit. A kill -9 can
    lose the last FLUSH_EVERY_S of lines; the ledger, not the log, is the durable record."""

    FLUSH_EVERY_S = 0.05
    MAX_PENDING = 256 * 1024

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._timer = False
        # Reentrant: a signal handler that logs runs in the thread it interrupted, maybe inside flush_now.
        self._lock = threading.RLock()
        atexit.register(self.flush_now)

    def write(self, text: str) -> None:
        with self._lock:
            self._lines.append(text)
            self._size += len(text)

    def flush(self) -> None:
        loop = asyncio._get_running_loop()
        if loop is None or self._size >= self.MAX_PENDING:
            self.flush_now()
        elif not self._timer:
            self._timer = True
            loop.call_later(self.FLUSH_EVERY_S, self.flush_now)

    def flush_now(self) -> None:
        if self._stream.closed:  # at exit, after whoever owned the stream closed it
            return
        with self._lock:
            self._timer = False
            lines = self._lines
            self._lines = []
            self._size = 0
            if lines:
                self._stream.write("".join(lines))
            self._stream.flush()


class UtcStamp:
    """What TimeStamper(fmt="iso", utc=True) writes, `datetime.now(utc).isoformat()` with a Z, from the
    same clock (floored to the microsecond): the date and time up to the second are formatted once a second."""

    __slots__ = ("_clock", "_second", "_prefix")

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        second, micro = divmod(self._clock() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, _UTC).isoformat()[:19]
        return f"{self._prefix}.{micro:06d}Z" if micro else self._prefix + "Z"  # isoformat drops .000000


_stamp = UtcStamp()
_info_out: Batched | None = None  # where info_line writes; None until configure() turns INFO lines on


def info_line(event: str, fields: dict[str, Any]) -> bool:
    """Write one INFO line exactly as the structlog chain below renders it (the fields, then event, level
    and timestamp), without running the chain: for the line written on every request. False when logging
    is not configured for INFO lines; the caller then logs through structlog."""
    out = _info_out
    if out is None:
        return False
    fields["event"], fields["level"] = event, "info"
    fields["timestamp"] = _stamp()
    out.write(_dumps(fields) + "\n")
    out.flush()
    return True


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure once at start-up; every other module calls structlog.get_logger().
    Lines go to `stream` (standard output by default)."""
    global _info_out
    # structlog's lines and the standard library's, in the order they were logged
    out = Batched(stream if stream is not None else sys.stdout)
    _info_out = out if logging.getLevelName(level) <= logging.INFO else None
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # structlog annotates the file as a TextIO, and calls only its write() and flush()
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # follow the root's level, whatever an earlier uvicorn config set
        logger.disabled = False
    logging.getLogger("uvicorn.access").disabled = True  # the gateway writes its own request line


def uvicorn_log_config() -> dict[str, Any]:
    """Hand uvicorn a config that keeps our root handler (so its lines are JSON too)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": "INFO"},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"level": "WARNING"},
        },
    }
