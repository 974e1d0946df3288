"""Instructions per StatsD line (callgrind) with ``workers: 1`` and ``workers: 2``, and where a worker's
extra instructions go.

    python3 bench/workers_cost.py --attribute        # the table and the attribution (16 valgrind runs,
                                                     # two at a time: ~7 min on 2 cores)
    python3 bench/workers_cost.py --lines 51200      # more lines per run (a multiple of 5,120)
    python3 bench/workers_cost.py --keep DIR         # also keep each run's callgrind.out in DIR
    python3 bench/workers_cost.py --mode worker --lines 51200 [--baseline]   # one silent run

Every row runs this script under ``valgrind --tool=callgrind`` twice, once doing the work and once
(``--baseline``) doing the same setup and the same sends without it, and divides the difference by
the lines: user-space instructions only (the kernel's share of a ``recv``/``recvmsg`` is not counted;
the user/system split of bench/workers_bench.py shows it). Each run sends the benchmark's own 20-line
DogStatsD packets (bench/payloads.throughput_payload: 1,000 series, 20 % gauges, 35 % timers and
histograms) over loopback UDP to a socket of this process and, after a warm-up pass over every packet
(series caches filled), reads them back 256 datagrams at a time (``_DRAIN_BATCH``: a saturated
reader's wake-up; the turn budget is lifted, since valgrind runs ~50x slower than the budget assumes).

Rows:

- ``feed``: ``StatsdAggregator.feed`` alone (parse + aggregate; bench/feed_cost.py measures the same);
- ``feed + gauge log``: the same with the worker's gauge log on (each gauge write kept with its stamp);
- ``workers: 1 (in-process): drain``: the receiver's reader (``recv`` + parse + aggregate + counts);
- ``workers: 2, in a worker: drain``: a worker's reader (``recvmsg`` with the kernel's stamp + parse +
  aggregate + gauge log + counts, and its progress slot);
- ``merge, worker side``: at a flush, two workers' ``take_part`` and pickling, per line of the interval;
- ``merge, main side``: the main process's unpickling and ``absorb`` of both parts (the points are then
  built from the merged interval as in-process, so ``build`` is in neither). The merge has a part per
  series and a part per line (gauge writes, timer values), so both are printed at two interval sizes;
- ``workers: 2, all in``: drain in a worker + both sides of the merge, per line, and against workers: 1.

``--attribute`` groups, function by function (callgrind_annotate, each function's own instructions),
what the worker's drain runs that the in-process drain does not.

PYTHONHASHSEED=0 and one OpenBLAS thread in every run: a row repeats within ~0.3 % (±25 instructions a
line seen). Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from payloads import throughput_payload

import receivers.statsd
import receivers.statsd.workers
from agent.component import ComponentId, ComponentKind, Settings
from agent.telemetry import ComponentTelemetry, Telemetry
from receivers.statsd import _DRAIN_BATCH, StatsdConfig, StatsdReceiver, _DatagramReader
from receivers.statsd.aggregator import IntervalPart, StatsdAggregator
from receivers.statsd.workers import WorkerReceiver, _StampedReader

LINES_PER_PACKET = 20
ROUND_LINES = _DRAIN_BATCH * LINES_PER_PACKET
"""Lines sent, then read back, per round: one full drain."""
MODES = ("feed", "feed-log", "inprocess", "worker", "merge-worker", "merge")
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "recvmsg: the source address as text",
        (
            "printf",
            "_IO_",
            "_itoa",
            "strchrnul",
            "inet_ntop",
            "__parse_one_spec",
            "makesockaddr",
            "unicode_decode",
            "PyUnicode_New",
        ),
    ),
    (
        "recvmsg: its result and ancillary data",
        ("mkvalue", "mktuple", "countformat", "build_value", "Py_BuildValue", "sock_recv"),
    ),
    (
        "garbage collector",
        ("gc_collect", "traverse", "visit_", "MaybeUntrack", "move_unreachable", "deduce_"),
    ),
    (
        "allocation and freeing",
        ("alloc", "Malloc", "Free", "dealloc", "NewReference", "_GC_", "PyTuple_New", "Trash"),
    ),
    (
        "integers (the stamp, comparisons)",
        ("k_mul", "x_add", "_PyLong_New", "PyLong_From", "long_", "unpack", "RichCompare"),
    ),
    ("bytecode (stamping, the gauge log)", ("_PyEval_EvalFrameDefault",)),
)
"""C functions of the interpreter and libc, grouped by what the worker's extra work is (--attribute)."""


def _settings(name: str) -> Settings:
    return Settings(
        id=ComponentId.parse(name),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(Telemetry(), ComponentKind.RECEIVER.value, name),
        logger=logging.getLogger(f"bench.{name}"),
    )


def _feed(lines: int, baseline: bool, gauge_log: bool) -> None:
    packets = throughput_payload(LINES_PER_PACKET).packets
    agg = StatsdAggregator()
    if gauge_log:
        agg.gauge_log = []
    feed = agg.feed
    for packet in packets:
        feed(packet)
    if baseline:
        return
    for i in range(lines // LINES_PER_PACKET):
        feed(packets[i % len(packets)])
    if sum(agg.refused.values()):
        raise SystemExit(f"payload refused: {agg.refused}")


async def _drain(lines: int, baseline: bool, worker: bool) -> None:
    """Send ``lines`` lines in rounds of one drain and read each round back (not in the baseline)."""
    # Every drain reads its 256 datagrams, as natively: valgrind is slower than the 5 ms budget assumes.
    receivers.statsd._TURN_BUDGET_S = 3600.0
    receivers.statsd.workers._TURN_BUDGET_S = 3600.0  # type: ignore[attr-defined]
    packets = throughput_payload(LINES_PER_PACKET).packets
    config = StatsdConfig()
    r: StatsdReceiver
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * 16)
        f.flush()
        progress = mmap.mmap(f.fileno(), 0)
        r = (
            WorkerReceiver(_settings("statsd"), config, progress, 0)
            if worker
            else StatsdReceiver(_settings("statsd"), config, {})
        )
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
        ):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            address = sock.getsockname()
            reader_class = _StampedReader if worker else _DatagramReader
            reader = reader_class(r, sock, f"127.0.0.1:{address[1]}")
            reader.start()
            sendto = sender.sendto

            def one_round(start: int, read: bool) -> None:
                for i in range(start, start + _DRAIN_BATCH):
                    sendto(packets[i % len(packets)], address)
                if read:
                    until = r.packets.value + _DRAIN_BATCH
                    while r.packets.value < until:
                        reader.drain()

            for start in range(0, len(packets), _DRAIN_BATCH):  # the warm-up: every packet once
                one_round(start, True)
            warm = r.agg.accepted
            for k in range(lines // ROUND_LINES):
                one_round(k * _DRAIN_BATCH, not baseline)
            asyncio.get_running_loop().remove_reader(sock.fileno())  # not stop(): it parses what is left
        progress.close()
    refused: int = sum(r.agg.refused.values())
    if not baseline and (r.agg.accepted - warm != lines or refused):
        raise SystemExit(f"not all taken: accepted {r.agg.accepted - warm}, refused {r.agg.refused}")


def _merge(lines: int, baseline: bool, main_side: bool) -> None:
    """Two workers' aggregators each take half of one interval's ``lines`` lines (alternate packets, as
    the kernel spreads client sockets); then their parts are taken and pickled (the workers' side)
    and, with ``main_side``, unpickled and absorbed by the main aggregator as at a flush."""
    packets = throughput_payload(LINES_PER_PACKET).packets
    workers = [StatsdAggregator(), StatsdAggregator()]
    for w in workers:
        w.gauge_log = []
    main = StatsdAggregator()

    def fill(n: int) -> None:
        for i in range(n // LINES_PER_PACKET):
            w = workers[i % 2]
            w.stamp_ns += 1_000
            w.feed(packets[i % len(packets)])

    def flush(main_side: bool) -> None:
        frames = [
            pickle.dumps(("part", w.take_part(), 0, 0), protocol=pickle.HIGHEST_PROTOCOL) for w in workers
        ]
        if main_side:
            parts: list[IntervalPart] = [pickle.loads(frame)[1] for frame in frames]
            main.absorb(main.swap(), parts)

    fill(len(packets) * LINES_PER_PACKET)  # the warm-up: one interval of every packet, merged and built
    flush(True)
    for _ in main.build(main.swap(), 0, 1):
        pass
    fill(lines)
    if not baseline:
        flush(main_side)


def run(mode: str, lines: int, baseline: bool) -> None:
    if mode in ("feed", "feed-log"):
        _feed(lines, baseline, gauge_log=mode == "feed-log")
    elif mode in ("inprocess", "worker"):
        asyncio.run(_drain(lines, baseline, worker=mode == "worker"))
    else:
        _merge(lines, baseline, main_side=mode == "merge")


def instructions(mode: str, lines: int, baseline: bool, keep: Path | None) -> int:
    """User-space instructions of one run of this script under callgrind."""
    out = "/dev/null"
    if keep is not None:
        out = str(keep / f"callgrind.{mode}.{lines}{'.baseline' if baseline else ''}.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
    cmd += ["--mode", mode, "--lines", str(lines)] + (["--baseline"] if baseline else [])
    # One hash seed: the same dict layouts, so counts repeat. One BLAS thread: numpy's idle OpenBLAS
    # threads otherwise spin a varying number of instructions into the counts (±100 a line seen).
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    stderr = ""
    for _ in range(3):  # valgrind now and then dies on a busy machine; a rerun is enough
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        stderr = proc.stderr
        match = re.search(r"Collected\s*:\s*(\d+)", stderr)
        if proc.returncode == 0 and match:
            return int(match.group(1))
    raise SystemExit(f"valgrind failed ({' '.join(cmd)}):\n{stderr[-2000:]}")


def per_line(mode: str, lines: int, keep: Path | None, pool: ThreadPoolExecutor) -> float:
    """(run - baseline) / lines; the two valgrind runs go side by side."""
    full, base = pool.map(lambda b: instructions(mode, lines, b, keep), (False, True))
    return (full - base) / lines


def _functions(path: Path) -> dict[str, int]:
    """Instructions per function (its own, not its callees') of one callgrind.out file."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S[^ ]*:[^ ]+)", line)
        if match:
            name = match.group(2).rsplit(":", 1)[1].split("'")[0]
            counts[name] = counts.get(name, 0) + int(match.group(1).replace(",", ""))
    return counts


def _net(keep: Path, mode: str, lines: int) -> dict[str, int]:
    full = _functions(keep / f"callgrind.{mode}.{lines}.out")
    base = _functions(keep / f"callgrind.{mode}.{lines}.baseline.out")
    return {name: full.get(name, 0) - base.get(name, 0) for name in full.keys() | base.keys()}


def attribute(keep: Path, lines: int) -> None:
    """Print where a worker's drain spends the instructions the in-process drain does not, by group."""
    inprocess, worker = _net(keep, "inprocess", lines), _net(keep, "worker", lines)
    extra = {name: worker.get(name, 0) - inprocess.get(name, 0) for name in worker.keys() | inprocess.keys()}
    print(f"\n# a worker's drain minus the in-process drain, instructions per line ({keep})")
    left = dict(extra)
    for group, patterns in GROUPS:
        names = [name for name in left if any(p in name for p in patterns)]
        print(f"{group:<60} {sum(left.pop(name) for name in names) / lines:>10,.0f}")
    print(f"{'the rest':<60} {sum(left.values()) / lines:>10,.0f}")
    print(f"{'in all':<60} {sum(extra.values()) / lines:>10,.0f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=5 * ROUND_LINES, help=f"lines per run (x {ROUND_LINES:,})")
    ap.add_argument("--keep", type=Path, help="keep the callgrind.out files here (callgrind_annotate)")
    ap.add_argument(
        "--attribute", action="store_true", help="also group a worker's extra instructions by function"
    )
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lines <= 0 or args.lines % ROUND_LINES:
        ap.error(f"--lines must be a positive multiple of {ROUND_LINES}")
    if args.mode:
        run(args.mode, args.lines, args.baseline)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="headwater-callgrind-") as scratch:
        keep = args.keep or (Path(scratch) if args.attribute else None)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        table(args.lines, keep)
        if args.attribute and keep is not None:
            attribute(keep, args.lines)
    return 0


def table(n: int, keep: Path | None) -> None:
    print(f"# instructions per line (callgrind, user space), {n:,} lines per run; 20-line packets")
    print(f"{'path':<60} {'instr/line':>10}")
    with ThreadPoolExecutor(2) as pool:

        def row(name: str, value: float) -> float:
            print(f"{name:<60} {value:>10,.0f}", flush=True)
            return value

        row("feed (parse + aggregate)", per_line("feed", n, keep, pool))
        row("feed + gauge log", per_line("feed-log", n, keep, pool))
        one = row("workers: 1 (in-process): drain", per_line("inprocess", n, keep, pool))
        drain = row("workers: 2, in a worker: drain", per_line("worker", n, keep, pool))
        for lines in (n, 10 * n):
            size = f"{lines:,} lines an interval"
            take = per_line("merge-worker", lines, keep, pool)
            merge = per_line("merge", lines, keep, pool)
            row(f"  merge, worker side: take_part + pickle ({size})", take)
            row(f"  merge, main side: unpickle + absorb ({size})", merge - take)
            total = row(f"workers: 2, all in ({size})", drain + merge)
            print(f"{'  (vs workers: 1)':<60} {total / one - 1:>+10.1%}")


if __name__ == "__main__":
    sys.exit(main())
