"""Both HTTP exporters read a refusal's Retry-After the same way: odd values are a retryable refusal
with the delay ignored or clamped, never a crash of the send (reason ``error``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from agent.component import ComponentKind, RetryableError, Settings, Signal
from agent.model import Kind, MetricBatch, Point
from agent.sending import RETRY_AFTER_MAX_S, Request, RetryConfig
from agent.telemetry import Telemetry
from exporters.otlp.config import OtlpHttpConfig
from exporters.otlp.http import OtlpHttpExporter
from exporters.prometheus_remote_write import PrometheusRemoteWriteConfig, PrometheusRemoteWriteExporter
from tests.conftest import component_settings
from tests.exporters.conftest import serve

FAST = RetryConfig(initial_interval=0.01, max_interval=0.05)

ODD_VALUES: list[tuple[str, float | None]] = [
    ("\u00b2", None),  # "²".isdigit() is true, float("²") raises
    ("\u0663", None),  # ARABIC-INDIC DIGIT THREE: a digit, not delta-seconds
    ("", None),
    ("   ", None),
    ("-5", None),
    ("1.5", None),  # delta-seconds is an integer
    ("soon", None),
    ("99999999999999999999999", RETRY_AFTER_MAX_S),
    ("Fri, 01 Jan 2100 00:00:00 GMT", RETRY_AFTER_MAX_S),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now
    (" 7 ", 7.0),
]


@dataclass
class Backend:
    """Answers every POST with ``status`` and ``headers`` until ``failures`` run out, then 204."""

    status: int = 429
    headers: dict[str, str] = field(default_factory=dict)
    failures: int = 1_000_000
    accepted: int = 0
    base: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=self.status, headers=self.headers, text="try later")
        self.accepted += 1
        return web.Response(status=204)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_post("/{path:.*}", b.handle)
    runner, port = await serve(app)
    b.base = f"http://127.0.0.1:{port}"
    yield b
    await runner.cleanup()


def _settings(tel: Telemetry, name: str) -> Settings:
    return component_settings(tel, ComponentKind.EXPORTER, name, shutdown_timeout_s=5.0)


def _remote_write(backend: Backend, tel: Telemetry) -> PrometheusRemoteWriteExporter:
    cfg = PrometheusRemoteWriteConfig(endpoint=backend.base + "/api/v1/write", retry_on_failure=FAST)
    return PrometheusRemoteWriteExporter(_settings(tel, "prometheus_remote_write"), cfg)


def _otlp_http(backend: Backend, tel: Telemetry) -> OtlpHttpExporter:
    return OtlpHttpExporter(
        _settings(tel, "otlp_http"), OtlpHttpConfig(endpoint=backend.base, retry_on_failure=FAST)
    )


@pytest.mark.parametrize("exporter", ["prometheus_remote_write", "otlp_http"])
@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(("value", "expected"), ODD_VALUES)
async def test_odd_retry_after_is_a_retryable_refusal(
    backend: Backend, exporter: str, status: int, value: str, expected: float | None
) -> None:
    backend.status, backend.headers = status, {"Retry-After": value}
    exp = _remote_write(backend, Telemetry()) if exporter != "otlp_http" else _otlp_http(backend, Telemetry())
    await exp.start()
    try:
        request = Request(b"", 0, kind=Signal.METRICS.value)
        with pytest.raises(RetryableError) as raised:
            if isinstance(exp, PrometheusRemoteWriteExporter):
                await exp._post(request)
            else:
                await exp._send(request)
    finally:
        await exp.shutdown()
    assert raised.value.reason == f"http_{status}"
    assert raised.value.retry_after_s == expected


async def test_remote_write_429_with_a_superscript_retry_after_is_retried_and_counted_as_429(
    backend: Backend,
) -> None:
    backend.status, backend.headers, backend.failures = 429, {"Retry-After": "\u00b2"}, 1
    tel = Telemetry()
    exp = _remote_write(backend, tel)
    await exp.start()
    try:
        now = time.time_ns()
        point = Point("hits", Kind.SUM, (), now, value=1.0, start_time_unix_nano=now - 10**10)
        await exp.consume(MetricBatch((point,)))
        await exp._sender.shutdown(5.0)  # drains: the retry after the 429 is sent
    finally:
        await exp.shutdown()
    assert backend.accepted == 1
    assert tel.value("exporter_failed_points_total", reason="http_429") == 1
    assert tel.value("exporter_failed_points_total", reason="error") == 0
    assert tel.value("exporter_sent_points_total") == 1
