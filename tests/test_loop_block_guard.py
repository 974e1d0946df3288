"""The loop-block guard of tests/conftest.py, run on generated tests in a pytest subprocess: a coroutine
that sleeps synchronously fails, one that awaits passes, and the marker moves or lifts the limit."""

from __future__ import annotations

from pathlib import Path

import pytest

GENERATED = """
import asyncio
import time

import pytest


@pytest.fixture
def loop_block_limit_s():
    return 2.0  # below the 2.5 s and 3 s blocks of these tests


async def test_blocks_the_loop():
    await asyncio.sleep(0)
    time.sleep(3)


async def test_awaits():
    for _ in range(20):
        await asyncio.sleep(0.01)


@pytest.mark.loop_block_limit(None)
async def test_unguarded():
    time.sleep(2.5)


@pytest.mark.loop_block_limit(0.5)
async def test_blocks_past_a_lower_limit():
    time.sleep(1)


@pytest.fixture
async def blocks_on_teardown():
    yield
    time.sleep(3)


async def test_teardown_blocks(blocks_on_teardown):
    pass
"""


def test_a_blocked_loop_fails_the_test_and_the_marker_sets_the_limit(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_generated=GENERATED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=3, failed=2, errors=1)
    out = result.stdout.str()
    assert "FAILED test_generated.py::test_blocks_the_loop" in out
    assert "FAILED test_generated.py::test_blocks_past_a_lower_limit" in out
    assert "ERROR test_generated.py::test_teardown_blocks" in out
    assert "PASSED test_generated.py::test_awaits" in out
    assert "PASSED test_generated.py::test_unguarded" in out
    result.stdout.re_match_lines(
        [
            r".*blocked longer than 2 s during the test.*",
            r"\s+3\.\d s in <Task .*coro=<test_blocks_the_loop\(\).*",
        ],
        consecutive=False,
    )
    result.stdout.re_match_lines([r".*blocked longer than 0.5 s during the test.*"])
    result.stdout.re_match_lines([r".*blocked longer than 2 s during teardown.*"])
