"""Creates, polls, cancels and settlement: the glue between validation, quotas, the key pool,
the store and the upstream. Routes and the background poller both come through here."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import orjson
import structlog
from cachetools import LRUCache, TTLCache

from . import pricing
from .config import Settings, Team, User
from .errors import (
    GatewayError,
    IdempotencyConflict,
    NotFound,
    PermissionDenied,
    RateLimited,
    StoreUnavailable,
    UpstreamError,
)
from .ids import new_id
from .keypool import KeyPool, parse_retry_after
from .metrics import Metrics
from .middleware import RequestContext
from .pricing import micros_to_usd
from .quota import Subject, period_key
from .store.base import PENDING, Admission, Task
from .upstream import ConnectFailed, Reply, Upstream
from .validation import VideoRequest

CREATE_PATH = "/videos/generations"
POLL_COALESCE_S = 1.0
UPSTREAM_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
T = TypeVar("T")
_KEYISH = re.compile(rb"th-[A-Za-z0-9_\-]{6,}")


class Outcome:
    """What a route answers: a status and body bytes, plus extra headers."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


def canonical_hash(body: Any) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def scrub(body: bytes) -> bytes:
    """Nothing that looks like an upstream key leaves the gateway."""
    return _KEYISH.sub(b"th-***", body) if b"th-" in body else body


def subjects_for(user: User, team: Team, now: float) -> tuple[Subject, Subject]:
    return (Subject("user", user.name, period_key(user.limits.period, now), user.limits),
            Subject("team", team.name, period_key(team.limits.period, now), team.limits))


def team_subjects(settings: Settings, now: float) -> tuple[Subject, ...]:
    """Every configured team in its current period (for gauges and /admin/teams)."""
    return tuple(Subject("team", t.name, period_key(t.limits.period, now), t.limits)
                 for t in settings.teams.values())


def allowed_models(settings: Settings, user: User, team: Team) -> list[str]:
    return [m for m in settings.pricing if model_allowed(m, user, team)]


def model_allowed(model: str, user: User, team: Team) -> bool:
    return ((team.limits.models is None or model in team.limits.models)
            and (user.limits.models is None or model in user.limits.models))


class Tasks:
    def __init__(self, settings: Settings, store: Any, upstream: Upstream, pool: KeyPool,
                 metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.store, self.upstream, self.pool = settings, store, upstream, pool
        self.metrics, self.clock = metrics, clock
        self.log = structlog.get_logger("gateway.tasks")
        self._records: LRUCache[str, Task] = LRUCache(maxsize=10_000)  # owner and key never change
        self._final: LRUCache[str, bytes] = LRUCache(maxsize=20_000)
        self._recent: TTLCache[str, Outcome] = TTLCache(maxsize=50_000, ttl=POLL_COALESCE_S)
        self._polling: dict[str, asyncio.Future] = {}
        # Admissions refused with 503 before anything reached TokenHub, to undo once the store answers.
        self._abandoned: LRUCache[str, None] = LRUCache(maxsize=100_000)
        self._unrecorded: LRUCache[str, tuple] = LRUCache(maxsize=100_000)
        self._background: set[asyncio.Task] = set()

    # creates

    async def create(self, user: User, team: Team, body: dict, raw: bytes, req: VideoRequest,
                     idem_key: str | None, ctx: RequestContext) -> Outcome:
        if not model_allowed(req.model, user, team):  # validate() already checked it is priced
            self.metrics.quota_rejections.labels(team.name, "model_not_allowed").inc()
            raise PermissionDenied(f"Model {req.model!r} is not allowed for this team or user.",
                                   param="model")
        body_hash = canonical_hash(body) if idem_key else None
        if idem_key:
            replay = await self._replay(team.name, idem_key, body_hash)
            if replay:
                return replay
        now = await self.store.now()  # the store's clock: replicas agree on periods and windows
        task = self._new_task(user, team, req, idem_key, now)
        ctx.cost_usd = micros_to_usd(task.estimate_micros)
        subjects = subjects_for(user, team, now)
        rejection = await self._unsent(task, self.store.admit(Admission(task, subjects, body_hash), now))
        if rejection:
            self.metrics.quota_rejections.labels(team.name, rejection.reason).inc()
            rejection.error.extra_headers.update(await self.rate_headers(subjects, now))
            raise rejection.error
        # Shielded: a client that disconnects must not cancel a create already sent upstream.
        job = asyncio.ensure_future(self._forward_create(task, raw, ctx))
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        outcome = await asyncio.shield(job)
        outcome.headers.update(await self.rate_headers(subjects, now))
        return outcome

    def _new_task(self, user: User, team: Team, req: VideoRequest, idem_key: str | None,
                  now: float) -> Task:
        est_ms, est_micros = pricing.estimate(self.settings.pricing, req.model, req.resolution,
                                              req.input_s, req.duration_s)
        return Task(rid=new_id(), team=team.name, user=user.name, model=req.model,
                    resolution=req.resolution, duration_s=req.duration_s,
                    input_ms=pricing.seconds_to_ms(req.input_s), input_estimated=req.input_estimated,
                    estimate_ms=est_ms, estimate_micros=est_micros,
                    team_period=period_key(team.limits.period, now),
                    user_period=period_key(user.limits.period, now), created_at=now, updated_at=now,
                    idem_key=idem_key, next_poll_at=now + self.settings.poller.interval_s)

    async def _replay(self, team: str, idem_key: str, body_hash: str | None) -> Outcome | None:
        record = await self.store.idem_get(team, idem_key)
        if record is None:
            return None
        if record.body_hash != body_hash:
            raise IdempotencyConflict("This Idempotency-Key was already used with a different body.")
        if not record.done:
            raise IdempotencyConflict("A request with this Idempotency-Key is still in flight.",
                                      code="idempotency_key_in_progress")
        return Outcome(record.status, record.body, {"Idempotent-Replayed": "true"})

    async def _forward_create(self, task: Task, raw: bytes, ctx: RequestContext) -> Outcome:
        try:
            return await self._try_keys(task, raw, ctx)
        except GatewayError as exc:
            return Outcome(exc.status, orjson.dumps(exc.body()), exc.headers())
        except BaseException:
            await self.store.fail_create(task.rid, self.clock(), None)
            raise

    async def _try_keys(self, task: Task, raw: bytes, ctx: RequestContext) -> Outcome:
        unreachable: ConnectFailed | None = None
        for key in await self._unsent(task, self.pool.candidates(task.model)):
            if not await self._unsent(task, self.store.acquire_key(task.rid, key.name, key.max_concurrent_tasks)):
                continue
            ctx.upstream_key = key.name
            try:
                reply = await self._call(key.name, "create", "POST", CREATE_PATH, key.value.reveal(),
                                         raw, ctx)
            except ConnectFailed as exc:
                await self._unsent(task, self.store.release_key(task.rid))
                unreachable = exc
                continue  # nothing reached TokenHub: the next key may
            except UpstreamError as exc:
                await self.store.fail_create(task.rid, self.clock(), (exc.status, orjson.dumps(exc.body())))
                raise
            if reply.status in (401, 403, 429):
                await self._unsent(task, self.store.release_key(task.rid))
                unreachable = None  # TokenHub is up; it is the keys that cannot take this create
                continue
            outcome = await self._created(task, key.name, reply)
            ctx.task_id = task.task_id
            return outcome
        await self._unsent(task, self.store.cancel_admission(task.rid))  # certainly nothing was created upstream
        raise unreachable or await self.pool.no_key_error(task.model)

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
        and record the tasks TokenHub created while the store was away (raises while it still is)."""
        for rid in list(self._abandoned):
            await self.store.cancel_admission(rid)
            self._abandoned.pop(rid, None)
        for rid, created in list(self._unrecorded.items()):
            await self.store.record_created(rid, *created)
            self._unrecorded.pop(rid, None)

    async def _created(self, task: Task, key_name: str, reply: Reply) -> Outcome:
        now = self.clock()
        if reply.status >= 500:
            err = UpstreamError(f"TokenHub answered {reply.status}.", code="upstream_server_error")
            await self.store.fail_create(task.rid, now, (err.status, orjson.dumps(err.body())))
            raise err
        if reply.status >= 300:
            body = scrub(reply.body)
            await self.store.fail_create(task.rid, now, (reply.status, body))
            return Outcome(reply.status, body)
        data = _json(reply.body)
        task_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            err = UpstreamError("TokenHub's answer to the create had no task id.",
                                code="upstream_bad_response")
            await self.store.fail_create(task.rid, now, (err.status, orjson.dumps(err.body())))
            raise err
        status = data.get("status") if data.get("status") in ("queued", "running") else "queued"
        try:
            await self.store.record_created(task.rid, task_id, status, now, (reply.status, reply.body))
        except StoreUnavailable:
            # TokenHub made the task: the client must get its id, not a 503 that invites a paid retry.
            self._unrecorded[task.rid] = (task_id, status, now, (reply.status, reply.body))
            self.log.warning("task.record_deferred", task_id=task_id, reason="store_unavailable")
        task.task_id, task.key_name, task.status = task_id, key_name, status
        self._records[task_id] = task
        self.metrics.child(self.metrics.tasks_created, task.team, task.model, task.resolution).inc()
        return Outcome(reply.status, reply.body)

    async def _call(self, key_name: str, route: str, method: str, path: str, key: str,
                    body: bytes | None, ctx: RequestContext | None) -> Reply:
        try:
            reply = await self.upstream.call(method, path, key, body)
        except GatewayError as exc:
            self.metrics.upstream_requests.labels(key_name, route, str(exc.status)).inc()
            await self._report(key_name, None, exc.code)
            raise
        m = self.metrics
        m.child(m.upstream_requests, key_name, route, str(reply.status)).inc()
        m.child(m.upstream_duration, route).observe(reply.elapsed)
        if ctx is not None:
            ctx.upstream_s += reply.elapsed
            ctx.upstream_status = reply.status
        await self._report(key_name, reply.status, None, reply.retry_after)
        return reply

    async def _report(self, key_name: str, status: int | None, error: str | None,
                      retry_after: str | None = None) -> None:
        try:
            await self.pool.report(key_name, status, error, retry_after)
        except StoreUnavailable:
            pass  # key health is advisory; the request itself must not fail for it

    # polls and cancels

    async def owned(self, task_id: str, team: str) -> Task:
        task = self._records.get(task_id)
        if task is None:
            task = await self.store.get_task(task_id)
            if task is not None and task.task_id:
                self._records[task_id] = task
        if task is None or task.team != team or task.status == PENDING:
            raise NotFound(f"No task {task_id!r} for this team.", param="task_id")
        return task

    async def poll(self, task: Task, ctx: RequestContext) -> Outcome:
        final = self._final.get(task.task_id)
        if final is None and task.status in UPSTREAM_TERMINAL:
            stored = task if task.settled else await self.store.get_task(task.task_id)
            final = stored.final_body if stored is not None else None
            if final is not None:
                self._final[task.task_id] = final
        if final is not None:
            return Outcome(200, final)
        recent = self._recent.get(task.task_id)
        if recent is not None:
            return recent
        running = self._polling.get(task.task_id)
        if running is None:
            running = asyncio.ensure_future(self._poll_upstream(task, ctx))
            self._polling[task.task_id] = running
            running.add_done_callback(lambda _f, tid=task.task_id: self._polling.pop(tid, None))
        return await asyncio.shield(running)

    async def _poll_upstream(self, task: Task, ctx: RequestContext | None) -> Outcome:
        reply = await self._task_call(task, "poll", "GET", ctx)
        outcome = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[task.task_id] = outcome
        return outcome

    async def cancel(self, task: Task, ctx: RequestContext) -> Outcome:
        reply = await self._task_call(task, "delete", "DELETE", ctx)
        outcome = await self._after_reply(task, reply)
        if reply.status == 200:
            self._recent[task.task_id] = outcome
        return outcome

    async def _task_call(self, task: Task, route: str, method: str, ctx: RequestContext | None) -> Reply:
        key = self.pool.key_for(task.key_name)
        if ctx is not None:
            ctx.upstream_key = task.key_name
        if key is None:
            raise UpstreamError(f"The upstream key {task.key_name!r} that created this task is no "
                                "longer configured, so TokenHub cannot be asked about it.",
                                code="upstream_key_unknown")
        return await self._call(key.name, route, method, f"{CREATE_PATH}/{task.task_id}",
                                key.value.reveal(), None, ctx)

    async def _after_reply(self, task: Task, reply: Reply) -> Outcome:
        if reply.status == 429:
            raise RateLimited("TokenHub is rate-limiting polls of this task; retry later.",
                              retry_after=_retry_after_s(reply.retry_after))
        if reply.status in (401, 403):
            raise UpstreamError("TokenHub rejected the gateway's key for this task; it will be retried.",
                                code="upstream_key_rejected")
        if reply.status >= 500:
            raise UpstreamError(f"TokenHub answered {reply.status}.", code="upstream_server_error")
        if reply.status != 200:
            return Outcome(reply.status, scrub(reply.body))
        data = _json(reply.body)
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            raise UpstreamError("TokenHub's answer had no task status.", code="upstream_bad_response")
        try:
            await self.observe(task, data, reply.body)
        except StoreUnavailable:
            self._final.pop(task.task_id, None)  # not settled yet: the poller settles it once the store is back
            self.log.warning("task.observe_deferred", task_id=task.task_id, reason="store_unavailable")
        return Outcome(200, reply.body)

    async def observe(self, task: Task, data: dict, raw: bytes) -> None:
        """Record what TokenHub said of a task: a new status, or its settlement at the first terminal one."""
        status = data["status"]
        if status in UPSTREAM_TERMINAL:
            self._final[task.task_id] = raw
            await self.settle(task, status, data, raw)
        elif status != task.status and status in ("queued", "running"):
            task.status = status
            await self.store.set_status(task.task_id, status, self.clock())

    async def settle(self, task: Task, status: str, data: dict | None, raw: bytes | None,
                     estimated: bool = False) -> Task | None:
        if estimated:
            billed_ms, cost = task.estimate_ms, task.estimate_micros
        else:
            billed_ms, cost, estimated = self._actual(task, status, data or {})
        done = await self.store.settle(task.task_id or task.rid, status, billed_ms, cost, estimated,
                                       raw, self.clock())
        task.status = status
        if done is not None:
            self._settled(done)
        return done

    def _actual(self, task: Task, status: str, data: dict) -> tuple[int, int, bool]:
        """(billed ms, micro-dollars, estimated) from TokenHub's usage; a figure it did not give is
        taken from the request, and the cost is then flagged as an estimate."""
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        input_s, estimated = Decimal(task.input_ms) / 1000, task.input_estimated and status == "succeeded"
        if task.input_estimated and _is_num(usage.get("input_video_duration")):
            input_s, estimated = Decimal(str(usage["input_video_duration"])), False
        seconds = usage.get("video_duration")
        if status == "succeeded" and not _is_num(seconds):
            seconds, estimated = task.duration_s, True
        if task.resolution not in self.settings.pricing.get(task.model, {}):
            return task.estimate_ms, task.estimate_micros, True  # a reload removed its price
        ms, cost = pricing.actual(self.settings.pricing, task.model, task.resolution, input_s, status, seconds)
        return ms, cost, estimated

    def _settled(self, t: Task) -> None:
        m = self.metrics
        m.tasks_finished.labels(t.team, t.model, t.resolution, t.status).inc()
        m.task_duration.labels(t.model, t.resolution).observe(max(0.0, t.settled_at - t.created_at))
        if t.billed_ms:
            m.video_seconds.labels(t.team, t.model, t.resolution).inc(t.billed_ms / 1000)
        if t.cost_micros:
            m.spend_usd.labels(t.team, t.model, t.resolution).inc(t.cost_micros / 1_000_000)
        log = self.log.warning if t.status in ("unresolved", "expired") else self.log.info
        log("task.settled", task_id=t.task_id or t.rid, team=t.team, user=t.user, model=t.model,
            resolution=t.resolution, status=t.status, billed_seconds=t.billed_ms / 1000,
            cost_usd=micros_to_usd(t.cost_micros or 0), estimated=t.cost_estimated)

    # figures

    async def rate_headers(self, subjects: tuple[Subject, ...], now: float | None = None) -> dict[str, str]:
        """The tightest requests-per-minute window among the subjects, as OpenAI's rate-limit headers
        (`now`: the store's time, when the caller already has it)."""
        limited = [s for s in subjects if s.limits.requests_per_minute]
        if not limited:
            return {}
        try:
            if now is None:
                now = await self.store.now()
            states = [await self.store.rate_state(s.scope, s.name, s.limits.requests_per_minute, now)
                      for s in limited]
        except StoreUnavailable:
            return {}
        tight = min(states, key=lambda r: (r.remaining, r.limit))
        return {"x-ratelimit-limit-requests": str(tight.limit),
                "x-ratelimit-remaining-requests": str(tight.remaining),
                "x-ratelimit-reset-requests": f"{tight.reset_s:.3f}s"}

    async def drain(self, timeout: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _retry_after_s(value: str | None) -> int:
    seconds = parse_retry_after(value, time.time())
    return max(1, math.ceil(seconds)) if seconds is not None else 1
