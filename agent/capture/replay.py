"""``headwater replay``: send a capture's records again, at the recorded pace or ``speed`` times faster
(0: as fast as possible), once or in a loop. StatsD over UDP, TCP and Unix sockets (datagram or
stream, as recorded), OTLP over HTTP (aiohttp) and gRPC (grpc.aio, the raw request bytes), the http
receiver's JSON over HTTP.

Where each record goes: ``targets`` first (``ID/TRANSPORT`` then ``ID`` → ``HOST:PORT`` or a socket
path), else the address the receiver listened on when recorded, with its host replaced by ``host``.
Records are sent one after another in file order (a gauge's last value stays the last one);
an error (refused connection, HTTP 4xx/5xx, a gRPC status) is counted by kind and the next record is
sent. GAP records are counted (``gaps``: records the capture had to drop), not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc

from agent.capture.format import DATA, GAP, Header, Record

GRPC_SERVICES = {
    "/v1/metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "/v1/traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "/v1/logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}


@dataclass
class ReplaySummary:
    records: int = 0
    """Records sent (without error)."""
    bytes: int = 0
    """Payload bytes of those records."""
    errors: dict[str, int] = field(default_factory=dict)
    """Records not delivered, by reason (``connection_refused``, ``http_503``, ``grpc_UNAVAILABLE``, …)."""
    gaps: int = 0
    """Records the capture itself had dropped (its GAP records), not in the file."""
    elapsed_s: float = 0.0

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def to_json(self) -> dict[str, Any]:
        rate = self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {
            "records": self.records,
            "bytes": self.bytes,
            "errors": dict(self.errors),
            "gaps": self.gaps,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(rate, 1),
            "bytes_per_s": round(self.bytes / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
        }

    def text(self) -> str:
        d = self.to_json()
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"replayed {d['records']} records, {d['bytes']} bytes in {d['elapsed_s']}s"
            f" ({d['records_per_s']} records/s, {d['bytes_per_s'] / 1e6:.2f} MB/s);"
            f" errors: {errors}; gaps in the capture: {self.gaps} records"
        )


def parse_targets(specs: Sequence[str]) -> dict[str, str]:
    """``ID=HOST:PORT`` or ``ID/TRANSPORT=HOST:PORT`` (or a socket path) → {key: address};
    ValueError names a malformed one."""
    targets = {}
    for spec in specs:
        key, sep, address = spec.partition("=")
        if not sep or not key or not address:
            raise ValueError(f"--receiver {spec!r}: expected ID=HOST:PORT or ID/TRANSPORT=HOST:PORT")
        targets[key] = address
    return targets


class _Senders:
    """Connections kept across records: a socket per datagram address, a stream per stream address,
    one HTTP session, a gRPC channel per address."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._datagram: dict[tuple[str, str], socket.socket] = {}
        self._streams: dict[tuple[str, str], asyncio.StreamWriter] = {}
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def send(self, transport: str, address: str, record: Record) -> None:
        """Send one record; raises OSError, aiohttp.ClientError, grpc.aio.AioRpcError or _Refused."""
        payload = record.payload
        if transport in ("udp", "unixgram"):
            sock = self._datagram.get((transport, address))
            if sock is None:
                sock = self._datagram[(transport, address)] = _datagram_socket(transport, address)
            sock.send(payload)
        elif transport in ("tcp", "unix"):
            writer = self._streams.get((transport, address))
            if writer is None or writer.is_closing():
                if transport == "tcp":
                    host, port = _split(address)
                    _, writer = await asyncio.open_connection(host, port)
                else:
                    _, writer = await asyncio.open_unix_connection(address)
                self._streams[(transport, address)] = writer
            writer.write(payload)
            await writer.drain()
        elif transport == "http":
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
            path = str(record.meta.get("path", "/v1/metrics"))
            headers = {"Content-Type": str(record.meta.get("content_type", "application/json"))}
            async with self._session.post(
                f"http://{address}{path}", data=payload, headers=headers
            ) as response:
                await response.read()
                if response.status >= 400:
                    raise _Refused(f"http_{response.status}")
        elif transport == "grpc":
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.aio.insecure_channel(address)
            service = GRPC_SERVICES.get(str(record.meta.get("path", "")))
            if service is None:
                raise _Refused("unknown_grpc_path")
            call = channel.unary_unary(f"/{service}/Export")  # no serializers: bytes as recorded
            await call(payload, timeout=self._timeout_s)
        else:
            raise _Refused(f"unknown_transport_{transport}")

    async def close(self) -> None:
        for sock in self._datagram.values():
            sock.close()
        for writer in self._streams.values():
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._session is not None:
            await self._session.close()
        for channel in self._channels.values():
            await channel.close()


class _Refused(Exception):
    pass


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _datagram_socket(transport: str, address: str) -> socket.socket:
    if transport == "unixgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect(address)
    else:
        host, port = _split(address)
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        sock.connect(info[4])
    return sock


def resolve(header: Header, record: Record, host: str, targets: Mapping[str, str]) -> str | None:
    """Where ``record`` goes (module docs), or None when neither a target nor the header says."""
    rid, transport = record.receiver, record.transport
    for key in (f"{rid}/{transport}", rid):
        if key in targets:
            return targets[key]
    recorded = header.receivers.get(rid, {}).get("endpoints", {}).get(transport)
    if not recorded:
        return None
    if transport in ("unix", "unixgram"):
        return str(recorded)
    _, port = _split(str(recorded))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def replay(
    header: Header,
    records: Sequence[Record],
    *,
    host: str = "127.0.0.1",
    speed: float = 1.0,
    loops: int = 1,
    targets: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
    summary: ReplaySummary | None = None,
) -> ReplaySummary:
    """Send ``records`` (module docs) ``loops`` times (0: until cancelled) and return the summary
    (``summary`` when given: it holds the counts so far when the replay is cancelled)."""
    targets = targets or {}
    summary = summary if summary is not None else ReplaySummary()
    data = [r for r in records if r.kind == DATA]
    summary.gaps = sum(int(r.meta.get("dropped_records", 0)) for r in records if r.kind == GAP)
    span_ns = max((r.offset_ns for r in data), default=0) + 1
    senders = _Senders(timeout_s)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        n = 0
        while loops == 0 or n < loops:
            for record in data:
                if speed > 0:
                    due = began + (n * span_ns + record.offset_ns) / 1e9 / speed
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                address = resolve(header, record, host, targets)
                if address is None:
                    summary.error("no_address")
                    continue
                try:
                    await senders.send(record.transport, address, record)
                except _Refused as exc:
                    summary.error(str(exc))
                except ConnectionRefusedError:
                    summary.error("connection_refused")
                except grpc.aio.AioRpcError as exc:
                    summary.error(f"grpc_{exc.code().name}")
                except (TimeoutError, OSError, aiohttp.ClientError) as exc:
                    summary.error(type(exc).__name__)
                else:
                    summary.records += 1
                    summary.bytes += len(record.payload)
                if speed <= 0 and summary.records % 256 == 0:
                    await asyncio.sleep(0)  # as fast as possible, but the loop still turns
            n += 1
    finally:
        summary.elapsed_s = loop.time() - began
        await senders.close()
    return summary


def replay_command(
    path: str, host: str, speed: float, loop: bool, receiver_targets: Sequence[str], as_json: bool
) -> int:
    """The CLI verb: 0 when every record was sent, 1 when some failed, 2 on a bad file or argument."""
    import json
    import sys

    from agent.capture.format import CaptureFormatError, read_file

    try:
        targets = parse_targets(receiver_targets)
        if speed < 0:
            raise ValueError(f"--speed {speed:g}: must be 0 (as fast as possible) or more")
        header, records = read_file(path)
    except (ValueError, OSError) as exc:  # CaptureFormatError is a ValueError
        kind = "bad capture file" if isinstance(exc, CaptureFormatError | OSError) else "bad argument"
        print(f"headwater replay: {kind}: {exc}", file=sys.stderr)
        return 2
    summary = ReplaySummary()
    with contextlib.suppress(KeyboardInterrupt):  # --loop ends with Ctrl-C: the summary so far
        asyncio.run(
            replay(
                header,
                records,
                host=host,
                speed=speed,
                loops=0 if loop else 1,
                targets=targets,
                summary=summary,
            )
        )
    print(json.dumps(summary.to_json()) if as_json else summary.text())
    return 1 if summary.errors else 0
