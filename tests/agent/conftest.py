"""Fixtures shared by the agent tests; they run under the loop-block guard (tests/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.conftest import LOOP_BLOCK_LIMIT_S


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """Every agent test fails if one event-loop callback runs longer than LOOP_BLOCK_LIMIT_S."""
    return LOOP_BLOCK_LIMIT_S


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
