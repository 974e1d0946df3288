"""The JSON item rules of the ``http`` receiver: from a request body to points, one refusal per bad item
(in agent/ with :mod:`agent.json_events`, which the ``logmetrics`` connector shares).

The body is one metric object or a list of them::

    {"name": "queue.depth", "value": 12, "type": "gauge", "tags": {"queue": "mail"},
     "timestamp": "2024-05-01T12:00:00.250Z", "unit": "1", "description": "Jobs waiting"}

Fields
------
``name`` (or ``metric_name``, not both): a non-empty string of at most ``limits.max_name_length``
(1,024) UTF-8 bytes, without control characters (U+0000-U+001F, U+007F).

``value``: a finite JSON number; for ``histogram`` also a non-empty list of them (the observations).
``true``/``false``, strings (even ``"1.5"``), ``null``, the literals ``NaN``/``Infinity``/``-Infinity``
(Python's json module accepts them; we keep them only to refuse their item) and numbers that overflow
a double (``1e400``) are refused.

``type``: ``gauge`` (default): the last value. ``counter``: an **increment** (a delta, like StatsD
``c``), sent on as a delta monotonic sum; a negative increment is refused (``negative_counter``)
because a Prometheus counter never decreases — send a gauge for values that go down. ``histogram``:
the observations become one exponential histogram (exact count, sum, min and max) per item.

``tags`` (or ``labels``, not both): an object of string → string pairs, at most ``limits.max_labels``
(128); label names are non-empty, at most ``limits.max_label_name_length`` (1,024) bytes and without
control characters; values at most ``limits.max_label_value_length`` (4,096) bytes (a value may hold a
tab or a newline: the exporters escape it); the name and every label name and value together at most
``limits.max_series_bytes`` (16 KiB). The limits are the receiver's ``limits:`` block
(:class:`agent.limits.SeriesLimits`).

``timestamp``: an RFC 3339 string with a UTC offset (``2024-05-01T12:00:00Z``,
``2024-05-01 14:00:00.123456789+02:00``; ``T`` or a space, up to nanosecond fractions), or a number:
epoch **seconds** below 1e11 and epoch **milliseconds** from 1e11 up (1e11 seconds is the year 5138,
1e11 milliseconds March 1973, so no current time is ambiguous). It must lie within [now −
``max_timestamp_age``, now + ``max_timestamp_ahead``] (default 24 h and 10 min); without one, the
time the request arrived is used.

``unit``: ASCII, at most 63 characters (UCUM: ``s``, ``By``, ``1``). ``description``: at most 1,023
characters. ``metadata`` (only on a route with ``format: metrics``, ``agent/json_events.py``): an
object whose keys listed in the route's ``metadata_labels`` become labels (a tag of the same name
wins), the others accepted and dropped. ``null`` for any optional field means absent; any other
field is refused. Strings must be
valid UTF-8: a ``\\ud800`` escape without its pair is refused.

Item reason codes (the ``code`` of each error, and the ``reason`` label of the refusal counter):
``invalid_item`` (not an object), ``unknown_field``, ``invalid_name``, ``invalid_value``,
``negative_counter``, ``invalid_type``, ``invalid_labels``, ``invalid_timestamp``,
``timestamp_out_of_range``, ``invalid_unit``, ``invalid_description``; for the size limits the shared
reasons ``name_too_long``, ``too_many_labels``, ``label_name_too_long``, ``label_value_too_long``,
``series_too_large``; ``control_character``. The error's ``reason`` text says what to change and
names the limit.

Deep nesting (``[[[[...``) needs no pre-scan of the body: the C JSON decoder stops at the
interpreter's recursion limit (~1,000 levels) with RecursionError, refused as ``invalid_json`` with a
message that says so, and the rules above take nothing nested deeper than three levels.
"""

from __future__ import annotations

import collections
import difflib
import json
import math
import re
import sys
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from agent import exphist
from agent.limits import (
    CONTROL_CHARACTER,
    LABEL_NAME_TOO_LONG,
    LABEL_VALUE_TOO_LONG,
    NAME_TOO_LONG,
    SERIES_TOO_LARGE,
    TOO_MANY_LABELS,
    SeriesLimits,
    find_control,
)
from agent.limits import REASONS as LIMIT_REASONS
from agent.model import Kind, Labels, Point, Temporality

MAX_UNIT_CHARS = 63
MAX_DESCRIPTION_CHARS = 1023
EPOCH_MS_FROM = 10**11
"""Numeric timestamps from here up are epoch milliseconds; below, epoch seconds."""
ITEM_REASONS = (
    "invalid_item",
    "unknown_field",
    "invalid_name",
    "invalid_value",
    "negative_counter",
    "invalid_type",
    "invalid_labels",
    "invalid_timestamp",
    "timestamp_out_of_range",
    "invalid_unit",
    "invalid_description",
    *LIMIT_REASONS,
    CONTROL_CHARACTER,
)
"""Every code an item may be refused with."""
_FIELDS = ("name", "metric_name", "value", "timestamp", "type", "tags", "labels", "unit", "description")
_TYPES = ("gauge", "counter", "histogram")
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Refusal(Exception):
    """The whole request is refused: HTTP ``status``, a bounded ``code`` and a message for the sender."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = {}


class _Literal:
    """A NaN / Infinity / -Infinity literal, kept so that only its item is refused."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_int(text: str) -> int | float:
    # int() of more than 4,300 digits raises and would fail the whole body; as a float it is inf and
    # only its item is refused. 18 digits always fit a double's range.
    return int(text) if len(text) <= 18 else float(text)


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {quote(v)}"
    if isinstance(v, _Literal):
        return f"the literal {v.text} (not valid JSON)"
    if isinstance(v, float) and not math.isfinite(v):
        return "a number too large for a double"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    return "a list" if isinstance(v, list) else "an object"


def quote(s: str, limit: int = 40) -> str:
    return json.dumps(s[:limit] + "…" if len(s) > limit else s)


def _utf8_len(s: str) -> int:
    """UTF-8 length of ``s``; -1 when it holds an unpaired surrogate (a lone ``\\ud800`` escape)."""
    if s.isascii():
        return len(s)
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def _number(v: Any, what: str) -> float:
    if (type(v) is float or type(v) is int) and math.isfinite(v):
        return float(v)
    raise _Refused("invalid_value", f"{what}: must be a finite number, got {_describe(v)}")


def _string(
    v: Any, what: str, code: str, max_bytes: int, too_long: str | None = None, limit: str = ""
) -> tuple[str, int]:
    """(``v``, its UTF-8 length); refused with ``code`` when it is not a valid string, and with
    ``too_long`` (default ``code``) when it is longer than ``max_bytes``, naming ``limit``."""
    if type(v) is not str:
        raise _Refused(code, f"{what}: must be a string, got {_describe(v)}")
    n = _utf8_len(v)
    if n < 0:
        raise _Refused(code, f"{what}: holds an unpaired UTF-16 surrogate escape; send valid UTF-8")
    if n > max_bytes:
        named = f" (limits::{limit})" if limit else ""
        raise _Refused(too_long or code, f"{what}: is {n} bytes long; the limit is {max_bytes}{named}")
    return v, n


_CONTROL = "holds a control character (U+0000-U+001F or U+007F); names may not"


def _labels(raw: Any, key: str, limits: SeriesLimits, budget: int) -> Labels:
    """The sorted labels of ``raw``; ``budget`` is the bytes left of ``limits.max_series_bytes``."""
    if not isinstance(raw, dict):
        raise _Refused(
            "invalid_labels", f"{key}: must be an object of string to string, got {_describe(raw)}"
        )
    if len(raw) > limits.max_labels:
        raise _Refused(
            TOO_MANY_LABELS,
            f"{key}: has {len(raw)} labels; the limit is {limits.max_labels} (limits::max_labels)",
        )
    max_name, max_value = limits.max_label_name_length, limits.max_label_value_length
    total = 0
    for name, value in raw.items():
        # Checked without building a message; the slow path below names the problem.
        if (
            name
            and type(value) is str
            and name.isascii()
            and value.isascii()
            and len(name) <= max_name
            and len(value) <= max_value
            and name.isprintable()
        ):
            total += len(name) + len(value)
            continue
        if not name:
            raise _Refused("invalid_labels", f"{key}: a label name must not be empty")
        _, n = _string(
            name,
            f"{key}: label name {quote(name)}",
            "invalid_labels",
            max_name,
            LABEL_NAME_TOO_LONG,
            "max_label_name_length",
        )
        if find_control(name):
            raise _Refused(CONTROL_CHARACTER, f"{key}: label name {quote(name)} {_CONTROL}")
        _, v = _string(
            value,
            f"{key}.{name[:40]}",
            "invalid_labels",
            max_value,
            LABEL_VALUE_TOO_LONG,
            "max_label_value_length",
        )
        total += n + v
    if total > budget:
        raise _Refused(
            SERIES_TOO_LARGE,
            f"{key}: the name and labels come to more than {limits.max_series_bytes} bytes "
            "(limits::max_series_bytes)",
        )
    return tuple(sorted(raw.items()))


def _ago(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _timestamp_ns(raw: Any) -> tuple[int, str]:
    """(epoch ns, how it was read) from an RFC 3339 string or epoch seconds / milliseconds."""
    if isinstance(raw, str):
        m = _RFC3339.fullmatch(raw)
        if not m:
            raise _Refused(
                "invalid_timestamp",
                f'timestamp: {quote(raw)} is not RFC 3339 (like "2024-05-01T12:00:00Z" or '
                f'"2024-05-01T14:00:00.5+02:00"); send epoch seconds or milliseconds as a number',
            )
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        try:
            dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        except ValueError as exc:
            raise _Refused("invalid_timestamp", f"timestamp: {quote(raw)}: {exc}") from None
        offset_s = 0
        if m[9]:
            hh, mm = int(m[10]), int(m[11])
            if hh > 23 or mm > 59:
                raise _Refused("invalid_timestamp", f"timestamp: {quote(raw)} has an invalid UTC offset")
            offset_s = (hh * 3600 + mm * 60) * (1 if m[9] == "+" else -1)
        seconds = (dt - _EPOCH) // timedelta(seconds=1) - offset_s
        return seconds * 10**9 + int((m[7] or "0").ljust(9, "0")), ""
    if type(raw) is int:
        if abs(raw) < EPOCH_MS_FROM:
            return raw * 10**9, ""
        return raw * 10**6, " (read as epoch milliseconds: it is at least 1e11)"
    if type(raw) is float and math.isfinite(raw):
        if abs(raw) < EPOCH_MS_FROM:
            return round(raw * 1e9), ""
        return round(raw * 1e6), " (read as epoch milliseconds: it is at least 1e11)"
    raise _Refused(
        "invalid_timestamp",
        f"timestamp: must be an RFC 3339 string or epoch seconds or milliseconds, got {_describe(raw)}",
    )


@dataclass(slots=True)
class Parsed:
    points: list[Point]
    """The accepted items' points, in request order."""
    errors: list[dict[str, Any]]
    """One ``{"index", "code", "reason"}`` per refused item."""
    refused: collections.Counter[str]
    """Refused items by code."""


_Spec = tuple[str, Kind, Labels, int, float, list[Any] | None, str, str]
"""An accepted item before its point is built: name, kind, labels, time, value, histogram values,
unit, description."""


class ItemParser:
    """Turns decoded JSON items into points; one refusal per bad item, the rest kept in order."""

    def __init__(
        self,
        *,
        max_timestamp_age_s: float,
        max_timestamp_ahead_s: float,
        max_buckets: int,
        max_scale: int = exphist.MAX_SCALE,
        limits: SeriesLimits | None = None,
        metadata_labels: Collection[str] | None = None,
    ) -> None:
        """``metadata_labels``, when given, makes ``metadata`` a known field (an object whose listed
        keys become labels; a tag of the same name wins; the other keys are accepted and dropped)."""
        self._metadata_labels = tuple(metadata_labels) if metadata_labels is not None else None
        self._fields = _FIELDS + ("metadata",) if metadata_labels is not None else _FIELDS
        self._age_s = max_timestamp_age_s
        self._ahead_s = max_timestamp_ahead_s
        self._max_buckets = max_buckets
        self._max_scale = max_scale
        self._limits = limits if limits is not None else SeriesLimits()

    def parse(self, items: list[Any], now_ns: int) -> Parsed:
        low = now_ns - int(self._age_s * 1e9)
        high = now_ns + int(self._ahead_s * 1e9)
        specs: list[_Spec] = []
        errors: list[dict[str, Any]] = []
        refused: collections.Counter[str] = collections.Counter()
        for index, item in enumerate(items):
            try:
                specs.append(self._item(item, now_ns, low, high))
            except _Refused as exc:
                errors.append({"index": index, "code": exc.code, "reason": exc.reason})
                refused[exc.code] += 1
        # Every histogram of the request in one numpy pass (per batch, not per point).
        hist_values: list[Any] = []
        offsets = [0]
        for spec in specs:
            if spec[5] is not None:
                hist_values.extend(spec[5])
                offsets.append(len(hist_values))
        hists = iter(
            exphist.from_segments(
                np.array(hist_values, dtype=np.float64),
                None,
                np.array(offsets, dtype=np.int64),
                max_buckets=self._max_buckets,
                max_scale=self._max_scale,
            )
            if hist_values
            else ()
        )
        points = []
        for name, kind, labels, t_ns, value, observations, unit, description in specs:
            if observations is not None:
                points.append(
                    Point(name, kind, labels, t_ns, histogram=next(hists), unit=unit, description=description)
                )
            else:  # a counter is an increment: a delta monotonic sum (unused fields for a gauge)
                points.append(
                    Point(
                        name,
                        kind,
                        labels,
                        t_ns,
                        value,
                        temporality=Temporality.DELTA,
                        monotonic=True,
                        unit=unit,
                        description=description,
                    )
                )
        return Parsed(points, errors, refused)

    def _item(self, item: Any, now_ns: int, low: int, high: int) -> _Spec:
        if not isinstance(item, dict):
            raise _Refused("invalid_item", f"must be a metric object, got {_describe(item)}")
        fields = self._fields
        for key in item:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _Refused(
                    "unknown_field", f"unknown field {quote(key)}{hint}; known: {', '.join(fields)}"
                )
        if "name" in item and "metric_name" in item:
            raise _Refused("invalid_name", "give either name or metric_name, not both")
        name_key = "metric_name" if "metric_name" in item else "name"
        if name_key not in item:
            raise _Refused("invalid_name", "name: required (a non-empty string)")
        limits = self._limits
        name, name_bytes = _string(
            item[name_key], name_key, "invalid_name", limits.max_name_length, NAME_TOO_LONG, "max_name_length"
        )
        if not name:
            raise _Refused("invalid_name", f"{name_key}: must not be empty")
        if not name.isprintable() and find_control(name):
            raise _Refused(CONTROL_CHARACTER, f"{name_key}: {quote(name)} {_CONTROL}")

        type_ = item.get("type")
        if type_ is None:
            type_ = "gauge"
        if type_ not in _TYPES:
            shown = quote(type_) if isinstance(type_, str) else _describe(type_)
            raise _Refused("invalid_type", f"type: {shown} is not one of {', '.join(_TYPES)}")
        if "value" not in item:
            raise _Refused("invalid_value", "value: required (a finite number)")
        raw = item["value"]
        value = 0.0
        observations: list[Any] | None = None
        if type_ == "histogram":
            observations = raw if isinstance(raw, list) else [raw]
            if not observations:
                raise _Refused("invalid_value", "value: a histogram needs at least one number")
            for i, v in enumerate(observations):
                if not ((type(v) is float or type(v) is int) and math.isfinite(v)):
                    what = f"value[{i}]" if isinstance(raw, list) else "value"
                    raise _Refused("invalid_value", f"{what}: must be a finite number, got {_describe(v)}")
        elif isinstance(raw, list):
            raise _Refused("invalid_value", f'value: a list of values needs "type": "histogram", not {type_}')
        else:
            value = _number(raw, "value")
            if type_ == "counter" and value < 0:
                raise _Refused(
                    "negative_counter",
                    f"value: a counter takes increments, and {raw!r} is negative (send a gauge instead)",
                )

        if "tags" in item and "labels" in item:
            raise _Refused("invalid_labels", "give either tags or labels, not both")
        labels_key = "labels" if "labels" in item else "tags"
        raw_labels = item.get(labels_key)
        if self._metadata_labels is not None and item.get("metadata") is not None:
            raw_labels = self._with_metadata(item["metadata"], raw_labels)
        budget = limits.max_series_bytes - name_bytes
        if raw_labels is not None:
            labels = _labels(raw_labels, labels_key, limits, budget)
        elif budget < 0:
            raise _Refused(
                SERIES_TOO_LARGE,
                f"{name_key}: more than {limits.max_series_bytes} bytes (limits::max_series_bytes)",
            )
        else:
            labels = ()

        t_ns = now_ns
        raw_ts = item.get("timestamp")
        if raw_ts is not None:
            t_ns, how = _timestamp_ns(raw_ts)
            if not low <= t_ns <= high:
                when = (
                    f"{_ago((now_ns - t_ns) / 1e9)} in the past"
                    if t_ns < now_ns
                    else f"{_ago((t_ns - now_ns) / 1e9)} ahead of the agent's clock"
                )
                shown = quote(raw_ts) if isinstance(raw_ts, str) else repr(raw_ts)
                raise _Refused(
                    "timestamp_out_of_range",
                    f"timestamp: {shown} is {when}{how}; accepted: from {_ago(self._age_s)} before "
                    f"to {_ago(self._ahead_s)} after now",
                )

        unit = item.get("unit")
        if unit is None:
            unit = ""
        elif type(unit) is not str or not unit.isascii() or len(unit) > MAX_UNIT_CHARS:
            raise _Refused(
                "invalid_unit",
                f"unit: must be an ASCII string of at most 63 characters, got {_describe(unit)}",
            )
        description = item.get("description")
        if description is None:
            description = ""
        else:
            _string(description, "description", "invalid_description", 4 * MAX_DESCRIPTION_CHARS)
            if len(description) > MAX_DESCRIPTION_CHARS:
                raise _Refused("invalid_description", "description: longer than 1023 characters")
        kind = Kind.GAUGE if type_ == "gauge" else Kind.SUM if type_ == "counter" else Kind.HISTOGRAM
        return name, kind, labels, t_ns, value, observations, unit, description

    def _with_metadata(self, metadata: Any, raw_labels: Any) -> Any:
        """``raw_labels`` with the allow-listed keys of ``metadata`` added (as text)."""
        if not isinstance(metadata, dict):
            raise _Refused("invalid_labels", f"metadata: must be an object, got {_describe(metadata)}")
        picked: dict[str, Any] = {}
        for key in self._metadata_labels or ():
            v = metadata.get(key)
            if v is None:
                continue
            if type(v) is bool:
                v = "true" if v else "false"
            elif type(v) is int or (type(v) is float and math.isfinite(v)):
                v = str(v)
            elif type(v) is not str:
                raise _Refused(
                    "invalid_labels",
                    f"metadata.{key}: a label takes a string, number or boolean, got {_describe(v)}",
                )
            picked[key] = v
        if not picked or not (raw_labels is None or isinstance(raw_labels, dict)):
            return raw_labels
        return {**picked, **(raw_labels or {})}


def decode_body(body: bytes, max_items: int, max_values: int = 1_000_000) -> list[Any]:
    """The items of a UTF-8 JSON body (one object or a list); raises :class:`Refusal` for the request.

    Before parsing, the body's values are counted from above by its separators (one ``bytes.count``
    each, ~1 ms per MiB; commas inside strings count too, so the count never falls short): a body of
    millions of small numbers costs some 40 bytes of Python objects per value once parsed, and the
    parse holds the GIL throughout. Over ``max_values`` it is refused whole before any of that."""
    values = body.count(b",") + body.count(b":") + 1
    if values > max_values:
        raise Refusal(
            413,
            "too_many_values",
            f"the body holds up to {values:,} JSON values (counted by their separators); the limit is "
            f"{max_values:,} (max_values): split the request",
        )
    try:
        text = body.decode("utf-8")
        try:
            doc = json.loads(text, parse_constant=_Literal)
        except json.JSONDecodeError:
            raise
        except ValueError:
            # An integer of over 4,300 digits: parse again, reading integers through _parse_int (a
            # hook that doubles the decoding time, so only here).
            doc = json.loads(text, parse_constant=_Literal, parse_int=_parse_int)
    except UnicodeDecodeError as exc:
        raise Refusal(400, "invalid_json", f"body is not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise Refusal(
            400,
            "invalid_json",
            "body is not valid JSON: nested deeper than the JSON decoder allows (about "
            f"{sys.getrecursionlimit()} levels, the interpreter's recursion limit); an item nests at "
            "most 3 levels",
        ) from None
    except ValueError as exc:
        raise Refusal(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc] if isinstance(doc, dict) else None
    if items is None:
        raise Refusal(
            400, "invalid_json", f"body must be a metric object or a list of them, got {_describe(doc)}"
        )
    if len(items) > max_items:
        raise Refusal(
            413,
            "too_many_items",
            f"{len(items)} items in one request; the limit is {max_items} (max_items): split the list",
        )
    return items
