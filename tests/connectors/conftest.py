"""The connector tests run under the loop-block guard (tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import LOOP_BLOCK_LIMIT_S


@pytest.fixture
def loop_block_limit_s() -> float | None:
    """Every connector test fails if one event-loop callback runs longer than LOOP_BLOCK_LIMIT_S."""
    return LOOP_BLOCK_LIMIT_S
