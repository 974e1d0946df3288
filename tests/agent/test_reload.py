"""Reloading the running agent (agent.service.Agent.reload, agent.cli._reload): bad files are refused
with the running config kept; unchanged components keep running with their sockets; a changed exporter
hands its queue to its successor; a config that cannot start leaves the running graph as it was."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import statsd

from agent import cli as agent_cli
from agent.component import ComponentId
from agent.config import AgentConfig, load_config
from agent.registry import builtin_factories
from agent.service import Agent
from tests.conftest import wait_until
from tests.integration.conftest import free_tcp_udp_port

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    tcp: 127.0.0.1:{statsd}
    flush_interval: 50ms
processors:
  batch:
    timeout: {batch_timeout}
exporters:
  debug:
    path: {out}
  prometheus_remote_write:
    endpoint: http://127.0.0.1:{backend}/api/v1/write
    timeout: 60s
    sending_queue: {{queue_size: 10000}}
service:
  shutdown_timeout: 1s
  telemetry: {{endpoint: ""}}
  pipelines:
    metrics:
      receivers: [statsd]
      processors: [batch]
      exporters: [debug, prometheus_remote_write]
"""

RW = ComponentId("prometheus_remote_write")
STATSD = ComponentId("statsd")
DEBUG = ComponentId("debug")


class Setup:
    def __init__(self, tmp_path: Path, backend: int) -> None:
        self.path = tmp_path / "agent.yaml"
        self.out = tmp_path / "points.jsonl"
        self.values = {
            "statsd": free_tcp_udp_port(),
            "out": self.out,
            "backend": backend,
            "batch_timeout": "50ms",
        }

    def write(self, **changes: Any) -> AgentConfig:
        self.values.update(changes)
        self.path.write_text(CONFIG.format(**self.values))
        return load_config(str(self.path), builtin_factories(), [])

    def points(self) -> list[dict[str, Any]]:
        """What the debug exporter wrote: one JSON object per point."""
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def total(self, name: str) -> float:
        return sum(p["value"] for p in self.points() if p.get("name") == name)


def instance(agent: Agent, cid: ComponentId) -> Any:
    status = {c["id"]: c for c in agent.status()["components"]}
    assert status[str(cid)]["state"] == "running"
    running = {**agent._receivers, **agent._exporters}
    return running[cid].instance


async def test_a_changed_exporter_hands_its_queue_over_and_the_rest_keeps_running(
    tmp_path: Path, hung_backend: Callable[[], int]
) -> None:
    setup = Setup(tmp_path, hung_backend())
    agent = Agent(setup.write())
    await agent.start()
    try:
        client = statsd.StatsClient("127.0.0.1", setup.values["statsd"])
        for i in range(200):
            client.incr(f"before.m{i % 20}")
        tel = agent.telemetry
        await wait_until(
            lambda: sum(setup.total(f"before.m{i}") for i in range(20)) == 200, "the debug file has them"
        )
        # The backend never answers: every point written by the debug exporter is still queued.
        queued = await wait_until(
            lambda: (n := tel.value("exporter_queue_points", exporter=str(RW))) == len(setup.points()) and n,
            "the same points queued for the hung backend",
        )
        receiver, debug, old_rw = instance(agent, STATSD), instance(agent, DEBUG), instance(agent, RW)
        batch = agent._processors[0].instance

        assert await agent.reload(setup.write(backend=hung_backend()))

        assert instance(agent, STATSD) is receiver  # its sockets never closed
        assert instance(agent, DEBUG) is debug
        assert agent._processors[0].instance is batch
        assert instance(agent, RW) is not old_rw
        assert tel.value("exporter_queue_points", exporter=str(RW)) == queued  # handed over, none dropped
        assert tel.value("exporter_dropped_points_total") == 0
        for i in range(200):
            client.incr(f"after.m{i % 20}")
        await wait_until(
            lambda: sum(setup.total(f"after.m{i}") for i in range(20)) == 200, "the kept pipeline still flows"
        )
        # Every point went to both exporters: the successor holds the old queue and the new points.
        await wait_until(
            lambda: tel.value("exporter_queue_points", exporter=str(RW)) == len(setup.points()),
            "the successor queues the new points behind the old",
        )
    finally:
        await agent.stop()
    assert tel.value("exporter_dropped_points_total", exporter=str(RW), reason="shutdown") == len(
        setup.points()
    )


async def test_a_changed_receiver_restarts_on_its_new_address(
    tmp_path: Path, hung_backend: Callable[[], int]
) -> None:
    setup = Setup(tmp_path, hung_backend())
    agent = Agent(setup.write())
    await agent.start()
    try:
        old_port = setup.values["statsd"]
        debug = instance(agent, DEBUG)
        assert await agent.reload(setup.write(statsd=free_tcp_udp_port()))
        assert instance(agent, DEBUG) is debug
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the old socket is closed
            assert s.connect_ex(("127.0.0.1", old_port)) != 0
        statsd.TCPStatsClient("127.0.0.1", setup.values["statsd"]).incr("moved", 3)
        await wait_until(lambda: setup.total("moved") == 3, "the new address flows")
        assert agent.ready
    finally:
        await agent.stop()


async def test_a_config_that_cannot_start_leaves_the_running_graph_untouched(
    tmp_path: Path, hung_backend: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup(tmp_path, hung_backend())
    running_config = setup.write()
    agent = Agent(running_config)
    await agent.start()
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        receiver, rw = instance(agent, STATSD), instance(agent, RW)
        port = setup.values["statsd"]
        bad = setup.write(statsd=taken.getsockname()[1], backend=hung_backend())
        assert not await agent.reload(bad)
        assert "the machine is not ready" in caplog.text and "cannot bind udp" in caplog.text
        assert agent.config is running_config
        assert instance(agent, STATSD) is receiver and instance(agent, RW) is rw
        statsd.StatsClient("127.0.0.1", port).incr("still", 2)
        await wait_until(lambda: setup.total("still") == 2, "the running pipeline still flows")
        assert agent.ready
    finally:
        taken.close()
        await agent.stop()


async def test_a_removed_exporter_drains_in_the_background(
    tmp_path: Path, hung_backend: Callable[[], int]
) -> None:
    setup = Setup(tmp_path, hung_backend())
    agent = Agent(setup.write())
    await agent.start()
    try:
        statsd.StatsClient("127.0.0.1", setup.values["statsd"]).incr("gone", 5)
        tel = agent.telemetry
        await wait_until(lambda: tel.value("exporter_queue_points", exporter=str(RW)) == 1, "queued")
        await wait_until(lambda: setup.total("gone") == 5, "written")
        text = setup.path.read_text().replace(", prometheus_remote_write]", "]")
        cut = text.index("  prometheus_remote_write:")
        setup.path.write_text(text[:cut] + text[text.index("service:") :])
        assert await agent.reload(load_config(str(setup.path), builtin_factories(), []))
        assert RW not in agent._exporters
        assert any(c["state"] == "retiring" for c in agent.status()["components"])
        await wait_until(
            lambda: tel.value("exporter_dropped_points_total", exporter=str(RW), reason="shutdown") == 1,
            "the removed exporter's drain ended at its deadline",
        )
        await wait_until(lambda: len(agent.status()["components"]) == 3, "it is gone from status")
    finally:
        await agent.stop()


BAD_FILES = {
    "not YAML": "receivers: [unclosed\n",
    "an unknown key": "receivers:\n  statsd:\n    udpp: 127.0.0.1:1\n",
    "not UTF-8": b"\xff\xfe\x00receivers".decode("latin-1"),
    "empty": "",
}


@pytest.mark.parametrize("kind", [*BAD_FILES, "missing", "a loader that raises ValueError"])
async def test_a_bad_file_is_refused_and_the_running_config_stays(
    kind: str,
    tmp_path: Path,
    hung_backend: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup = Setup(tmp_path, hung_backend())
    running_config = setup.write()
    agent = Agent(running_config)
    await agent.start()
    try:
        receiver = instance(agent, STATSD)
        if kind == "missing":
            setup.path.unlink()
        elif kind in BAD_FILES:
            setup.path.write_bytes(BAD_FILES[kind].encode("latin-1"))
        else:

            def digits(*args: object) -> AgentConfig:
                raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

            monkeypatch.setattr(agent_cli, "load_config", digits)
        with caplog.at_level(logging.ERROR, logger="headwater"):
            await agent_cli._reload(agent, str(setup.path), [])
        assert "reload refused, the running config stays" in caplog.text
        assert agent.config is running_config
        assert instance(agent, STATSD) is receiver
        statsd.StatsClient("127.0.0.1", setup.values["statsd"]).incr("kept", 4)
        await wait_until(lambda: setup.total("kept") == 4, "the running pipeline still flows")
    finally:
        await agent.stop()


def gauges(agent: Agent, name: str) -> list[dict[str, str]]:
    """The label sets of the samples of ``name`` that /metrics would show now."""
    return [s.labels for f in agent.telemetry.collect() for s in f.samples if s.name == name]


async def test_a_refused_reload_keeps_the_running_components_gauges(
    tmp_path: Path, hung_backend: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    # The reload changes the batch processor (a new instance is created beside the running one, under
    # the same label) and adds an exporter that cannot start: the reload is refused, the new processor
    # released — and with it went the gauge of the processor that keeps running.
    setup = Setup(tmp_path, hung_backend())
    agent = Agent(setup.write())
    await agent.start()
    try:
        batch = agent._processors[0].instance
        buffered = "headwater_processor_batch_buffered_points"
        assert gauges(agent, buffered) == [{"processor": "batch@metrics"}]
        setup.write(batch_timeout="70ms")
        text = setup.path.read_text()
        extra = (
            "  prometheus_remote_write/second:\n"
            f"    endpoint: http://127.0.0.1:{hung_backend()}/api/v1/write\n"
            "    auth: {basic: {username: u, password_file: " + str(tmp_path / "missing") + "}}\n"
        )
        text = text.replace("service:", extra + "service:").replace(
            "exporters: [debug, prometheus_remote_write]",
            "exporters: [debug, prometheus_remote_write, prometheus_remote_write/second]",
        )
        setup.path.write_text(text)
        assert not await agent.reload(load_config(str(setup.path), builtin_factories(), []))
        assert "cannot start exporter prometheus_remote_write/second" in caplog.text
        assert agent._processors[0].instance is batch
        assert gauges(agent, buffered) == [{"processor": "batch@metrics"}]
        assert {"exporter": "prometheus_remote_write/second"} not in gauges(
            agent, "headwater_exporter_queue_size"
        )
        # Applied this time: the old processor retires, the new one's gauge stays.
        assert await agent.reload(setup.write(batch_timeout="70ms"))
        await wait_until(lambda: not agent._retiring, "the old batch processor retired")
        assert agent._processors[0].instance is not batch
        assert gauges(agent, buffered) == [{"processor": "batch@metrics"}]
    finally:
        await agent.stop()


async def test_a_retired_component_leaves_no_gauge_behind(
    tmp_path: Path, hung_backend: Callable[[], int]
) -> None:
    # The http receiver and the percentiles processor do not drop their gauges when they stop: once a
    # reload has removed them, /metrics must not keep reading them.
    setup = Setup(tmp_path, hung_backend())
    setup.write()
    text = setup.path.read_text()
    with_http = text.replace(
        "processors:\n",
        f"  http:\n    endpoint: 127.0.0.1:{free_tcp_udp_port()}\nprocessors:\n  percentiles: {{}}\n",
    ).replace(
        "      receivers: [statsd]\n      processors: [batch]",
        "      receivers: [statsd, http]\n      processors: [percentiles, batch]",
    )
    setup.path.write_text(with_http)
    agent = Agent(load_config(str(setup.path), builtin_factories(), []))
    await agent.start()
    try:
        assert gauges(agent, "headwater_receiver_connections") == [{"receiver": "http"}]
        assert gauges(agent, "headwater_percentiles_series") == [{"processor": "percentiles@metrics"}]
        setup.path.write_text(text)
        assert await agent.reload(load_config(str(setup.path), builtin_factories(), []))
        await wait_until(lambda: not agent._retiring, "the percentiles processor retired")
        assert gauges(agent, "headwater_receiver_connections") == []
        assert gauges(agent, "headwater_percentiles_series") == []
        assert gauges(agent, "headwater_processor_batch_buffered_points") == [{"processor": "batch@metrics"}]
    finally:
        await agent.stop()


@pytest.mark.parametrize("failing", ["hand_over", "adopt"])
async def test_a_hand_over_that_raises_leaves_a_working_graph(
    failing: str,
    tmp_path: Path,
    hung_backend: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A queue that cannot be handed over (an I/O error while the old exporter stops, or while the new
    # one takes the requests) must not leave the exporter's entry pointing at the stopped instance with
    # the successor running outside the graph: the new config runs, the failure is logged.
    from exporters.prometheus_remote_write import PrometheusRemoteWriteExporter

    setup = Setup(tmp_path, hung_backend())
    agent = Agent(setup.write())
    await agent.start()
    try:
        old_rw = instance(agent, RW)
        started: list[Any] = []
        real_start = PrometheusRemoteWriteExporter.start

        async def start(self: PrometheusRemoteWriteExporter) -> None:
            started.append(self)
            await real_start(self)

        async def broken(self: PrometheusRemoteWriteExporter, *args: Any) -> Any:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(PrometheusRemoteWriteExporter, "start", start)
        monkeypatch.setattr(PrometheusRemoteWriteExporter, failing, broken)
        with caplog.at_level(logging.ERROR, logger="headwater"):
            assert await agent.reload(setup.write(backend=hung_backend()))
        assert "Input/output error" in caplog.text
        new_rw = instance(agent, RW)
        assert new_rw is not old_rw and started == [new_rw]  # no instance running outside the graph
        tel = agent.telemetry
        statsd.StatsClient("127.0.0.1", setup.values["statsd"]).incr("after", 3)
        await wait_until(lambda: setup.total("after") == 3, "written")
        await wait_until(
            lambda: tel.value("exporter_queue_points", exporter=str(RW)), "queued in the new exporter"
        )
        assert tel.value("exporter_dropped_points_total", exporter=str(RW), reason="shutdown") == 0
    finally:
        await agent.stop()
