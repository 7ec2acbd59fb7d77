"""The result-file guard (SPEC §4, media and downloads): which addresses pass, with and without an allow-list,
and real sessions against the hostile TokenHub and the canary on loopback (names through a fake resolver)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from ipaddress import ip_address, ip_network

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.delivery.content import MediaFetcher
from gateway.delivery.guard import MAX_HOPS, MediaRefused, is_allowed, is_public, media_session
from gateway.errors import UpstreamError
from gateway.settings import UpstreamSettings
from tests.doubles import make_settings
from tests.hostile import Canary, HostileTokenHub, Reply

SIM_ONLY = ("127.0.0.1/32",)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("8.8.8.8", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # the cloud metadata service
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("224.0.0.1", False),  # multicast: is_global in Python 3.11
        ("240.0.0.1", False),
        ("198.18.0.1", False),  # benchmarking
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%1", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::1", False),  # 6to4 around 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 around 10.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 around 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 around 8.8.8.8
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(ip_address(address)) is public
    assert is_allowed(ip_address(address), ()) is public


@pytest.mark.parametrize(
    ("address", "allow", "allowed"),
    [
        ("127.0.0.1", ["127.0.0.1/32"], True),
        ("127.0.0.2", ["127.0.0.1/32"], False),
        ("127.0.0.2", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.1/32"], True),  # the mapped form of an allowed address is that address
        ("::ffff:127.0.0.2", ["127.0.0.1/32"], False),
        ("10.0.0.7", ["10.0.0.0/24"], True),
        ("10.0.1.7", ["10.0.0.0/24"], False),
        ("fd00::5", ["fd00::/64"], True),
        ("fd00:0:0:1::5", ["fd00::/64"], False),
        ("::1", ["127.0.0.0/8"], False),
        ("8.8.8.8", ["10.0.0.0/8"], True),  # an allow-list adds to the public addresses
    ],
)
def test_allow_list(address: str, allow: list[str], allowed: bool) -> None:
    networks = tuple(ip_network(network) for network in allow)
    assert is_allowed(ip_address(address), networks) is allowed


# ---- real sessions on loopback ------------------------------------------------------------------------


class FakeResolver(AbstractResolver):
    """Names to addresses, as a DNS server that lies might answer."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.names[host]
        ]

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def hub() -> Iterator[HostileTokenHub]:
    with HostileTokenHub() as server:
        yield server


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    with Canary() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(hub: HostileTokenHub, canary: Canary) -> Iterator[None]:
    hub.reset()
    canary.connections.clear()
    yield
    assert canary.connections == [], "the canary was reached"


def upstream(*allow: str) -> UpstreamSettings:
    return make_settings(upstream={"media_allow_networks": list(allow)}).upstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    names = {"video.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"], "both.test": ["127.0.0.2", "127.0.0.1"]}
    client = media_session(upstream(*SIM_ONLY), aiohttp.ClientTimeout(total=5), FakeResolver(names))
    yield client
    await client.close()


async def fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url, max_redirects=MAX_HOPS) as response:
        assert response.status == 200
        return await response.read()


async def test_allowed_addresses_and_names_are_fetched(session, hub):
    path = "/media/ok.mp4"
    hub.serve(path, Reply(body=b"video bytes"))
    assert await fetch(session, f"{hub.url}{path}") == b"video bytes"
    assert await fetch(session, f"http://video.test:{hub.port}{path}") == b"video bytes"
    # A name that resolves both inside and to an allowed address is only ever connected to the allowed one.
    assert await fetch(session, f"http://both.test:{hub.port}{path}") == b"video bytes"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:{canary}/video.mp4",  # an IP literal: aiohttp skips the resolver, the socket factory sees it
        "http://[::ffff:127.0.0.2]:{canary}/video.mp4",
        "http://inside.test:{canary}/video.mp4",  # a name that resolves inside
    ],
)
async def test_inside_addresses_are_refused_before_connecting(session, canary, url):
    with pytest.raises(MediaRefused):
        await fetch(session, url.format(canary=canary.port))


async def test_the_default_refuses_loopback_altogether(hub):
    hub.serve("/media/ok.mp4", Reply(body=b"video bytes"))
    async with media_session(upstream(), aiohttp.ClientTimeout(total=5)) as client:
        with pytest.raises(MediaRefused):
            await fetch(client, f"{hub.url}/media/ok.mp4")
        with pytest.raises(MediaRefused):
            await fetch(client, f"http://localhost:{hub.port}/media/ok.mp4")  # the system's resolver, guarded
    assert hub.hits("/media/ok.mp4") == []


async def test_redirects_are_checked_hop_by_hop(session, hub, canary):
    hub.serve("/media/ok.mp4", Reply(body=b"video bytes"))
    assert await fetch(session, hub.redirect_chain("three", 3, f"{hub.url}/media/ok.mp4")) == b"video bytes"
    with pytest.raises(aiohttp.TooManyRedirects):
        await fetch(session, hub.redirect_chain("four", 4, f"{hub.url}/media/ok.mp4"))
    with pytest.raises(MediaRefused):
        await fetch(session, hub.redirect_chain("into", 2, f"{canary.url}/video.mp4"))
    with pytest.raises(MediaRefused):
        await fetch(session, hub.redirect("/named", f"http://inside.test:{canary.port}/video.mp4"))
    with pytest.raises(aiohttp.NonHttpUrlRedirectClientError):
        await fetch(session, hub.redirect("/ftp", "ftp://127.0.0.1/video.mp4"))


@pytest.mark.parametrize("scheme", ["ws", "wss", "tcp"])
async def test_only_http_and_https_are_fetched(session, hub, scheme):
    hub.serve("/media/ok.mp4", Reply(body=b"video bytes"))
    with pytest.raises(MediaRefused):  # aiohttp alone would fetch these as plain HTTP
        await fetch(session, f"{scheme}://127.0.0.1:{hub.port}/media/ok.mp4")
    assert hub.hits("/media/ok.mp4") == []


async def test_a_refusal_is_a_bad_upstream_answer_not_a_connect_failure(canary):
    fetcher = MediaFetcher(upstream(*SIM_ONLY))
    try:
        with pytest.raises(UpstreamError) as caught:
            await fetcher.open(f"{canary.url}/video.mp4")
    finally:
        await fetcher.close()
    assert (caught.value.status, caught.value.code) == (502, "upstream_bad_response")
