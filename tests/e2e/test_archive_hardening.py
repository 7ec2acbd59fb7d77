"""The archive's second hardening round end to end (SPEC §4 "Media and downloads", §12): a real gateway in front
of the simulator. A delete that lands while the copy is in flight wins; a missing S3 bucket is a counted
`store_failed`; an archived file that vanished falls back to TokenHub's URL, else 410; a Range of any length is
answered, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.harness import Gateway, body, wait_until
from tests.moto_server import CREDENTIALS

CREATE = "/videos/generations"
HUGE = "9" * 5000  # past Python's 4,300-digit limit for int()


def create(gw: Gateway) -> str:
    with gw.client("alice") as client:
        answer = client.post(CREATE, json=body(prompt="sim:seconds=0.2 a lighthouse"))
    assert answer.status_code == 200, answer.text
    task_id: str = answer.json()["id"]
    return task_id


def poll_until_succeeded(gw: Gateway, task_id: str) -> None:
    def succeeded() -> bool:
        with gw.client("alice") as client:
            return bool(client.get(f"{CREATE}/{task_id}").json()["status"] == "succeeded")

    wait_until(succeeded, 20, 0.05)


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()) if root.exists() else []


def copy_ended(gw: Gateway) -> str | None:
    """The event that ended a copy: both files `archive.copied`, or `archive.discarded` (the video was deleted)."""
    events = [line.get("event") for line in gw.lines()]
    if "archive.discarded" in events:
        return "archive.discarded"
    return "archive.copied" if events.count("archive.copied") >= 2 else None


@pytest.fixture
def archived(make_gateway, tmp_path):
    """A gateway archiving into a directory, and one video of red's copied there whole."""
    root = tmp_path / "videos"
    gw = make_gateway(extra={"archive": {"dir": str(root)}})
    task_id = create(gw)
    poll_until_succeeded(gw, task_id)
    wait_until(lambda: len([name for name in files_under(root) if name.startswith("red/")]) == 2, 10, 0.05)
    return gw, root, task_id


def test_a_video_deleted_while_its_copy_is_in_flight_leaves_no_file(make_gateway, sim, tmp_path):
    root = tmp_path / "videos"
    gw = make_gateway(extra={"archive": {"dir": str(root)}})
    sim.fault("*", "slow", routes=["media"], delay_s=3, count=1)  # the video's download waits 3 s
    task_id = create(gw)
    poll_until_succeeded(gw, task_id)
    wait_until(lambda: any(d["task_id"] == task_id and d["status"] is None for d in sim.downloads()), 5, 0.02)
    with gw.client("alice") as client:
        assert client.delete(f"/videos/{task_id}").json()["deleted"] is True
    ended = wait_until(lambda: copy_ended(gw), 10, 0.05)  # after its downloads, the copy's last steps
    assert (ended, files_under(root)) == ("archive.discarded", [])


def test_a_missing_bucket_is_a_counted_store_failure(make_gateway, moto):
    gw = make_gateway(
        extra={"archive": {"url": "s3://no-such-bucket-h22/videos", "endpoint_url": moto.url}}, start=False
    )
    gw.env.update(CREDENTIALS)
    gw.start()
    poll_until_succeeded(gw, create(gw))
    wait_until(lambda: gw.metric("tokenhub_gateway_archive_failures_total", reason="store_failed") >= 2, 10, 0.1)
    assert [line for line in gw.lines() if line.get("event") == "archive.step_crashed"] == []


def test_a_vanished_archived_file_falls_back_to_tokenhub_else_410(archived, sim):
    gw, root, task_id = archived
    (root / "red" / task_id / "video.mp4").unlink()
    with gw.client("alice") as client:
        sim.clear_requests()
        fallback = client.get(f"/videos/{task_id}/content")
        assert (fallback.status_code, fallback.content) == (200, sim.expected_bytes(task_id))
        assert len(sim.downloads()) == 1  # fetched from TokenHub's URL
        sim.media(ttl_s=0)  # and once that URL has expired: 410, not a 200 cut short
        expired = client.get(f"/videos/{task_id}/content")
        assert (expired.status_code, expired.json()["error"]["code"]) == (410, "video_expired")
        thumbnail = client.get(f"/videos/{task_id}/content", params={"variant": "thumbnail"})
        assert (thumbnail.status_code, thumbnail.content) == (200, sim.expected_bytes(task_id, "cover"))


def test_a_range_of_any_length_is_answered_from_the_archive(archived, sim):
    gw, _, task_id = archived
    video = sim.expected_bytes(task_id)
    sim.media(ttl_s=0)  # only the archive can answer
    with gw.client("alice") as client:
        past_the_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes={HUGE}-"})
        assert (past_the_end.status_code, past_the_end.json()["error"]["code"]) == (416, "range_not_satisfiable")
        to_a_huge_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes=0-{HUGE}"})
        assert (to_a_huge_end.status_code, to_a_huge_end.content) == (206, video)
        huge_suffix = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes=-{HUGE}"})
        assert (huge_suffix.status_code, huge_suffix.content) == (206, video)
        padded = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes={'0' * 5000}7-9"})
        assert (padded.status_code, padded.content) == (206, video[7:10])
    assert gw.metric("tokenhub_gateway_requests_total", code="500") == 0
