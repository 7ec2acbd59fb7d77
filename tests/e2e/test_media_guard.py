"""No request forwarding by URL (SPEC §4, media and downloads), through a real gateway: a hostile TokenHub on
127.0.0.3 (the one address the gateway may fetch result files from) names result URLs that point at a canary on
127.0.0.2, at the gateway's own /metrics, through redirect chains, or at another scheme. `/content` and remix
answer 502 `upstream_bad_response`, the archive counts `download_failed` and stores nothing, and the canary is
never reached; the allowed address still serves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import Gateway, body, wait_until
from tests.hostile import DEFAULT_VIDEO, Canary, HostileTokenHub, Reply

HUB_HOST = "127.0.0.3"
FAILURES = "tokenhub_gateway_archive_failures_total"


@pytest.fixture(scope="module")
def hub() -> Iterator[HostileTokenHub]:
    with HostileTokenHub(HUB_HOST) as server:
        yield server


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    with Canary("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media-guard-archive")


@pytest.fixture(scope="module")
def gw(hub: HostileTokenHub, archive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(
        tmp=tmp_path_factory.mktemp("media-guard"),
        upstream_url=hub.url,
        name="guard",
        teams={"red": {}},
        users={"alice": {"team": "red"}},
        # The hub's address only: the gateway's own (127.0.0.1) is as far out of reach as the canary's.
        extra={"upstream": {"media_allow_networks": [f"{HUB_HOST}/32"]}, "archive": {"dir": str(archive_dir)}},
    )
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def fresh(hub: HostileTokenHub, canary: Canary) -> Iterator[None]:
    hub.reset()
    canary.connections.clear()
    yield
    assert canary.connections == [], "the canary was reached"


def created(gw: Gateway, hub: HostileTokenHub, video_url: str | None = None) -> str:
    """A task that has succeeded upstream with this result URL (the hub's own small file by default)."""
    task = hub.next_task(video_url=video_url)
    with gw.client("alice") as client:
        answer = client.post("/videos/generations", json=body())
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == task.id
    return task.id


def content(gw: Gateway, task_id: str) -> httpx.Response:
    with gw.client("alice") as client:
        return client.get(f"/videos/{task_id}/content")


def remix(gw: Gateway, task_id: str) -> httpx.Response:
    with gw.client("alice") as client:
        return client.post(f"/videos/{task_id}/remix", json={"prompt": "again, in the rain"})


def refused(answer: httpx.Response) -> bool:
    return answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_bad_response"


def scrapes(gw: Gateway) -> float:
    """Answered GETs of the gateway's /metrics, counting this one only from the next reading on."""
    return gw.metric("tokenhub_gateway_requests_total", route="/metrics")


def hostile_urls(gw: Gateway, hub: HostileTokenHub, canary: Canary) -> dict[str, str]:
    into_canary = f"{canary.url}/video.mp4"
    return {
        "canary": into_canary,
        "canary-mapped": f"http://[::ffff:127.0.0.2]:{canary.port}/video.mp4",
        "own-metrics": f"{gw.url}/metrics",
        "own-metrics-by-name": f"http://localhost:{gw.port}/metrics",
        "redirect-into-canary": hub.redirect_chain("into", 2, into_canary),
        "redirect-by-303-into-canary": hub.redirect("/see-other", into_canary, 303),
        "four-redirects": hub.redirect_chain("four", 4, hub.serve("/media/far.mp4", Reply(body=DEFAULT_VIDEO))),
        "redirect-to-ftp": hub.redirect("/to-ftp", f"ftp://{HUB_HOST}/video.mp4"),
    }


def test_hostile_result_urls_are_refused_by_content_remix_and_archive(gw, hub, canary, archive_dir):
    urls = hostile_urls(gw, hub, canary)
    failures_before = gw.metric(FAILURES, reason="download_failed")
    scrapes_before = scrapes(gw)
    tasks = {name: created(gw, hub, url) for name, url in urls.items()}
    for name, task_id in tasks.items():
        answer = content(gw, task_id)
        assert refused(answer), (name, answer.status_code, answer.text)
    creates = len(hub.hits("/api/v1/videos/generations"))
    for name in ("canary", "own-metrics-by-name", "redirect-into-canary"):
        answer = remix(gw, tasks[name])
        assert refused(answer), (name, answer.status_code, answer.text)
    assert len(hub.hits("/api/v1/videos/generations")) == creates, "a remix of a refused source was forwarded"
    assert scrapes(gw) == scrapes_before + 1, "the gateway fetched its own /metrics"  # + 1: scrapes_before's own
    # Every task's copy was tried once the gateway saw it succeed: each counts, none lands.
    wait_until(lambda: gw.metric(FAILURES, reason="download_failed") >= failures_before + len(tasks), 10)
    assert not any((archive_dir / "red" / task_id).exists() for task_id in tasks.values())
    assert hub.hits("/media/far.mp4") == []


def test_a_result_url_of_another_scheme_is_refused_and_never_archived(gw, hub, archive_dir):
    task_id = created(gw, hub, f"ftp://{HUB_HOST}/video.mp4")
    assert refused(content(gw, task_id))
    assert refused(remix(gw, task_id))
    assert not (archive_dir / "red" / task_id).exists()


def test_the_allowed_address_still_serves_and_is_archived(gw, hub, archive_dir):
    task_id = created(gw, hub)
    answer = content(gw, task_id)
    assert answer.status_code == 200, answer.text
    assert answer.content == DEFAULT_VIDEO
    stored = archive_dir / "red" / task_id / "video.mp4"
    wait_until(stored.exists, 10)
    assert stored.read_bytes() == DEFAULT_VIDEO


def test_three_redirects_are_followed(gw, hub):
    final = hub.serve("/media/near.mp4", Reply(body=DEFAULT_VIDEO))
    task_id = created(gw, hub, hub.redirect_chain("three", 3, final))
    answer = content(gw, task_id)
    assert answer.status_code == 200, answer.text
    assert answer.content == DEFAULT_VIDEO
