"""The debug exporter with a large batch and hostile label values: written in slices that let the
event loop run, one valid ASCII JSON line per point whatever the labels hold, failures counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.model import Kind, MetricBatch, Point
from exporters import debug
from tests.exporters.conftest import Ticker
from tests.exporters.test_debug import make
from tests.exporters.test_prometheus import now


async def test_a_large_batch_is_written_in_slices_that_let_the_loop_run(tmp_path: Path) -> None:
    exp, path, tel = make(tmp_path, "normal")
    await exp.start()
    t = now()
    n = 5 * debug._SLICE + 7
    batch = MetricBatch(tuple(Point("m", Kind.GAUGE, (("i", str(i)),), t, value=i) for i in range(n)))
    ticker = Ticker()
    await exp.consume(batch)
    assert await ticker.stop() >= 5
    await exp.shutdown()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["value"] for line in lines] == list(range(n))
    assert tel.value("exporter_sent_points_total") == n


async def test_control_characters_stay_inside_one_ascii_json_line(tmp_path: Path) -> None:
    exp, path, _ = make(tmp_path, "detailed")
    await exp.start()
    hostile = "a\x00b\x1b[2Jc\rd\ne\x85f\ud800g\u2028h"
    await exp.consume(MetricBatch((Point("m\x1b", Kind.GAUGE, (("k\x00", hostile),), now(), value=1),)))
    await exp.shutdown()
    raw = path.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert not any(c < 0x20 for c in raw[:-1])
    line = json.loads(raw)
    assert line["name"] == "m\x1b" and line["labels"] == {"k\x00": hostile}  # every character kept


async def test_a_failed_write_counts_what_was_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp, path, tel = make(tmp_path, "normal")
    await exp.start()
    calls = 0
    real = debug._write

    def failing_second(out: object, text: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk full")
        real(out, text)  # type: ignore[arg-type]

    monkeypatch.setattr(debug, "_write", failing_second)
    n = 3 * debug._SLICE
    t = now()
    await exp.consume(MetricBatch(tuple(Point("m", Kind.GAUGE, (), t, value=i) for i in range(n))))
    await exp.shutdown()
    assert len(path.read_text().splitlines()) == debug._SLICE
    assert tel.value("exporter_sent_points_total") == debug._SLICE
    assert tel.value("exporter_dropped_points_total", reason="write_error") == n - debug._SLICE
    assert asyncio.get_running_loop().is_running()
