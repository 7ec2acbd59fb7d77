"""The one structlog configuration: JSON lines on stdout, uvicorn's own messages included."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

import orjson
import structlog

_SECRET_HEADERS = ("authorization",)


def _drop_secrets(_: object, __: str, event: dict) -> dict:
    for name in _SECRET_HEADERS:
        event.pop(name, None)
    return event


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str).decode()


class TurnFlushed:
    """A stream whose flush, on the event loop, waits for the end of the loop's turn: the lines of
    every request finished in one turn leave in one write, not one write each. Elsewhere (start-up,
    other threads, shutdown) a flush is immediate."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.write = stream.write
        self._pending = False

    def flush(self) -> None:
        if self._pending:
            return
        loop = asyncio._get_running_loop()
        if loop is None:
            self._stream.flush()
            return
        self._pending = True
        loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._pending = False
        self._stream.flush()


def configure(level: str = "INFO") -> None:
    """Configure once at start-up; every other module calls structlog.get_logger()."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=_dumps)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(TurnFlushed(sys.stdout)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=_dumps)],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the gateway writes its own request line


def uvicorn_log_config() -> dict:
    """Hand uvicorn a config that keeps our root handler (so its lines are JSON too)."""
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {"uvicorn": {"level": "INFO"}, "uvicorn.error": {"level": "INFO"},
                        "uvicorn.access": {"level": "WARNING"}}}
