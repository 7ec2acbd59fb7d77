"""OpenAI's Videos API routes (SPEC §11): the same tasks, quotas, idempotency, ledger and polls as the
TokenHub shape, reached through the same task flow; only the translation (openai/translate.py) and the
answers' shape (openai/view.py, openai/bridge.py) are this shape's own.

Decisions where SPEC §11 is silent:

- Retrieve, delete, content and remix read the task from the store (a deletion on another replica counts)
  and ask TokenHub only while it is unfinished, through the same coalesced poll as the TokenHub shape.
- A poll or cancel that TokenHub answers with a 4xx is passed through scrubbed, as in the TokenHub shape.
- Content and remix of a failed video are 409 `video_not_ready` too: it will never have content.
- The list is read from the gateway's records alone (no upstream call per item).
- A download slot (`server.max_downloads_per_team`) is held by every `/content` answer, archived or fetched,
  until its last byte is sent, and by a remix while it checks its source; an upload slot
  (`server.max_uploads_in_flight`, routes/videos_input.py) by a create or remix with a large body until
  TokenHub answers it. An uploaded file stays in its spooled file until the body to send is written from it,
  and is closed once that body is made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.context import Outcome, RequestContext
from gateway.delivery.archive import Served
from gateway.delivery.content import Delivery, DownloadResponse, Slot, image_type, single_range
from gateway.errors import (
    GatewayError,
    NotFound,
    RangeNotSatisfiable,
    UnsupportedParameter,
    UpstreamError,
    ValidationError,
    VideoNotReady,
)
from gateway.http.request import authenticate, ctx_of, gw, int_param, json_response, outcome_response
from gateway.openai.bridge import (
    answer_of,
    encode_meta,
    facts_of,
    output_seconds,
    result_url,
    stored_answer,
    task_facts,
)
from gateway.openai.translate import (
    CREATE_FIELDS,
    INPUT,
    Translation,
    VideoFacts,
    client_param,
    fingerprint,
    remix_body,
    to_seedance,
)
from gateway.openai.upload import holds_passage
from gateway.openai.view import STATUS, content_variant, deleted_object, poll_after_headers, video_list, video_object
from gateway.policy.pricing import Pricing
from gateway.policy.quota import subjects_for
from gateway.policy.validation import VideoRequest, validate
from gateway.routes.videos_input import read_fields
from gateway.settings import Team, User
from gateway.store.base import TERMINAL, Task

if TYPE_CHECKING:
    from gateway.app import Gateway

ARCHIVE_VARIANTS = {"video": "video", "thumbnail": "cover"}  # the OpenAI variant → the archive's file
# A larger upload is on disk (starlette spools past 1 MiB); it, and a long data: URL in a JSON body, is written
# into the body to send (and hashed) off the event loop.
LARGE_UPLOAD = 1 << 20

PARAM_LABELS = frozenset({*CREATE_FIELDS, "Idempotency-Key"})  # validation_errors{param}: bounded
MAX_ID_ECHO = 64
NOT_OFFERED = {"edits": "Video edits", "extensions": "Video extensions", "characters": "Characters"}
NOSNIFF = {"X-Content-Type-Options": "nosniff"}


class Prepared(NamedTuple):
    raw: bytes
    req: VideoRequest
    facts: VideoFacts
    fingerprint: str | None


class Latest(NamedTuple):
    """A task as the gateway now knows it, TokenHub's latest answer, or the answer to pass through."""

    task: Task
    answer: dict[str, Any] | None
    passed: Outcome | None = None


async def create_video(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    idem_key = _idempotency_key(request)
    with gateway.uploads.slot(request, gateway.settings.server.max_uploads_in_flight):
        prepared = await _prepared_create(request, gateway, idem_key)
        return await _admit(request, user, team, prepared, idem_key)


async def _prepared_create(request: Request, gateway: Gateway, idem_key: str | None) -> Prepared:
    """The body to send TokenHub; the fields and the upload are dropped with this frame."""
    server = gateway.settings.server
    aliases = gateway.settings.openai.model_aliases
    pricing = gateway.settings.pricing
    async with read_fields(request, server.max_body_bytes, server.body_timeout_s, gateway.large_bodies) as read:
        fields, upload = read
        return await _prepare(
            gateway,
            lambda: to_seedance(fields, aliases, pricing, upload),
            lambda: fingerprint(fields, upload) if idem_key else None,
            big=(upload is not None and upload.size > LARGE_UPLOAD) or holds_passage(fields),
        )


async def remix_video(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    idem_key = _idempotency_key(request)
    with gateway.uploads.slot(request, gateway.settings.server.max_uploads_in_flight):
        prepared = await _prepared_remix(request, gateway, team, idem_key)
        return prepared if isinstance(prepared, Response) else await _admit(request, user, team, prepared, idem_key)


async def _prepared_remix(request: Request, gateway: Gateway, team: Team, idem_key: str | None) -> Prepared | Response:
    """The remix's body to send TokenHub, or the answer to pass through from the source's poll."""
    ctx = ctx_of(request)
    server = gateway.settings.server
    async with read_fields(request, server.max_body_bytes, server.body_timeout_s, gateway.large_bodies) as read:
        fields, upload = read
        if upload is not None:
            raise UnsupportedParameter("A remix takes no file: its reference is the original video.", param=INPUT)
    video_id: str = request.path_params["video_id"]  # the owned task's task_id: _owned_video checks it
    latest = await _latest(gateway, await _owned_video(gateway, video_id, team.name, ctx), ctx)
    if latest.passed:
        return outcome_response(latest.passed)
    source = latest.task
    url = _result_url(latest, "video")
    with gateway.media.downloads.claim(team.name, server.max_downloads_per_team):
        await gateway.media.available(url)  # an expired source is 410 now, not a failed (and billed) remix later
    aliases = gateway.settings.openai.model_aliases
    pricing = gateway.settings.pricing
    return await _prepare(
        gateway,
        lambda: remix_body(video_id, facts_of(source), url, fields, aliases, pricing, output_seconds(latest.answer)),
        lambda: fingerprint(fields, remix_of=video_id) if idem_key else None,
    )


async def get_video(request: Request) -> Response:
    gateway = gw(request)
    user, team = authenticate(request)
    ctx = ctx_of(request)
    video_id: str = request.path_params["video_id"]  # the owned task's task_id: _owned_video checks it
    latest = await _latest(gateway, await _owned_video(gateway, video_id, team.name, ctx), ctx)
    if latest.passed:
        return outcome_response(latest.passed)
    headers = {
        **poll_after_headers(latest.task.status, gateway.settings.openai.poll_after_ms),
        **await gateway.tasks.rate_headers(subjects_for(user, team, gateway.clock())),
    }
    archived_until = await _archived_until(gateway, [latest.task])
    facts = task_facts(latest.task, latest.answer, archived_until=archived_until.get(video_id))
    return _video_response(gateway, video_object(facts, gateway.clock()), headers)


def archived_response(served: Served, variant: str, send_timeout_s: float, slot: Slot) -> Response:
    """An archived file (or one range of it), streamed from the archive; the slot is held until it is sent."""
    if served.status == 416:
        raise RangeNotSatisfiable(
            "The requested range is outside the video.",
            headers={"Content-Range": served.headers.get("Content-Range", "")},
        )
    headers = {**served.headers, "Content-Type": served_type(variant, served.headers.get("Content-Type"))}
    if served.body is None:
        slot.release()
        return Response(b"", served.status, headers)
    return Delivery(served.body, served.status, headers, send_timeout_s, slot.release)


def served_type(variant: str, declared: str | None) -> str:
    """A video is served as video/*, a cover as an image/* type: never a type a browser would run."""
    if variant == "thumbnail":
        return image_type(declared)
    return declared if declared and declared.lower().startswith("video/") else "video/mp4"


async def list_videos(request: Request) -> Response:
    gateway = gw(request)
    _, team = authenticate(request)
    query = request.query_params
    limit = int_param(query.get("limit"), "limit", 20, 1, 100)
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise ValidationError("order must be asc or desc.", param="order")
    tasks, more = await gateway.store.list_tasks(
        team.name, limit, query.get("after") or None, None, order=order, include_deleted=False
    )
    archived_until = await _archived_until(gateway, tasks)
    now = gateway.clock()
    videos = [video_object(task_facts(t, archived_until=archived_until.get(t.task_id or "")), now) for t in tasks]
    return _video_response(gateway, video_list(videos, more))


async def delete_video(request: Request) -> Response:
    gateway = gw(request)
    _, team = authenticate(request)
    ctx = ctx_of(request)
    video_id: str = request.path_params["video_id"]  # the owned task's task_id: _owned_video checks it
    latest = await _latest(gateway, await _owned_video(gateway, video_id, team.name, ctx), ctx)
    if latest.passed:
        return outcome_response(latest.passed)
    task = latest.task
    if task.status == "queued":
        cancelled = await gateway.polls.cancel(task, ctx)
        if cancelled.status not in (200, 409):
            return outcome_response(cancelled)
    if task.status not in TERMINAL:  # TokenHub answers 409 to a cancel once the task has started
        raise VideoNotReady(
            "The video is in progress: it cannot be stopped and will be billed. "
            "Delete it once it has completed or failed."
        )
    await gateway.store.mark_deleted(video_id, gateway.clock())
    if gateway.archive is not None:
        await gateway.archive.delete(video_id)
    return json_response(deleted_object(video_id))


async def video_content(request: Request) -> Response:
    """A video's bytes or its cover's; every answer, an error's too, says `X-Content-Type-Options: nosniff`."""
    try:
        response = await _content(request)
    except GatewayError as exc:
        exc.extra_headers.update(NOSNIFF)
        raise
    response.headers.update(NOSNIFF)
    return response


async def _content(request: Request) -> Response:
    gateway = gw(request)
    _, team = authenticate(request)
    ctx = ctx_of(request)
    variant = content_variant(request.query_params.get("variant"))
    wanted = single_range(request.headers.get("range"))
    task = await _owned_video(gateway, request.path_params["video_id"], team.name, ctx)
    server = gateway.settings.server
    slot = gateway.media.downloads.claim(team.name, server.max_downloads_per_team)
    try:
        return await _delivered(gateway, task, variant, wanted, ctx, slot)
    except BaseException:
        slot.release()
        raise


async def _delivered(
    gateway: Gateway, task: Task, variant: str, wanted: str | None, ctx: RequestContext, slot: Slot
) -> Response:
    """The answer to a content request, from the archive or TokenHub's URL; `slot` goes with the answer."""
    send_timeout_s = gateway.settings.server.send_timeout_s
    if gateway.archive is not None and task.status == "succeeded":
        served = await gateway.archive.open_range(task, ARCHIVE_VARIANTS[variant], wanted)
        if served is not None:
            return archived_response(served, variant, send_timeout_s, slot)
    latest = await _latest(gateway, task, ctx)
    if latest.passed:
        slot.release()
        return outcome_response(latest.passed)
    download = await gateway.media.open(_result_url(latest, variant), wanted, ctx)
    download.headers["content-type"] = served_type(variant, download.headers["content-type"])
    return DownloadResponse(download, send_timeout_s, slot.release)


def not_offered(feature: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        raise NotFound(
            f"{NOT_OFFERED[feature]} are not offered: Seedance has no equivalent through this gateway.",
            code="route_not_found",
        )

    return endpoint


async def _admit(request: Request, user: User, team: Team, prepared: Prepared, idem_key: str | None) -> Response:
    """The task flow's create, shared with the TokenHub shape; its answer as a Video object."""
    gateway = gw(request)
    ctx = ctx_of(request)
    req = prepared.req
    ctx.model = req.model
    ctx.resolution = req.resolution
    ctx.duration_s = req.duration_s
    outcome = await gateway.tasks.create(
        user, team, prepared.fingerprint, prepared.raw, req, idem_key, ctx, meta=encode_meta(prepared.facts)
    )
    if not 200 <= outcome.status < 300:  # refused by TokenHub, or unknown: passed through as is
        return outcome_response(outcome)
    task = await gateway.polls.owned((answer_of(outcome.body) or {}).get("id", ""), team.name)
    headers = {**outcome.headers, **poll_after_headers(task.status, gateway.settings.openai.poll_after_ms)}
    return _video_response(gateway, video_object(task_facts(task), gateway.clock()), headers)


async def _prepare(
    gateway: Gateway,
    translate: Callable[[], Translation],
    fingerprint_of: Callable[[], str | None],
    big: bool = False,
) -> Prepared:
    """Translate, validate (§4) and fingerprint; off the event loop when an upload makes it large."""
    try:
        if not big:
            return _prepared(translate, fingerprint_of, gateway.settings.pricing)
        async with gateway.large_uploads:
            return await asyncio.to_thread(_prepared, translate, fingerprint_of, gateway.settings.pricing)
    except ValidationError as exc:
        label = "body" if exc.param is None else exc.param if exc.param in PARAM_LABELS else "other"
        gateway.metrics.validation_errors.labels(label).inc()
        raise


def _prepared(
    translate: Callable[[], Translation], fingerprint_of: Callable[[], str | None], pricing: Pricing
) -> Prepared:
    translation = translate()
    try:
        req = validate(translation.body, pricing)
    except ValidationError as exc:
        exc.param = client_param(exc.param)
        raise
    return Prepared(translation.json(), req, translation.facts, fingerprint_of())


async def _owned_video(gateway: Gateway, video_id: str, team: str, ctx: RequestContext) -> Task:
    """The team's task, read from the store (so a deletion anywhere counts), else 404."""
    stored = await gateway.store.get_task(video_id)
    if stored is not None:
        gateway.polls.records[video_id] = stored
    try:
        task: Task | None = await gateway.polls.owned(video_id, team)
    except NotFound:
        task = None
    if task is None or task.deleted_at is not None:
        raise NotFound(f"No video {video_id[:MAX_ID_ECHO]!r} for this team.", param="video_id")
    ctx.task_id = task.task_id
    ctx.model = task.model
    ctx.resolution = task.resolution
    ctx.duration_s = task.duration_s
    return task


def _video_response(gateway: Gateway, document: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A Video or a list of them: drawn partly from TokenHub's stored words (a failure's message), so scrubbed
    of key values on the way out, as everything passed through is."""
    return Response(gateway.pool.scrub(orjson.dumps(document)), 200, headers, media_type="application/json")


async def _latest(gateway: Gateway, task: Task, ctx: RequestContext) -> Latest:
    if task.settled:
        return Latest(task, stored_answer(task))
    polled = await gateway.polls.latest(task, ctx)
    if polled.raw is None:
        return Latest(task, None, polled.outcome)
    if task.status in TERMINAL:  # settled by this poll: the store has its settlement time
        task = await gateway.store.get_task(cast(str, task.task_id)) or task  # an owned task is TokenHub's
    return Latest(task, answer_of(polled.raw))  # TokenHub's own words: its URLs are used as sent


async def _archived_until(gateway: Gateway, tasks: list[Task]) -> dict[str, float]:
    """When the archive's retention deletes each archived video's files: its Video's `expires_at`, the same
    in a retrieve and a list."""
    archive = gateway.archive
    if archive is None:
        return {}
    video_ids = [t.task_id for t in tasks if t.status == "succeeded" and t.task_id]
    files = await asyncio.gather(*(gateway.store.archive_files(video_id) for video_id in video_ids))
    expiries = {video_id: archive.expires_at(found) for video_id, found in zip(video_ids, files, strict=True)}
    return {video_id: expiry for video_id, expiry in expiries.items() if expiry is not None}


def _result_url(latest: Latest, variant: str) -> str:
    status = latest.task.status
    if status != "succeeded":
        state = STATUS.get(status, "in_progress")
        raise VideoNotReady(
            "The video failed: it has no content."
            if state == "failed"
            else f"The video is still {state.replace('_', ' ')}: its content exists once it has completed."
        )
    url = result_url(latest.answer, variant)
    if url is None:
        raise UpstreamError(f"TokenHub's answer for this video has no {variant} URL.", code="upstream_bad_response")
    return url


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 255:
        raise ValidationError("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    return key
