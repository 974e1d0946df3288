"""Decoding user config into frozen Config dataclasses, and describing them for ``headwater components``.

A Config dataclass declares its fields with type hints and defaults; a string literal right under a
field is its one-line doc (read from the source with ``ast``, so the code and the user docs are the
same text). Special field types: :data:`Duration` (``"10s"`` → seconds as float), :data:`Size`
(``"64KiB"`` → bytes as int), ``Literal[...]`` choices, ``list``/``dict``/``Optional`` and nested
Config dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import ipaddress
import itertools
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import cache
from typing import Any, Literal, NewType, Union

import yaml

Duration = NewType("Duration", float)
"""Seconds, written with a unit in YAML: ``500ms``, ``10s``, ``5m``, ``1h``."""
Size = NewType("Size", int)
"""Bytes, written with a unit: ``512B``, ``64KiB``, ``16MiB``, ``1GiB`` (KB/MB/GB are powers of 1000)."""

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h|d)\s*$")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# Range of every whole-number setting: what fits a signed 64-bit integer, so no conversion downstream
# (numpy, protobuf, C) can overflow.
INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
MAX_SIZE_BYTES = 2**50
"""The largest size a setting takes (1 PiB): far past any real buffer, queue or disk."""
MAX_DURATION_S = 3650 * 86400.0
"""The longest duration a setting takes (3650d): below the OS timeout limits (threading's is 292 years)."""
# An integer literal longer than this is out of range whatever its notation (a 64-bit integer has at
# most 64 binary digits). It is not converted: Python refuses int() past 4,300 digits and base-60
# literals (``1:30``) are computed by repeated multiplication.
_MAX_INT_LITERAL_CHARS = 1000

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(text: str) -> float:
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(
            f"{short_repr(text)} is not a duration: write a number and a unit, like 500ms, 10s, 5m or 1h"
        )
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]  # a huge number of digits gives inf
    if not seconds <= MAX_DURATION_S:
        raise ValueError(f"{short_repr(text)} is out of range: {DURATION_RANGE}")
    return seconds


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(
            f"{short_repr(text)} is not a size: write a number and a unit, like 512B, 64KiB, 16MiB or 1GiB"
        )
    # Decimal: exact for any number of digits, where float() would round or give inf.
    n = Decimal(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if n > MAX_SIZE_BYTES:
        raise ValueError(f"{short_repr(text)} is out of range: {SIZE_RANGE}")
    return int(n)


def format_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if seconds >= factor and math.isclose(seconds / factor, round(seconds / factor)):
            return f"{round(seconds / factor)}{unit}"
    return f"{seconds}s"


def format_size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n >= _SIZE_UNITS[unit] and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return f"{n}B"


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:8125``, ``[::1]:8125``, ``localhost:8125`` → (host, port). Raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"{short_repr(text)} is not host:port (for example 127.0.0.1:8125 or [::1]:8125)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    if not host:
        raise ValueError(
            f"{short_repr(text)} has no host: write 127.0.0.1:{port_text}, "
            f"or 0.0.0.0:{port_text} for all interfaces"
        )
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {short_repr(text)} is outside 0-65535")
    return host, port


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its one-line doc), read from the source;
    a field declared in a base dataclass has the doc written there unless the class redeclares it."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    stmts = body.body
    for stmt, nxt in itertools.pairwise(stmts):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp: Any) -> str:
    """How a field type is shown to users."""
    optional, inner = _is_optional(tp)
    if optional:
        return type_name(inner) + " (optional)"
    if tp is Duration:
        return "duration"
    if tp is Size:
        return "size"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"map of {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def format_default(value: Any, tp: Any) -> str:
    if value is None:
        return "unset"
    _, tp = _is_optional(tp)
    if tp is Duration:
        return format_duration(value)
    if tp is Size:
        return format_size(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        item_tp = args[0] if args else None
        return "[" + ", ".join(format_default(v, item_tp) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def yaml_key(f: dataclasses.Field[Any]) -> str:
    """The key users write for a field: its name, or ``metadata={"key": ...}`` when the YAML word is a
    Python keyword (``for``)."""
    key = f.metadata.get("key") if f.metadata else None
    return str(key) if key else f.name


class Decoder:
    """Turns plain YAML data into a Config dataclass, collecting every problem with its path."""

    def __init__(self, line_of: Callable[[tuple[str, ...]], int | None]) -> None:
        self.errors: list[tuple[tuple[str, ...], str]] = []
        self._line_of = line_of

    def error(self, path: tuple[str, ...], message: str) -> None:
        self.errors.append((path, message))

    def decode(self, cls: type, data: Any, path: tuple[str, ...]) -> Any:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.error(path, f"expected a mapping of settings, got {_describe(data)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
        values: dict[str, Any] = {}
        for key, raw in data.items():
            key = str(key)
            if key not in fields:
                hint = _close_match(key, fields)
                self.error(path + (key,), f"unknown setting{hint}; known: {', '.join(sorted(fields))}")
                continue
            name = fields[key].name
            values[name] = self.value(hints[name], raw, path + (key,))
        for key, f in fields.items():
            if (
                f.name not in values
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                self.error(path + (key,), "required setting is missing")
        # Invalid fields fall back to their defaults so the rest still builds and validates.
        values = {k: v for k, v in values.items() if v is not _INVALID}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            self.error(path, str(exc))
            return None

    def value(self, tp: Any, raw: Any, path: tuple[str, ...]) -> Any:
        optional, inner = _is_optional(tp)
        if raw is None:
            if optional:
                return None
            self.error(path, "a value is required here")
            return _INVALID
        tp = inner
        if isinstance(raw, EnvText):
            raw = str(raw) if tp is str else raw.scalar()
        try:
            if isinstance(raw, OutOfRangeInt) and tp in (int, float, Size, Duration):
                raise ValueError(
                    f"the {len(raw):,}-character number {raw[:12]}… is out of range: {_RANGES[tp]}"
                )
            if tp is Duration:
                if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw == 0:
                    return 0.0
                if not isinstance(raw, str):
                    raise ValueError(
                        f"{short_repr(raw)} is not a duration: write it with a unit, like 10s or 500ms"
                    )
                return parse_duration(raw)
            if tp is Size:
                if isinstance(raw, int) and not isinstance(raw, bool):
                    if not 0 <= raw <= MAX_SIZE_BYTES:
                        raise ValueError(f"{raw} is out of range: {SIZE_RANGE}")
                    return raw
                if not isinstance(raw, str):
                    raise ValueError(
                        f"{short_repr(raw)} is not a size: write it with a unit, like 64KiB or 1GiB"
                    )
                return parse_size(raw)
            origin = typing.get_origin(tp)
            if origin is Literal:
                choices = typing.get_args(tp)
                if raw not in choices:
                    raise ValueError(f"{short_repr(raw)} is not one of: {', '.join(map(str, choices))}")
                return raw
            if origin in (list, tuple):
                if not isinstance(raw, list):
                    raise ValueError(f"expected a list, got {_describe(raw)}")
                item_tp = typing.get_args(tp)[0]
                items = [self.value(item_tp, v, path + (str(i),)) for i, v in enumerate(raw)]
                return _INVALID if any(i is _INVALID for i in items) else tuple(items)
            if origin is dict:
                if not isinstance(raw, Mapping):
                    raise ValueError(f"expected a mapping, got {_describe(raw)}")
                _, val_tp = typing.get_args(tp)
                out = {str(k): self.value(val_tp, v, path + (str(k),)) for k, v in raw.items()}
                return _INVALID if any(v is _INVALID for v in out.values()) else types.MappingProxyType(out)
            if dataclasses.is_dataclass(tp):
                result = self.decode(tp, raw, path)  # type: ignore[arg-type]
                return _INVALID if result is None else result
            if tp is bool:
                if not isinstance(raw, bool):
                    raise ValueError(f"expected true or false, got {_describe(raw)}")
                return raw
            if tp is int:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise ValueError(f"expected a whole number, got {_describe(raw)}")
                if not INT_MIN <= raw <= INT_MAX:
                    raise ValueError(f"{short_repr(raw)} is out of range: {INT_RANGE}")
                return raw
            if tp is float:
                if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                    raise ValueError(f"expected a number, got {_describe(raw)}")
                # Checked as an int first: float() of a huge int raises OverflowError.
                in_range = INT_MIN <= raw <= INT_MAX if isinstance(raw, int) else math.isfinite(raw)
                if not in_range:
                    raise ValueError(f"{short_repr(raw)} is out of range: {FLOAT_RANGE}")
                return float(raw)
            if tp is str:
                if isinstance(raw, (dict, list)):
                    raise ValueError(f"expected a string, got {_describe(raw)}")
                return raw if isinstance(raw, str) else _scalar_text(raw)
        except ValueError as exc:
            self.error(path, str(exc))
            return _INVALID
        raise TypeError(f"unsupported config field type {tp!r} at {'::'.join(path)}")


_INVALID: Any = object()

INT_RANGE = f"a whole number here must be between {INT_MIN} and {INT_MAX}"
FLOAT_RANGE = f"a number here must be finite, between {INT_MIN} and {INT_MAX}"
SIZE_RANGE = f"a size must be between 0B and {format_size(MAX_SIZE_BYTES)}"
DURATION_RANGE = f"a duration must be between 0s and {MAX_DURATION_S / 86400:.0f}d"
_RANGES = {int: INT_RANGE, float: FLOAT_RANGE, Size: SIZE_RANGE, Duration: DURATION_RANGE}


class OutOfRangeInt(str):
    """An integer literal too long to be any setting's value, kept as its text: a text setting takes it
    as written; a number, size or duration setting reports it out of range."""

    __slots__ = ()


class SafeConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that an integer literal too long for any setting becomes an
    :class:`OutOfRangeInt` instead of being converted (which raises past 4,300 digits, or takes
    quadratic time for base-60 literals)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        if isinstance(text, str) and len(text) > _MAX_INT_LITERAL_CHARS:
            return OutOfRangeInt(text)
        return super().construct_yaml_int(node)


SafeConfigLoader.add_constructor("tag:yaml.org,2002:int", SafeConfigLoader.construct_yaml_int)


class EnvText(str):
    """A setting whose whole value came from ``${env:...}``. A string setting takes the text exactly
    (a token ``0123`` or ``yes`` stays text); any other setting reads it as a YAML scalar, so
    ``${env:PORT}`` fills a number and ``${env:DEBUG}`` a boolean."""

    __slots__ = ()

    def scalar(self) -> Any:
        text = str(self)
        if not text:
            return text
        try:
            parsed = yaml.load(text, Loader=SafeConfigLoader)
        except Exception:  # any text YAML cannot read as one value (even nested too deep) stays text
            return text
        return parsed if isinstance(parsed, (str, int, float, bool)) else text


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must not repeat a megabyte of input."""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _scalar_text(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)


def _describe(raw: Any) -> str:
    if isinstance(raw, Mapping):
        return "a mapping"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    return f"{type(raw).__name__} {short_repr(raw)}"


def _close_match(key: str, known: Mapping[str, Any]) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and doc of each field of a Config class, nested ones expanded (``components``)."""
    out: list[dict[str, Any]] = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        entry: dict[str, Any] = {
            "name": yaml_key(f),
            "type": type_name(tp),
            "default": "required" if default is dataclasses.MISSING else format_default(default, tp),
            "doc": docs.get(f.name, ""),
        }
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            entry["fields"] = describe_fields(inner)  # type: ignore[arg-type]
            entry["default"] = ""
        else:
            element = _element_config(inner)
            if element is not None:  # a list or map of objects (rules, routes): each one's fields
                entry["fields"] = describe_fields(element)
        out.append(entry)
    return out


def _element_config(tp: Any) -> type | None:
    """The Config class of the entries of a list (or tuple) or map of them, else None."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
    elif origin is dict:
        args = typing.get_args(tp)[1:]
    else:
        return None
    element = args[0] if args else None
    _, element = _is_optional(element)
    return element if isinstance(element, type) and dataclasses.is_dataclass(element) else None
