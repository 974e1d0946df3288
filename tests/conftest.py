"""Helpers every test may use: a recording sink, free ports, bounded waits, a Settings builder, a test
CA with a server certificate (``tls_certs``), and a guard that fails a test whose event loop was blocked
longer than a limit.

The guard times every event-loop callback (each step of every task, every ``call_soon``/``call_later``
callback) while a test runs, exactly what asyncio's debug mode calls a slow callback, without debug
mode's cost of a stack capture per callback. A test fails when one callback ran longer than its limit:
the ``loop_block_limit(seconds)`` marker (``None`` turns the guard off for that test), else the
``loop_block_limit_s`` fixture. That fixture is ``None`` (off) here and :data:`LOOP_BLOCK_LIMIT_S` in
the directories that have been checked against it (``tests/agent``, ``tests/processors``: see their
conftest.py); when every directory has been, the default here becomes :data:`LOOP_BLOCK_LIMIT_S` and
those overrides go.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import pytest

from agent.component import Backpressure, ComponentId, ComponentKind, Factory, Settings
from agent.config import AgentConfig, build_config
from agent.model import Batch, MetricBatch, Point
from agent.registry import builtin_factories
from agent.service import Agent
from agent.telemetry import ComponentTelemetry, Telemetry

if TYPE_CHECKING:
    from tests.integration.conftest import PrometheusServer

pytest_plugins = ["pytester"]

T = TypeVar("T")

LOOP_BLOCK_LIMIT_S = 5.0
"""Longest one loop callback may run in a guarded test. Generous on purpose: the machine is shared and
noisy, and a real block (a synchronous sleep, fsync or HTTP call on the loop) is usually far longer."""


class Sink:
    """A Consumer that keeps every batch it takes, in order, and can be told to refuse.

    ``refuse`` (True) refuses every batch with ``Backpressure(reason, retry_after_s)`` until set back to
    False; ``refuse_times`` refuses that many batches, then takes again; ``fail`` raises a RuntimeError
    (a broken consumer, not backpressure). ``calls`` counts every ``consume``, refused or not.
    """

    def __init__(
        self,
        *,
        refuse: bool = False,
        refuse_times: int = 0,
        reason: str = "queue_full",
        retry_after_s: float | None = None,
        fail: bool = False,
    ) -> None:
        self.batches: list[Batch] = []
        self.refuse = refuse
        self.refuse_times = refuse_times
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.fail = fail
        self.calls = 0

    async def consume(self, batch: Batch) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("broken consumer")
        if self.refuse_times > 0:
            self.refuse_times -= 1
            raise Backpressure(self.reason, self.retry_after_s)
        if self.refuse:
            raise Backpressure(self.reason, self.retry_after_s)
        self.batches.append(batch)

    def points(self) -> list[Point]:
        """The points of every metric batch taken, in order."""
        return [p for b in self.batches if isinstance(b, MetricBatch) for p in b.points]

    def values(self, name: str | None = None) -> list[float]:
        """The values of the points taken (of metric ``name`` only, if given), in order."""
        return [p.value for p in self.points() if name is None or p.name == name]

    def total(self, name: str) -> float:
        """The sum of the values of metric ``name`` taken."""
        return sum(self.values(name))


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port on ``host`` free for ``kind`` (SOCK_STREAM: TCP, SOCK_DGRAM: UDP) at the time of the call.

    Prefer binding port 0 and reading the port back where the code under test allows it: another
    process may take this one before the test binds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """Paths of a test CA's certificate and of a server certificate it signed for 127.0.0.1 (PEM)."""

    ca: str
    cert: str
    key: str


@pytest.fixture
def tls_certs(tmp_path: Path) -> Certs:
    """A CA and a server certificate and key for 127.0.0.1, made with the openssl command (a synchronous
    fixture: openssl runs before the test, never on its event loop)."""
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    key, csr, crt, ext = tmp_path / "s.key", tmp_path / "s.csr", tmp_path / "s.crt", tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2",
            "-subj", "/CN=headwater-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
            "-days", "2", "-extfile", ext)  # fmt: skip
    return Certs(str(ca_crt), str(crt), str(key))


def _failed_wait(what: str, timeout_s: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@overload
async def wait_until(condition: Callable[[], Awaitable[T]], what: str = ..., timeout_s: float = ...) -> T: ...
@overload
async def wait_until(condition: Callable[[], T], what: str = ..., timeout_s: float = ...) -> T: ...
async def wait_until(
    condition: Callable[[], Any], what: str = "the condition", timeout_s: float = 30.0
) -> Any:
    """Poll ``condition`` on the loop every 10 ms until it returns something truthy, and return that.

    ``condition`` may be a coroutine function (awaited each time). Fails with an AssertionError naming
    ``what`` after ``timeout_s``: generous, because it only bounds a test that is failing anyway.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _failed_wait(what, timeout_s)
        await asyncio.sleep(0.01)


def wait_until_sync(
    condition: Callable[[], T],
    what: str = "the condition",
    timeout_s: float = 30.0,
    *,
    every_s: float = 0.02,
    retry_on: tuple[type[Exception], ...] = (),
) -> T:
    """:func:`wait_until` for code off the loop (a thread, a subprocess): polls every ``every_s``.

    An exception of a type in ``retry_on`` (a peer that does not answer yet) counts as "not yet"; the
    last one is named in the failure. Any other exception, an AssertionError above all, ends the wait.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            if result := condition():
                return result
        except retry_on as exc:
            if isinstance(exc, AssertionError):
                raise
            last = exc
        if time.monotonic() >= deadline:
            failed = _failed_wait(what, timeout_s)
            raise (AssertionError(f"{failed} (last error: {last!r})") if last else failed) from last
        time.sleep(every_s)


def component_settings(
    tel: Telemetry,
    kind: ComponentKind,
    id: str,
    *,
    telemetry_id: str | None = None,
    logger: str | None = None,
    **fields: Any,
) -> Settings:
    """Settings of the component ``id`` ("type" or "type/name") of ``kind`` reporting into ``tel``.

    Its telemetry is labelled ``telemetry_id`` (default: ``id``), its logger is ``logger`` (default:
    ``test.<id>``); ``fields`` set the other Settings fields (``shutdown_timeout_s``, ``ready``, ...).
    """
    return Settings(
        id=ComponentId.parse(id),
        kind=kind,
        telemetry=ComponentTelemetry(tel, kind.value, telemetry_id or id),
        logger=logging.getLogger(logger or f"test.{id}"),
        **fields,
    )


class LoopWatch:
    """Records the event-loop callbacks that ran longer than ``limit_s`` while it is active."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.blocks: list[tuple[float, str]] = []
        """(seconds, what ran) of each callback over the limit, in order."""
        self.reported = 0

    def saw(self, elapsed_s: float, handle: asyncio.Handle) -> None:
        if elapsed_s > self.limit_s:
            self.blocks.append((elapsed_s, _describe(handle)))

    def check(self, when: str) -> None:
        """Fails the test if a callback over the limit ran since the last check."""
        new, self.reported = self.blocks[self.reported :], len(self.blocks)
        if new:
            lines = "\n".join(f"  {s:.1f} s in {what}" for s, what in new)
            pytest.fail(
                f"the event loop was blocked longer than {self.limit_s:g} s during {when} "
                f"(raise the limit with @pytest.mark.loop_block_limit(seconds) only if the block is the "
                f"test's own work, never the code under test's):\n{lines}",
                pytrace=False,
            )


def _describe(handle: asyncio.Handle) -> str:
    # A task step's callback is bound to its task, whose repr names the coroutine and where it is defined.
    owner = getattr(handle._callback, "__self__", None)  # type: ignore[attr-defined]
    return repr(owner) if isinstance(owner, asyncio.Future) else repr(handle)


_active: list[LoopWatch] = []
_handle_run = asyncio.Handle._run


def _timed_run(handle: asyncio.Handle) -> None:
    start = time.perf_counter()
    try:
        _handle_run(handle)
    finally:
        elapsed_s = time.perf_counter() - start
        for watch in _active:
            watch.saw(elapsed_s, handle)


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """The loop-block limit of tests without a ``loop_block_limit`` marker (None: not guarded)."""
    return None


_WATCH = pytest.StashKey[LoopWatch]()


@pytest.fixture(autouse=True)
def _loop_block_guard(request: pytest.FixtureRequest, loop_block_limit_s: float | None) -> Iterator[None]:
    marker = request.node.get_closest_marker("loop_block_limit")
    limit_s = marker.args[0] if marker is not None else loop_block_limit_s
    if limit_s is None:
        yield
        return
    watch = LoopWatch(limit_s)
    request.node.stash[_WATCH] = watch
    _active.append(watch)
    asyncio.Handle._run = _timed_run  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        _active.remove(watch)
        if not _active:
            asyncio.Handle._run = _handle_run  # type: ignore[method-assign]
    watch.check("teardown")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # A block during setup or the test itself fails the test (not its teardown).
    result = yield
    watch = item.stash.get(_WATCH, None)
    if watch is not None:
        watch.check("the test")
    return result


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loop_block_limit(seconds): fail the test if one event-loop callback runs longer (None: unguarded)",
    )


class AgentGraph:
    """Agents built from ``yaml``-shaped data with the built-in component types, or a test's own
    (override ``factories``), the agent's own telemetry endpoint off; :meth:`close` stops every agent
    started. The ``agents`` fixture gives one with the built-in types and closes it."""

    def __init__(self) -> None:
        self.agents: list[Agent] = []

    def factories(self) -> Mapping[tuple[ComponentKind, str], Factory]:
        """The component types the agents are built with: the built-in ones unless overridden."""
        return builtin_factories()

    def config(self, data: dict[str, Any]) -> AgentConfig:
        data = {**data, "service": {**data["service"], "telemetry": {"endpoint": ""}}}
        return build_config(data, self.factories())

    async def start(self, data: dict[str, Any]) -> Agent:
        agent = Agent(self.config(data))
        self.agents.append(agent)
        await agent.start()
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            await agent.stop()


@pytest.fixture
async def agents() -> AsyncIterator[AgentGraph]:
    """Agents with the built-in component types, stopped after the test."""
    graph = AgentGraph()
    yield graph
    await graph.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    """A real Prometheus (remote-write receiver on, on a free port), started before the test's event
    loop and stopped after the test; the test points its scrapes or writes at it."""
    from tests.integration.conftest import launch_prometheus  # it imports this module

    server = launch_prometheus(tmp_path / "prometheus", free_port())
    try:
        yield server
    finally:
        server.stop()
