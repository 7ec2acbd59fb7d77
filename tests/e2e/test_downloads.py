"""Media and downloads through a real gateway (SPEC §4, second round): fair downloads (a client that reads
nothing is ended after `server.send_timeout_s`; `server.max_downloads_per_team` per team, then 429), cut is cut
(the client's connection closes without a clean end of body, whatever the framing), content types, uploads in
flight bounded gateway-wide (`server.max_uploads_in_flight`, then 503), and numbers of any length (a 4,300-digit
`limit` or `Range` is 400/416, never 500). Answers are read with a raw socket where the framing matters."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import Gateway, Simulator, body, wait_until
from tests.e2e.openai_helpers import JPEG
from tests.hostile import HostileTokenHub, Reply

pytestmark = pytest.mark.timeout(60)

HUGE = "9" * 5000  # Python 3.11 refuses int() of a string over 4,300 digits
BIG_VIDEO = 32 * 1024 * 1024  # more than loopback's socket buffers hold: a client that stops reading stalls it
SEND_TIMEOUT_S = 1
LOOPBACK = {"media_allow_networks": ["127.0.0.0/8"]}
USERS = {"alice": {"team": "red"}, "amy": {"team": "red"}, "bob": {"team": "blue"}}


def start_gateway(tmp: Path, upstream_url: str, name: str, **extra: dict) -> Gateway:
    server = {"send_timeout_s": SEND_TIMEOUT_S, "max_downloads_per_team": 1, "max_uploads_in_flight": 1}
    gateway = Gateway(
        tmp=tmp,
        upstream_url=upstream_url,
        name=name,
        teams={"red": {}, "blue": {}},
        users=USERS,
        extra={"server": server, "upstream": LOOPBACK, **extra},
    )
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def gw(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("downloads"), simulator.url, "downloads")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def hub() -> Iterator[HostileTokenHub]:
    with HostileTokenHub() as server:
        yield server


@pytest.fixture(scope="module")
def hub_gw(hub: HostileTokenHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("downloads-hub"), hub.url, "downloads-hub")
    yield gateway
    gateway.stop()


def succeeded(gw: Gateway, user: str, prompt: str = "sim:seconds=0.2 a fox") -> str:
    """A task of `user`'s that the gateway has seen succeed (the simulator's, or the hub's next scripted one)."""
    with gw.client(user) as client:
        answer = client.post("/videos/generations", json=body(prompt=prompt))
        assert answer.status_code == 200, answer.text
        task_id: str = answer.json()["id"]
        wait_until(lambda: client.get(f"/videos/generations/{task_id}").json()["status"] == "succeeded", 10)
    return task_id


def open_download(gw: Gateway, user: str, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    """A GET sent on a raw socket with a small receive buffer, nothing of its answer read yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.connect(("127.0.0.1", gw.port))
    lines = [f"GET /v1{path} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", f"Authorization: Bearer {gw.user_keys[user]}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_answer(sock: socket.socket, wait_s: float = 5.0) -> tuple[dict[str, str], bytes, bool]:
    """(headers, the raw body bytes, whether the server closed the connection) read until it closes or
    nothing more comes for `wait_s`: an answer that ended cleanly on a kept-alive connection is not closed."""
    sock.settimeout(wait_s)
    data = b""
    closed = False
    with sock:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    head, _, raw_body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    headers[":status"] = lines[0].split(" ")[1]
    return headers, raw_body, closed


def error_of(answer: httpx.Response) -> tuple[int, str]:
    assert answer.headers["content-type"] == "application/json", (answer.status_code, answer.headers)
    return answer.status_code, answer.json()["error"]["code"]


def test_a_client_that_reads_nothing_is_ended_and_holds_its_teams_slot_only_until_then(gw, sim):
    stalled_task = succeeded(gw, "alice", f"sim:seconds=0.2 sim:bytes={BIG_VIDEO} a long fox")
    other_team_task = succeeded(gw, "bob")
    stalled = open_download(gw, "alice", f"/videos/{stalled_task}/content")
    time.sleep(0.3)  # the download is running: its answer fills the client's buffers
    with gw.client("amy") as amy, gw.client("bob") as bob:
        busy = amy.get(f"/videos/{stalled_task}/content", headers={"Range": "bytes=0-99"})
        assert error_of(busy) == (429, "concurrency_limit_exceeded") and busy.headers["Retry-After"] == "1"
        remix = amy.post(f"/videos/{stalled_task}/remix", json={"prompt": "again"})
        assert error_of(remix) == (429, "concurrency_limit_exceeded")
        assert bob.get(f"/videos/{other_team_task}/content").content == sim.expected_bytes(other_team_task)
        started = time.monotonic()
        wait_until(
            lambda: amy.get(f"/videos/{stalled_task}/content", headers={"Range": "bytes=0-99"}).status_code == 206
        )
        assert time.monotonic() - started < SEND_TIMEOUT_S + 3
    headers, raw_body, closed = read_answer(stalled)
    assert headers[":status"] == "200" and int(headers["content-length"]) == BIG_VIDEO
    assert closed and len(raw_body) < BIG_VIDEO  # ended, not completed once the client read again
    lines = [line for line in gw.lines() if line.get("event") == "request" and line.get("task_id") == stalled_task]
    assert any(line["error_code"] == "send_timeout" and line["status"] == 200 for line in lines)


def test_a_download_cut_upstream_closes_the_connection_short_of_its_content_length(gw, sim):
    task_id = succeeded(gw, "alice")
    sim.cut("*", routes=("media",))
    headers, raw_body, closed = read_answer(open_download(gw, "alice", f"/videos/{task_id}/content"))
    assert headers[":status"] == "200" and closed
    assert len(raw_body) < int(headers["content-length"])


def chunked(data: bytes, size: int = 4096) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_download_cut_upstream_never_ends_with_a_clean_last_chunk(hub_gw, hub):
    framed = chunked(bytes(range(256)) * 256)
    url = hub.serve(
        "/media/cut.mp4",
        Reply(body=framed, headers={"Transfer-Encoding": "chunked"}, content_length=-1, cut_after=len(framed) // 2),
    )
    hub.next_task(video_url=url)
    task_id = succeeded(hub_gw, "alice")
    headers, raw_body, closed = read_answer(open_download(hub_gw, "alice", f"/videos/{task_id}/content"))
    assert headers[":status"] == "200" and headers["transfer-encoding"] == "chunked"
    assert closed and not raw_body.endswith(b"0\r\n\r\n")


def test_a_cover_is_served_as_an_image_or_as_bytes_and_every_answer_says_nosniff(hub_gw, hub):
    page = b"<html><script>alert(document.cookie)</script></html>"
    cover = hub.serve("/media/cover.html", Reply(body=page, headers={"Content-Type": "text/html"}))
    hub.next_task(cover_url=cover)
    task_id = succeeded(hub_gw, "alice")
    with hub_gw.client("alice") as client:
        thumbnail = client.get(f"/videos/{task_id}/content", params={"variant": "thumbnail"})
        video = client.get(f"/videos/{task_id}/content")
        refused = client.get(f"/videos/{task_id}/content", params={"variant": "spritesheet"})
        missing = client.get("/videos/no-such-video/content")
    assert (thumbnail.status_code, thumbnail.content) == (200, page)
    assert thumbnail.headers["content-type"] == "application/octet-stream"
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert (refused.status_code, missing.status_code) == (400, 404)
    assert all(a.headers["x-content-type-options"] == "nosniff" for a in (thumbnail, video, refused, missing))


def test_a_limit_or_range_of_any_length_is_400_or_416_never_500(gw, sim):
    task_id = succeeded(gw, "alice")
    whole = sim.expected_bytes(task_id)
    with gw.client("alice") as client:
        for path in ("/videos", "/videos/generations"):
            assert error_of(client.get(path, params={"limit": HUGE})) == (400, "invalid_parameter")
            assert client.get(path, params={"limit": "0" * 5000 + "5"}).status_code == 200
        past_the_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes={HUGE}-"})
        to_a_huge_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes=0-{HUGE}"})
        huge_suffix = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes=-{HUGE}"})
    assert past_the_end.status_code == 416
    assert (to_a_huge_end.status_code, to_a_huge_end.content) == (206, whole)
    assert (huge_suffix.status_code, huge_suffix.content) == (206, whole)


def test_an_archived_file_answers_a_range_of_any_length_too(simulator, sim, tmp_path):
    gateway = start_gateway(tmp_path, simulator.url, "downloads-archive", archive={"dir": str(tmp_path / "videos")})
    try:
        task_id = succeeded(gateway, "alice")
        wait_until(lambda: list((tmp_path / "videos").rglob("video.mp4")), 10)
        sim.media(ttl_s=0)  # TokenHub's URL has expired: only the archive can answer now
        with gateway.client("alice") as client:
            past_the_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes={HUGE}-"})
            to_a_huge_end = client.get(f"/videos/{task_id}/content", headers={"Range": f"bytes=0-{HUGE}"})
        assert past_the_end.status_code == 416
        assert (to_a_huge_end.status_code, to_a_huge_end.content) == (206, sim.expected_bytes(task_id))
    finally:
        gateway.stop()


def upload(gw: Gateway, user: str, results: list[httpx.Response]) -> None:
    results.append(
        httpx.post(
            gw.url + "/v1/videos",
            data={"prompt": "a fox, from this first frame"},
            files={"input_reference": ("first.jpg", JPEG + bytes(200_000), "image/jpeg")},
            headers={"Authorization": f"Bearer {gw.user_keys[user]}"},
            timeout=15,
        )
    )


def test_uploads_in_flight_are_bounded_gateway_wide_until_tokenhub_answers(gw, sim):
    sim.late_create("key-a", delay_s=2)
    first: list[httpx.Response] = []
    thread = threading.Thread(target=upload, args=(gw, "alice", first))
    thread.start()
    try:
        wait_until(lambda: sim.creates())  # the first upload reached TokenHub, which has not answered yet
        second: list[httpx.Response] = []
        upload(gw, "bob", second)  # another team: the bound is the gateway's
        assert error_of(second[0]) == (503, "too_many_uploads") and second[0].headers["Retry-After"] == "1"
        assert second[0].json()["error"]["type"] == "service_unavailable"
        plain = httpx.post(  # a create without a file is no upload
            gw.url + "/v1/videos",
            json={"prompt": "a fox without a first frame"},
            headers={"Authorization": f"Bearer {gw.user_keys['bob']}"},
        )
        assert plain.status_code == 200, plain.text
    finally:
        thread.join(15)
    assert first[0].status_code == 200, first[0].text
    third: list[httpx.Response] = []
    upload(gw, "bob", third)
    assert third[0].status_code == 200, third[0].text
