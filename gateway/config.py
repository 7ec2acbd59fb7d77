"""Settings: TOML + environment → one frozen dataclass tree, every problem reported at once."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .pricing import usd_to_micros

PERIODS = ("day", "week", "month", "total")
DEFAULT_PRICING = {
    "doubao-seedance-2.0": {"720p": Decimal("0.20"), "480p": Decimal("0.12")},
    "doubao-seedance-2.0-fast": {"720p": Decimal("0.16"), "480p": Decimal("0.10")},
}


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret:
    """A string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        v = self._value
        prefix = v.split("-", 1)[0] + "-" if "-" in v[:6] else ""
        return f"{prefix}…{v[-4:]}" if len(v) >= 12 else "…"

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Limits:
    budget_micros: int | None = None
    video_seconds: int | None = None
    period: str = "month"
    requests_per_minute: int | None = None
    max_concurrent_tasks: int | None = None
    models: frozenset[str] | None = None


@dataclass(frozen=True)
class Team:
    name: str
    limits: Limits


@dataclass(frozen=True)
class User:
    name: str
    team: str
    key_sha256: str
    limits: Limits


@dataclass(frozen=True)
class UpstreamKey:
    name: str
    value: Secret
    weight: int = 1
    max_concurrent_tasks: int = 10
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    admin_token: Secret | None = None
    metrics_token: Secret | None = None
    shutdown_grace_s: float = 10
    max_body_bytes: int = 64 * 1024 * 1024
    log_prompts: bool = False


@dataclass(frozen=True)
class UpstreamSettings:
    base_url: str
    keys: tuple[UpstreamKey, ...]
    connect_timeout_s: float = 5
    timeout_s: float = 60
    cooldown_s: float = 30
    breaker_failures: int = 5
    breaker_open_s: float = 30


@dataclass(frozen=True)
class StoreSettings:
    url: Secret = field(default_factory=lambda: Secret("sqlite:///" + str(Path.cwd() / "gateway.db")))
    synchronous: str = "NORMAL"


@dataclass(frozen=True)
class PollerSettings:
    interval_s: float = 15
    expire_after_s: float = 172800
    concurrency: int = 8


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    upstream: UpstreamSettings
    store: StoreSettings
    poller: PollerSettings
    pricing: Mapping[str, Mapping[str, int]]  # model → resolution → micro-dollars per second
    teams: Mapping[str, Team]
    users: Mapping[str, User]
    source: str = ""


class _Reader:
    """Pulls typed fields out of TOML tables, recording every problem with its location."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def table(self, data: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
        """A TOML table; `allowed` None takes any key (teams, users, pricing)."""
        if not isinstance(data, dict):
            self.problem(where, "expected a table")
            return {}
        for key in sorted(set(data) - allowed) if allowed is not None else ():
            self.problem(f"{where}.{key}" if where else key, "unknown setting")
        return data

    def get(self, data: dict, key: str, where: str, kind: str, default: Any = None,
            required: bool = False) -> Any:
        loc = f"{where}.{key}" if where else key
        if key not in data:
            if required:
                self.problem(loc, "is required")
            return default
        value = data[key]
        check = _KINDS[kind]
        if not check[0](value):
            self.problem(loc, f"expected {check[1]}, got {value!r}")
            return default
        return value


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int+": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "int0": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer ≥ 0"),
    "num+": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "num0": (lambda v: _is_num(v) and v >= 0, "a number ≥ 0"),
    "strlist": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                "a list of strings"),
}

_LIMIT_KEYS = {"budget_usd", "video_seconds", "period", "requests_per_minute",
               "max_concurrent_tasks", "models"}


def _port(r: _Reader, port: int) -> int:
    if port > 65535:
        r.problem("server.port", f"expected a port from 1 to 65535, got {port}")
    return port


def _secret_from_env(r: _Reader, env: Mapping[str, str], data: dict, key: str,
                     where: str) -> Secret | None:
    name = r.get(data, key, where, "str")
    value = env.get(name) if name else None
    return Secret(value) if value else None


def _limits(r: _Reader, data: dict, where: str, models: set[str],
            default_period: str) -> Limits:
    budget = r.get(data, "budget_usd", where, "num0")
    period = r.get(data, "period", where, "str", default_period)
    if period not in PERIODS:
        r.problem(f"{where}.period", f"expected one of {', '.join(PERIODS)}, got {period!r}")
        period = default_period
    allow = r.get(data, "models", where, "strlist")
    for m in allow or ():
        if m not in models:
            r.problem(f"{where}.models", f"unknown model {m!r} (not in the pricing table)")
    return Limits(
        budget_micros=None if budget is None else usd_to_micros(budget),
        video_seconds=r.get(data, "video_seconds", where, "int0"),
        period=period,
        requests_per_minute=r.get(data, "requests_per_minute", where, "int+"),
        max_concurrent_tasks=r.get(data, "max_concurrent_tasks", where, "int+"),
        models=None if allow is None else frozenset(allow),
    )


def _pricing(r: _Reader, data: Any) -> dict[str, dict[str, int]]:
    prices = {m: {res: usd_to_micros(p) for res, p in t.items()} for m, t in DEFAULT_PRICING.items()}
    for model, table in r.table(data or {}, "pricing", None).items():
        where = f'pricing."{model}"'
        if not isinstance(table, dict) or not table:
            r.problem(where, "expected a table of resolution = dollars per second")
            continue
        row = {}
        for res, price in table.items():
            if not _is_num(price) or price < 0:
                r.problem(f'{where}."{res}"', f"expected a price ≥ 0, got {price!r}")
            else:
                row[res] = usd_to_micros(price)
        prices[model] = row
    return prices


def _key(r: _Reader, data: Any, i: int, env: Mapping[str, str], base: Path,
         models: set[str]) -> UpstreamKey | None:
    where = f"upstream.keys[{i}]"
    data = r.table(data, where, {"name", "value", "value_env", "value_file", "weight",
                                 "max_concurrent_tasks", "models"})
    name = r.get(data, "name", where, "str", required=True)
    value = None
    if "value" in data:
        r.problem(f"{where}.value", "key values never go in the TOML; use value_env or value_file")
    if "value_env" in data and "value_file" in data:
        r.problem(where, "set value_env or value_file, not both")
    elif "value_env" in data:
        var = r.get(data, "value_env", where, "str")
        value = env.get(var) if var else None
        if var and not value:
            r.problem(f"{where}.value_env", f"environment variable {var} is not set")
    elif "value_file" in data:
        path = r.get(data, "value_file", where, "str")
        if path:
            try:
                value = (base / path).read_text().strip()
            except OSError as exc:
                r.problem(f"{where}.value_file", f"cannot read {path}: {exc.strerror}")
            else:
                if not value:
                    r.problem(f"{where}.value_file", f"{path} is empty")
    else:
        r.problem(where, "needs value_env or value_file")
    allow = r.get(data, "models", where, "strlist")
    for m in allow or ():
        if m not in models:
            r.problem(f"{where}.models", f"unknown model {m!r}")
    weight = r.get(data, "weight", where, "int+", 1)
    slots = r.get(data, "max_concurrent_tasks", where, "int+", 10)
    if not (name and value):
        return None
    return UpstreamKey(name=name, value=Secret(value), weight=weight, max_concurrent_tasks=slots,
                       models=None if allow is None else frozenset(allow))


def parse_settings(data: dict, env: Mapping[str, str] | None = None,
                   base_dir: Path | None = None, source: str = "") -> Settings:
    env = os.environ if env is None else env
    base = base_dir or Path.cwd()
    r = _Reader()
    r.table(data, "", {"server", "upstream", "store", "poller", "pricing", "teams", "users"})
    pricing = _pricing(r, data.get("pricing"))
    models = set(pricing)

    s = r.table(data.get("server", {}), "server", {
        "host", "port", "admin_token_env", "metrics_token_env", "shutdown_grace_s",
        "max_body_bytes", "log_prompts"})
    server = ServerSettings(
        host=r.get(s, "host", "server", "str", "0.0.0.0"),
        port=_port(r, r.get(s, "port", "server", "int+", 8080)),
        admin_token=_secret_from_env(r, env, s, "admin_token_env", "server"),
        metrics_token=_secret_from_env(r, env, s, "metrics_token_env", "server"),
        shutdown_grace_s=r.get(s, "shutdown_grace_s", "server", "num0", 10),
        max_body_bytes=r.get(s, "max_body_bytes", "server", "int+", 64 * 1024 * 1024),
        log_prompts=r.get(s, "log_prompts", "server", "bool", False),
    )

    u = r.table(data.get("upstream", {}), "upstream", {
        "base_url", "connect_timeout_s", "timeout_s", "cooldown_s", "breaker_failures",
        "breaker_open_s", "keys"})
    base_url = r.get(u, "base_url", "upstream", "str", required=True) or ""
    if base_url and not base_url.startswith(("http://", "https://")):
        r.problem("upstream.base_url", f"expected an http:// or https:// URL, got {base_url!r}")
    raw_keys = u.get("keys", [])
    if not isinstance(raw_keys, list) or not raw_keys:
        r.problem("upstream.keys", "at least one [[upstream.keys]] is required")
        raw_keys = []
    keys = [k for i, d in enumerate(raw_keys) if (k := _key(r, d, i, env, base, models))]
    names = [k.name for k in keys]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        r.problem("upstream.keys", f"key name {dup!r} is used twice")
    upstream = UpstreamSettings(
        base_url=base_url.rstrip("/"), keys=tuple(keys),
        connect_timeout_s=r.get(u, "connect_timeout_s", "upstream", "num+", 5),
        timeout_s=r.get(u, "timeout_s", "upstream", "num+", 60),
        cooldown_s=r.get(u, "cooldown_s", "upstream", "num+", 30),
        breaker_failures=r.get(u, "breaker_failures", "upstream", "int+", 5),
        breaker_open_s=r.get(u, "breaker_open_s", "upstream", "num+", 30),
    )

    st = r.table(data.get("store", {}), "store", {"url", "url_env", "synchronous"})
    url = r.get(st, "url", "store", "str")
    if "url" in st and "url_env" in st:
        r.problem("store", "set url or url_env, not both")
    if "url_env" in st:
        var = r.get(st, "url_env", "store", "str")
        url = env.get(var) if var else None
        if var and not url:
            r.problem("store.url_env", f"environment variable {var} is not set")
    url = url or ("sqlite:///" + str(Path.cwd() / "gateway.db"))
    if not url.startswith(("sqlite:///", "redis://", "rediss://")):
        r.problem("store.url", "expected sqlite:////absolute/path, redis:// or rediss://")
    sync = r.get(st, "synchronous", "store", "str", "NORMAL").upper()
    if sync not in ("NORMAL", "FULL"):
        r.problem("store.synchronous", "expected NORMAL or FULL")
    store = StoreSettings(url=Secret(url), synchronous=sync)

    p = r.table(data.get("poller", {}), "poller", {"interval_s", "expire_after_s", "concurrency"})
    poller = PollerSettings(
        interval_s=r.get(p, "interval_s", "poller", "num+", 15),
        expire_after_s=r.get(p, "expire_after_s", "poller", "num+", 172800),
        concurrency=r.get(p, "concurrency", "poller", "int+", 8),
    )

    teams: dict[str, Team] = {}
    for name, t in r.table(data.get("teams", {}), "teams", None).items():
        where = f"teams.{name}"
        t = r.table(t, where, _LIMIT_KEYS)
        teams[name] = Team(name, _limits(r, t, where, models, "month"))

    users: dict[str, User] = {}
    hashes: dict[str, str] = {}
    for name, ud in r.table(data.get("users", {}), "users", None).items():
        where = f"users.{name}"
        ud = r.table(ud, where, _LIMIT_KEYS | {"team", "key_sha256"})
        team = r.get(ud, "team", where, "str", required=True)
        digest = r.get(ud, "key_sha256", where, "str", required=True)
        if team and team not in teams:
            r.problem(f"{where}.team", f"no [teams.{team}] is defined")
        if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            r.problem(f"{where}.key_sha256", "expected 64 lowercase hex characters")
            digest = None
        if digest in hashes:
            r.problem(f"{where}.key_sha256", f"the same key is already used by users.{hashes[digest]}")
        if digest:
            hashes[digest] = name
        period = teams[team].limits.period if team in teams else "month"
        limits = _limits(r, ud, where, models, period)
        if team and digest:
            users[name] = User(name, team, digest, limits)

    if r.problems:
        raise ConfigError(r.problems)
    return Settings(server=server, upstream=upstream, store=store, poller=poller,
                    pricing=pricing, teams=teams, users=users, source=source)


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_settings(data, env, path.parent.resolve(), source=str(path))
