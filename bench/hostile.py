"""Hostile-input benchmark (issue 10): every case against a real agent, one fresh agent per case.

    python3 bench/hostile.py                          # this checkout, the issue's full sizes
    python3 bench/hostile.py --agent-src /tmp/hw-before   # an older checkout (git worktree add ...)
    python3 bench/hostile.py --scale ci --cases reload_huge_int,control_chars

The cases and the measuring live in ``tests/hostile/`` (shared with the CI suite
tests/integration/test_hostile_input.py, which asserts on the same results). The harness runs from
this checkout; only the agent runs from ``--agent-src``, started with ``python3 -m agent`` in that
directory and with it on PYTHONPATH, so the old code is measured with the same inputs.

Per case: peak RSS (the agent's VmHWM), the longest /healthz answer (a probe process, a new
connection every 50 ms; the goal is 100 ms) and how many probes failed (no answer within
``--probe-timeout``, or not 200), whether the input was refused as the issue requires (the case's own
checks; "no" lists why), and whether a legitimate client's counts sent meanwhile all arrived.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.hostile, shared with CI

from tests.hostile.cases import CASES
from tests.hostile.harness import (
    ADDRESS_SPACE_LIMIT_MIB,
    HEALTH_GOAL_MS,
    MEMORY_LIMIT_MIB,
    Result,
    run_case,
)

COLUMNS = (
    "case",
    "RSS peak MiB",
    "longest /healthz ms",
    "/healthz failures",
    "refused as expected?",
    "legit arrived?",
)
BENCH_ADDRESS_SPACE_MIB = 12 * 1024
"""The benchmark measures how far memory goes: a higher address-space cap than CI's."""


def row(r: Result) -> str:
    rss = "died" if r.rss_peak_mib is None else f"{r.rss_peak_mib:.0f}"
    alive = "" if r.alive else f" (died {r.exit_detail})"
    refused = "yes" if not r.problems else "no: " + "; ".join(p.splitlines()[0][:110] for p in r.problems)
    legit = "n/a" if r.legit_ok is None else ("yes" if r.legit_ok else f"no ({r.legit_detail})")
    refused, legit = refused.replace("|", "\\|"), legit.replace("|", "\\|")  # inside a Markdown cell
    return (
        f"| {r.case}{alive} | {rss} | {r.health.max_ms:.0f} | {r.health.failures}/"
        f"{r.health.answers + r.health.failures} | {refused} | {legit} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent-src", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--scale", choices=("bench", "ci"), default="bench")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument(
        "--probe-timeout", type=float, default=10.0, help="seconds before a probe counts as failed"
    )
    ap.add_argument("--address-space-mib", type=int, default=BENCH_ADDRESS_SPACE_MIB)
    ap.add_argument("--details", action="store_true", help="print each case's facts and log tail")
    args = ap.parse_args()

    wanted = [c for c in args.cases.split(",") if c]
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if not wanted or c.name in wanted]

    import tests.hostile.harness as harness

    harness.ADDRESS_SPACE_LIMIT_MIB = args.address_space_mib
    src = args.agent_src.resolve()
    print(f"# hostile inputs: agent from {src} ({_describe(src)}), scale {args.scale}")
    now = datetime.datetime.now().astimezone()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {now:%Y-%m-%d %H:%M %Z}, {platform.node()}, {os.cpu_count()} cores, load {load}")
    print(
        f"# memory_limiter {MEMORY_LIMIT_MIB} MiB, RLIMIT_AS {args.address_space_mib} MiB "
        f"(CI: {ADDRESS_SPACE_LIMIT_MIB}); /healthz goal {HEALTH_GOAL_MS:.0f} ms, "
        f"probe timeout {args.probe_timeout:g} s"
    )
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---|---:|---:|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="hw-hostile-bench-") as tmp:
        for case in cases:
            result = run_case(
                case, src, args.scale, Path(tmp) / case.name, probe_timeout_s=args.probe_timeout
            )
            print(row(result), flush=True)
            if args.details:
                facts = {k: v for k, v in result.facts.items() if k != "log_tail"}
                print(f"<!-- {case.name}: {facts} ({result.duration_s:.0f}s) -->", flush=True)
                if "log_tail" in result.facts and not result.alive:
                    tail = result.facts["log_tail"].replace("--", "- -")
                    print(f"<!-- log tail:\n{tail}\n-->", flush=True)
    return 0


def _describe(src: Path) -> str:
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--short", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.count("\n")
    return (out.stdout.strip() or "not a git checkout") + (
        f", {dirty} files modified" if dirty else ", clean"
    )


if __name__ == "__main__":
    raise SystemExit(main())
