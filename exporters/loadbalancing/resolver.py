"""Where the gateways come from: a fixed list (``static``) or the A/AAAA records of a name (``dns``,
e.g. a Kubernetes headless Service), resolved again every ``interval``.

The DNS lookup is injectable (:data:`Lookup`): the default asks the system resolver through the event
loop's ``getaddrinfo`` (a thread, never the loop); tests pass a fake answering a scripted sequence.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from exporters.loadbalancing.config import DnsResolverConfig

Lookup = Callable[[str], Awaitable[list[str]]]
"""Addresses (IPv4 or IPv6 text) of a host name; raises OSError when the name cannot be resolved."""


async def system_lookup(hostname: str) -> list[str]:
    """The name's A and AAAA records from the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def endpoint(address: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def resolve_dns(config: DnsResolverConfig, lookup: Lookup) -> frozenset[str]:
    """The gateways the name answers now (host:port each); raises OSError or TimeoutError."""
    async with asyncio.timeout(config.timeout):
        addresses = await lookup(config.hostname)
    return frozenset(endpoint(a, config.port) for a in addresses)
