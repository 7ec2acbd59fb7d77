"""What the gateway keeps, and the operations every store implements atomically."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

from gateway.errors import RecordRejected
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.quota import Counters, RateState, Rejection, Subject
from gateway.settings import UpstreamKey
from gateway.store.outbox import Item, Outbox

PENDING = "pending"
UNKNOWN = "unknown"  # forwarded, outcome unknown: charged at its estimate until an operator resolves it
VOIDED = "voided"  # an unknown create an operator found TokenHub never billed
RESOLVED = frozenset({"succeeded", VOIDED})  # what an operator's resolution makes of an unknown row
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired", "unresolved", UNKNOWN, VOIDED})
LIVE = frozenset({PENDING, "queued", "running"})
IDEM_TTL_S = 24 * 3600
# Every figure a store is given is an int in 0..MAX_FIGURE, and no counter grows past MAX_COUNTER:
# both stay exact in SQLite's int64 and in Lua's doubles (2^53).
MAX_FIGURE = 10**15
MAX_COUNTER = 2**53 - 1
MAX_RESOLVER = 100  # the length of a resolution's resolved_by


@dataclass(slots=True)
class Task:
    """One create: a durable pending record before forwarding, the upstream task after."""

    rid: str
    team: str
    user: str
    model: str
    resolution: str
    duration_s: int
    input_ms: int
    input_estimated: bool
    estimate_ms: int
    estimate_micros: int
    team_period: str
    user_period: str
    created_at: float
    status: str = PENDING
    task_id: str | None = None
    key_name: str | None = None
    idem_key: str | None = None
    billed_ms: int | None = None
    cost_micros: int | None = None
    cost_estimated: bool = False
    updated_at: float = 0.0
    settled_at: float | None = None
    next_poll_at: float = 0.0
    final_body: bytes | None = None
    meta: bytes | None = None  # opaque JSON written at admission by the shape the create came in
    deleted_at: float | None = None  # deleted in the OpenAI shape; kept in the ledger and the TokenHub shape
    resolved_by: str | None = None  # who resolved an unknown row (an operator's resolution), and when
    resolved_at: float | None = None

    @property
    def settled(self) -> bool:
        return self.settled_at is not None


TASK_FIELDS = tuple(f.name for f in fields(Task))


def check_figures(**figures: object) -> None:
    """Raise RecordRejected unless every figure is an int in 0..MAX_FIGURE (bool is not a figure)."""
    for name, value in figures.items():
        if type(value) is not int or not 0 <= value <= MAX_FIGURE:
            raise RecordRejected(f"The store refused {name}={value!r}: not a whole number in 0..{MAX_FIGURE}.")


def check_status(status: str) -> None:
    if status not in TERMINAL:
        raise RecordRejected(f"The store refused the status {status!r} for a settlement.")


def check_resolution(status: str, resolved_by: str) -> None:
    if status not in RESOLVED:
        raise RecordRejected(f"The store refused the status {status!r} for a resolution.")
    if not resolved_by or len(resolved_by) > MAX_RESOLVER:
        raise RecordRejected(f"The store refused resolved_by: 1 to {MAX_RESOLVER} characters.")


@dataclass(frozen=True, slots=True)
class Admission:
    task: Task
    subjects: tuple[Subject, ...]
    body_hash: str | None = None  # with task.idem_key: the canonical body's SHA-256
    # The upstream keys that may serve the task, for a store that takes a slot on one with the admission
    # (drawn as keypool.choose draws its first, with key_draw in [0, 1)); task.key_name then names it.
    keys: tuple[UpstreamKey, ...] = ()
    key_draw: float = 0.0


@dataclass(frozen=True, slots=True)
class IdemRecord:
    body_hash: str
    done: bool
    status: int = 0
    body: bytes = b""
    created_at: float = 0.0


@dataclass(slots=True)
class Usage:
    counters: Counters = field(default_factory=Counters)
    in_flight: int = 0


class Store(Outbox, Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached or written."""

    async def now(self) -> float:
        """The clock shared decisions use (the store server's, when there is one)."""

    # creates
    async def idem_get(self, team: str, key: str) -> IdemRecord | None: ...
    async def admit(self, adm: Admission, now: float) -> Rejection | None:
        """Check every subject's limits and, when all pass, atomically: write the pending task,
        reserve its estimate, count it in flight, note the rate event, claim the idempotency key
        (raising IdempotencyConflict when the key is already claimed)."""

    async def cancel_admission(self, rid: str) -> None:
        """Nothing was created upstream: undo all of admit, rate event and idempotency claim included."""

    async def acquire_key(self, rid: str, key_name: str, limit: int) -> bool: ...
    async def release_key(self, rid: str) -> None: ...
    async def record_created(self, rid: str, task_id: str, status: str, now: float, reply: tuple[int, bytes]) -> None:
        """The create's upstream task id, status and reply; a settled row is never reopened.
        DuplicateTaskId (nothing changed) when another row holds that task id."""

    async def fail_create(self, rid: str, now: float, reply: tuple[int, bytes] | None) -> None:
        """Forwarded, but no task to track: release the reservation and slots; keep the outcome for replay."""

    async def mark_unknown(
        self, rid: str, now: float, reply: tuple[int, bytes] | None, items: Sequence[Item] = ()
    ) -> Task:
        """A forwarded create whose outcome is unknown: its estimate becomes its cost (spent, flagged
        estimated), its slots are freed, and the idempotency claim is completed with `reply` (left
        claimed when None, so no retry pays twice). Only a pending create changes; any other row is
        answered as it is. NotFound when there is no such rid. The outbox `items` are written with the change."""

    # tasks
    async def get_task(self, task_id: str) -> Task | None: ...
    async def get_record(self, ref: str) -> Task | None:
        """A ledger row by its upstream task id, else by its rid (a create TokenHub gave no id)."""

    async def set_status(self, task_id: str, status: str, now: float) -> None: ...
    async def settle(
        self,
        task_id: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        estimated: bool,
        final_body: bytes | None,
        now: float,
        items: Sequence[Item] = (),
    ) -> Task | None:
        """Replace the reservation by the actual cost exactly once; None when already settled.
        Applies whole or not at all: a figure out of range raises RecordRejected and changes nothing.
        The outbox `items` (outbox.py) are written in the same step, only by the call that settles."""

    async def resolve_unknown(
        self, ref: str, status: str, billed_ms: int, cost_micros: int, resolved_by: str, now: float
    ) -> Task:
        """An operator's resolution of an `unknown` row (by task id or rid), once: its status becomes
        `status` (RESOLVED: `succeeded` or `voided`), its figures these (no longer an estimate), the
        spent counters move by the difference, and it keeps who resolved it and when (`now`).
        NotFound for no such row, TaskNotUnknown for a row of another status (one already resolved
        included); RecordRejected, changing nothing, for a status or figure out of range."""

    async def list_tasks(
        self,
        team: str,
        limit: int,
        after: str | None,
        status: str | None,
        order: str = "desc",
        include_deleted: bool = True,
    ) -> tuple[list[Task], bool]:
        """A page of the team's recorded tasks by creation ("desc": newest first, or "asc"), after the
        task `after` (in that order), and whether more follow."""

    async def mark_deleted(self, task_id: str, now: float) -> Task | None:
        """Mark a recorded task deleted (the first time counts); None when there is no such task."""

    async def due_tasks(self, now: float, limit: int, lease_s: float) -> list[Task]:
        """Unsettled tasks whose next poll is due, leased to this process for lease_s."""

    async def defer_poll(self, rid: str, next_at: float) -> None: ...
    async def backlog(self) -> int: ...

    # figures
    async def usage(self, subjects: tuple[Subject, ...]) -> list[Usage]: ...
    async def rate_state(self, scope: str, name: str, limit: int, now: float) -> RateState:
        """The subject's creates-per-minute window now (for the x-ratelimit-* headers)."""

    async def ledger(
        self, since: float | None, until: float | None, team: str | None, user: str | None, model: str | None
    ) -> list[Task]: ...
    async def prune(self, before: float) -> int: ...
    async def purge_idempotency(self, now: float) -> int: ...

    # key pool
    async def key_health(self, fresh: bool = False) -> dict[str, KeyHealth]:
        """The pool's shared health; `fresh` reads past any cache (what an operator is shown)."""

    async def save_key_health(self, name: str, health: KeyHealth) -> None: ...
    async def key_in_flight(self) -> dict[str, int]: ...
