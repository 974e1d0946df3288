"""OTLP ``AnyValue`` as text and as JSON's kinds: how an attribute value becomes a label (the OTLP
receiver, the spanmetrics connector) or a field of an event (the logmetrics connector)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
from opentelemetry.proto.common.v1 import common_pb2


def format_double(v: float) -> str:
    """A double as label text: its shortest round-trip form, NaN, +Inf or -Inf."""
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return str(np.format_float_positional(v, trim="-"))


def json_value(v: common_pb2.AnyValue) -> Any:
    """``v`` as JSON's kinds: str, int, float (a non-finite double as its text), bool, list, dict (a
    kvlist), base64 text for bytes, None for an empty value."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return v.bool_value
    if which in ("int_value", "string_value_strindex"):
        return getattr(v, which)
    if which == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else format_double(d)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    if which == "array_value":
        return [json_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: json_value(kv.value) for kv in v.kvlist_value.values}
    return None


def render_value(v: common_pb2.AnyValue) -> str:
    """An attribute value as label text (rules in the module docs)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which in ("int_value", "string_value_strindex"):
        return str(getattr(v, which))
    if which == "double_value":
        return format_double(v.double_value)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    if which in ("array_value", "kvlist_value"):
        return json.dumps(json_value(v), separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return ""
