"""``headwater test`` as CI runs it: a subprocess per test file of the project's examples (each passes,
exit 0), a changed config failing with a readable diff and exit 1, JUnit XML for CI, and a refused test
file (exit 2) naming what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TESTS = sorted((ROOT / "examples").glob("*.tests.yaml"))
TIMEOUT_S = 120.0
"""Bounds a run that hangs anyway (an example's tests take well under a second of simulated time)."""


def _config_of(tests: Path) -> Path:
    """``examples/X.tests.yaml`` tests ``examples/X.yaml``; ``config.example.tests.yaml`` the root one."""
    stem = tests.name.removesuffix(".tests.yaml")
    return ROOT / "config.example.yaml" if stem == "config.example" else tests.with_name(stem + ".yaml")


ENVIRONMENT = {"SIGNOZ_INGESTION_KEY": "test-key", "EVENTS_JWT_SECRET": "test-secret-" + "x" * 32}
"""What the examples' configs require from the environment (values a test never sends anywhere)."""


def _headwater(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "test", *args],
        cwd=ROOT,
        env={**os.environ, **ENVIRONMENT},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_every_example_with_tests_is_covered() -> None:
    assert {p.name for p in EXAMPLE_TESTS} >= {
        "config.example.tests.yaml",
        "remote-write.tests.yaml",
        "victoriametrics.tests.yaml",
        "signoz-self-hosted.tests.yaml",
        "signoz-cloud.tests.yaml",
        "drift-retrain.tests.yaml",
        "events-commands-agents.tests.yaml",
    }
    for tests in EXAMPLE_TESTS:
        assert _config_of(tests).exists(), f"{tests.name} has no config {_config_of(tests).name}"


@pytest.mark.parametrize("tests", EXAMPLE_TESTS, ids=lambda p: p.name)
def test_the_examples_pass_their_tests(tests: Path) -> None:
    done = _headwater("-c", str(_config_of(tests)), str(tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert " PASSED" in done.stdout
    assert "FAILED" not in done.stdout


def test_a_changed_config_fails_with_a_readable_diff(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    done = _headwater(
        "-c",
        "examples/remote-write.yaml",
        "--set",
        "exporters.prometheus_remote_write.send_native_histograms=true",
        "examples/remote-write.tests.yaml",
        "--junit",
        str(junit),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "::a timer in ms leaves as a histogram in seconds FAILED" in out
    assert "::a StatsD counter leaves as http_requests_total with its tags as labels PASSED" in out
    assert "expected: exporter/prometheus_remote_write: http_request_duration_seconds_sum value=0.25" in out
    assert "observed: 0 matching of 1 points at exporter/prometheus_remote_write" in out
    assert '  - http_request_duration_seconds{route="/api"} (histogram)' in out
    assert "2 passed, 1 failed" in out
    suite = ET.parse(junit).getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")


def test_a_bad_test_file_is_refused_with_exit_2_naming_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tests.yaml"
    bad.write_text("version: 1\ntests:\n  - name: a\n    inputs: [{at: 1s, receiver: statsd}]\n")
    done = _headwater("-c", "examples/remote-write.yaml", str(bad))
    assert done.returncode == 2
    assert f"{bad}: tests[0].inputs[0]: give exactly one of statsd, json, otlp (got none)" in done.stdout
