"""The admin routes through the app, on SQLite and on Redis: an operator's resolution of a create whose
outcome is unknown is strict, shown in the ledger, final, and counted in the spend metrics once (SPEC §4)."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.routes import ledger
from gateway.store.redis.store import RedisStore
from tests.doubles import MODEL, USER_KEY, FakeClock, FakeUpstream, body, make_settings

ADMIN_TOKEN = "adm-unit-test-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LABELS = {"team": "red", "model": MODEL, "resolution": "720p"}


class Admin:
    """The app with a fake TokenHub, a client of team red's user and the operator's headers."""

    def __init__(self, client: TestClient, upstream: FakeUpstream, clock: FakeClock, metrics: Metrics) -> None:
        self.client = client
        self.upstream = upstream
        self.clock = clock
        self.metrics = metrics

    def unknown_create(self) -> str:
        """A create TokenHub answers 502 (its outcome unknown): the ledger row's id."""
        self.upstream.status = 502
        answer = self.client.post("/v1/videos/generations", json=body())
        self.upstream.status = None
        assert (answer.status_code, answer.json()["error"]["code"]) == (502, "upstream_server_error"), answer.text
        return str(self.ledger()[-1]["task_id"])

    def ledger(self, **query: str) -> list[dict[str, Any]]:
        answer = self.client.get("/admin/usage", params=query, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        return list(answer.json()["data"])

    def row(self, ref: str) -> dict[str, Any]:
        return next(row for row in self.ledger() if row["task_id"] == ref)

    def resolve(self, ref: str, how: str, **fields: Any) -> Any:
        kwargs: dict[str, Any] = {"json": fields} if how == "settle" else {}
        return self.client.post(f"/admin/tasks/{ref}/{how}", headers=ADMIN, **kwargs)

    def spent(self) -> float:
        return float(self.client.get("/v1/usage").json()["team"]["spent_usd"])

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or LABELS) or 0.0


@pytest.fixture(params=["sqlite", "redis"])
def admin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Admin]:
    store = None
    url = f"sqlite:///{tmp_path / 'admin.db'}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        store = RedisStore(url, prefix=f"admin:{uuid.uuid4().hex[:8]}:")
    settings = make_settings(url, server={"admin_token_env": "ADMIN_TOKEN"}, env={"ADMIN_TOKEN": ADMIN_TOKEN})
    upstream = FakeUpstream()
    clock = FakeClock(time.time())  # Redis stamps some records with its own clock: keep ours near it
    metrics = Metrics()
    app = create_app(settings, upstream=upstream, store=store, clock=clock, metrics=metrics, run_poller=False)
    with TestClient(app, base_url="http://gw", headers={"Authorization": f"Bearer {USER_KEY}"}) as client:
        yield Admin(client, upstream, clock, metrics)


@pytest.mark.parametrize(
    "fields",
    [
        {"video_seconds": None},
        {"video_seconds": 0},
        {"video_seconds": -1},
        {"video_seconds": 60.001},
        {"video_seconds": "5"},
        {"video_seconds": True},
        {"video_seconds": [5]},
        {},
    ],
    ids=["null", "zero", "negative", "over-60", "string", "bool", "list", "missing"],
)
def test_settle_takes_only_a_number_of_seconds_in_range(admin, fields):
    ref = admin.unknown_create()
    before = admin.row(ref)
    answer = admin.resolve(ref, "settle", **fields)
    assert (answer.status_code, answer.json()["error"]["param"]) == (400, "video_seconds"), answer.text
    assert admin.row(ref) == before  # still unknown, still charged its estimate
    assert (before["status"], before["cost_usd"], before["cost_estimated"]) == ("unknown", 1.0, True)
    assert admin.spent() == 1.0


@pytest.mark.parametrize(
    "raw",
    [b'{"video_seconds": 1e400}', b'{"video_seconds": 0, "video_seconds": 5}', b'{"video_seconds": NaN}'],
    ids=["overflows-to-infinity", "repeated-key", "nan"],
)
def test_settle_names_video_seconds_for_a_body_that_is_not_one_finite_number(admin, raw):
    ref = admin.unknown_create()
    before = admin.row(ref)
    answer = admin.client.post(f"/admin/tasks/{ref}/settle", headers=ADMIN, content=raw)
    assert (answer.status_code, answer.json()["error"]["param"]) == (400, "video_seconds"), answer.text
    assert admin.row(ref) == before


def test_settle_reads_a_small_body_only(admin):
    ref = admin.unknown_create()
    padded = b'{"video_seconds": 5' + b" " * 5000 + b"}"
    answer = admin.client.post(f"/admin/tasks/{ref}/settle", headers=ADMIN, content=padded)
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "body_too_large"), answer.text
    assert admin.row(ref)["status"] == "unknown"


def test_a_void_shows_who_and_when_and_is_final(admin):
    ref = admin.unknown_create()
    admin.clock.now += 60
    voided = admin.resolve(ref, "void")
    assert voided.status_code == 200, voided.text
    row = voided.json()
    assert (row["status"], row["cost_usd"], row["billed_seconds"], row["cost_estimated"]) == ("voided", 0.0, 0.0, False)
    assert (row["resolved_by"], row["resolved_at"]) == ("admin", admin_iso(admin.clock.now))
    assert admin.row(ref) == row
    assert admin.spent() == 0.0
    for how, fields in (("void", {}), ("settle", {"video_seconds": 4})):
        again = admin.resolve(ref, how, **fields)
        assert (again.status_code, again.json()["error"]["code"]) == (409, "task_not_unknown"), again.text
    assert admin.row(ref) == row
    assert admin.spent() == 0.0


def test_a_settle_prices_the_row_as_succeeded_and_is_final(admin):
    ref = admin.unknown_create()
    admin.clock.now += 60
    settled = admin.resolve(ref, "settle", video_seconds=4)
    assert settled.status_code == 200, settled.text
    row = settled.json()
    assert (row["status"], row["cost_usd"], row["billed_seconds"], row["cost_estimated"]) == (
        "succeeded",
        0.8,
        4.0,
        False,
    )
    assert (row["resolved_by"], row["resolved_at"]) == ("admin", admin_iso(admin.clock.now))
    assert admin.spent() == 0.8
    for how, fields in (("void", {}), ("settle", {"video_seconds": 4}), ("settle", {"video_seconds": 10})):
        again = admin.resolve(ref, how, **fields)
        assert (again.status_code, again.json()["error"]["code"]) == (409, "task_not_unknown"), again.text
    assert admin.row(ref) == row
    assert admin.spent() == 0.8


def test_the_ledger_shows_resolutions_in_json_and_csv(admin):
    voided = admin.unknown_create()
    settled = admin.unknown_create()
    waiting = admin.unknown_create()
    admin.resolve(voided, "void")
    admin.resolve(settled, "settle", video_seconds=12.5)
    shown = {row["task_id"]: (row["status"], row["resolved_by"]) for row in admin.ledger()}
    assert shown == {voided: ("voided", "admin"), settled: ("succeeded", "admin"), waiting: ("unknown", None)}
    answer = admin.client.get("/admin/usage", params={"format": "csv"}, headers=ADMIN)
    rows = {row["task_id"]: row for row in csv.DictReader(io.StringIO(answer.text))}
    assert (rows[settled]["status"], rows[settled]["resolved_by"]) == ("succeeded", "admin")
    assert rows[settled]["resolved_at"] and not rows[waiting]["resolved_at"]


def test_spend_metrics_count_an_unknown_create_only_once_it_is_resolved(admin):
    voided = admin.unknown_create()
    settled = admin.unknown_create()
    assert admin.metric("tokenhub_gateway_tasks_unknown_total", team="red", reason="server_error") == 2
    assert admin.spent() == 2.0  # the estimates are in the budget until an operator resolves them ...
    assert admin.metric("tokenhub_gateway_spend_usd_total") == 0.0  # ... but not in the spend counters
    assert admin.metric("tokenhub_gateway_video_seconds_total") == 0.0
    admin.resolve(voided, "void")
    assert admin.metric("tokenhub_gateway_spend_usd_total") == 0.0
    assert admin.metric("tokenhub_gateway_video_seconds_total") == 0.0
    admin.resolve(settled, "settle", video_seconds=4)
    assert admin.metric("tokenhub_gateway_spend_usd_total") == pytest.approx(0.8)
    assert admin.metric("tokenhub_gateway_video_seconds_total") == pytest.approx(4.0)
    admin.resolve(settled, "settle", video_seconds=4)  # refused: counted once
    assert admin.metric("tokenhub_gateway_spend_usd_total") == pytest.approx(0.8)
    ledger_spend = sum(row["cost_usd"] for row in admin.ledger() if row["status"] != "unknown")
    assert admin.metric("tokenhub_gateway_spend_usd_total") == pytest.approx(ledger_spend) == admin.spent()


def admin_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# the ledger at scale (SPEC §17): grouped figures from the store, rows in pages, exports streamed


def settled_tasks(admin: Admin, count: int) -> list[str]:
    """`count` creates of team red, every third left running, the rest succeeded or failed by a poll."""
    ids = []
    for n in range(count):
        answer = admin.client.post("/v1/videos/generations", json=body(duration=4 + n % 3))
        assert answer.status_code == 200, answer.text
        task_id = answer.json()["id"]
        if n % 3:
            admin.upstream.finish(task_id, "succeeded" if n % 3 == 1 else "failed")
            assert admin.client.get(f"/v1/videos/generations/{task_id}").status_code == 200
        admin.clock.now += 3600 * 7  # the rows span several days
        ids.append(task_id)
    return ids


def test_the_listing_pages_through_every_row_once_and_the_exports_send_them_all(admin):
    ids = settled_tasks(admin, 7) + [admin.unknown_create()]
    seen, after, pages = [], None, 0
    while True:
        answer = admin.client.get(
            "/admin/usage", params={"limit": 3, **({"after": after} if after else {})}, headers=ADMIN
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        pages += 1
        assert (page["object"], page["group_by"], len(page["data"]) <= 3) == ("list", None, True)
        seen += page["data"]
        assert page["has_more"] == (page["next_after"] is not None)
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert [row["task_id"] for row in seen] == ids and pages == 3
    assert admin.ledger() == seen  # the default page holds them all
    exported = admin.client.get("/admin/usage", params={"format": "json"}, headers=ADMIN).json()
    assert exported == {"object": "list", "group_by": None, "data": seen, "has_more": False, "next_after": None}
    answer = admin.client.get("/admin/usage", headers={**ADMIN, "Accept": "text/csv"})
    lines = answer.text.splitlines()
    assert answer.headers["content-type"].startswith("text/csv") and len(lines) == len(ids) + 1
    assert [row["task_id"] for row in csv.DictReader(io.StringIO(answer.text))] == ids


def test_grouped_figures_come_from_the_store_without_loading_rows(admin, monkeypatch):
    settled_tasks(admin, 6)
    admin.unknown_create()
    store = admin.client.app.gateway.store  # type: ignore[attr-defined]
    rows = admin.client.portal.call(store.ledger, None, None, None, None, None)
    since, until = int(rows[1].created_at) - 1, int(rows[-2].created_at) + 1  # whole seconds, as given

    def loads_every_row(*args: Any) -> None:
        raise AssertionError("the grouped figures loaded the ledger's rows")

    monkeypatch.setattr(store, "ledger", loads_every_row)
    for by in ("team", "user", "model", "day"):
        assert admin.ledger(group_by=by) == ledger.group(rows, by)
        window = [t for t in rows if since <= t.created_at < until]
        iso = {"since": admin_iso(since), "until": admin_iso(until)}
        assert admin.ledger(group_by=by, **iso) == ledger.group(window, by)
    teams = admin.client.get("/admin/usage", params={"group_by": "team", "format": "csv"}, headers=ADMIN)
    assert teams.text.splitlines()[0] == "team," + ",".join(ledger.GROUP_FIELDS)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"after": "x" * 300}, "after"),
        ({"after": "not\ta cursor"}, "after"),
        ({"group_by": "team", "limit": "5"}, "limit"),
        ({"format": "csv", "after": "1.5:abc"}, "after"),
        ({"format": "xml"}, "format"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01"}, "until"),
    ],
)
def test_bad_paging_and_filters_are_invalid_parameters(admin, query, param):
    answer = admin.client.get("/admin/usage", params=query, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "code": "invalid_parameter",
        "param": param,
    }


def test_a_cursor_the_store_never_gave_is_an_invalid_after(admin):
    settled_tasks(admin, 2)
    answer = admin.client.get("/admin/usage", params={"after": "garbage"}, headers=ADMIN)
    assert (answer.status_code, answer.json()["error"]["param"]) == (400, "after"), answer.text
