"""Gateway keys issued at scale (SPEC §15): a store seeded with N keys through the store's own operations, and what
N keys cost the gateway that loads them into memory.

    python bench/issued_keys.py [--keys 100000]     # RSS and start-up of a gateway with none and with N keys
    python bench/run.py --only gateway-sqlite --issued-keys 100000   # creates/s beside a gateway with none

Each key is what `POST /admin/users/{name}/keys` makes (tenancy.issue_key, Store.add_key with its audit row),
spread over users of one API team, 100 keys a user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from gateway.store.sqlite.store import SQLiteStore
from gateway.tenancy import AuditDraft, TeamRecord, UserRecord, issue_key

KEYS_PER_USER = 100
TEAM = "bench-keys"


async def _seed(path: Path, keys: int) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    try:
        audit = AuditDraft("admin", time.time())
        await store.save_team(TeamRecord(TEAM), audit, create=True)
        for first in range(0, keys, KEYS_PER_USER):
            user = f"kuser-{first // KEYS_PER_USER}"
            await store.save_user(UserRecord(user, TEAM), audit, create=True, team_in_store=True)
            for _ in range(min(KEYS_PER_USER, keys - first)):
                _, record = issue_key(user, TEAM, audit.at)
                await store.add_key(record, audit, user_in_store=True)
    finally:
        await store.close()


def seed_keys(path: Path, keys: int) -> str:
    """A SQLite store at `path` holding `keys` live keys (and their users, team and audit rows); its URL."""
    started = time.monotonic()
    asyncio.run(_seed(path, keys))
    with sqlite3.connect(path) as conn:  # the seeding's WAL folded in now, not by the gateway while measured
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"# seeded {keys} keys in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return f"sqlite:///{path}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(work: Path, store_url: str, name: str) -> tuple[int, float]:
    """A gateway on this store (bench/gateway_config.py's, in front of the fake upstream): its RSS after
    start-up and 200 authenticated requests, and how long it took to answer /healthz."""
    from gateway_config import USER_KEY, gateway_toml, upstream_key_env
    from processes import Procs, free_port, request

    procs = Procs()
    fake_port, port = free_port(), free_port()
    here = Path(__file__).resolve().parent
    try:
        fake = procs.start(
            "fake", [sys.executable, str(here / "fake_upstream.py"), "--port", str(fake_port)], work / "fake.log", None
        )
        fake.wait_http(f"http://127.0.0.1:{fake_port}/_stats", 30)
        config = work / f"{name}.toml"
        config.write_text(gateway_toml(port, fake_port, store_url))
        started = time.monotonic()
        gateway = procs.start(
            name,
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
            work / f"{name}.log",
            None,
            upstream_key_env(),
        )
        gateway.wait_http(f"http://127.0.0.1:{port}/healthz", 120)
        ready_s = time.monotonic() - started
        for _ in range(200):
            request(port, "GET", "/api/v1/models", headers={"Authorization": f"Bearer {USER_KEY}"})
        return rss_kib(gateway.pid), ready_s
    finally:
        procs.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seeded", help="a SQLite file seeded before (by an earlier run), instead of seeding anew")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(tempfile.mkdtemp(prefix="tokenhub-keys-"))
    empty_rss, empty_ready = measure(work, f"sqlite:///{work / 'none.db'}", "gateway-none")
    seeded = f"sqlite:///{args.seeded}" if args.seeded else seed_keys(work / "keys.db", args.keys)
    keys_rss, keys_ready = measure(work, seeded, "gateway-keys")
    print("| keys issued | RSS after start-up and 200 requests | ready (/healthz) |")
    print("|---:|---:|---:|")
    print(f"| 0 | {empty_rss / 1024:.1f} MiB | {empty_ready:.2f} s |")
    print(f"| {args.keys:,} | {keys_rss / 1024:.1f} MiB | {keys_ready:.2f} s |")
    growth = (keys_rss - empty_rss) / 1024
    print(
        f"\nRSS growth: {growth:.1f} MiB ({(keys_rss - empty_rss) * 1024 / max(args.keys, 1):.0f} bytes a key); "
        f"pid {os.getpid()}, work dir {work}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
