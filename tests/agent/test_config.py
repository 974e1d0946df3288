from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.config import ConfigError, apply_sets, expand_env, load_config
from agent.confmodel import parse_duration, parse_host_port, parse_size
from agent.registry import builtin_factories

FACTORIES = builtin_factories()

GOOD = """\
receivers:
  statsd:
    udp: 127.0.0.1:18125
    flush_interval: 2s
exporters:
  prometheus:
    endpoint: 127.0.0.1:19102
  debug/file:
    path: /tmp/headwater-debug.jsonl
service:
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus, debug/file]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), FACTORIES, **kw)  # type: ignore[arg-type]
    return info.value.problems


def test_good_config_builds_graph(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), FACTORIES)
    (pipeline,) = cfg.pipelines
    assert pipeline.id == "metrics"
    assert [str(e) for e in pipeline.exporters] == ["prometheus", "debug/file"]
    statsd = next(iter(cfg.receivers.values())).config
    assert statsd.flush_interval == 2.0
    assert statsd.listeners() == {"udp": "127.0.0.1:18125"}


def test_example_configs_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    configs = [p for p in sorted((root / "examples").glob("*.yaml")) if not p.name.endswith(".tests.yaml")]
    for path in [root / "config.example.yaml", *configs]:  # *.tests.yaml: `headwater test` files
        environ = {"SIGNOZ_INGESTION_KEY": "key", "EVENTS_JWT_SECRET": "an-hs256-secret-of-32-bytes-or-more"}
        load_config(str(path), FACTORIES, environ=environ)


def test_every_error_is_reported_with_path_and_line(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd:
        udp: 127.0.0.1:18125
        flush_intervall: 2s
        max_series: many
    exporters:
      prometheus:
        endpoint: nowhere
      prometheus_remote_write:
        endpoint: http://127.0.0.1:1/api/v1/write
        timeout: 10
    service:
      pipelines:
        metrics:
          receivers: [statsd, otlp]
          exporters: [prometheus]
    """
    found = problems(tmp_path, text)
    joined = "\n".join(found)
    assert (
        "receivers::statsd::flush_intervall (line 4): unknown setting (did you mean 'flush_interval'?)"
        in joined
    )
    assert "receivers::statsd::max_series (line 5): expected a whole number" in joined
    assert "exporters::prometheus::endpoint (line 8):" in joined and "not host:port" in joined
    assert "exporters::prometheus_remote_write::timeout (line 11):" in joined and "with a unit" in joined
    assert "service::pipelines::metrics::receivers::1 (line 15): 'otlp' is not defined" in joined
    assert "exporters::prometheus_remote_write (line 9): defined but not used in any pipeline" in joined
    assert len(found) == 6, found
    assert all(p.startswith(str(tmp_path)) for p in found)


def test_unknown_type_and_bad_pipeline_names(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd: {}
      kafka: {}
    exporters:
      debug: {}
    service:
      pipelines:
        metric:
          receivers: [statsd]
          exporters: [debug]
        metrics:
          receivers: [statsd, kafka]
          exporters: []
    """
    joined = "\n".join(problems(tmp_path, text))
    assert "receivers::kafka (line 3): unknown receiver type 'kafka'; known: " in joined
    assert "statsd" in joined.split("unknown receiver type 'kafka'; known: ")[1].splitlines()[0]
    assert "service::pipelines::metric (line 8): a pipeline id is metrics, traces or logs" in joined
    assert (
        "service::pipelines::metrics::exporters (line 13): a pipeline needs at least one exporter" in joined
    )


def test_signal_mismatch(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd: {}
    exporters:
      debug: {}
    service:
      pipelines:
        traces:
          receivers: [statsd]
          exporters: [debug]
    """
    joined = "\n".join(problems(tmp_path, text))
    assert "'statsd' does not handle traces (it handles: logs, metrics)" in joined


def test_env_expansion(tmp_path: Path) -> None:
    text = GOOD.replace("127.0.0.1:19102", "${env:PROM_ADDR}").replace("2s", "${env:FLUSH:-3s}")
    cfg = load_config(write(tmp_path, text), FACTORIES, environ={"PROM_ADDR": "127.0.0.1:9999"})
    assert next(iter(cfg.exporters.values())).config.endpoint == "127.0.0.1:9999"
    assert next(iter(cfg.receivers.values())).config.flush_interval == 3.0
    found = problems(tmp_path, "# a comment may mention ${env:NOT_SET}\n" + text, environ={})
    assert found == [
        f"{tmp_path}/config.yaml: exporters::prometheus::endpoint (line 8): environment variable PROM_ADDR "
        "is not set (give a default with ${env:PROM_ADDR:-value})"
    ]


def test_whole_value_reference_is_typed(tmp_path: Path) -> None:
    text = GOOD.replace("flush_interval: 2s", "max_series: ${env:MAX}")
    cfg = load_config(write(tmp_path, text), FACTORIES, environ={"MAX": "42"})
    assert next(iter(cfg.receivers.values())).config.max_series == 42


def test_expand_env_literal_dollar_and_unknown_form() -> None:
    text, errs = expand_env("$$HOME ${env:X} ${HOME}", {"X": "x"})
    assert text == "$HOME x "
    assert errs == ["'${HOME}' is not a known expansion: write ${env:NAME}"]


def test_set_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, GOOD),
        FACTORIES,
        sets=["exporters.debug/file.verbosity=detailed", "receivers.statsd.max_series=5"],
    )
    debug = next(s for s in cfg.exporters.values() if s.id.type == "debug")
    assert debug.config.verbosity == "detailed"
    assert next(iter(cfg.receivers.values())).config.max_series == 5
    found = problems(tmp_path, GOOD, sets=["exporters.debug/file.verbosity=loud"])
    assert any("verbosity" in p and "is not one of: basic, normal, detailed" in p for p in found)


def test_apply_sets_rejects_malformed() -> None:
    assert apply_sets({}, ["novalue"]) == ["--set 'novalue': write --set path.to.key=value"]


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "receivers:\n  statsd: [\n")
    assert len(found) == 1 and "invalid YAML" in found[0] and "line" in found[0]


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD + "receivers: {}\n")
    assert "duplicate key" in found[0]


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5m", 90.0), ("250us", 0.00025)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "ten seconds", "-1s", "1 fortnight"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "n"), [("64KiB", 65536), ("1GiB", 2**30), ("10MB", 10**7), ("512B", 512)])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8125", ("127.0.0.1", 8125)),
        ("[::1]:4317", ("::1", 4317)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", [":8125", "8125", "host:port", "1.2.3.4:70000"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_reserved_remote_write_header_is_rejected(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd: {}
    exporters:
      prometheus_remote_write:
        endpoint: http://127.0.0.1:1/api/v1/write
        headers: {Content-Type: text/plain, X-Scope-OrgID: a}
    service:
      pipelines:
        metrics: {receivers: [statsd], exporters: [prometheus_remote_write]}
    """
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert (
        "exporters::prometheus_remote_write::headers::Content-Type (line 6): this header is set by"
        in found[0]
    )


def test_whole_value_reference_keeps_text_for_string_settings(tmp_path: Path) -> None:
    # A secret like 0123 would become the number 83, and `yes` a boolean, if read as YAML.
    text = GOOD.replace(
        "    flush_interval: 2s\n",
        "    flush_interval: ${env:FLUSH}\n"
        "  http:\n"
        "    endpoint: 127.0.0.1:18080\n"
        "    auth:\n"
        "      tokens: [{token: '${env:TOKEN}', tenant: '${env:TENANT}'}]\n",
    ).replace("receivers: [statsd]", "receivers: [statsd, http]")
    environ = {"FLUSH": "5s", "TOKEN": "0123", "TENANT": "yes"}
    cfg = load_config(write(tmp_path, text), FACTORIES, environ=environ)
    by_type = {cid.type: spec.config for cid, spec in cfg.receivers.items()}
    (token,) = by_type["http"].auth.tokens
    assert (token.token, token.tenant) == ("0123", "yes")
    assert by_type["statsd"].flush_interval == 5.0


def test_a_setting_named_after_a_python_keyword_is_written_as_such(tmp_path: Path) -> None:
    text = GOOD.replace(
        "service:\n",
        "processors:\n"
        "  threshold:\n"
        "    rules:\n"
        "      - {name: slow, metric: hits, statistic: last, warning: 1, for: 2m}\n"
        "service:\n",
    ).replace(
        "      exporters: [prometheus, debug/file]",
        "      processors: [threshold]\n      exporters: [prometheus, debug/file]",
    )
    cfg = load_config(write(tmp_path, text), FACTORIES)
    (spec,) = cfg.processors.values()
    assert spec.config.rules[0].for_duration == 120.0
    bad = problems(tmp_path, text.replace("for: 2m", "for_duration: 2m"))
    assert any("rules::0::for_duration" in p and "unknown setting" in p for p in bad)


@pytest.mark.parametrize("value", ["1", "[statsd]", "text"])
def test_a_section_that_is_not_a_mapping_is_a_problem(tmp_path: Path, value: str) -> None:
    found = problems(
        tmp_path, GOOD.replace("exporters:\n  prometheus:", f"processors: {value}\nexporters:\n  prometheus:")
    )
    assert (
        f"{tmp_path}/config.yaml: processors (line 5): expected a mapping of component ids to settings"
        in found
    )
