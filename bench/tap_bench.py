"""What the tap costs the pipeline: StatsD sustained rate with nobody watching and with one
``headwater tap`` on a busy metric.

    python bench/tap_bench.py [--quick] [--flush-interval 1] [--duration 30]

Measured as users run it: ``python -m agent run`` on the receiver core (``taskset``, as bench/run.py),
the paced UDP sender (``udp_sender.c``) on the other core sending bench/run.py's 20-line DogStatsD
packets (1,000 series), kernel defaults. For each case:

1. the sustained rate (< 0.1 % loss; the search and confirmation of bench/run.py);
2. the agent's CPU (share of one core, process CPU seconds) at one fixed rate, 60 % of the
   no-subscriber sustained rate, ``--repeats`` runs per case alternated, median: a steadier measure of
   cost than a rate search on a shared machine.

Cases: ``none`` — no subscriber (the Links' ``tap`` is None: one attribute read per batch);
``busy`` — ``python -m agent tap --metric api.requests`` (250 of the 1,000 series, every flush; its
output read and counted) connected to the agent's telemetry endpoint. ``--flush-interval`` defaults
to 1 s (not the agent's default 10 s) so the subscriber has ten times as much to filter and render.

Also printed, in process: the tap's whole work per flush with that subscriber (hand-off, filter,
render, WebSocket frames; the figure least disturbed by other work on the machine), and ns per
``Link.consume`` with nobody watching (the idle cost per batch) and of its tap check.
Results: stdout table, bench/results/tap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import FULL, QUICK, REPO, RESULTS, SENDER_CORE, Headwater, Sender, log, workdir
from payloads import throughput_payload
from probes import Probe, Sustained, find_sustained, run_probe

BUSY_METRIC = "api.requests"


class TappedHeadwater(Headwater):
    """The agent, plus (when ``tap_args``) one ``headwater tap`` client on the sender's core whose
    output is counted."""

    def __init__(self, wd: Path, label: str, flush_interval_s: float, tap_args: list[str] | None) -> None:
        super().__init__(wd, label, flush_interval_s)
        self.tap_args = tap_args
        self.tap: subprocess.Popen[bytes] | None = None
        self.tap_out = wd / f"tap-{label}.out"
        self.tap_err = wd / f"tap-{label}.err"

    def start(self) -> None:
        super().start()
        if not self.tap_args:
            return
        with open(self.tap_out, "wb") as out, open(self.tap_err, "wb") as err:
            self.tap = subprocess.Popen(
                ["taskset", "-c", SENDER_CORE, sys.executable, "-m", "agent", "tap",
                 "--endpoint", f"127.0.0.1:{self.admin_port}", "--format", "json", *self.tap_args],
                cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while b"watching" not in self.tap_err.read_bytes():
            if self.tap.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"headwater tap did not subscribe: {self.tap_err.read_text()}")
            time.sleep(0.05)

    def tap_lines(self) -> int:
        return self.tap_out.read_bytes().count(b"\n") if self.tap_out.exists() else 0

    def close(self) -> None:
        if self.tap is not None:
            self.tap.terminate()
            self.tap.wait(10)
            self.tap = None
        super().close()


def link_idle_ns(n: int = 1_000_000) -> float:
    """ns per ``Link.consume`` of a batch when nobody watches (the target does nothing)."""
    from agent.model import MetricBatch
    from agent.service import Link

    class Nothing:
        async def consume(self, batch: Any) -> None:
            return None

    link = Link(Nothing())
    batch = MetricBatch(())

    async def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await link.consume(batch)
        return (time.perf_counter() - t0) / n * 1e9

    return asyncio.run(run())


def tap_check_ns(n: int = 2_000_000) -> float:
    """ns of the check itself (``tap = self.tap; if tap is not None``) on a Link nobody watches."""
    import timeit

    from agent.service import Link

    link = Link(None)  # type: ignore[arg-type]  # never consumed: only its attribute is read
    timer = timeit.Timer("tap = link.tap\nif tap is not None: pass", globals={"link": link})
    empty = timeit.Timer("tap = None", globals={}).timeit(n)
    return max(0.0, (min(timer.repeat(5, n)) - empty) / n * 1e9)


def tap_work_us_per_flush(flushes: int = 40) -> tuple[float, int]:
    """CPU µs the agent's process spends on the tap per flush of the payload's 1,000 series with one
    ``headwater tap --metric BUSY_METRIC`` subscribed (a subprocess reading it), in process: the
    Link's hand-off, filtering and rendering, and the WebSocket frames to the client — everything the
    tap adds, as an upper bound (it includes the loops' idle wake-ups over the run). Also the items
    per flush the client printed."""
    from agent.admin import AdminServer
    from agent.config import build_config
    from agent.model import Kind, MetricBatch, Point
    from agent.registry import builtin_factories
    from agent.service import Agent
    from agent.tap import Direction, TapEdge, TapPoint

    series: dict[str, Point] = {}
    for packet in throughput_payload(20).packets:
        for line in packet.decode().split("\n"):
            name, _, rest = line.partition(":")
            tags = rest.partition("|#")[2].split(",")
            labels = tuple(sorted((k, v) for k, _, v in (t.partition(":") for t in tags)))
            series.setdefault(name + str(labels), Point(name, Kind.SUM, labels, time.time_ns(), 1.0))
    batch = MetricBatch(tuple(series.values()))
    data = {
        "receivers": {"statsd": {"udp": "127.0.0.1:0"}},
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {
            "telemetry": {"endpoint": "127.0.0.1:0", "tap": {"rate_limit_per_s": 1e9, "buffer": 10**6}},
            "pipelines": {"metrics": {"receivers": ["statsd"], "exporters": ["debug"]}},
        },
    }

    class Edge:
        tap: Any = None

    async def run(out: Path) -> tuple[float, int]:
        agent = Agent(build_config(data, builtin_factories()))
        admin = AdminServer(agent, "127.0.0.1:0")
        await admin.start()
        edge = Edge()
        agent.tap.set_edges([TapEdge(edge, (TapPoint("statsd", "receiver", Direction.OUT),))])
        with open(out, "wb") as f:
            client = subprocess.Popen(
                [sys.executable, "-m", "agent", "tap", "--endpoint", f"127.0.0.1:{admin.port}",
                 "--metric", BUSY_METRIC, "--format", "json"],
                cwd=REPO, stdout=f, stderr=subprocess.PIPE,
            )  # fmt: skip
        assert client.stderr is not None
        await asyncio.to_thread(client.stderr.readline)  # "watching ...": subscribed
        try:
            t0 = time.process_time()
            for _ in range(flushes):
                edge.tap(batch)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the last frames
            cpu = time.process_time() - t0
        finally:
            client.terminate()
            client.wait(10)
            await admin.shutdown()
        return cpu / flushes * 1e6, out.read_bytes().count(b"\n") // flushes

    with workdir() as wd:
        return asyncio.run(run(wd / "tap.out"))


def _runs(case: dict[str, Any]) -> str:
    return "/".join(f"{x * 100:.0f}%" for x in case["cpu_runs"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short probes and confirmation (~4 min)")
    ap.add_argument(
        "--flush-interval", type=float, default=1.0, help="the StatsD flush interval, s (default 1)"
    )
    ap.add_argument("--duration", type=float, default=None, help="confirmation and CPU runs, s (30; 8 quick)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU runs per case, alternated (default 3)")
    args = ap.parse_args()
    mode = QUICK if args.quick else FULL
    confirm_s = args.duration or (8.0 if args.quick else 30.0)
    payload = throughput_payload(20)
    cases: dict[str, list[str] | None] = {"none": None, "busy": ["--metric", BUSY_METRIC]}
    results: dict[str, Any] = {"flush_interval_s": args.flush_interval, "payload": payload.name, "cases": {}}
    results["tap_us_per_flush"], results["tap_items_per_flush"] = tap_work_us_per_flush()
    log(
        f"tap work per flush: {results['tap_us_per_flush']:.0f} µs for {results['tap_items_per_flush']} items"
    )
    results["link_idle_ns"] = round(link_idle_ns(), 1)
    results["tap_check_ns"] = round(tap_check_ns(), 1)
    log(
        f"Link.consume with nobody watching: {results['link_idle_ns']} ns per batch, of which the tap"
        f" check {results['tap_check_ns']} ns"
    )
    with workdir() as wd:
        sender = Sender(wd)
        ceiling = sender.ceiling(payload, 2.0)
        log(f"sender ceiling: {ceiling.lines_per_s:,.0f} lines/s")
        sustained: dict[str, Sustained] = {}
        for name, tap_args in cases.items():
            target = TappedHeadwater(wd, f"tap-{name}", args.flush_interval, tap_args)
            try:
                sustained[name] = find_sustained(
                    target, sender, payload, 400_000.0, ceiling.lines_per_s, mode, confirm_s
                )
            finally:
                target.close()
        # A confirmed rate when there is one (another process's burst can fail a confirmation).
        confirmed = [x.lines_per_s for x in sustained.values() if x.lines_per_s]
        base = min(confirmed) if confirmed else 0.7 * sustained["none"].best_received_lines_per_s
        fixed = 0.6 * base
        cpu: dict[str, list[Probe]] = {name: [] for name in cases}
        shown: dict[str, int] = dict.fromkeys(cases, 0)
        for _ in range(args.repeats):  # alternated, so that a change in the machine's load hits both
            for name, tap_args in cases.items():
                target = TappedHeadwater(wd, f"cpu-{name}", args.flush_interval, tap_args)
                try:
                    target.start()
                    cpu[name].append(run_probe(target, sender, payload, fixed, confirm_s))
                    shown[name] += target.tap_lines()
                finally:
                    target.close()
    for name in cases:
        s, runs = sustained[name], cpu[name]
        results["cases"][name] = {
            "sustained_lines_per_s": s.lines_per_s,
            "best_received_lines_per_s": s.best_received_lines_per_s,
            "note": s.note,
            "cpu_at_fixed_rate": statistics.median(p.receiver_cpu for p in runs),
            "cpu_runs": [p.receiver_cpu for p in runs],
            "fixed_rate_lines_per_s": fixed,
            "fixed_rate_loss": max(p.loss for p in runs),
            "tap_items_printed": shown[name],
            "confirmed": asdict(s.confirmed) if s.confirmed else None,
        }
    none, busy = results["cases"]["none"], results["cases"]["busy"]
    rates = (none["sustained_lines_per_s"], busy["sustained_lines_per_s"])
    rate_cost = 1 - rates[1] / rates[0] if rates[0] and rates[1] else None
    cpu_cost = busy["cpu_at_fixed_rate"] / none["cpu_at_fixed_rate"] - 1
    # The tap's own work per second (one flush a flush_interval) against the agent's CPU at that rate.
    work_cost = results["tap_us_per_flush"] / 1e6 / args.flush_interval / none["cpu_at_fixed_rate"]
    results["busy_rate_cost"] = rate_cost
    results["busy_cpu_cost"] = cpu_cost
    results["busy_work_cost"] = work_cost
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tap.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"tap cost, StatsD {payload.name}, flush_interval {args.flush_interval:g}s ({mode.name} mode)")
    cpu_head = f"CPU at {fixed:,.0f} lines/s"
    print(f"{'case':<6} {'sustained lines/s':>18} {cpu_head:>26} {'items shown':>12}")
    for name in cases:
        r = results["cases"][name]
        rate = f"{r['sustained_lines_per_s']:,.0f}" if r["sustained_lines_per_s"] else "-"
        print(f"{name:<6} {rate:>18} {r['cpu_at_fixed_rate'] * 100:>25.1f}% {r['tap_items_printed']:>12,}")
    print(
        f"one subscriber on {BUSY_METRIC}: sustained rate "
        + (f"{-rate_cost * 100:+.1f} %" if rate_cost is not None else "not measured (see notes)")
        + f", CPU at the fixed rate {cpu_cost * 100:+.1f} % (runs: none {_runs(none)}, busy {_runs(busy)})"
    )
    print(
        f"the tap's own work: {results['tap_us_per_flush']:.0f} µs per flush"
        f" ({results['tap_items_per_flush']} items) = {work_cost * 100:.2f} % of the agent's CPU at that rate"
    )
    print(
        f"Link.consume, nobody watching: {results['link_idle_ns']} ns per batch, of which the tap check"
        f" {results['tap_check_ns']} ns (StatsD: one batch per flush, not per line)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
