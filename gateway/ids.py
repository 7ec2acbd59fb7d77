"""Unique ids without a system call per id: a random per-process prefix and a counter.

Unique across processes and restarts (the prefix is 64 random bits), which is all request ids and
reservation ids need; they are not secrets."""

from __future__ import annotations

import itertools
import os


class IdSource:
    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):012x}"


new_id = IdSource()
