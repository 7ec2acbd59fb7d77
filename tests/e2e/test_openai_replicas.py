"""End-to-end: the OpenAI shape on two gateway replicas sharing Redis (SPEC §11, §14): a video made on one
reads, lists, downloads and deletes on the other, and a deletion on one counts on both at once."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.harness import Simulator
from tests.e2e.openai_helpers import FAST, sdk
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = RedisServer()
    yield server.start()
    server.stop()


def test_one_video_across_replicas(make_gateway, sim: Simulator, redis_url: str):
    a, b = (
        make_gateway(store_url=redis_url, name=name, extra={"openai": {"poll_after_ms": 100}}) for name in ("a", "b")
    )
    on_a, on_b = sdk(a, "alice"), sdk(b, "alice")
    first = on_a.videos.create_and_poll(prompt=f"{FAST} made on a", seconds="5", size="1280x720")
    second = on_b.videos.create(prompt=f"{FAST} made on b")
    seen = on_b.videos.retrieve(first.id)
    assert (seen.status, seen.seconds, seen.size, seen.model) == ("completed", "5", "1280x720", "sora-2")
    assert on_b.videos.download_content(first.id).content == sim.expected_bytes(first.id)
    assert [v.id for v in on_a.videos.list(order="asc")] == [first.id, second.id]
    assert on_a.videos.retrieve(first.id).status == "completed"  # now in replica a's cache
    on_b.videos.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        on_a.videos.retrieve(first.id)
    assert [v.id for v in on_a.videos.list()] == [second.id]
    with pytest.raises(openai.NotFoundError):
        sdk(b, "bob").videos.retrieve(second.id)
