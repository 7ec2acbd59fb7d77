"""Failed console sign-ins counted per client address: past MAX_FAILURES within WINDOW_S an address is answered
429 without its credentials being looked at, until the window has passed since its last failure. Bounded: the
map forgets the oldest addresses past MAX_ADDRESSES (an attacker spraying addresses only dilutes its own
count) and each entry after WINDOW_S."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

MAX_FAILURES = 5
WINDOW_S = 900.0
MAX_ADDRESSES = 10_000


class SignInThrottle:
    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: TTLCache[str, int] = TTLCache(MAX_ADDRESSES, window_s, timer=clock)

    def retry_after(self, address: str) -> int:
        """Seconds this address must wait before its next attempt is looked at (0: go on)."""
        if self._failures.get(address, 0) < self.max_failures:
            return 0
        return int(self.window_s)

    def failed(self, address: str) -> None:
        self._failures[address] = self._failures.get(address, 0) + 1  # re-set: the window runs from now

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
