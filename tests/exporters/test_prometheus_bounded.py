"""The pull endpoint under load: a series cap with expiry freeing room, batches applied and pages
rendered in slices that let the event loop run, and pages streamed in bounded pieces."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from agent.model import Kind, MetricBatch, Point
from agent.slicing import CHECK_EVERY
from exporters import prometheus
from exporters.prometheus_series import SeriesStore
from tests.conftest import wait_until
from tests.exporters.conftest import Ticker
from tests.exporters.test_prometheus import make, now, samples


def gauges(n: int, name: str = "g", value: float = 1.0, start: int = 0) -> MetricBatch:
    t = now()
    return MetricBatch(
        tuple(Point(name, Kind.GAUGE, (("i", str(start + i)),), t, value=value) for i in range(n))
    )


async def test_new_series_over_the_cap_are_dropped_and_counted_until_expiry_frees_room() -> None:
    exp, tel, _ = make(max_series=100, metric_expiration=0.2)
    await exp.start()
    try:
        await exp.consume(gauges(150))
        assert tel.value("exporter_series") == 100
        assert tel.value("exporter_dropped_points_total", reason="series_limit") == 50
        assert tel.value("exporter_sent_points_total") == 100
        # Series already held keep updating at the cap.
        await exp.consume(gauges(1, value=7))
        assert samples(await exp.render())[("g", frozenset({("i", "0")}))] == 7
        assert tel.value("exporter_dropped_points_total", reason="series_limit") == 50
        await wait_until(lambda: tel.value("exporter_series") == 0, "the idle series expired", timeout_s=30)
        await exp.consume(gauges(100, name="fresh"))
        assert tel.value("exporter_series") == 100
        assert tel.value("exporter_dropped_points_total", reason="series_limit") == 50
    finally:
        await exp.shutdown()


def test_sliced_expiry_removes_only_idle_series_and_frees_room() -> None:
    store = SeriesStore(max_series=20_000)
    batch = gauges(12_000)
    for p in batch.points:
        store.update(p, now=0.0)
    for p in batch.points[:10]:
        store.update(p, now=100.0)
    steps = list(store.expire_steps(50.0, now=100.0))
    assert len(steps) >= 2, "expiry of 12,000 series must yield between steps"
    assert sum(len(s) for s in steps) == 11_990
    assert store.size == 10 == len(store.families["g"])
    assert all(store.update(p, now=100.0) is not None for p in gauges(19_990, start=100_000).points)
    assert store.size == 20_000


async def test_sliced_expiry_lets_the_loop_run() -> None:
    store = SeriesStore()
    for p in gauges(20_000).points:
        store.update(p, now=0.0)
    ticker = Ticker()
    gone = await store.expire_sliced(1.0, now=10.0)
    assert len(gone) == 20_000 and store.size == 0 and not store.families
    assert await ticker.stop() >= 3


@pytest.mark.usefixtures("slice_every_check")
async def test_a_large_batch_is_applied_in_slices_and_batches_stay_in_order() -> None:
    exp, tel, _ = make()
    big = gauges(20_000)
    last = Point("x", Kind.GAUGE, (), now(), value=1)
    ticker = Ticker()
    first = asyncio.create_task(exp.consume(MetricBatch((*big.points, last))))
    await asyncio.sleep(0)  # one loop turn (not a timed wait): the big batch has started
    # Sent after the big one, so its value must win even though the big one is still being applied.
    await exp.consume(MetricBatch((Point("x", Kind.GAUGE, (), now(), value=2),)))
    await first
    ticks = await ticker.stop()
    assert ticks >= 20_000 // CHECK_EVERY - 1, "the loop got no turns while a batch was applied"
    got = samples(await exp.render())
    assert got[("x", frozenset())] == 2
    assert tel.value("exporter_sent_points_total") == 20_002
    await exp.shutdown()


@pytest.mark.usefixtures("slice_every_check")
async def test_a_scrape_lets_the_loop_run_and_equals_the_rendered_page() -> None:
    exp, _, cfg = make()
    await exp.start()
    try:
        await exp.consume(gauges(5_000))
        ticker = Ticker()
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{cfg.endpoint}/metrics").read().decode()
        )
        assert await ticker.stop() >= 5_000 // CHECK_EVERY
        assert body == await exp.render()
        assert len(samples(body)) == 5_000
    finally:
        await exp.shutdown()


async def test_pages_are_streamed_in_bounded_pieces() -> None:
    exp, _, _ = make()
    value = "v" * 4000  # the receivers' default max_label_value_length
    t = now()
    points = [Point("wide", Kind.GAUGE, (("a", f"{i}{value}"), ("b", value)), t, value=i) for i in range(600)]
    await exp.consume(MetricBatch(tuple(points)))
    pieces = [piece async for piece in exp.render_chunks()]
    one_series = len(f'wide{{a="599{value}",b="{value}"}} 599\n')
    assert len(pieces) >= 4  # ~4.8 MB of text
    assert max(len(p) for p in pieces) <= prometheus._PIECE_BYTES + one_series
    assert len(samples("".join(pieces))) == 600
    await exp.shutdown()
