"""Prometheus pull endpoint: serves every live series in the text exposition format at /metrics.

Scraped like statsd_exporter: counters are cumulative ``<name>_total``, gauges ``<name>``, StatsD sets a
gauge of distinct members, timers a histogram ``<name>_seconds`` (``_bucket``, ``_sum``, ``_count``),
``h``/``d`` a histogram ``<name>``. Series idle for ``metric_expiration`` disappear.

Exponential histograms (StatsD, OTLP exponential) are cut at ``histogram_buckets``, or at the bounds of
the first ``bucket_layouts`` glob matching the Prometheus name, with whole counts (integers, never
decreasing, ``+Inf`` == ``_count``; the rule and its error bound: ``agent.exphist.classic_buckets``).
From OTLP: explicit-bucket histograms keep their own bounds as ``le`` (the above applies to
exponential histograms only), and summaries become a ``summary`` family: ``<name>{quantile="0.5"}`` per
quantile plus ``<name>_sum`` and ``<name>_count``. State rules (deltas, bound changes, resets, NaN
sums) are in ``exporters.prometheus_series``.

The page is rendered by hand from one label string per series, cached at its first scrape: going
through prometheus_client's Metric objects costs several µs per sample. The page is streamed (chunked
encoding) in pieces of at most ``agent.slicing.SLICE_S`` of work and about ``_PIECE_BYTES`` of text,
yielding to the event loop after each, so a scrape of any size neither stalls the loop nor exists whole
in memory. A large batch is applied in slices the same way (``agent.slicing.slices``; batches are applied
one at a time, in order).

At most ``max_series`` series are held; points of further new series are dropped and counted as
``headwater_exporter_dropped_points_total{reason="series_limit"}``, until idle series expire (expiry
also works in slices) and free room.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web

from agent.bucket_layouts import BucketLayout
from agent.component import ComponentKind, Factory, Settings, Signal, Tasks
from agent.confmodel import Duration, parse_host_port
from agent.exphist import whole, whole_count
from agent.model import MetricBatch
from agent.netcheck import bind_problem
from agent.slicing import CHECK_EVERY, Slicer, slices
from exporters.prometheus_series import (
    DEFAULT_BUCKETS,
    DEFAULT_MAX_SERIES,
    HISTOGRAM,
    SUMMARY,
    Series,
    SeriesStore,
    expiry_interval_s,
    format_value,
    store_problems,
)

TYPE = "prometheus"

_PIECE_BYTES = 256 * 1024
"""Text rendered before it is handed to the response: with 16 KiB label sets a piece is still ~1 MB,
never a page."""


@dataclass(frozen=True)
class PrometheusConfig:
    endpoint: str = "127.0.0.1:9102"
    """host:port serving /metrics (statsd_exporter's port)."""
    metric_expiration: Duration = Duration(300.0)
    """Series not updated for this long are removed from the page."""
    histogram_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    """Upper bounds (le) of the classic histogram buckets; timers are in seconds."""
    bucket_layouts: list[BucketLayout] = field(default_factory=list)
    """Bounds per metric: [{match: glob on the Prometheus name, bounds: [...]}]; first match wins."""
    max_series: int = DEFAULT_MAX_SERIES
    """Live series at most (~750 B each); points of new series beyond it are dropped (series_limit)."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        try:
            parse_host_port(self.endpoint)
        except ValueError as exc:
            problems.append(("endpoint", str(exc)))
        return problems + store_problems(
            self.histogram_buckets,
            self.bucket_layouts,
            ("metric_expiration", self.metric_expiration),
            self.max_series,
        )

    def environment_problems(self) -> list[tuple[str, str]]:
        problem = bind_problem("tcp", self.endpoint)
        return [("endpoint", problem)] if problem else []


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(labels: Sequence[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


class PrometheusExporter:
    def __init__(self, settings: Settings, config: PrometheusConfig) -> None:
        self._settings = settings
        self._config = config
        self._store = SeriesStore(
            config.histogram_buckets, layouts=config.bucket_layouts, max_series=config.max_series
        )
        self._runner: web.AppRunner | None = None
        self._tasks = Tasks(str(settings.id), settings.logger)
        self._applying = asyncio.Lock()
        """Held while a batch is applied in slices: batches are applied whole and in arrival order."""
        tel = settings.telemetry
        self._sent = tel.sent()
        tel.gauge("exporter_series", "Live series held by the exporter.", lambda: self._store.size)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = parse_host_port(self._config.endpoint)
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        self._tasks.spawn(self._expire_loop(), "expire")
        self._settings.logger.info("serving /metrics on %s", self._config.endpoint)

    async def consume(self, batch: MetricBatch) -> None:
        """Apply ``batch``; one of 1M points takes seconds, so it is applied in slices that yield."""
        async with self._applying:
            update = self._store.update
            taken = 0
            async for chunk in slices(batch.points):
                for point in chunk:
                    if update(point) is not None:
                        taken += 1
            self._sent.value += taken
            self._count_refused()

    def _count_refused(self) -> None:
        for reason, n in self._store.new_refusals().items():
            self._settings.telemetry.dropped(reason).value += n

    async def _expire_loop(self) -> None:
        ttl = self._config.metric_expiration
        while True:
            await asyncio.sleep(expiry_interval_s(ttl))
            await self._store.expire_sliced(ttl)

    async def render(self) -> str:
        """The exposition text for every live series."""
        return "".join([chunk async for chunk in self.render_chunks()])

    async def render_chunks(self) -> AsyncIterator[str]:
        """The exposition text in pieces of at most ~``_PIECE_BYTES``, yielding to the event loop
        between pieces and after every ``SLICE_S`` of work: neither the loop nor memory ever holds a
        whole page (1M series make ~60 MB of text and ~1.5 s of work)."""
        parts: list[str] = []
        size = 0
        slicer = Slicer()
        done = 0
        # A family's bounds (its layout, else the default) are one of a few shared tuples.
        les: dict[tuple[float, ...], list[str]] = {}
        bounds: list[str] = []
        lines = 0
        # Series with their own bounds (or quantiles) share one interned tuple per metric, so the text
        # of the last tuple seen is nearly always the one needed next.
        shape: tuple[float, ...] | None = None
        shape_text: list[str] = []
        shape_le: list[str] = []
        for name, family in list(self._store.families.items()):
            kind = self._store.kinds.get(name, "untyped")
            parts.append(f"# TYPE {name} {kind}\n")
            if kind == HISTOGRAM:
                layout = self._store.bounds_of(name)
                known = les.get(layout)
                if known is None:
                    known = les[layout] = [*(format_value(b) for b in layout), "+Inf"]
                bounds = known
                lines = len(bounds) + 2  # lines of a histogram with the family's bounds: bucket, _sum, _count
            for series in list(family.values()):
                if series.cache is None:  # one string per series; bucket lines are built per scrape
                    series.cache = _label_text(series.labels)
                base = cast(str, series.cache)
                if kind in (HISTOGRAM, SUMMARY):
                    own = series.bounds
                    if own is not None and own is not shape:
                        shape = own
                        shape_text = [format_value(b) for b in own]
                        shape_le = [*shape_text, "+Inf"]
                    if kind == SUMMARY:
                        self._render_summary(series, base, shape_text, parts)
                        size += (len(base) + 40) * (len(shape_text) + 2)
                    elif own is None:
                        self._render_histogram(series, base, bounds, parts)
                        size += (len(base) + 40) * lines
                    else:
                        self._render_histogram(series, base, shape_le, parts)
                        size += (len(base) + 40) * (len(shape_le) + 2)
                elif base:
                    parts.append(f"{name}{{{base}}} {format_value(series.value)}\n")
                    size += len(base) + 40
                else:
                    parts.append(f"{name} {format_value(series.value)}\n")
                    size += 40
                done += 1
                if size >= _PIECE_BYTES or (done % CHECK_EVERY == 0 and slicer.due()):
                    yield "".join(parts)
                    parts, size = [], 0
                    await slicer.pause()  # yielding a piece is not yielding to the loop
        if parts:
            yield "".join(parts)

    @staticmethod
    def _render_histogram(series: Series, base: str, bounds: list[str], parts: list[str]) -> None:
        name = series.name
        counts = series.bucket_counts
        assert counts is not None
        sep = "," if base else ""
        # State keeps weighted float totals; the page shows them whole (exphist.whole): integers,
        # non-decreasing, +Inf == _count.
        count = format_value(whole_count(series.count))
        for le, value in zip(bounds, [*whole(counts).tolist()], strict=False):
            parts.append(f'{name}_bucket{{{base}{sep}le="{le}"}} {format_value(value)}\n')
        parts.append(f'{name}_bucket{{{base}{sep}le="+Inf"}} {count}\n')
        labels = f"{{{base}}}" if base else ""
        parts.append(f"{name}_sum{labels} {format_value(series.sum)}\n")
        parts.append(f"{name}_count{labels} {count}\n")

    @staticmethod
    def _render_summary(series: Series, base: str, quantiles: list[str], parts: list[str]) -> None:
        name = series.name
        values = series.bucket_counts
        assert values is not None
        sep = "," if base else ""
        for q, value in zip(quantiles, values.tolist(), strict=True):
            parts.append(f'{name}{{{base}{sep}quantile="{q}"}} {format_value(value)}\n')
        labels = f"{{{base}}}" if base else ""
        parts.append(f"{name}_sum{labels} {format_value(series.sum)}\n")
        parts.append(f"{name}_count{labels} {format_value(series.count)}\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        await response.prepare(request)
        async for chunk in self.render_chunks():
            await response.write(chunk.encode())
        await response.write_eof()
        return response

    async def shutdown(self) -> None:
        await self._tasks.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._settings.telemetry.telemetry.unregister_gauges(exporter=self._settings.telemetry.id)


def _create(settings: Settings, config: PrometheusConfig) -> PrometheusExporter:
    return PrometheusExporter(settings, config)


factory = Factory(
    type=TYPE,
    kind=ComponentKind.EXPORTER,
    config_class=PrometheusConfig,
    create=_create,
    signals=frozenset({Signal.METRICS}),
    description="Serves metrics for Prometheus to scrape (text exposition format), like statsd_exporter.",
)
