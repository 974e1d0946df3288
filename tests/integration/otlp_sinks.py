"""Independent OTLP sinks for the synchronous integration tests: ``tests.exporters.otlp_sink`` (grpcio and
aiohttp with the generated opentelemetry-proto classes) served from an event loop of their own in a
thread.

Kept out of conftest.py so that what imports the conftest (``tests/hostile``, and through it ``bench``,
both under ``mypy --strict``) does not import the sink.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from tests.exporters.otlp_sink import Sink

T = TypeVar("T")


class ThreadedOtlpSinks:
    """Sinks started on a loop in a thread of its own; :meth:`stop` (or leaving the ``with`` block) stops
    every sink started, then the loop."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def http(self) -> tuple[Sink, str]:
        """A sink serving OTLP/HTTP, and its base URL."""
        sink = Sink()
        self.sinks.append(sink)
        return sink, self._run(sink.start_http())

    def grpc(self) -> tuple[Sink, str]:
        """A sink serving OTLP/gRPC, and its host:port."""
        sink = Sink()
        self.sinks.append(sink)
        return sink, self._run(sink.start_grpc())

    def stop(self) -> None:
        try:
            for sink in self.sinks:
                self._run(sink.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)

    def __enter__(self) -> ThreadedOtlpSinks:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def received(sink: Sink, signal: str) -> list[Any]:
    """The messages of ``signal`` (metrics, traces, logs) ``sink`` has taken so far, in order (a copy: the
    sink's thread appends meanwhile)."""
    return [r.message for r in list(sink.received) if r.signal == signal]
