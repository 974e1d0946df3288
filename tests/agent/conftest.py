"""Fixtures shared by the agent's lifecycle tests (reload, stop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest


@pytest.fixture
async def hung_backend() -> AsyncIterator[Callable[[], int]]:
    """Backends that accept connections and never answer: each call starts one and returns its port."""
    servers: list[asyncio.Server] = []
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    async def start() -> int:
        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    ports = [await start() for _ in range(3)]
    yield ports.pop
    for writer in held:
        writer.close()
    for server in servers:
        server.close()
