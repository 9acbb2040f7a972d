"""Outgoing HTTP requests made on behalf of an `/api` user: which hosts they may reach.

A user who names a URL (a configuration's GetFeatureInfo server, a harvest execution's WMS) must
not make the server fetch from inside its own network: loopback, private (RFC 1918, ULA), CGNAT,
link-local (cloud metadata at 169.254.169.254, fd00:ec2::254), multicast, unspecified and reserved
addresses are refused unless the operator's allow-list (`outbound_allow`) names the host or its
network. The check runs after DNS resolution, on every address the name resolves to, inside the
aiohttp resolver, so the connection goes to an address that was checked (a second DNS answer
cannot swap it: DNS rebinding); IP literals, which aiohttp never resolves, are checked before
each request; redirects are followed by hand, each hop checked, at most `outbound_max_redirects`.

The operator's own requests (admin API layers, `tileserver pyramid harvest`) pass no policy and
keep reaching any host; only the redirect cap (and a relayed GetFeatureInfo's size limit) apply.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

log = logging.getLogger("tileserver.outbound")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT = 5.0  # seconds a store-time check waits for DNS before accepting the name
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")
_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")


class OutboundError(Exception):
    """An outgoing request that cannot be made or read (its message never quotes a remote body)."""


class OutboundRefused(OutboundError):
    """The policy forbids the URL or an address its host resolves to; the message names host and why."""


def address_problem(address: IPAddress) -> str | None:
    """Why an address is not a public one (None when it is): the default policy refuses those."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                                           if address in _NAT64 else None)
        if embedded is not None:
            return address_problem(embedded)
    if address in _METADATA:
        return "cloud metadata address"
    for problem, test in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                          ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                          ("CGNAT", isinstance(address, ipaddress.IPv4Address) and address in _CGNAT),
                          ("reserved", address.is_reserved), ("private", address.is_private),
                          ("non-public", not address.is_global)):
        if test:
            return f"{problem} address"
    return None


@dataclass(frozen=True)
class AllowRule:
    """One `outbound_allow` entry: a host name (`wms.example.org`, `*.example.org`) or a network
    (`10.1.0.0/16`, `127.0.0.1`), optionally with a port (`host:8080`, `127.0.0.1:8080`, `[::1]:8080`)."""

    host: str = ""  # lower case, no trailing dot; "*.x" matches x's subdomains
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        entry = text.strip().lower()
        port: int | None = None
        if entry.startswith("["):  # [v6] or [v6]:port
            inner, _, rest = entry[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), text)
            entry = inner
        elif entry.count(":") == 1:  # host:port or v4:port (v6 without brackets has several)
            entry, _, raw_port = entry.partition(":")
            port = _port(raw_port, text)
        try:
            return cls(network=ipaddress.ip_network(entry, strict=False), port=port)
        except ValueError:
            pass
        host = entry.rstrip(".")
        if not _HOST_PATTERN.match(host):
            raise ValueError(f"outbound_allow: {text!r} is neither a host name, a host pattern nor a network")
        return cls(host=host, port=port)

    def matches_host(self, host: str, port: int) -> bool:
        if not self.host or (self.port is not None and self.port != port):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def matches_address(self, address: IPAddress, port: int) -> bool:
        return (self.network is not None and (self.port is None or self.port == port)
                and address.version == self.network.version and address in self.network)


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"outbound_allow: {text!r} has an invalid port")
    return int(raw)


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # scope of a link-local v6 dropped
    except ValueError:
        return None


@dataclass(frozen=True)
class OutboundPolicy:
    """Which hosts requests made for an `/api` user may reach (built from the settings)."""

    allow: tuple[AllowRule, ...] = ()
    allow_public: bool = True  # False: only what `allow` names
    max_redirects: int = 3

    @classmethod
    def from_settings(cls, settings: Any) -> OutboundPolicy:
        entries: Iterable[str] = settings.outbound_allow
        if isinstance(entries, str):
            entries = entries.split(",")
        return _policy(tuple(entries), bool(settings.outbound_allow_public), int(settings.outbound_max_redirects))

    def host_allowed(self, host: str, port: int) -> bool:
        """The operator named this host: every address it resolves to is accepted, private or not."""
        name = host.lower().rstrip(".")
        return any(rule.matches_host(name, port) for rule in self.allow)

    def check_address(self, host: str, port: int, address: str) -> None:
        """OutboundRefused unless `host` (resolved to `address`) may be reached on `port`."""
        if self.host_allowed(host, port):
            return
        ip = _address(address)
        if ip is None:
            raise OutboundRefused(f"host {host} resolved to an unreadable address {address!r}")
        if any(rule.matches_address(ip, port) for rule in self.allow):
            return
        problem = address_problem(ip)
        shown = host if host == address else f"{host} ({address})"
        if problem is not None:
            raise OutboundRefused(f"host {shown} is not allowed: {problem} (outbound_allow can admit it)")
        if not self.allow_public:
            raise OutboundRefused(f"host {shown} is not in outbound_allow")

    def check_url(self, url: str | URL) -> URL:
        """The URL parsed; OutboundRefused for another scheme than http(s), no host, or an IP literal
        the policy refuses (host names are checked once resolved, by `GuardedResolver`)."""
        parsed = URL(str(url)) if not isinstance(url, URL) else url
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise OutboundRefused(f"{str(url)[:200]!r}: an http(s) URL with a host is required")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if _address(parsed.host) is not None:
            self.check_address(parsed.host, port, parsed.host)
        elif not self.allow_public and not self.host_allowed(parsed.host, port) and not any(
                rule.network is not None for rule in self.allow):
            raise OutboundRefused(f"host {parsed.host} is not in outbound_allow")
        return parsed

    async def check_resolved(self, url: str) -> None:
        """The check made when a user stores a URL: the URL, then every address its host resolves to
        now. A name that does not resolve (yet) is accepted: the check at fetch time decides."""
        parsed = self.check_url(url)
        if _address(parsed.host or "") is not None:
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                parsed.host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
        except (OSError, UnicodeError, TimeoutError):
            return
        for *_, sockaddr in infos:
            self.check_address(parsed.host or "", port, str(sockaddr[0]))


@functools.lru_cache(maxsize=8)
def _policy(entries: tuple[str, ...], allow_public: bool, max_redirects: int) -> OutboundPolicy:
    rules = []
    for entry in (e for e in entries if e.strip()):
        try:
            rules.append(AllowRule.parse(entry))
        except ValueError as exc:  # skipped (said once): a bad entry admits nothing
            log.warning("%s", exc)
    return OutboundPolicy(tuple(rules), allow_public, max_redirects)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses a host when any of its addresses is refused by the policy:
    the connector then connects to the addresses returned here, the ones checked."""

    def __init__(self, policy: OutboundPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            self.policy.check_address(host, port, result["host"])
        return results

    async def close(self) -> None:
        await self.inner.close()


def client_session(policy: OutboundPolicy | None, timeout: float, *,
                   resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """A session whose connections go only where `policy` allows (anywhere when None)."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, resolver) if policy is not None else resolver)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False)


@dataclass(frozen=True)
class Answer:
    status: int
    media_type: str  # lower case, "" when absent or malformed
    charset: str  # "" when absent or malformed
    body: bytes
    url: str  # after redirects

    def describe(self) -> str:
        """Status, type and length: what a log may say of a remote answer (never its body)."""
        return f"HTTP {self.status}, {self.media_type or 'no content type'}, {len(self.body)} bytes"


async def fetch(session: aiohttp.ClientSession, url: str, policy: OutboundPolicy | None, *,
                max_redirects: int = 3, max_bytes: int | None = None) -> Answer:
    """GET `url`, following at most `max_redirects` redirects (policy's when given), each hop checked.
    OutboundRefused for a refused hop, OutboundError for too many redirects or a body over `max_bytes`;
    aiohttp's errors and TimeoutError pass through."""
    limit = policy.max_redirects if policy is not None else max_redirects
    current = url
    for _hop in range(limit + 1):
        target = policy.check_url(current) if policy is not None else URL(current)
        async with session.get(target, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                current = urljoin(str(response.url), location)
                continue
            body = await _read(response, max_bytes)
            media = (response.content_type or "").lower()
            charset = (response.charset or "").lower()
            return Answer(response.status, media if _MEDIA_TYPE.match(media) else "",
                          charset if re.fullmatch(r"[a-z0-9._:-]{1,40}", charset) else "", body, str(response.url))
    raise OutboundError(f"more than {limit} redirects from {url[:200]}")


async def _read(response: aiohttp.ClientResponse, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return await response.read()
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise OutboundError(f"the answer of {declared} bytes exceeds the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise OutboundError(f"the answer exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
