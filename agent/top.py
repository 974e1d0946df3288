"""``headwater top``: a terminal view of a running agent, refreshed every second from its /api/overview.

Per component the points in, out, refused, dropped and failed per second, each exporter's queue and
its oldest record's age; the process (resident memory, CPU, event-loop lag); pending and firing alerts;
refusals and drops by reason; the top metrics by series and by points per second with their biggest
labels. Keys: ``s`` cycles the sort column, ``/`` filters components, alerts and metrics by a substring
(Enter applies, Esc cancels, an empty filter clears it), ``q`` quits.

Plain curses from the standard library (no mouse, no colours needed) so that it works over SSH and in
``kubectl exec -it``. The endpoint is read by a thread of its own: a slow or unreachable agent never
holds the keys, and the screen says so and keeps retrying. What the screen shows is built by
:func:`render` (lines of text for a width and height), apart from curses, so a terminal of any size
gets what fits.
"""

from __future__ import annotations

import contextlib
import curses
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

REFRESH_S = 1.0
REQUEST_TIMEOUT_S = 3.0
MIN_WIDTH, MIN_HEIGHT = 40, 6


def _num(x: float | None) -> str:
    if x is None:
        return "…"
    a = abs(x)
    if a >= 1e9:
        return f"{x / 1e9:.1f}G"
    if a >= 1e6:
        return f"{x / 1e6:.1f}M"
    if a >= 1e4:
        return f"{x / 1e3:.1f}k"
    if a >= 100 or x == int(x):
        return str(round(x))
    return f"{x:.1f}"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.1f}MiB"


def _labels(labels: Any) -> str:
    """A metric's biggest labels, however the tracker lists them: {label: distinct values} or a list of
    names or of {label|name, values|series}."""
    if isinstance(labels, dict):
        return " ".join(f"{k}({_num(v) if isinstance(v, int | float) else v})" for k, v in labels.items())
    if isinstance(labels, list):
        parts = []
        for item in labels:
            if isinstance(item, dict):
                name = item.get("label", item.get("name", "?"))
                count = item.get("values", item.get("series"))
                parts.append(f"{name}({_num(count)})" if isinstance(count, int | float) else str(name))
            else:
                parts.append(str(item))
        return " ".join(parts)
    return ""


def _rate(c: dict[str, Any], measure: str) -> float | None:
    per_s = c.get("per_s")
    return per_s.get(measure) if per_s else None


SORTS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("in/s", lambda c: _rate(c, "in") or 0.0),
    ("out/s", lambda c: _rate(c, "out") or 0.0),
    ("refused/s", lambda c: _rate(c, "refused") or 0.0),
    ("dropped/s", lambda c: _rate(c, "dropped") or 0.0),
    ("failed/s", lambda c: _rate(c, "failed") or 0.0),
    ("queue", lambda c: (c.get("queue") or {}).get("points", (c.get("queue") or {}).get("requests", 0.0))),
    ("component", lambda c: c["key"]),
)
"""Sort columns, cycled by ``s``: numbers largest first, the component name alphabetically."""


@dataclass
class ViewState:
    """What the keys changed: the sort column, the filter, a filter being typed."""

    sort: int = 0
    filter: str = ""
    typing: str | None = None
    """The filter being typed after ``/`` (None: not typing)."""

    def key(self, ch: int) -> bool:
        """Apply one key; False when it asks to quit."""
        if self.typing is not None:
            if ch in (10, 13, curses.KEY_ENTER):
                self.filter, self.typing = self.typing.strip(), None
            elif ch == 27:  # Esc
                self.typing = None
            elif ch in (curses.KEY_BACKSPACE, 127, 8):
                self.typing = self.typing[:-1]
            elif 32 <= ch < 127:
                self.typing += chr(ch)
            return True
        if ch in (ord("q"), ord("Q")):
            return False
        if ch == ord("s"):
            self.sort = (self.sort + 1) % len(SORTS)
        elif ch == ord("S"):
            self.sort = (self.sort - 1) % len(SORTS)
        elif ch == ord("/"):
            self.typing = self.filter
        return True

    def matches(self, *texts: str) -> bool:
        needle = self.filter.lower()
        return not needle or any(needle in t.lower() for t in texts)


@dataclass
class Reading:
    """The latest answer of the endpoint, or why there is none."""

    doc: dict[str, Any] | None = None
    error: str | None = None
    at: float = 0.0
    """time.monotonic() of the last successful read."""
    seq: int = 0
    """Counts reads, failed ones included (the screen redraws when it moves)."""


@dataclass
class Line:
    text: str
    style: str = ""
    """"" plain, "title", "head" (column headers, section titles), "bad", "dim"."""


HEADS = ("IN/S", "OUT/S", "REFUSED/S", "DROPPED/S", "FAILED/S", "QUEUE", "OLDEST")
WIDTHS = (9, 9, 10, 10, 9, 8, 8)
"""The component table's number columns; the name takes what the terminal's width leaves."""


def _ranked(metrics: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    return sorted(metrics, key=lambda m: m.get(by) or 0, reverse=True)


def render(
    endpoint: str, reading: Reading, view: ViewState, width: int, height: int, now: float
) -> list[Line]:
    """The screen as lines of at most ``width`` characters, at most ``height`` of them."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        return [
            Line(f"{width}x{height}: too small"[:width], "bad"),
            Line(f"need {MIN_WIDTH}x{MIN_HEIGHT}"[:width]),
        ][:height]
    lines: list[Line] = []
    doc = reading.doc
    title = f"headwater top  {endpoint}"
    if doc is not None:
        proc = doc["process"]
        cpu = proc.get("cpu_percent")
        title += (
            f"  v{doc['version']}  {'ready' if doc['ready'] else 'NOT READY'}  up {_dur(doc['uptime_s'])}"
            f"  |  rss {_bytes(proc.get('rss_bytes'))}  cpu {'…' if cpu is None else f'{cpu:.1f}%'}"
            f"  loop lag {_dur(proc.get('loop_lag_s'))} (max {_dur(proc.get('loop_lag_max_s'))})"
        )
    lines.append(Line(title, "title"))
    if view.typing is not None:
        lines.append(Line(f"filter: {view.typing}_   (Enter apply, Esc cancel)", "head"))
    else:
        shown = view.filter or "-"
        lines.append(Line(f"sort: {SORTS[view.sort][0]} (s)   filter: {shown} (/)   quit (q)", "dim"))
    if reading.error is not None:
        age = f"; last answer {now - reading.at:.0f}s ago" if doc is not None else ""
        lines.append(Line(f"cannot read the agent: {reading.error} - retrying every second{age}", "bad"))
    if doc is None:
        if reading.error is None:
            lines.append(Line(f"connecting to {endpoint}…", "dim"))
        return [Line(ln.text[:width], ln.style) for ln in lines[:height]]

    key_of, reverse = SORTS[view.sort][1], SORTS[view.sort][0] != "component"
    components = [c for c in doc["components"] if view.matches(c["key"])]
    names = [c["id"] + (f" @{c['pipeline']}" if c.get("pipeline") else "") for c in doc["components"]]
    name_w = min(48, max(16, *(len(n) + 2 for n in names)))
    # A narrow terminal loses number columns from the right rather than the names.
    ncols = len(WIDTHS)
    while ncols > 2 and 11 + name_w + sum(w + 1 for w in WIDTHS[:ncols]) > width:
        ncols -= 1
    widths = WIDTHS[:ncols]
    lines.append(Line(""))
    lines.append(
        Line(
            f"{'KIND':<10} {'COMPONENT':<{name_w}}"
            + "".join(f" {h:>{w}}" for h, w in zip(HEADS, widths, strict=False)),
            "head",
        )
    )
    components.sort(key=key_of, reverse=reverse)
    rows = []
    for c in components:
        q = c.get("queue")
        queue = "" if not q else _num(q.get("points", q.get("requests")))
        oldest = "" if not q or "oldest_age_s" not in q else _dur(q["oldest_age_s"])
        name = c["id"] + (f" @{c['pipeline']}" if c.get("pipeline") else "")
        if c["state"] != "running":
            name += f" [{c['state']}]"
        cells = [
            "" if c["total"][m] is None else _num(_rate(c, m))
            for m in ("in", "out", "refused", "dropped", "failed")
        ]
        cells += [queue, oldest]
        bad = any((_rate(c, m) or 0) > 0 for m in ("refused", "dropped", "failed"))
        rows.append(
            Line(
                f"{c['kind']:<10} {name[:name_w]:<{name_w}}"
                + "".join(f" {v:>{w}}" for v, w in zip(cells, widths, strict=False)),
                "bad" if bad else "",
            )
        )
    if not rows:
        rows.append(Line(f"  no component matches {view.filter!r}", "dim"))

    # Below the components what fits, in order: alerts, reasons, top metrics.
    sections: list[list[Line]] = []
    alerts = [
        a
        for a in doc["alerts"]
        if view.matches(str(a.get("rule")), str(a.get("metric")), str(a.get("component")))
    ]
    firing = sum(1 for a in alerts if a.get("state") == "firing")
    section = [Line(f"ALERTS  {firing} firing, {len(alerts) - firing} pending", "head")]
    for a in alerts:
        labels = ",".join(f"{k}={v}" for k, v in (a.get("labels") or {}).items())
        severity = f" [{a['severity']}]" if a.get("severity") else ""
        section.append(
            Line(
                f"  {str(a.get('state')).upper():<8} {a.get('rule')}{severity}  {a.get('metric')}{{{labels}}}"
                f" = {_num(a.get('value'))}  ({a.get('component')})",
                "bad" if a.get("state") == "firing" else "",
            )
        )
    sections.append(section)

    reasons = [r for r in doc["refusals"] if view.matches(r["component"], r["reason"])]
    section = [Line("REFUSED / DROPPED / FAILED BY REASON", "head")]
    for r in reasons:
        section.append(
            Line(
                f"  {r['component']:<{name_w + 11}} {r['measure']:<8} {r['reason']:<24}"
                f" {_num(r['per_s']):>8}/s  {_num(r['total']):>8} total",
                "bad" if r["per_s"] else "",
            )
        )
    if not reasons:
        section.append(Line("  none", "dim"))
    sections.append(section)

    top = doc.get("top_metrics")
    if top is None:
        sections.append([Line("TOP METRICS  not available from this agent (no top-metrics tracker)", "head")])
    else:
        metrics = [m for m in top if view.matches(str(m.get("name", m.get("metric", ""))))]
        for title, field_ in (("BY SERIES", "series"), ("BY POINTS/S", "points_per_s")):
            ranked = _ranked(metrics, field_)
            head = f"{'TOP METRICS ' + title:<42} {'SERIES':>8} {'POINTS/S':>10}  BIGGEST LABELS"
            section = [Line(head, "head")]
            for m in ranked[:10]:
                name = str(m.get("name", m.get("metric", "?")))
                section.append(
                    Line(
                        f"  {name[:40]:<40} {_num(m.get('series')):>8} {_num(m.get('points_per_s')):>10}"
                        f"  {_labels(m.get('labels'))}"
                    )
                )
            if not ranked:
                section.append(Line("  none seen yet", "dim"))
            sections.append(section)

    room = height - len(lines)
    extra = sum(len(s) + 1 for s in sections)
    # The components get the room the sections leave, at least 3 rows (or all of them).
    keep_rows = max(min(len(rows), 3), room - extra)
    if keep_rows < len(rows):
        rows = [*rows[: max(0, keep_rows - 1)], Line(f"  … {len(rows) - keep_rows + 1} more", "dim")]
    lines += rows
    for section in sections:
        if len(lines) + 2 > height:
            break
        lines.append(Line(""))
        lines += section
    return [Line(ln.text[:width], ln.style) for ln in lines[:height]]


class Poller:
    """Reads /api/overview every REFRESH_S in a thread of its own; ``reading`` is its latest result."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.reading = Reading()
        self.changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="headwater-top", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S + 1)

    def _read(self) -> Reading:
        last = self.reading
        try:
            req = urllib.request.Request(self.url, headers=self._headers)
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                doc = json.loads(resp.read())
            return Reading(doc, None, time.monotonic(), last.seq + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            if exc.code == 401:
                detail += " (pass --token)"
            error = f"HTTP {exc.code}: {detail}"
        except urllib.error.URLError as exc:
            error = str(exc.reason)
        except (OSError, ValueError) as exc:  # a reset connection, a cut-off or non-JSON body
            error = str(exc) or type(exc).__name__
        return Reading(last.doc, error, last.at, last.seq + 1)

    def _run(self) -> None:
        while True:
            self.reading = self._read()
            self.changed.set()
            if self._stop.wait(REFRESH_S):
                return


_STYLES = {"title": curses.A_REVERSE | curses.A_BOLD, "head": curses.A_BOLD, "dim": curses.A_DIM}


def _draw(screen: curses.window, lines: list[Line], bad: int) -> None:
    screen.erase()
    for y, line in enumerate(lines):
        attr = bad if line.style == "bad" else _STYLES.get(line.style, curses.A_NORMAL)
        if line.style == "title":
            line = Line(line.text.ljust(screen.getmaxyx()[1]), line.style)
        # Writing the bottom-right cell raises (curses cannot move the cursor past it): it is written.
        with contextlib.suppress(curses.error):
            screen.addnstr(y, 0, line.text, screen.getmaxyx()[1], attr)
    screen.refresh()


def _loop(screen: curses.window, endpoint: str, poller: Poller) -> None:
    curses.curs_set(0)
    bad = curses.A_BOLD
    if curses.has_colors():
        curses.use_default_colors()
        curses.init_pair(1, curses.COLOR_RED, -1)
        bad = curses.color_pair(1) | curses.A_BOLD
    screen.timeout(100)
    view = ViewState()
    dirty = True
    while True:
        if poller.changed.is_set():
            poller.changed.clear()
            dirty = True
        if dirty:
            height, width = screen.getmaxyx()
            _draw(screen, render(endpoint, poller.reading, view, width, height, time.monotonic()), bad)
            dirty = False
        ch = screen.getch()
        if ch == -1:
            continue
        if ch == curses.KEY_RESIZE:
            dirty = True
            continue
        if not view.key(ch):
            return
        dirty = True


def top_command(endpoint: str, token: str | None) -> int:
    """Run the view until ``q``; 2 when stdout is not a terminal."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("headwater top: needs a terminal (use -t with docker or kubectl exec)", file=sys.stderr)
        return 2
    base = endpoint if "://" in endpoint else f"http://{endpoint}"
    poller = Poller(base.rstrip("/") + "/api/overview", token)
    os.environ.setdefault("ESCDELAY", "25")  # Esc cancels a filter at once, not after curses' 1 s
    poller.start()
    try:
        curses.wrapper(_loop, endpoint, poller)
    except KeyboardInterrupt:
        pass
    finally:
        poller.stop()
    return 0
