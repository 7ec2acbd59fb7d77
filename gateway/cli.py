"""tokenhub-gateway serve / demo / simulator / keys new / check-config / usage / healthcheck / admin."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.admin_cli import add_admin_parser

if TYPE_CHECKING:  # the server, the config and the store are imported by the commands that use them, so that
    # `admin …` (HTTP only) starts without them
    from gateway.settings import Settings
    from gateway.store.base import Task

DEMO_TEAM, DEMO_USER = "demo", "demo-user"


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve_settings

    settings = _load(args.config)
    if settings is None:
        return 2
    if args.workers > 1:
        from gateway import logs
        from gateway.store.redis.url import is_redis_url
        from gateway.supervisor import Supervisor

        if not is_redis_url(settings.store.url.reveal()):
            print(
                f"{args.config}: serve --workers {args.workers} needs a Redis store (store.url redis://…): "
                "the SQLite store serves one process; run without --workers, or share a Redis",
                file=sys.stderr,
            )
            return 2
        logs.configure()
        return Supervisor(
            settings, args.workers, args.host or settings.server.host, args.port or settings.server.port
        ).run()
    serve_settings(settings, args.host, args.port)
    return 0


def demo_settings(
    sim_port: int, db: Path, user_key: str, webhook_url: str | None = None, webhook_secret: str = ""
) -> Settings:
    from gateway.config import parse_settings
    from gateway.policy.auth import key_sha256

    data: dict[str, Any] = {
        "archive": {"dir": str(db.parent / "videos")},  # the videos outlive the simulator's URLs
        "server": {"admin_token_env": "GATEWAY_ADMIN_TOKEN"},
        "upstream": {
            "base_url": f"http://127.0.0.1:{sim_port}/api/v1",
            "timeout_s": 30,
            "media_allow_networks": ["127.0.0.1/32"],  # the simulator's result files (SPEC §4)
            "keys": [
                {"name": "sim-a", "value_env": "DEMO_KEY_A", "weight": 2},
                {"name": "sim-b", "value_env": "DEMO_KEY_B"},
            ],
        },
        "store": {"url": f"sqlite:///{db}"},
        "poller": {"interval_s": 5},
        "teams": {DEMO_TEAM: {"budget_usd": 20.0, "requests_per_minute": 30, "max_concurrent_tasks": 5}},
        "users": {DEMO_USER: {"team": DEMO_TEAM, "key_sha256": key_sha256(user_key), "role": "team_admin"}},
    }
    if webhook_url:
        data["webhooks"] = [{"name": "demo", "url": webhook_url, "secret_env": "DEMO_WEBHOOK_SECRET"}]
    env = {
        "DEMO_KEY_A": "th-demo-simulated-key-a",
        "DEMO_KEY_B": "th-demo-simulated-key-b",
        "GATEWAY_ADMIN_TOKEN": os.environ.get("GATEWAY_ADMIN_TOKEN", ""),
        "DEMO_WEBHOOK_SECRET": webhook_secret,
    }
    return parse_settings(data, env)


def cmd_demo(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.policy.auth import new_key
    from gateway.serve import serve_settings
    from gateway.simulator.app import create_simulator
    from gateway.simulator.app import uvicorn_config as sim_config

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="tokenhub-gateway-demo-"))
    user_key = new_key()
    webhook_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode() if args.webhook_url else ""
    settings = demo_settings(args.sim_port, data_dir / "gateway.db", user_key, args.webhook_url, webhook_secret)
    sim = uvicorn.Server(sim_config(create_simulator(task_seconds=args.task_seconds), "127.0.0.1", args.sim_port))
    thread = threading.Thread(target=sim.run, name="simulator", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{args.port}/api/v1"
    ready = {
        "event": "demo.ready",
        "gateway": base,
        "simulator": f"http://127.0.0.1:{args.sim_port}",
        "store": str(data_dir / "gateway.db"),
        "archive": str(data_dir / "videos"),
        **({"webhook_url": args.webhook_url, "webhook_secret": webhook_secret} if args.webhook_url else {}),
        "team": DEMO_TEAM,
        "user": DEMO_USER,
        "api_key": user_key,
        "try": _demo_curl(base, user_key),
        "console": f"http://127.0.0.1:{args.port}/console/",  # sign in with the api_key: the videos play there
        "console_key": user_key,
    }
    print(json.dumps(ready, separators=(",", ":")), flush=True)
    try:
        serve_settings(settings, "127.0.0.1", args.port)
    finally:
        sim.should_exit = True
        thread.join(timeout=5)
    return 0


def _demo_curl(base: str, key: str) -> str:
    body = '{"model": "doubao-seedance-2.0-fast", "prompt": "A red fox running through snow", "duration": 5}'
    return (
        f"curl -s {base}/videos/generations -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )


def cmd_simulator(args: argparse.Namespace) -> int:
    from gateway.simulator.app import run_simulator

    run_simulator(args.host, args.port, task_seconds=args.task_seconds, keys=args.key)
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from gateway.policy.auth import key_sha256, new_key

    key = new_key()
    print(f"# The key for {args.user}; it is shown once and stored nowhere: give it to the user.")
    print(key)
    print()
    print("# Paste into gateway.toml:")
    print(f"[users.{args.user}]")
    print(f'team = "{args.team}"')
    print(f'key_sha256 = "{key_sha256(key)}"')
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return 1
    print(
        f"{args.config}: OK ({len(settings.upstream.keys)} upstream keys, {len(settings.teams)} teams, "
        f"{len(settings.users)} users, store {settings.store.url.reveal().split('://')[0]})"
    )
    days = settings.ledger.retention_days
    kept = "kept for ever" if days is None else f"deleted after {days} days (the per-day figures stay)"
    print(f"ledger.retention_days: settled tasks {kept}")
    server = settings.server
    sso = f"; single sign-on from {server.console_trusted_header}" if server.console_trusted_header else ""
    shown = f"at /console/ (sessions of {server.console_session_hours:g} h{sso})" if server.console else "off"
    print(f"server.console: {shown}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Grouped figures from the store's aggregates; rows written a page at a time as they are read."""
    import asyncio

    from gateway.errors import GatewayError
    from gateway.routes import ledger
    from gateway.store import open_store

    settings = _load(args.config)
    if settings is None:
        return 2

    async def run() -> None:
        flt = ledger.ledger_filter(vars(args))
        before = ledger.parse_time(args.prune_before) if args.prune_before else None
        store = open_store(settings.store)
        await store.open()
        try:
            if before is not None:
                pruned = await store.prune(before)
                sys.stdout.write(f"pruned {pruned} settled tasks created before {args.prune_before}\n")
            elif args.group_by:
                groups = [ledger.group_row(args.group_by, g) for g in await store.aggregate(args.group_by, flt)]
                sys.stdout.write(_rendered(groups, args.format))
            else:
                await _write_rows(ledger.pages(store, flt, None), args.format)
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except (ValueError, GatewayError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


def _rendered(rows: list[dict[str, Any]], fmt: str) -> str:
    from gateway.routes import ledger

    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    return ledger.to_csv(rows) if fmt == "csv" else ledger.to_table(rows)


async def _write_rows(pages: AsyncIterator[list[Task]], fmt: str) -> None:
    """Rows to stdout page by page: CSV with its header once, a JSON array, or a table whose columns are
    as wide as the first page needs."""
    from gateway.routes import ledger

    out = sys.stdout
    if fmt == "csv":
        async for chunk in ledger.csv_stream(pages):
            out.write(chunk.decode())
        return
    widths: list[int] | None = None
    written = 0
    async for tasks in pages:
        rows = [ledger.row(task) for task in tasks]
        if fmt == "json":
            out.write("".join(("[\n" if written + i == 0 else ",\n") + _indented(r) for i, r in enumerate(rows)))
        else:
            widths = widths or ledger.table_widths(rows)
            out.write(ledger.table_lines(rows, widths, header=written == 0))
        written += len(rows)
    if fmt == "json":
        out.write("\n]\n" if written else "[]\n")
    elif not written:
        out.write(ledger.to_table([]))


def _indented(row: dict[str, Any]) -> str:
    return "\n".join("  " + line for line in json.dumps(row, indent=2).splitlines())


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when /healthz answers on the address the config names: a container's HEALTHCHECK.

    Only [server] is read, so a config file replaced but not yet reloaded cannot make a running
    gateway look unhealthy."""
    from gateway.settings import ServerSettings

    try:
        server = tomllib.loads(Path(args.config).read_text()).get("server", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    host = server.get("host", ServerSettings.host)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.get('port', ServerSettings.port)}/healthz"
    # A proxy from the environment must not answer for this process.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


def _load(path: str) -> Settings | None:
    from gateway.config import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


class _LedgerGroups:
    """`usage --group-by`'s choices, read from the ledger only when argparse checks or shows them."""

    def __contains__(self, value: object) -> bool:
        return value in self._groups()

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups())

    @staticmethod
    def _groups() -> tuple[str, ...]:
        from gateway.routes.ledger import GROUPS

        return tuple(GROUPS)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tokenhub-gateway", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1, help="processes on the one port (needs a Redis store)")
    serve.set_defaults(func=cmd_serve)
    demo = commands.add_parser("demo", help="run the gateway with the built-in TokenHub simulator")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--sim-port", type=int, default=8090)
    demo.add_argument("--task-seconds", type=float, default=8.0)
    demo.add_argument("--data-dir")
    demo.add_argument("--webhook-url", help="send signed video.completed / video.failed events here")
    demo.set_defaults(func=cmd_demo)
    simulator = commands.add_parser("simulator", help="run only the TokenHub simulator")
    simulator.add_argument("--host", default="127.0.0.1")
    simulator.add_argument("--port", type=int, required=True)
    simulator.add_argument("--task-seconds", type=float, default=3.0)
    simulator.add_argument("--key", action="append", help="an accepted th- key (default: any)")
    simulator.set_defaults(func=cmd_simulator)
    keys = commands.add_parser("keys", help="gateway keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_new = keys_commands.add_parser("new", help="issue a new gateway key")
    keys_new.add_argument("--user", required=True)
    keys_new.add_argument("--team", required=True)
    keys_new.set_defaults(func=cmd_keys_new)
    check = commands.add_parser("check-config", help="validate a config")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check_config)
    usage = commands.add_parser("usage", help="the usage ledger, read from the store")
    usage.add_argument("--config", required=True)
    usage.add_argument("--team")
    usage.add_argument("--user")
    usage.add_argument("--model")
    usage.add_argument("--since")
    usage.add_argument("--until")
    usage.add_argument("--group-by", choices=_LedgerGroups(), metavar="BY", help="one of: %(choices)s")
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.add_argument("--prune-before", help="delete settled tasks created before this date")
    usage.set_defaults(func=cmd_usage)
    health = commands.add_parser("healthcheck", help="exit 0 when the gateway the config describes answers /healthz")
    health.add_argument("--config", required=True)
    health.add_argument("--timeout", type=float, default=4.0)
    health.set_defaults(func=cmd_healthcheck)
    add_admin_parser(commands)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
