"""The gateway tier, as users run it: 3 agents (StatsD in, ``loadbalancing`` out with ``routing_key:
series`` and disk queues) and 2, then 3, gateways (OTLP in, ``percentiles``, the Prometheus pull page),
each a ``python -m agent run`` process on loopback. Every series is sent by all three agents, each agent
with its own range of values, so a series split between gateways would show a wrong p99.

1. Each series is computed in exactly one gateway: its p99 over the window is within the percentile
   bound (1 %) of the exact p99 of the union of what the three agents sent, its observation count is the
   union's, and the other gateway has no trace of it.
2. A gateway killed (SIGKILL) while the agents send, and started again on its port: the agents' disk
   queues hold its share and deliver it; every observation arrives.
3. A third gateway (the agents reloaded with SIGHUP onto three hostnames) takes about a third of the
   series, all of them from the other two, and no series moves between the first two.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.integration.conftest import AgentProcess, free_tcp_udp_port, http_get, wait_for_peer

pytestmark = pytest.mark.integration

SERIES = 120
VALUES = 40
"""Timer values per series per agent per phase."""
AGENTS = 3
BOUND = 0.01
"""The percentiles processor's documented bound at its default scale (0.54 %), with margin: 1 %."""

GATEWAY = """\
receivers:
  otlp:
    grpc: 127.0.0.1:{grpc}
    http: null
processors:
  percentiles:
    windows: [5m]
    quantiles: [0.99]
    slice_interval: 1s
    emit_interval: 1s
exporters:
  prometheus:
    endpoint: 127.0.0.1:{pull}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [otlp]
      processors: [percentiles]
      exporters: [prometheus]
"""

AGENT = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
    flush_interval: 1s
exporters:
  loadbalancing:
    routing_key: series
    protocol:
      otlp:
        tls:
          insecure: true
        timeout: 2s
        resource_from_environment: false
        retry_on_failure:
          initial_interval: 100ms
          max_interval: 300ms
        sending_queue:
          storage: disk
          directory: {queue}
    resolver:
      static:
        hostnames: [{hostnames}]
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [loadbalancing]
"""


class Tier:
    """Starts and stops the processes of one test (each on its own ports, logs in ``tmp``)."""

    def __init__(self, tmp: Path, start_agent: Callable[..., AgentProcess]) -> None:
        self.tmp = tmp
        self.start = start_agent
        self.gateways: list[AgentProcess] = []
        self.agents: list[AgentProcess] = []

    def gateway(self, ports: dict[str, int] | None = None) -> AgentProcess:
        ports = ports or {"grpc": free_port(), "pull": free_port(), "telemetry": free_port()}
        return self.start(GATEWAY.format(**ports), ports)

    def agent(self, index: int, hostnames: list[str]) -> AgentProcess:
        ports = {"statsd": free_tcp_udp_port(), "telemetry": free_port()}
        queue = self.tmp / f"queue-{index}"
        queue.mkdir()
        text = AGENT.format(**ports, queue=queue, hostnames=", ".join(hostnames))
        return self.start(text, ports)


def values(agent: int, series: int, phase: int) -> np.ndarray:
    """Milliseconds: agent k sends values in its own range (k*100 + 1 … k*100 + 99), so the union's p99
    lies in the last agent's range and no two agents' parts have the same p99."""
    rng = np.random.default_rng(1000 * phase + 10 * series + agent)
    return np.round(rng.uniform(agent * 100 + 1, agent * 100 + 99, VALUES), 3)


def send(agents: list[AgentProcess], names: list[str], phase: int, sent: list[int]) -> None:
    """Every agent sends every series' timer values, 20 lines a packet; waits until each agent's
    receiver accepted all it was sent so far (UDP: nothing lost to a full socket buffer)."""
    for k, agent in enumerate(agents):
        lines = [f"{name}:{v}|ms" for i, name in enumerate(names) for v in values(k, i, phase)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for lo in range(0, len(lines), 20):
                s.sendto("\n".join(lines[lo : lo + 20]).encode(), ("127.0.0.1", agent.ports["statsd"]))
                if lo % 2000 == 0:
                    wait_for_peer(lambda a=agent, k=k, lo=lo: accepted(a) >= sent[k] + lo, "intake caught up")
        sent[k] += len(lines)
        wait_for_peer(lambda a=agent, k=k: accepted(a) == sent[k], f"agent {k} took all its lines")


def accepted(agent: AgentProcess) -> float:
    return agent.self_metric("headwater_receiver_accepted_points_total", receiver="statsd")


def page(gateway: AgentProcess) -> dict[str, dict[str, float]]:
    """series name → {"p99": value (s), "count": observations} from a gateway's pull page."""
    status, body = http_get(gateway.url("pull", "/metrics"))
    assert status == 200, body
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if not s.name.startswith("lb_"):
                continue
            if s.name.endswith("_quantile_seconds") and s.labels.get("quantile") == "0.99":
                out.setdefault(s.name.removesuffix("_quantile_seconds"), {})["p99"] = s.value
            elif s.name.endswith("_seconds_count"):
                out.setdefault(s.name.removesuffix("_seconds_count"), {})["count"] = s.value
    return out


def exact_p99(series: int, phases: tuple[int, ...]) -> float:
    union = np.concatenate([values(k, series, p) for k in range(AGENTS) for p in phases])
    return float(np.quantile(union, 0.99, method="inverted_cdf")) / 1000


def owners(gateways: list[AgentProcess], names: list[str], phases: tuple[int, ...]) -> dict[str, int]:
    """Waits until each series is at exactly one gateway with all its observations and its p99 within
    the bound; returns series name → index of that gateway."""
    want = AGENTS * VALUES * len(phases)

    def check() -> dict[str, int] | None:
        pages = [page(g) for g in gateways]
        found: dict[str, int] = {}
        for i, name in enumerate(names):
            key = name.replace(".", "_")
            at = [g for g, p in enumerate(pages) if key in p]
            if len(at) != 1:
                assert len(at) < 2, f"{name} is in gateways {at}"
                return None
            seen = pages[at[0]][key]
            if seen.get("count") != want or "p99" not in seen:
                assert seen.get("count", 0) <= want, (name, seen)
                return None
            exact = exact_p99(i, phases)
            if abs(seen["p99"] - exact) > BOUND * exact:
                return None  # the window's newest emit may not hold the last flush yet
            found[name] = at[0]
        return found

    result: dict[str, int] = wait_for_peer(check, "every series in one gateway, whole, with its p99")
    return result


@pytest.fixture
def tier(tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> Iterator[Tier]:
    yield Tier(tmp_path, start_agent)


def test_each_series_in_one_gateway_through_a_kill_and_a_third_gateway(tier: Tier) -> None:
    g1, g2 = tier.gateway(), tier.gateway()
    hostnames = [f"127.0.0.1:{g.ports['grpc']}" for g in (g1, g2)]
    agents = [tier.agent(k, hostnames) for k in range(AGENTS)]
    sent = [0] * AGENTS

    # 1. Each series computed in exactly one gateway, over the union of the three agents' values.
    first = [f"lb.a{i}" for i in range(SERIES)]
    send(agents, first, 1, sent)
    placed = owners([g1, g2], first, (1,))
    assert 0 < sum(placed.values()) < SERIES  # both gateways have series

    # 2. Kill g1 while the agents send; start it again on its ports: nothing lost.
    g1.stop(signal.SIGKILL)
    second = [f"lb.b{i}" for i in range(SERIES)]
    send(agents, second, 2, sent)
    g1_id = f"loadbalancing@{hostnames[0]}"
    for agent in agents:  # the agents' disk queues hold g1's share (sends to it fail)
        wait_for_peer(
            lambda a=agent: a.self_metric("headwater_exporter_failed_points_total", exporter=g1_id) > 0,
            "an agent failed to send to the killed gateway",
        )
    g1 = tier.gateway(dict(g1.ports))
    placed_b = owners([g1, g2], second, (2,))
    assert 0 < sum(placed_b.values()) < SERIES

    # 3. A third gateway: the agents reloaded onto three hostnames; about a third of the series move.
    g3 = tier.gateway()
    three = [*hostnames, f"127.0.0.1:{g3.ports['grpc']}"]
    for agent in agents:
        agent.config_path.write_text(
            agent.config_path.read_text().replace(", ".join(hostnames), ", ".join(three))
        )
        agent.proc.send_signal(signal.SIGHUP)
    for agent in agents:
        wait_for_peer(
            lambda a=agent: a.self_metric("headwater_loadbalancer_gateways") == 3, "an agent reloaded"
        )
    send(agents, second, 3, sent)

    def after_third() -> dict[str, list[float]] | None:
        pages = [page(g) for g in (g1, g2, g3)]
        counts = {n: [p.get(n.replace(".", "_"), {}).get("count", 0.0) for p in pages] for n in second}
        done = all(sum(c) == 2 * AGENTS * VALUES for c in counts.values())
        return counts if done else None

    counts = wait_for_peer(after_third, "the third phase's observations all arrived")
    moved = [n for n, c in counts.items() if c[2]]
    for name, c in counts.items():
        old = placed_b[name]
        if name in moved:  # new points all at g3, the old ones stay where they were
            assert c[old] == AGENTS * VALUES and c[2] == AGENTS * VALUES, (name, c)
        else:  # nothing moved between g1 and g2
            assert c[old] == 2 * AGENTS * VALUES, (name, c)
    fraction = len(moved) / SERIES
    print(f"\nadding a third gateway moved {len(moved)} of {SERIES} series ({fraction:.3f}; 1/3 expected)")
    assert abs(fraction - 1 / 3) < 0.15, fraction
