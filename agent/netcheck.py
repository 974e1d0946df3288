"""Checks of the machine for ``headwater validate``: can we bind this address, write this directory."""

from __future__ import annotations

import os
import socket

from agent.confmodel import parse_host_port


def bind_problem(proto: str, address: str) -> str | None:
    """Try to bind ``address`` (tcp/udp host:port, or a unix socket path); None when it would work."""
    if proto in ("unix", "unixgram"):
        directory = os.path.dirname(os.path.abspath(address)) or "."
        if not os.path.isdir(directory):
            return f"directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"directory {directory} is not writable"
        return None
    try:
        host, port = parse_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = socket.getaddrinfo(host, port, family if ":" in host else 0, 0, 0, socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except (OSError, ValueError) as exc:
        return f"cannot bind {proto} {address}: {getattr(exc, 'strerror', None) or exc}"
    return None


def directory_problem(path: str) -> str | None:
    """None when ``path`` exists as a writable directory or can be created."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
