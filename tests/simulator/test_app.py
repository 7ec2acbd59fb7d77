"""The TokenHub simulator: API shapes, task lifecycle, key scoping, fault injection, request log."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest

from gateway.simulator.app import create_simulator, parse_fault
from tests.doubles import FakeClock
from tests.e2e.harness import Simulator
from tests.simulator.helpers import AUTH, BODY, KEY, OTHER, client, control, create, fault, served, sim


async def api_log(app) -> list[dict]:
    async with client(app, None) as api:
        return (await api.get("/_sim/requests")).json()["data"]


# --- auth, routes, scoping ---------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "th-unknown", "sk-alice"])
async def test_unknown_or_missing_key_is_401(key):
    async with client(sim(), key) as api:
        reply = await create(api)
    assert reply.status_code == 401
    assert reply.json()["error"] == {
        "code": "invalid_api_key",
        "message": "Missing or invalid API key.",
        "type": "authentication_error",
    }


async def test_keys_none_accepts_any_th_key_only():
    app = create_simulator()
    async with client(app, "th-whatever") as api:
        assert (await create(api)).status_code == 200
    async with client(app, "sk-whatever") as api:
        assert (await create(api)).status_code == 401


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_both_prefixes_serve_the_api(prefix):
    async with client(sim()) as api:
        created = (await create(api, prefix)).json()
        polled = await api.get(f"{prefix}/videos/generations/{created['id']}")
    assert created["id"].startswith("cgt-")
    assert created["object"] == "video.generation.task" and created["status"] == "queued"
    assert created["model"] == "doubao-seedance-2.0" and isinstance(created["created"], int)
    assert polled.status_code == 200 and polled.json()["id"] == created["id"]


async def test_a_task_is_visible_only_to_its_key():
    app = sim()
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
    async with client(app, OTHER) as api:
        poll = await api.get(f"/v1/videos/generations/{task_id}")
        cancel = await api.delete(f"/v1/videos/generations/{task_id}")
        unknown = await api.get("/v1/videos/generations/cgt-nope")
    for reply in (poll, cancel, unknown):
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "task_not_found"


async def test_unknown_route_answers_json_404():
    async with client(sim()) as api:
        reply = await api.get("/api/v1/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


# --- lifecycle -----------------------------------------------------------------------------


async def test_status_moves_queued_running_succeeded_with_usage():
    clock = FakeClock()
    app = sim(clock=clock, task_seconds=10)
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
        url = f"/api/v1/videos/generations/{task_id}"
        seen = []
        for at in (1, 3, 9.9, 10):
            clock.now = 1_750_000_000.0 + at
            seen.append((await api.get(url)).json())
    assert [t["status"] for t in seen] == ["queued", "running", "running", "succeeded"]
    done = seen[-1]
    assert done["usage"] == {"video_duration": 8}
    video, cover = (urlsplit(done["data"][0][name]) for name in ("video_url", "cover_image_url"))
    assert (video.scheme, video.netloc, video.path) == ("http", "sim", f"/media/{task_id}.mp4")
    assert (cover.netloc, cover.path) == ("sim", f"/media/{task_id}.png")
    assert parse_qs(video.query)["expires"] == [str(1_750_000_010 + 24 * 3600)]
    assert done["resolution"] == "480p" and done["duration"] == 8
    assert done["updated"] == 1_750_000_010 and seen[1]["updated"] == 1_750_000_002
    assert "data" not in seen[1] and "usage" not in seen[1]


async def test_duration_defaults_to_5():
    app = sim(task_seconds=0)
    async with client(app) as api:
        task_id = (
            await api.post("/v1/videos/generations", json={"model": "doubao-seedance-2.0-fast", "prompt": "x"})
        ).json()["id"]
        done = (await api.get(f"/v1/videos/generations/{task_id}")).json()
    assert done["status"] == "succeeded" and done["usage"] == {"video_duration": 5}
    assert done["resolution"] == "720p"


async def test_prompt_markers_fail_never_and_seconds():
    clock = FakeClock()
    app = sim(clock=clock, task_seconds=100)
    async with client(app) as api:
        ids = [(await create(api, prompt=p)).json()["id"] for p in ("x sim:fail", "x sim:never", "x sim:seconds=0.5")]
        clock.now += 1_000
        failed, never, quick = [(await api.get(f"/v1/videos/generations/{i}")).json() for i in ids]
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    assert "usage" not in failed and "data" not in failed
    assert never["status"] == "running"
    assert quick["status"] == "succeeded"


async def test_moderation_marker_is_refused_at_create():
    app = sim()
    async with client(app) as api:
        reply = await create(api, prompt="sim:moderation please")
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "content_moderation"
    assert KEY not in reply.text
    assert (await api_log(app))[0]["task_id"] is None


async def test_validation_errors_are_400_with_param():
    async with client(sim()) as api:
        bad_duration = await create(api, duration=99)
        bad_json = await api.post(
            "/v1/videos/generations", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        not_object = await api.post("/v1/videos/generations", json=[1, 2])
    error = bad_duration.json()["error"]
    assert bad_duration.status_code == 400
    assert (error["code"], error["type"], error["param"]) == ("InvalidParameter", "invalid_request_error", "duration")
    assert bad_json.status_code == 400 and not_object.status_code == 400


async def test_cancel_a_queued_task_but_not_a_running_one():
    clock = FakeClock()
    app = sim(clock=clock, task_seconds=10)
    async with client(app) as api:
        queued, running = [(await create(api)).json()["id"] for _ in range(2)]
        cancelled = await api.delete(f"/v1/videos/generations/{queued}")
        clock.now += 5
        refused = await api.delete(f"/v1/videos/generations/{running}")
        again = await api.delete(f"/v1/videos/generations/{queued}")
        later = (await api.get(f"/v1/videos/generations/{queued}")).json()
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "task_not_cancellable"
    assert again.status_code == 409
    assert later["status"] == "cancelled"


async def test_task_record_shows_the_creating_key_and_request():
    app = sim()
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
        record = (await api.get(f"/_sim/tasks/{task_id}")).json()
        missing = await api.get("/_sim/tasks/cgt-nope")
    assert record["key"] == KEY and record["request"] == BODY and record["status"] == "queued"
    assert missing.status_code == 404


async def test_the_task_store_is_bounded():
    app = sim(max_tasks=2)
    async with client(app) as api:
        ids = [(await create(api)).json()["id"] for _ in range(3)]
        codes = [(await api.get(f"/v1/videos/generations/{i}")).status_code for i in ids]
    assert codes == [404, 200, 200]


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [7, None])
async def test_fault_429_with_and_without_retry_after(retry_after):
    app = sim()
    await fault(app, mode="429", **({"retry_after": retry_after} if retry_after else {}))
    async with client(app) as api:
        reply = await create(api)
    assert reply.status_code == 429 and reply.json()["error"]["code"] == "rate_limit_exceeded"
    assert reply.headers.get("Retry-After") == (str(retry_after) if retry_after else None)
    assert [e["task_id"] for e in await api_log(app)] == [None]


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [("401", 401, "invalid_api_key"), ("403", 403, "permission_denied"), ("500", 500, "internal_error")],
)
async def test_fault_error_statuses(mode, status, code):
    app = sim()
    await fault(app, mode=mode)
    async with client(app) as api:
        reply = await create(api)
    assert reply.status_code == status and reply.json()["error"]["code"] == code
    assert len(app.state.simulator.tasks) == 0


async def test_fault_garbage_is_200_without_json():
    app = sim()
    await fault(app, mode="garbage")
    async with client(app) as api:
        reply = await create(api)
    assert reply.status_code == 200
    with pytest.raises(ValueError):
        reply.json()
    assert len(app.state.simulator.tasks) == 0


async def test_fault_slow_answers_after_the_delay_and_creates():
    app = sim()
    await fault(app, mode="slow", delay_s=0.1)
    async with client(app) as api:
        start = time.perf_counter()
        reply = await create(api)
    assert time.perf_counter() - start >= 0.1
    assert reply.status_code == 200 and reply.json()["id"] in app.state.simulator.tasks


async def test_fault_hang_never_answers_and_creates_nothing():
    app = sim()
    await fault(app, mode="hang")
    async with client(app) as api:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(create(api), 0.3)
    assert len(app.state.simulator.tasks) == 0
    [entry] = await api_log(app)
    assert entry["fault"] == "hang" and entry["status"] is None


async def test_fault_reset_in_process_raises():
    app = sim()
    await fault(app, mode="reset")
    async with client(app) as api:
        with pytest.raises(ConnectionResetError):
            await create(api)
    assert len(app.state.simulator.tasks) == 0


async def test_fault_reset_drops_the_connection_under_uvicorn():
    app = sim()
    await fault(app, mode="reset", routes=["create"])
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as api:
        with pytest.raises(httpx.TransportError):
            await create(api)
        assert (await api.get("/v1/videos/generations/cgt-nope")).status_code == 404
    assert len(app.state.simulator.tasks) == 0


async def test_count_limited_fault_clears_itself():
    app = sim()
    await fault(app, mode="500", count=2)
    async with client(app) as api:
        codes = [(await create(api)).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert [e["fault"] for e in await api_log(app)] == ["500", "500", None]


async def test_fault_limited_to_routes_and_keys():
    app = sim()
    await fault(app, mode="500", routes=["poll"])
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
        poll = await api.get(f"/v1/videos/generations/{task_id}")
    async with client(app, OTHER) as api:
        other = await create(api)
    assert poll.status_code == 500 and other.status_code == 200


async def test_faults_clear_per_key_and_all():
    app = sim()
    await fault(app, mode="500")
    async with client(app, None) as api:
        await api.post("/_sim/faults", json={"key": OTHER, "mode": "429"})
        assert len((await api.get("/_sim/faults")).json()["data"]) == 2
        await api.delete(f"/_sim/faults/{KEY}")
        assert [f["key"] for f in (await api.get("/_sim/faults")).json()["data"]] == [OTHER]
        await api.delete("/_sim/faults")
        assert (await api.get("/_sim/faults")).json()["data"] == []


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "500"},
        {"key": KEY, "mode": "teapot"},
        {"key": KEY, "mode": "429", "count": 0},
        {"key": KEY, "mode": "500", "routes": ["list"]},
        {"key": KEY, "mode": "slow", "delay_s": -1},
    ],
)
def test_bad_fault_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_fault(spec)


async def test_bad_fault_spec_is_400():
    async with client(sim(), None) as api:
        reply = await api.post("/_sim/faults", json={"key": KEY, "mode": "teapot"})
    assert reply.status_code == 400


# --- request log -----------------------------------------------------------------------------


async def test_request_log_records_api_calls_and_clears():
    clock = FakeClock()
    app = sim(clock=clock)
    async with client(app) as api:
        task_id = (await create(api, "/v1")).json()["id"]
        await api.get(f"/api/v1/videos/generations/{task_id}")
        await api.delete(f"/api/v1/videos/generations/{task_id}")
    async with client(app, "th-stranger") as api:
        await create(api)
    log = await api_log(app)
    assert [(e["method"], e["route"], e["key"], e["task_id"], e["status"]) for e in log] == [
        ("POST", "create", KEY, task_id, 200),
        ("GET", "poll", KEY, task_id, 200),
        ("DELETE", "delete", KEY, task_id, 200),
        ("POST", "create", "th-stranger", None, 401),
    ]
    assert log[0]["path"] == "/v1/videos/generations" and log[0]["time"] == clock.now
    async with client(app, None) as api:
        await api.delete("/_sim/requests")
    assert await api_log(app) == []


# --- knobs for failure tests: scripted answers, fixed ids, late and cut answers ---------------


async def creates(app) -> list[dict]:
    return (await control(app, "GET", "/_sim/creates")).json()["data"]


async def poll(api: httpx.AsyncClient, task_id: str) -> httpx.Response:
    return await api.get(f"/v1/videos/generations/{task_id}")


async def test_scripted_poll_patch_answers_n_times_then_the_real_answer_resumes():
    app = sim(task_seconds=0)
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
        await fault(app, key="*", mode="answer", task_id=task_id, count=2, patch={"usage": {"video_duration": 1e14}})
        answers = [(await poll(api, task_id)).json() for _ in range(3)]
    assert [a["usage"]["video_duration"] for a in answers] == [1e14, 1e14, 8]
    assert all(a["id"] == task_id and a["status"] == "succeeded" and a["data"] for a in answers)
    assert [e["fault"] for e in await api_log(app)][1:] == ["answer", "answer", None]


@pytest.mark.parametrize(
    ("spec", "status", "text"),
    [
        ({"patch": {"usage": None}}, 200, None),
        ({"patch": {"usage": {"video_duration": "8"}}}, 200, '"video_duration":"8"'),
        ({"patch": {"usage": {"video_duration": -3}}}, 200, '"video_duration":-3'),
        (
            {"raw": '{"status":"succeeded","usage":{"video_duration":NaN}}'},
            200,
            '{"status":"succeeded","usage":{"video_duration":NaN}}',
        ),
        ({"body": "a string"}, 200, '"a string"'),
        ({"body": None}, 200, "null"),
        ({"status": 503}, 503, '"type":"server_error"'),
        ({"status": 404, "body": {"error": {"code": "task_not_found"}}}, 404, '{"error":{"code":"task_not_found"}}'),
    ],
)
async def test_scripted_poll_answers(spec, status, text):
    app = sim(task_seconds=0)
    async with client(app) as api:
        task_id = (await create(api)).json()["id"]
        await fault(app, mode="answer", routes=["poll"], count=1, **spec)
        reply = await poll(api, task_id)
    assert reply.status_code == status and reply.headers["content-type"] == "application/json"
    if text is None:
        assert "usage" not in reply.json() and reply.json()["status"] == "succeeded"
    else:
        assert text in reply.text


async def test_scripted_answer_of_one_task_wins_over_every_task_and_every_key():
    app = sim(task_seconds=0)
    async with client(app) as api:
        first, second = [(await create(api)).json()["id"] for _ in range(2)]
    await fault(app, key="*", mode="answer", routes=["poll"], body={"every": "task"})
    await fault(app, key="*", mode="answer", task_id=first, body={"one": "task"})
    async with client(app) as api:
        assert (await poll(api, first)).json() == {"one": "task"}
        assert (await poll(api, second)).json() == {"every": "task"}
    async with client(app, OTHER) as api:
        other = (await create(api)).json()["id"]
        assert (await poll(api, other)).json() == {"every": "task"}


async def test_a_create_answered_5xx_still_creates_its_task():
    app = sim()
    await fault(app, mode="answer", routes=["create"], status=502, count=1)
    async with client(app) as api:
        reply = await create(api)
        normal = await create(api)
    assert reply.status_code == 502 and reply.json()["error"]["type"] == "server_error"
    [failed, ok] = await creates(app)
    assert failed["status"] == 502 and failed["created"] in app.state.simulator.tasks
    assert (failed["answer"], failed["fault"]) == ("sent", "answer")
    assert ok["created"] == normal.json()["id"] and len(app.state.simulator.tasks) == 2


async def test_fixed_id_makes_duplicates_without_replacing_the_first_task():
    app = sim(task_seconds=0)
    await fault(app, key="*", mode="fixed_id", id="cgt-duplicate", count=2)
    async with client(app) as api:
        first = await create(api, prompt="the first")
    async with client(app, OTHER) as api:
        second = await create(api, prompt="the second")
        assert (await poll(api, "cgt-duplicate")).status_code == 404  # the id stays the first key's
        real_second = (await creates(app))[1]["created"]
        assert (await poll(api, real_second)).json()["status"] == "succeeded"
        third = await create(api)
    assert first.json()["id"] == second.json()["id"] == "cgt-duplicate"
    assert third.json()["id"] not in ("cgt-duplicate", real_second)
    tasks = app.state.simulator.tasks
    assert tasks["cgt-duplicate"].request["prompt"] == "the first" and tasks["cgt-duplicate"].key == KEY
    assert tasks[real_second].request["prompt"] == "the second" and tasks[real_second].key == OTHER
    assert [(e["task_id"], e["fault"]) for e in await creates(app)] == [
        ("cgt-duplicate", "fixed_id"),
        ("cgt-duplicate", "fixed_id"),
        (third.json()["id"], None),
    ]


async def test_late_answer_creates_the_task_before_answering():
    app = sim()
    await fault(app, mode="late", routes=["create"], delay_s=0.3, count=1)
    async with client(app) as api:
        start = time.perf_counter()
        pending = asyncio.ensure_future(create(api))
        await asyncio.sleep(0.1)
        assert len(app.state.simulator.tasks) == 1 and not pending.done()
        reply = await pending
    assert time.perf_counter() - start >= 0.3
    assert reply.status_code == 200 and reply.json()["id"] in app.state.simulator.tasks


async def test_late_answer_after_the_client_gave_up_under_uvicorn():
    app = sim()
    await fault(app, mode="late", routes=["create"], delay_s=30, count=1)
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as api:
        with pytest.raises(httpx.ReadTimeout):
            await api.post("/v1/videos/generations", json=BODY, timeout=0.3)
        [entry] = await creates(app)
        task_id = entry["created"]
        assert (await poll(api, task_id)).json()["id"] == task_id  # whoever knows the id may poll it
        for _ in range(100):  # the server notices the client left on its own schedule
            if (await creates(app))[0]["answer"] is not None:
                break
            await asyncio.sleep(0.02)
    [entry] = await creates(app)
    assert (entry["status"], entry["answer"], entry["fault"]) == (None, "none", "late")


async def test_cut_answer_creates_and_drops_the_connection_mid_body():
    app = sim()
    await fault(app, mode="cut", routes=["create", "poll"], count=2)
    async with served(app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as api:
        with pytest.raises(httpx.RemoteProtocolError):
            await create(api)
        task_id = (await creates(app))[0]["created"]
        with pytest.raises(httpx.RemoteProtocolError):
            await poll(api, task_id)
        assert (await poll(api, task_id)).status_code == 200
    log = await api_log(app)
    assert [(e["route"], e["status"], e["answer"]) for e in log] == [
        ("create", 200, "cut"),
        ("poll", 200, "cut"),
        ("poll", 200, "sent"),
    ]
    assert log[0]["task_id"] == task_id in app.state.simulator.tasks


async def test_cut_answer_sends_half_the_body_then_drops():
    app = sim()
    await fault(app, mode="cut", routes=["create"])
    async with served(app) as base:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        reader, writer = await asyncio.open_connection(host, port)
        payload = orjson.dumps(BODY)
        writer.write(
            b"POST /v1/videos/generations HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        raw = await asyncio.wait_for(_read_until_closed(reader), 5)
        writer.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    assert head.startswith(b"HTTP/1.1 200") and len(body) == length // 2 and body.startswith(b'{"id":"cgt-')


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_cut_in_process_raises_after_creating():
    app = sim()
    await fault(app, mode="cut", routes=["create"])
    async with client(app) as api:
        with pytest.raises(ConnectionResetError):
            await create(api)
    assert len(app.state.simulator.tasks) == 1


async def test_creates_list_every_create_with_its_outcome():
    app = sim()
    async with client(app) as api:
        ok = (await create(api)).json()["id"]
        await create(api, duration=99)
        await fault(app, mode="500", routes=["create"], count=1)
        await create(api)
        await fault(app, mode="answer", routes=["create"], status=504, count=1)
        await create(api)
        await api.get(f"/v1/videos/generations/{ok}")
    listing = await creates(app)
    assert [(e["status"], e["fault"], e["answer"]) for e in listing] == [
        (200, None, "sent"),
        (400, None, "sent"),
        (500, "500", "sent"),
        (504, "answer", "sent"),
    ]
    assert [e["created"] is not None for e in listing] == [True, False, False, True]
    assert listing[0]["created"] == ok and {e["key"] for e in listing} == {KEY}
    assert len(app.state.simulator.tasks) == 2


async def test_a_fault_for_every_key_and_its_clearing():
    app = sim()
    await fault(app, key="*", mode="500", routes=["create"])
    async with client(app) as api:
        mine = await create(api)
    async with client(app, OTHER) as api:
        other = await create(api)
        assert (await control(app, "DELETE", "/_sim/faults/*")).status_code == 200
        after = await create(api)
    assert (mine.status_code, other.status_code, after.status_code) == (500, 500, 200)


async def test_a_key_fault_wins_over_an_every_key_fault():
    app = sim()
    await fault(app, key="*", mode="500")
    await fault(app, mode="403")
    async with client(app) as api:
        assert (await create(api)).status_code == 403
    async with client(app, OTHER) as api:
        assert (await create(api)).status_code == 500


@pytest.mark.parametrize(
    "spec",
    [
        {"key": KEY, "mode": "fixed_id"},
        {"key": KEY, "mode": "500", "id": "cgt-x"},
        {"key": KEY, "mode": "fixed_id", "id": "cgt-x", "routes": ["poll"]},
        {"key": KEY, "mode": "answer", "body": 1, "patch": {}},
        {"key": KEY, "mode": "answer", "status": 99},
        {"key": KEY, "mode": "answer", "patch": [1]},
        {"key": KEY, "mode": "answer", "raw": 5},
        {"key": KEY, "mode": "500", "status": 502},
        {"key": KEY, "mode": "500", "body": {}},
        {"key": KEY, "mode": "answer", "task_id": "cgt-x", "routes": ["create"]},
        {"key": KEY, "mode": "500", "routes": ["media"]},
        {"key": "*", "mode": "answer", "routes": ["media"], "patch": {}},
        {"key": KEY, "mode": "answer", "task_id": ""},
    ],
)
def test_bad_knob_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_fault(spec)


def test_task_id_defaults_to_its_polls_and_cancels():
    fault_ = parse_fault({"key": "*", "mode": "answer", "task_id": "cgt-x", "body": {"a": 1}})
    assert fault_.routes == ("poll", "delete") and fault_.body == '{"a":1}'
    assert parse_fault({"key": KEY, "mode": "fixed_id", "id": "cgt-x"}).routes == ("create",)


# --- the same knobs through the e2e harness, against a real simulator process ----------------


def test_harness_knobs_against_a_simulator_process(tmp_path):
    proc = Simulator(tmp_path, task_seconds=0.0, video_size=4096)
    proc.start()
    try:
        with httpx.Client(base_url=proc.url + "/api/v1", headers=AUTH, timeout=5) as api:
            _harness_knobs(proc, api)
    finally:
        proc.stop()


def _harness_knobs(proc: Simulator, api: httpx.Client) -> None:
    url = "/videos/generations"
    first = api.post(url, json=BODY).json()["id"]
    proc.script_poll(first, patch={"usage": {"video_duration": 1e14}})
    assert api.get(f"{url}/{first}").json()["usage"] == {"video_duration": 1e14}
    done = api.get(f"{url}/{first}").json()
    assert done["usage"] == {"video_duration": 8}
    video = httpx.get(done["data"][0]["video_url"])
    assert video.content == proc.expected_bytes(first) and len(video.content) == 4096
    assert httpx.get(done["data"][0]["cover_image_url"]).content == proc.expected_bytes(first, "cover")
    assert [(d["task_id"], d["status"]) for d in proc.downloads()] == [(first, 200), (first, 200)]
    proc.media(ttl_s=0)
    assert httpx.get(done["data"][0]["video_url"]).status_code == 403
    proc.fixed_id(KEY, first)
    assert api.post(url, json=BODY).json()["id"] == first
    proc.create_then_fail(KEY, 503)
    assert api.post(url, json=BODY).status_code == 503
    proc.late_create(KEY, 5)
    with pytest.raises(httpx.ReadTimeout):
        api.post(url, json=BODY, timeout=0.3)
    proc.cut(KEY)
    with pytest.raises(httpx.RemoteProtocolError):
        api.post(url, json=BODY)
    listing = proc.creates()
    assert [e["fault"] for e in listing] == [None, "fixed_id", "answer", "late", "cut"]
    assert len(proc.created_task_ids()) == 5 and proc.created_task_ids()[1] != first
    proc.clear_faults()
    assert httpx.get(done["data"][0]["video_url"]).status_code == 200
    proc.clear_requests()
    assert proc.creates() == [] and proc.downloads() == []
