"""A config file cannot be weaponised: whatever it holds, ``load_config`` returns an AgentConfig or
raises ConfigError (never anything else), within bounded memory, with the path and line of each
problem."""

from __future__ import annotations

import os
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

import agent.config
from agent.cli import main
from agent.config import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    AgentConfig,
    ConfigError,
    apply_sets,
    expand_env,
    load_config,
    parse_yaml,
)
from agent.registry import builtin_factories

FACTORIES = builtin_factories()

GOOD = """\
receivers:
  statsd:
    udp: 127.0.0.1:18125
    flush_interval: 2s
exporters:
  debug: {}
service:
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [debug]
"""


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str | bytes, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), FACTORIES, **kw)  # type: ignore[arg-type]
    return info.value.problems


def with_statsd(setting: str) -> str:
    return GOOD.replace("    flush_interval: 2s\n", f"    flush_interval: 2s\n    {setting}\n")


def billion_laughs(levels: int = 9, width: int = 6) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# --- aliases and anchors ----------------------------------------------------------------------------


def test_alias_bomb_is_refused_at_its_alias_before_it_expands(tmp_path: Path) -> None:
    text = billion_laughs() + GOOD  # 6**9 = 10 M values once expanded; 41 s and 3.7 GB before
    assert len(text) < 1000
    tracemalloc.start()
    try:
        found = problems(tmp_path, text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (problem,) = found
    # *a5 is the first alias whose expansion crosses the limit: 6**6 + ... values, on line 7.
    assert problem.startswith(f"{tmp_path}/config.yaml: line 7: the alias *a5 expands to 55,987 values")
    assert f"a config may hold at most {MAX_YAML_VALUES:,} values" in problem
    assert peak < 20 * 2**20, peak


def test_alias_uses_are_capped(tmp_path: Path) -> None:
    uses = "\n".join(f"  - *one  # {i}" for i in range(MAX_YAML_ALIASES + 1))
    (problem,) = problems(tmp_path, GOOD + "x_list: &one 1\nx_uses:\n" + uses + "\n")
    alias_line = GOOD.count("\n") + 2 + MAX_YAML_ALIASES + 1
    assert f"line {alias_line}: more than {MAX_YAML_ALIASES:,} aliases (*name)" in problem
    assert f"a config may use at most {MAX_YAML_ALIASES:,}" in problem


def test_aliases_cannot_nest_past_the_depth_limit(tmp_path: Path) -> None:
    # Each anchor nests 40 levels; each alias of it adds its 40 to where it is used.
    text = "a: &a " + "[" * 40 + "]" * 40 + "\nb: &b " + "[" * 30 + "*a" + "]" * 30 + "\n"
    (problem,) = problems(tmp_path, text + GOOD)
    assert f"line 2: the alias *a nests values more than {MAX_YAML_DEPTH} levels deep" in problem


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, GOOD + "x: &loop {again: [*loop]}\n")
    assert "line 12: invalid YAML: the alias *loop is used inside its own anchor" in problem


def test_anchors_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd/c: &defaults
        flush_interval: 5s
        max_series: 1000
        udp: 127.0.0.1:18127
      statsd:
        <<: [*defaults, {max_series: 7, receive_buffer: 1MiB}]
        udp: 127.0.0.1:18125
      statsd/b:
        <<: *defaults
        udp: 127.0.0.1:18126
        flush_interval: 1s
    exporters:
      debug: {}
    service:
      pipelines:
        metrics:
          receivers: &all [statsd, statsd/b, statsd/c]
          exporters: &out [debug]
        metrics/again:
          receivers: *all
          exporters: *out
    """
    cfg = load_config(write(tmp_path, text), FACTORIES)
    by_id = {str(cid): spec.config for cid, spec in cfg.receivers.items()}
    # Explicit keys win over merged ones; earlier merged mappings win over later ones.
    assert (by_id["statsd"].flush_interval, by_id["statsd"].max_series) == (5.0, 1000)
    assert (by_id["statsd"].receive_buffer, by_id["statsd"].udp) == (2**20, "127.0.0.1:18125")
    assert (by_id["statsd/b"].flush_interval, by_id["statsd/b"].max_series) == (1.0, 1000)
    assert by_id["statsd/b"].udp == "127.0.0.1:18126"
    assert [p.id for p in cfg.pipelines] == ["metrics", "metrics/again"]
    assert [str(r) for r in cfg.pipelines[1].receivers] == ["statsd", "statsd/b", "statsd/c"]


def test_a_merged_setting_is_reported_at_the_line_it_is_written(tmp_path: Path) -> None:
    text = """\
    receivers:
      statsd/base: &base
        udp: 127.0.0.1:18125
        max_series: lots
      statsd:
        <<: *base
        udp: 127.0.0.1:18126
    exporters:
      debug: {}
    service:
      pipelines:
        metrics: {receivers: [statsd, statsd/base], exporters: [debug]}
    """
    found = problems(tmp_path, text)
    assert sorted(p.split(": ", 1)[1] for p in found) == [
        "receivers::statsd/base::max_series (line 4): expected a whole number, got str 'lots'",
        "receivers::statsd::max_series (line 4): expected a whole number, got str 'lots'",
    ]


def test_a_merge_key_takes_only_mappings(tmp_path: Path) -> None:
    found = problems(tmp_path, with_statsd("<<: [1, 2]"))
    assert found == [
        f"{tmp_path}/config.yaml: receivers::statsd::<< (line 5): "
        "<< merges a mapping or a list of mappings (<<: *defaults)"
    ]


# --- numbers, sizes and durations -------------------------------------------------------------------


def test_a_5000_digit_integer_is_out_of_range_not_a_crash(tmp_path: Path) -> None:
    found = problems(tmp_path, with_statsd("max_series: " + "9" * 5000))
    assert found == [
        f"{tmp_path}/config.yaml: receivers::statsd::max_series (line 5): the 5,000-character number "
        "999999999999… is out of range: a whole number here must be between "
        "-9223372036854775808 and 9223372036854775807"
    ]


@pytest.mark.parametrize(
    "literal",
    ["0x" + "f" * 5000, "-0b" + "1" * 5000, "1" + ":59" * 2000, "0" + "7" * 4000, "1_" * 3000 + "1"],
)
def test_long_integer_literals_in_any_notation_are_out_of_range(tmp_path: Path, literal: str) -> None:
    (problem,) = problems(tmp_path, with_statsd(f"max_series: {literal}"))
    assert "receivers::statsd::max_series (line 5):" in problem and "is out of range" in problem


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_series: 9223372036854775808", "must be between -9223372036854775808 and 9223372036854775807"),
        ("max_series: -9223372036854775809", "must be between -9223372036854775808 and 9223372036854775807"),
        ("receive_buffer: 99999999999999999999TiB", "a size must be between 0B and 1024TiB"),
        ("receive_buffer: " + "9" * 5000 + "KiB", "a size must be between 0B and 1024TiB"),
        ("receive_buffer: 1025TiB", "a size must be between 0B and 1024TiB"),
        ("receive_buffer: -1", "a size must be between 0B and 1024TiB"),
        ("receive_buffer: " + "9" * 5000, "a size must be between 0B and 1024TiB"),
        ("flush_interval: " + "9" * 400 + "h", "a duration must be between 0s and 3650d"),
        ("flush_interval: 3651d", "a duration must be between 0s and 3650d"),
    ],
)
def test_out_of_range_values_name_their_range(tmp_path: Path, setting: str, message: str) -> None:
    text = with_statsd(setting) if not setting.startswith("flush") else GOOD.replace("2s", setting[16:])
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    key = setting.split(":")[0]
    assert f"receivers::statsd::{key} (line " in found[0]
    assert "out of range" in found[0] and message in found[0]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1.0e+400", "9" * 400, "9" * 5000])
def test_a_float_setting_must_be_finite(tmp_path: Path, value: str) -> None:
    text = GOOD.replace("service:", f"processors:\n  sample:\n    rate: {value}\nservice:").replace(
        "exporters: [debug]", "processors: [sample]\n      exporters: [debug]"
    )
    (problem,) = problems(tmp_path, text)
    assert "processors::sample::rate (line 9):" in problem and "out of range" in problem


def test_range_problems_are_reported_with_the_others(tmp_path: Path) -> None:
    text = with_statsd("max_series: " + "9" * 5000).replace("2s", "99999d").replace("debug: {}", "debug: 1")
    found = problems(tmp_path, text)
    assert len(found) == 3, found
    assert [p.split(" (line")[0].split(": ")[1] for p in found] == [
        "receivers::statsd::flush_interval",
        "receivers::statsd::max_series",
        "exporters::debug",
    ]


def test_an_env_reference_or_a_set_value_is_range_checked_too(tmp_path: Path) -> None:
    text = with_statsd("max_series: ${env:MAX}")
    (problem,) = problems(tmp_path, text, environ={"MAX": "9" * 5000})
    assert "receivers::statsd::max_series (line 5):" in problem and "out of range" in problem
    (problem,) = problems(tmp_path, GOOD, sets=["receivers.statsd.max_series=" + "9" * 5000])
    assert "receivers::statsd::max_series" in problem and "out of range" in problem


def test_a_value_the_yaml_types_cannot_read_is_a_problem_with_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, with_statsd("max_series: !!int '0x'").replace("udp:", "udp: !!timestamp"))
    assert [p.split(": ", 1)[1] for p in found] == [
        "receivers::statsd::udp (line 3): cannot read '127.0.0.1:18125': "
        "'NoneType' object has no attribute 'groupdict'",
        "receivers::statsd::max_series (line 5): cannot read '0x': "
        "invalid literal for int() with base 16: ''",
    ]
    (problem,) = problems(tmp_path, GOOD + "x: 2001-02-30\n")
    assert "x (line 12): cannot read '2001-02-30': day is out of range for month" in problem


# --- nesting, size and text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nested",
    [
        "[" * 100_000 + "]" * 100_000,
        "{a: " * 5_000 + "1" + "}" * 5_000,
        "\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)),
        "\n" + "".join("  " * i + "- \n" for i in range(200)),
    ],
)
def test_deep_nesting_is_refused_with_the_limit(tmp_path: Path, nested: str) -> None:
    (problem,) = problems(tmp_path, GOOD + "x: " + nested + "\n")
    assert f"lists and mappings nested more than {MAX_YAML_DEPTH} levels deep" in problem
    assert "line " in problem


def test_a_document_at_every_limit_parses() -> None:
    deep = "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1)  # the top mapping is level 1
    aliases = ", ".join(["*s"] * MAX_YAML_ALIASES)
    # Every scalar (keys too), list and mapping counts: the top mapping; "deep" and its 63 lists;
    # "uses", its list, &s and one value per alias; "fill", its list and its items.
    fill = MAX_YAML_VALUES - (1 + 1 + (MAX_YAML_DEPTH - 1) + 3 + MAX_YAML_ALIASES + 2)
    text = f"deep: {deep}\nuses: [&s 1, {aliases}]\nfill: [{', '.join(['1'] * fill)}]\n"
    data, _, found = parse_yaml(text)
    assert found == [] and len(data["fill"]) == fill and len(data["uses"]) == MAX_YAML_ALIASES + 1
    with pytest.raises(ConfigError, match=f"line 3: more than {MAX_YAML_VALUES:,} values"):
        parse_yaml(text.replace("fill: [", "fill: [1, "))
    with pytest.raises(
        ConfigError, match=f"line 1: lists and mappings nested more than {MAX_YAML_DEPTH} levels"
    ):
        parse_yaml(text.replace("deep: [", "deep: [["))
    with pytest.raises(ConfigError, match=f"line 2: more than {MAX_YAML_ALIASES:,} aliases"):
        parse_yaml(text.replace("*s]", "*s, *s]"))


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: refused from its size
    with pytest.raises(ConfigError) as info:
        load_config(str(path), FACTORIES)
    assert info.value.problems == [
        f"{path}: the config is {MAX_CONFIG_BYTES + 1:,} bytes; the limit is 4 MiB"
    ]


def test_a_stream_without_a_size_is_read_only_up_to_the_limit() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            load_config("/dev/zero", FACTORIES)  # st_size 0, never ends
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.problems == [
        f"/dev/zero: the config is more than {MAX_CONFIG_BYTES:,} bytes; the limit is 4 MiB"
    ]
    assert peak < 3 * MAX_CONFIG_BYTES


def test_text_that_is_not_utf8_or_not_yaml_names_its_line(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, GOOD.encode() + b"x: \xff\xfe\n")
    assert problem == f"{tmp_path}/config.yaml: line 12: the config is not UTF-8 text: invalid start byte"
    (problem,) = problems(tmp_path, GOOD + "x: a\x00b\n")
    assert problem == (
        f"{tmp_path}/config.yaml: line 12: invalid YAML: the character U+0000 is not allowed "
        "(control characters are not)"
    )


def test_a_python_tag_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = GOOD + f"x: !!python/object/apply:os.system ['touch {marker}']\ny: !!python/name:os.system ''\n"
    found = problems(tmp_path, text)
    assert [p.split(": ", 1)[1] for p in found] == [
        "x (line 12): the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not supported in a config",
        "y (line 13): cannot read '': could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/name:os.system'",
    ]
    assert not marker.exists()


@pytest.mark.parametrize(("key", "what"), [("[1, 2]", "list"), ("{a: 1}", "mapping")])
def test_a_key_must_be_a_scalar(tmp_path: Path, key: str, what: str) -> None:
    (problem,) = problems(tmp_path, GOOD.replace("  debug: {}", f"  debug:\n    ? {key}\n    : 1"))
    assert problem == (
        f"{tmp_path}/config.yaml: line 7: exporters::debug: a key must be text or a number, not a {what}"
    )


def test_a_date_key_is_read_as_its_text(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, GOOD.replace("  debug: {}", "  debug:\n    2024-01-02: 1"))
    assert "exporters::debug::2024-01-02 (line 7): unknown setting" in problem


def test_a_second_document_is_refused(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, GOOD + "---\n" + GOOD)
    assert problem == f"{tmp_path}/config.yaml: line 12: a config is one YAML document; found another"


def test_a_flood_of_problems_is_cut_to_a_readable_list(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD + "".join(f"x{i}: 1\n" for i in range(500)))
    assert len(found) == agent.config.MAX_REPORTED_PROBLEMS + 1
    assert found[-1] == f"{tmp_path}/config.yaml: … and 400 more problems"


def test_a_megabyte_key_is_shortened_in_messages(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, GOOD + "? " + "k" * 2**20 + "\n: 1\n")
    assert len(problem) < 300 and "unknown top-level section" in problem


# --- --set and ${env:...} ---------------------------------------------------------------------------


def test_set_values_have_the_same_limits() -> None:
    data: dict[str, object] = {}
    found = apply_sets(
        data,
        [
            "a=" + billion_laughs(),
            "b=" + "[" * 100_000,
            "c=" + "[" * 10 + "]" * 10,
            "d={not yaml",
            "e=2001-02-30",
        ],
    )
    assert found[0].startswith("--set 'a': line 7: the alias *a5 expands to 55,987 values")
    assert found[1].startswith(f"--set 'b': line 1: lists and mappings nested more than {MAX_YAML_DEPTH}")
    assert found[2] == "--set 'e=2001-02-30': cannot read '2001-02-30': day is out of range for month"
    assert len(found) == 3
    assert data == {"c": [[[[[[[[[[]]]]]]]]]], "d": "{not yaml"}


def test_set_on_a_config_that_is_not_a_mapping_is_a_problem() -> None:
    assert apply_sets([1], ["a.b=1"]) == ["--set 'a.b=1': the config is not a mapping"]


def test_env_expansion_is_linear_in_a_value_without_a_closing_brace() -> None:
    # The regex used to rescan to the end from every "${" (hours for this value).
    text = "${env:A:-" * 200_000
    assert expand_env(text, {}) == (text, [])
    assert expand_env("$$ ${env:A:-x} $$$ ${env:B" + "$$" * 3, {}) == ("$ x $$ ${env:B$$$", [])


# --- nothing but ConfigError ------------------------------------------------------------------------


def test_a_component_whose_validate_raises_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statsd_config = FACTORIES[next(k for k in FACTORIES if k[1] == "statsd")].config_class

    def broken(self: object) -> list[tuple[str, str]]:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(statsd_config, "validate", broken)
    (problem,) = problems(tmp_path, GOOD)
    assert problem == (
        f"{tmp_path}/config.yaml: receivers::statsd (line 2): cannot be validated: "
        "OverflowError: cannot convert float infinity to integer"
    )


def test_any_unforeseen_exception_becomes_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deep(data: object, environ: object) -> object:
        return deep(data, environ)

    monkeypatch.setattr(agent.config, "expand_values", deep)
    (problem,) = problems(tmp_path, GOOD)
    assert problem == (
        f"{tmp_path}/config.yaml: the config could not be loaded: "
        "RecursionError: maximum recursion depth exceeded"
    )


def test_validate_refuses_a_bomb_in_one_line_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, billion_laughs() + GOOD)
    assert main(["validate", "-c", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    header, problem, *rest = err.splitlines()
    assert header == "headwater: invalid configuration (1 problem):"
    assert problem.startswith(f"  {path}: line 7: the alias *a5 expands to")
    assert rest == []


_FRAGMENTS = [
    "receivers:", "statsd:", "exporters:", "debug:", "service:", "pipelines:", "metrics:", "\n", "  ", "- ",
    ": ", "[", "]", "{", "}", ",", "&a ", "*a", "&b ", "*b", "<<: ", "!!int ", "!!python/object:os.system ",
    "!!set ", "? ", "'", '"', "#", "---\n", "9" * 5000, "0x", "1e400", ".inf", "2001-02-30", "${env:X}",
    "${env:X:-", "$$", "max_series: ", "flush_interval: ", "receive_buffer: ", "99999999999TiB", "\t", "\x00",
    "\ud800", "\ufeff", "é", "\\", "|\n", ">\n", "~", "1:30", "udp: 127.0.0.1:1", "[" * 1000, "]" * 1000,
    "{k: " * 500, "- " * 500, "[" * 500 + "]" * 500, "{k: " * 300 + "}" * 300,
]  # fmt: skip

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["9" * 5000, "1e400GiB", "10s", "64KiB", "127.0.0.1:18125", "${env:X}"]),
)
_structures = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


def _load_or_refuse(content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            result = load_config(path, FACTORIES, environ={"X": "9" * 5000})
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            # The last-resort catch keeps callers safe, but reaching it means an unforeseen failure.
            assert not any("the config could not be loaded" in p for p in exc.problems), exc.problems
        else:
            assert isinstance(result, AgentConfig)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(content: bytes) -> None:
    _load_or_refuse(content)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map("".join))
def test_fuzz_yaml_ish_text(content: str) -> None:
    _load_or_refuse(content)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "receivers": st.fixed_dictionaries({"statsd": _structures}) | _structures,
            "exporters": st.fixed_dictionaries({"debug": _structures}) | _structures,
            "service": _structures,
        },
    ),
    st.sampled_from(["plain", "flow", "anchors"]),
)
def test_fuzz_yaml_structures(data: dict[str, object], style: str) -> None:
    text = yaml.safe_dump(data, default_flow_style=style == "flow", allow_unicode=True)
    if style == "anchors":
        # Give every value a share of one anchored list: aliases all over the document.
        text = "x_shared: &s [1, [2, {three: 3}]]\n" + text.replace(": null", ": *s")
    _load_or_refuse(text)
