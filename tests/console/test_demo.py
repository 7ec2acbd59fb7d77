"""`tokenhub-gateway demo` prints the console's URL and a key that signs in to it; check-config says whether the
console is on."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import httpx

from tests.e2e.harness import free_port, wait_http

CLI = [sys.executable, "-m", "gateway.cli"]


def test_the_demo_prints_the_console_and_a_key_that_signs_in(tmp_path):
    port, sim_port = free_port(), free_port()
    args = ["demo", "--port", str(port), "--sim-port", str(sim_port), "--data-dir", str(tmp_path)]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["console"] == f"http://127.0.0.1:{port}/console/"
        wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        with httpx.Client(follow_redirects=False, timeout=10) as browser:
            form = browser.get(ready["console"] + "sign-in")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert token, form.text
            signed = browser.post(
                ready["console"] + "sign-in", data={"csrf": token.group(1), "credential": ready["console_key"]}
            )
            assert signed.status_code == 303
            team = browser.get(ready["console"] + "team")  # the demo's user is its team's admin
        assert team.status_code == 200 and "Issue a key" in team.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def test_check_config_says_where_the_console_is(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nconsole_session_hours = 8\nconsole_trusted_header = "X-Forwarded-Email"\n'
        'console_trusted_proxies = ["10.0.0.0/8"]\n'
        '[upstream]\nbase_url = "https://tokenhub.store/api/v1"\n'
        '[[upstream.keys]]\nname = "main"\nvalue_env = "KEY"\n'
    )
    out = subprocess.run(
        [*CLI, "check-config", "--config", str(config)], capture_output=True, text=True, timeout=30, env={"KEY": "th-x"}
    )
    assert out.returncode == 0, out.stderr
    assert "server.console: at /console/ (sessions of 8 h; single sign-on from X-Forwarded-Email)" in out.stdout
    config.write_text(config.read_text().replace("console_session_hours = 8", "console = false"))
    off = subprocess.run(
        [*CLI, "check-config", "--config", str(config)], capture_output=True, text=True, timeout=30, env={"KEY": "th-x"}
    )
    assert "server.console: off" in off.stdout
