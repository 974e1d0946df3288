"""agent.watched_file.WatchedFile: read at start (a bad file stops the start), read again when the
file changes, and a broken or missing file keeps what was read before, warned about once."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from agent.watched_file import WatchedFile


def read(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a map")
    return data


def replace(path: Path, text: str) -> None:
    """As a Kubernetes Secret update does: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_missing_or_bad_file_stops_the_first_read(tmp_path: Path) -> None:
    log = logging.getLogger("test.watched")
    with pytest.raises(OSError):
        WatchedFile(str(tmp_path / "absent.json"), read, "keys", log).load()
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="not a map"):
        WatchedFile(str(bad), read, "keys", log).load()


def test_changes_are_read_and_a_broken_file_keeps_the_previous_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"a": 1}')
    calls: list[str] = []

    def counting(p: str) -> dict[str, int]:
        calls.append(p)
        return read(p)

    watched = WatchedFile(str(path), counting, "keys", logging.getLogger("test.watched"))
    assert watched.load() == {"a": 1} and watched.value == {"a": 1}
    watched.refresh()
    assert len(calls) == 1  # unchanged: one stat, no read
    replace(path, '{"a": 2}')
    watched.refresh()
    assert watched.value == {"a": 2} and len(calls) == 2
    with caplog.at_level(logging.WARNING):
        replace(path, "{not json")
        watched.refresh()
        watched.refresh()  # the same broken file: warned about once
        assert watched.value == {"a": 2}
        assert caplog.text.count("keeping the previous keys") == 1
        path.unlink()
        watched.refresh()
        assert "is missing; keeping the previous keys" in caplog.text and watched.value == {"a": 2}
    replace(path, '{"b": 3}')
    watched.refresh()
    assert watched.value == {"b": 3}
