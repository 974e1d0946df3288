"""``workers`` on the OTLP/HTTP and ``http`` receivers: points/s one process takes and N worker processes
take, and what the main process pays per forwarded point against one process's cost per decoded point.

    python3 bench/otlp_workers_bench.py [--receiver otlp|http] [--format protobuf|json] [--gzip] [--grpc]
        [--workers 1,2] [--duration 3] [--connections 8] [--points 500]

For each worker count the receiver (``workers: N``; 1 = in this process) runs in this process's event
loop with a consumer that only counts. A sender process (this script with ``--send``: aiohttp, one
session, ``--connections`` kept-alive connections, so the kernel's SO_REUSEPORT hash spreads them over
the workers) posts the same request of ``--points`` gauge points (OTLP protobuf or OTLP/JSON, or the
``http`` receiver's JSON items) back to back for ``--duration`` seconds; with ``--grpc``, grpc.aio
channels (one connection each) make unary OTLP/gRPC Export calls. Printed per run:

- ``points_per_s``: points accepted / send time. The sender is on the same 2 cores: with 2 workers it
  competes with them for the second core, so this is a floor, not what 2 free cores take;
- ``cpu_s`` per process (utime + stime from /proc): ``main`` and each worker;
- ``main_cpu_us_per_point``: the main process's CPU per point — with workers, what taking a forwarded
  batch costs (reading the socket pair, rebuilding the points, the consumer); with 1, the whole work;
- ``worker_cpu_us_per_point``: the workers' CPU per point (HTTP, decompression, decoding, conversion,
  encoding for the socket pair);
- ``split``: batches each worker handed in.

``--codec`` prints instead the per-point cost of decoding an OTLP request against unpickling its points
as objects or as agent/workers.py's rows (the main process's share with workers).

Short and bounded: each run sends for ``--duration`` seconds (at most 30) and the script ends by
itself. The machine is shared (2 cores): run it when nobody else is benchmarking, and read the figures
as this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import grpc
from harness import cpu_seconds, free_port
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent import gcpolicy
from agent.component import ComponentId, ComponentKind, Settings, Signal
from agent.model import Batch, MetricBatch
from agent.telemetry import ComponentTelemetry, Telemetry
from agent.workers import decode_batch, encode_batch
from receivers.http import HttpConfig, HttpReceiver
from receivers.otlp import OtlpConfig, OtlpReceiver
from receivers.otlp.convert import Converted, MetricsConverter, ShadowMetricsRequest
from receivers.otlp.wire import to_json

POINTS_PER_METRIC = 20
EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


class _Count:
    """A consumer that counts points and keeps nothing."""

    def __init__(self) -> None:
        self.points = 0

    async def consume(self, batch: Batch) -> None:
        self.points += len(batch)


def otlp_request(points: int) -> ExportMetricsServiceRequest:
    """``points`` gauge points, 20 per metric, two attributes each, one resource."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="shop")))
    sm = rm.scope_metrics.add()
    now = time.time_ns()
    for m_i in range((points + POINTS_PER_METRIC - 1) // POINTS_PER_METRIC):
        m = sm.metrics.add(name=f"metric_{m_i}")
        for i in range(min(POINTS_PER_METRIC, points - m_i * POINTS_PER_METRIC)):
            dp = m.gauge.data_points.add(time_unix_nano=now, as_double=i * 1.5)
            dp.attributes.append(KeyValue(key="host", value=AnyValue(string_value=f"h{i}")))
            dp.attributes.append(KeyValue(key="pod", value=AnyValue(string_value=f"p{i % 3}")))
    return req


def request_body(receiver: str, fmt: str, points: int, gzipped: bool) -> tuple[bytes, dict[str, str]]:
    if receiver == "http":
        ms = int(time.time() * 1000)
        items = [
            {"name": f"metric_{i // POINTS_PER_METRIC}", "value": i * 1.5, "timestamp": ms,
             "labels": {"host": f"h{i % POINTS_PER_METRIC}", "pod": f"p{i % 3}"}}
            for i in range(points)
        ]  # fmt: skip
        body, ctype = json.dumps(items).encode(), "application/json"
    elif fmt == "json":
        body, ctype = to_json(otlp_request(points)), "application/json"
    else:
        body, ctype = otlp_request(points).SerializeToString(), "application/x-protobuf"
    headers = {"Content-Type": ctype}
    if gzipped:
        body = gzip.compress(body, 6)
        headers["Content-Encoding"] = "gzip"
    return body, headers


# -- the sender process ------------------------------------------------------------------------------
async def send(url: str, body: bytes, headers: dict[str, str], connections: int, duration: float) -> None:
    deadline = time.monotonic() + duration
    ok = refused = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal ok, refused
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    ok += 1
                else:
                    refused += 1

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(connections)))
    print(json.dumps({"ok": ok, "refused": refused, "elapsed": time.monotonic() - started}))


async def send_grpc(target: str, body: bytes, connections: int, duration: float) -> None:
    """The same over OTLP/gRPC: ``connections`` channels (each its own connection), unary Export calls
    of the serialized request."""
    deadline = time.monotonic() + duration
    ok = refused = 0

    async def one() -> None:
        nonlocal ok, refused
        options = (("grpc.use_local_subchannel_pool", 1),)  # its own connection
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            export = channel.unary_unary(EXPORT_METHOD)
            while time.monotonic() < deadline:
                try:
                    await export(body, timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError:
                    refused += 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    print(json.dumps({"ok": ok, "refused": refused, "elapsed": time.monotonic() - started}))


# -- one run -----------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    port = free_port()
    tel = Telemetry()
    settings = Settings(
        id=ComponentId.parse(args.receiver),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(tel, "receiver", args.receiver),
        logger=logging.getLogger(f"bench.{args.receiver}"),
    )
    counter = _Count()
    receiver: OtlpReceiver | HttpReceiver
    if args.receiver == "otlp":
        endpoint = f"127.0.0.1:{port}"
        config = OtlpConfig(
            grpc=endpoint if args.grpc else None, http=None if args.grpc else endpoint, workers=str(workers)
        )
        receiver = OtlpReceiver(settings, config, {Signal.METRICS: counter})
    else:
        receiver = HttpReceiver(
            settings,
            HttpConfig(endpoint=f"127.0.0.1:{port}", workers=str(workers)),
            {Signal.METRICS: counter},
        )
    await receiver.start()
    pool = receiver.pool
    pids = pool.pids if pool is not None else []
    body, _ = request_body(args.receiver, args.format, args.points, args.gzip)
    me = os.getpid()
    before = {pid: cpu_seconds(pid) for pid in [me, *pids]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--send",
        f"127.0.0.1:{port}" if args.grpc else f"http://127.0.0.1:{port}/v1/metrics",
        "--receiver",
        args.receiver,
        "--format",
        args.format,
        "--points",
        str(args.points),
        "--connections",
        str(args.connections),
        "--duration",
        str(args.duration),
        *(["--gzip"] if args.gzip else []),
        *(["--grpc"] if args.grpc else []),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    sent = json.loads(out)
    cpu = {pid: cpu_seconds(pid) - before[pid] for pid in before}
    accepted = counter.points
    split = list(pool.batches) if pool is not None else None
    await receiver.shutdown()
    worker_cpu = sum(s for pid, s in cpu.items() if pid != me)
    return {
        "receiver": args.receiver,
        "format": "json" if args.receiver == "http" else "grpc" if args.grpc else args.format,
        "gzip": args.gzip,
        "workers": workers,
        "points_per_request": args.points,
        "body_bytes": len(body),
        "requests_ok": sent["ok"],
        "requests_refused": sent["refused"],
        "points_per_s": round(accepted / sent["elapsed"]),
        "cpu_s": {"main": round(cpu[me], 2), **{f"worker {pid}": round(cpu[pid], 2) for pid in pids}},
        "main_cpu_us_per_point": round(cpu[me] / accepted * 1e6, 2) if accepted else None,
        "worker_cpu_us_per_point": round(worker_cpu / accepted * 1e6, 2) if accepted and pids else None,
        "split": split,
        "load": os.getloadavg()[0],
    }


def codec_costs(points: int, rounds: int = 30) -> dict[str, float]:
    """µs per point: decode + convert an OTLP request; unpickle its points as objects; as rows."""
    body = otlp_request(points).SerializeToString()
    converter = MetricsConverter()
    t = time.perf_counter()
    for _ in range(rounds):
        request = ShadowMetricsRequest.FromString(body)
        pts = [p for chunk in converter.chunks(request, time.time_ns(), 50_000, Converted()) for p in chunk]
    decode = (time.perf_counter() - t) / rounds / len(pts)
    batch = MetricBatch(tuple(pts), {})
    objects = pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)
    t = time.perf_counter()
    for _ in range(rounds):
        pickle.loads(objects)
    load_objects = (time.perf_counter() - t) / rounds / len(pts)
    rows = encode_batch(batch)
    t = time.perf_counter()
    for _ in range(rounds):
        encode_batch(batch)
    encode_rows = (time.perf_counter() - t) / rounds / len(pts)
    t = time.perf_counter()
    for _ in range(rounds):
        decode_batch(rows)
    decode_rows = (time.perf_counter() - t) / rounds / len(pts)
    return {
        "points": len(pts),
        "otlp_decode_convert_us": round(decode * 1e6, 2),
        "pickled_points_load_us": round(load_objects * 1e6, 2),
        "rows_encode_us": round(encode_rows * 1e6, 2),
        "rows_decode_us": round(decode_rows * 1e6, 2),
        "rows_bytes_per_point": round(len(rows) / len(pts), 1),
        "protobuf_bytes_per_point": round(len(body) / len(pts), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--receiver", choices=("otlp", "http"), default="otlp")
    parser.add_argument("--format", choices=("protobuf", "json"), default="protobuf", help="otlp only")
    parser.add_argument("--gzip", action="store_true", help="gzip the request bodies (HTTP)")
    parser.add_argument("--grpc", action="store_true", help="otlp over gRPC (protobuf) instead of HTTP")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds each run sends (at most 30)")
    parser.add_argument("--connections", type=int, default=8, help="kept-alive client connections")
    parser.add_argument("--points", type=int, default=500, help="points per request (http: at most 1000)")
    parser.add_argument("--codec", action="store_true", help="print the per-point codec costs and exit")
    parser.add_argument("--send", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.duration = min(args.duration, 30.0)
    if args.send:
        body, headers = request_body(args.receiver, args.format, args.points, args.gzip)
        if args.grpc:
            asyncio.run(send_grpc(args.send, body, args.connections, args.duration))
        else:
            asyncio.run(send(args.send, body, headers, args.connections, args.duration))
        return 0
    if args.codec:
        print(json.dumps(codec_costs(args.points)))
        return 0
    # The collector settings the agent's process starts with (agent/gcpolicy.py); workers take the
    # main process's thresholds (agent/workers.py), so both sides of the comparison run alike.
    gcpolicy.freeze_startup_state()
    print(f"# {os.cpu_count()} CPUs; load {os.getloadavg()}", file=sys.stderr)
    for workers in (int(w) for w in args.workers.split(",")):
        print(json.dumps(asyncio.run(run(args, workers))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
