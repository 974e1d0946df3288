"""Classic buckets are whole counts: real StatsD timers (the ``statsd`` client, some sampled) → the
agent → the pull page (parsed with prometheus_client) and remote-write into a real Prometheus. Every
``_bucket`` is an integer, cumulative, never decreasing across flushes, ``+Inf`` equals ``_count``, a
per-metric layout (``bucket_layouts``) is applied, and each count lies within the stated error bound
(``agent.exphist.classic_error``) of the exact weighted count."""

from __future__ import annotations

import math
import random
import socket
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import statsd
from prometheus_client.parser import text_string_to_metric_families

from agent import exphist
from exporters.prometheus_series import DEFAULT_BUCKETS
from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, PrometheusServer, http_get, wait_for_peer

pytestmark = pytest.mark.integration

FAST = [0.002 * 2 ** (k / 4) for k in range(25)]  # 2 ms … 64 ms, four per octave
LAYOUTS = "bucket_layouts: [{match: 'app_fast_*', bounds: [" + ", ".join(map(repr, FAST)) + "]}]"

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
exporters:
  prometheus_remote_write:
    endpoint: {write_url}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s}}
    {layouts}
  prometheus:
    endpoint: 127.0.0.1:{pull}
    {layouts}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [prometheus_remote_write, prometheus]
"""

RATE = 0.3
# Values span less than 9 octaves (2 ms – 500 ms): 160 buckets hold them at scale 4, so every
# histogram the receiver builds has scale >= 3, and the bound at scale 3 holds (4.4 %).
ERROR = exphist.classic_error(3)


@pytest.fixture
def always_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client drops samples at random when given a rate; make it send every one (the rate still
    goes on the wire, so the agent weighs each by 1/rate)."""
    monkeypatch.setattr(random, "random", lambda: 0.0)


@pytest.fixture
def agent(prometheus: PrometheusServer, start_agent: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    ports = {"statsd": free_port(socket.SOCK_DGRAM), "pull": free_port(), "telemetry": free_port()}
    yield start_agent(CONFIG.format(write_url=prometheus.write_url, layouts=LAYOUTS, **ports), ports)


def timings_ms(n: int, seed: int) -> np.ndarray:
    ms = np.clip(np.random.default_rng(seed).lognormal(3.0, 1.0, n), 2.0, 500.0)
    return np.round(ms, 6)  # as the client writes them (%0.6f)


def send(agent: AgentProcess, name: str, ms: np.ndarray, rate: float = 1.0) -> None:
    client = statsd.StatsClient("127.0.0.1", agent.ports["statsd"], prefix="app")
    for lo in range(0, ms.size, 20):  # 20 lines a packet, as a pipeline would
        with client.pipeline() as pipe:
            for v in ms[lo : lo + 20]:
                pipe.timing(name, float(v), rate=rate)


def histograms(agent: AgentProcess) -> dict[str, tuple[list[tuple[float, float]], float]]:
    """Per histogram family on the pull page: [(le, bucket value)] in page order, and _count."""
    status, body = http_get(agent.url("pull", "/metrics"))
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body):
        if fam.type != "histogram":
            continue
        buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket")]
        (count,) = [s.value for s in fam.samples if s.name.endswith("_count")]
        out[fam.name] = (buckets, count)
    return out


def check_whole(buckets: list[tuple[float, float]], count: float) -> None:
    values = [v for _, v in buckets]
    assert all(float(v).is_integer() for v in [*values, count]), buckets
    assert values == sorted(values), buckets
    assert [le for le, _ in buckets][-1] == math.inf and values[-1] == count


def check_within_bound(buckets: list[tuple[float, float]], seconds: np.ndarray, weights: np.ndarray) -> None:
    for le, got in buckets[:-1]:
        at_least = weights[seconds <= le / (1 + ERROR)].sum()
        at_most = weights[seconds <= le * (1 + ERROR)].sum()
        assert at_least - 0.5 <= got <= at_most + 0.5, (le, got, at_least, at_most)


def test_statsd_timers_give_whole_monotone_buckets_within_the_bound(
    agent: AgentProcess, prometheus: PrometheusServer, always_sample: None
) -> None:
    lat_full, lat_sampled, fast = timings_ms(1000, 7), timings_ms(300, 8), timings_ms(1000, 9) / 8
    send(agent, "api.lat", lat_full)
    send(agent, "api.lat", lat_sampled, rate=RATE)
    send(agent, "fast.op", fast)
    lat_total = 1000 + 300 / RATE
    expected_lat, expected_fast = exphist.whole_count(lat_total), 1000.0

    def both_complete() -> dict[str, tuple[list[tuple[float, float]], float]] | None:
        h = histograms(agent)
        lat, fast_h = h.get("app_api_lat_seconds"), h.get("app_fast_op_seconds")
        done = lat and fast_h and lat[1] == expected_lat and fast_h[1] == expected_fast
        return h if done else None

    first = wait_for_peer(both_complete, "every timer on the pull page")
    lat_buckets, lat_count = first["app_api_lat_seconds"]
    fast_buckets, fast_count = first["app_fast_op_seconds"]
    check_whole(lat_buckets, lat_count)
    check_whole(fast_buckets, fast_count)
    assert [le for le, _ in lat_buckets] == [*DEFAULT_BUCKETS, math.inf]
    assert [le for le, _ in fast_buckets] == [*FAST, math.inf]  # the layout for app_fast_*
    lat_s = np.concatenate([lat_full, lat_sampled]) / 1000
    lat_w = np.concatenate([np.ones(1000), np.full(300, 1 / RATE)])
    check_within_bound(lat_buckets, lat_s, lat_w)
    check_within_bound(fast_buckets, fast / 1000, np.ones(1000))

    # A second round adds up: every bucket at least what it was, still whole.
    more = timings_ms(500, 10)
    send(agent, "api.lat", more, rate=RATE)
    expected_lat = exphist.whole_count(lat_total + 500 / RATE)
    second = wait_for_peer(both_complete, "the second round")
    later, later_count = second["app_api_lat_seconds"]
    check_whole(later, later_count)
    assert all(b >= a for (_, a), (_, b) in zip(lat_buckets, later, strict=True)), (lat_buckets, later)
    check_within_bound(
        later, np.concatenate([lat_s, more / 1000]), np.concatenate([lat_w, np.full(500, 1 / RATE)])
    )

    # Remote-write: Prometheus holds the same whole buckets, and histogram_quantile over the fine
    # layout lands in the le bucket of a value within the bound of the exact quantile.
    prometheus.wait_value("app_fast_op_seconds_count", 1000)
    for le, value in fast_buckets:
        label = "+Inf" if le == math.inf else repr(le)
        prometheus.wait_value(f'app_fast_op_seconds_bucket{{le="{label}"}}', value)
    for q in (0.5, 0.9, 0.99):
        got = prometheus.value(f"histogram_quantile({q}, app_fast_op_seconds_bucket)")
        assert got is not None
        exact = float(np.quantile(fast / 1000, q, method="inverted_cdf"))
        edges = [0.0, *FAST]
        low = edges[int(np.searchsorted(FAST, exact / (1 + ERROR), side="left"))]
        high = FAST[int(np.searchsorted(FAST, exact * (1 + ERROR), side="left"))]
        assert low <= got <= high, (q, got, exact, low, high)
