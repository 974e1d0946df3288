"""StatsD ``workers``: the rate one process takes and the rate two worker processes take, on this machine.

    python3 bench/workers_bench.py [--workers 1,2] [--duration 3] [--senders 4] [--rate 80000]

For each worker count the StatsD receiver (receivers/statsd, ``workers: N``; 1 = in this process) runs
in this process's event loop with a consumer that only counts, and ``--senders`` paced UDP senders
(bench/udp_sender.c via harness.Sender: one socket each, so the kernel's SO_REUSEPORT hash spreads
them over the workers by source port) send 20-line packets (bench/payloads.throughput_payload) at
``--rate`` packets/s in all, above what one core takes, for ``--duration`` seconds. When the sockets are
drained the receiver flushes and the script prints, per run:

- ``lines_per_s``: lines accepted / send time — the rate taken with the sender on the same 2 cores
  (the senders compete with the workers for the second core: with 2 workers this is a floor);
- ``loss``: lines sent but not accepted (the kernel dropped them: receive buffers full);
- ``lines_per_cpu_s`` per parsing process: lines it accepted / the CPU seconds it used (utime +
  stime from /proc) — the per-core rate, independent of what else held the core;
- ``user_us_per_line`` / ``system_us_per_line``: the parsing processes' CPU per line split into user
  time (what callgrind counts: bench/workers_cost.py) and the kernel's (``recv``/``recvmsg``, and with
  workers the kernel's receive timestamp);
- ``main_cpu_s``: the main process's CPU with workers (merging and flushing, not parsing);
- ``split``: the datagrams each worker read (the hash of 4 source ports may split them unevenly).

Short and bounded: each run sends for ``--duration`` seconds and the script ends by itself. The machine
is shared (2 cores): run it when nobody else is benchmarking, and read the figures as this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import Sender, cpu_seconds, free_port, workdir
from payloads import throughput_payload

from agent.component import ComponentId, ComponentKind, Settings, Signal
from agent.confmodel import Duration
from agent.model import Batch
from agent.telemetry import ComponentTelemetry, Telemetry
from receivers.statsd import StatsdConfig, StatsdReceiver

LINES_PER_PACKET = 20


class _Count:
    """A consumer that counts points and keeps nothing."""

    def __init__(self) -> None:
        self.points = 0

    async def consume(self, batch: Batch) -> None:
        self.points += len(batch)


def _user_system_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (/proc/<pid>/stat utime, stime)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _kernel_drops(port: int) -> int:
    """Drops of every IPv4 UDP socket bound to 127.0.0.1:port (all the workers' sockets)."""
    local = f"0100007F:{port:04X}"
    total = 0
    with open("/proc/net/udp", encoding="ascii") as f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 13 and cols[1] == local:
                total += int(cols[12])
    return total


async def _send(sender: Sender, port: int, path: Path, rate: float, duration: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *sender.command,
        str(port),
        str(path),
        f"{rate:.3f}",
        f"{duration:.3f}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    result: dict[str, Any] = json.loads(out)
    return result


async def run(workers: int, senders: int, rate: float, duration: float, sender: Sender) -> dict[str, Any]:
    port = free_port()
    payload = throughput_payload(LINES_PER_PACKET)
    path = sender.payload_file(payload)
    tel = Telemetry()
    settings = Settings(
        id=ComponentId.parse("statsd"),
        kind=ComponentKind.RECEIVER,
        telemetry=ComponentTelemetry(tel, "receiver", "statsd"),
        logger=logging.getLogger("bench.statsd"),
    )
    config = StatsdConfig(udp=f"127.0.0.1:{port}", flush_interval=Duration(1.0), workers=str(workers))
    counter = _Count()
    r = StatsdReceiver(settings, config, {Signal.METRICS: counter})
    await r.start()
    pids = r.pool.pids if r.pool is not None else [os.getpid()]
    cpu_before = {pid: cpu_seconds(pid) for pid in pids}
    split_before = [_user_system_s(pid) for pid in pids]
    main_before = cpu_seconds(os.getpid())
    accepted_before = tel.value("receiver_accepted_points_total")
    drops_before = _kernel_drops(port)
    started = time.monotonic()
    sent = await asyncio.gather(
        *(_send(sender, port, path, rate / senders, duration) for _ in range(senders))
    )
    elapsed = max(s["elapsed"] for s in sent)
    # Drained: every worker's count of datagrams read stops moving (or the in-process reader's).
    last: object = None
    while True:
        await asyncio.sleep(0.2)
        now: object = r.pool.pending() if r.pool is not None else tel.value("receiver_datagrams_total")
        if now == last:
            break
        last = now
    cpu = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in pids}
    split_after = [_user_system_s(pid) for pid in pids]
    user_s = sum(after[0] - before[0] for before, after in zip(split_before, split_after, strict=True))
    system_s = sum(after[1] - before[1] for before, after in zip(split_before, split_after, strict=True))
    main_cpu = cpu_seconds(os.getpid()) - main_before
    await r.flush()
    split = list(r.pool.datagrams) if r.pool is not None else None
    accepted = tel.value("receiver_accepted_points_total") - accepted_before
    drops = _kernel_drops(port) - drops_before
    lines_sent = sum(s["lines"] for s in sent)
    await r.shutdown()
    cpu_total = sum(cpu.values())
    return {
        "workers": workers,
        "senders": senders,
        "rate_packets_per_s": rate,
        "lines_sent": lines_sent,
        "lines_accepted": int(accepted),
        "lines_per_s": round(accepted / elapsed),
        "loss": round(1 - accepted / lines_sent, 4) if lines_sent else 0.0,
        "kernel_drops_datagrams": drops,
        "parsing_cpu_s": {str(pid): round(s, 2) for pid, s in cpu.items()},
        "lines_per_cpu_s": round(accepted / cpu_total) if cpu_total else None,
        "user_us_per_line": round(user_s / accepted * 1e6, 3) if accepted else None,
        "system_us_per_line": round(system_s / accepted * 1e6, 3) if accepted else None,
        "main_cpu_s": round(main_cpu, 2) if r.pool is not None else None,
        "split_datagrams": split,
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds each run sends (at most 30)")
    parser.add_argument("--senders", type=int, default=4, help="sender processes (one socket each)")
    parser.add_argument("--rate", type=float, default=80_000, help="packets/s in all (20 lines each)")
    args = parser.parse_args()
    duration = min(args.duration, 30.0)
    with workdir() as folder:
        sender = Sender(folder)
        print(f"# sender: {sender.kind}; {os.cpu_count()} CPUs; load {os.getloadavg()}", file=sys.stderr)
        for workers in (int(w) for w in args.workers.split(",")):
            result = asyncio.run(run(workers, args.senders, args.rate, duration, sender))
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
