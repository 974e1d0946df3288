"""Loading and validating the agent's YAML config (OpenTelemetry Collector shape).

Order: read the file → parse YAML keeping each node's line → expand ``${env:VAR}``,
``${env:VAR:-default}`` and ``$$`` in every string value → apply ``--set path=value`` overrides →
decode every component's Config → validate each Config → validate the pipeline graph. Every problem
is collected with its path (``exporters::otlp/signoz::endpoint``) and line, and all are reported
together. Nothing is bound here.

Expansion happens in parsed values rather than in the raw text (as the OpenTelemetry Collector does
today): a commented-out ``${env:TOKEN}`` is not expanded, and an unset variable is reported with the
path and line of the setting that uses it. A value that is exactly one reference is re-read as a
YAML scalar, so ``port: ${env:PORT}`` gives a number.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from agent.component import ComponentId, ComponentKind, Factory, Signal, validate_config
from agent.confmodel import Decoder, Duration, EnvText

Path = tuple[str, ...]


class ConfigError(Exception):
    """Every problem found in a config, each with its path and line; ``str()`` lists them all."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class TelemetryConfig:
    endpoint: str = "127.0.0.1:8888"
    """Address of the agent's own endpoint: /metrics, /healthz, /readyz, /status. Empty disables it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the agent's own logs (written to stderr)."""


@dataclass(frozen=True)
class PipelineConfig:
    receivers: tuple[str, ...] = ()
    """Receiver ids feeding this pipeline."""
    processors: tuple[str, ...] = ()
    """Processor ids, applied in this order."""
    exporters: tuple[str, ...] = ()
    """Exporter ids; every batch fans out to all of them."""


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


@dataclass(frozen=True)
class AgentConfig:
    receivers: dict[ComponentId, ComponentSpec]
    processors: dict[ComponentId, ComponentSpec]
    exporters: dict[ComponentId, ComponentSpec]
    service: ServiceConfig
    pipelines: tuple[Pipeline, ...]
    source: str = ""
    """The YAML text as read (for SIGHUP comparisons)."""


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

    return _ENV_RE.sub(repl, text), problems


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


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key and value."""


def load_yaml(text: str, source: str = "config") -> tuple[Any, dict[Path, int]]:
    """Parse YAML; return the data and a map from path to 1-based line."""
    lines: dict[Path, int] = {}
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{source}: {where}invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if node is None:
        return {}, lines
    loader = _LineLoader("")

    def walk(n: yaml.Node, path: Path) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k, v in n.value:
                key = str(loader.construct_object(k, deep=True))
                if key in out:
                    raise ConfigError(
                        [f"{source}: line {k.start_mark.line + 1}: {_fmt(path + (key,))}: duplicate key"]
                    )
                lines[path + (key,)] = k.start_mark.line + 1
                out[key] = walk(v, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, path + (str(i),)) for i, v in enumerate(n.value)]
        return loader.construct_object(n, deep=True)

    try:
        return walk(node, ()), lines
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()


def apply_sets(data: Any, sets: Iterable[str]) -> list[str]:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML) to the plain data, in place."""
    problems = []
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: write --set path.to.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part!r} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    return problems


def _fmt(path: Path) -> str:
    return "::".join(path)


_KINDS: tuple[tuple[str, ComponentKind], ...] = (
    ("receivers", ComponentKind.RECEIVER),
    ("processors", ComponentKind.PROCESSOR),
    ("exporters", ComponentKind.EXPORTER),
)
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
        if key not in ("receivers", "processors", "exporters", "service"):
            problems.append(
                ((key,), "unknown top-level section; known: receivers, processors, exporters, service")
            )

    specs: dict[ComponentKind, dict[ComponentId, ComponentSpec]] = {k: {} for _, k in _KINDS}
    for section, kind in _KINDS:
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
            for sub, message in validate_config(config):
                problems.append((path + tuple(p for p in sub.split("::") if p), message))
            specs[kind][cid] = ComponentSpec(cid, kind, factory, config)

    service = decoder.decode(ServiceConfig, data.get("service"), ("service",)) or ServiceConfig()
    pipelines: list[Pipeline] = []
    used: set[tuple[ComponentKind, ComponentId]] = set()
    declared = {
        kind: {str(cid) for cid in specs[kind]}
        | {str(k) for k in (data.get(sec) or {}) if isinstance(data.get(sec), dict)}
        for sec, kind in _KINDS
    }
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
                if ref not in declared[kind]:
                    problems.append((rpath, f"{ref!r} is not defined under `{section}`"))
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
            )
        )
    for section, kind in _KINDS:
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
    )


def _render(problems: list[tuple[Path, str]], line_of: Any) -> list[str]:
    out = []
    for path, message in problems:
        line = line_of(path)
        where = f" (line {line})" if line else ""
        out.append(f"{_fmt(path)}{where}: {message}")
    return out


def load_config(
    path: str,
    factories: Mapping[tuple[ComponentKind, str], Factory],
    sets: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Read, expand, parse, override and validate a config file. Raises ConfigError with every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: the config is not UTF-8 text: {exc.reason}"]) from None
    data, lines = load_yaml(text, path)
    data, env_problems = expand_values(data, os.environ if environ is None else environ)
    set_problems = apply_sets(data, sets)
    if set_problems:
        raise ConfigError(set_problems)
    try:
        return build_config(data, factories, lines, text, env_problems)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
