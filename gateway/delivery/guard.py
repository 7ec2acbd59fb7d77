"""The one place sessions that fetch result files are made. TokenHub's answers name those URLs, so they are
untrusted (SPEC §4, media and downloads): a session made here fetches over http and https only, and connects only
to public addresses or to those in `upstream.media_allow_networks`.

The address is checked where the connection is made, after DNS, twice over: the resolver drops the addresses
a name resolves to that are not allowed (a name left with none is refused), and the socket factory checks the
address each socket is about to connect to, which is the only check an IP literal in a URL meets (aiohttp
skips the resolver for those). Redirects go through the same connector, each hop through the scheme check.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.settings import UpstreamSettings

# At most this many redirects per result file. aiohttp raises TooManyRedirects when the count of redirect
# answers reaches its `max_redirects`, so a caller that follows MAX_REDIRECTS passes `max_redirects=MAX_HOPS`.
MAX_REDIRECTS = 3
MAX_HOPS = MAX_REDIRECTS + 1
SCHEMES = frozenset({"http", "https"})
_NAT64 = IPv6Network("64:ff9b::/96")

Address = IPv4Address | IPv6Address
Networks = tuple[IPv4Network | IPv6Network, ...]


class MediaRefused(aiohttp.ClientError):
    """A result URL the gateway does not fetch: not http(s), or an address neither public nor allowed.
    A ClientError but not a connection error: nothing was tried that a retry could mend."""


def is_public(address: Address) -> bool:
    """Globally routable unicast; an IPv4-mapped, 6to4 or NAT64 address is judged by the IPv4 address inside."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public(embedded)
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_link_local
        or address.is_loopback
        or address.is_private
        or address.is_unspecified
    )


def is_allowed(address: Address, allow: Networks) -> bool:
    """Public, or inside one of the allowed networks (an IPv4-mapped address as its IPv4 form too)."""
    forms = [address, *([address.ipv4_mapped] if isinstance(address, IPv6Address) and address.ipv4_mapped else [])]
    return any(form in network for form in forms for network in allow) or is_public(address)


def check_address(host: str, allow: Networks) -> None:
    """Raise MediaRefused unless `host` (an address as a resolver or socket gives it) may be connected to."""
    try:
        address = ip_address(host)
    except ValueError:
        raise MediaRefused(f"{host!r} is not an address the gateway can check") from None
    if not is_allowed(address, allow):
        raise MediaRefused(f"{address} is not a public address, nor in upstream.media_allow_networks")


def _embedded_ipv4(address: Address) -> IPv4Address | None:
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and keeps only the addresses the guard allows; a name left with none is refused."""

    def __init__(self, inner: AbstractResolver, allow: Networks) -> None:
        self._inner = inner
        self._allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = list(_allowed_results(results, self._allow))
        if not kept:
            raise MediaRefused(f"{host} resolves to no address the gateway may fetch from")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _allowed_results(results: Iterable[ResolveResult], allow: Networks) -> Iterable[ResolveResult]:
    for result in results:
        try:
            check_address(result["host"], allow)
        except MediaRefused:
            continue
        yield result


def socket_factory(allow: Networks) -> aiohttp.connector.SocketFactoryType:
    """The connector's socket factory: the last check, on the very address the socket connects to."""

    def guarded_socket(addr_info: aiohttp.connector.AddrInfoType) -> socket.socket:
        host = addr_info[4][0]  # of the sockaddr: (host, port) or (host, port, flowinfo, scope_id)
        check_address(str(host), allow)
        return socket.socket(*addr_info[:3])  # family, type, proto

    return guarded_socket


async def http_only(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """Client middleware, run for the first request and for every redirect hop."""
    if request.url.scheme not in SCHEMES:
        raise MediaRefused(f"the scheme {request.url.scheme!r} is not fetched (http and https only)")
    return await handler(request)


def media_session(
    settings: UpstreamSettings, timeout: aiohttp.ClientTimeout, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """A session for result files: guarded as above, no cookies, no decompression (the bytes pass on exactly
    as stored). `resolver` (tests) replaces the system's name resolution under the guard."""
    allow = settings.media_allow_networks
    connector = aiohttp.TCPConnector(
        # A ThreadedResolver (getaddrinfo in a thread) has nothing to close, so the connector not owning the
        # guard leaks nothing; an injected resolver is the caller's to close.
        resolver=GuardedResolver(resolver or aiohttp.ThreadedResolver(), allow),
        socket_factory=socket_factory(allow),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        middlewares=(http_only,),
    )
