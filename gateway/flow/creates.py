"""Creates: validation is done; here the admission (quotas, the durable pending record), the key
tries, the forward and the recording of the task. Polls, cancels and settlement live in polls.py and
settlement.py; routes and the background poller both come through these."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog
from cachetools import LRUCache

from gateway import tokenhub
from gateway.context import Outcome, RequestContext
from gateway.errors import (
    ConnectFailed,
    DuplicateTaskId,
    GatewayError,
    IdempotencyConflict,
    PermissionDenied,
    RecordRejected,
    StoreUnavailable,
    UpstreamError,
)
from gateway.flow.settlement import Settlement
from gateway.ids import new_id
from gateway.metrics import Metrics
from gateway.money import micros_to_usd, seconds_to_ms
from gateway.policy import pricing
from gateway.policy.auth import model_allowed
from gateway.policy.quota import RateState, Subject, period_key, subjects_for
from gateway.policy.validation import VideoRequest
from gateway.settings import Settings, Team, UpstreamKey, User
from gateway.store.base import Admission, Store, Task
from gateway.upstream.calls import UpstreamCalls
from gateway.upstream.client import AnswerTooLarge, Reply
from gateway.upstream.keypool import KeyPool

T = TypeVar("T")
ErrorT = TypeVar("ErrorT", bound="GatewayError | None")
MAX_TASK_ID = 256
CUT_RECORD_S = 0.5  # at shutdown, for creates cut by the deadline to be recorded as unknown


class Tasks:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        calls: UpstreamCalls,
        pool: KeyPool,
        settlement: Settlement,
        metrics: Metrics,
        records: LRUCache[str, Task],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.calls = calls
        self.pool = pool
        self.settlement = settlement
        self.metrics = metrics
        self.records = records
        self.clock = clock
        self.log = structlog.get_logger("gateway.tasks")
        # Admissions refused with 503 before anything reached TokenHub, to undo once the store answers.
        self._abandoned: LRUCache[str, None] = LRUCache(maxsize=100_000)
        # rid → what record_created was to be given: task id, status, time, TokenHub's reply.
        self._unrecorded: LRUCache[str, tuple[str, str, float, tuple[int, bytes]]] = LRUCache(maxsize=100_000)
        self._background: set[asyncio.Task[Outcome]] = set()
        self._sent: set[str] = set()  # admissions whose create is on its way to TokenHub

    async def create(
        self,
        user: User,
        team: Team,
        fingerprint: str | None,
        raw: bytes,
        req: VideoRequest,
        idem_key: str | None,
        ctx: RequestContext,
        *,
        meta: bytes | None = None,
    ) -> Outcome:
        """`fingerprint`: the shape's own idempotency "same body"; `meta`: what the shape the create
        came in keeps with the task (opaque here)."""
        if not model_allowed(req.model, user, team):  # validate() already checked it is priced
            self.metrics.quota_rejections.labels(team.name, "model_not_allowed").inc()
            raise PermissionDenied(f"Model {req.model!r} is not allowed for this team or user.", param="model")
        body_hash = fingerprint if idem_key else None
        if idem_key:
            replay = await self._replay(team.name, idem_key, body_hash)
            if replay:
                return replay
        now = await self.store.now()  # the store's clock: replicas agree on periods and windows
        task = self._new_task(user, team, req, idem_key, now)
        task.meta = meta
        ctx.cost_usd = micros_to_usd(task.estimate_micros)
        subjects = subjects_for(user, team, now)
        keys, draw = self.pool.offer(req.model)
        rejection = await self._unsent(task, self.store.admit(Admission(task, subjects, body_hash, keys, draw), now))
        if rejection:
            self.metrics.quota_rejections.labels(team.name, rejection.reason).inc()
            rejection.error.extra_headers.update(await self.rate_headers(subjects, now))
            raise rejection.error
        # Shielded: a client that disconnects must not cancel a create already sent upstream.
        job = asyncio.create_task(self._forward_create(task, raw, ctx))
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        outcome = await asyncio.shield(job)
        outcome.headers.update(await self.rate_headers(subjects, now))
        return outcome

    def _new_task(self, user: User, team: Team, req: VideoRequest, idem_key: str | None, now: float) -> Task:
        est_ms, est_micros = pricing.estimate(
            self.settings.pricing, req.model, req.resolution, req.input_s, req.duration_s
        )
        return Task(
            rid=new_id(),
            team=team.name,
            user=user.name,
            model=req.model,
            resolution=req.resolution,
            duration_s=req.duration_s,
            input_ms=seconds_to_ms(req.input_s),
            input_estimated=req.input_estimated,
            estimate_ms=est_ms,
            estimate_micros=est_micros,
            team_period=period_key(team.limits.period, now),
            user_period=period_key(user.limits.period, now),
            created_at=now,
            updated_at=now,
            idem_key=idem_key,
            next_poll_at=now + self.settings.poller.interval_s,
        )

    async def _replay(self, team: str, idem_key: str, body_hash: str | None) -> Outcome | None:
        record = await self.store.idem_get(team, idem_key)
        if record is None:
            return None
        if record.body_hash != body_hash:
            raise IdempotencyConflict("This Idempotency-Key was already used with a different body.")
        if not record.done:
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still in flight.", code="idempotency_key_in_progress"
            )
        headers = {"Idempotent-Replayed": "true"}
        if record.status >= 400:  # the key answers the same every time: a blind retry only repeats this
            headers["x-should-retry"] = "false"
        return Outcome(record.status, record.body, headers)

    async def _forward_create(self, task: Task, raw: bytes, ctx: RequestContext) -> Outcome:
        try:
            return await self._try_keys(task, raw, ctx)
        except GatewayError as exc:
            ctx.error_code = exc.code
            return Outcome(exc.status, exc.json(), exc.headers())
        except BaseException as exc:  # cut by the shutdown deadline, or a bug
            if task.rid in self._sent:
                await self._unknown(
                    task, "shutdown" if isinstance(exc, asyncio.CancelledError) else "internal_error", None
                )
            else:
                await self.store.cancel_admission(task.rid)
            raise
        finally:
            self._sent.discard(task.rid)

    async def _try_keys(self, task: Task, raw: bytes, ctx: RequestContext) -> Outcome:
        unreachable: ConnectFailed | None = None
        # Closed here, not left to the loop: an async generator dropped unfinished costs a task to close it.
        async with contextlib.aclosing(self._keys(task)) as keys:
            async for key in keys:
                ctx.upstream_key = key.name
                self._sent.add(task.rid)
                try:
                    reply = await self.calls.call(key, tokenhub.CREATE_ROUTE, "POST", tokenhub.CREATE_ROUTE, raw, ctx)
                except ConnectFailed as exc:
                    self._sent.discard(task.rid)
                    await self._unsent(task, self.store.release_key(task.rid))
                    unreachable = exc
                    continue  # nothing reached TokenHub: the next key may
                except UpstreamError as exc:  # timed out, cut off or too large: TokenHub may have made the task
                    raise await self._unknown(task, _unknown_reason(exc), exc) from None
                if tokenhub.outcome_of(reply.status) in (tokenhub.KEY_REJECTED, tokenhub.THROTTLED):
                    self._sent.discard(task.rid)
                    await self._unsent(task, self.store.release_key(task.rid))
                    unreachable = None  # TokenHub is up; it is the keys that cannot take this create
                    continue
                outcome = await self._created(task, key.name, reply)
                ctx.task_id = task.task_id
                return outcome
        await self._unsent(task, self.store.cancel_admission(task.rid))  # certainly nothing was created upstream
        raise unreachable or await self.pool.no_key_error(task.model)

    async def _keys(self, task: Task) -> AsyncGenerator[UpstreamKey, None]:
        """The keys to try, each with its slot taken: the one the admission took (a store that chooses
        with the admission names it in task.key_name), then the pool's other candidates."""
        first = self.pool.key_for(task.key_name)
        if first is not None:
            yield first
        for key in await self._unsent(task, self.pool.candidates(task.model)):
            if key is not first and await self._unsent(
                task, self.store.acquire_key(task.rid, key.name, key.max_concurrent_tasks)
            ):
                yield key

    async def _unsent(self, task: Task, step: Awaitable[T]) -> T:
        """A store step taken while nothing of this create has reached TokenHub. When it fails, the
        admission may still be written (a slow Redis runs the admit after the gateway gave up, or its
        reply was lost): it is undone later, so a refused create never holds a reservation or gets charged."""
        try:
            return await step
        except StoreUnavailable:
            self._abandoned[task.rid] = None
            raise

    async def catch_up(self) -> None:
        """Once the store answers again: undo the admissions of creates refused for a store failure,
        and record the tasks TokenHub created while the store was away (raises while it still is).
        A record refused for a reason of its own is settled as unknown; it never blocks the others."""
        for rid in list(self._abandoned):
            await self.store.cancel_admission(rid)
            self._abandoned.pop(rid, None)
        for rid, (task_id, status, now, reply) in list(self._unrecorded.items()):
            try:
                await self.store.record_created(rid, task_id, status, now, reply)
            except (DuplicateTaskId, RecordRejected) as exc:
                task = await self.store.get_record(rid)
                if task is not None:
                    await self._unknown(
                        task, "duplicate_id" if isinstance(exc, DuplicateTaskId) else "record_rejected", exc
                    )
            self._unrecorded.pop(rid, None)

    async def _unknown(self, task: Task, reason: str, err: ErrorT) -> ErrorT:
        """A forwarded create whose outcome the gateway cannot know: charged at its estimate and kept
        visible until an operator resolves it (SPEC §4). Its answer tells the client not to retry blindly."""
        if err is not None:
            err.unknown_outcome = True
        try:
            items = self.settlement.unknown_items(task)
            now = self.clock()
            check = self.settlement.budget_check(task, now)
            done = await self.store.mark_unknown(
                task.rid, now, (err.status, err.json()) if err is not None else None, items, check
            )
        except GatewayError as exc:  # the pending record stays; the poller expires it as unresolved
            self.log.error("task.unknown_unrecorded", rid=task.rid, reason=reason, error_code=exc.code)
            return err
        self.metrics.child(self.metrics.tasks_unknown, task.team, reason).inc()
        self.log.warning("task.unknown", rid=task.rid, team=task.team, user=task.user, reason=reason)
        self.settlement.settled(done)
        self.settlement.alerted(check)
        if items:
            self.settlement.on_outbox()
        return err

    async def _created(self, task: Task, key_name: str, reply: Reply) -> Outcome:
        now = self.clock()
        outcome = tokenhub.outcome_of(reply.status)
        if outcome == tokenhub.FAILED:
            raise await self._unknown(
                task, "server_error", UpstreamError(f"TokenHub answered {reply.status}.", code="upstream_server_error")
            )
        # What the client sees, and what its idempotency key replays, is scrubbed; the id is TokenHub's own.
        body = self.pool.scrub(reply.body)
        if outcome == tokenhub.REFUSED:
            await self.store.fail_create(task.rid, now, (reply.status, body))
            return Outcome(reply.status, body)
        data = _json(reply.body)
        task_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID:
            raise await self._unknown(
                task,
                "bad_response",
                UpstreamError("TokenHub's answer to the create had no usable task id.", code="upstream_bad_response"),
            )
        status = data.get("status") if data.get("status") in ("queued", "running") else "queued"
        try:
            await self.store.record_created(task.rid, task_id, status, now, (reply.status, body))
        except DuplicateTaskId as exc:  # never a way into another task, whoever owns it
            exc.message = "TokenHub answered the create with the id of a task the gateway already holds."
            raise await self._unknown(task, "duplicate_id", exc) from None
        except RecordRejected as exc:
            raise await self._unknown(task, "record_rejected", exc) from None
        except StoreUnavailable:
            # TokenHub made the task: the client must get its id, not a 503 that invites a paid retry.
            self._unrecorded[task.rid] = (task_id, status, now, (reply.status, body))
            self.log.warning("task.record_deferred", task_id=task_id, reason="store_unavailable")
        task.task_id = task_id
        task.key_name = key_name
        task.status = status
        self.records[task_id] = task
        self.metrics.child(self.metrics.tasks_created, task.team, task.model, task.resolution).inc()
        return Outcome(reply.status, body)

    async def rate_headers(self, subjects: tuple[Subject, ...], now: float | None = None) -> dict[str, str]:
        """The tightest requests-per-minute window among the subjects, as OpenAI's rate-limit headers
        (`now`: the store's time, when the caller already has it). Written out as a loop: it runs on
        every create."""
        tight: RateState | None = None
        try:
            for subject in subjects:
                rpm = subject.limits.requests_per_minute
                if rpm:
                    if now is None:
                        now = await self.store.now()
                    state = await self.store.rate_state(subject.scope, subject.name, rpm, now)
                    if tight is None or (state.remaining, state.limit) < (tight.remaining, tight.limit):
                        tight = state
        except StoreUnavailable:
            return {}
        if tight is None:
            return {}
        return {
            "x-ratelimit-limit-requests": str(tight.limit),
            "x-ratelimit-remaining-requests": str(tight.remaining),
            "x-ratelimit-reset-requests": f"{tight.reset_s:.3f}s",
        }

    async def drain(self, timeout: float) -> None:
        """Let forwarded creates finish for `timeout` seconds; those still waiting are cut and
        recorded as unknown (never as failed at $0)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(0.0, timeout))
        for job in list(self._background):
            job.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=CUT_RECORD_S)


def _unknown_reason(exc: UpstreamError) -> str:
    if isinstance(exc, AnswerTooLarge):
        return "too_large"
    return "timeout" if exc.status == 504 else "cut_off"


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
