"""``headwater selftest --target HOST``: check a running agent end to end from outside.

It is what the Helm chart's ``helm test`` hook runs (from the agent image), and works against any
agent whose pipeline feeds a ``prometheus`` pull endpoint:

1. waits for ``/readyz`` on the telemetry endpoint (200);
2. sends a uniquely named StatsD counter over UDP (``headwater_selftest_<id>:1|c``) and one OTLP/HTTP
   protobuf gauge (``headwater_selftest_otlp_<id>``), built with the opentelemetry-proto classes;
3. reads the pull endpoint until both series appear (``headwater_selftest_<id>_total`` and
   ``headwater_selftest_otlp_<id>``), sending again every ``resend_s``: UDP may be lost, and behind a
   Service with several replicas another pod may answer the read.

It prints one line per check and exits 0 when every check passed, 1 naming what did not arrive. A port
of 0 skips that check. This is a command-line client, not part of the agent's event loop, so it uses
blocking sockets and urllib.
"""

from __future__ import annotations

import http.client
import secrets
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class SelftestOptions:
    target: str
    """Host name or IP of the agent (a Service name in a cluster)."""
    statsd_port: int = 8125
    """StatsD UDP port; 0 skips the StatsD check."""
    otlp_http_port: int = 4318
    """OTLP/HTTP port; 0 skips the OTLP check."""
    telemetry_port: int = 8888
    """The agent's own endpoint (/readyz); 0 skips the readiness check."""
    prometheus_port: int = 9102
    """The prometheus exporter's pull endpoint, where the sent series are read back."""
    timeout_s: float = 60.0
    """Time allowed for everything (readiness included)."""
    resend_s: float = 5.0
    """Send the StatsD counter and the OTLP gauge again this often until both are read back."""
    request_timeout_s: float = 5.0
    """Time limit of one HTTP request."""


@dataclass
class _Check:
    name: str
    ok: bool = False
    detail: str = "not checked"


@dataclass
class SelftestResult:
    checks: list[_Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _host(target: str) -> str:
    return f"[{target}]" if ":" in target and not target.startswith("[") else target


def _http(
    method: str, url: str, timeout_s: float, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request; every failure to get an answer (connection, timeout, a malformed or cut-off
    response, e.g. from an agent that is shutting down) is raised as OSError, so callers retry."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except http.client.HTTPException as exc:  # BadStatusLine, IncompleteRead, …: not OSErrors
        raise OSError(f"{type(exc).__name__}: {exc}") from exc


def otlp_gauge_request(name: str, value: float, time_unix_nano: int) -> bytes:
    """One OTLP ExportMetricsServiceRequest (serialized) holding a single double gauge point."""
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2

    point = metrics_pb2.NumberDataPoint(time_unix_nano=time_unix_nano, as_double=value)
    point.attributes.append(
        common_pb2.KeyValue(key="headwater_selftest", value=common_pb2.AnyValue(string_value="1"))
    )
    metric = metrics_pb2.Metric(name=name, description="headwater selftest", gauge=metrics_pb2.Gauge())
    metric.gauge.data_points.append(point)
    resource = resource_pb2.Resource(
        attributes=[
            common_pb2.KeyValue(
                key="service.name", value=common_pb2.AnyValue(string_value="headwater-selftest")
            )
        ]
    )
    request = metrics_service_pb2.ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=resource,
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])],
            )
        ]
    )
    return bytes(request.SerializeToString())


def _rejected_points(body: bytes) -> tuple[int, str]:
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

    resp = metrics_service_pb2.ExportMetricsServiceResponse()
    try:
        resp.ParseFromString(body)
    except Exception:  # an answer that is not OTLP: nothing to report beyond the status
        return 0, ""
    return int(resp.partial_success.rejected_data_points), str(resp.partial_success.error_message)


def _series_present(page: str, name: str) -> bool:
    for line in page.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            return True
    return False


class Selftest:
    """One run against one agent; ``clock`` and ``sleep`` are injectable for tests of the timing."""

    def __init__(
        self,
        opts: SelftestOptions,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.opts = opts
        self._clock = clock
        self._sleep = sleep
        run_id = f"{int(time.time())}_{secrets.token_hex(4)}"
        self.statsd_name = f"headwater_selftest_{run_id}"
        self.otlp_name = f"headwater_selftest_otlp_{run_id}"

    def _url(self, port: int, path: str) -> str:
        return f"http://{_host(self.opts.target)}:{port}{path}"

    def _wait_ready(self, deadline: float) -> _Check:
        check = _Check("readyz")
        url = self._url(self.opts.telemetry_port, "/readyz")
        while True:
            try:
                status, body = _http("GET", url, self.opts.request_timeout_s)
                check.detail = f"{url}: HTTP {status} {body.decode(errors='replace').strip()}"
                if status == 200:
                    check.ok = True
                    return check
            except OSError as exc:
                check.detail = f"{url}: {exc}"
            if self._clock() >= deadline:
                return check
            self._sleep(1.0)

    def _send_statsd(self, check: _Check) -> None:
        line = f"{self.statsd_name}:1|c|#headwater_selftest:1".encode()
        try:
            infos = socket.getaddrinfo(self.opts.target, self.opts.statsd_port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, addr = infos[0]
            with socket.socket(family, kind, proto) as sock:
                sock.sendto(line, addr)
        except OSError as exc:
            check.detail = f"cannot send to udp {self.opts.target}:{self.opts.statsd_port}: {exc}"

    def _send_otlp(self, check: _Check) -> None:
        url = self._url(self.opts.otlp_http_port, "/v1/metrics")
        body = otlp_gauge_request(self.otlp_name, 1.0, time.time_ns())
        try:
            status, answer = _http(
                "POST",
                url,
                self.opts.request_timeout_s,
                body,
                {"Content-Type": "application/x-protobuf"},
            )
        except OSError as exc:
            check.detail = f"POST {url}: {exc}"
            return
        if status != 200:
            check.detail = f"POST {url}: HTTP {status} {answer[:200].decode(errors='replace')}"
            return
        rejected, why = _rejected_points(answer)
        if rejected:
            check.detail = f"POST {url}: {rejected} point(s) rejected: {why}"

    def run(self) -> SelftestResult:
        opts = self.opts
        deadline = self._clock() + opts.timeout_s
        result = SelftestResult()
        if opts.telemetry_port:
            ready = self._wait_ready(deadline)
            result.checks.append(ready)
            if not ready.ok:
                return result
        statsd = _Check("statsd") if opts.statsd_port else None
        otlp = _Check("otlp_http") if opts.otlp_http_port else None
        pending = [c for c in (statsd, otlp) if c is not None]
        result.checks += pending
        if not pending:
            return result
        wanted = {"statsd": f"{self.statsd_name}_total", "otlp_http": self.otlp_name}
        for c in pending:
            c.detail = f"sent; {wanted[c.name]} not seen on the pull endpoint"
        pull = self._url(opts.prometheus_port, "/metrics")
        last_send = -float("inf")
        while True:
            now = self._clock()
            if now - last_send >= opts.resend_s:
                last_send = now
                if statsd is not None and not statsd.ok:
                    self._send_statsd(statsd)
                if otlp is not None and not otlp.ok:
                    self._send_otlp(otlp)
            try:
                status, body = _http("GET", pull, opts.request_timeout_s)
                page = body.decode(errors="replace") if status == 200 else ""
                if status != 200:
                    for c in pending:
                        c.detail = f"GET {pull}: HTTP {status}"
            except OSError as exc:
                page = ""
                for c in pending:
                    c.detail = f"GET {pull}: {exc}"
            for c in pending:
                if not c.ok and page and _series_present(page, wanted[c.name]):
                    c.ok = True
                    c.detail = f"{wanted[c.name]} read back from {pull}"
            if all(c.ok for c in pending) or self._clock() >= deadline:
                return result
            self._sleep(min(1.0, max(0.0, deadline - self._clock())))


def selftest_command(opts: SelftestOptions, out: TextIO) -> int:
    """Run the selftest, print one line per check and a verdict; return the exit code."""
    print(f"headwater selftest: target {opts.target} (timeout {opts.timeout_s:g}s)", file=out)
    started = time.monotonic()
    result = Selftest(opts).run()
    for check in result.checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}", file=out)
    took = time.monotonic() - started
    if result.ok:
        print(f"headwater selftest: passed in {took:.1f}s", file=out)
        return EXIT_OK
    failed = ", ".join(c.name for c in result.checks if not c.ok)
    print(f"headwater selftest: FAILED after {took:.1f}s: {failed}", file=out)
    return EXIT_FAILED
