"""The agent's stop keeps service.shutdown_timeout as one deadline for the whole stop: exporters are
stopped (their memory queues counted as dropped{shutdown}, disk queues closed) by then even when a
receiver is still stopping, and an exporter that starts stopping late drains only until then."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import statsd

from agent.component import ComponentKind
from agent.config import load_config
from agent.registry import builtin_factories
from agent.sending import QueueConfig, Request, RetryConfig, Sender
from agent.service import Agent
from agent.telemetry import Telemetry
from tests.conftest import component_settings, free_port, wait_until

HANG_LIMIT_S = 60.0
"""Only a hang reaches this: the deadlines here are a second."""

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 50ms
exporters:
  prometheus_remote_write:
    endpoint: http://127.0.0.1:{backend}/api/v1/write
    timeout: 60s
service:
  shutdown_timeout: 1s
  telemetry: {{endpoint: ""}}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus_remote_write]
"""


async def test_exporters_stop_at_the_deadline_while_a_receiver_is_still_stopping(
    tmp_path: Path, hung_backend: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver's stop ends only once the exporter's queue has been counted as dropped: the agent
    # must stop its exporters at the deadline without waiting for the receiver (it used to wait for
    # every receiver and processor first, so at the process's deadline the queue was neither counted
    # nor, on disk, closed).
    from receivers.statsd import StatsdReceiver

    path = tmp_path / "agent.yaml"
    port = free_port()
    path.write_text(CONFIG.format(statsd=port, backend=hung_backend()))
    agent = Agent(load_config(str(path), builtin_factories(), []))
    tel = agent.telemetry
    rw = "prometheus_remote_write"
    real_shutdown = StatsdReceiver.shutdown

    async def slow_shutdown(self: StatsdReceiver) -> None:
        await wait_until(
            lambda: tel.value("exporter_dropped_points_total", exporter=rw, reason="shutdown") == queued,
            "the exporter's queue counted at the deadline",
            HANG_LIMIT_S,
        )
        await real_shutdown(self)

    await agent.start()
    try:
        statsd.StatsClient("127.0.0.1", port).incr("queued", 1)
        queued = await wait_until(lambda: tel.value("exporter_queue_points", exporter=rw), "queued")
        monkeypatch.setattr(StatsdReceiver, "shutdown", slow_shutdown)
        async with asyncio.timeout(HANG_LIMIT_S):
            await agent.stop()
    finally:
        await agent.stop()
    assert tel.value("exporter_dropped_points_total", exporter=rw, reason="shutdown") == queued


async def test_a_sender_drains_only_until_the_agents_stop_deadline() -> None:
    async def hang(req: Request) -> None:
        await asyncio.Event().wait()

    tel = Telemetry()
    settings = component_settings(
        tel,
        ComponentKind.EXPORTER,
        "test",
        logger="test.sender",
        stop_remaining_s=lambda: 0.0,  # the agent's deadline has passed
    )
    sender = Sender(settings, hang, QueueConfig(), RetryConfig(), 60.0, rng=random.Random(1))
    await sender.start()
    sender.offer(Request(b"x", 3))
    async with asyncio.timeout(HANG_LIMIT_S):
        await sender.shutdown(3600.0)
    assert tel.value("exporter_dropped_points_total", reason="shutdown") == 3
