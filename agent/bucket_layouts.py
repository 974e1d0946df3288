"""Per-metric ``le`` layouts for classic histogram buckets (glob → bounds), as statsd_exporter's mappings
allow: the exporters that turn exponential histograms into classic buckets (``prometheus``,
``prometheus_remote_write``, ``otlp`` with ``histograms: explicit``) take a ``bucket_layouts`` list and
look each metric up here. The first layout whose glob matches the metric's name wins; other metrics
get the exporter's default bounds. The counts themselves come from :func:`agent.exphist.classic_buckets`.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

_CACHE_LIMIT = 100_000
"""Names whose layout is cached (one dict lookup a point instead of a glob per layout); cleared when full."""


@dataclass(frozen=True)
class BucketLayout:
    match: str
    """Metric name glob (fnmatch: * ? [abc]) on the name as this exporter writes it, e.g. api_*_seconds."""
    bounds: list[float]
    """Upper bounds (le) of the classic buckets for matching metrics: finite, strictly ascending."""


def bounds_problem(bounds: Sequence[float]) -> str | None:
    """Why ``bounds`` cannot be classic bucket bounds, or None."""
    if not bounds:
        return "at least one bucket bound is required"
    if not all(math.isfinite(b) for b in bounds):
        return "bounds must be finite (+Inf is always the last bucket)"
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        return "bounds must be strictly increasing"
    return None


def validate_layouts(layouts: Sequence[BucketLayout], key: str = "bucket_layouts") -> list[tuple[str, str]]:
    """(path, message) problems of a ``bucket_layouts`` list."""
    problems = []
    for i, layout in enumerate(layouts):
        if not layout.match:
            problems.append((f"{key}::{i}::match", "must not be empty"))
        problem = bounds_problem(layout.bounds)
        if problem is not None:
            problems.append((f"{key}::{i}::bounds", problem))
    return problems


class BucketLayouts:
    """Which bounds a metric's classic buckets use. Every returned tuple is one of a few shared
    objects (the default, or one per layout), so callers may cache text by identity."""

    def __init__(self, default: Sequence[float], layouts: Sequence[BucketLayout] = ()) -> None:
        self.default = tuple(float(b) for b in default)
        self._layouts = [(layout.match, tuple(float(b) for b in layout.bounds)) for layout in layouts]
        self._cache: dict[str, tuple[float, ...]] = {}

    def bounds_for(self, name: str) -> tuple[float, ...]:
        """The bounds for metric ``name``: the first matching layout's, else the default."""
        out = self._cache.get(name)
        if out is None:
            out = self.default
            for pattern, bounds in self._layouts:
                if fnmatch.fnmatchcase(name, pattern):
                    out = bounds
                    break
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[name] = out
        return out
