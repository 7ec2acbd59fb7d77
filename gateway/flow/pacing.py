"""The background poller's pacing: a token bucket per upstream key (TokenHub limits each key's requests),
and the leased due tasks waiting for a free check slot, grouped by the key that will poll them."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

from gateway.settings import Settings
from gateway.store.base import PENDING, Task

BURST_S = 0.2  # a full bucket holds this many seconds' worth of polls: smooth, yet no stall after a pause
ROUNDING = 1e-9
HOLD_S = 1.0  # a key's queue holds what its budget polls in this long; the rest goes back to the store


class TokenBucket:
    """`rate` tokens a second, holding at most `burst` (and at least one): over any span of T seconds it
    gives at most burst + rate × T tokens."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * BURST_S)
        self._tokens = self.burst
        self._stamp = now

    def take(self, now: float) -> float:
        """0 when a token was taken; else the seconds until one will be there (nothing is taken)."""
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0 - ROUNDING:  # a wait it named, slept exactly, must be enough
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return (1.0 - self._tokens) / self.rate


class KeyBudgets:
    """A bucket per configured upstream key at `poller.max_polls_per_second`, so the poller's polls stay
    within that rate per key, and within that × the number of keys in all. Rebuilt when the keys or the
    rate change; a key kept by a reload keeps its bucket."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._applied: Settings | None = None

    def apply(self, settings: Settings, now: float) -> None:
        if settings is self._applied:
            return
        self._applied = settings
        rate = settings.poller.max_polls_per_second
        old = self._buckets
        self._buckets = {
            key.name: old[key.name] if key.name in old and old[key.name].rate == rate else TokenBucket(rate, now)
            for key in settings.upstream.keys
        }

    @property
    def keys(self) -> int:
        return len(self._buckets)

    def bucket(self, task: Task) -> TokenBucket | None:
        """The bucket a check of `task` draws from; None when the check asks TokenHub nothing (no task id
        yet, or a key no longer configured: it fails without a call)."""
        if task.status == PENDING or not task.task_id or task.key_name is None:
            return None
        return self._buckets.get(task.key_name)


class DueQueue:
    """Leased due tasks not yet checked, oldest due first within a key, served round robin across the keys
    whose budget allows a poll now, so one key out of budget never holds up the others. A key holds at most
    what its budget polls in HOLD_S: the rest is handed back, due when the budget will reach it, so the
    store's due order stays the order tasks can be polled in and another key's tasks are fetched in time."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[str | None, deque[tuple[float, Task]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, tasks: Iterable[Task], fetched_at: float, budgets: KeyBudgets) -> list[tuple[Task, float]]:
        """Queue `tasks`; those past their key's hold, with the seconds until its budget reaches them."""
        over: list[tuple[Task, float]] = []
        handed: Counter[str | None] = Counter()  # per key, the tasks handed back so far
        for task in tasks:
            waiting = self._by_key.setdefault(task.key_name, deque())
            bucket = budgets.bucket(task)
            if bucket is not None and len(waiting) >= bucket.burst + bucket.rate * HOLD_S:
                over.append((task, (len(waiting) + handed[task.key_name]) / bucket.rate))
                handed[task.key_name] += 1
                continue
            waiting.append((fetched_at, task))
            self._size += 1
        for key in [key for key, waiting in self._by_key.items() if not waiting]:
            del self._by_key[key]
        return over

    def take(self, budgets: KeyBudgets, now: float) -> tuple[Task | None, float]:
        """The next task whose key may be polled now; else None and the seconds until one may
        (0 when nothing waits)."""
        soonest = 0.0
        for key, waiting in self._by_key.items():
            bucket = budgets.bucket(waiting[0][1])
            wait = bucket.take(now) if bucket is not None else 0.0
            if wait == 0.0:
                return self._pop(key), 0.0
            soonest = wait if soonest == 0.0 else min(soonest, wait)
        return None, soonest

    def _pop(self, key: str | None) -> Task:
        waiting = self._by_key[key]
        task = waiting.popleft()[1]
        self._size -= 1
        if waiting:
            self._by_key.move_to_end(key)  # the next take starts with another key
        else:
            del self._by_key[key]
        return task

    def drop_fetched_before(self, moment: float) -> int:
        """Forget tasks fetched before `moment`: their lease is running out, and once it has another
        replica may lease them, so checking them now could poll twice. The store hands them out again."""
        dropped = 0
        for key in list(self._by_key):
            waiting = self._by_key[key]
            while waiting and waiting[0][0] < moment:
                waiting.popleft()
                dropped += 1
            if not waiting:
                del self._by_key[key]
        self._size -= dropped
        return dropped

    def drain(self) -> list[Task]:
        tasks = [task for waiting in self._by_key.values() for _, task in waiting]
        self._by_key.clear()
        self._size = 0
        return tasks
