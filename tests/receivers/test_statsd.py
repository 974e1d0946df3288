"""The StatsD receiver's transports and flush, through real sockets (parser rules: test_statsd_parser.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from agent.component import ComponentKind, Signal
from agent.model import Kind
from agent.telemetry import Telemetry
from receivers.statsd import StatsdConfig, StatsdReceiver
from tests.conftest import Sink, component_settings, free_port, wait_until
from tests.receivers.conftest import Make


async def test_udp_datagrams_are_aggregated_and_flushed(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}")
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(5):
            s.sendto(b"hits:1|c\nhits:2|c|@0.5", ("127.0.0.1", port))
    await wait_until(
        lambda: tel.value("receiver_datagrams_total") == 5, "tel.value('receiver_datagrams_total') == 5"
    )
    await r.flush()
    assert sink.total("hits") == 25  # 5 × (1 + 2/0.5)
    (point,) = [p for p in sink.points() if p.name == "hits"]
    assert point.kind is Kind.SUM and point.start_time_unix_nano < point.time_unix_nano
    assert tel.value("receiver_accepted_points_total") == 10
    assert tel.value("receiver_udp_kernel_drops_total") == 0


async def test_flush_loop_runs_on_its_interval(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, _ = make(udp=f"127.0.0.1:{port}", flush_interval=0.1)
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"a:1|c", ("127.0.0.1", port))
    await wait_until(lambda: sink.total("a") == 1, "sink.total('a') == 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"a:1|c", ("127.0.0.1", port))
    await wait_until(lambda: sink.total("a") == 2, "a second interval, a second delta")


async def test_tcp_lines_split_across_reads_and_unterminated_last_line(make: Make) -> None:
    port = free_port()
    r, sink, tel = make(tcp=f"127.0.0.1:{port}")
    await r.start()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x:1|c\nx:")
    await writer.drain()
    await wait_until(lambda: tel.value("receiver_accepted_points_total") == 1, "the first line parsed")
    writer.write(b"2|c\nx:4|c")  # the last line has no newline: it counts at EOF
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await wait_until(
        lambda: tel.value("receiver_accepted_points_total") == 3,
        "tel.value('receiver_accepted_points_total') == 3",
    )
    await r.flush()
    assert sink.total("x") == 7


async def test_tcp_line_too_long_closes_connection(make: Make) -> None:
    port = free_port()
    r, _, tel = make(tcp=f"127.0.0.1:{port}", tcp_max_line_length=64)
    await r.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ok:1|c\n" + b"y" * 200)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the agent
    writer.close()
    assert tel.value("receiver_refused_points_total", reason="line_too_long") == 1
    assert tel.value("receiver_accepted_points_total") == 1


async def test_tcp_connection_cap_and_idle_timeout(make: Make) -> None:
    port = free_port()
    r, _, tel = make(tcp=f"127.0.0.1:{port}", tcp_max_connections=1, tcp_idle_timeout=0.3)
    await r.start()
    r1, w1 = await asyncio.open_connection("127.0.0.1", port)
    await wait_until(lambda: len(r.connections) == 1, "len(r.connections) == 1")
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(r2.read(), 10) == b""  # over the cap: closed at once
    assert tel.value("receiver_refused_points_total", reason="connection_limit") == 1
    assert await asyncio.wait_for(r1.read(), 10) == b""  # idle: closed after the timeout
    assert tel.value("receiver_closed_connections_total", reason="idle") == 1
    w1.close()
    w2.close()


async def test_unix_datagram_socket_mode_and_stale_file(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "dsd.socket"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()  # a socket file left by a previous run
    r, sink, tel = make(unixgram=str(path))
    await r.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"dsd.hits:3|c|#env:dev", str(path))
    await wait_until(
        lambda: tel.value("receiver_accepted_points_total") == 1,
        "tel.value('receiver_accepted_points_total') == 1",
    )
    await r.flush()
    (point,) = sink.points()
    assert point.labels == (("env", "dev"),) and point.value == 3
    await r.shutdown()
    assert not path.exists()  # removed on shutdown


async def test_unix_stream_socket(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "statsd.sock"
    r, sink, _ = make(unix=str(path), socket_mode="0600")
    await r.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    _, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"u:5|g\n")
    await writer.drain()
    writer.close()
    await wait_until(lambda: r.agg.accepted == 1, "r.agg.accepted == 1")
    await r.flush()
    assert [p.value for p in sink.points()] == [5]


async def test_refuses_to_replace_a_regular_file(make: Make, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    r, _, _ = make(unixgram=str(path))
    with pytest.raises(OSError, match="not a socket"):
        await r.start()
    assert path.read_text() == "precious"


async def test_shutdown_flushes_what_was_received(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, _ = make(udp=f"127.0.0.1:{port}")
    await r.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"late:1|c", ("127.0.0.1", port))
    await r.shutdown()  # reads what the kernel holds, then flushes
    assert sink.total("late") == 1


async def test_backpressure_is_counted_not_raised(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}")
    await r.start()
    sink.refuse = True
    r.feed(b"a:1|c\nb:1|c")
    await r.flush()
    assert tel.value("receiver_refused_points_total", reason="backpressure_queue_full") == 2


def test_default_transport_is_udp_localhost() -> None:
    assert StatsdConfig().listeners() == {"udp": "127.0.0.1:8125"}
    assert StatsdConfig(tcp="127.0.0.1:9").listeners() == {"tcp": "127.0.0.1:9"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("udp", "8125", "not host:port"),
        ("flush_interval", 0.0, "at least 50ms"),
        ("socket_mode", "rw-rw----", "not an octal file mode"),
        ("max_buckets", 1, "between 2 and 16384"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    problems = StatsdConfig(**{field: value}).validate()  # type: ignore[arg-type]
    assert [p for p, _ in problems] == [field] and message in problems[0][1]


async def test_events_and_service_checks_are_counted_as_dropped_until_logs_exist(make: Make) -> None:
    r, sink, tel = make()
    r.feed(b"_e{5,4}:title|text|#env:dev\n_sc|db.up|0|m:fine\nx:1|c")
    await r.flush()
    assert [p.name for p in sink.points()] == ["x"]
    assert tel.value("receiver_dropped_points_total", reason="no_logs_pipeline") == 2
    assert tel.value("receiver_refused_points_total") == 0


def _attrs(record: object) -> dict[str, object]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in record.attributes}  # type: ignore[attr-defined]


async def test_events_and_service_checks_become_log_records_in_a_logs_pipeline() -> None:
    tel = Telemetry()
    metrics, logs = Sink(), Sink()
    settings = component_settings(tel, ComponentKind.RECEIVER, "statsd")
    r = StatsdReceiver(
        settings, StatsdConfig(flush_interval=3600.0), {Signal.METRICS: metrics, Signal.LOGS: logs}
    )
    r.feed(
        b"_e{6,9}:Deploy|v2 is out|d:1700000000|h:web-1|k:dep|p:low|t:error|s:ci|#env:dev\n"
        b"_sc|db.up|2|h:db-1|#env:dev|m:replica lag\n"
        b"x:1|c"
    )
    await r.flush()
    assert [p.name for p in metrics.points()] == ["x"]
    (batch,) = logs.batches
    assert len(batch) == 2
    (rl,) = batch.resource_logs
    assert rl.scope_logs[0].scope.name == "headwater.statsd"
    event, check = rl.scope_logs[0].log_records
    assert event.body.string_value == "v2 is out" and event.time_unix_nano == 1_700_000_000 * 10**9
    assert (event.severity_number, event.severity_text) == (17, "ERROR")
    assert _attrs(event) == {
        "env": "dev",
        "host.name": "web-1",
        "event.name": "dogstatsd.event",
        "dogstatsd.event.title": "Deploy",
        "dogstatsd.event.aggregation_key": "dep",
        "dogstatsd.event.priority": "low",
        "dogstatsd.event.alert_type": "error",
        "dogstatsd.event.source_type_name": "ci",
    }
    assert check.body.string_value == "replica lag" and check.time_unix_nano == 0
    assert check.observed_time_unix_nano > 0 and check.severity_text == "ERROR"
    assert _attrs(check)["dogstatsd.service_check.status"] == 2
    assert _attrs(check)["dogstatsd.service_check.name"] == "db.up"
    assert tel.value("receiver_dropped_points_total") == 0
    await r.shutdown()


async def test_only_in_a_logs_pipeline_metrics_are_counted_as_dropped() -> None:
    tel = Telemetry()
    logs = Sink()
    settings = component_settings(tel, ComponentKind.RECEIVER, "statsd")
    r = StatsdReceiver(settings, StatsdConfig(flush_interval=3600.0), {Signal.LOGS: logs})
    r.feed(b"x:1|c\ny:2|g\n_sc|db.up|0")
    await r.flush()
    assert tel.value("receiver_dropped_points_total", reason="no_metrics_pipeline") == 2
    assert sum(len(b) for b in logs.batches) == 1
    await r.shutdown()
