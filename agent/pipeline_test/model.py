"""The test-file format (version 1): what ``headwater test`` reads and what ``--update`` writes.

```yaml
version: 1
tests:
  - name: pay traffic is labelled pay
    step: 1s                      # the simulated clock's resolution (default 1s)
    run_for: 30s                  # simulated time the test lasts (default: the last input + one step)
    inputs:
      - {at: 0s, receiver: statsd, statsd: ["api.hits:1|c|#team:pay"]}
      - {at: 5s, every: 1m, times: 10, receiver: statsd, statsd: ["api.up:1|g"]}   # at 5s, 1m5s, … 9m5s
      - {at: 1s, receiver: http, headers: {X-Scope-OrgID: pay}, json: [{name: jobs, value: 3}]}
      - {at: 2s, receiver: http/events, path: /api/metrics/commands, jwt: {org_id: acme}, json: [...]}
    expect:
      - at: processor/tenant      # what leaves a processor (or connector) ...
        metric: api.hits
        labels: {tenant_id: pay}  # a subset of the labels; ``labels_exact: true`` for all of them
        value: 1
        tolerance: 0.001          # absolute; default 1e-9
        type: sum                 # sum | gauge | histogram | summary
        count: 1                  # points matching (default: at least one)
        by: 10s                   # optional: only what left by then (simulated; in-process places)
      - at: exporter/prometheus_remote_write   # ... or the decoded requests an exporter would send
        metric: api_hits_total
        labels: {tenant_id: pay}
      - {at: exporter/prometheus_remote_write, metric: other_total, count: 0}   # none of these
      - {at: processor/filter, count: 0}                                       # no output at all
      - alert: api_p99            # a threshold processor's notification (Alertmanager-webhook body)
        status: firing            # or resolved
        labels: {severity: critical}
```

Times are durations (``500ms``, ``2s``, ``5m``, ``6h1m``) after the test's start, a simulated instant
aligned to a day boundary (2026-01-01T00:00:00Z), so windows aligned to the clock start with the test.
Inputs: ``statsd`` lines (one datagram) for a ``statsd`` receiver; ``json`` items (``POST /v1/metrics``)
for an ``http`` receiver; ``otlp`` (an OTLP/JSON ExportMetricsServiceRequest) for an ``otlp`` receiver;
``headers`` go with a JSON or OTLP request (``json`` as a list is posted as a list, as one mapping as
that object: a batch envelope); ``path`` is the route a JSON request goes to (default
``/v1/metrics``); ``jwt`` claims make a bearer token signed with the receiver's own HS256 ``secret``
(its ``aud``/``iss`` added when the receiver requires them, ``exp`` five minutes after the real clock
unless given), sent as ``Authorization: Bearer``. Places: ``processor/<id>`` and ``connector/<id>`` (what a
pipeline hands them), ``exporter/<id>`` (for ``prometheus_remote_write``, ``otlp_http`` and ``otlp``
(gRPC) the decoded requests — names and labels as sent, OTLP resource attributes as ``resource.<key>``
labels; for other exporters the points handed to them).
At the end of a test the graph stops as the agent does (StatsD flushes, processors send what they
hold), so an expectation without ``by`` sees that last output too.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

VERSION = 1
"""The only test-file version this runner reads; ``--update`` writes it."""

DEFAULT_TOLERANCE = 1e-9
MAX_REPEATS = 100_000
"""The most copies one repeated input may make."""
_TYPES = ("sum", "gauge", "histogram", "summary")
_WIRE = ("prometheus_remote_write", "otlp_http", "otlp")
"""Exporters whose requests are captured and decoded: what they send has no simulated time."""
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class TestFileError(Exception):
    """A test file that cannot be used; ``problems`` are ``path: message`` lines."""

    __test__ = False  # not a pytest test class

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Input:
    at_s: float
    """When the input arrives, seconds after the test's start."""
    receiver: str
    """The receiver id it enters (``statsd``, ``http/json``)."""
    statsd: tuple[str, ...] = ()
    """StatsD lines, fed to a ``statsd`` receiver as one datagram."""
    json: tuple[Any, ...] = ()
    """JSON items, posted to an ``http`` receiver's /v1/items as one request."""
    otlp: Any = None
    """An OTLP/JSON ExportMetricsServiceRequest, posted to an ``otlp`` receiver's HTTP endpoint."""
    headers: tuple[tuple[str, str], ...] = ()
    """HTTP headers of a JSON or OTLP request (``X-Scope-OrgID``, ``Authorization``)."""
    json_object: bool = False
    """``json`` was one mapping in the file: posted as that object (an envelope), not as a list."""
    path: str = ""
    """The route a JSON request is posted to; empty: ``/v1/metrics``."""
    jwt: tuple[tuple[str, Any], ...] = ()
    """Claims of a bearer JWT the runner signs with the receiver's HS256 secret; empty: no token."""


@dataclass(frozen=True)
class Expectation:
    at: str
    """``processor/<id>``, ``connector/<id>``, ``exporter/<id>``, or ``alerts`` (with ``alert``)."""
    metric: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    labels_exact: bool = False
    value: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    type: str = ""
    count: int | None = None
    """How many points (or notifications) match; None: at least one. 0 is "no output"."""
    alert: str = ""
    status: str = ""
    """``firing`` or ``resolved`` for an ``alert`` expectation."""
    by_s: float | None = None
    """Only what was observed by this simulated time (seconds after the start); None: by the end."""

    def describe(self) -> str:
        what = f"alert {self.alert}" if self.alert else (self.metric or "any metric")
        parts = [what]
        if self.status:
            parts.append(f"status={self.status}")
        if self.labels:
            sep = "" if self.labels_exact else ", ..."
            parts.append("{" + ", ".join(f'{k}="{v}"' for k, v in self.labels) + sep + "}")
        if self.type:
            parts.append(f"type={self.type}")
        if self.value is not None:
            parts.append(f"value={self.value:g}±{self.tolerance:g}")
        parts.append("count=" + ("≥1" if self.count is None else str(self.count)))
        if self.by_s is not None:
            parts.append(f"by={self.by_s:g}s")
        return f"{self.at}: " + " ".join(parts)


@dataclass(frozen=True)
class PipelineTest:
    name: str
    inputs: tuple[Input, ...]
    expect: tuple[Expectation, ...]
    step_s: float = 1.0
    run_for_s: float | None = None
    where: str = ""
    """``file: tests[i]``, for messages."""


@dataclass(frozen=True)
class TestFile:
    __test__ = False  # not a pytest test class
    path: str
    tests: tuple[PipelineTest, ...] = field(default=())


def duration_s(raw: Any, where: str) -> float:
    """``1.5``, ``"500ms"``, ``"2s"``, ``"5m"``, ``"1h30m"`` → seconds; TestFileError otherwise."""
    if isinstance(raw, bool):
        raise TestFileError([f"{where}: expected a duration such as 2s or 500ms, got {raw!r}"])
    if isinstance(raw, (int, float)) and raw >= 0:
        return float(raw)
    text = raw.strip() if isinstance(raw, str) else ""
    if not _DURATION.match(text):
        raise TestFileError([f"{where}: expected a duration such as 2s, 500ms or 1h30m, got {raw!r}"])
    return sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(text))


def _keys(raw: Any, where: str, allowed: set[str], required: set[str]) -> list[str]:
    if not isinstance(raw, dict):
        return [f"{where}: expected a mapping, got {type(raw).__name__}"]
    problems = [
        f"{where}.{k}: unknown key (known: {', '.join(sorted(allowed))})" for k in raw if k not in allowed
    ]
    problems += [f"{where}: {k} is required" for k in sorted(required) if k not in raw]
    return problems


def _labels(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise TestFileError([f"{where}: expected a mapping of label names to values"])
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


def _inputs(raw: Any, where: str) -> list[Input]:
    """One input, or ``times`` copies of it ``every`` apart from ``at``."""
    first = _input(raw, where)
    times = raw.get("times", 1)
    if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= MAX_REPEATS:
        raise TestFileError(
            [f"{where}.times: expected a whole number from 1 to {MAX_REPEATS}, got {times!r}"]
        )
    if times == 1:
        return [first]
    if "every" not in raw:
        raise TestFileError([f"{where}: times needs every (the time between copies)"])
    every = duration_s(raw["every"], f"{where}.every")
    if every <= 0:
        raise TestFileError([f"{where}.every: must be above 0"])
    return [dataclasses.replace(first, at_s=first.at_s + k * every) for k in range(times)]


def _input(raw: Any, where: str) -> Input:
    allowed = {"at", "every", "times", "receiver", "statsd", "json", "otlp", "headers", "path", "jwt"}
    problems = _keys(raw, where, allowed, {"receiver"})
    if problems:
        raise TestFileError(problems)
    given = [k for k in ("statsd", "json", "otlp") if k in raw]
    if len(given) != 1:
        raise TestFileError([f"{where}: give exactly one of statsd, json, otlp (got {given or 'none'})"])
    statsd = raw.get("statsd", ())
    if isinstance(statsd, str):
        statsd = statsd.splitlines()
    items = raw.get("json", ())
    json_object = isinstance(items, dict)
    if json_object:
        items = [items]
    path = raw.get("path", "")
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise TestFileError([f"{where}.path: expected a route such as /api/metrics/commands, got {path!r}"])
    claims = raw.get("jwt")
    if claims is not None and (not isinstance(claims, dict) or not claims):
        raise TestFileError([f"{where}.jwt: expected a mapping of claims such as {{org_id: acme}}"])
    header_names = {str(k).lower() for k in raw.get("headers") or {}}
    if claims is not None and "authorization" in header_names:
        raise TestFileError([f"{where}: give jwt or an Authorization header, not both"])
    return Input(
        at_s=duration_s(raw.get("at", 0), f"{where}.at"),
        receiver=str(raw["receiver"]),
        statsd=tuple(str(s) for s in statsd),
        json=tuple(items),
        otlp=raw.get("otlp"),
        headers=_labels(raw.get("headers"), f"{where}.headers"),
        json_object=json_object,
        path=path,
        jwt=tuple(sorted((str(k), v) for k, v in (claims or {}).items())),
    )


def _expectation(raw: Any, where: str) -> Expectation:
    allowed = {
        "at",
        "metric",
        "labels",
        "labels_exact",
        "value",
        "tolerance",
        "type",
        "count",
        "alert",
        "status",
        "by",
    }
    problems = _keys(raw, where, allowed, set())
    if problems:
        raise TestFileError(problems)
    alert = str(raw.get("alert", ""))
    at = str(raw.get("at", "alerts" if alert else ""))
    if not alert and not raw.get("metric") and "count" not in raw:
        problems.append(f"{where}: give metric (a point), alert (a notification), or count (of any point)")
    if not alert and at.split("/", 1)[0] not in ("processor", "connector", "exporter"):
        problems.append(f"{where}.at: expected processor/<id>, connector/<id> or exporter/<id>, got {at!r}")
    kind = str(raw.get("type", ""))
    if kind and kind not in _TYPES:
        problems.append(f"{where}.type: expected one of {', '.join(_TYPES)}, got {kind!r}")
    status = str(raw.get("status", "firing" if alert else ""))
    if alert and status not in ("firing", "resolved"):
        problems.append(f"{where}.status: expected firing or resolved, got {status!r}")
    count = raw.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        problems.append(f"{where}.count: expected a whole number ≥ 0, got {count!r}")
    value = raw.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.append(f"{where}.value: expected a number, got {value!r}")
    tolerance = raw.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        problems.append(f"{where}.tolerance: expected a number ≥ 0, got {tolerance!r}")
    by = raw.get("by")
    by_s = None if by is None else duration_s(by, f"{where}.by")
    kind_of, _, component = at.partition("/")
    wire = kind_of == "exporter" and component.split("/")[0] in _WIRE
    if by_s is not None and (alert or wire):
        problems.append(f"{where}.by: applies to processors, connectors and recorded exporters only")
    if problems:
        raise TestFileError(problems)
    return Expectation(
        at=at,
        metric=str(raw.get("metric", "")),
        labels=_labels(raw.get("labels"), f"{where}.labels"),
        labels_exact=bool(raw.get("labels_exact", False)),
        value=None if value is None else float(value),
        tolerance=float(tolerance),
        type=kind,
        count=count,
        alert=alert,
        status=status,
        by_s=by_s,
    )


def _at(item: Input) -> float:
    return item.at_s


def _test(raw: Any, where: str) -> PipelineTest:
    problems = _keys(raw, where, {"name", "inputs", "expect", "step", "run_for"}, {"name", "inputs"})
    if problems:
        raise TestFileError(problems)
    inputs, expect = raw.get("inputs") or [], raw.get("expect") or []
    if not isinstance(inputs, list) or not isinstance(expect, list):
        raise TestFileError([f"{where}: inputs and expect must be lists"])
    step = duration_s(raw.get("step", 1), f"{where}.step")
    if step <= 0:
        raise TestFileError([f"{where}.step: must be above 0"])
    run_for = raw.get("run_for")
    items = [y for i, x in enumerate(inputs) for y in _inputs(x, f"{where}.inputs[{i}]")]
    return PipelineTest(
        name=str(raw["name"]),
        inputs=tuple(sorted(items, key=_at)),
        expect=tuple(_expectation(x, f"{where}.expect[{i}]") for i, x in enumerate(expect)),
        step_s=step,
        run_for_s=None if run_for is None else duration_s(run_for, f"{where}.run_for"),
        where=where,
    )


def parse(text: str, path: str) -> TestFile:
    """Parse a test file; TestFileError names every problem found with its place."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TestFileError([f"{path}: not YAML: {exc}"]) from None
    problems = _keys(raw, path, {"version", "tests"}, {"version", "tests"})
    if problems:
        raise TestFileError(problems)
    if raw["version"] != VERSION:
        raise TestFileError(
            [f"{path}.version: this headwater reads version {VERSION}, got {raw['version']!r}"]
        )
    if not isinstance(raw["tests"], list) or not raw["tests"]:
        raise TestFileError([f"{path}.tests: expected a non-empty list of tests"])
    tests: list[PipelineTest] = []
    problems = []
    for i, t in enumerate(raw["tests"]):
        try:
            tests.append(_test(t, f"{path}: tests[{i}]"))
        except TestFileError as exc:
            problems += exc.problems
    if problems:
        raise TestFileError(problems)
    return TestFile(path, tuple(tests))


def load(path: str) -> TestFile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise TestFileError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse(text, path)
