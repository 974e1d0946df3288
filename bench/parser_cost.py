"""Cost of StatsD parsing + aggregation per line (``StatsdAggregator.feed``), per line shape.

    python bench/parser_cost.py                  # µs per line for every shape (best of --repeat runs)
    python bench/parser_cost.py --lines 500000   # more lines per run
    python bench/parser_cost.py --callgrind      # also instructions per line under valgrind
    python bench/parser_cost.py --build          # also the flush: µs per point, slowest chunk

Each shape is a 20-line packet (20 distinct series of that shape, as a client batching several metrics
would send) fed repeatedly into one aggregator, swapping intervals every 100k lines as a flush would.
Wall-clock figures swing ±40 % between runs on a shared machine; the callgrind figure is repeatable:
it runs this script under valgrind once with the feed loop and once without (``--baseline``) and
divides the difference by the number of lines.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from receivers.statsd.aggregator import StatsdAggregator

PACKET_LINES = 20
SWAP_EVERY_LINES = 100_000


def _packet(template: str) -> bytes:
    return "\n".join(template.format(i=i) for i in range(PACKET_LINES)).encode() + b"\n"


SHAPES: dict[str, bytes] = {
    "counter+tags": _packet("api.requests:1|c|#env:prod,host:web-{i},route:/users"),
    "timer+rate+tags": _packet("api.latency:12.5|ms|@0.5|#env:prod,host:web-{i}"),
    "gauge": _packet("queue.depth.{i}:42|g"),
    "plain counter": _packet("page.views.{i}:1|c"),
    "distribution+tags": _packet("db.query.time:3.25|d|#env:prod,db:users-{i}"),
    "set+tags": _packet("users.unique:user-{i}|s|#env:prod"),
    "mixed": "\n".join(
        [
            "api.requests:1|c|#env:prod,host:web-1,route:/users",
            "api.latency:12.5|ms|@0.5|#env:prod,host:web-1",
            "queue.depth:42|g",
            "page.views:1|c",
            "db.query.time:3.25|d|#env:prod,db:users",
        ]
        * (PACKET_LINES // 5)
    ).encode()
    + b"\n",
}


def run(packet: bytes, lines: int, feed_loop: bool) -> float:
    """Seconds spent feeding ``lines`` lines (0 when ``feed_loop`` is off: the callgrind baseline)."""
    agg = StatsdAggregator()
    packets = max(1, lines // PACKET_LINES)
    swap_every = max(1, SWAP_EVERY_LINES // PACKET_LINES)
    feed = agg.feed
    if not feed_loop:
        return 0.0
    elapsed = 0.0
    done = 0
    while done < packets:
        batch = min(swap_every, packets - done)
        t0 = time.perf_counter()
        for _ in range(batch):
            feed(packet)
        elapsed += time.perf_counter() - t0
        done += batch
        agg.swap()  # a flush: the next batch starts new series, as after every interval
    refused = sum(agg.refused.values())
    if refused or agg.accepted != packets * PACKET_LINES:
        raise SystemExit(f"bench packet not fully accepted: accepted={agg.accepted} refused={agg.refused}")
    return elapsed


BUILD_SHAPES = {
    "counter+tags": "api.requests.{i}:1|c|#env:prod,host:web-1",
    "gauge": "queue.depth.{i}:42|g",
    "timer+rate+tags": "api.latency.{i}:12.5|ms|@0.5|#env:prod,host:web-1",
    "set+tags": "users.unique.{i}:u|s|#env:prod",
}


def build_cost(template: str, series: int, values_per_series: int) -> tuple[float, float, int]:
    """(seconds per point, slowest chunk in seconds, points) of building one interval of ``series``
    series that got ``values_per_series`` lines each; the second of two flushes (names cached)."""
    agg = StatsdAggregator(max_series=series)
    packets = [
        "\n".join(template.format(i=i) for i in range(j, min(j + PACKET_LINES, series))).encode()
        for j in range(0, series, PACKET_LINES)
    ]
    result = (0.0, 0.0, 0)
    for _ in range(2):
        for _ in range(values_per_series):
            for packet in packets:
                agg.feed(packet)
        interval = agg.swap()
        chunks = agg.build(interval, 0, 10_000_000_000)
        total = slowest = 0.0
        n = 0
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            took = time.perf_counter() - t0
            if chunk is None:
                break
            total += took
            slowest = max(slowest, took)
            n += len(chunk)
        result = (total / max(1, n), slowest, n)
    return result


def instructions(shape: str, lines: int, baseline: bool) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--shape",
        shape,
        "--lines",
        str(lines),
        "--repeat",
        "1",
        "--quiet",
    ]
    if baseline:
        cmd.append("--baseline")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # same dict layouts in both runs: repeatable counts
    stderr = ""
    for _ in range(3):  # valgrind now and then dies on a busy machine; a rerun is enough
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        stderr = proc.stderr
        match = re.search(r"Collected\s*:\s*(\d+)", stderr)
        if proc.returncode == 0 and match:
            return int(match.group(1))
    raise SystemExit(f"valgrind failed ({' '.join(cmd)}):\n{stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000, help="lines fed per run and shape")
    ap.add_argument("--repeat", type=int, default=5, help="runs per shape; the best is reported")
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append", help="only these shapes")
    ap.add_argument("--callgrind", action="store_true", help="also count instructions per line (valgrind)")
    ap.add_argument("--callgrind-lines", type=int, default=100_000, help="lines per valgrind run")
    ap.add_argument("--build", action="store_true", help="also time build(): the flush of --series series")
    ap.add_argument("--series", type=int, default=100_000, help="series per flush for --build")
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = args.shape or list(SHAPES)
    if args.baseline or args.quiet:
        for shape in shapes:
            run(SHAPES[shape], args.lines, feed_loop=not args.baseline)
        return
    header = f"{'shape':<20} {'µs/line':>8} {'lines/s':>11}"
    print(header + (f" {'instr/line':>11}" if args.callgrind else ""))
    for shape in shapes:
        best = min(run(SHAPES[shape], args.lines, feed_loop=True) for _ in range(args.repeat))
        n = max(1, args.lines // PACKET_LINES) * PACKET_LINES
        row = f"{shape:<20} {best / n * 1e6:>8.3f} {n / best:>11,.0f}"
        if args.callgrind:
            m = max(1, args.callgrind_lines // PACKET_LINES) * PACKET_LINES
            full = instructions(shape, m, baseline=False)
            base = instructions(shape, m, baseline=True)
            row += f" {(full - base) / m:>11,.0f}"
        print(row, flush=True)
    if args.build:
        print(f"\nflush of {args.series:,} series (second interval; chunks of 2000 points; gc as configured)")
        print(f"{'shape':<20} {'µs/point':>8} {'slowest chunk ms':>17}")
        for shape, template in BUILD_SHAPES.items():
            per_point, slowest, _ = build_cost(template, args.series, 3)
            print(f"{shape:<20} {per_point * 1e6:>8.2f} {slowest * 1e3:>17.1f}", flush=True)


if __name__ == "__main__":
    main()
