"""Label values with control characters never reach a page or a remote-write request raw: the page
stays valid for promtool and for a real Prometheus scrape, and the values read back as ``\\xNN`` text."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agent import exphist
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Resource, Summary, Temporality
from exporters.prometheus_series import SeriesStore, job_labels, prom_labels, safe_value
from tests.exporters.test_prometheus import make, now, samples
from tests.integration.conftest import free_tcp_udp_port, launch_prometheus, wait_for_peer

RAW_TO_TEXT = {
    "nul\x00": "nul\\x00",
    "esc\x1b[31m": "esc\\x1b[31m",
    "cr\r": "cr\\x0d",
    "del\x7f": "del\\x7f",
    "c1\x85\x9b": "c1\\x85\\x9b",
    "surrogate\ud800": "surrogate\\ud800",
    "bell\x07 and \x01": "bell\\x07 and \\x01",
}
"""Raw label value → the value a scrape or a remote write carries."""
KEPT = ["tab\there", "line\nbreak", 'quote" back\\slash', "ünïcödé ✓ \u2028"]
"""Values that stay as they are (the exposition format escapes newline, quote and backslash itself)."""


def test_control_characters_in_values_become_text_and_others_stay() -> None:
    for raw, text in RAW_TO_TEXT.items():
        assert safe_value(raw) == text
        text.encode("utf-8")  # always encodable
    for value in KEPT:
        assert safe_value(value) is value
    labels = (("a", "ok"), ("b", "x\x00y"))
    assert prom_labels(labels) == (("a", "ok"), ("b", "x\\x00y"))
    plain = (("a", "ok"), ("b", "tab\t"))
    assert prom_labels(plain) is plain
    resource = Resource((("service.instance.id", "i\x1b"), ("service.name", "svc\x00")))
    assert job_labels(resource) == (("instance", "i\\x1b"), ("job", "svc\\x00"))


def test_the_series_store_shared_with_remote_write_holds_escaped_values() -> None:
    store = SeriesStore()
    series = store.update(Point("m", Kind.GAUGE, (("l", "a\x00b"),), now(), value=1))
    assert series is not None and series.labels == (("l", "a\\x00b"),)


def hostile_batch() -> MetricBatch:
    """Every line shape of the page (counter, gauge, classic and explicit histogram, summary, job and
    instance from a resource), each with every hostile value."""
    t = now()
    h = exphist.from_values(np.array([0.5, 2.0]))
    points: list[Point] = []
    for i, raw in enumerate([*RAW_TO_TEXT, *KEPT]):
        labels = (("v", raw),)
        resource = Resource((("service.name", raw),))
        points += [
            Point("hits", Kind.SUM, labels, t, value=i + 1),
            Point("depth", Kind.GAUGE, labels, t, value=i, resource=resource),
            Point("lat", Kind.HISTOGRAM, labels, t, histogram=h, unit="s"),
            Point(
                "size",
                Kind.HISTOGRAM,
                labels,
                t,
                explicit=ExplicitHistogram((1.0, 10.0), (1, 2, 3), 40.0),
                temporality=Temporality.CUMULATIVE,
            ),
            Point("q", Kind.SUMMARY, labels, t, summary=Summary(3, 6.0, ((0.5, 2.0), (0.99, 3.0)))),
        ]
    return MetricBatch(tuple(points))


async def page() -> str:
    exp, _, _ = make()
    await exp.consume(hostile_batch())
    body = await exp.render()
    await exp.shutdown()
    return body


async def test_the_page_carries_no_control_characters_and_reads_back_as_text() -> None:
    body = await page()
    assert not any(c in body for c in "\x00\x1b\r\x7f\x85\x9b\x07\x01")
    body.encode("utf-8")
    got = samples(body)
    for raw, text in RAW_TO_TEXT.items():
        assert got[("hits_total", frozenset({("v", text)}))] >= 1, raw
        assert ("depth", frozenset({("v", text), ("job", text)})) in got
    for value in KEPT:
        assert ("hits_total", frozenset({("v", value)})) in got


async def test_promtool_parses_the_page(tmp_path: Path) -> None:
    body = await page()
    result = await asyncio.to_thread(  # off the loop: the test's own blocking call
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=body.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = (result.stdout + result.stderr).decode()
    # 0: clean; 3: lint findings only (the page has no HELP lines); 1: the text does not parse.
    assert result.returncode in (0, 3), out
    findings = [line for line in out.splitlines() if line.strip()]
    assert findings and all(line.endswith("no help text") for line in findings), out


@pytest.mark.integration
async def test_a_real_prometheus_scrapes_the_page(tmp_path: Path) -> None:
    exp, _, cfg = make()
    await exp.start()
    # Off the loop (the test's own blocking calls): starting Prometheus waits until it is ready.
    server = await asyncio.to_thread(launch_prometheus, tmp_path / "prometheus", free_tcp_udp_port())
    try:
        await exp.consume(hostile_batch())
        config = tmp_path / "prometheus" / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n"
            f"  - job_name: headwater\n    static_configs: [{{targets: ['{cfg.endpoint}']}}]\n"
        )
        os.kill(server.proc.pid, signal.SIGHUP)  # reload with the scrape job

        def scraped() -> set[str]:
            result = server.query('hits_total{job="headwater"}')
            return (
                {r["metric"]["v"] for r in result} if len(result) == len(RAW_TO_TEXT) + len(KEPT) else set()
            )

        # The test's loop must keep serving the page while Prometheus scrapes it: poll from a thread.
        await asyncio.to_thread(server.wait_value, 'up{job="headwater"}', 1.0)
        stored = await asyncio.to_thread(wait_for_peer, scraped, "every series scraped")
        assert stored == {*RAW_TO_TEXT.values(), *KEPT}
        assert await asyncio.to_thread(server.value, 'scrape_samples_scraped{job="headwater"}')
    finally:
        await asyncio.to_thread(server.stop)
        await exp.shutdown()
