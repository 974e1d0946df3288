"""agent/hashring.py: a membership change moves ~1/N of the keys, and only to or from the member that
changed; shares stay near 1/N; the owner of a key is the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hashring import HashRing, stable_hash

KEYS = [stable_hash(f"series-{i}".encode()) for i in range(10_000)]
GATEWAYS = ["10.0.0.1:4317", "10.0.0.2:4317", "10.0.0.3:4317"]


def owners(ring: HashRing) -> list[str]:
    return [ring.owner(k) for k in KEYS]


@pytest.mark.parametrize(
    ("before", "after"),
    [(GATEWAYS[:2], GATEWAYS), (GATEWAYS, GATEWAYS[:2]), (GATEWAYS, [GATEWAYS[0], GATEWAYS[2]])],
    ids=["2->3", "3->2 (last)", "3->2 (middle)"],
)
def test_a_membership_change_moves_about_one_nth_of_the_keys(before: list[str], after: list[str]) -> None:
    old, new = owners(HashRing(before)), owners(HashRing(after))
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    n = max(len(before), len(after))
    fraction = len(moved) / len(KEYS)
    print(f"{len(before)}->{len(after)}: moved {fraction:.4f} of {len(KEYS)} keys (1/N = {1 / n:.4f})")
    assert abs(fraction - 1 / n) < 0.05, fraction
    changed = (set(before) ^ set(after)).pop()
    # Only the joining member gains keys; only the leaving member's keys move.
    assert all(changed in pair for pair in moved)


def test_every_member_owns_about_its_share() -> None:
    found = owners(HashRing(GATEWAYS))
    for gw in GATEWAYS:
        assert abs(found.count(gw) / len(KEYS) - 1 / 3) < 0.05


def test_the_owner_of_a_key_is_the_same_in_another_process() -> None:
    # Python's hash() is salted per process: the ring must not depend on it.
    code = (
        "from agent.hashring import HashRing, stable_hash;"
        f"r = HashRing({GATEWAYS!r});"
        "print(','.join(r.owner(stable_hash(f'series-{i}'.encode())) for i in range(200)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert out.stdout.strip().split(",") == owners(HashRing(GATEWAYS))[:200]


def test_an_empty_ring_owns_nothing() -> None:
    with pytest.raises(LookupError):
        HashRing([]).owner(1)
