"""Reading the configuration: TOML + environment → gateway.settings' frozen tree, every problem reported at once."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.config_delivery import archive_of, webhooks_of
from gateway.money import usd_to_micros
from gateway.readers import Reader, is_num, shown
from gateway.settings import (
    DEFAULT_MODEL_ALIASES,
    DEFAULT_PRICING,
    PERIODS,
    LedgerSettings,
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
)
from gateway.tenancy import MEMBER, ROLES, shared_emails, valid_email


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# Seedance costs cents a second; a price above this is a typo, and keeps every figure exact in Redis's
# Lua numbers (doubles: integers exact below 2**53 micro-dollars).
MAX_PRICE_USD = 1_000
_SECTIONS = set("server upstream store poller pricing teams users openai webhooks archive ledger".split())
# TOML key → kind, for the plain fields of each section; absent or invalid, the dataclass default applies.
_SERVER = {
    "host": "str",
    "port": "port",
    "shutdown_grace_s": "num0",
    "max_body_bytes": "int+",
    "log_prompts": "bool",
    "header_timeout_s": "num+",
    "body_timeout_s": "num+",
    "send_timeout_s": "num+",
    "max_downloads_per_team": "int+",
    "max_uploads_in_flight": "int+",
    "console": "bool",
    "console_session_hours": "num+",
    "console_trusted_header": "str",
}
_PROXIES = "console_trusted_proxies"
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_UPSTREAM = {
    "connect_timeout_s": "num+",
    "timeout_s": "num+",
    "cooldown_s": "num+",
    "breaker_failures": "int+",
    "breaker_open_s": "num+",
    "max_answer_bytes": "int+",
}
_KEY = {"weight": "int+", "max_concurrent_tasks": "int+"}
_POLLER = {"interval_s": "num+", "expire_after_s": "num+", "concurrency": "int+", "max_polls_per_second": "num+"}
_LEDGER = {"retention_days": "int+"}
_OPENAI = {"poll_after_ms": "int+"}
_LIMITS = {
    "budget_usd": "usd",
    "period": "str",
    "models": "strlist",
    "video_seconds": "int0",
    "requests_per_minute": "int+",
    "max_concurrent_tasks": "int+",
    "alert_thresholds": "fractions",
}


def _secret_from_env(
    reader: Reader, env: Mapping[str, str], data: dict[str, Any], key: str, where: str
) -> Secret | None:
    value = reader.from_env(env, data, key, where)
    return Secret(value) if value else None


def _limits(reader: Reader, data: dict[str, Any], where: str, models: set[str], period: str | None = None) -> Limits:
    """`period` is the default when unset (a user's is its team's); None leaves the dataclass's."""
    values = reader.fields(data, where, {k: kind for k, kind in _LIMITS.items() if k != "models"})
    if "budget_usd" in values:
        values["budget_micros"] = usd_to_micros(values.pop("budget_usd"))
    if values.get("period", PERIODS[0]) not in PERIODS:
        reader.problem(f"{where}.period", f"expected one of {', '.join(PERIODS)}, got {shown(values.pop('period'))}")
    if period and "period" not in values:
        values["period"] = period
    if "alert_thresholds" in values:
        values["alert_thresholds"] = tuple(sorted({float(v) for v in values["alert_thresholds"]}))
    return Limits(models=reader.members(data, "models", where, models), **values)


def limits_of(data: dict[str, Any], models: set[str], period: str | None = None) -> tuple[Limits, list[str]]:
    """A team's or user's limits from a table of §6's names (an admin API body, SPEC §15), and every problem
    as "field: message"."""
    reader = Reader()
    limits = _limits(reader, data, "", models, period)
    return limits, reader.problems


def _pricing(reader: Reader, data: Any) -> dict[str, dict[str, int]]:
    prices = {m: {res: usd_to_micros(p) for res, p in t.items()} for m, t in DEFAULT_PRICING.items()}
    for model, table in reader.table(data, "pricing", None).items():
        where = f'pricing."{model}"'
        if not isinstance(table, dict) or not table:
            reader.problem(where, "expected a table of resolution = dollars per second")
            continue
        row = {}
        for res, price in table.items():
            if not is_num(price) or not 0 <= price <= MAX_PRICE_USD:  # nan and inf too: no exact micro-dollars
                reader.problem(
                    f'{where}."{res}"', f"expected dollars per second from 0 to {MAX_PRICE_USD}, got {shown(price)}"
                )
            else:
                row[res] = usd_to_micros(price)
        prices[model] = row
    return prices


def _server(reader: Reader, data: Any, env: Mapping[str, str]) -> ServerSettings:
    server = reader.table(data, "server", set(_SERVER) | {"admin_token_env", "metrics_token_env", _PROXIES})
    values = reader.fields(server, "server", _SERVER)
    header = values.get("console_trusted_header")
    if header is not None and not _HEADER_NAME.fullmatch(header):
        reader.problem("server.console_trusted_header", "expected a header name (letters, digits and -)")
    if header is not None and not server.get(_PROXIES):
        reader.problem(f"server.{_PROXIES}", "is required with console_trusted_header (the proxies it comes from)")
    return ServerSettings(
        **values,
        admin_token=_secret_from_env(reader, env, server, "admin_token_env", "server"),
        metrics_token=_secret_from_env(reader, env, server, "metrics_token_env", "server"),
        console_trusted_proxies=_networks(reader, server.get(_PROXIES, []), "server", _PROXIES),
    )


def _key(
    reader: Reader, data: Any, index: int, env: Mapping[str, str], base: Path, models: set[str]
) -> UpstreamKey | None:
    where = f"upstream.keys[{index}]"
    data = reader.table(data, where, set(_KEY) | {"name", "value", "value_env", "value_file", "models"})
    name = reader.get(data, "name", where, "str", required=True)
    value = reader.secret_value(data, where, env, base)
    allow = reader.members(data, "models", where, models)
    plain = reader.fields(data, where, _KEY)
    if not (name and value):
        return None
    return UpstreamKey(name=name, value=Secret(value), models=allow, **plain)


def _upstream(reader: Reader, data: Any, env: Mapping[str, str], base: Path, models: set[str]) -> UpstreamSettings:
    upstream = reader.table(data, "upstream", set(_UPSTREAM) | {"base_url", "keys", "media_allow_networks"})
    base_url = reader.get(upstream, "base_url", "upstream", "str", required=True) or ""
    if base_url and not base_url.startswith(("http://", "https://")):
        reader.problem("upstream.base_url", "expected an http:// or https:// URL (what is set is not shown)")
    raw_keys = upstream.get("keys", [])
    if not isinstance(raw_keys, list) or not raw_keys:
        reader.problem("upstream.keys", "at least one [[upstream.keys]] is required")
        raw_keys = []
    keys = {i: key for i, d in enumerate(raw_keys) if (key := _key(reader, d, i, env, base, models))}
    names = [k.name for k in keys.values()]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        same = " and ".join(f"keys[{i}]" for i, k in keys.items() if k.name == dup)
        reader.problem("upstream.keys", f"{same} have the same name")
    return UpstreamSettings(
        base_url=base_url.rstrip("/"),
        keys=tuple(keys.values()),
        media_allow_networks=_networks(reader, upstream.get("media_allow_networks", []), "upstream"),
        **reader.fields(upstream, "upstream", _UPSTREAM),
    )


def _networks(
    reader: Reader, value: Any, where: str, key: str = "media_allow_networks"
) -> tuple[IPv4Network | IPv6Network, ...]:
    """CIDRs such as "127.0.0.1/32" or "10.0.0.0/8" (a bare address is its own /32 or /128)."""
    where = f"{where}.{key}"
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        reader.problem(where, 'expected a list of CIDR strings, such as ["127.0.0.1/32"]')
        return ()
    networks = []
    for index, text in enumerate(value):
        try:
            networks.append(ip_network(text.strip(), strict=False))
        except ValueError:
            reader.problem(f"{where}[{index}]", f"{shown(text)} is not an IP network (e.g. 10.0.0.0/8)")
    return tuple(networks)


def _store(reader: Reader, data: Any, env: Mapping[str, str]) -> StoreSettings:
    from gateway.store.redis.url import is_redis_url, url_problem  # here: the store package imports this module

    st = reader.table(data, "store", {"url", "url_env", "synchronous"})
    url = reader.get(st, "url", "store", "str")
    if "url" in st and "url_env" in st:
        reader.problem("store", "set url or url_env, not both")
    if "url_env" in st:
        url = reader.from_env(env, st, "url_env", "store", required=True)
    given: dict[str, Any] = {}
    if url and not url.startswith("sqlite:///") and not is_redis_url(url):
        reader.problem(
            "store.url", "expected sqlite:////absolute/path, redis://, rediss://, redis+sentinel:// or redis+cluster://"
        )
    elif url and (problem := url_problem(url)):
        reader.problem("store.url", problem)
    elif url:
        given["url"] = Secret(url)
    sync = reader.get(st, "synchronous", "store", "str")
    if sync and sync.upper() not in ("NORMAL", "FULL"):
        reader.problem("store.synchronous", "expected NORMAL or FULL")
    elif sync:
        given["synchronous"] = sync.upper()
    return StoreSettings(**given)


def _poller(reader: Reader, data: Any) -> PollerSettings:
    return PollerSettings(**reader.fields(reader.table(data, "poller", set(_POLLER)), "poller", _POLLER))


def _ledger(reader: Reader, data: Any) -> LedgerSettings:
    return LedgerSettings(**reader.fields(reader.table(data, "ledger", set(_LEDGER)), "ledger", _LEDGER))


def _openai(reader: Reader, data: Any, models: set[str]) -> OpenAISettings:
    openai = reader.table(data, "openai", set(_OPENAI) | {"model_aliases"})
    aliases = dict(DEFAULT_MODEL_ALIASES)
    for alias, model in reader.table(openai.get("model_aliases", {}), "openai.model_aliases", None).items():
        where = f'openai.model_aliases."{alias}"'
        if alias in models:
            reader.problem(where, "is a model of the pricing table, not an alias")
        elif not isinstance(model, str) or model not in models:
            reader.problem(where, f"expected a model of the pricing table ({', '.join(sorted(models))})")
        else:
            aliases[alias] = model
    return OpenAISettings(model_aliases=MappingProxyType(aliases), **reader.fields(openai, "openai", _OPENAI))


def _teams(reader: Reader, data: Any, models: set[str]) -> dict[str, Team]:
    teams = {}
    for name, table in reader.table(data, "teams", None).items():
        where = f"teams.{name}"
        teams[name] = Team(name, _limits(reader, reader.table(table, where, set(_LIMITS)), where, models))
    return teams


def _users(reader: Reader, data: Any, teams: Mapping[str, Team], models: set[str]) -> dict[str, User]:
    users: dict[str, User] = {}
    hashes: dict[str, str] = {}
    for name, ud in reader.table(data, "users", None).items():
        where = f"users.{name}"
        ud = reader.table(ud, where, set(_LIMITS) | {"team", "key_sha256", "role", "email"})
        team = reader.get(ud, "team", where, "str", required=True)
        if team and team not in teams:
            reader.problem(f"{where}.team", f"names a team that [teams] does not define (got {shown(team)})")
        digest = reader.get(ud, "key_sha256", where, "sha256", required=True)
        if digest in hashes:
            reader.problem(f"{where}.key_sha256", f"the same key is already used by users.{hashes[digest]}")
        if digest:
            hashes[digest] = name
        limits = _limits(reader, ud, where, models, teams[team].limits.period if team in teams else None)
        role = reader.get(ud, "role", where, "str", default=MEMBER)
        if role not in ROLES:
            reader.problem(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {shown(role)}")
        email = reader.get(ud, "email", where, "str")
        if email is not None and not valid_email(email):
            reader.problem(f"{where}.email", "expected an e-mail address (name@domain, at most 254 characters)")
        if team and digest:
            users[name] = User(name, team, digest, limits, role, email)
    for name, first in shared_emails(users.values()):  # a console signs a user in by its e-mail
        reader.problem(f"users.{name}.email", f"the same e-mail (in any case) is already used by users.{first}")
    return users


def parse_settings(
    data: dict[str, Any], env: Mapping[str, str] | None = None, base_dir: Path | None = None, source: str = ""
) -> Settings:
    env = os.environ if env is None else env
    reader = Reader()
    data = reader.table(data, "", _SECTIONS)
    pricing = _pricing(reader, data.get("pricing", {}))
    models = set(pricing)
    server = _server(reader, data.get("server", {}), env)
    upstream = _upstream(reader, data.get("upstream", {}), env, base_dir or Path.cwd(), models)
    store = _store(reader, data.get("store", {}), env)
    poller = _poller(reader, data.get("poller", {}))
    teams = _teams(reader, data.get("teams", {}), models)
    users = _users(reader, data.get("users", {}), teams, models)
    openai = _openai(reader, data.get("openai", {}), models)
    webhooks = webhooks_of(reader, data.get("webhooks", []), env, teams)
    archive = archive_of(reader, data.get("archive", {}))
    ledger = _ledger(reader, data.get("ledger", {}))
    if reader.problems:
        raise ConfigError(reader.problems)
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
        ledger=ledger,
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
