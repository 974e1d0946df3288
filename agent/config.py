"""Loading and validating the agent's YAML config (OpenTelemetry Collector shape).

Order: read the file (at most MAX_CONFIG_BYTES) → parse YAML within the limits on values, aliases
and depth, keeping each node's line → expand ``${env:VAR}``, ``${env:VAR:-default}`` and ``$$`` in
every string value → apply ``--set path=value`` overrides →
decode every component's Config → validate each Config → validate the pipeline graph. Every problem
is collected with its path (``exporters::otlp/signoz::endpoint``) and line, and all are reported
together. Nothing is bound here.

Expansion happens in parsed values rather than in the raw text (as the OpenTelemetry Collector does
today): a commented-out ``${env:TOKEN}`` is not expanded, and an unset variable is reported with the
path and line of the setting that uses it. A value that is exactly one reference is re-read as a
YAML scalar, so ``port: ${env:PORT}`` gives a number.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from agent.component import ComponentId, ComponentKind, Factory, Signal, validate_config
from agent.confmodel import Decoder, Duration, EnvText, SafeConfigLoader, Size, parse_host_port, short_repr

Path = tuple[str, ...]


class ConfigError(Exception):
    """Every problem found in a config, each with its path and line; ``str()`` lists them all."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class TelemetryAuthConfig:
    bearer_token: str = ""
    """Token the tap, the status page and /api/* require (``Authorization: Bearer <token>``); required
    when the endpoint is not on a loopback address. /metrics, /healthz and /readyz stay open."""
    bearer_token_file: str = ""
    """File holding that token instead, read again when it changes."""

    def validate(self) -> list[tuple[str, str]]:
        if self.bearer_token and self.bearer_token_file:
            return [("", "set only one of bearer_token, bearer_token_file")]
        return []

    @property
    def enabled(self) -> bool:
        return bool(self.bearer_token or self.bearer_token_file)


@dataclass(frozen=True)
class TapConfig:
    redact: tuple[str, ...] = ()
    """Label and attribute names whose values the tap replaces with ``<redacted>`` (exact names)."""
    max_subscribers: int = 8
    """Tap streams open at once; one more is refused with 503."""
    rate_limit_per_s: float = 1000.0
    """Items per second one tap stream receives at most; the rest is dropped and told to it."""
    buffer: int = 1000
    """Items one tap stream holds while its client is slow to read; the rest is dropped and told."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (``http://host:port``, or ``null`` for a file:// page) whose browser pages may open the
    tap without a token. Pages of the endpoint itself and non-browser clients always may; with a
    bearer token configured, any page holding it may."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_subscribers < 0:
            problems.append(("max_subscribers", "must be 0 (the tap is off) or more"))
        if not self.rate_limit_per_s > 0:
            problems.append(("rate_limit_per_s", "must be more than 0"))
        if self.buffer < 1:
            problems.append(("buffer", "must be at least 1"))
        return problems


@dataclass(frozen=True)
class CaptureConfig:
    redact: tuple[str, ...] = ()
    """Tag, label and attribute names whose values a capture writes as ``<redacted>`` (StatsD tags, JSON
    labels, OTLP attributes). Headers, so bearer tokens, are never recorded."""
    max_bytes: Size = Size(100 * 2**20)
    """Largest capture file; a capture stops itself there (reason max_bytes). Also the most one may ask."""
    max_duration: Duration = Duration(600.0)
    """Longest capture; it stops itself then (reason max_duration). Also the most one may ask."""
    buffer_records: int = 10_000
    """Records waiting for the capture's writer thread; more are dropped, counted and marked as a gap."""
    directory: str = ""
    """Where capture files are written (empty: the system's temporary directory)."""

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_bytes < 1024:
            problems.append(("max_bytes", "must be at least 1KiB"))
        if not self.max_duration > 0:
            problems.append(("max_duration", "must be more than 0"))
        if self.buffer_records < 1:
            problems.append(("buffer_records", "must be at least 1"))
        return problems


@dataclass(frozen=True)
class TelemetryConfig:
    endpoint: str = "127.0.0.1:8888"
    """Address of the agent's own endpoint: /metrics, /healthz, /readyz, /status. Empty disables it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the agent's own logs (written to stderr)."""
    health_stall_timeout: Duration = Duration(10.0)
    """/healthz answers 503 once the agent's event loop has not run for this long (it is stuck)."""
    auth: TelemetryAuthConfig = field(default_factory=TelemetryAuthConfig)
    """Bearer token for the tap, the status page and /api/* (required when bound beyond loopback)."""
    tap: TapConfig = field(default_factory=TapConfig)
    """The live stream (/api/tap, ``headwater tap``): limits per stream and redaction."""
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    """Recording what the receivers take in (/api/capture, ``headwater capture``): limits, redaction."""

    def validate(self) -> list[tuple[str, str]]:
        problems = [(f"auth::{p}".rstrip(":"), m) for p, m in self.auth.validate()]
        problems += [(f"tap::{p}", m) for p, m in self.tap.validate()]
        problems += [(f"capture::{p}", m) for p, m in self.capture.validate()]
        if self.endpoint:
            try:
                parse_host_port(self.endpoint)
            except ValueError as exc:
                problems.append(("endpoint", str(exc)))
        return problems


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only answers on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


@dataclass(frozen=True)
class PipelineConfig:
    receivers: tuple[str, ...] = ()
    """Receiver ids feeding this pipeline, and connector ids it receives from."""
    processors: tuple[str, ...] = ()
    """Processor ids, applied in this order."""
    exporters: tuple[str, ...] = ()
    """Exporter ids, and connector ids it feeds; every batch fans out to all of them."""


@dataclass(frozen=True)
class ServiceConfig:
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    """The agent's own telemetry and logs."""
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)
    """Pipelines by id: metrics, traces or logs, optionally /name."""
    shutdown_timeout: Duration = Duration(30.0)
    """On SIGTERM/SIGINT: how long exporters may drain their queues before the agent exits."""


@dataclass(frozen=True)
class ComponentSpec:
    id: ComponentId
    kind: ComponentKind
    factory: Factory
    config: Any


@dataclass(frozen=True)
class Pipeline:
    id: str
    signal: Signal
    receivers: tuple[ComponentId, ...]
    processors: tuple[ComponentId, ...]
    exporters: tuple[ComponentId, ...]
    connectors_in: tuple[ComponentId, ...] = ()
    """Connectors listed under ``receivers``: what they make enters this pipeline."""
    connectors_out: tuple[ComponentId, ...] = ()
    """Connectors listed under ``exporters``: every batch this pipeline exports reaches them too."""


@dataclass(frozen=True)
class AgentConfig:
    receivers: dict[ComponentId, ComponentSpec]
    processors: dict[ComponentId, ComponentSpec]
    exporters: dict[ComponentId, ComponentSpec]
    service: ServiceConfig
    pipelines: tuple[Pipeline, ...]
    source: str = ""
    """The YAML text as read (for SIGHUP comparisons)."""
    connectors: dict[ComponentId, ComponentSpec] = field(default_factory=dict)
    """Connectors: each the exporter of some pipelines and the receiver of others."""


@dataclass(frozen=True)
class ConnectorUse:
    """One connector between pipelines for one (input, output) signal pair its factory supports: the
    service runs one instance of it, fed by ``upstream`` and feeding ``downstream`` (pipeline ids)."""

    id: ComponentId
    input: Signal
    output: Signal
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]


def connector_uses(config: AgentConfig) -> list[ConnectorUse]:
    """Every (connector, input signal, output signal) the pipelines use that its factory supports, in
    the order the connectors are defined (the Collector's connector nodes)."""
    uses = []
    for cid, spec in config.connectors.items():
        upstream = [p for p in config.pipelines if cid in p.connectors_out]
        downstream = [p for p in config.pipelines if cid in p.connectors_in]
        for x in Signal:
            for y in Signal:
                if (x, y) not in spec.factory.signal_pairs:
                    continue
                ups = tuple(p.id for p in upstream if p.signal is x)
                downs = tuple(p.id for p in downstream if p.signal is y)
                if ups and downs:
                    uses.append(ConnectorUse(cid, x, y, ups, downs))
    return uses


_ENV_RE = re.compile(r"\$\$|\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{([^}]*)\}")


def expand_env(text: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """Expand ``${env:VAR}``, ``${env:VAR:-default}`` and ``$$`` in one value; return it and the problems."""
    problems: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(3) is not None:
            problems.append(f"{m.group(0)!r} is not a known expansion: write ${{env:NAME}}")
            return ""
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(
            f"environment variable {name} is not set (give a default with ${{env:{name}:-value}})"
        )
        return ""

    # A "${" with no "}" after it would make the regex scan to the end from every "$" (quadratic in a
    # megabyte value); past the last "}" only "$$" can match.
    cut = text.rfind("}") + 1
    return _ENV_RE.sub(repl, text[:cut]) + text[cut:].replace("$$", "$"), problems


def expand_values(
    data: Any, environ: Mapping[str, str], path: Path = ()
) -> tuple[Any, list[tuple[Path, str]]]:
    """Expand references in every string of plain YAML data; return the new data and (path, problem)s."""
    problems: list[tuple[Path, str]] = []

    def walk(node: Any, path: Path) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, str(i))) for i, v in enumerate(node)]
        if not isinstance(node, str) or "$" not in node:
            return node
        value, errs = expand_env(node, environ)
        problems.extend((path, e) for e in errs)
        whole = _ENV_RE.fullmatch(node)
        if whole and whole.group(0) != "$$" and not errs:
            return EnvText(value)  # typed by the setting it lands in (see EnvText)
        return value

    return walk(data, path), problems


# Limits on what a config file may make the loader do. A Helm-rendered config is a few KB with a few
# hundred values nested 6 deep; the limits are far past any honest config and bound the worst case
# (measured: `validate` of 100,000 values takes about 1 s and 110 MB RSS; of a 4 MiB scalar 0.6 s).
MAX_CONFIG_BYTES = 4 * 2**20
"""Largest config file read (4 MiB): 1,000x a real one, and scanned in well under a second."""
MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists and mappings) in the document once aliases are expanded."""
MAX_YAML_ALIASES = 1_000
"""Most alias uses (``*name``) in the document."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of lists and mappings, aliases expanded."""
MAX_REPORTED_PROBLEMS = 100
"""Problems listed in one ConfigError; the rest are counted."""

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Characters YAML does not allow in a document (it allows tab, LF, CR, NEL and printable text).
_NOT_YAML_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
# libyaml's event parser when PyYAML was built with it (3x faster than the pure-Python one here).
_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LimitError(ConfigError):
    """The YAML is valid but asks the loader for more than its limits allow."""


def _at(source: str, mark: Any) -> str:
    return f"{source}: line {mark.line + 1}: " if mark is not None else f"{source}: "


def _compose(text: str, source: str) -> yaml.Node | None:
    """Build the YAML node graph from the parser's events, as PyYAML's composer does, but iteratively
    and within the limits: alias uses, values with aliases expanded and nesting depth are counted as
    the events arrive, so a "billion laughs" document is refused at the alias that crosses a limit,
    before anything is expanded. Raises ConfigError."""
    resolve: Any = yaml.resolver.Resolver().resolve  # implicit tags (int, bool, ...) as PyYAML's composer
    event: Any
    anchors: dict[str, tuple[yaml.Node, int, int]] = {}  # name → (node, values, height) once closed
    # One entry per open collection: node, anchor, values counted before it, depth, deepest reached,
    # and (mappings) the key waiting for its value.
    stack: list[list[Any]] = []
    root: yaml.Node | None = None
    values = aliases = documents = 0

    def add(node: yaml.Node, reach: int) -> None:
        nonlocal root
        if not stack:
            root = node
            return
        top = stack[-1]
        top[4] = max(top[4], reach)
        if isinstance(top[0], yaml.SequenceNode):
            top[0].value.append(node)
        elif top[6] is None:
            top[6] = node
        else:
            top[0].value.append((top[6], node))
            top[6] = None

    def count(n: int, mark: Any, what: str) -> None:
        nonlocal values
        values += n
        if values > MAX_YAML_VALUES:
            raise _LimitError(
                [
                    f"{_at(source, mark)}{what}: a config may hold at most {MAX_YAML_VALUES:,} values "
                    "(scalars, lists and mappings, aliases expanded)"
                ]
            )

    try:
        for event in yaml.parse(text, Loader=_PARSER):
            mark = event.start_mark
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise ConfigError([f"{_at(source, mark)}a config is one YAML document; found another"])
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                node, anchor, before, depth, deepest, _, _ = stack.pop()
                node.end_mark = event.end_mark
                if anchor is not None:
                    anchors[anchor] = (node, values - before, deepest - depth + 1)
                add(node, deepest)
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue  # stream start and end, document end
            depth = len(stack) + 1
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise _LimitError(
                        [
                            f"{_at(source, mark)}more than {MAX_YAML_ALIASES:,} aliases (*name): "
                            f"a config may use at most {MAX_YAML_ALIASES:,}"
                        ]
                    )
                if event.anchor not in anchors:
                    opened = any(entry[1] == event.anchor for entry in stack)
                    why = "is used inside its own anchor" if opened else "has no anchor (&name) before it"
                    raise ConfigError([f"{_at(source, mark)}invalid YAML: the alias *{event.anchor} {why}"])
                node, size, height = anchors[event.anchor]
                count(
                    size,
                    mark,
                    f"the alias *{event.anchor} expands to {size:,} values, too many",
                )
                if depth + height - 1 > MAX_YAML_DEPTH:
                    raise _LimitError(
                        [
                            f"{_at(source, mark)}the alias *{event.anchor} nests values more than "
                            f"{MAX_YAML_DEPTH} levels deep: a config may nest at most {MAX_YAML_DEPTH}"
                        ]
                    )
                add(node, depth + height - 1)
                continue
            if depth > MAX_YAML_DEPTH:
                raise _LimitError(
                    [
                        f"{_at(source, mark)}lists and mappings nested more than {MAX_YAML_DEPTH} "
                        f"levels deep: a config may nest at most {MAX_YAML_DEPTH}"
                    ]
                )
            count(1, mark, f"more than {MAX_YAML_VALUES:,} values")
            start: Any = event  # a scalar or a collection start (typed loosely: C and Python marks)
            tag = start.tag
            if isinstance(event, yaml.ScalarEvent):
                if tag is None or tag == "!":
                    tag = resolve(yaml.ScalarNode, start.value, start.implicit)
                node = yaml.ScalarNode(tag, start.value, mark, start.end_mark, style=start.style)
                if start.anchor is not None:
                    anchors[start.anchor] = (node, 1, 1)
                add(node, depth)
                continue
            kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
            if tag is None or tag == "!":
                tag = resolve(kind, None, start.implicit)
            node = kind(tag, [], mark, None, flow_style=start.flow_style)
            stack.append([node, event.anchor, values - 1, depth, depth, None, None])
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([f"{_at(source, exc.problem_mark)}invalid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    return root


def _to_data(root: yaml.Node, source: str) -> tuple[Any, dict[Path, int], list[tuple[Path, str]]]:
    """Plain data (dicts, lists, scalars) from a node graph within the limits, with the line of every
    path and the (path, problem) of every value that cannot be read. Merge keys (``<<: *defaults``)
    are applied; explicit keys win over merged ones, and earlier merged mappings over later ones."""
    lines: dict[Path, int] = {}
    problems: list[tuple[Path, str]] = []
    constructor = SafeConfigLoader("")

    def scalar(n: yaml.ScalarNode, path: Path) -> Any:
        try:
            return constructor.construct_object(n)
        except Exception as exc:  # any constructor failure (bad date, !!int 'x', unknown tag) is the value's
            reason = getattr(exc, "problem", None) or str(exc)
            problems.append((path, f"cannot read {short_repr(n.value)}: {reason}"))
            return None

    def key_of(k: yaml.Node, path: Path) -> str:
        if not isinstance(k, yaml.ScalarNode):
            what = "mapping" if isinstance(k, yaml.MappingNode) else "list"
            raise ConfigError(
                [
                    f"{_at(source, k.start_mark)}{_fmt(path) or 'top level'}: "
                    f"a key must be text or a number, not a {what}"
                ]
            )
        try:
            return str(constructor.construct_object(k))
        except Exception:  # a key is a name: one that does not read as its YAML type is taken as written
            return str(k.value)

    def walk(n: yaml.Node, path: Path, lines: dict[Path, int]) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.ScalarNode):
            return scalar(n, path)
        expected = _MAP_TAG if isinstance(n, yaml.MappingNode) else _SEQ_TAG
        if n.tag != expected:
            problems.append((path, f"the tag {short_repr(n.tag)} is not supported in a config"))
            return None
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, (*path, str(i)), lines) for i, v in enumerate(n.value)]
        out: dict[str, Any] = {}
        merges: list[yaml.Node] = []
        for k, v in n.value:
            if k.tag == _MERGE_TAG:
                sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
                if not all(isinstance(m, yaml.MappingNode) for m in sources):
                    lines[(*path, "<<")] = k.start_mark.line + 1
                    problems.append(
                        ((*path, "<<"), "<< merges a mapping or a list of mappings (<<: *defaults)")
                    )
                    continue
                merges += sources
                continue
            key = key_of(k, path)
            if key in out:
                raise ConfigError([f"{_at(source, k.start_mark)}{_fmt((*path, key))}: duplicate key"])
            lines[(*path, key)] = k.start_mark.line + 1
            out[key] = walk(v, (*path, key), lines)
        for m in merges:
            merged_lines: dict[Path, int] = {}
            merged = walk(m, path, merged_lines)
            taken = {key for key in merged or {} if key not in out}
            for key in taken:
                out[key] = merged[key]
            for p, line in merged_lines.items():
                if len(p) > len(path) and p[len(path)] in taken:
                    lines.setdefault(p, line)
        return out

    return walk(root, (), lines), lines, problems


def parse_yaml(text: str, source: str = "config") -> tuple[Any, dict[Path, int], list[tuple[Path, str]]]:
    """Parse YAML within the limits; return the data, a map from path to 1-based line, and the
    (path, problem) of each value that could not be read. Raises ConfigError for a document that
    cannot be parsed or asks for more than the limits."""
    bad = _NOT_YAML_RE.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(
            [
                f"{source}: line {line}: invalid YAML: the character U+{ord(bad.group()):04X} is not allowed "
                "(control characters are not)"
            ]
        )
    node = _compose(text, source)
    if node is None:
        return {}, {}, []
    return _to_data(node, source)


def load_yaml(text: str, source: str = "config") -> tuple[Any, dict[Path, int]]:
    """Parse YAML within the limits; return the data and a map from path to 1-based line. Raises
    ConfigError for any problem."""
    data, lines, problems = parse_yaml(text, source)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in _render(problems, lambda path: lines.get(path))])
    return data, lines


def apply_sets(data: Any, sets: Iterable[str]) -> list[str]:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML) to the plain data, in place."""
    problems = []
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {short_repr(item)}: write --set path.to.key=value")
            continue
        value: Any = raw
        if raw:
            try:
                value, _, errs = parse_yaml(raw, f"--set {short_repr(key)}")
            except _LimitError as exc:
                problems += exc.problems
                continue
            except ConfigError:
                value = raw  # not YAML: the text as written
            else:
                if errs:
                    problems += [f"--set {short_repr(item)}: {m}" for _, m in errs]
                    continue
        parts = key.split(".")
        node = data
        if not isinstance(node, dict):
            problems.append(f"--set {short_repr(item)}: the config is not a mapping")
            continue
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {short_repr(item)}: {short_repr(part)} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    return problems


def _fmt(path: Path) -> str:
    # A key can be megabytes long; a message shows its start.
    return "::".join(p if len(p) <= 80 else p[:79] + "…" for p in path)


_KINDS: tuple[tuple[str, ComponentKind], ...] = (
    ("receivers", ComponentKind.RECEIVER),
    ("processors", ComponentKind.PROCESSOR),
    ("exporters", ComponentKind.EXPORTER),
)
_SECTIONS: tuple[tuple[str, ComponentKind], ...] = (*_KINDS, ("connectors", ComponentKind.CONNECTOR))
_PIPELINE_RE = re.compile(r"^(metrics|traces|logs)(?:/([A-Za-z0-9_.\-]+))?$")
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*(?:/[A-Za-z0-9_.\-]+)?$")


def build_config(
    data: Any,
    factories: Mapping[tuple[ComponentKind, str], Factory],
    lines: Mapping[Path, int] | None = None,
    source_text: str = "",
    earlier_problems: Sequence[tuple[Path, str]] = (),
) -> AgentConfig:
    """Decode and validate plain config data against the registered factories. Raises ConfigError."""
    lines = lines or {}
    problems: list[tuple[Path, str]] = []

    def line_of(path: Path) -> int | None:
        while path:
            if path in lines:
                return lines[path]
            path = path[:-1]
        return None

    decoder = Decoder(line_of)
    if not isinstance(data, dict):
        raise ConfigError(["config: the top level must be a mapping with receivers, exporters and service"])
    for key in data:
        if key not in ("receivers", "processors", "exporters", "connectors", "service"):
            problems.append(
                (
                    (key,),
                    "unknown top-level section; known: receivers, processors, exporters, connectors, service",
                )
            )

    specs: dict[ComponentKind, dict[ComponentId, ComponentSpec]] = {k: {} for _, k in _SECTIONS}
    for section, kind in _SECTIONS:
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            problems.append(((section,), "expected a mapping of component ids to settings"))
            continue
        for id_text, raw in entries.items():
            path = (section, id_text)
            if not _ID_RE.match(id_text):
                problems.append((path, "a component id is `type` or `type/name` (lower-case type)"))
                continue
            cid = ComponentId.parse(id_text)
            factory = factories.get((kind, cid.type))
            if factory is None:
                known = sorted(t for k, t in factories if k is kind)
                problems.append((path, f"unknown {kind.value} type {cid.type!r}; known: {', '.join(known)}"))
                continue
            config = decoder.decode(factory.config_class, raw, path)
            if config is None:
                continue
            try:
                found = list(validate_config(config))
            except Exception as exc:  # a component's validate() must not take the loader down
                found = [("", f"cannot be validated: {type(exc).__name__}: {str(exc)[:200]}")]
            for sub, message in found:
                problems.append((path + tuple(p for p in sub.split("::") if p), message))
            specs[kind][cid] = ComponentSpec(cid, kind, factory, config)

    service = decoder.decode(ServiceConfig, data.get("service"), ("service",)) or ServiceConfig()
    if service.telemetry.health_stall_timeout < 0.5:
        problems.append(
            (
                ("service", "telemetry", "health_stall_timeout"),
                "must be at least 500ms (a shorter stall is normal work, not a stuck agent)",
            )
        )
    for sub, message in validate_config(service.telemetry):
        problems.append((("service", "telemetry", *(p for p in sub.split("::") if p)), message))
    pipelines: list[Pipeline] = []
    used: set[tuple[ComponentKind, ComponentId]] = set()
    declared = {
        kind: {str(cid) for cid in specs[kind]} | {str(k) for k in _mapping_or_empty(data.get(sec))}
        for sec, kind in _SECTIONS
    }
    connector_ids = declared[ComponentKind.CONNECTOR]
    for section, kind in _KINDS:
        if kind is not ComponentKind.PROCESSOR:
            for clash in sorted(connector_ids & declared[kind]):
                problems.append(
                    (
                        ("connectors", clash),
                        f"{clash!r} is also defined under `{section}`: a pipeline could not tell which "
                        "one it lists; give the connector another name (type/name)",
                    )
                )
    # Per connector id: the (pipeline id, signal, path) of each pipeline listing it, as an exporter
    # (its input) and as a receiver (its output).
    fed_by: dict[ComponentId, list[tuple[str, Signal, Path]]] = {}
    feeds: dict[ComponentId, list[tuple[str, Signal, Path]]] = {}
    if not service.pipelines:
        problems.append(
            (("service", "pipelines"), "at least one pipeline is required (for example `metrics`)")
        )
    for pid, pcfg in service.pipelines.items():
        ppath = ("service", "pipelines", pid)
        m = _PIPELINE_RE.match(pid)
        if not m:
            problems.append((ppath, "a pipeline id is metrics, traces or logs, optionally followed by /name"))
            continue
        signal = Signal(m.group(1))
        refs: dict[ComponentKind, list[ComponentId]] = {}
        connectors_in: list[ComponentId] = []
        connectors_out: list[ComponentId] = []
        for (section, kind), ids in zip(
            _KINDS, (pcfg.receivers, pcfg.processors, pcfg.exporters), strict=True
        ):
            refs[kind] = []
            if kind is not ComponentKind.PROCESSOR and not ids:
                problems.append((ppath + (section,), f"a pipeline needs at least one {kind.value}"))
            seen: set[str] = set()
            for i, ref in enumerate(ids):
                rpath = ppath + (section, str(i))
                if ref in seen:
                    problems.append((rpath, f"{ref!r} is listed twice"))
                    continue
                seen.add(ref)
                if kind is not ComponentKind.PROCESSOR and ref in connector_ids and ref not in declared[kind]:
                    cid = ComponentId.parse(ref)
                    used.add((ComponentKind.CONNECTOR, cid))
                    if cid in specs[ComponentKind.CONNECTOR]:
                        receiving = kind is ComponentKind.RECEIVER
                        (feeds if receiving else fed_by).setdefault(cid, []).append((pid, signal, rpath))
                        (connectors_in if receiving else connectors_out).append(cid)
                    continue
                if ref not in declared[kind]:
                    also = "" if kind is ComponentKind.PROCESSOR else " or `connectors`"
                    problems.append((rpath, f"{ref!r} is not defined under `{section}`{also}"))
                    continue
                cid = ComponentId.parse(ref)
                used.add((kind, cid))
                spec = specs[kind].get(cid)
                if spec is None:
                    continue  # its own config errors were already reported
                if signal not in spec.factory.signals:
                    takes = ", ".join(sorted(s.value for s in spec.factory.signals))
                    problems.append((rpath, f"{ref!r} does not handle {signal.value} (it handles: {takes})"))
                    continue
                refs[kind].append(cid)
        pipelines.append(
            Pipeline(
                pid,
                signal,
                tuple(refs[ComponentKind.RECEIVER]),
                tuple(refs[ComponentKind.PROCESSOR]),
                tuple(refs[ComponentKind.EXPORTER]),
                tuple(connectors_in),
                tuple(connectors_out),
            )
        )
    problems += _connector_problems(specs[ComponentKind.CONNECTOR], fed_by, feeds)
    for section, kind in _SECTIONS:
        for cid in specs[kind]:
            if (kind, cid) not in used:
                problems.append(((section, str(cid)), "defined but not used in any pipeline"))

    # A value that failed to expand is not reported again for being empty.
    unset = {p for p, _ in earlier_problems}
    all_problems = list(earlier_problems) + [(p, m) for p, m in decoder.errors + problems if p not in unset]
    if all_problems:
        raise ConfigError(_render(all_problems, line_of))
    return AgentConfig(
        receivers=specs[ComponentKind.RECEIVER],
        processors=specs[ComponentKind.PROCESSOR],
        exporters=specs[ComponentKind.EXPORTER],
        service=service,
        pipelines=tuple(pipelines),
        source=source_text,
        connectors=specs[ComponentKind.CONNECTOR],
    )


def _connector_problems(
    specs: Mapping[ComponentId, ComponentSpec],
    fed_by: Mapping[ComponentId, list[tuple[str, Signal, Path]]],
    feeds: Mapping[ComponentId, list[tuple[str, Signal, Path]]],
) -> list[tuple[Path, str]]:
    """What is wrong with how the pipelines use the connectors (as the Collector checks them): used on
    one side only; a signal on one side that no supported pair joins to a signal on the other; a cycle
    of pipelines through connectors."""
    problems: list[tuple[Path, str]] = []
    edges: dict[str, list[tuple[ComponentId, str]]] = {}
    for cid, spec in specs.items():
        ins, outs = fed_by.get(cid, []), feeds.get(cid, [])
        if not ins and not outs:
            continue  # reported as defined but not used
        pairs = spec.factory.signal_pairs
        supports = ", ".join(sorted(f"{x.value} → {y.value}" for x, y in pairs)) or "nothing"
        if not outs or not ins:
            has, missing = ("an exporter", "receivers") if ins else ("a receiver", "exporters")
            where = ", ".join(sorted({pid for pid, _, _ in ins or outs}))
            problems.append(
                (
                    ("connectors", str(cid)),
                    f"connector {str(cid)!r} is used as {has} (pipelines: {where}) but no pipeline lists "
                    f"it under `{missing}`: a connector joins the pipelines that export to it to the "
                    "pipelines that receive from it",
                )
            )
            continue
        in_signals = {s for _, s, _ in ins}
        out_signals = {s for _, s, _ in outs}
        for _, x, path in ins:
            if not any((x, y) in pairs for y in out_signals):
                made = " or ".join(sorted(y.value for y in out_signals))
                problems.append(
                    (
                        path,
                        f"connector {str(cid)!r} cannot turn {x.value} into {made} (it supports: {supports})",
                    )
                )
        for _, y, path in outs:
            if not any((x, y) in pairs for x in in_signals):
                taken = " or ".join(sorted(x.value for x in in_signals))
                problems.append(
                    (
                        path,
                        f"connector {str(cid)!r} cannot make {y.value} from {taken} "
                        f"(it supports: {supports})",
                    )
                )
        for up, x, _ in ins:
            for down, y, _ in outs:
                if (x, y) in pairs:
                    edges.setdefault(up, []).append((cid, down))
    problems += _cycle_problems(edges)
    return problems


def _cycle_problems(edges: Mapping[str, list[tuple[ComponentId, str]]]) -> list[tuple[Path, str]]:
    """One problem per cycle of pipelines through connectors found by a depth-first walk, naming it."""
    problems: list[tuple[Path, str]] = []
    done: set[str] = set()
    for root in edges:
        if root in done:
            continue
        # Iterative DFS: a stack of (pipeline, its remaining edges); ``trail`` is the current path.
        trail: list[tuple[str, ComponentId | None]] = [(root, None)]
        on_trail = {root}
        stack = [iter(edges.get(root, []))]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
                pid, _ = trail.pop()
                on_trail.discard(pid)
                done.add(pid)
                continue
            cid, down = step
            if down in on_trail:
                start = next(i for i, (p, _) in enumerate(trail) if p == down)
                hops = [*trail[start + 1 :], (down, cid)]
                text = down + "".join(f" → {c} → {p}" for p, c in hops)
                problems.append(
                    (
                        ("service", "pipelines", down),
                        f"the pipelines form a cycle through connectors: {text}; "
                        "a batch would go round it forever",
                    )
                )
                continue
            if down in done:
                continue
            trail.append((down, cid))
            on_trail.add(down)
            stack.append(iter(edges.get(down, [])))
    return problems


def _mapping_or_empty(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _render(problems: list[tuple[Path, str]], line_of: Any) -> list[str]:
    out = []
    for path, message in problems:
        line = line_of(path)
        where = f" (line {line})" if line else ""
        out.append(f"{_fmt(path)}{where}: {message}")
    return out


def read_config_text(path: str) -> str:
    """The config file's text: at most MAX_CONFIG_BYTES (checked before reading it all), UTF-8.
    Raises ConfigError."""
    limit = f"the limit is {MAX_CONFIG_BYTES // 2**20} MiB"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise ConfigError([f"{path}: the config is {size:,} bytes; {limit}"])
            # Bounded even when the size was not known (a pipe, /proc) or the file grew meanwhile.
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: the config is more than {MAX_CONFIG_BYTES:,} bytes; {limit}"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: line {line}: the config is not UTF-8 text: {exc.reason}"]) from None


def load_config(
    path: str,
    factories: Mapping[tuple[ComponentKind, str], Factory],
    sets: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Read, expand, parse, override and validate a config file. Raises ConfigError with every
    problem, and nothing else: a reload or ``validate`` never sees a traceback, whatever the file."""
    try:
        return _load_config(path, factories, sets, environ)
    except ConfigError as exc:
        problems = exc.problems
        if len(problems) > MAX_REPORTED_PROBLEMS:
            more = len(problems) - MAX_REPORTED_PROBLEMS
            problems = [*problems[:MAX_REPORTED_PROBLEMS], f"{path}: … and {more:,} more problems"]
        raise ConfigError(problems) from None
    except Exception as exc:  # last resort: whatever was not foreseen is still a refused config
        raise ConfigError(
            [f"{path}: the config could not be loaded: {type(exc).__name__}: {str(exc)[:200]}"]
        ) from None


def _load_config(
    path: str,
    factories: Mapping[tuple[ComponentKind, str], Factory],
    sets: Sequence[str],
    environ: Mapping[str, str] | None,
) -> AgentConfig:
    text = read_config_text(path)
    data, lines, yaml_problems = parse_yaml(text, path)
    data, env_problems = expand_values(data, os.environ if environ is None else environ)
    set_problems = apply_sets(data, sets)
    if set_problems:
        raise ConfigError(set_problems)
    try:
        return build_config(data, factories, lines, text, yaml_problems + env_problems)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
