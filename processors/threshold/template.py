"""The webhook's ``body_template``: ``{{ name }}`` substitution and nothing else — no expressions, no
loops, no code — so a config can call a job API directly without making the agent run anything.

Names: ``rule``, ``status`` (firing | resolved), ``severity``, ``value``, ``starts_at`` and
``ends_at`` (RFC 3339; ``ends_at`` empty while firing), ``fingerprint``, ``labels.X``,
``annotations.X``, ``group_labels.X``, and the whole maps ``labels``, ``annotations``,
``group_labels`` (with ``| json`` only). Any other name is a config error. A missing label or
annotation renders empty (``null`` with ``| json``).

Escaping: in a JSON body (the default; any Content-Type header naming json) every value is
JSON-escaped as string content, for use inside a JSON string: ``"model": "{{ labels.model }}"``;
``{{ X | json }}`` writes X as a JSON value instead (quoted string, number, object, null), for use
outside a string: ``"score": {{ value | json }}``. The template must render to valid JSON (checked at
validation with sample values). With another Content-Type the values go in as they are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(
    r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z0-9_.\-]+))?\s*(?:\|\s*([a-z]+)\s*)?\}\}"
)
SCALARS = frozenset({"rule", "status", "severity", "value", "starts_at", "ends_at", "fingerprint"})
MAPS = frozenset({"labels", "annotations", "group_labels"})
FILTERS = frozenset({"json"})


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class _Slot:
    name: str
    key: str | None
    json_value: bool


class BodyTemplate:
    """A parsed template; :meth:`render` fills it from one alert's fields."""

    def __init__(self, text: str, *, json_body: bool = True) -> None:
        self.json_body = json_body
        parts: list[str | _Slot] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            literal = text[pos : m.start()]
            _check_literal(literal)
            parts.append(literal)
            name, key, filt = m.group(1), m.group(2), m.group(3)
            if filt is not None and filt not in FILTERS:
                raise TemplateError(f"unknown filter {filt!r} in {m.group(0)!r}: the only filter is json")
            if name in MAPS:
                if key is None and filt != "json":
                    raise TemplateError(
                        f"{m.group(0)!r}: a whole map needs '| json' ({name}.NAME is one value)"
                    )
            elif name in SCALARS:
                if key is not None:
                    raise TemplateError(f"{m.group(0)!r}: {name} has no fields")
            else:
                known = ", ".join(sorted(SCALARS | {f"{n}.X" for n in MAPS}))
                raise TemplateError(f"unknown name {name!r} in {m.group(0)!r}; known: {known}")
            parts.append(_Slot(name, key, filt == "json"))
            pos = m.end()
        _check_literal(text[pos:])
        parts.append(text[pos:])
        self._parts = tuple(parts)
        if json_body:
            sample = self.render(_SAMPLE)
            try:
                json.loads(sample)
            except ValueError as exc:
                raise TemplateError(
                    f"does not render to JSON ({exc}; rendered with sample values: {sample[:200]!r}); "
                    "put values inside quotes, or use '| json' outside them"
                ) from None

    def render(self, fields: dict[str, Any]) -> str:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = fields.get(part.name)
            if part.key is not None:
                value = value.get(part.key) if isinstance(value, dict) else None
            if part.json_value:
                out.append(json.dumps(_jsonable(value), ensure_ascii=False))
            else:
                text = "" if value is None else _text(value)
                out.append(json.dumps(text, ensure_ascii=False)[1:-1] if self.json_body else text)
        return "".join(out)


def _check_literal(text: str) -> None:
    # Only an opening: "}}" closes nested JSON objects.
    start = text.find("{{")
    if start >= 0:
        near = text[start : start + 40]
        raise TemplateError(
            f"malformed placeholder near {near!r}: use {{{{ name }}}} or {{{{ name | json }}}}"
        )


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_SAMPLE: dict[str, Any] = {
    "rule": "rule",
    "status": "firing",
    "severity": "warning",
    "value": 1.5,
    "starts_at": "2026-01-01T00:00:00.000Z",
    "ends_at": "",
    "fingerprint": "0123456789abcdef",
    "labels": {},
    "annotations": {},
    "group_labels": {},
}
