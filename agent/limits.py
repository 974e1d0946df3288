"""Size limits on one series, shared by every receiver (the ``limits:`` block of statsd, http, otlp).

A series is a metric name and its labels (StatsD tags, JSON labels, an OTLP data point's own
attributes). An OTLP resource and scope are not labels (the Prometheus exporters take only ``job`` and
``instance`` from ``service.*``; the OTLP exporters pass them on as such) and are often large (the
OpenTelemetry Java agent's ``process.command_line`` runs to tens of KB), so the per-label limits do not
apply to them: every point holds them, and ``max_resource_bytes`` bounds them together; their
attribute keys are held to ``max_label_name_length``. Each limit bounds what one point can make the
agent hold; the series caps (``max_series``) bound how many. A point over a limit is refused with the
reason named below and counted in ``headwater_receiver_refused_points_total{reason}``; the other
points of the packet or request still go through.

| limit | default | refusal reason |
|---|---|---|
| ``max_name_length`` | 1024 bytes | ``name_too_long`` |
| ``max_labels`` | 128 | ``too_many_labels`` |
| ``max_label_name_length`` | 1024 bytes | ``label_name_too_long`` |
| ``max_label_value_length`` | 4096 bytes | ``label_value_too_long`` |
| ``max_series_bytes`` | 16 KiB | ``series_too_large`` |
| ``max_resource_bytes`` (OTLP only) | 64 KiB | ``resource_too_large`` |

Lengths are UTF-8 bytes. Receivers with a fast path check cheap conditions first (the total length
of a line or a point) and call :meth:`SeriesLimits.check` only for what might be over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.confmodel import Size

NAME_TOO_LONG = "name_too_long"
TOO_MANY_LABELS = "too_many_labels"
LABEL_NAME_TOO_LONG = "label_name_too_long"
LABEL_VALUE_TOO_LONG = "label_value_too_long"
SERIES_TOO_LARGE = "series_too_large"
REASONS = (NAME_TOO_LONG, TOO_MANY_LABELS, LABEL_NAME_TOO_LONG, LABEL_VALUE_TOO_LONG, SERIES_TOO_LARGE)
"""Every reason a point may be refused with for the size of its series (every receiver)."""
RESOURCE_TOO_LARGE = "resource_too_large"
"""Reason for points whose OTLP resource plus scope is over ``max_resource_bytes``: only the OTLP
receiver has resources, so it is not in :data:`REASONS` (which every receiver exports at zero)."""
CONTROL_CHARACTER = "control_character"
"""Reason for a metric or label name holding a C0 control character (U+0000-U+001F) or DEL (U+007F)."""
find_control = re.compile("[\x00-\x1f\x7f]").search
"""``find_control(s)`` matches the first control character of ``s`` (str only), or returns None."""


@dataclass(frozen=True)
class SeriesLimits:
    max_name_length: int = 1024
    """Longest metric name, in UTF-8 bytes; longer → refused{name_too_long}."""
    max_labels: int = 128
    """Most labels on one point (tags, the point's own attributes) → refused{too_many_labels}."""
    max_label_name_length: int = 1024
    """Longest label name or attribute key (resource, scope too), in bytes → refused{label_name_too_long}."""
    max_label_value_length: int = 4096
    """Longest label value in bytes (an OTLP array or map: its text) → refused{label_value_too_long}."""
    max_series_bytes: Size = Size(16 * 1024)
    """Name plus every label name and value, in bytes → refused{series_too_large}."""
    max_resource_bytes: Size = Size(64 * 1024)
    """Resource plus scope of OTLP data (attributes, scope name and version), in bytes; they are held
    with every point but are not series labels → refused{resource_too_large}."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("max_name_length", "max_labels", "max_label_name_length", "max_label_value_length"):
            value = getattr(self, name)
            if not 1 <= value <= 1 << 24:
                problems.append((name, f"must be between 1 and {1 << 24}"))
        if not 1 <= self.max_series_bytes <= 1 << 26:
            problems.append(("max_series_bytes", "must be between 1B and 64MiB"))
        if not 1 <= self.max_resource_bytes <= 1 << 26:
            problems.append(("max_resource_bytes", "must be between 1B and 64MiB"))
        return problems

    def check(self, name: str | bytes, labels: Iterable[tuple[str | bytes, str | bytes]]) -> str | None:
        """The refusal reason for a series of this name and labels, or None when it is within limits.

        ``str`` lengths are taken as UTF-8 bytes (ASCII strings without encoding them)."""
        n = _nbytes(name)
        if n > self.max_name_length:
            return NAME_TOO_LONG
        total = n
        for count, (key, value) in enumerate(labels, 1):
            if count > self.max_labels:
                return TOO_MANY_LABELS
            k = _nbytes(key)
            if k > self.max_label_name_length:
                return LABEL_NAME_TOO_LONG
            v = _nbytes(value)
            if v > self.max_label_value_length:
                return LABEL_VALUE_TOO_LONG
            total += k + v
        if total > self.max_series_bytes:
            return SERIES_TOO_LARGE
        return None

    def describe(self, reason: str) -> str:
        """A sentence for a refusal (HTTP error bodies, OTLP partial success), naming the limit."""
        limit = {
            NAME_TOO_LONG: ("the metric name", self.max_name_length, "max_name_length", "bytes"),
            TOO_MANY_LABELS: ("the label count", self.max_labels, "max_labels", "labels"),
            LABEL_NAME_TOO_LONG: (
                "a label name",
                self.max_label_name_length,
                "max_label_name_length",
                "bytes",
            ),
            LABEL_VALUE_TOO_LONG: (
                "a label value",
                self.max_label_value_length,
                "max_label_value_length",
                "bytes",
            ),
            SERIES_TOO_LARGE: (
                "the series (name + labels)",
                self.max_series_bytes,
                "max_series_bytes",
                "bytes",
            ),
            RESOURCE_TOO_LARGE: (
                "the resource plus scope (attributes, scope name and version)",
                self.max_resource_bytes,
                "max_resource_bytes",
                "bytes",
            ),
        }[reason]
        what, value, key, unit = limit
        return f"{what} is over the limit of {value} {unit} (limits::{key})"


def _nbytes(s: str | bytes) -> int:
    if isinstance(s, bytes) or s.isascii():
        return len(s)
    # Over-estimates nothing: a string with unpaired surrogates is refused elsewhere as invalid.
    return len(s.encode("utf-8", "surrogatepass"))
