"""What the gateway keeps, and the operations every store implements atomically."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from gateway.errors import RecordRejected
from gateway.policy.keyhealth import KeyHealth
from gateway.policy.quota import Counters, RateState, Rejection, Subject
from gateway.settings import UpstreamKey
from gateway.store.budget import BudgetCheck
from gateway.store.outbox import Item, Outbox
from gateway.store.sessions import ConsoleSession
from gateway.tenancy import ApiKey, AuditDraft, AuditEntry, Roster, RosterChanges, TeamRecord, UserRecord

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
ROSTER_CHANGES_MAX = 10_000  # records one roster_changes_since answer carries at most


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


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    """Which ledger rows a figure or a listing covers: created in [since, until), of this team, user, model."""

    since: float | None = None
    until: float | None = None
    team: str | None = None
    user: str | None = None
    model: str | None = None


GROUP_BY = ("team", "user", "model", "day")  # day: the UTC date of created_at, as YYYY-MM-DD


@dataclass(slots=True)
class Group:
    """One row of a grouped ledger figure. Rows of status create_failed are never counted."""

    key: str  # the team, user, model or day the row sums
    tasks: int = 0
    succeeded: int = 0
    failed: int = 0  # failed, cancelled or expired
    in_flight: int = 0  # not yet settled
    billed_ms: int = 0
    cost_micros: int = 0
    reserved_micros: int = 0  # the estimates of the rows in flight


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
        self,
        rid: str,
        now: float,
        reply: tuple[int, bytes] | None,
        items: Sequence[Item] = (),
        alerts: BudgetCheck | None = None,
    ) -> Task:
        """A forwarded create whose outcome is unknown: its estimate becomes its cost (spent, flagged
        estimated), its slots are freed, and the idempotency claim is completed with `reply` (left
        claimed when None, so no retry pays twice). Only a pending create changes; any other row is
        answered as it is. NotFound when there is no such rid. The outbox `items` and `alerts` go with the change."""

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
        alerts: BudgetCheck | None = None,
    ) -> Task | None:
        """Replace the reservation by the actual cost exactly once; None when already settled.
        Applies whole or not at all: a figure out of range raises RecordRejected and changes nothing.
        The outbox `items` (outbox.py) are written in the same step, only by the call that settles, and so
        are the budget `alerts` (budget.py): the thresholds whose subject's spent figures reach them after
        this step, marked once per period, their events' items written, and put into alerts.reached."""

    async def resolve_unknown(
        self,
        ref: str,
        status: str,
        billed_ms: int,
        cost_micros: int,
        resolved_by: str,
        now: float,
        alerts: BudgetCheck | None = None,
    ) -> Task:
        """An operator's resolution of an `unknown` row (by task id or rid), once: its status becomes
        `status` (RESOLVED: `succeeded` or `voided`), its figures these (no longer an estimate), the
        spent counters move by the difference (`alerts` as settle's), and it keeps who resolved it and when.
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
    ) -> list[Task]:
        """Every matching row, stored bodies included, oldest first: for tests and small tools only
        (the gateway's routes and CLI use ledger_page and aggregate)."""

    async def ledger_page(self, flt: LedgerFilter, limit: int, after: str | None) -> tuple[list[Task], str | None]:
        """Up to `limit` matching rows (create_failed left out) oldest first, loaded without their stored
        final body (final_body and meta None), and the opaque cursor that continues after them (None at
        the end). Cost does not grow with the rows before the cursor."""

    async def aggregate(self, by: str, flt: LedgerFilter) -> list[Group]:
        """The matching rows grouped by `by` (GROUP_BY), sorted by key, computed in the store from
        per-day figures kept as tasks settle (exact for any since/until: whole UTC days come from the
        per-day figures, the partial days at either end from the rows). Rows pruned by retention stay
        counted; the result equals grouping ledger()'s rows as long as nothing was pruned."""

    async def prune(self, before: float, batch: int = 500) -> int:
        """Delete settled rows created before `before`, never an unsettled or `unknown` one, in short
        transactions (scripts) of at most `batch` rows each; the per-day figures keep them."""

    async def purge_idempotency(self, now: float) -> int: ...

    # key pool
    async def key_health(self, fresh: bool = False) -> dict[str, KeyHealth]:
        """The pool's shared health; `fresh` reads past any cache (what an operator is shown)."""

    async def save_key_health(self, name: str, health: KeyHealth) -> None: ...
    async def key_in_flight(self) -> dict[str, int]: ...

    # Roster: teams, users and gateway keys made through the admin API (gateway/tenancy.py, SPEC §15).
    # Every change below is one atomic step that writes the change, its one audit row (actor and at from the
    # AuditDraft; action, target, before and after from what it changes: tenancy's *_doc views, never a key's
    # value or hash) and moves the roster version on by one; a refused change writes nothing at all.
    # Not found is NotFound (code "not_found", param "name", "team", "user" or "id").

    async def get_team(self, name: str) -> TeamRecord | None: ...
    async def get_user(self, name: str) -> UserRecord | None: ...
    async def get_key(self, key_id: str) -> ApiKey | None: ...
    async def save_team(self, team: TeamRecord, audit: AuditDraft, create: bool) -> TeamRecord:
        """Create (`create`: Conflict when the store holds, or held and deleted, a team of that name) or change
        (NotFound when it holds none) a team: action team.create / team.update, target "team:NAME". Kept as given,
        but created_at is audit.at on a create and kept on a change, and updated_at is audit.at. Returns the
        record as kept. The config's teams are the caller's to check (a config name is not the store's)."""

    async def delete_team(self, name: str, audit: AuditDraft) -> TeamRecord:
        """Delete a team: action team.delete, `after` None. NotFound when the store holds no such team;
        TeamNotEmpty when a user of the store is in it (nothing changes). Its ledger rows are not touched.
        Returns the record deleted."""

    async def save_user(self, user: UserRecord, audit: AuditDraft, create: bool, team_in_store: bool) -> UserRecord:
        """Create or change a user as save_team does a team (Conflict / NotFound on its name; user.create /
        user.update, target "user:NAME"). With `team_in_store`, NotFound (param "team") unless the store holds
        user.team, checked in the same step (no user lands in a team being deleted); without it the team is
        the config's, the caller's to check. A user moved to another team takes its keys along (ApiKey.team)
        in the same step. Conflict (param "email") when another user holds its tenancy.email_key. A create
        revokes the keys left under its name (`after`: tenancy.created_doc)."""

    async def delete_user(self, name: str, audit: AuditDraft) -> tuple[UserRecord, list[ApiKey]]:
        """Delete a user and revoke every key of it not yet revoked (revoked_at = audit.at), in one step with one
        audit row: user.delete, `before` user_doc plus "api_keys": [{"id", "prefix"}] of the keys revoked.
        NotFound when the store holds no such user. Returns the record and the keys it revoked."""

    async def add_key(self, key: ApiKey, audit: AuditDraft, user_in_store: bool) -> ApiKey:
        """Keep a key made by tenancy.issue_key (its SHA-256; the value never reaches the store): action
        api_key.create, target "api_key:ID", `after` key_doc. Conflict when its id or its sha256 is held
        already. With `user_in_store`, NotFound (param "user") unless the store holds key.user, whose team the
        kept key takes; without it the user is the config's. Returns the key as kept."""

    async def revoke_key(self, key_id: str, audit: AuditDraft) -> ApiKey:
        """Revoke a key (revoked_at = audit.at): action api_key.revoke. Idempotent: a key revoked already is
        returned as it is, with no audit row and no version change. NotFound (param "id") for no such key."""

    async def list_keys(
        self, user: str | None, team: str | None, limit: int, after: str | None
    ) -> tuple[list[ApiKey], str | None]:
        """Keys of this user and/or team (None: any), revoked and expired ones included, ordered by id: up to
        `limit` with an id above `after`, and the id to pass as `after` next (None at the end). Indexed: a
        page's cost grows neither with other users' keys nor with the keys before the cursor."""

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        """Record when keys were last used, in bulk (one statement or pipeline): key id → a time the caller has
        rounded down to the minute. A key's last_used_at only moves forward; unknown ids are skipped. Not a
        change: no audit row, no version change."""

    async def record_audit(
        self,
        audit: AuditDraft,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> AuditEntry:
        """An audit row for a change outside the store (a reload: tenancy.CONFIG_RELOAD, target "config"),
        written as given. The roster version does not move."""

    async def audit_page(
        self,
        since: float | None,
        target: str | None,
        actor: str | None,
        limit: int,
        after: int | None,
        team: str | None = None,
    ) -> tuple[list[AuditEntry], int | None]:
        """Audit rows oldest first: at or after `since`, of exactly this target and actor, concerning `team` (by
        an index: tenancy.audit_teams) (None: any), with an id above `after`; up to `limit` of them, and the id
        to pass as `after` next (None at the end). A page may hold fewer than `limit` rows and still give a
        cursor (each page's scan is bounded): go on until None."""

    async def roster_version(self) -> int:
        """0 before any change, one more with every change (save_*, delete_*, add_key, revoke_key). Cheap: one
        GET on Redis, an int in memory on SQLite."""

    async def load_roster(self) -> Roster:
        """Every team and user of the store, and the keys neither revoked nor expired, as of one version."""

    def roster_pages(self) -> AsyncIterator[RosterChanges | None]:
        """load_roster in pages applied in turn (as changes are), for a caller to hold one page beside what it
        builds: teams and users, the live keys PAGE at a time, then the changes made meanwhile (the last page,
        at the roster's version). None: forget the pages so far, they start again (too much changed)."""

    async def roster_changes_since(self, version: int) -> RosterChanges | None:
        """What changed after `version`, up to the version returned with it. None when `version` is ahead of
        the store's (a store replaced or restored) or when more changed than one answer carries
        (ROSTER_CHANGES_MAX records): load_roster again."""

    async def check_budget(self, check: BudgetCheck, now: float) -> None:
        """The budget thresholds reached by what is spent now, as a settlement's `alerts` are (one atomic
        step; into check.reached): after a budget was lowered below what is already spent."""

    async def roster_wait(self, version: int, timeout_s: float) -> int:
        """The store's roster version as soon as it differs from `version`, else after timeout_s. On Redis a
        change made by any replica wakes it at once (PUBLISH on "<prefix>roster"), and the version is read
        again at the timeout in case a message was lost; on SQLite a change made through this store wakes it."""

    # Console (SPEC §16): sessions, kept in the store so that every replica knows them (sessions.py)

    async def save_session(self, session: ConsoleSession) -> None:
        """Keep a session until its expires_at (replacing one of the same id_sha256)."""

    async def get_session(self, id_sha256: str, now: float) -> ConsoleSession | None:
        """The session of this id's SHA-256, None when there is none or it has expired by `now`."""

    async def delete_session(self, id_sha256: str) -> None:
        """End a session (sign-out); nothing happens for an id with no session."""

    async def unknown_tasks(self, limit: int) -> list[Task]:
        """The `unknown` rows waiting for an operator's decision (SPEC §4), newest first, at most `limit`, without
        their stored final body. On Redis only the newest sessions.UNKNOWN_SCAN rows of the ledger are looked at."""
