"""The remote-write exporter against a capturing receiver: the spec's sender rules, one by one."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import numpy as np
import pytest
from aiohttp import web

from agent import exphist
from agent.component import ComponentKind
from agent.model import ExplicitHistogram, Kind, MetricBatch, Point, Summary, Temporality
from agent.sending import RetryConfig
from agent.telemetry import Telemetry
from exporters.prometheus_remote_write import (
    AuthConfig,
    BasicAuthConfig,
    PrometheusRemoteWriteConfig,
    PrometheusRemoteWriteExporter,
    remote_pb2,
    wire,
)
from tests.conftest import Certs, component_settings, wait_until
from tests.exporters.conftest import serve

FRAMED_MAGIC = bytes.fromhex("ff060000734e61507059")


class Receiver:
    """A remote-write endpoint that records requests and answers from a script of statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], remote_pb2.WriteRequest]] = []
        self.raw: list[bytes] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.script:
            status, headers = self.script.pop(0)
            if status >= 300:
                return web.Response(status=status, headers=headers, text="scripted failure")
        self.raw.append(body)
        msg = remote_pb2.WriteRequest.FromString(wire.decompress(body))
        self.requests.append((dict(request.headers), msg))
        return web.Response(status=204)

    def samples(self) -> dict[str, list[tuple[float, int]]]:
        """Series (rendered label set) → samples in arrival order."""
        out: dict[str, list[tuple[float, int]]] = {}
        for _, msg in self.requests:
            for ts in msg.timeseries:
                key = ",".join(f"{lb.name}={lb.value}" for lb in ts.labels)
                out.setdefault(key, []).extend((s.value, s.timestamp) for s in ts.samples)
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/api/v1/write", rec.handle)
    runner, rec.port = await serve(app)
    yield rec
    await runner.cleanup()


Make = Callable[..., tuple[PrometheusRemoteWriteExporter, Telemetry]]


@pytest.fixture
async def make(receiver: Receiver) -> AsyncIterator[Make]:
    made: list[PrometheusRemoteWriteExporter] = []

    def build(**overrides: object) -> tuple[PrometheusRemoteWriteExporter, Telemetry]:
        cfg = PrometheusRemoteWriteConfig(
            endpoint=f"http://127.0.0.1:{receiver.port}/api/v1/write",
            retry_on_failure=RetryConfig(initial_interval=0.01, max_interval=0.05),
        )
        cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
        assert cfg.validate() == []
        tel = Telemetry()
        settings = component_settings(
            tel, ComponentKind.EXPORTER, "prometheus_remote_write", logger="test.prw", shutdown_timeout_s=5.0
        )
        exp = PrometheusRemoteWriteExporter(settings, cfg)
        made.append(exp)
        return exp, tel

    yield build
    for exp in made:
        await exp.shutdown()


def counter(name: str, value: float, labels: tuple[tuple[str, str], ...] = (), t: int | None = None) -> Point:
    now = t or time.time_ns()
    return Point(name, Kind.SUM, labels, now, value=value, start_time_unix_nano=now - 10**10)


async def drain(exp: PrometheusRemoteWriteExporter) -> None:
    await exp._sender.shutdown(5.0)


async def test_wire_rules(make: Make, receiver: Receiver) -> None:
    exp, tel = make(headers={"X-Scope-OrgID": "team-a"})
    await exp.start()
    await exp.consume(MetricBatch((counter("api.requests", 3, (("route", "/users"), ("env", "dev"))),)))
    await drain(exp)
    (headers, msg), raw = receiver.requests[0], receiver.raw[0]
    assert headers["Content-Encoding"] == "snappy"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    assert headers["User-Agent"].startswith("headwater/")
    assert headers["X-Scope-OrgID"] == "team-a"
    assert not raw.startswith(FRAMED_MAGIC)  # block format, not framed
    (ts,) = msg.timeseries
    names = [lb.name for lb in ts.labels]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert [(lb.name, lb.value) for lb in ts.labels] == [
        ("__name__", "api_requests_total"),
        ("env", "dev"),
        ("route", "/users"),
    ]
    (sample,) = ts.samples
    assert sample.value == 3
    assert abs(sample.timestamp - time.time() * 1000) < 5000  # milliseconds, not s or ns
    assert tel.value("exporter_sent_points_total") == 1


async def test_counters_accumulate_and_timestamps_increase(make: Make, receiver: Receiver) -> None:
    exp, _ = make()
    await exp.start()
    t = time.time_ns()
    for _ in range(3):
        # Same timestamp three times (e.g. |T): later samples are nudged so the series stays ordered.
        await exp.consume(MetricBatch((counter("hits", 2, t=t),)))
    await exp.consume(MetricBatch((counter("hits", 1, t=t + 10**10),)))
    await drain(exp)
    samples = receiver.samples()["__name__=hits_total"]
    assert [v for v, _ in samples] == [2, 4, 6, 7]
    stamps = [ts for _, ts in samples]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4


async def test_empty_label_values_dropped_and_names_sanitised(make: Make, receiver: Receiver) -> None:
    exp, _ = make(external_labels={"cluster": "eu-1"})
    await exp.start()
    point = Point(
        "a-b/c.d", Kind.GAUGE, (("bare", ""), ("host.name", "x"), ("9lives", "y")), time.time_ns(), 1.5
    )
    await exp.consume(MetricBatch((point,)))
    await drain(exp)
    assert list(receiver.samples()) == ["__name__=a_b_c_d,cluster=eu-1,host_name=x,key_9lives=y"]


async def test_classic_histogram_series(make: Make, receiver: Receiver) -> None:
    exp, _ = make(histogram_buckets=[0.1, 0.5, 1.0])
    await exp.start()
    h = exphist.from_values(np.array([0.05, 0.2, 0.3, 2.0]))
    point = Point("lat", Kind.HISTOGRAM, (), time.time_ns(), histogram=h, unit="s")
    await exp.consume(MetricBatch((point,)))
    await exp.consume(MetricBatch((replace(point, time_unix_nano=point.time_unix_nano + 10**9),)))
    await drain(exp)
    s = receiver.samples()
    assert [v for v, _ in s["__name__=lat_seconds_bucket,le=0.1"]] == [1, 2]
    assert [v for v, _ in s["__name__=lat_seconds_bucket,le=0.5"]] == [3, 6]
    assert [v for v, _ in s["__name__=lat_seconds_bucket,le=1"]] == [3, 6]
    assert [v for v, _ in s["__name__=lat_seconds_bucket,le=+Inf"]] == [4, 8]
    assert [v for v, _ in s["__name__=lat_seconds_count"]] == [4, 8]
    assert [v for v, _ in s["__name__=lat_seconds_sum"]] == pytest.approx([2.55, 5.1])


async def test_native_histogram_option(make: Make, receiver: Receiver) -> None:
    exp, _ = make(send_native_histograms=True)
    await exp.start()
    h = exphist.from_values(np.array([1.0, 2.0, 3.0]))
    await exp.consume(MetricBatch((Point("size", Kind.HISTOGRAM, (), time.time_ns(), histogram=h),)))
    await drain(exp)
    ((_, msg),) = receiver.requests
    (ts,) = msg.timeseries
    assert not ts.samples and len(ts.histograms) == 1
    assert ts.histograms[0].count_int == 3 and ts.histograms[0].sum == 6.0


def explicit(
    name: str,
    bounds: tuple[float, ...],
    counts: tuple[int, ...],
    total: float,
    t: int,
    labels: tuple[tuple[str, str], ...] = (),
) -> Point:
    return Point(name, Kind.HISTOGRAM, labels, t, explicit=ExplicitHistogram(bounds, counts, total))


def summary(name: str, count: int, total: float, quantiles: tuple[tuple[float, float], ...], t: int) -> Point:
    return Point(
        name,
        Kind.SUMMARY,
        (),
        t,
        temporality=Temporality.CUMULATIVE,
        summary=Summary(count, total, quantiles),
    )


def values(samples: dict[str, list[tuple[float, int]]], key: str) -> list[float]:
    return [v for v, _ in samples[key]]


def is_stale(v: float) -> bool:
    return struct.unpack("<Q", struct.pack("<d", v))[0] == wire.STALE_NAN_BITS


async def test_explicit_histogram_series_use_their_own_bounds(make: Make, receiver: Receiver) -> None:
    exp, tel = make(histogram_buckets=[0.1, 0.5, 1.0])
    await exp.start()
    t = time.time_ns()
    labels = (("le", "mine"), ("svc", "a"))
    await exp.consume(MetricBatch((explicit("rpc.dur", (0.25, 2.5), (1, 2, 3), 9.0, t, labels),)))
    await exp.consume(MetricBatch((explicit("rpc.dur", (0.25, 2.5), (1, 0, 1), 3.0, t + 10**9, labels),)))
    await drain(exp)
    s = receiver.samples()
    base = "exported_le=mine"  # labels are sorted by name: le comes before svc
    assert sorted(s) == sorted(
        [
            f"__name__=rpc_dur_bucket,{base},le=0.25,svc=a",
            f"__name__=rpc_dur_bucket,{base},le=2.5,svc=a",
            f"__name__=rpc_dur_bucket,{base},le=+Inf,svc=a",
            f"__name__=rpc_dur_count,{base},svc=a",
            f"__name__=rpc_dur_sum,{base},svc=a",
        ]
    )
    assert values(s, f"__name__=rpc_dur_bucket,{base},le=0.25,svc=a") == [1, 2]
    assert values(s, f"__name__=rpc_dur_bucket,{base},le=2.5,svc=a") == [3, 4]
    assert values(s, f"__name__=rpc_dur_bucket,{base},le=+Inf,svc=a") == [6, 8]
    assert values(s, f"__name__=rpc_dur_sum,{base},svc=a") == [9, 12]
    assert values(s, f"__name__=rpc_dur_count,{base},svc=a") == [6, 8]
    assert tel.value("exporter_sent_points_total") == 2


async def test_summary_series(make: Make, receiver: Receiver) -> None:
    exp, _ = make()
    await exp.start()
    t = time.time_ns()
    await exp.consume(MetricBatch((summary("rpc.lat", 7, 3.5, ((0.5, 0.4), (0.99, 1.25)), t),)))
    await drain(exp)
    ((_, msg),) = receiver.requests
    got = {
        ",".join(f"{lb.name}={lb.value}" for lb in ts.labels): [smp.value for smp in ts.samples]
        for ts in msg.timeseries
    }
    assert got == {
        "__name__=rpc_lat,quantile=0.5": [0.4],
        "__name__=rpc_lat,quantile=0.99": [1.25],
        "__name__=rpc_lat_sum": [3.5],
        "__name__=rpc_lat_count": [7],
    }


async def test_native_mode_keeps_explicit_histograms_classic(make: Make, receiver: Receiver) -> None:
    exp, _ = make(send_native_histograms=True)
    await exp.start()
    t = time.time_ns()
    h = exphist.from_values(np.array([1.0, 2.0, 3.0]))
    await exp.consume(
        MetricBatch(
            (
                Point("native", Kind.HISTOGRAM, (), t, histogram=h),
                explicit("classic", (1.0,), (1, 2), 5.0, t),
            )
        )
    )
    await drain(exp)
    ((_, msg),) = receiver.requests
    by_name = {ts.labels[0].value: ts for ts in msg.timeseries}
    assert sorted(by_name) == ["classic_bucket", "classic_count", "classic_sum", "native"]
    assert len(by_name["native"].histograms) == 1 and not by_name["native"].samples
    assert all(not by_name[n].histograms for n in ("classic_bucket", "classic_count", "classic_sum"))
    buckets = [ts for ts in msg.timeseries if ts.labels[0].value == "classic_bucket"]
    assert {ts.labels[1].value: ts.samples[0].value for ts in buckets} == {"1": 1, "+Inf": 3}


async def test_changed_bounds_retire_the_buckets_that_vanished(make: Make, receiver: Receiver) -> None:
    exp, _ = make()
    await exp.start()
    t = time.time_ns()
    await exp.consume(MetricBatch((explicit("h", (0.5, 1.0), (1, 1, 1), 2.0, t),)))
    await exp.consume(MetricBatch((explicit("h", (1.0, 2.0), (1, 0, 0), 0.5, t + 10**9),)))
    await drain(exp)
    s = receiver.samples()
    # le=0.5 is gone: its last sample is the stale marker, so queries stop seeing it at once.
    old = values(s, "__name__=h_bucket,le=0.5")
    assert old[0] == 1 and len(old) == 2 and is_stale(old[1])
    # Kept and new sub-series carry the restarted counts (a counter reset for Prometheus), never stale.
    assert values(s, "__name__=h_bucket,le=1") == [2, 1]
    assert values(s, "__name__=h_bucket,le=2") == [1]
    assert values(s, "__name__=h_bucket,le=+Inf") == [3, 1]
    assert values(s, "__name__=h_count") == [3, 1]


async def test_stale_markers_for_every_sub_series_on_expiry(make: Make, receiver: Receiver) -> None:
    exp, tel = make(series_expiration=0.2)
    await exp.start()
    t = time.time_ns()
    await exp.consume(
        MetricBatch(
            (
                explicit("eh", (1.0,), (1, 1), 2.0, t),
                summary("sm", 3, 1.5, ((0.5, 0.5), (0.9, 0.9)), t),
            )
        )
    )
    await wait_until(
        lambda: tel.value("exporter_stale_markers_total") >= 2, "two stale markers", timeout_s=10
    )
    await drain(exp)
    s = receiver.samples()
    assert sorted(s) == sorted(
        [
            "__name__=eh_bucket,le=1",
            "__name__=eh_bucket,le=+Inf",
            "__name__=eh_sum",
            "__name__=eh_count",
            "__name__=sm,quantile=0.5",
            "__name__=sm,quantile=0.9",
            "__name__=sm_sum",
            "__name__=sm_count",
        ]
    )
    for key, got in s.items():
        assert len(got) == 2, key
        assert not is_stale(got[0][0]) and is_stale(got[1][0]), key
        assert got[1][1] > got[0][1], key  # the marker comes after the sample


async def test_5xx_and_429_retried_with_retry_after_4xx_dropped(make: Make, receiver: Receiver) -> None:
    exp, tel = make()
    receiver.script = [(503, {}), (429, {"Retry-After": "1"}), (204, {}), (400, {}), (204, {})]
    await exp.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await exp.consume(MetricBatch((counter("first", 1),)))
    await exp.consume(MetricBatch((counter("poison", 1),)))
    await exp.consume(MetricBatch((counter("after", 1),)))
    await drain(exp)
    assert loop.time() - started >= 1.0  # the 429's Retry-After was waited out
    assert list(receiver.samples()) == ["__name__=first_total", "__name__=after_total"]
    assert tel.value("exporter_failed_points_total", reason="http_503") == 1
    assert tel.value("exporter_failed_points_total", reason="http_429") == 1
    assert tel.value("exporter_dropped_points_total", reason="permanent_error") == 1
    assert tel.value("exporter_sent_points_total") == 2


async def test_unreachable_backend_counts_connection_errors(make: Make) -> None:
    exp, tel = make(
        endpoint="http://127.0.0.1:9/api/v1/write",
        retry_on_failure=RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0.1),
    )
    await exp.start()
    await exp.consume(MetricBatch((counter("x", 1),)))
    await drain(exp)
    assert tel.value("exporter_failed_points_total", reason="connection_error") >= 1
    assert tel.value("exporter_dropped_points_total", reason="retries_exhausted") == 1


async def test_stale_marker_on_expiry_and_input_nan_is_not_stale(make: Make, receiver: Receiver) -> None:
    exp, tel = make(series_expiration=0.2)
    await exp.start()
    await exp.consume(MetricBatch((Point("temp", Kind.GAUGE, (), time.time_ns(), value=math.nan),)))
    await wait_until(lambda: tel.value("exporter_stale_markers_total") >= 1, "the stale marker", timeout_s=10)
    await drain(exp)
    values = [v for v, _ in receiver.samples()["__name__=temp"]]
    assert len(values) == 2
    bits = [struct.unpack("<Q", struct.pack("<d", v))[0] for v in values]
    assert math.isnan(values[0]) and bits[0] != wire.STALE_NAN_BITS  # a genuine NaN stays a plain NaN
    assert bits[1] == wire.STALE_NAN_BITS


async def test_cumulative_input_is_not_summed(make: Make, receiver: Receiver) -> None:
    exp, _ = make()
    await exp.start()
    t = time.time_ns()
    for i, total in enumerate((10.0, 15.0)):
        p = replace(counter("otlp.c", total, t=t + i * 10**9), temporality=Temporality.CUMULATIVE)
        await exp.consume(MetricBatch((p,)))
    await drain(exp)
    assert [v for v, _ in receiver.samples()["__name__=otlp_c_total"]] == [10, 15]


async def test_max_samples_per_request_splits(make: Make, receiver: Receiver) -> None:
    exp, tel = make(max_samples_per_request=10)
    await exp.start()
    await exp.consume(MetricBatch(tuple(counter(f"m{i}", 1) for i in range(35))))
    await drain(exp)
    assert [len(msg.timeseries) for _, msg in receiver.requests] == [10, 10, 10, 5]
    assert tel.value("exporter_sent_points_total") == 35


async def test_basic_auth(make: Make, receiver: Receiver) -> None:
    exp, _ = make(auth=AuthConfig(basic=BasicAuthConfig(username="u", password="p")))
    await exp.start()
    await exp.consume(MetricBatch((counter("x", 1),)))
    await drain(exp)
    assert receiver.requests[0][0]["Authorization"] == "Basic dTpw"


async def test_bearer_token_file_is_reread_when_it_changes(make: Make, receiver: Receiver, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "token"
    token.write_text("one\n")
    exp, _ = make(auth=AuthConfig(bearer_token_file=str(token)))
    await exp.start()
    await exp.consume(MetricBatch((counter("x", 1),)))
    await wait_until(lambda: receiver.requests, "the request with the first token")
    token.write_text("two\n")
    import os

    os.utime(token, (time.time() + 5, time.time() + 5))
    await exp.consume(MetricBatch((counter("x", 1),)))
    await drain(exp)
    assert [h["Authorization"] for h, _ in receiver.requests] == ["Bearer one", "Bearer two"]


def test_reserved_headers_rejected() -> None:
    cfg = PrometheusRemoteWriteConfig(headers={"content-type": "text/plain", "User-Agent": "x"})
    paths = [p for p, _ in cfg.validate()]
    assert paths == ["headers::content-type", "headers::User-Agent"]


async def test_tls_endpoint_verified_with_ca_file(tls_certs: Certs) -> None:
    import ssl

    from agent.tls import ClientTLSConfig

    ca, crt, key = tls_certs.ca, tls_certs.cert, tls_certs.key
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/api/v1/write", rec.handle)
    runner, port = await serve(app, ssl_context=server_ctx)
    tel = Telemetry()
    settings = component_settings(
        tel, ComponentKind.EXPORTER, "prometheus_remote_write", logger="test.prw.tls"
    )
    fast = RetryConfig(initial_interval=0.01, max_interval=0.02, max_elapsed_time=0.2)
    good = PrometheusRemoteWriteExporter(
        settings,
        PrometheusRemoteWriteConfig(
            endpoint=f"https://127.0.0.1:{port}/api/v1/write",
            tls=ClientTLSConfig(ca_file=ca),
            retry_on_failure=fast,
        ),
    )
    untrusted = PrometheusRemoteWriteExporter(
        component_settings(
            tel,
            ComponentKind.EXPORTER,
            "prometheus_remote_write",
            telemetry_id="untrusted",
            logger="test.prw.tls",
        ),
        PrometheusRemoteWriteConfig(endpoint=f"https://127.0.0.1:{port}/api/v1/write", retry_on_failure=fast),
    )
    try:
        for exp in (good, untrusted):
            await exp.start()
            await exp.consume(MetricBatch((counter("tls.hits", 1),)))
            await drain(exp)
        assert list(rec.samples()) == ["__name__=tls_hits_total"]  # only the one that trusts the CA
        assert tel.value("exporter_sent_points_total", exporter="prometheus_remote_write") == 1
        assert (
            tel.value("exporter_dropped_points_total", exporter="untrusted", reason="retries_exhausted") == 1
        )
    finally:
        await good.shutdown()
        await untrusted.shutdown()
        await runner.cleanup()
