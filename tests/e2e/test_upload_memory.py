"""What an OpenAI-shape upload costs a real gateway process in memory (SPEC §4: at most about twice its size while
in flight), read as the growth of its peak resident set (VmHWM), reset before each upload.

- A 10 MiB image uploaded as multipart stays in its spooled file (on disk) until the body to send is written from
  it: the gateway holds that body (4/3 of the image, as base64) and small buffers. Bound: 2x the image, SPEC's
  figure; it is ~1.4x, and one more whole copy of the image or of its base64 would cross it.
- A data: URL in a JSON body is held as the body arrived, and the body to send is written from those bytes: two
  copies. Bound: 2.3x the body (the two, and room for the rest of the process).
- A 20 MiB image, twice the limit, is refused by its size without being read: it costs a fraction of itself.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Gateway, Simulator

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
UPLOAD_BOUND = 2.0
JSON_BOUND = 2.3
REFUSED_BOUND = 0.25


def jpeg(size: int) -> bytes:
    """A JPEG by its bytes, of varied content: the base64 written is not one repeated run."""
    return (JPEG_HEAD + bytes(range(256)) * (size // 256 + 1))[:size]


@contextlib.contextmanager
def fresh_gateway(simulator: Simulator, tmp: Path) -> Iterator[Gateway]:
    """A gateway of the test's own: memory a previous upload freed (and the allocator kept) hides nothing."""
    gateway = Gateway(
        tmp=tmp,
        upstream_url=simulator.url,
        name="upload-memory",
        teams={"red": {}},
        users={"alice": {"team": "red"}},
        extra={"server": {"max_body_bytes": 32 * MIB}},  # room for a 20 MiB image to be refused by its own limit
    )
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def peak_growth(gw: Gateway, send: Any) -> tuple[httpx.Response, int]:
    """`send()`'s answer, and how far the gateway's peak resident set rose above where it stood before it."""
    status = Path(f"/proc/{gw.proc.pid}/status")
    Path(f"/proc/{gw.proc.pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = _kib(status, "VmHWM")
    answer = send()
    time.sleep(0.2)  # the create's last steps (logged, answered) are done before the peak is read
    return answer, (_kib(status, "VmHWM") - before) * 1024


def _kib(status: Path, field: str) -> int:
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def multipart(client: httpx.Client, image: bytes) -> httpx.Response:
    return client.post("/videos", data={"prompt": "a fox"}, files={"input_reference": ("a.jpg", image)})


def as_json(client: httpx.Client, image: bytes) -> httpx.Response:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    return client.post("/videos", json={"prompt": "a fox", "input_reference": {"image_url": url}})


def test_an_uploaded_image_costs_at_most_about_twice_its_size(simulator: Simulator, tmp_path: Path):
    with fresh_gateway(simulator, tmp_path) as gw, gw.client("alice", timeout=60) as client:
        assert multipart(client, jpeg(200_000)).status_code == 200  # first uses (imports, connections) not counted
        too_big = jpeg(20 * MIB)
        answer, grown = peak_growth(gw, lambda: multipart(client, too_big))
        error = answer.json()["error"]
        assert (answer.status_code, error["code"], error["param"]) == (400, "invalid_parameter", "input_reference")
        assert grown <= REFUSED_BOUND * len(too_big), f"{grown / MIB:.1f} MiB to refuse a 20 MiB upload"

        image = jpeg(10 * MIB)
        answer, grown = peak_growth(gw, lambda: multipart(client, image))
        assert answer.status_code == 200, answer.text
        assert grown <= UPLOAD_BOUND * len(image), f"{grown / MIB:.1f} MiB for a 10 MiB upload"


def test_a_data_url_in_json_costs_at_most_about_twice_the_body(simulator: Simulator, tmp_path: Path):
    with fresh_gateway(simulator, tmp_path) as gw, gw.client("alice", timeout=60) as client:
        assert as_json(client, jpeg(200_000)).status_code == 200  # the body worker started: not counted
        image = jpeg(7 * MIB)  # a body of about 9.3 MiB
        body_size = len(b'{"prompt":"a fox","input_reference":{"image_url":"data:image/jpeg;base64,"}}') + 4 * (
            -(-len(image) // 3)
        )
        answer, grown = peak_growth(gw, lambda: as_json(client, image))
        assert answer.status_code == 200, answer.text
        assert grown <= JSON_BOUND * body_size, f"{grown / MIB:.1f} MiB for a {body_size / MIB:.1f} MiB JSON body"
