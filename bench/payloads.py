"""DogStatsD payloads for the benchmark: the same bytes go to Headwater and to the peer.

Throughput runs use a bounded set of 1,000 series (45 % counters, 20 % timers with a sample rate,
20 % gauges, 15 % histograms) spread over prebuilt packets of 20 lines (~1.3 KB) or of one line.
The memory run uses 100,000 distinct series: 20 % timers, 40 % counters, 40 % gauges, all tagged.
Everything is generated from a fixed seed, so every run sends identical bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SEED = 20240601
ROUTES = (
    "/v1/users",
    "/v1/orders",
    "/v1/cart",
    "/v1/search",
    "/v1/login",
    "/v1/items",
    "/v1/payments",
    "/v1/profile",
    "/healthz",
    "/v1/inventory",
)
QUEUES = ("mail", "billing", "search-index", "thumbnails", "webhooks", "exports", "audit", "sync")
REGIONS = ("us1", "eu1")


@dataclass(frozen=True)
class Payload:
    """Datagrams to send in a cycle, each with its number of lines."""

    name: str
    packets: tuple[bytes, ...]
    lines_per_packet: tuple[int, ...]

    @property
    def total_lines(self) -> int:
        return sum(self.lines_per_packet)

    @property
    def mean_lines(self) -> float:
        return self.total_lines / len(self.packets)

    @property
    def mean_bytes(self) -> float:
        return sum(map(len, self.packets)) / len(self.packets)

    def write(self, path: Path) -> Path:
        """Write the sender's input: [u16 length][u16 line count][bytes] per datagram, little-endian."""
        with open(path, "wb") as f:
            for packet, lines in zip(self.packets, self.lines_per_packet, strict=True):
                f.write(struct.pack("<HH", len(packet), lines))
                f.write(packet)
        return path


def _series_templates() -> list[str]:
    """1,000 series as line templates with a ``{v}`` placeholder for the value."""
    out: list[str] = []
    for host in range(25):
        region = REGIONS[host % 2]
        for route in ROUTES:  # 250 counters
            out.append(f"api.requests:{{v}}|c|#env:prod,dc:{region},host:web-{host:02d},route:{route}")
    for host in range(20):
        region = REGIONS[host % 2]
        for code in (200, 201, 204, 301, 400, 401, 404, 429, 500, 503):  # 200 counters
            out.append(f"http.responses:{{v}}|c|#env:prod,dc:{region},host:web-{host:02d},code:{code}")
    for host in range(20):
        region = REGIONS[host % 2]
        for route in ROUTES:  # 200 timers, sampled at 50 %
            out.append(f"api.latency:{{v}}|ms|@0.5|#env:prod,dc:{region},host:web-{host:02d},route:{route}")
    for host in range(25):
        region = REGIONS[host % 2]
        for queue in QUEUES:  # 200 gauges
            out.append(f"queue.depth:{{v}}|g|#env:prod,dc:{region},host:worker-{host:02d},queue:{queue}")
    for host in range(15):
        region = REGIONS[host % 2]
        for route in ROUTES:  # 150 histograms
            out.append(f"payload.size:{{v}}|h|#env:prod,dc:{region},host:web-{host:02d},route:{route}")
    return out


def _value(template: str, rng: random.Random) -> str:
    if "|ms|" in template:
        return f"{rng.lognormvariate(3.0, 0.8):.2f}"
    if "|g|" in template:
        return str(rng.randrange(0, 5000))
    if "|h|" in template:
        return str(rng.randrange(64, 65536))
    return str(rng.choice((1, 1, 1, 1, 2, 3, 5)))


def _pack(lines: Iterable[str], per_packet: int, name: str) -> Payload:
    lines = list(lines)
    packets = []
    counts = []
    for i in range(0, len(lines), per_packet):
        chunk = lines[i : i + per_packet]
        packets.append("\n".join(chunk).encode())
        counts.append(len(chunk))
    return Payload(name, tuple(packets), tuple(counts))


def throughput_payload(lines_per_packet: int, total_lines: int = 10_000) -> Payload:
    """``total_lines`` lines over the 1,000 throughput series, ``lines_per_packet`` per datagram."""
    rng = random.Random(SEED + lines_per_packet)
    templates = _series_templates()
    lines = []
    for _ in range(total_lines):
        template = rng.choice(templates)
        lines.append(template.replace("{v}", _value(template, rng)))
    return _pack(lines, lines_per_packet, f"{lines_per_packet}-line packets")


def throughput_series() -> int:
    return len(_series_templates())


def memory_payload(series: int = 100_000, lines_per_packet: int = 20) -> Payload:
    """``series`` distinct series, each sent once: 20 % timers, 40 % counters, 40 % gauges."""
    rng = random.Random(SEED)
    lines: list[str] = []
    for i in range(series):
        host = f"host:node-{i % 500:03d}"
        kind = i % 5
        if kind == 0:
            lines.append(
                f"svc.latency:{rng.lognormvariate(3.0, 0.8):.2f}|ms|#env:prod,{host},endpoint:/e{i // 5}"
            )
        elif kind in (1, 2):
            lines.append(f"svc.requests:1|c|#env:prod,{host},endpoint:/e{i // 5},kind:k{kind}")
        else:
            lines.append(
                f"svc.inflight:{rng.randrange(0, 100)}|g|#env:prod,{host},slot:s{i // 5},kind:k{kind}"
            )
    return _pack(lines, lines_per_packet, f"{series:,} series")


def check_distinct(payload: Payload) -> int:
    """Number of distinct series (name, type and tags) in ``payload``."""
    keys: set[tuple[bytes, bytes]] = set()
    for packet in payload.packets:
        for line in packet.split(b"\n"):
            name, _, rest = line.partition(b":")
            fields: Sequence[bytes] = rest.split(b"|")
            keys.add((name, b"|".join(f for f in fields[1:] if not f.startswith(b"@"))))
    return len(keys)
