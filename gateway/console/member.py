"""What a member sees (SPEC §16): the overview (spend against budgets, per day, by model), the team's tasks, a
task's page, and its archived video and cover served from the archive with `Range`, same origin."""

from __future__ import annotations

from starlette.responses import Response

from gateway.console import figures, listing
from gateway.console.pages import Visit
from gateway.errors import AuthError, NotFound
from gateway.policy.roles import OPERATOR
from gateway.routes.videos import archived_response
from gateway.settings import Team, User
from gateway.store.base import Task

MEDIA = {"video": "video", "cover": "thumbnail"}  # the archive's file → how /videos/{id}/content names it


def member_of(visit: Visit) -> tuple[User, Team]:
    found = visit.gateway.directory.member(visit.viewer.user)
    if found is None:
        raise AuthError("Your user is no longer in force: sign in again.")
    return found


async def overview(visit: Visit) -> Response:
    gateway = visit.gateway
    user, team = member_of(visit)
    now = gateway.clock()
    period = figures.period_of(team, now)
    mine, ours = await figures.budgets(gateway, user, team)
    return visit.render(
        "overview.html",
        title="Overview",
        period=period,
        mine=mine,
        ours=ours,
        chart=await figures.daily_chart(gateway, team.name, now),
        by_model=await figures.grouped(gateway, "model", team.name, period.since),
    )


async def tasks(visit: Visit) -> Response:
    gateway = visit.gateway
    _, team = member_of(visit)
    query = listing.task_query(visit.request.query_params, gateway.settings.pricing)
    found, next_after = await listing.task_page(gateway.store, team.name, query)
    return visit.render(
        "tasks.html",
        title="Tasks",
        tasks=found,
        covers=await listing.covers(gateway.store, found, gateway.archive is not None),
        query=query,
        next_link=query.link(after=next_after) if next_after else None,
        statuses=listing.STATUSES,
        models=sorted(gateway.settings.pricing),
    )


async def task(visit: Visit) -> Response:
    gateway = visit.gateway
    found = await visible_task(visit)
    own = visit.viewer.role != OPERATOR  # the operator's pages never show a prompt, or a video
    files = []
    if own and gateway.archive is not None and found.task_id and found.status == "succeeded":
        files = await gateway.store.archive_files(found.task_id)
    price = gateway.settings.pricing.get(found.model, {}).get(found.resolution)
    return visit.render(
        "task.html",
        title=f"Task {found.task_id or found.rid}",
        task=found,
        ref=found.task_id or found.rid,
        prompt=listing.prompt_of(found) if own else None,
        own=own,
        archived=listing.variants(files),
        timeline=listing.timeline(found),
        cost=listing.breakdown(found, price),
    )


async def media(visit: Visit) -> Response:
    """An archived file of one of the team's tasks, one `Range` answered; a download slot of the team held
    while it is sent (as /videos/{id}/content holds one)."""
    gateway = visit.gateway
    variant = visit.request.path_params["variant"]
    found = await visible_task(visit)
    if variant not in MEDIA or gateway.archive is None or found.status != "succeeded" or not found.task_id:
        raise NotFound("This task has no archived file of that kind.", code="not_found")
    server = gateway.settings.server
    slot = gateway.media.downloads.claim(found.team, server.max_downloads_per_team)
    try:
        served = await gateway.archive.open_range(found, variant, visit.request.headers.get("range"))
        if served is None:
            raise NotFound("This file is not in the archive (any more).", code="not_found")
        return archived_response(served, MEDIA[variant], server.send_timeout_s, slot)
    except BaseException:
        slot.release()
        raise


async def visible_task(visit: Visit) -> Task:
    """The task of the path, when the viewer may see it: its own team's, or any for the operator."""
    ref = visit.request.path_params["ref"]
    found = await visit.gateway.store.get_record(ref) if 0 < len(ref) <= 200 else None
    if found is None or (visit.viewer.role != OPERATOR and found.team != visit.viewer.team):
        raise NotFound("No such task for your team.", code="task_not_found")
    if found.status == "create_failed":
        raise NotFound("No such task for your team.", code="task_not_found")
    return found
