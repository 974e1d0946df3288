"""Hostile inputs against a real agent subprocess: the agent stays up, /healthz keeps
answering, RSS stays under memory_limiter's limit, the input is refused with its reason and a
legitimate client's counts sent meanwhile all arrive.

The cases and the measuring are in ``tests/hostile/`` (shared with ``bench/hostile.py``, which runs
them at the issue's full sizes and reports the longest /healthz answer against the 100 ms goal). Here
they run at CI sizes; the heaviest are marked ``hostile_heavy`` (``-m "not hostile_heavy"`` leaves
them out; ``make test`` runs them). The longest /healthz answer and the peak RSS of each case are
printed (``-s`` or the failure report) but not asserted on time: the machine is shared, so a probe
only fails when it gets no 200 within 2 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile.cases import CASES, Case
from tests.hostile.harness import MEMORY_LIMIT_MIB, ROOT, run_case

pytestmark = pytest.mark.integration

PROBE_TIMEOUT_S = 2.0


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.hostile_heavy] if c.heavy else []) for c in CASES],
)
def test_hostile_input(case: Case, tmp_path: Path) -> None:
    result = run_case(case, ROOT, "ci", tmp_path, probe_timeout_s=PROBE_TIMEOUT_S)
    print(result.summary())
    failures = []
    if not result.alive:
        failures.append(f"the agent died ({result.exit_detail})")
    if case.expect_alive and result.health.failures:
        failures.append(
            f"/healthz failed {result.health.failures} times ({result.health.failure_kinds}), "
            f"no 200 within {PROBE_TIMEOUT_S:g}s"
        )
    if result.rss_peak_mib is None or result.rss_peak_mib >= MEMORY_LIMIT_MIB:
        failures.append(
            f"peak RSS {result.rss_peak_mib} MiB, memory_limiter's limit is {MEMORY_LIMIT_MIB} MiB"
        )
    failures += result.problems
    if result.legit_ok is False:
        failures.append(f"legitimate traffic sent meanwhile did not all arrive: {result.legit_detail}")
    log = result.facts.get("log_tail", "")
    assert not failures, "\n".join(failures) + f"\n{result.summary()}\n--- agent log (tail) ---\n{log}"
