"""Percentiles within 1 % at the defaults, end to end as a user runs it: real StatsD timers (the
``statsd`` client) and OTLP exponential histograms (the OpenTelemetry SDK) → the agent's ``percentiles``
processor (windows 1m/5m/1h, p50/p90/p99/p99.9, every other setting at its default) → the pull page
(parsed with prometheus_client) and remote-write into a real Prometheus. Every quantile of every window
on both sinks is within 1 % relative error of the exact quantile (numpy's ``inverted_cdf`` rank rule,
the one the agent documents) of the values actually sent, for a lognormal (μ = 3, σ = 1, ms), a bimodal
mix (1 ms and 500 ms modes) and a Pareto (α = 1.5 from 1 ms)."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import statsd
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, PrometheusServer, http_get, wait_for_peer

pytestmark = pytest.mark.integration

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
  otlp:
    grpc: 127.0.0.1:{grpc}
    http: null
processors:
  percentiles:
    windows: [1m, 5m, 1h]
    quantiles: [0.5, 0.9, 0.99, 0.999]
    # everything else (max_buckets, slice and emit intervals, ...) at its default, as in the receivers
exporters:
  prometheus:
    endpoint: 127.0.0.1:{pull}
  prometheus_remote_write:
    endpoint: {write_url}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd, otlp]
      processors: [percentiles]
      # The pull exporter first: the fan-out hands each batch to the exporters in this order, so once
      # Prometheus holds an emit's gauges the pull page holds that emit (or a later one) too.
      exporters: [prometheus, prometheus_remote_write]
"""

N = 4000
QUANTILES = (0.5, 0.9, 0.99, 0.999)
WINDOWS = ("1m", "5m", "1h")
ERROR = 0.01
LINES_PER_PACKET = 20
LINES_PER_ROUND = 500
"""Lines sent before waiting for the receiver to have taken them all (UDP: no loss from a full buffer)."""
OTLP_MAX_SIZE = 2048
"""The SDK's exponential histogram bucket budget (its default, 160, forces a coarse scale on data
spanning more than a few octaves); a client-side setting the README tells OTLP users to raise."""


def distributions() -> dict[str, np.ndarray]:
    """A few thousand values (ms) per distribution, fixed seeds, rounded as the StatsD client writes
    them (``%0.6f``) so both paths carry exactly the same values."""
    rng = np.random.default_rng(11)
    low = rng.lognormal(math.log(1.0), 0.3, int(N * 0.7))
    high = rng.lognormal(math.log(500.0), 0.3, N - low.size)
    bimodal = np.concatenate([low, high])
    rng.shuffle(bimodal)
    raw = {
        "lognormal": np.random.default_rng(7).lognormal(3.0, 1.0, N),
        "bimodal": bimodal,
        "pareto": np.random.default_rng(13).pareto(1.5, N) + 1.0,
    }
    return {name: np.array([float(f"{v:0.6f}") for v in ms]) for name, ms in raw.items()}


def exact(ms: np.ndarray, q: float) -> float:
    return float(np.quantile(ms, q, method="inverted_cdf"))


def send_statsd(agent: AgentProcess, name: str, ms: np.ndarray, sent_before: int) -> int:
    """Send ``ms`` as timers, 20 lines a packet; after every round wait until the receiver has
    accepted every line so far (no loss to a full socket buffer). Returns the lines sent in all."""
    client = statsd.StatsClient("127.0.0.1", agent.ports["statsd"], prefix="acc", maxudpsize=1400)
    sent = sent_before
    try:
        for lo in range(0, ms.size, LINES_PER_ROUND):
            chunk = ms[lo : lo + LINES_PER_ROUND]
            for start in range(0, chunk.size, LINES_PER_PACKET):
                with client.pipeline() as pipe:
                    for v in chunk[start : start + LINES_PER_PACKET]:
                        pipe.timing(name, float(v))
            sent += chunk.size

            def taken(want: int = sent) -> bool:
                accepted = agent.self_metric("headwater_receiver_accepted_points_total", receiver="statsd")
                assert accepted <= want, (accepted, want)
                return accepted == want

            wait_for_peer(taken, f"the statsd receiver to accept {sent} lines")
    finally:
        client.close()
    return sent


def send_otlp(agent: AgentProcess, data: dict[str, np.ndarray]) -> None:
    """Record every value into an SDK Histogram (DELTA, exponential aggregation) and export once."""
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(
            endpoint=f"127.0.0.1:{agent.ports['grpc']}",
            insecure=True,
            preferred_temporality={Histogram: AggregationTemporality.DELTA},
        ),
        export_interval_millis=math.inf,  # exported only by force_flush below
    )
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "accuracy"}),
        views=[
            View(
                instrument_type=Histogram,
                aggregation=ExponentialBucketHistogramAggregation(max_size=OTLP_MAX_SIZE, max_scale=20),
            )
        ],
    )
    meter = provider.get_meter("accuracy")
    try:
        for name, ms in data.items():
            hist = meter.create_histogram(f"otlp.{name}", unit="ms")
            for v in ms:
                hist.record(float(v))
        assert reader.force_flush(timeout_millis=30_000)
    finally:
        provider.shutdown()


Estimates = dict[tuple[str, str, str], float]
"""(metric family, quantile label, window label) → value."""


def pull_estimates(agent: AgentProcess, families: list[str]) -> Estimates:
    status, body = http_get(agent.url("pull", "/metrics"))
    assert status == 200, body
    out: Estimates = {}
    for fam in text_string_to_metric_families(body):
        if fam.name not in families:
            continue
        for s in fam.samples:
            key = (fam.name, s.labels["quantile"], s.labels["window"])
            assert key not in out, (key, fam.samples)
            out[key] = s.value
    return out


def prometheus_latest(
    prometheus: PrometheusServer, families: list[str]
) -> dict[tuple[str, str, str], list[Any]]:
    """(family, quantile, window) → the newest [timestamp, value] Prometheus holds for that series."""
    expr = '{__name__=~"' + "|".join(families) + '"}[10m]'
    status, body = http_get(f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body
    out: dict[tuple[str, str, str], list[Any]] = {}
    for series in json.loads(body)["data"]["result"]:
        m = series["metric"]
        key = (m["__name__"], m["quantile"], m["window"])
        assert key not in out, (key, series)
        ts, value = series["values"][-1]
        out[key] = [float(ts), float(value)]
    return out


@pytest.fixture
def agent(prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    ports = {"statsd": free_port(socket.SOCK_DGRAM), "grpc": free_port(), "pull": free_port()}
    ports["telemetry"] = free_port()
    yield start_agent(CONFIG.format(write_url=prometheus.write_url, **ports), ports)


def test_percentiles_within_one_percent_at_the_defaults(
    agent: AgentProcess, prometheus: PrometheusServer
) -> None:
    data = distributions()
    first_sent = time.time()
    sent = 0
    for name, ms in data.items():
        sent = send_statsd(agent, name, ms, sent)
    send_otlp(agent, data)

    # Family names as the exporters write them: timers are in seconds, the OTLP histograms keep "ms".
    expected: dict[str, tuple[np.ndarray, float]] = {}
    for name, ms in data.items():
        expected[f"acc_{name}_quantile_seconds"] = (ms, 1e-3)
        expected[f"otlp_{name}_quantile_milliseconds"] = (ms, 1.0)
    families = sorted(expected)
    originals = [f.replace("_quantile_", "_") + "_count" for f in families]

    # Every original point has passed the processor (it hands a batch on, then puts it in its
    # windows, in one turn of the loop) and reached Prometheus by the exporter after the pull one.
    def all_counted() -> bool:
        counts = [prometheus.value(name) for name in originals]
        assert all(c is None or c <= N for c in counts), dict(zip(originals, counts, strict=True))
        return all(c == N for c in counts)

    wait_for_peer(all_counted, "every original distribution point in Prometheus")
    data_in = time.time()
    # An emit stamped after data_in read the windows after all data was in them.
    want = {(f, f"{q:g}", w) for f in families for q in QUANTILES for w in WINDOWS}

    def emitted_after() -> dict[tuple[str, str, str], list[Any]] | None:
        latest = prometheus_latest(prometheus, families)
        fresh = set(latest) == want and all(ts > data_in for ts, _ in latest.values())
        return latest if fresh else None

    remote = wait_for_peer(emitted_after, "an emit after all data was in, in Prometheus")
    read_at = min(ts for ts, _ in remote.values())
    if read_at - first_sent > 50.0:  # not an accuracy failure: the data has begun to leave the 1m window
        pytest.fail(f"the emit read came {read_at - first_sent:.0f}s after the first value was sent")
    pulled = pull_estimates(agent, families)
    assert set(pulled) == want, sorted(set(pulled) ^ want)

    rows = []  # (relative error, sink, family, quantile, window, estimate, exact)
    for (family, q, window), (_, got_remote) in sorted(remote.items()):
        ms, to_unit = expected[family]
        truth = exact(ms, float(q)) * to_unit
        for sink, got in (("prometheus", got_remote), ("pull", pulled[(family, q, window)])):
            rows.append((abs(got - truth) / truth, sink, family, q, window, got, truth))
    print("\nmax relative error per distribution (over quantiles and windows):")
    for family in families:
        for sink in ("pull", "prometheus"):
            e = max(r[0] for r in rows if r[1:3] == (sink, family))
            print(f"  {family:40s} {sink:10s} {e:.3%}")
    bad = [r for r in rows if r[0] > ERROR]
    assert not bad, "\n".join(
        f"{sink} {family} q={q} window={window}: {got:.6g} vs exact {truth:.6g} ({e:.3%})"
        for e, sink, family, q, window, got, truth in bad
    )
