"""Events per second through an event mapping of the ``http`` receiver, on one core.

    taskset -c 0 python3 bench/events_bench.py              # batches of 100 and 1,000 events
    taskset -c 0 python3 bench/events_bench.py --events 500000 --repeat 7

What is timed is the receiver's work for a request body once it has arrived: parse the JSON
(``items.decode_body``), map each event (timestamp, label allow-list, values, unit conversion) and
build the points (one delta counter per series, one exponential histogram per series), through
``RouteParser.parse_body`` with the ``commands`` mapping of examples/events-commands-agents.yaml.
The events are the issue's command events (a user id and a session that do not become labels, 20
command names, 3 statuses, an RFC 3339 timestamp). Best of ``--repeat`` runs: wall-clock figures
swing on a shared machine. Goal: at least 100,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.confmodel import Decoder
from agent.json_events import EventRouteConfig, RouteParser
from receivers.http import HttpConfig, event_mappers

ROOT = Path(__file__).resolve().parents[1]
GOAL_EVENTS_PER_S = 100_000


def parser(max_items: int) -> RouteParser:
    """The example config's commands route, with ``max_items`` per request."""
    raw = yaml.safe_load((ROOT / "examples" / "events-commands-agents.yaml").read_text())
    decoder = Decoder(lambda path: None)
    events = {k: v for k, v in raw["receivers"]["http/events"].items() if k != "auth"}  # no token to check
    config = decoder.decode(HttpConfig, {**events, "max_items": max_items}, ())
    assert not decoder.errors and not config.validate(), (decoder.errors, config.validate())
    return RouteParser(EventRouteConfig(path="/bench", mapping="commands"), event_mappers(config), max_items)


def bodies(batch: int, n: int, seed: int = 1) -> list[bytes]:
    """``n`` request bodies of ``batch`` command events each."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    out = []
    for b in range(n):
        events: list[dict[str, Any]] = []
        for i in range(batch):
            at = now - timedelta(seconds=rng.uniform(0, 60))
            events.append(
                {
                    "user_id": f"user_{rng.randrange(100_000)}",
                    "command_name": f"command-{rng.randrange(20)}",
                    "execution_time_ms": round(rng.lognormvariate(6.5, 1.0), 1),
                    "status": rng.choice(("success", "success", "success", "error", "timeout")),
                    "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                    "context": {"session_id": f"sess_{b}_{i}", "client": "cli/1.4.2"},
                }
            )
        out.append(json.dumps(events).encode())
    return out


def run(batch: int, events: int, repeat: int) -> tuple[float, int]:
    """(best events/s, bytes per event) for requests of ``batch`` events, ``events`` per run."""
    route = parser(max(batch, 1000))
    reqs = bodies(batch, max(1, events // batch))
    best = 0.0
    for _ in range(repeat):
        now_ns = time.time_ns()
        start = time.perf_counter()
        accepted = 0
        for body in reqs:
            parsed = route.parse_body(body, now_ns, 1_000_000)
            accepted += parsed.accepted
        elapsed = time.perf_counter() - start
        assert accepted == batch * len(reqs), accepted
        best = max(best, accepted / elapsed)
    size = sum(len(b) for b in reqs) // (batch * len(reqs))
    return best, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="events per run (default 200,000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per batch size; the best counts")
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 1000], help="events per request")
    args = ap.parse_args()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(f"events through the commands mapping (examples/events-commands-agents.yaml), CPUs {affinity}")
    print(f"{'batch':>6} {'events/s':>12} {'µs/event':>9} {'bytes/event':>12}  goal {GOAL_EVENTS_PER_S:,}/s")
    for batch in args.batches:
        rate, size = run(batch, args.events, args.repeat)
        verdict = "ok" if rate >= GOAL_EVENTS_PER_S else "BELOW GOAL"
        print(f"{batch:>6} {rate:>12,.0f} {1e6 / rate:>9.2f} {size:>12}  {verdict}")


if __name__ == "__main__":
    main()
