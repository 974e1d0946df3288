"""Cost of ``StatsdAggregator.feed`` per line on the benchmark's own 20-line DogStatsD packets.

    python bench/feed_cost.py --lines 200000 --repeat 3     # µs per line, best of the runs
    python bench/feed_cost.py --lines 20000 [--baseline]    # one silent run, for valgrind

Both modes do the same setup (imports, payload, one warm-up pass over every packet so the series
caches are filled); ``--baseline`` stops there. Under ``valgrind --tool=callgrind`` the difference in
instructions between a run and its baseline, divided by ``--lines``, is the cost of one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from payloads import throughput_payload

from receivers.statsd.aggregator import StatsdAggregator


def feed_lines(lines: int, baseline: bool) -> float:
    """Seconds spent feeding ``lines`` lines after the warm-up (0.0 for the baseline)."""
    payload = throughput_payload(20)
    packets = payload.packets
    agg = StatsdAggregator()
    feed = agg.feed
    for packet in packets:
        feed(packet)
    warm = agg.accepted
    if baseline:
        return 0.0
    per_packet = payload.lines_per_packet[0]
    rounds, rest = divmod(lines // per_packet, len(packets))
    t0 = time.perf_counter()
    for _ in range(rounds):
        for packet in packets:
            feed(packet)
    for packet in packets[:rest]:
        feed(packet)
    elapsed = time.perf_counter() - t0
    fed = agg.accepted - warm
    refused: int = sum(agg.refused.values())
    if fed != (rounds * len(packets) + rest) * per_packet or refused:
        raise SystemExit(f"payload not fully accepted: accepted={fed} refused={dict(agg.refused)}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000, help="lines fed after the warm-up (multiple of 20)")
    ap.add_argument("--repeat", type=int, default=0, help="timed runs; print the best µs per line")
    ap.add_argument("--baseline", action="store_true", help="setup and warm-up only")
    args = ap.parse_args()
    if args.lines % 20:
        ap.error("--lines must be a multiple of 20")
    if args.repeat <= 0:
        feed_lines(args.lines, args.baseline)
        return
    best = min(feed_lines(args.lines, False) for _ in range(args.repeat))
    print(f"{best / args.lines * 1e6:.4f}")


if __name__ == "__main__":
    main()
