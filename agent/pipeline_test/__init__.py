"""``headwater test -c config.yaml tests.yaml …``: unit tests for a pipeline, over simulated time.

A test file (format: :mod:`agent.pipeline_test.model`, version 1) names inputs (StatsD lines, JSON
items, OTLP/JSON requests, each with a time and the receiver it enters) and expectations on what leaves
a processor or connector, what an exporter would send (decoded from the request it makes: remote-write
protobuf, OTLP protobuf), and the alerts a ``threshold`` processor notifies. The runner
(:mod:`agent.pipeline_test.runner`) builds the config's metrics pipelines with a simulated clock and
no backend contacted; :mod:`agent.pipeline_test.match` checks and explains; this module runs files,
prints pytest-like results, writes JUnit XML and, with ``--update``, golden expectation files.
"""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from agent.config import AgentConfig
from agent.pipeline_test.capture import CaptureServer
from agent.pipeline_test.match import Failure, check_all
from agent.pipeline_test.model import VERSION, PipelineTest, TestFile, TestFileError, load
from agent.pipeline_test.runner import Observations, run_test

__all__ = ["Result", "TestFileError", "main", "run_files"]


@dataclass(frozen=True)
class Result:
    file: str
    test: PipelineTest
    failures: tuple[Failure, ...]
    seen: Observations
    seconds: float
    error: str = ""
    """A crash of the runner itself (reported as an error, not a failure)."""

    @property
    def passed(self) -> bool:
        return not self.failures and not self.error


async def _run_file(config: AgentConfig, tests: TestFile, capture: CaptureServer) -> list[Result]:
    results = []
    for test in tests.tests:
        t0 = time.perf_counter()
        try:
            seen = await run_test(config, test, capture)
        except Exception as exc:  # a test that breaks the runner is an error of that test, not of the run
            results.append(Result(tests.path, test, (), Observations(), time.perf_counter() - t0, repr(exc)))
            continue
        failures = tuple(check_all(test.expect, seen))
        results.append(Result(tests.path, test, failures, seen, time.perf_counter() - t0))
    return results


async def run_files(config: AgentConfig, files: Sequence[TestFile]) -> list[Result]:
    capture = CaptureServer()
    await capture.start()
    try:
        results: list[Result] = []
        for f in files:
            results += await _run_file(config, f, capture)
        return results
    finally:
        await capture.stop()


def golden(results: Sequence[Result]) -> dict[str, Any]:
    """The observed outputs of ``results`` (one file's) as expectations: every distinct point at every
    place (labels exact, with the number of times it was seen) and every alert notification."""
    tests = []
    raw: Any = {"tests": []}
    if results:
        with open(results[0].file, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    by_name = {str(t.get("name")): t for t in raw.get("tests", [])}
    for r in results:
        expect: list[dict[str, Any]] = []
        for place in sorted(r.seen.points):
            counts: dict[Any, int] = {}
            for o in r.seen.points[place]:
                counts[o] = counts.get(o, 0) + 1
            for o, n in counts.items():
                expect.append({"at": place, **o.as_dict(), "labels_exact": True, "count": n})
        alerts: dict[Any, int] = {}
        for a in r.seen.alerts:
            alerts[a] = alerts.get(a, 0) + 1
        for a, n in alerts.items():
            expect.append({"alert": a.name, "status": a.status, "labels": dict(a.labels), "count": n})
        entry = dict(by_name.get(r.test.name, {"name": r.test.name}))
        entry["expect"] = expect
        tests.append(entry)
    return {"version": VERSION, "tests": tests}


def junit(results: Sequence[Result]) -> bytes:
    suite = ET.Element(
        "testsuite",
        name="headwater test",
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.failures)),
        errors=str(sum(1 for r in results if r.error)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=os.path.basename(r.file), name=r.test.name, time=f"{r.seconds:.3f}"
        )
        if r.error:
            ET.SubElement(case, "error", message=r.error).text = r.error
        elif r.failures:
            text = "\n\n".join(f.message for f in r.failures)
            ET.SubElement(case, "failure", message=f"{len(r.failures)} expectation(s) not met").text = text
    xml: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return xml


def report(results: Sequence[Result], out: TextIO, seconds: float) -> None:
    for r in results:
        status = "PASSED" if r.passed else ("ERROR" if r.error else "FAILED")
        out.write(f"{r.file}::{r.test.name} {status}\n")
    bad = [r for r in results if not r.passed]
    if bad:
        out.write("\n" + "=" * 30 + " FAILURES " + "=" * 30 + "\n")
    for r in bad:
        out.write(f"_____ {r.file}::{r.test.name} _____\n")
        if r.error:
            out.write(f"the runner failed: {r.error}\n")
        for f in r.failures:
            out.write(f.message + "\n\n")
    passed = sum(1 for r in results if r.passed)
    failed = len(results) - passed
    summary = f"{passed} passed" + (f", {failed} failed" if failed else "")
    out.write(f"===== {summary} in {seconds:.2f}s =====\n")


def main(
    config: AgentConfig,
    paths: Sequence[str],
    out: TextIO,
    *,
    junit_path: str = "",
    update: bool = False,
) -> int:
    """Run the test files; 0 when every test passed, 1 otherwise, 2 for an unusable test file."""
    try:
        files = [load(p) for p in paths]
    except TestFileError as exc:
        out.write("\n".join(exc.problems) + "\n")
        return 2
    t0 = time.perf_counter()
    results = asyncio.run(run_files(config, files))
    seconds = time.perf_counter() - t0
    if update:
        for f in files:
            mine = [r for r in results if r.file == f.path]
            errors = [r for r in mine if r.error]
            if errors:
                out.write(
                    f"{f.path}: not updated, the runner failed on {errors[0].test.name}: {errors[0].error}\n"
                )
                return 1
            text = yaml.safe_dump(golden(mine), sort_keys=False, allow_unicode=True, width=110)
            with open(f.path, "w", encoding="utf-8") as fh:
                fh.write(text)
            out.write(f"wrote the observed outputs of {len(mine)} test(s) to {f.path}\n")
        return 0
    report(results, out, seconds)
    if junit_path:
        with open(junit_path, "wb") as fh:
            fh.write(junit(results))
    return 0 if all(r.passed for r in results) else 1
