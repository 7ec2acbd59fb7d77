"""The command line as a user runs it: real subprocesses."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import httpx

from gateway.store.sqlite.store import SQLiteStore
from tests.e2e.harness import free_port, wait_http
from tests.store.helpers import admitted

CLI = [sys.executable, "-m", "gateway.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, **kw)


def test_keys_new_prints_a_key_once_and_the_toml_to_paste():
    out = run("keys", "new", "--user", "alice", "--team", "marketing")
    assert out.returncode == 0
    key = next(line for line in out.stdout.splitlines() if line.startswith("tgw-"))
    toml = out.stdout[out.stdout.index("[users.alice]") :]
    user = tomllib.loads(toml)["users"]["alice"]
    assert user == {"team": "marketing", "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    assert run("keys", "new", "--user", "alice", "--team", "marketing").stdout != out.stdout


def test_check_config_reports_every_problem_with_its_location(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nport = "x"\nflavour = 1\n[upstream]\n[teams.red]\nperiod = "year"\n'
        '[users.bob]\nteam = "blue"\nkey_sha256 = "nothex"\n'
    )
    out = run("check-config", "--config", str(bad))
    assert out.returncode == 1
    for where in (
        "server.port",
        "server.flavour",
        "upstream.base_url",
        "upstream.keys",
        "teams.red.period",
        "users.bob.team",
        "users.bob.key_sha256",
    ):
        assert where in out.stderr, where
    good = tmp_path / "good.toml"
    good.write_text(
        '[upstream]\nbase_url = "https://tokenhub.store/api/v1"\n'
        '[[upstream.keys]]\nname = "primary"\nvalue_env = "TOKENHUB_KEY_PRIMARY"\n'
    )
    out = run("check-config", "--config", str(good), env={"TOKENHUB_KEY_PRIMARY": "th-x", "PATH": ""})
    assert out.returncode == 0 and "OK" in out.stdout


def test_check_config_names_the_setting_never_a_secret_and_strips_key_values(tmp_path):
    key, password = "th-leaky-0123456789.+/=abcd", "hunter2pw"
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'[server]\nadmin_token_env = "adm-{password}"\n'
        f'[upstream]\nbase_url = "https://tokenhub.store/api/v1"\n'
        f'[[upstream.keys]]\nname = "primary"\nvalue_env = "{key}"\n'
        f'[[upstream.keys]]\nname = "bell"\nvalue_env = "BELL"\n'
        f'[store]\nurl_env = "redis://:{password}@redis:6379/0"\n'
    )
    out = run("check-config", "--config", str(bad), env={"BELL": "th-ring\x07ring-0123456789", "PATH": ""})
    assert out.returncode == 1
    for where in (
        "server.admin_token_env",
        "upstream.keys[0].value_env",
        "upstream.keys[1].value_env",
        "store.url_env",
    ):
        assert where in out.stderr, (where, out.stderr)
    for secret in (key, key[:12], password, "ring"):
        assert secret not in out.stdout + out.stderr
    (tmp_path / "primary").write_text("th-primary-0123456789abcd\n")  # as a Kubernetes secret file holds it
    good = tmp_path / "good.toml"
    good.write_text(
        '[upstream]\nbase_url = "https://tokenhub.store/api/v1"\n'
        '[[upstream.keys]]\nname = "primary"\nvalue_file = "primary"\n'
        '[[upstream.keys]]\nname = "backup"\nvalue_env = "BACKUP"\n'
    )
    out = run("check-config", "--config", str(good), env={"BACKUP": "th-backup-0123456789wxyz\n", "PATH": ""})
    assert out.returncode == 0 and "OK" in out.stdout


def test_demo_serves_a_task_end_to_end_and_stops_both_on_ctrl_c(tmp_path):
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *CLI,
            "demo",
            "--port",
            str(port),
            "--sim-port",
            str(sim_port),
            "--task-seconds",
            "0.5",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "demo.ready" and ready["api_key"].startswith("tgw-")
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        api = httpx.Client(base_url=ready["gateway"], headers={"Authorization": f"Bearer {ready['api_key']}"})
        created = api.post("/videos/generations", json={"model": "doubao-seedance-2.0-fast", "prompt": "a fox"})
        tid = created.json()["id"]
        deadline = time.monotonic() + 10
        while api.get(f"/videos/generations/{tid}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert api.get("/usage").json()["team"]["spent_usd"] == 0.8  # 5 s × $0.16
        video = tmp_path / "videos" / "demo" / tid / "video.mp4"  # the archive is on, in the data directory
        while not video.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ready["archive"] == str(tmp_path / "videos")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    for p in (port, sim_port):
        try:
            httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=1)
            raise AssertionError(f"port {p} still answers after Ctrl-C")
        except httpx.ConnectError:
            pass
    for line in proc.stdout.read().splitlines():
        json.loads(line)  # every line the demo printed is JSON


def test_healthcheck_asks_the_address_the_config_names(tmp_path):
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        '[upstream]\nbase_url = "http://127.0.0.1:9/api/v1"\n'
        '[[upstream.keys]]\nname = "k"\nvalue_env = "K"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "gateway.db"}"\n'
    )
    down = run("healthcheck", "--config", str(config), "--timeout", "1")
    assert down.returncode == 1 and f"127.0.0.1:{port}/healthz" in down.stderr
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config)],
        env={**os.environ, "K": "th-x"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        assert run("healthcheck", "--config", str(config)).returncode == 0
        # A replaced file not yet reloaded: a wildcard host means loopback, and only [server] is read.
        # A proxy in the environment is not asked.
        config.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\n[upstream]\nbase_url = 1\n')
        up = run("healthcheck", "--config", str(config), env={**os.environ, "http_proxy": "http://127.0.0.1:9"})
        assert up.returncode == 0, up.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert run("healthcheck", "--config", str(tmp_path / "missing.toml")).returncode == 1


def test_usage_shows_an_operators_resolution_in_every_format(tmp_path):
    db = tmp_path / "gateway.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[upstream]\nbase_url = "http://127.0.0.1:9/api/v1"\n'
        '[[upstream.keys]]\nname = "k"\nvalue_env = "K"\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
    )
    resolved_at = 1_796_083_200.0  # 2026-12-01T00:00:00Z

    async def resolved_and_waiting() -> tuple[str, str]:
        store = SQLiteStore(str(db))
        await store.open()
        try:
            voided = await admitted(store, resolved_at - 60)
            waiting = await admitted(store, resolved_at - 30)
            for task in (voided, waiting):
                await store.mark_unknown(task.rid, resolved_at - 10, None)
            await store.resolve_unknown(voided.rid, "voided", 0, 0, "admin", resolved_at)
            return voided.rid, waiting.rid
        finally:
            await store.close()

    voided, waiting = asyncio.run(resolved_and_waiting())
    env = {**os.environ, "K": "th-x"}
    rows = {row["task_id"]: row for row in json.loads(usage_out(config, "json", env))}
    assert (rows[voided]["status"], rows[voided]["resolved_by"]) == ("voided", "admin")
    assert rows[voided]["resolved_at"] == "2026-12-01T00:00:00+00:00"
    assert (rows[waiting]["status"], rows[waiting]["resolved_by"], rows[waiting]["resolved_at"]) == (
        "unknown",
        None,
        None,
    )
    csv_rows = {row["task_id"]: row for row in csv.DictReader(io.StringIO(usage_out(config, "csv", env)))}
    assert (csv_rows[voided]["resolved_by"], csv_rows[voided]["resolved_at"]) == ("admin", "2026-12-01T00:00:00+00:00")
    assert (csv_rows[waiting]["resolved_by"], csv_rows[waiting]["resolved_at"]) == ("", "")
    header, *lines = usage_out(config, "table", env).splitlines()
    assert header.split()[-2:] == ["resolved_by", "resolved_at"]
    assert next(line for line in lines if line.startswith(voided)).split()[-2:] == [
        "admin",
        "2026-12-01T00:00:00+00:00",
    ]


def usage_out(config, form: str, env: dict[str, str]) -> str:
    out = run("usage", "--config", str(config), "--format", form, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout
