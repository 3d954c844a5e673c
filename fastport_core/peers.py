"""Who is on the other end: the client address behind a trusted proxy, and the key auth throttling uses.

The adapter knows only the TCP peer. Behind a reverse proxy (or a load balancer) that is the proxy, for
every client, so throttling failed logins by it would lock every client out as soon as one mistypes. The
proxy tells the real address in ``Forwarded`` (RFC 7239) or ``X-Forwarded-For``; those headers are taken
into account only when the TCP peer is one of the operator's configured proxies
(``ServerConfig.trusted_proxies``), because anyone else can write them.

Reading the header chain: every proxy *appends* the address it received the request from, so the entries
on the right are the trustworthy ones. :func:`client_address` walks from the right, skips the entries that
are trusted proxies themselves, and takes the first one that is not: what a client wrote into the header
itself (the left part) can never be chosen while a trusted proxy appended after it. ``Forwarded`` wins
over ``X-Forwarded-For`` when both are present.

:func:`throttle_key` then turns an address into what failures are counted under: IPv4 addresses as they
are, IPv6 addresses by their /64 (one host usually owns a whole /64, so counting single IPv6 addresses
would give a guesser 2**64 fresh budgets).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

from .errors import LocalProtocolError

__all__ = ["TrustedProxies", "client_address", "throttle_key"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV6_PREFIX: Final = 64
"""IPv6 addresses are throttled by this prefix length."""
_MAX_HOPS: Final = 32
"""Header entries examined at most (from the right): a long forged chain costs no more than this."""


class TrustedProxies:
    """The configured proxies: addresses or CIDR networks, IPv4 or IPv6 (``"10.0.0.0/8"``, ``"::1"``).

    Raises :class:`LocalProtocolError` naming an entry that is neither.
    """

    __slots__ = ("_networks",)

    def __init__(self, entries: Iterable[str]) -> None:
        networks: list[_Network] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise LocalProtocolError(f"trusted proxy {entry!r} is not an IP address or network") from None
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        ip = _parse_ip(address) if isinstance(address, str) else None
        return ip is not None and any(ip in network for network in self._networks)


def _parse_ip(text: str) -> _Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 host a dual-stack socket reports
    return ip


def _strip_node(node: str) -> str:
    """An address out of a ``Forwarded`` node or an ``X-Forwarded-For`` entry: quotes, brackets, port off."""
    node = node.strip().strip('"').strip()
    if node.startswith("["):  # "[2001:db8::1]:4711"
        return node[1 : node.find("]")] if "]" in node else node[1:]
    if node.count(":") == 1:  # "192.0.2.1:8080"; a bare IPv6 address has more colons
        return node.partition(":")[0]
    return node


def _forwarded_for(values: Sequence[str]) -> list[str]:
    """The ``for=`` nodes of ``Forwarded`` headers, in order (RFC 7239 §4; other parameters ignored)."""
    nodes: list[str] = []
    for value in values:
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, token = pair.partition("=")
                if name.strip().lower() == "for":
                    nodes.append(_strip_node(token))
    return nodes


def _x_forwarded_for(values: Sequence[str]) -> list[str]:
    return [_strip_node(entry) for value in values for entry in value.split(",")]


def client_address(peer: str, headers: Sequence[tuple[str, str]], proxies: TrustedProxies) -> str:
    """The address a request really comes from: ``peer`` itself unless it is a trusted proxy that named
    the client in ``Forwarded`` or ``X-Forwarded-For`` (``headers``: lower-case names, as the core's
    HTTP layer gives them)."""
    if not proxies or peer not in proxies:
        return peer
    forwarded = [value for name, value in headers if name == "forwarded"]
    chain = (
        _forwarded_for(forwarded)
        if forwarded
        else _x_forwarded_for([value for name, value in headers if name == "x-forwarded-for"])
    )
    chain = [node for node in chain if node][-_MAX_HOPS:]
    for node in reversed(chain):
        if node not in proxies:
            return node
    return chain[0] if chain else peer  # every hop a trusted proxy: the first one is the origin


def throttle_key(address: str) -> str:
    """The key failures of ``address`` are counted under: an IPv4 address, an IPv6 /64 (``"2001:db8::/64"``),
    or the text itself when it is not an IP address (an obfuscated ``Forwarded`` node, ``"unknown"``)."""
    ip = _parse_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, _IPV6_PREFIX), strict=False))
    return str(ip)
