"""Checks a test's expectations against what it observed, and explains a miss: the expected item next
to the observed items nearest to it (same name first, then most labels in common)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from agent.pipeline_test.capture import Alert, Observed
from agent.pipeline_test.model import Expectation
from agent.pipeline_test.runner import Observations

NEAREST = 5
"""Observed items shown under a failed expectation."""


@dataclass(frozen=True)
class Failure:
    expectation: Expectation
    message: str


def _labels_match(want: tuple[tuple[str, str], ...], got: tuple[tuple[str, str], ...], exact: bool) -> bool:
    if exact:
        return want == got
    have = dict(got)
    return all(have.get(k) == v for k, v in want)


def _point_matches(e: Expectation, o: Observed) -> bool:
    if (e.metric and o.metric != e.metric) or not _labels_match(e.labels, o.labels, e.labels_exact):
        return False
    if e.type and o.type and e.type != o.type:
        return False
    return e.value is None or (o.value is not None and abs(o.value - e.value) <= e.tolerance)


def _alert_matches(e: Expectation, a: Alert) -> bool:
    return a.name == e.alert and a.status == e.status and _labels_match(e.labels, a.labels, e.labels_exact)


def _closeness(e: Expectation, name: str, labels: tuple[tuple[str, str], ...]) -> tuple[float, int]:
    wanted = e.alert or e.metric
    common = len(set(e.labels) & set(labels))
    return (difflib.SequenceMatcher(None, wanted, name).ratio(), common)


def _nearest(e: Expectation, seen: Observations) -> list[str]:
    if e.alert:
        alerts = sorted(seen.alerts, key=lambda a: _closeness(e, a.name, a.labels), reverse=True)
        return [a.describe() for a in dict.fromkeys(alerts)][:NEAREST]
    points = seen.points.get(e.at, [])
    unique = list(dict.fromkeys(points))
    unique.sort(key=lambda o: _closeness(e, o.metric, o.labels), reverse=True)
    return [o.describe() for o in unique[:NEAREST]]


def check(e: Expectation, seen: Observations) -> Failure | None:
    """None when ``e`` holds; else why not, with the nearest observed items."""
    if e.alert:
        n = sum(1 for a in seen.alerts if _alert_matches(e, a))
        total, where = len(seen.alerts), "alert notifications"
    else:
        points = seen.points.get(e.at, [])
        if e.by_s is not None:
            times = seen.times.get(e.at, [])
            points = [o for o, t in zip(points, times, strict=True) if t <= e.by_s + 1e-9]
        n = sum(1 for o in points if _point_matches(e, o))
        total, where = len(points), f"points at {e.at}"
    ok = n >= 1 if e.count is None else n == e.count
    if ok:
        return None
    lines = [f"expected: {e.describe()}", f"observed: {n} matching of {total} {where}"]
    if not e.alert and e.at not in seen.points:
        known = ", ".join(sorted(seen.points)) or "none"
        lines.append(f"  (nothing was observed at {e.at}; places with output: {known})")
    nearest = _nearest(e, seen)
    if nearest:
        lines.append("nearest observed:")
        lines += [f"  - {line}" for line in nearest]
    return Failure(e, "\n".join(lines))


def check_all(expect: tuple[Expectation, ...], seen: Observations) -> list[Failure]:
    failures = [Failure(Expectation(at="input"), p) for p in seen.problems]
    for e in expect:
        failure = check(e, seen)
        if failure is not None:
            failures.append(failure)
    return failures
