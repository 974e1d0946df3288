"""An independent OTLP receiver for the exporter tests: grpcio and aiohttp with the opentelemetry-proto
classes, nothing from Headwater. It records every request (headers, raw body, decoded message) and
answers from a script, one entry per request, then 200 / OK."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from typing import Any

import cramjam
import grpc
import grpc.aio
from aiohttp import web
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

REQUESTS: dict[str, type[Message]] = {
    "metrics": metrics_service_pb2.ExportMetricsServiceRequest,
    "traces": trace_service_pb2.ExportTraceServiceRequest,
    "logs": logs_service_pb2.ExportLogsServiceRequest,
}
RESPONSES: dict[str, tuple[type[Message], str]] = {
    "metrics": (metrics_service_pb2.ExportMetricsServiceResponse, "rejected_data_points"),
    "traces": (trace_service_pb2.ExportTraceServiceResponse, "rejected_spans"),
    "logs": (logs_service_pb2.ExportLogsServiceResponse, "rejected_log_records"),
}


@dataclass
class Answer:
    """One scripted answer. kind: ok | http | partial | grpc | huge."""

    kind: str = "ok"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    rejected: int = 0
    message: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    retry_delay_s: float | None = None


@dataclass
class Recorded:
    signal: str
    headers: dict[str, str]
    message: Any
    raw: bytes
    path: str = ""


class Sink:
    def __init__(self) -> None:
        self.received: list[Recorded] = []
        """Requests answered OK (or partial success)."""
        self.attempts: list[str] = []
        """Every request's signal, whatever the answer."""
        self.script: list[Answer] = []
        self.hold: asyncio.Event | None = None
        """gRPC: when set, each request waits for it before it is answered (a send in flight)."""
        self.held = 0
        """gRPC requests that waited for :attr:`hold`."""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: grpc.aio.Server | None = None

    def _next(self) -> Answer:
        return self.script.pop(0) if self.script else Answer()

    def _response(self, signal: str, answer: Answer) -> bytes:
        cls, rejected_field = RESPONSES[signal]
        response: Any = cls()
        if answer.kind == "partial":
            setattr(response.partial_success, rejected_field, answer.rejected)
            response.partial_success.error_message = answer.message
        elif answer.kind == "huge":
            response.partial_success.error_message = "x" * (5 << 20)
        out: bytes = response.SerializeToString()
        return out

    # -- HTTP ----------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        signal = request.path.rsplit("/", 1)[-1]
        raw = await request.read()
        self.attempts.append(signal)
        answer = self._next()
        if answer.kind == "http":
            status = status_pb2.Status(code=3, message=f"scripted {answer.status}")
            return web.Response(
                status=answer.status,
                headers=answer.headers,
                body=status.SerializeToString(),
                content_type="application/x-protobuf",
            )
        encoding = request.headers.get("Content-Encoding", "")
        body = raw
        if encoding == "gzip":
            body = zlib.decompress(raw, wbits=31)
        elif encoding == "zstd":
            body = bytes(cramjam.zstd.decompress(raw))
        message = REQUESTS[signal].FromString(body)
        self.received.append(Recorded(signal, dict(request.headers), message, raw, request.path))
        return web.Response(body=self._response(signal, answer), content_type="application/x-protobuf")

    async def start_http(self, ssl_context: Any = None, prefix: str = "") -> str:
        app = web.Application(client_max_size=256 << 20)
        for signal in REQUESTS:
            app.router.add_post(f"{prefix}/v1/{signal}", self._handle)
        app.router.add_post("/custom/metrics/path", self._handle_custom)
        # Raw bodies: the test checks the exporter's compression itself.
        self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        self.port = int(self._runner.addresses[0][1])
        scheme = "https" if ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _handle_custom(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.attempts.append("metrics")
        body = zlib.decompress(raw, wbits=31) if request.headers.get("Content-Encoding") == "gzip" else raw
        message = REQUESTS["metrics"].FromString(body)
        self.received.append(Recorded("metrics", dict(request.headers), message, raw, request.path))
        return web.Response(body=b"", content_type="application/x-protobuf")

    # -- gRPC ----------------------------------------------------------------------------------------
    async def _export(self, signal: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.attempts.append(signal)
        if self.hold is not None:
            self.held += 1
            await self.hold.wait()
        answer = self._next()
        if answer.kind == "grpc":
            trailing: tuple[tuple[str, bytes], ...] = ()
            if answer.retry_delay_s is not None:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=int(answer.retry_delay_s), nanos=int(answer.retry_delay_s % 1 * 1e9)
                    )
                )
                status = status_pb2.Status(code=answer.code.value[0], message="scripted")
                status.details.add().Pack(info)
                trailing = (("grpc-status-details-bin", status.SerializeToString()),)
            await context.abort(answer.code, "scripted", trailing_metadata=trailing)
        headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.received.append(Recorded(signal, headers, request, request.SerializeToString()))
        cls, _ = RESPONSES[signal]
        return cls.FromString(self._response(signal, answer))

    async def start_grpc(self, credentials: grpc.ServerCredentials | None = None) -> str:
        sink = self

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            async def Export(self, request: Any, context: Any) -> Any:
                return await sink._export("metrics", request, context)

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request: Any, context: Any) -> Any:
                return await sink._export("traces", request, context)

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            async def Export(self, request: Any, context: Any) -> Any:
                return await sink._export("logs", request, context)

        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        # The generated *_pb2_grpc modules are untyped.
        services: Any = (metrics_service_pb2_grpc, trace_service_pb2_grpc, logs_service_pb2_grpc)
        services[0].add_MetricsServiceServicer_to_server(Metrics(), self._server)
        services[1].add_TraceServiceServicer_to_server(Traces(), self._server)
        services[2].add_LogsServiceServicer_to_server(Logs(), self._server)
        if credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)
        await self._server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.stop(None)

    # -- reading what arrived --------------------------------------------------------------------------
    def metrics(self) -> list[tuple[Any, Any, Any, Any]]:
        """(resource, scope, metric, data point) for every data point received, in order."""
        out = []
        for rec in self.received:
            if rec.signal != "metrics":
                continue
            for rm in rec.message.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        data = getattr(m, m.WhichOneof("data"))
                        for dp in data.data_points:
                            out.append((rm.resource, sm.scope, m, dp))
        return out
