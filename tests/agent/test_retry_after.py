"""agent.sending.retry_after_s: the one reading of a server's Retry-After (RFC 9110 10.2.3)."""

from __future__ import annotations

import email.utils

import pytest

from agent.sending import RETRY_AFTER_MAX_S, retry_after_s

NOW_S = 1445412470.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("\u00b2", None),  # superscript two: str.isdigit() says yes, float() refuses
        ("\uff17", None),  # fullwidth seven
        ("-5", None),
        ("+5", None),
        ("1.5", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("99999999999999999999999", RETRY_AFTER_MAX_S),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past: no wait
        ("Fri, 01 Jan 2100 00:00:00 GMT", RETRY_AFTER_MAX_S),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 99999 07:28:00 GMT", None),
    ],
)
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    assert retry_after_s(value, now_s=NOW_S) == expected


def test_retry_after_date_is_relative_to_the_clock() -> None:
    assert retry_after_s(email.utils.formatdate(NOW_S + 42, usegmt=True), now_s=NOW_S) == 42.0
