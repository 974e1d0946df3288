"""How fast ``headwater replay`` sends on this machine (``--speed 0``, one sender, records in order).

    python bench/replay_bench.py [--statsd-records 50000] [--otlp-records 2000] [--max-seconds 60]

1. StatsD over UDP: a synthetic capture of ``--statsd-records`` datagrams of 20 lines each (~600 B,
   DogStatsD tags) replayed to a UDP socket this process binds and never reads (the send rate is what
   is measured; the kernel drops what overflows the socket's buffer, which is not replay's cost).
2. StatsD over TCP: the same lines as stream reads to a headwater agent subprocess (statsd receiver,
   flush 1h, debug exporter to /dev/null); TCP's flow control makes this the agent's intake rate too.
3. OTLP over HTTP and over gRPC: ``--otlp-records`` ExportMetricsServiceRequests of 50 points each,
   replayed to the same agent's otlp receiver (each request awaits its answer: one request in flight).

Each phase is bounded by ``--max-seconds``. Prints one line per phase: records/s, lines or points/s,
MB/s, errors. Results vary with the machine's load (it is shared): run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agent.capture.format import DATA, Header, Record
from agent.capture.replay import ReplaySummary, replay

LINES_PER_DATAGRAM = 20
POINTS_PER_REQUEST = 50


def _port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def statsd_records(n: int, transport: str) -> list[Record]:
    records = []
    for i in range(n):
        lines = b"".join(
            b"bench.requests.%d:%d|c|#route:/api/%d,env:prod,host:web-%d\n" % (j, i, j, i % 50)
            for j in range(LINES_PER_DATAGRAM)
        )
        records.append(Record(DATA, {"receiver": "statsd", "transport": transport, "offset_ns": i}, lines))
    return records


def otlp_records(n: int, transport: str) -> list[Record]:
    points = [
        metrics_pb2.NumberDataPoint(
            as_double=float(j),
            time_unix_nano=1_700_000_000_000_000_000,
            attributes=[common_pb2.KeyValue(key="k", value=common_pb2.AnyValue(string_value=f"v{j}"))],
        )
        for j in range(POINTS_PER_REQUEST)
    ]
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        metrics=[
                            metrics_pb2.Metric(name="bench.g", gauge=metrics_pb2.Gauge(data_points=points))
                        ]
                    )
                ]
            )
        ]
    )
    body = request.SerializeToString()
    meta = {
        "receiver": "otlp",
        "transport": transport,
        "path": "/v1/metrics",
        "content_type": "application/x-protobuf",
    }
    return [Record(DATA, {**meta, "offset_ns": i}, body) for i in range(n)]


async def _phase(name: str, records: list[Record], target: dict[str, str], unit: int, max_s: float) -> None:
    summary = ReplaySummary()
    header = Header("bench", time.time_ns())
    try:
        await asyncio.wait_for(replay(header, records, speed=0, targets=target, summary=summary), max_s)
    except TimeoutError:
        print(f"  ({name}: stopped at --max-seconds {max_s:g})")
    d = summary.to_json()
    print(
        f"{name:<12} {d['records']:>8} records in {d['elapsed_s']:>6.2f}s:"
        f" {d['records_per_s']:>10.0f} records/s,"
        f" {d['records_per_s'] * unit:>11.0f} {'lines' if 'statsd' in name else 'points'}/s,"
        f" {d['bytes_per_s'] / 1e6:6.1f} MB/s, errors {d['errors'] or 0}"
    )


def _start_agent(
    statsd_tcp: int, http: int, grpc: int, telemetry: int, directory: str
) -> subprocess.Popen[bytes]:
    config = os.path.join(directory, "agent.yaml")
    with open(config, "w") as f:
        f.write(
            f"""
receivers:
  statsd: {{tcp: "127.0.0.1:{statsd_tcp}", flush_interval: 1h}}
  otlp: {{http: "127.0.0.1:{http}", grpc: "127.0.0.1:{grpc}"}}
exporters:
  debug: {{verbosity: basic, path: /dev/null}}
service:
  telemetry: {{endpoint: "127.0.0.1:{telemetry}", log_level: warning}}
  pipelines:
    metrics: {{receivers: [statsd, otlp], exporters: [debug]}}
"""
        )
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", config])


def _wait_ready(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the agent did not become ready")
        time.sleep(0.1)


async def main_async(args: argparse.Namespace) -> None:
    print(f"replay --speed 0 on {os.cpu_count()} CPUs (python {sys.version.split()[0]})")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    udp_target = {"statsd": f"127.0.0.1:{sink.getsockname()[1]}"}
    await _phase(
        "statsd/udp",
        statsd_records(args.statsd_records, "udp"),
        udp_target,
        LINES_PER_DATAGRAM,
        args.max_seconds,
    )
    sink.close()
    ports = {name: _port() for name in ("tcp", "http", "grpc", "telemetry")}
    with tempfile.TemporaryDirectory() as directory:
        agent = _start_agent(ports["tcp"], ports["http"], ports["grpc"], ports["telemetry"], directory)
        try:
            await asyncio.to_thread(_wait_ready, ports["telemetry"])
            await _phase(
                "statsd/tcp",
                statsd_records(args.statsd_records, "tcp"),
                {"statsd": f"127.0.0.1:{ports['tcp']}"},
                LINES_PER_DATAGRAM,
                args.max_seconds,
            )
            for transport in ("http", "grpc"):
                await _phase(
                    f"otlp/{transport}",
                    otlp_records(args.otlp_records, transport),
                    {"otlp": f"127.0.0.1:{ports[transport]}"},
                    POINTS_PER_REQUEST,
                    args.max_seconds,
                )
        finally:
            agent.terminate()
            agent.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--statsd-records", type=int, default=50_000)
    parser.add_argument("--otlp-records", type=int, default=2_000)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
