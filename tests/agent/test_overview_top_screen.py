"""What ``headwater top`` draws from an overview (agent.top.render): the sort column, the filter, the
sections below the components, the top metrics ranked both ways, small terminals and an endpoint that
does not answer; and the keys that change the view."""

from __future__ import annotations

from typing import Any

from agent.top import SORTS, Reading, ViewState, render


def _component(
    key: str, kind: str, in_s: float | None, out_s: float, refused_s: float = 0.0
) -> dict[str, Any]:
    cid = key.split(":", 1)[1].split("@")[0]
    # What each kind counts (agent.overview): a receiver no failures, an exporter no refusals.
    rates = {"in": in_s, "out": out_s, "refused": refused_s, "dropped": 0.0, "failed": None}
    if kind != "receiver":
        rates["refused"] = None
    if kind == "exporter":
        rates["failed"] = 0.0
    return {
        "key": key,
        "kind": kind,
        "id": cid,
        "pipeline": key.split("@")[1] if "@" in key else None,
        "state": "running",
        "total": {m: (None if v is None else v * 10) for m, v in rates.items()},
        "per_s": rates,
        "reasons": [],
        **({"queue": {"requests": 2.0, "points": 900.0, "oldest_age_s": 75.0}} if kind == "exporter" else {}),
    }


DOC: dict[str, Any] = {
    "version": "0.1.0",
    "ready": True,
    "uptime_s": 65.0,
    "window_s": 1.0,
    "process": {"rss_bytes": 60 * 2**20, "cpu_percent": 3.25, "loop_lag_s": 0.002, "loop_lag_max_s": 0.04},
    "components": [
        _component("receiver:statsd", "receiver", 500.0, 450.0, refused_s=50.0),
        _component("processor:batch@metrics", "processor", 20.0, 20.0),
        _component("exporter:otlp_http", "exporter", None, 3000.0),
    ],
    "refusals": [
        {
            "component": "receiver:statsd",
            "measure": "refused",
            "reason": "malformed_line",
            "total": 80,
            "per_s": 50.0,
        }
    ],
    "alerts": [
        {
            "component": "threshold/cpu",
            "rule": "cpu_high",
            "metric": "cpu.user",
            "labels": {"host": "web-1"},
            "state": "firing",
            "severity": "critical",
            "value": 97.0,
        }
    ],
    "top_metrics": [
        {"name": "http.requests", "series": 900, "points_per_s": 5.0, "labels": {"path": 850, "code": 5}},
        {"name": "cpu.user", "series": 3, "points_per_s": 80.0, "labels": [{"label": "host", "values": 3}]},
    ],
}


def _screen(view: ViewState | None = None, width: int = 160, height: int = 40, **reading: Any) -> list[str]:
    lines = render(
        "127.0.0.1:8888", Reading(**{"doc": DOC, **reading}), view or ViewState(), width, height, 0.0
    )
    assert len(lines) <= height and all(len(line.text) <= width for line in lines)
    return [line.text for line in lines]


def _rows(screen: list[str]) -> list[str]:
    return [
        line.split()[1] for line in screen if line.split()[:1] in (["receiver"], ["processor"], ["exporter"])
    ]


def test_everything_on_a_large_terminal() -> None:
    screen = _screen()
    text = "\n".join(screen)
    assert "v0.1.0  ready  up 1m05s" in screen[0] and "rss 60.0MiB  cpu 3.2%" in screen[0]
    assert "loop lag 2ms (max 40ms)" in screen[0]
    assert _rows(screen) == ["statsd", "batch", "otlp_http"]  # by in/s; an exporter has none
    [exporter] = [line for line in screen if line.startswith("exporter")]
    assert exporter.split()[2:] == ["3000", "0", "0", "900", "1m15s"]  # out, dropped, failed, queue, oldest
    assert "FIRING   cpu_high [critical]  cpu.user{host=web-1} = 97  (threshold/cpu)" in text
    assert "malformed_line" in text and "50/s" in text
    by_series = screen.index(next(line for line in screen if line.startswith("TOP METRICS BY SERIES")))
    by_rate = screen.index(next(line for line in screen if line.startswith("TOP METRICS BY POINTS/S")))
    assert (
        screen[by_series + 1].split()[0] == "http.requests" and "path(850) code(5)" in screen[by_series + 1]
    )
    assert screen[by_rate + 1].split()[0] == "cpu.user" and "host(3)" in screen[by_rate + 1]


def test_keys_sort_and_filter() -> None:
    view = ViewState()
    assert view.key(ord("s")) and SORTS[view.sort][0] == "out/s"
    assert _rows(_screen(view)) == ["otlp_http", "statsd", "batch"]
    while SORTS[view.sort][0] != "component":
        view.key(ord("s"))
    assert _rows(_screen(view)) == ["otlp_http", "batch", "statsd"]  # exporter:, processor:, receiver:

    for ch in "/stat":
        view.key(ord(ch))
    assert "filter: stat_" in _screen(view)[1] and view.filter == ""
    view.key(10)  # Enter
    screen = _screen(view)
    assert view.filter == "stat" and _rows(screen) == ["statsd"]
    assert "cpu_high" not in "\n".join(screen) and "http.requests" not in "\n".join(screen)
    view.key(ord("/"))
    view.key(27)  # Esc: the filter stays as it was
    assert view.typing is None and view.filter == "stat"
    for ch in (ord("/"), 127, 127, 127, 127, 10):  # backspace it away, Enter: no filter
        view.key(ch)
    assert view.filter == "" and len(_rows(_screen(view))) == 3
    assert not view.key(ord("q"))


def test_small_terminals_and_a_missing_endpoint() -> None:
    assert _screen(width=30, height=10)[0].startswith("30x10: too small")
    narrow = _screen(width=60)
    [head] = [line for line in narrow if line.startswith("KIND")]
    assert head.split() == ["KIND", "COMPONENT", "IN/S", "OUT/S", "REFUSED/S"]  # the names stay whole
    assert [line.split()[:5] for line in narrow if line.startswith("receiver")] == [
        ["receiver", "statsd", "500", "450", "50"]
    ]
    short = _screen(height=8)
    assert _rows(short)[:1] == ["statsd"]  # the components come first; the sections go
    assert not any(line.startswith("TOP METRICS") for line in short)
    down = _screen(doc=None, error="[Errno 111] Connection refused")
    assert "cannot read the agent: [Errno 111] Connection refused - retrying every second" in down
    stale = _screen(error="timed out", at=-30.0)
    assert any("retrying every second; last answer 30s ago" in line for line in stale)
    assert _rows(stale) == ["statsd", "batch", "otlp_http"]  # the last answer stays on screen
    assert _screen(doc={**DOC, "top_metrics": None})[-1].startswith("TOP METRICS  not available")
