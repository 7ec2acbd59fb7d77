"""An OpenAI-shape create with an image, in-process against a fake TokenHub that keeps the bodies it is sent:
the body sent is orjson's bytes of the Seedance body holding the whole data: URL, whether the image came as an
upload (in memory, or spooled to disk) or as a data: URL in JSON (parsed in a worker process past 64 KiB); the
idempotency fingerprint and §4's errors are those of the whole URL."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.upstream.client import Reply
from tests.doubles import FAST, USER_KEY, FakeUpstream, make_settings

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
SMALL = PNG_HEAD + bytes(range(256)) * 4
ON_DISK = PNG_HEAD + bytes(range(256)) * 6000  # past 1 MiB: spooled to disk, read off the event loop


class KeepingUpstream(FakeUpstream):
    """The fake TokenHub, keeping every body it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    async def call(self, method: str, path: str, key: str, body: bytes | None = None) -> Reply:
        if body is not None:
            self.bodies.append(body)
        return await super().call(method, path, key, body)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[TestClient, KeepingUpstream, Metrics]]:
    upstream = KeepingUpstream()
    metrics = Metrics()
    settings = make_settings(f"sqlite:///{tmp_path / 'videos.db'}")
    app = create_app(settings, upstream=upstream, metrics=metrics, run_poller=False)
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        yield client, upstream, metrics


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def seedance_body(url: str, prompt: str = "a fox") -> bytes:
    """What TokenHub was sent for a 4 s sora-2 create at 720x1280: orjson's bytes of the whole body."""
    return orjson.dumps(
        {
            "model": FAST,
            "prompt": prompt,
            "duration": 4,
            "resolution": "720p",
            "aspect_ratio": "9:16",
            "content": [{"type": "image_url", "image_url": {"url": url}, "role": "first_frame"}],
        }
    )


def upload(client: TestClient, image: bytes, key: str | None = None, prompt: str = "a fox") -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        "/v1/videos", data={"prompt": prompt}, files={"input_reference": ("a.png", image)}, headers=headers
    )


def as_json(client: TestClient, url: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/videos", json={"prompt": "a fox", "input_reference": {"image_url": url}}, headers=headers)


@pytest.mark.parametrize("image", [SMALL, ON_DISK], ids=["in-memory", "on-disk"])
def test_an_uploaded_image_is_sent_as_the_body_holding_its_whole_data_url(parts, image):
    client, upstream, _ = parts
    prompt = data_url(image)[:40]  # a prompt that spells the URL's start changes nothing
    answer = upload(client, image, prompt=prompt)
    assert answer.status_code == 200, answer.text
    assert upstream.bodies == [seedance_body(data_url(image), prompt)]


@pytest.mark.parametrize("padding", [100, 200_000], ids=["parsed-inline", "parsed-in-a-worker"])
def test_a_data_url_in_json_is_sent_as_it_came(parts, padding):
    client, upstream, _ = parts
    url = data_url(PNG_HEAD + bytes(padding))
    answer = as_json(client, url)
    assert answer.status_code == 200, answer.text
    assert upstream.bodies == [seedance_body(url)]


@pytest.mark.parametrize(
    ("first", "same", "other"),
    [
        (lambda c, k: upload(c, ON_DISK, k), lambda c, k: upload(c, ON_DISK, k), lambda c, k: upload(c, SMALL, k)),
        (
            lambda c, k: as_json(c, data_url(ON_DISK), k),
            lambda c, k: as_json(c, data_url(ON_DISK), k),
            lambda c, k: as_json(c, data_url(ON_DISK) + "AAAA", k),
        ),
    ],
    ids=["upload", "json"],
)
def test_an_idempotency_key_replays_the_same_image_and_refuses_another(parts, first, same, other):
    client, upstream, _ = parts
    created = first(client, "k-1")
    replayed = same(client, "k-1")
    assert (created.status_code, replayed.status_code) == (200, 200), (created.text, replayed.text)
    assert replayed.headers["Idempotent-Replayed"] == "true" and replayed.json()["id"] == created.json()["id"]
    conflict = other(client, "k-1")
    assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "idempotency_key_reused")
    assert len(upstream.bodies) == 1


@pytest.mark.parametrize("size", [100, 200_000], ids=["parsed-inline", "parsed-in-a-worker"])
@pytest.mark.parametrize(
    ("url_start", "says"),
    [
        ("data:audio/mpeg;base64,", "expected a base64 data URI data:image/<subtype>;base64,<data>."),
        ("data:image/png,", "expected a base64 data URI data:image/<subtype>;base64,<data>."),
    ],
)
def test_a_data_url_of_the_wrong_kind_is_refused_as_its_whole_url_would_be(parts, size, url_start, says):
    client, upstream, metrics = parts
    answer = as_json(client, url_start + "A" * size)
    error = answer.json()["error"]
    assert (answer.status_code, error["param"], error["message"]) == (400, "input_reference", says)
    assert upstream.bodies == []
    assert (
        metrics.registry.get_sample_value("tokenhub_gateway_validation_errors_total", {"param": "input_reference"}) == 1
    )
