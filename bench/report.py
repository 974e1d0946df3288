"""The benchmark's report: the StatsD table with its budgets and verdicts, the OTLP table, the notes under
them, and ``bench/results/latest.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from harness import HEADWATER, PEER, RECEIVER_CORE, RESULTS, SENDER_CORE, Sent
from payloads import Payload, throughput_series
from probes import MEMORY_SERIES, Memory, ParserCost, Sustained

BUDGET_LINES_20 = 800_000
BUDGET_PEER_FACTOR = 3.0
BUDGET_LINES_1 = 250_000
BUDGET_STALL_S = 0.050
BUDGET_US_PER_LINE = 1.0
BUDGET_INSTRUCTIONS = 8_000
BUDGET_RSS_MB = 250.0


# -- the StatsD table ------------------------------------------------------------------------------
def fmt_rate(s: Sustained | None) -> str:
    if s is None:
        return "-"
    if s.lines_per_s is None:
        return "no pass"
    return f"{s.lines_per_s:,.0f}" + (" (sender max)" if s.sender_limited else "")


def fmt_loss(s: Sustained | None) -> str:
    if s is None:
        return "-"
    p = s.confirmed or (s.confirmation_runs[-1] if s.confirmation_runs else None)
    if p is None:
        return "-"
    return f"{p.loss * 100:.3f} % ({p.kernel_drops:,} drops, {p.missing_lines:,.0f} missing)"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    tp: dict[str, dict[str, Sustained | None]] = results["throughput"]
    hw20, pe20 = tp[HEADWATER].get("20"), tp.get(PEER, {}).get("20")
    hw1, pe1 = tp[HEADWATER].get("1"), tp.get(PEER, {}).get("1")
    out: list[tuple[str, str, str, str, str]] = []

    def rate(s: Sustained | None) -> float:
        return (s.lines_per_s or 0.0) if s else 0.0

    ok20: bool | None = None
    if hw20:
        ok20 = rate(hw20) >= BUDGET_LINES_20
        if pe20 and pe20.lines_per_s:
            ok20 = ok20 and rate(hw20) >= BUDGET_PEER_FACTOR * rate(pe20)
    ratio = f" = {rate(hw20) / rate(pe20):.1f}× peer" if rate(hw20) and rate(pe20) else ""
    dur = results["confirm_s"]
    out.append(
        (
            f"UDP 20 lines/pkt: sustained lines/s ({dur:g} s, <0.1 % loss)",
            fmt_rate(hw20) + ratio,
            fmt_rate(pe20),
            f"≥ {BUDGET_LINES_20:,} and ≥ 3× peer",
            verdict(ok20),
        )
    )
    out.append(("  loss in that run", fmt_loss(hw20), fmt_loss(pe20), "< 0.1 %", ""))
    out.append(
        (
            "  best received lines/s, any loss",
            f"{hw20.best_received_lines_per_s:,.0f}" if hw20 else "-",
            f"{pe20.best_received_lines_per_s:,.0f}" if pe20 else "-",
            "",
            "",
        )
    )
    out.append(
        (
            f"UDP 1 line/pkt: sustained lines/s ({dur:g} s)",
            fmt_rate(hw1),
            fmt_rate(pe1),
            f"≥ {BUDGET_LINES_1:,}",
            verdict(rate(hw1) >= BUDGET_LINES_1 if hw1 else None),
        )
    )
    out.append(("  loss in that run", fmt_loss(hw1), fmt_loss(pe1), "< 0.1 %", ""))
    out.append(
        (
            "  best received lines/s, any loss",
            f"{hw1.best_received_lines_per_s:,.0f}" if hw1 else "-",
            f"{pe1.best_received_lines_per_s:,.0f}" if pe1 else "-",
            "",
            "",
        )
    )
    lags = [p.lag_max_s for s in (hw20, hw1) if s for p in s.confirmation_runs if p.lag_max_s is not None]
    search_lags = [p.lag_max_s for s in (hw20, hw1) if s for p in s.search if p.lag_max_s is not None]
    out.append(
        (
            "Longest event-loop stall (confirmation runs)",
            f"{max(lags) * 1000:.1f} ms" if lags else "-",
            "n/a",
            f"≤ {BUDGET_STALL_S * 1000:g} ms",
            verdict(max(lags) <= BUDGET_STALL_S if lags else None),
        )
    )
    out.append(
        (
            "  during the search probes (incl. overload)",
            f"{max(search_lags) * 1000:.1f} ms" if search_lags else "-",
            "n/a",
            "",
            "",
        )
    )
    pc: ParserCost | None = results.get("parser")
    if pc is not None:
        for shape, us in pc.parser_cost_rows.items():
            out.append(
                (
                    f"Parser µs/line, parser_cost.py {shape}",
                    f"{us:.3f}",
                    "",
                    f"≤ {BUDGET_US_PER_LINE:g}",
                    verdict(us <= BUDGET_US_PER_LINE),
                )
            )
        if pc.parser_cost_note:
            out.append(("Parser µs/line, parser_cost.py", pc.parser_cost_note, "", "", ""))
        if pc.feed_us_per_line is not None:
            out.append(
                (
                    "Parser µs/line, this benchmark's packets",
                    f"{pc.feed_us_per_line:.3f}",
                    "",
                    f"≤ {BUDGET_US_PER_LINE:g}",
                    verdict(pc.feed_us_per_line <= BUDGET_US_PER_LINE),
                )
            )
        ipl = pc.instructions_per_line
        out.append(
            (
                "Parser instructions/line (callgrind)",
                f"{ipl:,.0f}" if ipl is not None else pc.callgrind_note,
                "",
                f"≤ {BUDGET_INSTRUCTIONS:,}",
                verdict(ipl <= BUDGET_INSTRUCTIONS if ipl is not None else None),
            )
        )
    mem: dict[str, Memory] = results.get("memory", {})
    hm, pm = mem.get(HEADWATER), mem.get(PEER)

    def mb(v: float | None) -> str:
        return f"{v:,.1f} MB" if v is not None else "-"

    out.append(
        (
            f"RSS, {MEMORY_SERIES:,} series after a flush",
            mb(hm.rss_after_flush_mb if hm else None),
            mb(pm.rss_after_flush_mb if pm else None),
            f"≤ {BUDGET_RSS_MB:g} MB",
            verdict(hm.rss_after_flush_mb <= BUDGET_RSS_MB if hm and hm.rss_after_flush_mb else None),
        )
    )
    out.append(("  peak RSS (VmHWM)", mb(hm.hwm_mb if hm else None), mb(pm.hwm_mb if pm else None), "", ""))
    out.append(
        ("  RSS after one scrape of the exporter", mb(hm.rss_after_scrape_mb if hm else None), "n/a", "", "")
    )
    out.append(
        (
            "  idle RSS at start",
            mb(hm.idle_rss_mb if hm else None),
            mb(pm.idle_rss_mb if pm else None),
            "",
            "",
        )
    )
    out.append(
        (
            "  longest stall, 100k-series run",
            f"{hm.flush_lag_max_s * 1000:.1f} ms" if hm and hm.flush_lag_max_s is not None else "-",
            "n/a",
            "",
            "",
        )
    )
    return out


def render(results: dict[str, Any]) -> str:
    table = rows(results)
    head = ("figure", HEADWATER, f"{PEER} {results.get('peer_version') or ''}".strip(), "budget", "verdict")
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(5)]
    lines = [
        f"Headwater benchmark ({results['mode']} mode, {results['started']}): {results['machine']}",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.append("")
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines)


# -- the OTLP table --------------------------------------------------------------------------------
def render_otlp(rows: list[tuple[str, str, str]]) -> str:
    head = ("OTLP figure", "headwater", "budget")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# -- notes and JSON --------------------------------------------------------------------------------
def add_notes(
    results: dict[str, Any], payloads: dict[str, Payload], ceilings: dict[str, Sent], peer_version: str | None
) -> None:
    notes: list[str] = results["notes"]
    p20 = payloads["20"]
    notes.append(
        f"payloads: {throughput_series():,} DogStatsD series (45 % counters, 20 % timers @0.5, 20 % gauges, "
        f"15 % histograms); {p20.mean_lines:g} lines = {p20.mean_bytes:,.0f} B per packet, and 1 line = "
        f"{payloads['1'].mean_bytes:.0f} B per packet"
    )
    notes.append(
        f"sender: {results['sender']} on core {SENDER_CORE}, receivers on core {RECEIVER_CORE}; its ceiling "
        f"into an unread socket: {ceilings['20'].packets_per_s:,.0f} datagrams/s with 20-line packets, "
        f"{ceilings['1'].packets_per_s:,.0f} with 1-line packets (the kernel's loopback work runs on the "
        f"sender's core, so it offers less when the receiver reads)"
    )
    rb: dict[str, int] = {}
    for name, by_payload in results["throughput"].items():
        for s in by_payload.values():
            if s is None:
                continue
            for p in s.search + s.confirmation_runs:
                if p.receive_buffer:
                    rb[name] = p.receive_buffer
            if s.note:
                notes.append(f"{name}, {s.payload}: {s.note}")
            for p in s.search + s.confirmation_runs:
                if p.refused_lines:
                    notes.append(
                        f"{name}, {s.payload}: {p.refused_lines:,.0f} lines refused/bad at "
                        f"{p.asked_lines_per_s:,.0f} lines/s (the payload is valid DogStatsD)"
                    )
                    break
            for p in s.search + s.confirmation_runs:
                if p.self_reported_drops is not None and p.self_reported_drops != p.kernel_drops:
                    notes.append(
                        f"{name}, {s.payload}: headwater_receiver_udp_kernel_drops_total rose by "
                        f"{p.self_reported_drops:,.0f} but /proc/net/udp by {p.kernel_drops:,}"
                    )
                    break
    foreign = [
        p.foreign_cpu
        for by_payload in results["throughput"].values()
        for s in by_payload.values()
        if s is not None
        for p in s.search + s.confirmation_runs
    ]
    if foreign and (max(foreign) > 0.20 or sum(foreign) / len(foreign) > 0.05):
        notes.append(
            f"other processes took up to {max(foreign) * 100:.0f} % of the receivers' core during the probes "
            f"(mean {sum(foreign) / len(foreign) * 100:.0f} %): the receivers' figures are pessimistic;"
            " rerun on an idle machine for clean numbers (per-probe values in latest.json, foreign_cpu)"
        )
    behind = [
        (p.sender_max_behind_ms, p.target, p.payload, p.asked_lines_per_s)
        for by_payload in results["throughput"].values()
        for s in by_payload.values()
        if s is not None
        for p in s.confirmation_runs
        if p.sender_max_behind_ms >= 10
    ]
    for ms, target, payload_name, rate in behind:
        notes.append(
            f"{target}, {payload_name}: the sender fell {ms:.0f} ms behind schedule at {rate:,.0f} lines/s "
            "and caught up in a burst (its core was busy): that confirmation run was burstier than asked"
        )
    sys_ = results["sysctl"]
    buffers = ", ".join(f"{n} {v / 2**20:.2f} MiB" for n, v in rb.items())
    notes.append(
        "receive buffers as the kernel reports them (ss -m rb, twice the size asked): "
        f"{buffers or 'unknown'}; "
        f"kernel defaults untouched: net.core.rmem_max={sys_['net.core.rmem_max']}, "
        f"rmem_default={sys_['net.core.rmem_default']}. Headwater asks 32 MiB (capped at rmem_max); "
        "Etsy statsd 0.9 has no receive-buffer option and gets rmem_default. Advice only: "
        "`sysctl -w net.core.rmem_max=33554432` would let Headwater's 32 MiB ask apply "
        "and absorb longer stalls"
    )
    if peer_version:
        notes.append(
            f"peer: Etsy statsd {peer_version} (npm), stock UDP server, flushInterval 10000, "
            "blackhole backend bench/peer_blackhole_backend.js; a fresh process per probe"
        )
    notes.append(
        f"load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}: "
        "anything else running on this 2-core machine shows in these figures (±40 % swings are usual)"
    )
    mem = results.get("memory", {})
    for m in mem.values():
        if m.lines_received < m.lines_sent:
            notes.append(f"{m.target} memory run: received {m.lines_received:,.0f} of {m.lines_sent:,} lines")
        if m.note:
            notes.append(f"{m.target} memory run: {m.note}")


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj


def write_latest(results: dict[str, Any]) -> None:
    """Everything measured, as JSON, to bench/results/latest.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(to_jsonable(results), indent=2) + "\n")
