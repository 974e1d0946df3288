"""Which series a rule watches: a metric-name glob and Prometheus-style label matchers.

``{env="prod", host=~"web-.*", region!="eu", path!~"/health.*"}``: the braces are optional, matchers
are separated by commas, values are double-quoted. As in Prometheus, a missing label reads as the
empty string (``team=""`` selects series without ``team``) and regexes match the whole value. Label
names may hold the dots and dashes StatsD tags carry. Inside a value, ``\\"`` is a quote and ``\\\\`` a
backslash; any other backslash is kept as written, so ``host=~"web-\\d+"`` means what it looks like.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from agent.model import Labels

_MATCHER = re.compile(r'\s*([^\s=!~,"{}]+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_UNESCAPE = re.compile(r'\\(["\\])')


class SelectorError(ValueError):
    pass


class Selector:
    """Parsed label matchers; ``matches(labels)`` is the hot-path check (a few string compares)."""

    __slots__ = ("matchers", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.matchers: tuple[tuple[str, Callable[[str], bool]], ...] = tuple(_parse(text))

    def matches(self, labels: Labels) -> bool:
        if not self.matchers:
            return True
        present = dict(labels)
        return all(check(present.get(name, "")) for name, check in self.matchers)


def _parse(text: str) -> list[tuple[str, Callable[[str], bool]]]:
    body = text.strip()
    if body.startswith("{"):
        if not body.endswith("}"):
            raise SelectorError(f"{text!r}: an opening brace needs a closing one")
        body = body[1:-1]
    out: list[tuple[str, Callable[[str], bool]]] = []
    pos = 0
    while body[pos:].strip():
        m = _MATCHER.match(body, pos)
        if m is None:
            raise SelectorError(
                f"{text!r}: cannot read a matcher at {body[pos:].strip()[:30]!r}; "
                'write label="value", label!="value", label=~"regex" or label!~"regex", comma-separated'
            )
        name, op, raw, sep = m.groups()
        value = _UNESCAPE.sub(r"\1", raw)
        out.append((name, _check(op, value, text)))
        pos = m.end()
        if not sep and body[pos:].strip():
            raise SelectorError(f"{text!r}: matchers are separated by commas")
    return out


def _check(op: str, value: str, text: str) -> Callable[[str], bool]:
    if op == "=":
        return value.__eq__
    if op == "!=":
        return value.__ne__
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise SelectorError(f"{text!r}: bad regex {value!r}: {exc}") from None
    if op == "=~":
        return lambda v: pattern.fullmatch(v) is not None
    return lambda v: pattern.fullmatch(v) is None


def name_matcher(glob: str) -> Callable[[str], bool]:
    """A metric-name test: exact unless the name holds glob characters (``*``, ``?``, ``[...]``)."""
    if not any(c in glob for c in "*?["):
        return glob.__eq__
    pattern = re.compile(fnmatch.translate(glob))
    return lambda name: pattern.match(name) is not None
