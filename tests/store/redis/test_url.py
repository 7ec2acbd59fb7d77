"""Redis store URLs (gateway/store/redis_url.py): what each names, and what check-config says of a bad one."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_settings
from gateway.store.redis.url import CLUSTER, SENTINEL, STANDALONE, parse_url


@pytest.mark.parametrize(
    ("url", "mode", "nodes", "master", "db", "wait", "passed_on"),
    [
        ("redis://h:6380/2", STANDALONE, (), "", 0, False, "redis://h:6380/2"),
        ("rediss://:pw@h/0?wait_replica=1", STANDALONE, (), "", 0, True, "rediss://:pw@h/0"),
        (
            "redis://h/0?health_check_interval=5&wait_replica=0",
            STANDALONE,
            (),
            "",
            0,
            False,
            "redis://h/0?health_check_interval=5",
        ),
        (
            "redis+sentinel://s1:26380,s2,[::1]:26381/gateway/3",
            SENTINEL,
            (("s1", 26380), ("s2", 26379), ("::1", 26381)),
            "gateway",
            3,
            True,
            None,
        ),
        ("redis+sentinel://s1/gateway?wait_replica=0", SENTINEL, (("s1", 26379),), "gateway", 0, False, None),
        ("redis+cluster://n1:7000,n2:7001", CLUSTER, (("n1", 7000), ("n2", 7001)), "", 0, False, None),
        ("rediss+cluster://n1/0", CLUSTER, (("n1", 6379),), "", 0, False, None),
    ],
)
def test_what_a_url_names(url, mode, nodes, master, db, wait, passed_on):
    t = parse_url(url)
    assert (t.mode, t.nodes, t.master, t.db, t.wait_replica) == (mode, nodes, master, db, wait)
    assert t.ssl == url.startswith("rediss")
    if passed_on is not None:
        assert t.url == passed_on


def test_credentials_are_the_data_servers_and_never_shown():
    t = parse_url("redis+sentinel://app:s%40cret@s1/gateway/0?sentinel_password=sp")
    assert (t.username, t.password, t.sentinel_auth) == ("app", "s@cret", (None, "sp"))
    assert "s@cret" not in repr(t) and "'sp'" not in repr(t)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1/", "ends with /<master name>/<db>"),
        ("redis+sentinel:///gateway/0", "at least one host:port"),
        ("redis+sentinel://s1:port/gateway/0", "is not a host:port"),
        ("redis+cluster://n1/1", "database 0 only"),
        ("redis+cluster://n1?wait_replica=1", "not a Cluster"),
        ("redis://h/0?wait_replica=yes", "0 or 1"),
    ],
)
def test_check_config_names_what_is_wrong(url, problem):
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {"upstream": {"base_url": "http://u", "keys": [{"name": "k", "value_env": "K"}]}, "store": {"url": url}},
            env={"K": "th-key"},
        )
    assert any(p.startswith("store.url") and problem in p for p in caught.value.problems), caught.value.problems
