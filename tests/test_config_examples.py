"""Every config example the project shows validates with the agent's own config loader.

Collected: every ```yaml block of README.md, and every literal block (indented, after a blank line) of
the docstrings in receivers/, processors/, exporters/ and agent/ that parses as a YAML mapping.
config.example.yaml and examples/*.yaml are whole files, loaded by
tests/agent/test_config.py::test_example_configs_are_valid.

Each block is one case, named ``file:line``, classified by its top-level keys:

- agent config (receivers / processors / exporters / service): completed into a whole config and
  decoded and validated by ``agent.config.build_config`` (nothing is bound). The completion rule: a
  missing receiver section gets ``otlp``, a missing exporter section ``debug``, and without
  ``service.pipelines`` one metrics pipeline runs every receiver, every processor (in the block's
  order) and every exporter of the block. A component a pipeline names that the block does not
  define gets the settings ``MINIMAL`` gives its type.
- one setting of a component (``SETTING_CONTEXT``): placed inside the component named there.
- Helm chart values (``HELM_VALUES``): checked against helm/values.schema.json; their ``config:``
  (agent config the chart merges over what its presets generate) is also checked as agent config,
  with the components its pipelines name but do not define completed from ``MINIMAL``.
- a ``headwater test`` file (top-level ``version`` and ``tests``): parsed as one.
- anything else must be listed in ``NOT_CONFIG`` with the reason; an unlisted block fails, so no
  example is skipped silently.

``${env:NAME}`` references get a value (``ENVIRON``; ``example-<NAME>`` otherwise).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import ConfigError, build_config, expand_values, parse_yaml
from agent.pipeline_test import model as pipeline_test_model
from agent.registry import builtin_factories

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = builtin_factories()
SECTIONS = {"receivers", "processors", "exporters", "connectors", "service"}
ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)")
ENVIRON = {"SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX"}

# Top-level key of a block showing one component setting → (section, component id, its other
# required settings).
SETTING_CONTEXT: dict[str, tuple[str, str, dict[str, Any]]] = {
    "sending_queue": (
        "exporters",
        "prometheus_remote_write",
        {"endpoint": "http://127.0.0.1:9090/api/v1/write"},
    ),
}

# Settings a component needs to validate, for components a fragment names without defining them.
MINIMAL: dict[str, dict[str, Any]] = {
    "prometheus_remote_write": {"endpoint": "http://127.0.0.1:9090/api/v1/write"},
    "otlp": {},
    "statsd": {},
}

# Blocks that are Helm chart values, by their first line: the part that is the chart's values.
HELM_VALUES: dict[str, str] = {
    "mode: daemonset": "",
    "mode: deployment": "",
    "headwater:": "headwater",  # a parent chart's values: the subchart's are under its name
    "# Chart.yaml": "headwater",
    "config:": "",
}

# Blocks that are no config at all, by their first line → why.
NOT_CONFIG: dict[str, str] = {
    "# in the app's pod spec": "a Kubernetes pod spec fragment (the app's env), not Headwater config",
    "# templates/deployment.yaml (pod template)": "a Helm template of the app's chart (Go templating)",
    '{"name": "queue.depth", "value": 12, "type": "gauge", "tags": {"queue": "mail"},': (
        "an HTTP receiver request body (JSON), not config"
    ),
}


@dataclass(frozen=True)
class Block:
    source: str
    """File and line of the block's first line, e.g. ``README.md:232``."""
    text: str
    """The block, dedented."""
    line: int
    """Line of the block's first line in its file."""


def _readme_blocks() -> list[Block]:
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks: list[Block] = []
    start: int | None = None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```yaml":
            start = i + 1
        elif start is not None and line.strip() == "```":
            text = "\n".join(lines[start:i])
            first = start + next((k for k, ln in enumerate(lines[start:i]) if ln.strip()), 0)
            blocks.append(Block(f"README.md:{first + 1}", _dedent(text), first + 1))
            start = None
    return blocks


def _dedent(text: str) -> str:
    body = [ln for ln in text.splitlines() if ln.strip()]
    indent = min((len(ln) - len(ln.lstrip()) for ln in body), default=0)
    return "\n".join(ln[indent:] for ln in text.splitlines()).strip("\n") + "\n"


def _docstring_blocks() -> list[Block]:
    """Literal blocks (indented after a blank line) of every docstring that parse as YAML mappings."""
    blocks: list[Block] = []
    files = [
        p for d in ("receivers", "processors", "exporters", "agent") for p in sorted((ROOT / d).rglob("*.py"))
    ]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if not (node.body and isinstance(node.body[0], ast.Expr)):
                continue
            doc = node.body[0].value
            if not (isinstance(doc, ast.Constant) and isinstance(doc.value, str)):
                continue
            lines = doc.value.splitlines()
            base = min((len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()), default=0)
            i = 1
            while i < len(lines):
                indented = lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > base
                if indented and not lines[i - 1].strip():
                    j = i
                    while j < len(lines) and (
                        not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
                    ):
                        j += 1
                    text = _dedent("\n".join(lines[i:j]))
                    if _is_mapping(text):
                        rel = path.relative_to(ROOT)
                        blocks.append(Block(f"{rel}:{doc.lineno + i}", text, doc.lineno + i))
                    i = j
                else:
                    i += 1
    return blocks


def _is_mapping(text: str) -> bool:
    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


FOUND = _readme_blocks() + _docstring_blocks()
BLOCKS = [b for b in FOUND if b.text.splitlines()[0] not in NOT_CONFIG]
"""The blocks to validate: every one found but those listed in NOT_CONFIG (not config, with a reason)."""


def _environ(text: str) -> dict[str, str]:
    return {name: ENVIRON.get(name, f"example-{name}") for name in ENV_RE.findall(text)}


def complete(data: dict[str, Any]) -> dict[str, Any]:
    """A fragment of agent config made whole by the rule in the module docstring."""
    data = {key: dict(value or {}) if key in SECTIONS else value for key, value in data.items()}
    for section in ("receivers", "processors", "exporters"):
        data.setdefault(section, {})
    service = data.setdefault("service", {})
    for pipeline in (service.get("pipelines") or {}).values():
        for section in ("receivers", "processors", "exporters"):
            for cid in pipeline.get(section, ()):
                if cid not in data[section] and cid not in data.get("connectors", {}):
                    data[section][cid] = dict(MINIMAL[cid.split("/")[0]])
    for section, default in (("receivers", "otlp"), ("exporters", "debug")):
        if not data[section]:
            data[section] = {default: {}}
    if not service.get("pipelines"):
        service["pipelines"] = {
            "metrics": {section: list(data[section]) for section in ("receivers", "processors", "exporters")}
        }
    return data


def check_agent_config(block: Block, under: str = "") -> list[str]:
    data, lines, yaml_problems = parse_yaml(block.text, block.source)
    if under:
        data = data[under]
        lines = {path[1:]: n for path, n in lines.items() if path[:1] == (under,)}
    first = next(iter(data)) if isinstance(data, dict) and data else None
    if first in SETTING_CONTEXT:
        section, component, required = SETTING_CONTEXT[first]
        data = {section: {component: {**required, **data}}}
        lines = {(section, component, *path): n for path, n in lines.items()}
    data, env_problems = expand_values(complete(data), _environ(block.text))
    file_lines = {path: block.line + n - 1 for path, n in lines.items()}
    try:
        build_config(data, FACTORIES, file_lines, block.text, yaml_problems + env_problems)
    except ConfigError as exc:
        return exc.problems
    return []


def check_helm_values(block: Block, under: str) -> list[str]:
    values: dict[str, Any] = {}
    # A block may show several files, each after a "# <name>.yaml" line: the values are one of them.
    for document in re.split(r"^# \S+\.yaml$", block.text, flags=re.MULTILINE):
        data = yaml.safe_load(document)
        if isinstance(data, dict) and (not under or under in data):
            values = data[under] if under else data
    if not values:
        return [f"no Helm values found{f' under {under}:' if under else ''}"]
    # jsonschema comes with kubernetes-validate (scripts/install-chart-tools, part of `make test`).
    jsonschema = pytest.importorskip("jsonschema", reason="Helm values need jsonschema (install-chart-tools)")
    schema = json.loads((ROOT / "helm" / "values.schema.json").read_text())
    schema.pop("required", None)  # the README shows values to add to the chart's (mode is checked there)
    errors = jsonschema.Draft7Validator(schema).iter_errors(values)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.source for b in BLOCKS])
def test_config_example_validates(block: Block) -> None:
    first = block.text.splitlines()[0]
    if first in HELM_VALUES:
        problems = check_helm_values(block, HELM_VALUES[first])
        if "config" in (yaml.safe_load(block.text) or {}):
            problems += check_agent_config(block, "config")
        assert not problems, f"{block.source}: Helm values the chart's schema refuses:\n" + "\n".join(
            problems
        )
        return
    data = yaml.safe_load(block.text)
    keys = set(data) if isinstance(data, dict) else set()
    if keys == {"version", "tests"}:  # a `headwater test` file: it must parse as one
        pipeline_test_model.parse(block.text, block.source)
        return
    assert keys and (keys <= SECTIONS or (len(keys) == 1 and keys <= set(SETTING_CONTEXT))), (
        f"{block.source}: a YAML block that is neither agent config, a known setting, Helm values nor "
        f"listed in NOT_CONFIG (top-level keys {sorted(keys)}); classify it in {Path(__file__).name}"
    )
    problems = check_agent_config(block)
    assert not problems, f"{block.source}: the example does not validate:\n" + "\n".join(problems)


def test_examples_were_found() -> None:
    """The collectors still see the examples (a changed docstring or fence style would hide them)."""
    sources = {b.source.split(":")[0] for b in BLOCKS}
    assert {
        "README.md",
        "processors/anomaly.py",
        "processors/threshold/__init__.py",
        "receivers/otlp/__init__.py",
    } <= sources
    assert sum(1 for b in BLOCKS if b.source.startswith("README.md")) >= 5


def test_every_block_left_out_as_not_config_is_still_there() -> None:
    """NOT_CONFIG names real blocks: an entry whose block is gone (or changed its first line) fails."""
    firsts = {b.text.splitlines()[0] for b in FOUND}
    assert set(NOT_CONFIG) <= firsts, sorted(set(NOT_CONFIG) - firsts)
