"""Reading the configuration: TOML + environment → gateway.settings' frozen tree, every problem reported at once."""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.money import usd_to_micros
from gateway.readers import Reader, is_num, shown
from gateway.settings import (
    DEFAULT_MODEL_ALIASES,
    DEFAULT_PRICING,
    PERIODS,
    WEBHOOK_EVENTS,
    ArchiveSettings,
    Limits,
    OpenAISettings,
    PollerSettings,
    Secret,
    ServerSettings,
    Settings,
    StoreSettings,
    Team,
    UpstreamKey,
    UpstreamSettings,
    User,
    WebhookEndpoint,
)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_SECTIONS = {"server", "upstream", "store", "poller", "pricing", "teams", "users", "openai", "webhooks", "archive"}
# TOML key → kind, for the plain fields of each section; absent or invalid, the dataclass default applies.
_SERVER = {
    "host": "str",
    "port": "port",
    "shutdown_grace_s": "num0",
    "max_body_bytes": "int+",
    "log_prompts": "bool",
    "header_timeout_s": "num+",
    "body_timeout_s": "num+",
}
_UPSTREAM = {
    "connect_timeout_s": "num+",
    "timeout_s": "num+",
    "cooldown_s": "num+",
    "breaker_failures": "int+",
    "breaker_open_s": "num+",
}
_KEY = {"weight": "int+", "max_concurrent_tasks": "int+"}
_POLLER = {"interval_s": "num+", "expire_after_s": "num+", "concurrency": "int+"}
_OPENAI = {"poll_after_ms": "int+"}
_WEBHOOK = {"retry_initial_s": "num+", "max_in_flight": "int+"}
_ARCHIVE = {"region": "str", "retention_days": "num+", "max_bytes_per_video": "int+"}
_LIMITS = {
    "budget_usd": "num0",
    "period": "str",
    "models": "strlist",
    "video_seconds": "int0",
    "requests_per_minute": "int+",
    "max_concurrent_tasks": "int+",
}


def _secret_from_env(r: Reader, env: Mapping[str, str], data: dict, key: str, where: str) -> Secret | None:
    value = r.from_env(env, data, key, where)
    return Secret(value) if value else None


def _limits(r: Reader, data: dict, where: str, models: set[str], period: str | None = None) -> Limits:
    """`period` is the default when unset (a user's is its team's); None leaves the dataclass's."""
    v = r.fields(data, where, {k: kind for k, kind in _LIMITS.items() if k != "models"})
    if "budget_usd" in v:
        v["budget_micros"] = usd_to_micros(v.pop("budget_usd"))
    if v.get("period", PERIODS[0]) not in PERIODS:
        r.problem(f"{where}.period", f"expected one of {', '.join(PERIODS)}, got {shown(v.pop('period'))}")
    if period and "period" not in v:
        v["period"] = period
    return Limits(models=r.members(data, "models", where, models), **v)


def _pricing(r: Reader, data: Any) -> dict[str, dict[str, int]]:
    prices = {m: {res: usd_to_micros(p) for res, p in t.items()} for m, t in DEFAULT_PRICING.items()}
    for model, table in r.table(data, "pricing", None).items():
        where = f'pricing."{model}"'
        if not isinstance(table, dict) or not table:
            r.problem(where, "expected a table of resolution = dollars per second")
            continue
        row = {}
        for res, price in table.items():
            if not is_num(price) or price < 0:
                r.problem(f'{where}."{res}"', f"expected a price ≥ 0, got {shown(price)}")
            else:
                row[res] = usd_to_micros(price)
        prices[model] = row
    return prices


def _server(r: Reader, data: Any, env: Mapping[str, str]) -> ServerSettings:
    s = r.table(data, "server", set(_SERVER) | {"admin_token_env", "metrics_token_env"})
    return ServerSettings(
        **r.fields(s, "server", _SERVER),
        admin_token=_secret_from_env(r, env, s, "admin_token_env", "server"),
        metrics_token=_secret_from_env(r, env, s, "metrics_token_env", "server"),
    )


def _key(r: Reader, data: Any, i: int, env: Mapping[str, str], base: Path, models: set[str]) -> UpstreamKey | None:
    where = f"upstream.keys[{i}]"
    data = r.table(data, where, set(_KEY) | {"name", "value", "value_env", "value_file", "models"})
    name = r.get(data, "name", where, "str", required=True)
    value = r.secret_value(data, where, env, base)
    allow = r.members(data, "models", where, models)
    plain = r.fields(data, where, _KEY)
    if not (name and value):
        return None
    return UpstreamKey(name=name, value=Secret(value), models=allow, **plain)


def _upstream(r: Reader, data: Any, env: Mapping[str, str], base: Path, models: set[str]) -> UpstreamSettings:
    u = r.table(data, "upstream", set(_UPSTREAM) | {"base_url", "keys"})
    base_url = r.get(u, "base_url", "upstream", "str", required=True) or ""
    if base_url and not base_url.startswith(("http://", "https://")):
        r.problem("upstream.base_url", "expected an http:// or https:// URL (what is set is not shown)")
    raw_keys = u.get("keys", [])
    if not isinstance(raw_keys, list) or not raw_keys:
        r.problem("upstream.keys", "at least one [[upstream.keys]] is required")
        raw_keys = []
    keys = {i: k for i, d in enumerate(raw_keys) if (k := _key(r, d, i, env, base, models))}
    names = [k.name for k in keys.values()]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        same = " and ".join(f"keys[{i}]" for i, k in keys.items() if k.name == dup)
        r.problem("upstream.keys", f"{same} have the same name")
    return UpstreamSettings(
        base_url=base_url.rstrip("/"), keys=tuple(keys.values()), **r.fields(u, "upstream", _UPSTREAM)
    )


def _store(r: Reader, data: Any, env: Mapping[str, str]) -> StoreSettings:
    from gateway.store.redis.url import is_redis_url, url_problem  # here: the store package imports this module

    st = r.table(data, "store", {"url", "url_env", "synchronous"})
    url = r.get(st, "url", "store", "str")
    if "url" in st and "url_env" in st:
        r.problem("store", "set url or url_env, not both")
    if "url_env" in st:
        url = r.from_env(env, st, "url_env", "store", required=True)
    given: dict[str, Any] = {}
    if url and not url.startswith("sqlite:///") and not is_redis_url(url):
        r.problem(
            "store.url", "expected sqlite:////absolute/path, redis://, rediss://, redis+sentinel:// or redis+cluster://"
        )
    elif url and (problem := url_problem(url)):
        r.problem("store.url", problem)
    elif url:
        given["url"] = Secret(url)
    sync = r.get(st, "synchronous", "store", "str")
    if sync and sync.upper() not in ("NORMAL", "FULL"):
        r.problem("store.synchronous", "expected NORMAL or FULL")
    elif sync:
        given["synchronous"] = sync.upper()
    return StoreSettings(**given)


def _poller(r: Reader, data: Any) -> PollerSettings:
    return PollerSettings(**r.fields(r.table(data, "poller", set(_POLLER)), "poller", _POLLER))


def _openai(r: Reader, data: Any, models: set[str]) -> OpenAISettings:
    o = r.table(data, "openai", set(_OPENAI) | {"model_aliases"})
    aliases = dict(DEFAULT_MODEL_ALIASES)
    for alias, model in r.table(o.get("model_aliases", {}), "openai.model_aliases", None).items():
        where = f'openai.model_aliases."{alias}"'
        if alias in models:
            r.problem(where, "is a model of the pricing table, not an alias")
        elif not isinstance(model, str) or model not in models:
            r.problem(where, f"expected a model of the pricing table ({', '.join(sorted(models))})")
        else:
            aliases[alias] = model
    return OpenAISettings(model_aliases=MappingProxyType(aliases), **r.fields(o, "openai", _OPENAI))


def _webhook_secret(r: Reader, data: dict, where: str, env: Mapping[str, str]) -> Secret | None:
    """The signing secret, from the variable `secret_env` names: "whsec_" + padded base64 of at least 16 bytes."""
    value = r.from_env(env, data, "secret_env", where, required=True)
    if value is None:
        if "secret_env" not in data:
            r.problem(f"{where}.secret_env", "is required")
        return None
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith("whsec_") or len(key) < 16:
        r.problem(
            f"{where}.secret_env",
            'the variable must hold "whsec_" + padded base64 of at least 16 random bytes (the value is not shown)',
        )
        return None
    return Secret(value)


def _webhook_url(r: Reader, data: dict, where: str) -> Secret | None:
    url = r.get(data, "url", where, "str", required=True)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.problem(f"{where}.url", "expected an http:// or https:// URL (what is set is not shown)")
        return None
    return Secret(url)


def _webhooks(r: Reader, data: Any, env: Mapping[str, str], teams: Mapping[str, Team]) -> tuple[WebhookEndpoint, ...]:
    if not isinstance(data, list):
        r.problem("webhooks", "expected [[webhooks]] tables")
        return ()
    endpoints: dict[str, WebhookEndpoint] = {}
    for i, d in enumerate(data):
        where = f"webhooks[{i}]"
        d = r.table(d, where, set(_WEBHOOK) | {"name", "url", "secret_env", "teams", "events"})
        name = r.get(d, "name", where, "str", required=True)
        url, secret = _webhook_url(r, d, where), _webhook_secret(r, d, where, env)
        chosen = r.get(d, "teams", where, "strlist")
        for team in sorted(set(chosen or ()) - set(teams)):
            r.problem(f"{where}.teams", f"names a team that [teams] does not define (got {shown(team)})")
        events = r.get(d, "events", where, "strlist", default=list(WEBHOOK_EVENTS))
        if not events or set(events) - set(WEBHOOK_EVENTS):
            r.problem(f"{where}.events", f"expected some of {', '.join(WEBHOOK_EVENTS)}")
        if name in endpoints:
            r.problem(f"{where}.name", f"another [[webhooks]] is already named {shown(name)}")
        elif name and url and secret:
            endpoints[name] = WebhookEndpoint(
                name,
                url,
                secret,
                None if chosen is None else frozenset(chosen),
                frozenset(events),
                **r.fields(d, where, _WEBHOOK),
            )
    return tuple(endpoints.values())


def _archive(r: Reader, data: Any) -> ArchiveSettings | None:
    a = r.table(data, "archive", set(_ARCHIVE) | {"dir", "url", "endpoint_url"})
    if not a:
        return None
    where = "archive"
    given = {k: r.get(a, k, where, "str") for k in ("dir", "url", "endpoint_url")}
    if (given["dir"] is None) == (given["url"] is None):
        r.problem(where, "set dir (a local directory) or url (s3://bucket/prefix), one of them")
    if given["dir"] is not None and not Path(given["dir"]).is_absolute():
        r.problem(f"{where}.dir", "expected an absolute path")
    if given["url"] is not None and not (given["url"].startswith("s3://") and urlsplit(given["url"]).netloc):
        r.problem(f"{where}.url", "expected s3://bucket or s3://bucket/prefix")
    if given["endpoint_url"] is not None and not given["endpoint_url"].startswith(("http://", "https://")):
        r.problem(f"{where}.endpoint_url", "expected an http:// or https:// URL")
    return ArchiveSettings(**{k: v for k, v in given.items() if v is not None}, **r.fields(a, where, _ARCHIVE))


def _teams(r: Reader, data: Any, models: set[str]) -> dict[str, Team]:
    teams = {}
    for name, t in r.table(data, "teams", None).items():
        where = f"teams.{name}"
        teams[name] = Team(name, _limits(r, r.table(t, where, set(_LIMITS)), where, models))
    return teams


def _users(r: Reader, data: Any, teams: Mapping[str, Team], models: set[str]) -> dict[str, User]:
    users: dict[str, User] = {}
    hashes: dict[str, str] = {}
    for name, ud in r.table(data, "users", None).items():
        where = f"users.{name}"
        ud = r.table(ud, where, set(_LIMITS) | {"team", "key_sha256"})
        team = r.get(ud, "team", where, "str", required=True)
        if team and team not in teams:
            r.problem(f"{where}.team", f"names a team that [teams] does not define (got {shown(team)})")
        digest = r.get(ud, "key_sha256", where, "sha256", required=True)
        if digest in hashes:
            r.problem(f"{where}.key_sha256", f"the same key is already used by users.{hashes[digest]}")
        if digest:
            hashes[digest] = name
        limits = _limits(r, ud, where, models, teams[team].limits.period if team in teams else None)
        if team and digest:
            users[name] = User(name, team, digest, limits)
    return users


def parse_settings(
    data: dict, env: Mapping[str, str] | None = None, base_dir: Path | None = None, source: str = ""
) -> Settings:
    env = os.environ if env is None else env
    r = Reader()
    data = r.table(data, "", _SECTIONS)
    pricing = _pricing(r, data.get("pricing", {}))
    models = set(pricing)
    server = _server(r, data.get("server", {}), env)
    upstream = _upstream(r, data.get("upstream", {}), env, base_dir or Path.cwd(), models)
    store = _store(r, data.get("store", {}), env)
    poller = _poller(r, data.get("poller", {}))
    teams = _teams(r, data.get("teams", {}), models)
    users = _users(r, data.get("users", {}), teams, models)
    openai = _openai(r, data.get("openai", {}), models)
    webhooks = _webhooks(r, data.get("webhooks", []), env, teams)
    archive = _archive(r, data.get("archive", {}))
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(
        server=server,
        upstream=upstream,
        store=store,
        poller=poller,
        pricing=pricing,
        teams=teams,
        users=users,
        openai=openai,
        webhooks=webhooks,
        archive=archive,
        source=source,
    )


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_settings(data, env, path.parent.resolve(), source=str(path))
