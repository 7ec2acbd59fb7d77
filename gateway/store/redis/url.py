"""Which Redis a store URL names (plain parsing: the config checks URLs without redis-py installed).

    redis://[user:password@]host:6379/0            one server (rediss:// over TLS)
    redis+sentinel://[user:password@]h1:26379,h2:26379/<master name>/<db>
    redis+cluster://[user:password@]h1:6379,h2:6379   a Redis Cluster (db 0 only)

The credentials in the URL are the data servers'; a Sentinel deployment whose sentinels need a password of
their own takes `?sentinel_password=…` (and `sentinel_username=…`). `rediss+sentinel://` and
`rediss+cluster://` speak TLS to every node. `?wait_replica=1` (the default with Sentinel; `0` turns it off)
acknowledges a write only once a replica has it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

STANDALONE = "standalone"
SENTINEL = "sentinel"
CLUSTER = "cluster"
_SCHEMES = {
    "redis": (STANDALONE, False),
    "rediss": (STANDALONE, True),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
}
_DEFAULT_PORT = {STANDALONE: 6379, SENTINEL: 26379, CLUSTER: 6379}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    mode: str
    url: str = field(repr=False)  # it may hold a password
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    sentinel_auth: tuple[str | None, str | None] = field(default=(None, None), repr=False)  # username, password
    wait_replica: bool = False  # writes acknowledged once a replica has them (WAIT 1)


def is_redis_url(url: str) -> bool:
    return url.partition("://")[0] in _SCHEMES


def url_problem(url: str) -> str | None:
    """What is wrong with a Redis store URL, or None (also for a URL that is not Redis's)."""
    if not is_redis_url(url):
        return None
    try:
        parse_url(url)
    except ValueError as exc:
        return str(exc)
    return None


def parse_url(url: str) -> RedisTarget:
    """A store URL's target; ValueError names what is wrong with it (never its password)."""
    scheme = url.partition("://")[0]
    if "://" not in url or scheme not in _SCHEMES:
        raise ValueError(f"a Redis store URL starts with one of {', '.join(s + '://' for s in _SCHEMES)}")
    mode, ssl = _SCHEMES[scheme]
    wait, url = _wait_option(url)
    if mode == CLUSTER and wait:
        raise ValueError("wait_replica=1 is for a server or a Sentinel's master, not a Cluster")
    if mode == STANDALONE:
        return RedisTarget(mode, url, ssl=ssl, wait_replica=bool(wait))
    rest, query = url.partition("://")[2].partition("?")[::2]
    netloc, path = rest.partition("/")[::2]
    userinfo, hosts = netloc.rpartition("@")[::2]
    username, password = userinfo.partition(":")[::2]
    nodes = tuple(_node(h, _DEFAULT_PORT[mode]) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"a {scheme}:// URL names at least one host:port")
    parts = [p for p in path.split("/") if p]
    master, db = _path(mode, parts)
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    return RedisTarget(
        mode,
        url,
        nodes,
        master,
        db,
        unquote(username) or None,
        unquote(password) or None,
        ssl,
        (options.get("sentinel_username"), options.get("sentinel_password")),
        mode == SENTINEL if wait is None else wait,
    )


def _wait_option(url: str) -> tuple[bool | None, str]:
    """`wait_replica=0|1` from the query (None when absent), and the URL without it (redis-py refuses it)."""
    base, query = url.partition("?")[::2]
    kept: list[str] = []
    wait = None
    for item in query.split("&") if "?" in url else ():
        name, value = item.partition("=")[::2]
        if name != "wait_replica":
            kept.append(item)
        elif value in ("0", "1"):
            wait = value == "1"
        else:
            raise ValueError("wait_replica is 0 or 1")
    return wait, base + ("?" + "&".join(kept) if kept else "")


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, port = text, str(default_port)
    if text.startswith("["):  # [IPv6]:port
        host, tail = text[1:].partition("]")[::2]
        port = tail.removeprefix(":") or port
    elif ":" in text:
        host, port = text.rpartition(":")[::2]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not a host:port")
    return host, int(port)


def _path(mode: str, parts: list[str]) -> tuple[str, int]:
    if mode == SENTINEL:
        if not 1 <= len(parts) <= 2:
            raise ValueError("a redis+sentinel:// URL ends with /<master name>/<db>")
        master, db = unquote(parts[0]), parts[1] if len(parts) == 2 else "0"
    else:
        if len(parts) > 1:
            raise ValueError("a redis+cluster:// URL has no path beyond /0")
        master, db = "", parts[0] if parts else "0"
    if not db.isdigit() or (mode == CLUSTER and db != "0"):
        raise ValueError("a Redis Cluster has database 0 only" if mode == CLUSTER else f"db {db!r} is not a number")
    return master, int(db)
