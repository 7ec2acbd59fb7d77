"""The gateway the benchmark runs (bench/run.py, bench/inprocess.py): its config, its user key and the
upstream keys it gets from the environment. Every feature is on; no limit can reject a request."""

from __future__ import annotations

import hashlib

CREATE_PATH = "/api/v1/videos/generations"
SDK_CREATE_PATH = "/api/v1/videos"  # the OpenAI shape's create (bench/create_sdk.lua)
USER_KEY = "tgw-bench-" + hashlib.sha256(b"tokenhub-gateway bench user").hexdigest()[:32]
UPSTREAM_KEYS = {"bench-a": "th-bench-upstream-key-aaaa1111", "bench-b": "th-bench-upstream-key-bbbb2222"}


def key_env_name(key_name: str) -> str:
    return f"BENCH_UPSTREAM_KEY_{key_name[-1].upper()}"


def upstream_key_env() -> dict[str, str]:
    """The environment the config's `value_env` entries read the upstream keys from."""
    return {key_env_name(name): value for name, value in UPSTREAM_KEYS.items()}


def gateway_toml(port: int, fake_port: int, store_url: str, rpm: bool = True) -> str:
    """Every feature on, and nothing that could reject a request of the benchmark.
    rpm=False leaves out requests_per_minute only, to show what the rate-limit window costs."""
    digest = hashlib.sha256(USER_KEY.encode()).hexdigest()
    keys = "".join(
        f"""
[[upstream.keys]]
name = "{name}"
value_env = "{key_env_name(name)}"
weight = 1
max_concurrent_tasks = 1000000
"""
        for name in UPSTREAM_KEYS
    )
    limits = "budget_usd = 1000000000.0\nvideo_seconds = 1000000000\nmax_concurrent_tasks = 100000000\n"
    if rpm:
        limits += "requests_per_minute = 10000000\n"
    return f"""[server]
host = "127.0.0.1"
port = {port}
shutdown_grace_s = 2

[upstream]
base_url = "http://127.0.0.1:{fake_port}/api/v1"
connect_timeout_s = 2
timeout_s = 10
{keys}
[store]
url = "{store_url}"

[poller]
interval_s = 86400
expire_after_s = 31536000

[teams.bench]
period = "month"
{limits}
[users.bench-user]
team = "bench"
key_sha256 = "{digest}"
{limits}"""
