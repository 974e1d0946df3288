"""The top-metrics tracker behind :meth:`agent.tap.TapHub.top_metrics`: per metric name, the series
seen at the receivers' outputs in the last minute, points per second, and the labels with the most
distinct values. Used on the reader's thread only."""

from __future__ import annotations

import collections
from typing import Any

from agent.model import Kind, Labels, MetricBatch

TOP_WINDOW_S = 60.0
"""A series is active when seen within this window; points per second are over it too."""
TOP_MAX_SERIES = 200_000
"""Series the tracker keeps at most (new ones beyond are counted in points, not in series)."""


class TopTracker:
    """Per metric name: the series seen (with when, last), and points per second over the window.
    Used on the reader's thread only. Series are keyed by (kind, labels, resource) — not
    :func:`agent.model.key_of`, which interns keys and must only run on the agent's thread."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.series: dict[str, dict[tuple[Kind, Labels, Any], float]] = {}
        self.total = 0
        self.windows: collections.deque[tuple[float, dict[str, int]]] = collections.deque()
        self.pruned = 0.0
        self.skipped = 0

    def add(self, batch: MetricBatch, t: float) -> None:
        counts: dict[str, int] = {}
        series = self.series
        room = TOP_MAX_SERIES - self.total
        for p in batch.points:
            name = p.name
            counts[name] = counts.get(name, 0) + 1
            seen = series.get(name)
            if seen is None:
                seen = series[name] = {}
            key = (p.kind, p.labels, p.resource)
            if key in seen or room > 0:
                if key not in seen:
                    room -= 1
                    self.total += 1
                seen[key] = t
        self.windows.append((t, counts))

    def snapshot(self, limit: int, by: str, now: float) -> list[dict[str, Any]]:
        cutoff = now - TOP_WINDOW_S
        windows = self.windows
        while windows and windows[0][0] < cutoff:
            windows.popleft()
        if now - self.pruned > 5.0:  # forgetting series is a pass over all of them: not every call
            self.pruned = now
            for name in list(self.series):
                seen = self.series[name]
                stale = [k for k, t in seen.items() if t < cutoff]
                for k in stale:
                    del seen[k]
                self.total -= len(stale)
                if not seen:
                    del self.series[name]
        span = max(1.0, now - max(cutoff, self.started))
        points: dict[str, int] = {}
        for _, counts in windows:
            for name, n in counts.items():
                points[name] = points.get(name, 0) + n
        # Series seen in the window, give or take the 5 s between prunes.
        rows = [(len(seen), points.get(name, 0) / span, name) for name, seen in self.series.items()]
        if by == "points_per_s":
            rows.sort(key=lambda r: (-r[1], -r[0], r[2]))
        else:
            rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
        return [
            {"name": name, "series": n, "points_per_s": round(pps, 3), "labels": self._labels(name, cutoff)}
            for n, pps, name in rows[: max(0, limit)]
        ]

    def _labels(self, name: str, cutoff: float) -> list[dict[str, Any]]:
        values: dict[str, set[str]] = {}
        for (_, labels, _), t in self.series[name].items():
            if t >= cutoff:
                for k, v in labels:
                    values.setdefault(k, set()).add(v)
        counted = sorted(((-len(vs), k) for k, vs in values.items()))
        return [{"name": k, "values": -n} for n, k in counted]
