"""StatsD lines that statsd_exporter and the Datadog agent handle alike, sent through a real UDP socket
and the real ``statsd`` client: SignalFX tag errors keep the line and are counted, an empty field and a
bare ``c`` field refuse it (issue 11)."""

from __future__ import annotations

import socket

import statsd

from agent.model import Kind
from exporters.prometheus_series import metric_name
from tests.conftest import free_port, wait_until
from tests.receivers.conftest import Make

ISSUE_LINES = [
    b"foo.[]test:100|c",
    b"foo.[tag1,tag2]test:100|c",
    b"[tag1=bar,tag2=bazfoo.test:100|c",
    b"tag1=bar,tag2=baz]foo.test:100|c",
    b"foo:1|c|",
    b"foo:100|c|#tag1:value|c",
]


def tag_errors(tel: object, reason: str) -> float:
    return tel.value("receiver_tag_errors_total", reason=reason)  # type: ignore[attr-defined,no-any-return]


def refused(tel: object, reason: str) -> float:
    return tel.value("receiver_refused_points_total", reason=reason)  # type: ignore[attr-defined,no-any-return]


async def test_reference_cases_over_udp(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}")
    await r.start()
    assert tag_errors(tel, "malformed_tag") == tag_errors(tel, "unbalanced_brackets") == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\n".join(ISSUE_LINES), ("127.0.0.1", port))  # one packet: each line stands alone
        for line in ISSUE_LINES:  # and each in its own datagram: the second time hits the caches
            s.sendto(line, ("127.0.0.1", port))
    await wait_until(
        lambda: tel.value("receiver_datagrams_total") == 1 + len(ISSUE_LINES),
        "tel.value('receiver_datagrams_total') == 1 + len(ISSUE_LINES)",
    )
    assert tel.value("receiver_accepted_points_total") == 8
    assert tag_errors(tel, "malformed_tag") == 4  # tag1 and tag2, twice
    assert tag_errors(tel, "unbalanced_brackets") == 4
    assert refused(tel, "empty_field") == 2
    assert refused(tel, "invalid_container_id") == 2
    assert tel.value("receiver_refused_points_total") == 4
    await r.flush()
    totals = {(p.name, p.labels): p.value for p in sink.points()}
    assert totals == {
        ("foo.test", ()): 400.0,  # the empty brackets' and the dropped tags' lines, twice
        ("[tag1=bar,tag2=bazfoo.test", ()): 200.0,
        ("tag1=bar,tag2=baz]foo.test", ()): 200.0,
    }
    assert all(p.kind is Kind.SUM for p in sink.points())
    # The names kept as written become valid Prometheus names at the edge, as statsd_exporter's do.
    assert metric_name("[tag1=bar,tag2=bazfoo.test", Kind.SUM, True, "") == "_tag1_bar_tag2_bazfoo_test_total"
    assert metric_name("tag1=bar,tag2=baz]foo.test", Kind.SUM, True, "") == "tag1_bar_tag2_baz_foo_test_total"


async def test_signalfx_tag_errors_from_the_statsd_client(make: Make) -> None:
    port = free_port(socket.SOCK_DGRAM)
    r, sink, tel = make(udp=f"127.0.0.1:{port}")
    await r.start()
    client = statsd.StatsClient("127.0.0.1", port)
    client.incr("api.[env=prod,canary]latency")  # sends api.[env=prod,canary]latency:1|c
    client.gauge("queue.[]depth", 7)
    client.incr("jobs[kind=batch")
    await wait_until(
        lambda: tel.value("receiver_accepted_points_total") == 3,
        "tel.value('receiver_accepted_points_total') == 3",
    )
    assert tag_errors(tel, "malformed_tag") == 1
    assert tag_errors(tel, "unbalanced_brackets") == 1
    assert tel.value("receiver_refused_points_total") == 0
    await r.flush()
    got = {(p.name, p.labels, p.value) for p in sink.points()}
    assert got == {
        ("api.latency", (("env", "prod"),), 1.0),
        ("queue.depth", (), 7.0),
        ("jobs[kind=batch", (), 1.0),
    }
