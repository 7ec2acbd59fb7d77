"""Every console page's latency on a large ledger (SPEC §16: each within 300 ms with 1,000,000 tasks).

    python bench/ledger.py seed --store URL --tasks 1000000        # once: a year of settled tasks, 50 teams
    python bench/console.py --store URL [--repeat 9]

Starts `python -m gateway.cli serve` on the seeded store (the archive on, so that the task list looks its covers
up; nothing upstream is ever called), signs in through the sign-in form as a member and a team admin of the
seeded team-000 and as the operator, then opens every page: one call to warm it, then --repeat timed calls,
one at a time. Prints one JSON line: per page the status, p50 and max in milliseconds, and the bytes sent.

URL: sqlite:////absolute/path.db, or redis://127.0.0.1:PORT/0 (a redis-server you started).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/console.py`: the repo root is not on the path
    sys.path.insert(0, str(ROOT))

from bench.ledger_seed import team_name, user_name  # noqa: E402 - needs the repo root on the path
from tests.procs import Process, free_port  # noqa: E402

ADMIN_TOKEN = "adm-bench-console"
TEAMS = 50
MEMBER_KEY = "tgw-bench-console-member"
ADMIN_KEY = "tgw-bench-console-team-admin"
TARGET_MS = 300


def config(url: str, port: int, work: Path) -> str:
    """The seeded teams, each with a budget; team-000's first user a member and its second its team admin, with
    keys of this benchmark's."""
    teams = "".join(
        f"[teams.{team_name(index)}]\nbudget_usd = 5000\nvideo_seconds = 100000\n\n" for index in range(TEAMS)
    )
    users = ""
    for index, (key, role) in enumerate(((MEMBER_KEY, "member"), (ADMIN_KEY, "team_admin"))):
        digest = hashlib.sha256(key.encode()).hexdigest()
        users += f'[users.{user_name(0, index)}]\nteam = "{team_name(0)}"\nkey_sha256 = "{digest}"\nrole = "{role}"\n\n'
    return f"""[server]
host = "127.0.0.1"
port = {port}
admin_token_env = "BENCH_ADMIN_TOKEN"

[upstream]
base_url = "http://127.0.0.1:{free_port()}/api/v1"

[[upstream.keys]]
name = "seed-a"
value_env = "BENCH_UPSTREAM_KEY"

[store]
url = "{url}"

[poller]
interval_s = 86400

[archive]
dir = "{work / "videos"}"

{teams}{users}"""


def signed_in(base: str, credential: str) -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
    form = client.get("/console/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    if token is None:
        raise RuntimeError(f"no sign-in form: {form.status_code}")
    answer = client.post("/console/sign-in", data={"csrf": token.group(1), "credential": credential})
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in refused: {answer.status_code}")
    return client


def timed(client: httpx.Client, path: str, repeat: int) -> dict[str, Any]:
    first = client.get(path)
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        answer = client.get(path)
        samples.append((time.perf_counter() - began) * 1000)
        if answer.status_code != first.status_code:
            raise RuntimeError(f"{path}: {first.status_code} then {answer.status_code}")
    return {
        "status": first.status_code,
        "p50_ms": round(statistics.median(samples), 1),
        "max_ms": round(max(samples), 1),
        "bytes": len(first.content),
    }


def a_task(client: httpx.Client) -> str:
    listed = client.get("/console/tasks").text
    found = re.search(r'href="/console/tasks/([^"/?]+)"', listed)
    if found is None:
        raise RuntimeError("the task list is empty: seed the store first")
    return found.group(1)


def pages(member: httpx.Client) -> dict[str, list[str]]:
    """Per role, the paths timed."""
    day = (datetime.now(UTC) - timedelta(days=180)).strftime("%Y-%m-%d")
    task = a_task(member)
    return {
        "member": [
            "/console/",
            "/console/tasks",
            "/console/tasks?status=failed",
            "/console/tasks?status=unknown",
            "/console/tasks?model=doubao-seedance-2.0-fast",
            f"/console/tasks?day={day}",
            f"/console/tasks?day={day}&status=expired",
            f"/console/tasks/{task}",
        ],
        "team_admin": ["/console/", "/console/team"],
        "operator": [
            "/console/",
            "/console/keys",
            "/console/webhooks",
            "/console/unknown",
            "/console/audit",
            f"/console/tasks/{task}",
        ],
    }


def run(url: str, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="console-bench-") as folder:
        work = Path(folder)
        port = free_port()
        (work / "gateway.toml").write_text(config(url, port, work))
        env = {"BENCH_ADMIN_TOKEN": ADMIN_TOKEN, "BENCH_UPSTREAM_KEY": "th-bench-unused"}
        gateway = Process(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(work / "gateway.toml")],
            work / "gateway.log",
            env,
            ROOT,
        )
        began = time.perf_counter()
        gateway.start()
        base = f"http://127.0.0.1:{port}"
        try:
            gateway.wait_http(base + "/healthz", timeout=600)
            out: dict[str, Any] = {"store": url.split("://")[0], "start_s": round(time.perf_counter() - began, 1)}
            clients = {
                "member": signed_in(base, MEMBER_KEY),
                "team_admin": signed_in(base, ADMIN_KEY),
                "operator": signed_in(base, ADMIN_TOKEN),
            }
            started = time.perf_counter()
            signed_in(base, MEMBER_KEY).close()  # the form, its post, the redirect's answer
            out["sign_in_ms"] = round((time.perf_counter() - started) * 1000, 1)
            for role, paths in pages(clients["member"]).items():
                out[role] = {path: timed(clients[role], path, repeat) for path in paths}
            worst = max(page["max_ms"] for role in ("member", "team_admin", "operator") for page in out[role].values())
            out["worst_ms"] = worst
            out["within_target"] = worst <= TARGET_MS
            for client in clients.values():
                client.close()
            return out
        finally:
            gateway.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a store seeded by bench/ledger.py seed")
    parser.add_argument("--repeat", type=int, default=9, help="timed calls per page after the first")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.store, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
