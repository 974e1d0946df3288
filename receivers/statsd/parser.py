"""StatsD / DogStatsD: the dialect Headwater accepts and how it is aggregated.

Packets and lines
-----------------
A packet (one datagram, or a chunk of whole lines from a stream) holds lines separated by ``\\n``.
Empty lines are ignored and a trailing newline is harmless. Every line stands alone: a bad line is
refused with a reason (below) and the rest of the packet still counts.

Metric lines
------------
``name:value|type[|@rate][|#tags][|c:container][|T<unix seconds>]``; the fields after the type come in
any order and unknown fields are ignored (DogStatsD forward compatibility). An empty field
(``foo:1|c|``, ``foo:1|c||#a:b``) refuses the line (``empty_field``), and so does a bare ``c``
(``foo:1|c|#a:b|c``: a container id without its ``:``, ``invalid_container_id``), as in
statsd_exporter and the Datadog agent. Types:

``c`` counter
    Summed per series per interval, each value multiplied by 1/rate. Negative increments are refused
    (``negative_counter``): a Prometheus counter never decreases. Emitted as a delta monotonic sum.
``g`` gauge
    The last value wins. A leading ``+`` or ``-`` makes the value a delta applied to the previous value
    (0 if none), so setting a negative gauge takes ``name:0|g`` first (etsy semantics). The previous
    value outlives the interval, so deltas sent in later intervals apply to it; a gauge not updated for
    ``gauge_idle_flushes`` flushes is forgotten (and at most ``max_series`` previous values are kept;
    past that the longest idle go first). Only gauges updated in an interval are emitted. The sample
    rate is checked but otherwise ignored.
``ms`` timer, ``h`` histogram, ``d`` distribution
    All values of the interval become one exponential histogram per series, each weighted by 1/rate
    (exact count, sum, min and max). Timer values are converted from milliseconds to **seconds** and
    carry the unit ``s``; ``h`` and ``d`` values are unit-less and the two types are one (``x:1|h``
    and ``x:2|d`` feed one histogram). A series sent both as ``ms`` and as ``h``/``d`` is two series.
    A value whose weight would overflow the sum (``1e308`` at ``@0.5``) is refused. More than 8,192
    values of one series in one interval are folded into its histogram as they come, so memory stays
    bounded.
``s`` set
    The number of distinct members per interval, emitted as a gauge with unit ``1``. The member is
    everything between the first ``:`` and the first ``|`` (sets take no value packing). Members are
    kept as 64-bit hashes (~70 bytes each, whatever their length; two distinct members count as one
    with odds ~2^-64). At most ``max_set_members`` distinct members per set and
    ``max_set_members_total`` over all sets per interval; new ones beyond either are refused
    (``set_member_limit``), members already seen still count.

Counters, gauges, sets, timers and histograms are separate series even with the same name and tags.

Values are strict: ASCII, optional sign, digits, optional fraction and exponent. ``1_000``, `` 42 ``,
``nan``, ``inf``, ``1e400`` (overflows) and non-ASCII digits are refused (``invalid_value``), as is a
counter or gauge total that overflows. DogStatsD 1.1 value packing ``name:1:2:3|ms`` works for every
type but sets; each value counts as one accepted value, and one bad value refuses the whole line.

``@rate`` must be a strict number in (0, 1]; anything else refuses the line (``invalid_sample_rate``).

Tags and series identity
------------------------
DogStatsD tags ``|#k:v,k2,k3:v:with:colons`` split on the first ``:``; a bare tag ``k`` becomes label
``k`` with an empty value; empty entries between commas are skipped; on duplicate keys the last wins.
``|c:<id>`` adds the label ``container.id`` (an empty id is refused). Tags named in the metric name are
accepted in the statsd_exporter styles, one style per line:

- Librato ``name#k=v,k2=v2:...``
- InfluxDB ``name,k=v,k2=v2:...``
- SignalFX ``name[k=v,k2=v2]rest:...`` (the metric name is ``namerest``)

Embedded tags are lenient, as in statsd_exporter: the line is kept and each tag error is counted in
``StatsdAggregator.tag_errors`` by reason (``TAG_ERROR_REASONS``). A tag without a key, ``=`` or value
(``foo.[tag1,tag2]test``, ``r,a=1,,b=2``) is dropped (``malformed_tag``, one per tag); no tags at all
(``foo.[]test``, ``name#``, ``name,``) is fine and counts nothing. With one SignalFX bracket missing
(``[tag1=bar,tag2=bazfoo.test``, ``tag1=bar,tag2=baz]foo.test``) no tags are taken and the name is kept as
written, ``,`` and ``=`` included (``unbalanced_brackets``, one per line; the Prometheus edge sanitises
the name like any other). ``]`` before ``[``, or a second pair of brackets, still refuses the line
(``invalid_tag``). Mixing two styles, or an embedded style with ``|#`` tags, refuses the line
(``mixed_tag_styles``); a name kept whole for a missing bracket takes ``|#`` tags. A series is its name
plus its labels sorted by name: tag order does not make a new series, and ``foo,a=1`` and ``foo|#a:1`` are
the same series. Names and tags must be valid UTF-8, and names and tag keys hold no control character
(U+0000-U+001F, U+007F: ``control_character``; tag values may, the Prometheus exporter writes them
escaped). The size limits of ``agent/limits.py`` (the receiver's ``limits:`` block) apply to the name left
after embedded tags are taken out, to the labels (tags, embedded tags and ``container.id``) and to their
total: ``name_too_long``, ``too_many_labels``, ``label_name_too_long``, ``label_value_too_long``,
``series_too_large``. At most ``max_series`` series exist per interval (all types together); lines for new
series beyond that are refused (``series_limit``), lines for existing series still count.

Timestamps
----------
``|T<unix seconds>`` (DogStatsD 1.3) on counters and gauges sets the point's time to T instead of the
interval end, and the line goes to its own slot (one point per series per T). T must be an unsigned
integer (else ``invalid_timestamp``) within [now - 1 h, now + 10 min] (else ``timestamp_out_of_range``).
A timestamped counter's delta covers the interval length ending at T. On other types ``T`` is ignored.
Gauge deltas apply, in arrival order, to the series' previous value whatever the timestamps.

Events and service checks
-------------------------
``_e{<title bytes>,<text bytes>}:title|text[|d:ts][|h:host][|p:low|normal][|t:info|warning|error|success]
[|k:key][|s:source][|#tags][|c:container]``: the byte lengths delimit title and text, so either may
contain ``|``; ``\\n`` (backslash, n) in them becomes a newline. ``_sc|name|status[|d:ts][|h:host][|#tags]
[|c:container][|m:message]``: status 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; ``m:`` comes last and takes
the rest of the line (``|`` included, ``\\n`` unescaped). Timestamps ``d:`` are unsigned integer unix
seconds. Unknown fields are ignored; bad known fields refuse the line (``invalid_event``,
``invalid_service_check``); their tags follow the rules and limits of metric tags (``invalid_utf8``,
``control_character`` and the limit reasons are named as such). Valid ones wait in
``StatsdAggregator.events`` (at most 10,000 and 8 MiB of lines; more are refused as ``event_limit``)
until the receiver takes them; each counts as one accepted value.

Refusal reasons
---------------
``malformed_line`` no ``name:value`` shape (also a ``|`` before the first ``:``); ``invalid_type`` type
missing or not one of c g ms h d s; ``invalid_value``; ``negative_counter``; ``invalid_sample_rate``;
``empty_name``; ``invalid_utf8`` (name, tags, event or check text); ``invalid_tag`` (an empty DogStatsD
tag key, ``]`` before ``[``, two bracket pairs, a second Librato ``#``); ``mixed_tag_styles``;
``invalid_container_id`` (empty, or a bare ``c``); ``empty_field``; ``invalid_timestamp``;
``timestamp_out_of_range``; ``invalid_event``; ``invalid_service_check``; ``event_limit``;
``series_limit``; ``set_member_limit``; ``control_character``; and the size limits ``name_too_long``,
``too_many_labels``, ``label_name_too_long``, ``label_value_too_long``, ``series_too_large``.

Implementation
--------------
This module parses; ``aggregator.py`` aggregates. ``StatsdAggregator.feed()`` (in ``aggregator.py``) is
the hot path (0.4–0.8 µs, 5k–10k instructions, per typical line on CPython 3.11; see
``bench/parser_cost.py``): two ``partition`` calls cut a line into name, value and tail, and (name, tail)
finds a cached descriptor — canonical series key, type, 1/rate — so tags are neither parsed nor sorted
again and nothing is decoded; the value goes into a dict keyed by bytes or an ``array('d')``. Anything
unusual (packing, ``|T``, events, a first-seen spelling, a tag error, any error) takes
``LineParser.parse``, the straightforward complete parser, which also names the refusal reason; the fast
path only ever accepts lines that this parser accepts with the same result. Names and tags are checked
(UTF-8, control characters, size limits) when a spelling is first described, so those checks cost the fast
path nothing. Packed values are converted with one ``map(float, ...)`` after one ``translate`` of the
whole value (~0.1 µs a value: 30,000 values in a 60 KB line ~3 ms), value by value only when one is bad,
to name the reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from agent.limits import CONTROL_CHARACTER, SERIES_TOO_LARGE, SeriesLimits
from agent.limits import REASONS as LIMIT_REASONS
from agent.model import Labels

_log = logging.getLogger(__name__)

MALFORMED_LINE = "malformed_line"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
NEGATIVE_COUNTER = "negative_counter"
INVALID_SAMPLE_RATE = "invalid_sample_rate"
EMPTY_NAME = "empty_name"
INVALID_UTF8 = "invalid_utf8"
INVALID_TAG = "invalid_tag"
MIXED_TAG_STYLES = "mixed_tag_styles"
INVALID_CONTAINER_ID = "invalid_container_id"
INVALID_TIMESTAMP = "invalid_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
INVALID_EVENT = "invalid_event"
INVALID_SERVICE_CHECK = "invalid_service_check"
EVENT_LIMIT = "event_limit"
SERIES_LIMIT = "series_limit"
SET_MEMBER_LIMIT = "set_member_limit"
EMPTY_FIELD = "empty_field"

MALFORMED_TAG = "malformed_tag"
UNBALANCED_BRACKETS = "unbalanced_brackets"
TAG_ERROR_REASONS = (MALFORMED_TAG, UNBALANCED_BRACKETS)
"""Every reason ``StatsdAggregator.tag_errors`` may hold: a tag dropped from a line that was kept."""

REFUSAL_REASONS = (
    MALFORMED_LINE, INVALID_TYPE, INVALID_VALUE, NEGATIVE_COUNTER, INVALID_SAMPLE_RATE, EMPTY_NAME,
    INVALID_UTF8, INVALID_TAG, MIXED_TAG_STYLES, INVALID_CONTAINER_ID, INVALID_TIMESTAMP,
    TIMESTAMP_OUT_OF_RANGE, INVALID_EVENT, INVALID_SERVICE_CHECK, EVENT_LIMIT, SERIES_LIMIT,
    SET_MEMBER_LIMIT, EMPTY_FIELD, CONTROL_CHARACTER, *LIMIT_REASONS,
)  # fmt: skip
"""Every reason ``StatsdAggregator.refused`` may hold, for self-metrics that start at zero."""

DEFAULT_LIMITS = SeriesLimits()
_MAX_CACHED_SPELLING = 8192
"""Longer raw spellings (e.g. a tag repeated 1,000 times) are parsed each time, never cached: the
caches hold at most ``cache_max`` spellings of this size."""
_find_control = re.compile(rb"[\x00-\x1f\x7f]").search
"""The first control character (C0 or DEL) in bytes, or None: ``agent.limits.find_control`` for bytes."""
_PASSED_ON = frozenset((INVALID_UTF8, CONTROL_CHARACTER, *LIMIT_REASONS))
"""Reasons an event or service check is refused with as such, not as ``invalid_event``/``_service_check``."""
TIMESTAMP_PAST_S = 3600
TIMESTAMP_FUTURE_S = 600
CONTAINER_LABEL = b"container.id"

NAME_SEP = b"\xff"
PAIR_SEP = b"\xfe"
KV_SEP = b"\xfd"
"""The separators of a canonical series key (see ``aggregator.py``): never in valid UTF-8."""

NUMERIC = b"0123456789.+-eE"
"""Bytes a value may contain; whatever ``translate`` leaves after deleting them makes the value bad."""
_PACKED = NUMERIC + b":"
"""...and a packed value (``1:2:3``)."""
_MAX_TS_S = 9_223_372_036
"""Largest unix second whose nanoseconds fit an int64."""
_RATE_CACHE_MAX = 256

COUNTER, TIMER, HISTOGRAM, GAUGE, SET = range(5)
"""Type codes: ``c``, ``ms``, ``h`` and ``d``, ``g``, ``s`` (ordered so ``feed`` tests ranges)."""
_TYPE_CODES = {b"c": COUNTER, b"g": GAUGE, b"ms": TIMER, b"h": HISTOGRAM, b"d": HISTOGRAM, b"s": SET}

Descriptor = tuple[bytes, int, float]
"""(canonical series key, type code, 1/rate) of a cached line spelling."""


def strict_float(raw: bytes) -> float | None:
    """The finite float ``raw`` spells in plain ASCII notation, or None."""
    if raw.translate(None, NUMERIC):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if value - value:  # inf - inf is nan, which is truthy; NaN cannot get past translate
        return None
    return value


@dataclass(frozen=True, slots=True)
class StatsdEvent:
    """A DogStatsD event (``_e{...}``), to become a log record."""

    title: str
    text: str
    timestamp_s: int | None
    """``d:`` unix seconds; None when the client sent none (use the arrival time)."""
    hostname: str
    aggregation_key: str
    priority: str
    """``normal`` (default) or ``low``."""
    alert_type: str
    """``info`` (default), ``warning``, ``error`` or ``success``."""
    source_type_name: str
    labels: Labels


@dataclass(frozen=True, slots=True)
class StatsdServiceCheck:
    """A DogStatsD service check (``_sc|...``), to become a log record."""

    name: str
    status: int
    """0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    timestamp_s: int | None
    hostname: str
    message: str
    labels: Labels


class MetricLine(NamedTuple):
    """One parsed metric line (slow path only)."""

    canon: bytes
    code: int
    """COUNTER, GAUGE, TIMER, HISTOGRAM or SET."""
    values: list[float]
    """Counters: already multiplied by 1/rate. Timers: already in seconds."""
    deltas: list[bool]
    """Gauges: whether each value is a +/- delta."""
    inv_rate: float
    timestamp_s: int | None
    member: bytes
    tag_errors: tuple[str, ...] = ()
    """A TAG_ERROR_REASONS entry per embedded tag dropped (the line itself is kept)."""


def _packed_values(
    value: bytes, raws: list[bytes], code: int, inv: float
) -> tuple[list[float], list[bool]] | None:
    """``parse``'s values and deltas for a packed line, in C-level passes over the whole line (the value
    by value loop costs ~0.17 µs a value, so 30,000 of them held the loop 5 ms); None when any value is
    bad, and ``parse`` then names the reason. Gives exactly what the loop gives: after the translate
    only digits, signs, dots, exponents and colons are left, where ``float`` is ``strict_float``; min
    and max find an overflow (inf; NaN cannot be spelled), a negative counter, an overflowing weight."""
    if value.translate(None, _PACKED):
        return None
    try:
        values = list(map(float, raws))
    except ValueError:
        return None
    low, high = min(values), max(values)
    if low - low or high - high:
        return None
    if code == COUNTER:
        if low < 0.0:
            return None
        if inv != 1.0:
            values = [v * inv for v in values]
            high = max(values)
            if high - high:
                return None
        return values, []
    if code == GAUGE:
        return values, [raw[0] in b"+-" for raw in raws]
    if code == TIMER:
        values = [v / 1000.0 for v in values]
        low, high = low / 1000.0, high / 1000.0  # x / 1000 is monotonic: still the min and max
    if inv != 1.0:
        widest = max(-low, high) * inv
        if widest - widest:
            return None
    return values, []


def _unescape(raw: bytes) -> str:
    return raw.decode().replace("\\n", "\n")


class LineParser:
    """The complete, readable parser, and the caches the fast path shares with it.

    ``descriptors`` maps what a metric line spells apart from its value — the raw name and everything
    after the value's ``|`` (type, rate, tags, container) — to ``(canonical key, type code, 1/rate)``.
    So names and tags are validated and tag order canonicalised once per spelling, not once per line.
    ``_suffixes`` caches raw ``#`` fields → the canonical label part of a series key (one bytes object
    per distinct field: caching the decomposed pairs cost ~0.5 KB per series with 100k series),
    ``rates`` raw ``@`` fields → 1/rate. Every cache is bounded: when one is full it is cleared and
    refills from traffic.
    """

    __slots__ = ("_cache_max", "_clock_s", "_limits", "_suffixes", "descriptors", "rates")

    def __init__(
        self, *, cache_max: int, clock_s: Callable[[], float], limits: SeriesLimits = DEFAULT_LIMITS
    ) -> None:
        self.descriptors: dict[tuple[bytes, bytes], Descriptor] = {}
        self.rates: dict[bytes, float] = {}
        self._suffixes: dict[bytes, bytes | str] = {}
        self._cache_max = cache_max
        self._clock_s = clock_s
        self._limits = limits

    # -- fields ------------------------------------------------------------------------------------
    def rate(self, field: bytes) -> float | None:
        """1/rate for a raw ``@rate`` field, or None if the rate is not a number in (0, 1]."""
        inv = self.rates.get(field)
        if inv is not None:
            return inv
        rate = strict_float(field[1:])
        if rate is None or not 0.0 < rate <= 1.0:
            return None
        inv = 1.0 / rate
        if inv - inv:  # a subnormal rate: 1/rate overflows
            return None
        if len(self.rates) >= _RATE_CACHE_MAX:
            self.rates.clear()
        self.rates[field] = inv
        return inv

    def describe(
        self, name: bytes, tail: bytes
    ) -> tuple[bytes, int, float, bytes | None, tuple[str, ...]] | str:
        """For a metric line ``name:value|tail``: (canonical key, type code, 1/rate, ``T`` field or
        None, tag errors), or a refusal reason. Not cached; see ``descriptor``."""
        fields = tail.split(b"|")
        code = _TYPE_CODES.get(fields[0])
        if code is None:
            return INVALID_TYPE
        inv = 1.0
        tags: bytes | None = None
        container: bytes | None = None
        ts_field: bytes | None = None
        for i in range(1, len(fields)):
            field = fields[i]
            if not field:
                return EMPTY_FIELD
            first = field[0]
            if first == 35:  # '#'
                tags = field
            elif first == 64:  # '@'
                rate = self.rate(field)
                if rate is None:
                    return INVALID_SAMPLE_RATE
                inv = rate
            elif first == 99:  # 'c'
                if len(field) == 1:  # a bare 'c': a container id without its ':'
                    return INVALID_CONTAINER_ID
                if field[1] == 58:  # 'c:'
                    container = field
            elif first == 84:  # 'T'
                ts_field = field
        tag_errors: list[str] = []
        canon = self.series(name, tags, container, tag_errors)
        if isinstance(canon, str):
            return canon
        return canon, code, inv, ts_field, tuple(tag_errors)

    def descriptor(self, key: tuple[bytes, bytes]) -> Descriptor | None:
        """The cached descriptor for ``key`` = (name, tail), computing it on a miss; None when the
        line needs the slow path (a refusal, a ``T`` field or a tag error: never cached, so each line
        is counted)."""
        found = self.descriptors.get(key)
        if found is not None:
            return found
        described = self.describe(*key)
        if isinstance(described, str) or described[3] is not None or described[4]:
            return None
        if len(key[0]) + len(key[1]) > _MAX_CACHED_SPELLING:
            return described[:3]
        if len(self.descriptors) >= self._cache_max:
            self.descriptors.clear()
        found = self.descriptors[key] = described[:3]
        return found

    def series(
        self, name: bytes, tags: bytes | None, container: bytes | None, tag_errors: list[str]
    ) -> bytes | str:
        """The canonical series key of a raw name, ``#`` field and ``c:`` field, or a refusal reason;
        appends to ``tag_errors`` a reason per embedded tag dropped."""
        if not name:
            return EMPTY_NAME
        if b"|" in name or name.startswith(b"_e{"):
            return MALFORMED_LINE
        try:
            name.decode()
        except UnicodeDecodeError:
            return INVALID_UTF8
        labels: dict[bytes, bytes] = {}
        embedded = b"[" in name or b"]" in name or b"#" in name or b"," in name
        if embedded:
            stripped = _embedded_tags(name, labels, tag_errors)
            if isinstance(stripped, str):
                return stripped
            embedded = len(stripped) < len(name)  # one bracket alone: the name stays as written
            name = stripped
            if not name:
                return EMPTY_NAME
        if _find_control(name):
            return CONTROL_CHARACTER
        limits = self._limits
        if tags is not None and len(tags) > 1:
            if embedded:
                return MIXED_TAG_STYLES
            if container is None:  # the common case: the tags field alone makes the label part
                reason = limits.check(name, ())
                if reason is not None:
                    return reason
                suffix = self._tag_suffix(tags)
                if isinstance(suffix, str):
                    return suffix
                if not suffix:
                    return name
                # name + the label bytes: the suffix less its two separators per label, plus one
                if len(name) + len(suffix) + 1 - 2 * suffix.count(KV_SEP) > limits.max_series_bytes:
                    return SERIES_TOO_LARGE
                return name + NAME_SEP + suffix
            pairs = self._tag_pairs(tags)
            if isinstance(pairs, str):
                return pairs
            labels.update(pairs)
        if container is not None:
            ident = container[2:]
            if not ident:
                return INVALID_CONTAINER_ID
            try:
                ident.decode()
            except UnicodeDecodeError:
                return INVALID_UTF8
            labels[CONTAINER_LABEL] = ident
        reason = limits.check(name, labels.items()) or _control_in_keys(labels)
        if reason is not None:
            return reason
        if not labels:
            return name
        return name + NAME_SEP + PAIR_SEP.join(k + KV_SEP + v for k, v in sorted(labels.items()))

    @staticmethod
    def _tag_pairs(field: bytes) -> tuple[tuple[bytes, bytes], ...] | str:
        """Key/value pairs of a ``#k:v,k2`` field (duplicates resolved, last wins), or a reason."""
        try:
            field.decode()
        except UnicodeDecodeError:
            return INVALID_UTF8
        return _dogstatsd_tags(field[1:])

    def _tag_suffix(self, field: bytes) -> bytes | str:
        """The sorted ``k=v`` part of a series key for a ``#`` field (b"" if it has no tags), or a reason
        (the tags alone over a limit, a control character in a key)."""
        cached = self._suffixes.get(field)
        if cached is not None:
            return cached
        pairs = self._tag_pairs(field)
        result: bytes | str
        if isinstance(pairs, str):
            result = pairs
        else:
            reason = self._limits.check(b"", pairs) or _control_in_keys(pairs)
            result = reason or PAIR_SEP.join(k + KV_SEP + v for k, v in sorted(pairs))
        if len(field) <= _MAX_CACHED_SPELLING:
            if len(self._suffixes) >= self._cache_max:
                self._suffixes.clear()
            self._suffixes[field] = result
        return result

    def timestamp(self, field: bytes) -> int | str:
        """Seconds from a ``T<unix seconds>`` field, or a refusal reason."""
        digits = field[1:]
        if not digits.isdigit():  # bytes.isdigit is ASCII-only
            return INVALID_TIMESTAMP
        now = self._clock_s()
        if len(digits) > 12:
            return TIMESTAMP_OUT_OF_RANGE
        ts = int(digits)
        if not now - TIMESTAMP_PAST_S <= ts <= now + TIMESTAMP_FUTURE_S:
            return TIMESTAMP_OUT_OF_RANGE
        return ts

    # -- lines -------------------------------------------------------------------------------------
    def parse(self, line: bytes) -> MetricLine | StatsdEvent | StatsdServiceCheck | str:
        """Parse one non-empty line completely; a str result is the refusal reason."""
        if line.startswith(b"_e{"):
            return self.parse_event(line)
        if line.startswith(b"_sc|"):
            return self.parse_service_check(line)
        name, sep, rest = line.partition(b":")
        if not sep or b"|" in name:
            return MALFORMED_LINE
        value, bar, tail = rest.partition(b"|")
        if not bar:
            return INVALID_TYPE
        described = self.describe(name, tail)
        if isinstance(described, str):
            return described
        canon, code, inv, ts_field, tag_errors = described
        ts: int | None = None
        if ts_field is not None and code in (COUNTER, GAUGE):
            parsed = self.timestamp(ts_field)
            if isinstance(parsed, str):
                return parsed
            ts = parsed
        if code == SET:
            if not value:
                return INVALID_VALUE
            return MetricLine(canon, code, [], [], inv, None, value, tag_errors)
        raws = value.split(b":")
        if len(raws) > 1:
            packed = _packed_values(value, raws, code, inv)
            if packed is not None:
                return MetricLine(canon, code, packed[0], packed[1], inv, ts, b"", tag_errors)
        values: list[float] = []
        deltas: list[bool] = []
        for raw in raws:  # one value, or a packed line with a bad value: this names the reason
            parsed_value = strict_float(raw)
            if parsed_value is None:
                return INVALID_VALUE
            if code == COUNTER:
                if parsed_value < 0.0:
                    return NEGATIVE_COUNTER
                parsed_value *= inv
                if parsed_value - parsed_value:
                    return INVALID_VALUE
            elif code == GAUGE:
                deltas.append(raw[0] == 43 or raw[0] == 45)  # '+' or '-'
            else:
                if code == TIMER:
                    parsed_value /= 1000.0
                if parsed_value * inv - parsed_value * inv:  # the weighted value would overflow the sum
                    return INVALID_VALUE
            values.append(parsed_value)
        return MetricLine(canon, code, values, deltas, inv, ts, b"", tag_errors)

    def parse_event(self, line: bytes) -> StatsdEvent | str:
        """``_e{<title bytes>,<text bytes>}:title|text|...``, or a refusal reason."""
        close = line.find(b"}", 3)
        if close < 0:
            return INVALID_EVENT
        title_len_raw, comma, text_len_raw = line[3:close].partition(b",")
        if (
            not comma
            or not title_len_raw.isdigit()
            or not text_len_raw.isdigit()
            or len(title_len_raw) > 6
            or len(text_len_raw) > 6
        ):
            return INVALID_EVENT
        title_len, text_len = int(title_len_raw), int(text_len_raw)
        pos = close + 1
        if title_len == 0 or line[pos : pos + 1] != b":":
            return INVALID_EVENT
        pos += 1
        title = line[pos : pos + title_len]
        pos += title_len
        if len(title) < title_len or line[pos : pos + 1] != b"|":
            return INVALID_EVENT
        pos += 1
        text = line[pos : pos + text_len]
        pos += text_len
        if len(text) < text_len:
            return INVALID_EVENT
        rest = line[pos:]
        if rest and rest[0] != 124:  # '|'
            return INVALID_EVENT
        timestamp: int | None = None
        hostname = aggregation_key = source = b""
        priority = b"normal"
        alert_type = b"info"
        tags: bytes | None = None
        container: bytes | None = None
        for field in rest[1:].split(b"|") if rest else ():
            prefix = field[:2]
            if prefix == b"d:":
                timestamp = _unix_seconds(field[2:])
                if timestamp is None:
                    return INVALID_EVENT
            elif prefix == b"h:":
                hostname = field[2:]
            elif prefix == b"p:":
                priority = field[2:]
                if priority != b"normal" and priority != b"low":
                    return INVALID_EVENT
            elif prefix == b"t:":
                alert_type = field[2:]
                if alert_type not in (b"info", b"warning", b"error", b"success"):
                    return INVALID_EVENT
            elif prefix == b"k:":
                aggregation_key = field[2:]
            elif prefix == b"s:":
                source = field[2:]
            elif prefix == b"c:":
                container = field
            elif field[:1] == b"#":
                tags = field
        labels = self._labels(tags, container)
        if isinstance(labels, str):
            return labels if labels in _PASSED_ON else INVALID_EVENT
        try:
            return StatsdEvent(
                title=_unescape(title), text=_unescape(text), timestamp_s=timestamp,
                hostname=hostname.decode(), aggregation_key=aggregation_key.decode(),
                priority=priority.decode(), alert_type=alert_type.decode(),
                source_type_name=source.decode(), labels=labels,
            )
        except UnicodeDecodeError:
            return INVALID_UTF8

    def parse_service_check(self, line: bytes) -> StatsdServiceCheck | str:
        """``_sc|name|status|...|m:message``, or a refusal reason."""
        parts = line.split(b"|")
        if len(parts) < 3 or not parts[1] or parts[2] not in (b"0", b"1", b"2", b"3"):
            return INVALID_SERVICE_CHECK
        timestamp: int | None = None
        hostname = message = b""
        tags: bytes | None = None
        container: bytes | None = None
        for i in range(3, len(parts)):
            field = parts[i]
            prefix = field[:2]
            if prefix == b"m:":
                message = b"|".join(parts[i:])[2:]
                break
            if prefix == b"d:":
                timestamp = _unix_seconds(field[2:])
                if timestamp is None:
                    return INVALID_SERVICE_CHECK
            elif prefix == b"h:":
                hostname = field[2:]
            elif prefix == b"c:":
                container = field
            elif field[:1] == b"#":
                tags = field
        labels = self._labels(tags, container)
        if isinstance(labels, str):
            return labels if labels in _PASSED_ON else INVALID_SERVICE_CHECK
        try:
            return StatsdServiceCheck(
                name=parts[1].decode(), status=parts[2][0] - 48, timestamp_s=timestamp,
                hostname=hostname.decode(), message=_unescape(message), labels=labels,
            )
        except UnicodeDecodeError:
            return INVALID_UTF8

    def _labels(self, tags: bytes | None, container: bytes | None) -> Labels | str:
        """Decoded, sorted labels of an event or service check."""
        labels: dict[bytes, bytes] = {}
        if tags is not None:
            pairs = self._tag_pairs(tags)
            if isinstance(pairs, str):
                return pairs
            labels.update(pairs)
        if container is not None:
            if len(container) < 3:
                return INVALID_CONTAINER_ID
            labels[CONTAINER_LABEL] = container[2:]
        reason = self._limits.check(b"", labels.items()) or _control_in_keys(labels)
        if reason is not None:
            return reason
        try:
            return tuple((k.decode(), v.decode()) for k, v in sorted(labels.items()))
        except UnicodeDecodeError:
            return INVALID_UTF8


def _control_in_keys(pairs: Iterable[bytes] | Iterable[tuple[bytes, bytes]]) -> str | None:
    """CONTROL_CHARACTER if a label name holds one (values may: the Prometheus edge escapes them)."""
    for pair in pairs:
        key = pair if isinstance(pair, bytes) else pair[0]
        if _find_control(key):
            return CONTROL_CHARACTER
    return None


def _dogstatsd_tags(raw: bytes) -> tuple[tuple[bytes, bytes], ...] | str:
    pairs: dict[bytes, bytes] = {}
    for tag in raw.split(b","):
        if not tag:
            continue
        key, _, value = tag.partition(b":")
        if not key:
            return INVALID_TAG
        pairs[key] = value
    return tuple(pairs.items())


def _unix_seconds(raw: bytes) -> int | None:
    if not raw.isdigit() or len(raw) > 11:
        return None
    seconds = int(raw)
    return seconds if seconds <= _MAX_TS_S else None


def _embedded_tags(name: bytes, labels: dict[bytes, bytes], tag_errors: list[str]) -> bytes | str:
    """Move Librato / InfluxDB / SignalFX tags out of ``name`` into ``labels``; the bare name (``name``
    itself when one SignalFX bracket is missing), or a refusal reason. A tag without key, ``=`` or
    value is dropped with a reason appended to ``tag_errors``, as statsd_exporter does."""
    open_at, close_at = name.find(b"["), name.find(b"]")
    if open_at >= 0 or close_at >= 0:
        if (open_at < 0) != (close_at < 0):  # statsd_exporter keeps the name unparsed
            tag_errors.append(UNBALANCED_BRACKETS)
            return name
        if close_at < open_at:
            return INVALID_TAG
        inner = name[open_at + 1 : close_at]
        bare = name[:open_at] + name[close_at + 1 :]
        if b"[" in bare or b"]" in bare:
            return INVALID_TAG
        if b"#" in bare or b"," in bare:
            return MIXED_TAG_STYLES
    else:
        hash_at, comma_at = name.find(b"#"), name.find(b",")
        cut = hash_at if comma_at < 0 or 0 <= hash_at < comma_at else comma_at
        inner = name[cut + 1 :]
        bare = name[:cut]
        if b"#" in inner:  # Librato's '#' after InfluxDB's ',' mixes styles; a second '#' is just bad
            return INVALID_TAG if name[cut] == 35 else MIXED_TAG_STYLES
    if not inner:  # ``name[]rest``, ``name#``, ``name,``: no tags
        return bare
    for item in inner.split(b","):
        key, eq, value = item.partition(b"=")
        if not eq or not key or not value:
            tag_errors.append(MALFORMED_TAG)
            continue
        labels[key] = value
    return bare
