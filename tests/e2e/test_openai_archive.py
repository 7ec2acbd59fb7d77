"""End-to-end: the official openai SDK through the OpenAI shape with the archive on (SPEC §11, §12): a list item
equals the retrieve of the same id, every field, once the archive's copy has landed; the dated model names the
SDK lists are aliases of their family."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.harness import Gateway, Simulator, wait_until
from tests.e2e.openai_helpers import TEAMS, USERS, sdk, wait_status
from tests.redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.timeout(60)

QUICK = "sim:seconds=0.3"
RETENTION_DAYS = 30
DAY_S = 86400


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    require_redis_server()
    server = RedisServer()
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def archived_gw(make_gateway: Any, sim: Simulator, tmp_path: Path, request: pytest.FixtureRequest) -> Gateway:
    """A gateway with the archive on, on SQLite unless the test asks for Redis (`store_url`)."""
    store_url = request.getfixturevalue("redis_url") if getattr(request, "param", "sqlite") == "redis" else None
    gateway: Gateway = make_gateway(
        teams=TEAMS,
        users=USERS,
        name="openai-archive",
        store_url=store_url,
        extra={
            "archive": {"dir": str(tmp_path / "videos"), "retention_days": RETENTION_DAYS},
            "openai": {"poll_after_ms": 100},
        },
    )
    return gateway


def listed(client: openai.OpenAI) -> dict[str, dict[str, Any]]:
    """Every video of the team, as the SDK's auto-paging list gives them, by id."""
    return {video.id: video.to_dict() for video in client.videos.list(limit=2)}


def retention_shown(client: openai.OpenAI, video_id: str) -> Any:
    """The retrieve, once `expires_at` is the archive's retention (the copy has landed)."""
    video = client.videos.retrieve(video_id)
    completed_at = video.completed_at or 0
    return video if video.expires_at and video.expires_at > completed_at + 2 * DAY_S else None


def archived_video(client: openai.OpenAI, video_id: str) -> Any:
    return wait_until(lambda: retention_shown(client, video_id), timeout=15, interval=0.1)


@pytest.mark.parametrize("archived_gw", ["sqlite", "redis"], indirect=True)
def test_a_list_item_equals_the_retrieve_of_the_same_id_with_the_archive_on(archived_gw: Gateway, sim: Simulator):
    with sdk(archived_gw, "alice") as client:  # closed at the end: the gateway stops without a grace wait
        compare_list_and_retrieve(client)


def compare_list_and_retrieve(client: openai.OpenAI) -> None:
    done = client.videos.create(prompt=f"{QUICK} a heron lands", model="sora-2", seconds="4")
    failed = client.videos.create(prompt=f"{QUICK} sim:fail a storm", model="sora-2-pro", size="1280x720")
    waiting = client.videos.create(prompt="sim:never a slow tide")
    wait_status(client, failed.id, "failed")
    wait_status(client, waiting.id, "in_progress")  # the store has it running: list and retrieve agree on it
    settled = wait_status(client, done.id, "completed")
    archived = archived_video(client, done.id)
    assert RETENTION_DAYS * DAY_S - 60 <= archived.expires_at - settled.completed_at <= RETENTION_DAYS * DAY_S + 60

    videos = listed(client)
    assert set(videos) == {done.id, failed.id, waiting.id}
    for video_id, item in videos.items():
        retrieved = client.videos.retrieve(video_id).to_dict()
        if video_id == waiting.id:  # in progress: progress grows between the two reads; every other field is equal
            item = {**item, "progress": retrieved["progress"]}
        assert item == retrieved, video_id
    assert videos[done.id]["expires_at"] == archived.expires_at
    assert videos[failed.id]["expires_at"] is None and videos[failed.id]["error"]["code"] == "generation_failed"


DATED = {
    "sora-2-2025-10-06": "doubao-seedance-2.0-fast",
    "sora-2-2025-12-08": "doubao-seedance-2.0-fast",
    "sora-2-pro-2025-10-06": "doubao-seedance-2.0",
}


def test_the_dated_model_names_the_sdk_lists_are_aliases_of_their_family(archived_gw: Gateway, sim: Simulator):
    with sdk(archived_gw, "alice") as client:  # closed at the end: the gateway stops without a grace wait
        videos = {model: client.videos.create(prompt=f"{QUICK} a dated fox", model=model) for model in DATED}
        for model, video in videos.items():
            assert video.model == model
            assert sim.task(video.id)["request"]["model"] == DATED[model]
            assert wait_status(client, video.id, "completed").model == model
        archived = {video.id: archived_video(client, video.id).to_dict() for video in videos.values()}
        assert {video_id: item for video_id, item in listed(client).items() if video_id in archived} == archived
