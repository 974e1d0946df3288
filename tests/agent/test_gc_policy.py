"""The agent process's garbage-collection policy (agent/gcpolicy.py): thresholds and a freeze at start,
survivors frozen each round so later collections never walk them again, cyclic garbage freed by the
round's young collection or, once frozen, by the thaw; and ``headwater run`` applying all of it."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli, gcpolicy
from agent.config import load_config
from agent.registry import builtin_factories
from tests.conftest import free_port, wait_until

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
exporters:
  debug:
    path: {out}
service:
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [debug]
"""


class Node:
    """A container the collector tracks; two of them pointing at each other make a cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


def collected_generations_hold(obj: object) -> bool:
    """Whether ``obj`` is in a generation the collector walks (frozen objects are in none)."""
    return any(o is obj for g in range(3) for o in gc.get_objects(generation=g))


@pytest.fixture(autouse=True)
def gc_state() -> Iterator[None]:
    """The collector as CPython starts it, and as it was again afterwards (nothing left frozen)."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_start_up_state_is_frozen_and_the_thresholds_set() -> None:
    alive = Node()
    assert collected_generations_hold(alive)
    gcpolicy.freeze_startup_state()
    assert gc.get_threshold() == gcpolicy.THRESHOLDS == (50_000, 1, 100)
    assert not collected_generations_hold(alive)


def keeper(now: list[float], rss: list[int | None]) -> gcpolicy.GcKeeper:
    """A keeper on a clock and a resident memory the test sets: a round each 10 s, a thaw at most
    hourly when memory grew by 10 %, daily whatever it did."""
    return gcpolicy.GcKeeper(10.0, 3600.0, clock_s=lambda: now[0], rss_bytes=lambda: rss[0])


def test_a_round_freezes_what_survived_it() -> None:
    rounds = keeper([0.0], [100])
    series_state = Node()  # state made after start: a new series' key, its exporter's series, ...
    assert collected_generations_hold(series_state)
    rounds.step()
    assert not collected_generations_hold(series_state)
    assert rounds.rounds == 1 and rounds.thaws == 0


def test_a_round_frees_cyclic_garbage_before_freezing() -> None:
    rounds = keeper([0.0], [100])
    head, ref = cycle()
    del head
    assert ref() is not None  # only the collector frees a cycle
    rounds.step()
    assert ref() is None


def test_frozen_cyclic_garbage_is_freed_at_a_thaw_once_memory_grew() -> None:
    now, rss = [0.0], [1000]
    rounds = keeper(now, rss)
    head, ref = cycle()
    rounds.step()  # alive at the round: frozen
    del head
    rss[0] = 2000
    now[0] = 3599.0
    rounds.step()
    assert ref() is not None  # frozen garbage waits for the thaw, an hour at least
    now[0] = 3600.0
    rounds.step()
    assert ref() is None
    assert rounds.thaws == 1 and rounds.rounds == 3
    assert gc.get_freeze_count() > 0  # frozen again after the thaw


def test_with_memory_flat_the_thaw_waits_a_day() -> None:
    now, rss = [0.0], [1000]
    rounds = keeper(now, rss)
    head, ref = cycle()
    rounds.step()
    del head
    rss[0] = 1099  # under 10 % more
    for hour in range(1, 24):
        now[0] = hour * 3600.0
        rounds.step()
    assert ref() is not None and rounds.thaws == 0
    now[0] = 24 * 3600.0
    rounds.step()
    assert ref() is None and rounds.thaws == 1
    rss[0] = 1209  # the base is memory at the last thaw (1099): 10 % more is 1208.9
    now[0] = 25 * 3600.0
    rounds.step()
    assert rounds.thaws == 2


def test_without_a_memory_reading_the_thaw_is_hourly() -> None:
    now: list[float] = [0.0]
    rounds = keeper(now, [None])
    now[0] = 3600.0
    rounds.step()
    assert rounds.thaws == 1


def test_collect_all_frees_frozen_cyclic_garbage_and_freezes_the_living() -> None:
    head, ref = cycle()
    alive = Node()
    gc.freeze()
    del head
    assert gcpolicy.collect_all() >= 2
    assert ref() is None
    assert not collected_generations_hold(alive)


def test_the_intervals_are_checked() -> None:
    for freeze, thaw, most in ((0.0, 3600.0, 86_400.0), (10.0, 5.0, 86_400.0), (10.0, 3600.0, 60.0)):
        with pytest.raises(ValueError, match="freeze_interval_s <= thaw_interval_s <= max_thaw_interval_s"):
            gcpolicy.GcKeeper(freeze, thaw, max_thaw_interval_s=most)


async def test_start_schedules_rounds_and_stop_ends_them() -> None:
    keeper = gcpolicy.GcKeeper(0.01, 3600.0)
    keeper.start()
    keeper.start()  # idempotent: one timer
    try:
        await wait_until(lambda: keeper.rounds >= 2, "two rounds")
    finally:
        keeper.stop()
        keeper.stop()
    rounds = keeper.rounds
    done = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, done.set)  # five intervals: a live timer would tick
    await done.wait()
    assert keeper.rounds == rounds


def test_headwater_run_applies_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "FREEZE_INTERVAL_S", 0.02)
    rounds: list[int] = []
    step = gcpolicy.GcKeeper.step

    def counted(keeper: gcpolicy.GcKeeper) -> None:
        step(keeper)
        rounds.append(keeper.rounds)

    monkeypatch.setattr(gcpolicy.GcKeeper, "step", counted)
    path = tmp_path / "agent.yaml"
    path.write_text(CONFIG.format(statsd=free_port(socket.SOCK_DGRAM), out=tmp_path / "out"))
    config = load_config(str(path), builtin_factories())

    async def scenario() -> int:
        running = asyncio.ensure_future(cli._run(config, str(path)))
        try:
            await wait_until(lambda: rounds, "the keeper's first round")
            assert gc.get_threshold() == gcpolicy.THRESHOLDS
            made_after = Node()
            seen = len(rounds)
            await wait_until(lambda: len(rounds) > seen, "a round after it was made")
            assert not collected_generations_hold(made_after)
            os.kill(os.getpid(), signal.SIGTERM)  # the agent's handler: a clean stop
            code = await running
        finally:
            running.cancel()
        after_stop = len(rounds)
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, done.set)  # five intervals
        await done.wait()
        assert len(rounds) == after_stop  # the keeper stopped with the agent
        return code

    assert asyncio.run(scenario()) == 0
