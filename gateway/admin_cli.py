"""`tokenhub-gateway admin …`: a running gateway's admin API (SPEC §15), printed as tables, or `--json`.

    tokenhub-gateway admin teams list|show|create|change|delete
    tokenhub-gateway admin users list|show|create|change|delete
    tokenhub-gateway admin keys list|issue|revoke          the gateway keys apps send (tgw-…)
    tokenhub-gateway admin upstream-keys                   the TokenHub key pool
    tokenhub-gateway admin audit                           who changed what

The token comes from GATEWAY_ADMIN_TOKEN (the operator's token, or a team admin's own gateway key); `--url`
names the gateway (default $GATEWAY_URL, else http://127.0.0.1:8080).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_ENV = "GATEWAY_ADMIN_TOKEN"
UNSET = ("none", "null", "unlimited")  # a limit given as one of these is cleared (unlimited)
# Limits as command-line flags: flag → the body's field (SPEC §6's names).
LIMIT_FLAGS = {
    "--budget-usd": "budget_usd",
    "--video-seconds": "video_seconds",
    "--period": "period",
    "--requests-per-minute": "requests_per_minute",
    "--max-concurrent-tasks": "max_concurrent_tasks",
    "--models": "models",
    "--alert-thresholds": "alert_thresholds",
}
LISTS = ("models", "alert_thresholds")
TEAM_COLUMNS = (
    "name",
    "source",
    "period",
    "budget_usd",
    "spent_usd",
    "reserved_usd",
    "remaining_usd",
    "video_seconds_budget",
    "video_seconds_spent",
    "requests_per_minute",
    "max_concurrent_tasks",
    "tasks_in_flight",
)
USER_COLUMNS = (
    "name",
    "team",
    "role",
    "source",
    "email",
    "budget_usd",
    "video_seconds",
    "period",
    "requests_per_minute",
    "max_concurrent_tasks",
)
KEY_COLUMNS = (
    "id",
    "prefix",
    "user",
    "team",
    "label",
    "source",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
)
UPSTREAM_COLUMNS = (
    "name",
    "key",
    "state",
    "weight",
    "max_concurrent_tasks",
    "tasks_in_flight",
    "successes",
    "failures",
)
AUDIT_COLUMNS = ("id", "at", "actor", "action", "target", "change")


class ApiError(Exception):
    """The gateway answered an error (SPEC §3's shape), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, code: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param

    def __str__(self) -> str:
        where = f" ({self.param})" if self.param else ""
        head = f"{self.status} {self.code}" if self.status else "unreachable"
        return f"{head}: {self.args[0]}{where}"


class AdminClient:
    """JSON over HTTP to one gateway; no proxy from the environment answers for it."""

    def __init__(self, url: str, token: str, timeout_s: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None) -> Any:
        given = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(given) if given else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _api_error(exc.code, exc.read()) from None
        except (OSError, ValueError) as exc:
            raise ApiError(0, f"{self.url}: {exc}") from None


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        error = json.loads(raw)["error"]
        return ApiError(status, str(error.get("message")), str(error.get("code")), error.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(status, raw[:200].decode(errors="replace") or "no body", "http_error")


# --- argument values -------------------------------------------------------------------------------------------


def limit_value(text: str) -> Any:
    """A limit flag's value as the API takes it: a number, null (cleared), or the text (a period name)."""
    if text.strip().lower() in UNSET:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def list_value(text: str, of_numbers: bool) -> list[Any] | None:
    """A comma-separated list ("a,b"); none/null clears it."""
    if text.strip().lower() in UNSET:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [limit_value(item) for item in items] if of_numbers else items


def limits_of(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given (and only those) as body fields."""
    fields: dict[str, Any] = {}
    for field in LIMIT_FLAGS.values():
        if hasattr(args, field):
            text = getattr(args, field)
            fields[field] = list_value(text, field == "alert_thresholds") if field in LISTS else limit_value(text)
    return fields


def expiry_value(text: str) -> Any:
    """--expires-at: unix seconds (a number) or an ISO date-time, as the API takes both."""
    value = limit_value(text)
    return value if isinstance(value, int | float) else text


# --- rendering -------------------------------------------------------------------------------------------------


def cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if (column == "at" or column.endswith("_at")) and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")  # the API's unix seconds
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Fixed-width columns, a header line; an empty listing says so."""
    if not rows:
        return "(none)\n"
    grid = [list(columns)] + [[cell(row.get(column), column) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip() for line in grid]
    return "\n".join(lines) + "\n"


def record(data: dict[str, Any]) -> str:
    """One resource, a field a line."""
    width = max((len(key) for key in data), default=0)
    return "".join(f"{key.ljust(width)}  {cell(value, key)}\n" for key, value in data.items())


def change_of(entry: dict[str, Any]) -> str:
    """An audit row's change in a few words: the fields that differ, before → after."""
    before, after = entry.get("before") or {}, entry.get("after") or {}
    if not before or not after:
        return cell(after or before)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return "; ".join(f"{k}: {cell(before.get(k))} → {cell(after.get(k))}" for k in changed) or "-"


# --- commands --------------------------------------------------------------------------------------------------


def _listing(columns: Sequence[str]) -> Callable[[Any], str]:
    return lambda reply: table(reply.get("data", []), columns)


def _deleted(reply: Any) -> str:
    what = reply.get("name") or reply.get("id")
    return f"deleted {reply.get('object', '')} {what}\n"


def _issued(reply: Any) -> str:
    head = "The new key, shown this once: give it to its user, it is stored nowhere.\n\n"
    rest = {k: v for k, v in reply.items() if k != "key"}
    return f"{head}{reply.get('key')}\n\n{record(rest)}"


def _audit(reply: Any) -> str:
    rows = [{**entry, "change": change_of(entry)} for entry in reply.get("data", [])]
    more = f"more: --after {reply.get('last_id')}\n" if reply.get("has_more") else ""
    return table(rows, AUDIT_COLUMNS) + more


def request_of(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None, Any, Callable[[Any], str]]:
    """The command as (method, path, query, body, how its answer prints)."""
    noun, verb = args.noun, getattr(args, "verb", "list")
    name = getattr(args, "name", "")
    if noun == "upstream-keys":
        return "GET", "/admin/keys", None, None, _listing(UPSTREAM_COLUMNS)
    if noun == "audit":
        query = {
            "since": args.since,
            "target": args.target,
            "actor": args.actor,
            "limit": args.limit,
            "after": args.after,
        }
        return "GET", "/admin/audit", query, None, _audit
    if noun == "keys":
        return _keys_request(args, verb)
    base, columns = ("/admin/teams", TEAM_COLUMNS) if noun == "teams" else ("/admin/users", USER_COLUMNS)
    if verb == "list":
        return "GET", base, {"team": getattr(args, "team", None)}, None, _listing(columns)
    if verb == "show":
        return "GET", f"{base}/{name}", None, None, record
    if verb == "delete":
        return "DELETE", f"{base}/{name}", None, None, _deleted
    body = {**_person_of(args), **limits_of(args)}
    if verb == "create":
        return "POST", base, None, {"name": name, **body}, record
    return "PATCH", f"{base}/{name}", None, body, record


def _person_of(args: argparse.Namespace) -> dict[str, Any]:
    """A user's own fields among the flags given; `--email none` clears the e-mail."""
    fields = {field: getattr(args, field) for field in ("team", "role", "email") if hasattr(args, field)}
    if "email" in fields and fields["email"].lower() in UNSET:
        fields["email"] = None
    return fields


def _keys_request(args: argparse.Namespace, verb: str) -> tuple[str, str, Any, Any, Callable[[Any], str]]:
    if verb == "issue":
        body = {"label": args.label, "expires_at": None if args.expires_at is None else expiry_value(args.expires_at)}
        given = {k: v for k, v in body.items() if v is not None}
        return "POST", f"/admin/users/{args.user}/keys", None, given, _issued
    if verb == "revoke":
        return "DELETE", f"/admin/api-keys/{args.id}", None, None, _deleted
    return "GET", "/admin/api-keys", {"user": args.user, "team": args.team}, None, _listing(KEY_COLUMNS)


def cmd_admin(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"error: set {TOKEN_ENV} to the admin token (or a team admin's gateway key)", file=sys.stderr)
        return 2
    method, path, query, body, render = request_of(args)
    try:
        reply = AdminClient(args.url, token).call(method, path, query, body)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.status == 0 else 1
    sys.stdout.write(json.dumps(reply, indent=2) + "\n" if args.json else render(reply))
    return 0


# --- the parser ------------------------------------------------------------------------------------------------


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    for flag, field in LIMIT_FLAGS.items():
        hint = "comma-separated" if field in LISTS else "day, week, month or total" if field == "period" else "a number"
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=f"{hint}; none clears it")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("GATEWAY_URL", DEFAULT_URL), help="the gateway's base URL")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    parser.set_defaults(func=cmd_admin)


def _resource(nouns: Any, noun: str, person: bool) -> None:
    """teams / users: list, show, create, change, delete."""
    parser = nouns.add_parser(noun, help=f"{noun} (config and API)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help=f"every {noun[:-1]} you may see")
    if person:
        listing.add_argument("--team")
    _common(listing)
    for verb in ("show", "create", "change", "delete"):
        sub = verbs.add_parser(verb, help=f"{verb} a {noun[:-1]}")
        sub.add_argument("name")
        if verb in ("create", "change"):
            if person:
                sub.add_argument("--team", default=argparse.SUPPRESS, help="a team admin's users are of its team")
                sub.add_argument("--role", choices=("member", "team_admin"), default=argparse.SUPPRESS)
                sub.add_argument("--email", default=argparse.SUPPRESS, help="none clears it")
            _limit_flags(sub)
        _common(sub)


def _keys(nouns: Any) -> None:
    parser = nouns.add_parser("keys", help="gateway keys (tgw-…): list, issue, revoke")
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="keys, without their values")
    listing.add_argument("--user")
    listing.add_argument("--team")
    _common(listing)
    issue = verbs.add_parser("issue", help="a new key for a user, shown once")
    issue.add_argument("user")
    issue.add_argument("--label")
    issue.add_argument("--expires-at", help="ISO date-time or unix seconds, in the future")
    _common(issue)
    revoke = verbs.add_parser("revoke", help="refused everywhere within a second")
    revoke.add_argument("id")
    _common(revoke)


def add_admin_parser(commands: Any) -> None:
    """`admin` and everything under it, on the root parser's subcommands."""
    admin = commands.add_parser("admin", help="a running gateway's teams, users, keys and audit log")
    nouns = admin.add_subparsers(dest="noun", required=True)
    _resource(nouns, "teams", person=False)
    _resource(nouns, "users", person=True)
    _keys(nouns)
    _common(nouns.add_parser("upstream-keys", help="the TokenHub key pool and its health"))
    audit = nouns.add_parser("audit", help="every change, oldest first")
    audit.add_argument("--since", help="ISO date or date-time")
    audit.add_argument("--target", help="team:NAME, user:NAME, api_key:ID or config")
    audit.add_argument("--actor", help="admin, user:NAME, …")
    audit.add_argument("--limit", type=int)
    audit.add_argument("--after", help="the id the previous page ended with")
    _common(audit)
