"""What the runner puts where exporters and alert receivers would be: an HTTP server on 127.0.0.1 that
answers 200 to everything and keeps each request, a gRPC server beside it implementing the OTLP
MetricsService Export (for the ``otlp`` exporter; each call kept as a request under the path its
``x-headwater-capture`` metadata names), and the decoders that turn a kept request into the observed
points (remote-write: snappy + ``WriteRequest``; OTLP: ``ExportMetricsServiceRequest``) or alert
notifications (the Alertmanager webhook body)."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from exporters.prometheus_remote_write import remote_pb2
from exporters.prometheus_remote_write.wire import decompress


@dataclass(frozen=True)
class Observed:
    """One point as seen at a place: leaving a processor, or decoded from an exporter's request."""

    metric: str
    labels: tuple[tuple[str, str], ...]
    type: str
    value: float | None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric}
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.type:
            out["type"] = self.type
        if self.value is not None and math.isfinite(self.value):
            out["value"] = self.value
        return out

    def describe(self) -> str:
        labels = ", ".join(f'{k}="{v}"' for k, v in self.labels)
        value = "" if self.value is None else f" {self.value:g}"
        kind = f" ({self.type})" if self.type else ""
        return f"{self.metric}{{{labels}}}{value}{kind}"


@dataclass(frozen=True)
class Alert:
    """One alert of one webhook notification."""

    name: str
    status: str
    labels: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        labels = ", ".join(f'{k}="{v}"' for k, v in self.labels)
        return f"alert {self.name} {self.status} {{{labels}}}"


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


CAPTURE_METADATA = "x-headwater-capture"
"""gRPC metadata naming where a call is kept (``/t1/otlp/signoz``): the runner sets it per exporter."""


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    """OTLP MetricsService Export: keeps the request (re-serialized) as ``<place>/v1/metrics``."""

    def __init__(self, requests: list[Request]) -> None:
        self._requests = requests

    async def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.aio.ServicerContext
    ) -> ExportMetricsServiceResponse:
        metadata = {str(k): str(v) for k, v in (context.invocation_metadata() or ())}
        place = metadata.get(CAPTURE_METADATA, "")
        self._requests.append(Request(f"{place}/v1/metrics", metadata, request.SerializeToString()))
        return ExportMetricsServiceResponse()


class CaptureServer:
    """Keeps every request; ``start`` binds 127.0.0.1 on ports the kernel picks (``url`` for HTTP,
    ``grpc_target`` for OTLP/gRPC)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.url = ""
        self.grpc_target = ""

    async def start(self) -> None:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 * 2**20)])
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsService(self.requests), self._grpc
        )
        grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        self.grpc_target = f"127.0.0.1:{grpc_port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Request(request.path, dict(request.headers), body))
        return web.Response(status=200, text="{}", content_type="application/json")

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def under(self, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.path.startswith(prefix)]


def _any_text(v: AnyValue) -> str:
    which = v.WhichOneof("value")
    if which is None:
        return ""
    got = getattr(v, which)
    if which == "bool_value":
        return "true" if got else "false"
    if which in ("string_value", "int_value", "double_value"):
        return str(got)
    return str(got).strip()


def decode_remote_write(request: Request) -> list[Observed]:
    """Every sample (and native histogram) of a remote-write request, named and labelled as sent."""
    message = remote_pb2.WriteRequest()  # type: ignore[attr-defined]
    message.ParseFromString(decompress(request.body))
    out: list[Observed] = []
    for ts in message.timeseries:
        labels = [(label.name, label.value) for label in ts.labels]
        name = dict(labels).get("__name__", "")
        rest = tuple(sorted((k, v) for k, v in labels if k != "__name__"))
        out += [Observed(name, rest, "", s.value) for s in ts.samples]
        out += [Observed(name, rest, "histogram", None) for _ in ts.histograms]
    return out


def decode_otlp(request: Request) -> list[Observed]:
    """Every data point of an OTLP metrics request (HTTP or gRPC); resource attributes as
    ``resource.<key>``."""
    body = request.body
    if body[:2] == b"\x1f\x8b":  # still gzipped (aiohttp's server usually inflates it on read)
        body = gzip.decompress(body)
    message = ExportMetricsServiceRequest()
    if "json" in request.headers.get("Content-Type", ""):
        from google.protobuf import json_format

        json_format.Parse(body, message)
    else:
        message.ParseFromString(body)
    out: list[Observed] = []
    for rm in message.resource_metrics:
        resource = [(f"resource.{a.key}", _any_text(a.value)) for a in rm.resource.attributes]
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                if which is None:
                    continue
                data = getattr(m, which)
                kind = {"exponential_histogram": "histogram"}.get(which, which)
                for dp in data.data_points:
                    labels = tuple(sorted([*resource, *((a.key, _any_text(a.value)) for a in dp.attributes)]))
                    value: float | None = None
                    if which in ("sum", "gauge"):
                        value = dp.as_double if dp.WhichOneof("value") == "as_double" else float(dp.as_int)
                    elif which in ("histogram", "exponential_histogram", "summary"):
                        value = float(dp.count)
                    out.append(Observed(m.name, labels, kind, value))
    return out


def decode_webhook(request: Request) -> list[Alert]:
    """The alerts of an Alertmanager-webhook body (what the threshold processor's webhook sends)."""
    body = json.loads(request.body)
    out: list[Alert] = []
    for a in body.get("alerts", []):
        labels = {str(k): str(v) for k, v in (a.get("labels") or {}).items()}
        out.append(
            Alert(labels.get("alertname", ""), str(a.get("status", "")), tuple(sorted(labels.items())))
        )
    return out
