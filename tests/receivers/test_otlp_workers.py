"""``workers: N`` on the OTLP receiver's HTTP protocol (agent/workers.py): N processes share the port,
each decoding its clients' requests and handing the batches to this process's pipeline, which answers
them; what leaves equals what one process passes on, refusals keep their answers, a killed worker is
restarted and counted, and a reload changes the workers.

The kernel spreads connections over the workers by client address and port; each OpenTelemetry SDK
exporter keeps one connection, so 24 of them leave a worker without any with odds ~1e-7 (the tests
check each worker took some)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from agent.component import ComponentId, ComponentKind, Signal
from agent.model import Batch, MetricBatch, Point
from agent.quota import QuotaExceeded
from agent.telemetry import Telemetry
from agent.workers import WorkerPool, decode_batch, encode_batch
from receivers.otlp import OtlpConfig, OtlpReceiver
from tests.conftest import AgentGraph, Sink, component_settings, free_port, wait_until
from tests.receivers.conftest import Running
from tests.receivers.test_otlp import metrics_request

EXPORTERS = 24
ROOT = Path(__file__).resolve().parents[2]
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def _receiver(sink: Any, workers: str = "1", **cfg: Any) -> tuple[OtlpReceiver, Telemetry]:
    tel = Telemetry()
    endpoints = {"grpc": None, "http": f"127.0.0.1:{free_port()}", **cfg}
    config = OtlpConfig(workers=workers, **endpoints)
    assert config.validate() == []
    settings = component_settings(tel, ComponentKind.RECEIVER, "otlp")
    return OtlpReceiver(settings, config, {Signal.METRICS: sink, Signal.TRACES: sink}), tel


def _pool(r: OtlpReceiver) -> WorkerPool:
    assert r.pool is not None
    return r.pool


def _sdk_export(targets: list[str], client: int, transport: str = "http") -> None:
    """Record client ``client``'s instruments once and export the same collected data to every target
    with the OpenTelemetry SDK's OTLP/HTTP or OTLP/gRPC exporter (one exporter, one connection, per
    target)."""
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
    from opentelemetry.sdk.resources import Resource

    reader = InMemoryMetricReader()
    provider = MeterProvider(
        resource=Resource.create({"service.name": f"svc-{client % 3}"}), metric_readers=[reader]
    )
    meter = provider.get_meter("shop", "1.0")
    meter.create_counter("orders", unit="1").add(client + 1, {"client": str(client)})
    meter.create_up_down_counter("queue").add(client - 5)
    hist = meter.create_histogram("latency", unit="ms")
    for v in (client, 2 * client, 250):
        hist.record(v, {"route": "/buy" if client % 2 else "/sell"})
    data = reader.get_metrics_data()
    provider.shutdown()
    for target in targets:
        exporter: Any
        if transport == "grpc":
            # Its own connection, as an exporter in another pod has (gRPC shares one between the
            # channels of a process that go to the same target).
            local = (("grpc.use_local_subchannel_pool", 1),)
            exporter = GrpcExporter(endpoint=target, insecure=True, timeout=10, channel_options=local)  # type: ignore[arg-type]
        else:
            exporter = OTLPMetricExporter(endpoint=target, compression=Compression.Gzip, timeout=10)
        assert exporter.export(data) is MetricExportResult.SUCCESS
        exporter.shutdown()


def _shape(points: list[Point]) -> list[str]:
    """What must be equal between the receivers: every field of every point, in any order."""
    return sorted(repr(p) for p in points)


async def test_two_workers_pass_on_what_one_process_does(running: Running) -> None:
    one_sink, two_sink = Sink(), Sink()
    one, one_tel = _receiver(one_sink)
    two, two_tel = _receiver(two_sink, workers="2")
    await running.start(one)
    await running.start(two)
    assert len(_pool(two).pids) == 2 and os.getpid() not in _pool(two).pids
    targets = [f"http://127.0.0.1:{r.http_port}/v1/metrics" for r in (one, two)]
    await asyncio.gather(*(asyncio.to_thread(_sdk_export, targets, i) for i in range(EXPORTERS)))
    assert all(n > 0 for n in _pool(two).batches), _pool(two).batches  # both workers took a share
    assert one_sink.points() and _shape(two_sink.points()) == _shape(one_sink.points())
    for name in ("receiver_accepted_points_total", "receiver_requests_total"):
        await wait_until(lambda n=name: two_tel.value(n) == one_tel.value(n), f"{name} handed in")
    assert two_tel.value("receiver_requests_total", status="200") == EXPORTERS


async def test_grpc_calls_go_to_the_workers_too(running: Running) -> None:
    one_sink, two_sink = Sink(), Sink()
    one, one_tel = _receiver(one_sink, grpc=f"127.0.0.1:{free_port()}", http=None)
    two, two_tel = _receiver(two_sink, workers="2", grpc=f"127.0.0.1:{free_port()}")
    await running.start(one)
    await running.start(two)
    targets = [f"127.0.0.1:{r.grpc_port}" for r in (one, two)]
    await asyncio.gather(*(asyncio.to_thread(_sdk_export, targets, i, "grpc") for i in range(EXPORTERS)))
    assert all(n > 0 for n in _pool(two).batches), _pool(two).batches
    assert one_sink.points() and _shape(two_sink.points()) == _shape(one_sink.points())
    for name in ("receiver_accepted_points_total", "receiver_grpc_requests_total"):
        await wait_until(lambda n=name: two_tel.value(n) == one_tel.value(n), f"{name} handed in")
    assert two_tel.value("receiver_grpc_requests_total", code="OK") == EXPORTERS


async def test_a_downstream_refusal_reaches_the_client_through_a_worker(running: Running) -> None:
    sink = Sink(refuse=True, reason="queue_full", retry_after_s=7)
    r, tel = _receiver(sink, workers="2")
    session = await running.start(r)
    url = f"http://127.0.0.1:{r.http_port}/v1/metrics"
    async with session.post(
        url, data=metrics_request(1.0, 2.0).SerializeToString(), headers=PROTOBUF
    ) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "7"
        st = status_pb2.Status.FromString(await resp.read())
    info = error_details_pb2.RetryInfo()
    assert st.details[0].Unpack(info) and info.retry_delay.seconds == 7
    await wait_until(
        lambda: tel.value("receiver_refused_points_total", reason="backpressure") == 2, "counted"
    )

    # A tenant's quota (a subclass of Backpressure with its own fields) keeps them across the processes.
    quota = _Refusing(
        QuotaExceeded("team-a", "points_per_second", retry_after_s=3, limit_value=100, remaining=0)
    )
    r2, tel2 = _receiver(quota, workers="2")
    session = await running.start(r2)
    url = f"http://127.0.0.1:{r2.http_port}/v1/metrics"
    async with session.post(url, data=metrics_request(1.0).SerializeToString(), headers=PROTOBUF) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        assert resp.headers["X-RateLimit-Limit"] == "100" and resp.headers["X-RateLimit-Remaining"] == "0"
    await wait_until(
        lambda: tel2.value("receiver_refused_points_total", reason="tenant_quota") == 1, "counted"
    )


class _Refusing:
    """A consumer that refuses every batch with ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def consume(self, batch: Batch) -> None:
        raise self.exc


async def test_bad_input_is_refused_in_a_worker_naming_what_is_wrong(running: Running) -> None:
    sink = Sink()
    r, tel = _receiver(sink, workers="2")
    session = await running.start(r)
    url = f"http://127.0.0.1:{r.http_port}/v1/metrics"
    async with session.post(url, data=b"\xff\xfe not protobuf", headers=PROTOBUF) as resp:
        assert resp.status == 400
        st = status_pb2.Status.FromString(await resp.read())
    assert "not a valid ExportMetricsServiceRequest (protobuf)" in st.message
    async with session.post(
        url, data=metrics_request(1.0, None).SerializeToString(), headers=PROTOBUF
    ) as resp:
        assert resp.status == 200
        answer = ExportMetricsServiceResponse.FromString(await resp.read())
    assert answer.partial_success.rejected_data_points == 1
    assert (
        'metric "requests" data point 1: has neither as_int nor as_double'
        in answer.partial_success.error_message
    )
    assert [p.value for p in sink.points()] == [1.0]  # the rest of the batch went through
    async with session.post(url, data=b"{}", headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 415
    await wait_until(
        lambda: (
            (
                tel.value("receiver_refused_points_total", reason="invalid_request"),
                tel.value("receiver_refused_points_total", reason="no_value"),
                tel.value("receiver_refused_points_total", reason="unsupported_media_type"),
                tel.value("receiver_accepted_points_total"),
            )
            == (1, 1, 1, 1)
        ),
        "the workers' refusals counted in the main process",
    )


class _Gate:
    """A consumer that holds every batch until ``open`` is set, then takes it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.batches: list[Batch] = []
        self.calls = 0

    async def consume(self, batch: Batch) -> None:
        self.calls += 1
        await self.open.wait()
        self.batches.append(batch)


async def _post(url: str, body: bytes) -> int | str:
    """One request on its own connection: the status, or the error the client saw."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(url, data=body, headers=PROTOBUF) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__


async def test_a_killed_worker_is_restarted_and_its_clients_see_errors(running: Running) -> None:
    gate = _Gate()
    r, tel = _receiver(gate, workers="2")
    await running.start(r)
    pool = _pool(r)
    url = f"http://127.0.0.1:{r.http_port}/v1/metrics"
    clients = [
        asyncio.ensure_future(_post(url, metrics_request(1.0, 2.0).SerializeToString()))
        for _ in range(EXPORTERS)
    ]
    await wait_until(lambda: gate.calls == EXPORTERS, "every batch held by the pipeline")
    shares = list(pool.batches)
    slot = max(range(2), key=lambda i: shares[i])
    victim = pool.pids[slot]
    os.kill(victim, signal.SIGKILL)
    await wait_until(
        lambda: tel.value("receiver_worker_restarts_total") == 1 and len(pool.pids) == 2, "restarted"
    )
    assert victim not in pool.pids
    gate.open.set()
    answers = await asyncio.gather(*clients)
    failed = [a for a in answers if a != 200]
    assert len(failed) == shares[slot] and all(isinstance(a, str) for a in failed), answers
    # The pipeline took every batch; the dead worker's clients were told it failed: counted, not lost.
    assert sum(len(b) for b in gate.batches) == 2 * EXPORTERS
    assert tel.value("receiver_accepted_points_total") == 2 * EXPORTERS
    await wait_until(
        lambda: tel.value("receiver_worker_unanswered_points_total") == 2 * shares[slot], "unanswered counted"
    )
    # The restarted worker serves: new connections reach both.
    before = list(pool.batches)
    while not all(now > then for now, then in zip(pool.batches, before, strict=True)):
        assert await _post(url, metrics_request(3.0).SerializeToString()) == 200
        assert sum(pool.batches) - sum(before) < 200, "the kernel never picked the restarted worker"


CONFIG: dict[str, Any] = {
    "receivers": {"otlp": {"grpc": None, "workers": "2"}},
    "exporters": {"debug": {}},
    "service": {"pipelines": {"metrics": {"receivers": ["otlp"], "exporters": ["debug"]}}},
}


def _config(port: int, out: Path, workers: str) -> dict[str, Any]:
    receivers = {"otlp": {**CONFIG["receivers"]["otlp"], "http": f"127.0.0.1:{port}", "workers": workers}}
    return {**CONFIG, "receivers": receivers, "exporters": {"debug": {"path": str(out)}}}


def _names(out: Path) -> list[str]:
    if not out.exists():
        return []
    return [json.loads(line)["name"] for line in out.read_text().splitlines() if line]


async def test_a_reload_changes_the_workers(agents: AgentGraph, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "points.jsonl"
    agent = await agents.start(_config(port, out, "2"))
    old = agent._receivers[ComponentId("otlp")].instance
    old_pids = _pool(old).pids
    url = f"http://127.0.0.1:{port}/v1/metrics"
    assert await _post(url, metrics_request(1.0, name="before").SerializeToString()) == 200
    assert await agent.reload(agents.config(_config(port, out, "3")))
    new = agent._receivers[ComponentId("otlp")].instance
    assert new is not old and len(_pool(new).pids) == 3
    assert not set(old_pids) & set(_pool(new).pids)
    for pid in old_pids:
        await wait_until(lambda p=pid: not _alive(p), "the old workers exited")
    assert await _post(url, metrics_request(2.0, name="after").SerializeToString()) == 200
    await wait_until(lambda: _names(out) == ["before", "after"], "both requests' points written")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_forwarded_form_rebuilds_the_same_batch() -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    from agent.model import SpanBatch
    from receivers.otlp.convert import Converted, MetricsConverter, ShadowMetricsRequest

    request = ShadowMetricsRequest.FromString(metrics_request(1.5, 2.5).SerializeToString())
    points = tuple(p for chunk in MetricsConverter().chunks(request, 1, 100, Converted()) for p in chunk)
    batch = MetricBatch(points, {"x-scope-orgid": "a"})
    back = decode_batch(encode_batch(batch))
    assert (
        isinstance(back, MetricBatch) and back == batch and back.points[0].resource is back.points[1].resource
    )
    spans = trace_pb2.ResourceSpans()
    spans.scope_spans.add().spans.add(name="buy", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    span_batch = SpanBatch((spans,), {"a": "b"}, 1)
    assert decode_batch(encode_batch(span_batch)) == span_batch


def test_workers_setting() -> None:
    assert OtlpConfig().workers == "1" and OtlpReceiver.reuse_port is False
    assert OtlpConfig(workers="auto").validate() == [] == OtlpConfig(workers="2", http=None).validate()
    for bad in ("0", "two", "300"):
        assert [p for p, _ in OtlpConfig(workers=bad).validate()] == ["workers"]
    for endpoint in ("grpc", "http"):
        ((path, message),) = OtlpConfig(workers="2", **{endpoint: "127.0.0.1:0"}).validate()
        assert path == "workers" and endpoint in message


async def test_one_worker_is_the_receiver_itself() -> None:
    r, _ = _receiver(Sink(), workers="1")
    assert r.pool is None


async def test_a_capture_records_the_bodies_the_workers_take(running: Running) -> None:
    sink = Sink()
    r, _ = _receiver(sink, workers="2")
    recorded: list[tuple[str, bytes, Any]] = []
    # Set before the workers start: each gets it right after binding, before any client connects (set
    # later, a worker records from when its message arrives, as a capture starts "now").
    r.capture = lambda transport, payload, meta=None: recorded.append((transport, payload, meta))
    await running.start(r)
    url = f"http://127.0.0.1:{r.http_port}/v1/metrics"
    bodies = [metrics_request(float(i)).SerializeToString() for i in range(EXPORTERS)]
    assert await asyncio.gather(*(_post(url, body) for body in bodies)) == [200] * EXPORTERS
    assert all(n > 0 for n in _pool(r).batches), _pool(r).batches
    # A worker sends a body before its batch, on the same socket: recorded before the answer.
    assert sorted(payload for _, payload, _ in recorded) == sorted(bodies)
    assert {(t, meta["path"]) for t, _, meta in recorded} == {("http", "/v1/metrics")}


_MAIN = """
import asyncio
from agent.component import ComponentKind, Signal
from agent.telemetry import Telemetry
from receivers.otlp import OtlpConfig, OtlpReceiver
from tests.conftest import Sink, component_settings

async def main():
    config = OtlpConfig(grpc=None, http="127.0.0.1:{port}", workers="2")
    settings = component_settings(Telemetry(), ComponentKind.RECEIVER, "otlp")
    r = OtlpReceiver(settings, config, {{Signal.METRICS: Sink()}})
    await r.start()
    print(" ".join(map(str, r.pool.pids)), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_workers_exit_when_the_main_process_is_killed() -> None:
    main = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN.format(port=free_port()), stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        assert main.stdout is not None
        pids = [int(p) for p in (await main.stdout.readline()).split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        main.kill()
        await main.wait()
    for pid in pids:  # no orphan keeps the port: each sees its socket pair close and stops
        await wait_until(lambda p=pid: not _alive(p), f"worker {pid} exited")


async def test_a_late_answer_to_an_abandoned_batch_never_answers_a_newer_one() -> None:
    # Requests cancelled while their batches are with the main process (a gRPC deadline) leave those
    # batches to be answered later; a newer batch must never take one of their answers (the id() of a
    # freed future is soon reused).
    import contextlib
    import gc
    import socket

    from agent.component import Backpressure
    from agent.model import Kind
    from agent.telemetry import Cell
    from agent.workers import ForwardingConsumer, _Answers, _Channel, _refusal

    ours, theirs = socket.socketpair()
    worker, main = await _Channel.open(ours), await _Channel.open(theirs)
    answers = _Answers(Cell())
    consumer = ForwardingConsumer(Signal.METRICS, worker, answers)
    point = Point("orders", Kind.GAUGE, (), 1)
    abandoned = []
    for _ in range(20):
        request = asyncio.create_task(consumer.consume(MetricBatch((point, point), {})))
        abandoned.append((await main.receive())[1])
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        del request
    gc.collect()
    newer, idents = [], []
    for _ in range(20):
        newer.append(asyncio.create_task(consumer.consume(MetricBatch((point,), {}))))
        await asyncio.sleep(0)  # its answer's future made before the channel's next one
        idents.append((await main.receive())[1])
    for ident in abandoned:
        answers.answer(ident, None)  # taken: their clients got no answer
    for ident in idents:
        answers.answer(ident, _refusal(Backpressure("memory_limiter", 1.0)))
    told = await asyncio.gather(*newer, return_exceptions=True)
    assert [type(t).__name__ for t in told] == ["Backpressure"] * 20  # none told "taken" (None)
    assert answers.unanswered.value == 2 * 20
    worker.close()
    main.close()


async def test_a_stop_while_a_worker_restarts_stops_the_new_one_too() -> None:
    # stop() sees the dead process of a slot whose new one is starting: the watcher must stop that one
    # (before, it was left serving until the pool gave up waiting for its task, STOP_TIMEOUT_S later).
    r, _ = _receiver(Sink(), workers="2")
    await r.start()
    pool = _pool(r)
    spawning = asyncio.Event()
    started: list[asyncio.subprocess.Process] = []
    spawn = pool._spawn

    async def watched_spawn(worker: Any) -> None:
        spawning.set()
        await spawn(worker)
        assert worker.process is not None
        started.append(worker.process)

    pool._spawn = watched_spawn  # type: ignore[method-assign]
    os.kill(pool.pids[0], signal.SIGKILL)
    await spawning.wait()
    await r.shutdown()
    assert len(started) == 1 and started[0].returncode == 0, "the restarted worker was stopped in order"
    assert pool.pids == []


async def test_a_worker_told_to_stop_twice_still_answers_its_requests(running: Running) -> None:
    # stop() and a restart's watcher may both tell a new worker to stop: the second must not close its
    # socket while its requests still wait for their answers.
    gate = _Gate()
    r, tel = _receiver(gate, workers="2")
    await running.start(r)
    pool = _pool(r)
    url = f"http://127.0.0.1:{r.http_port}/v1/metrics"
    clients = [
        asyncio.ensure_future(_post(url, metrics_request(1.0).SerializeToString())) for _ in range(EXPORTERS)
    ]
    await wait_until(lambda: gate.calls == EXPORTERS, "every batch held by the pipeline")
    for worker in pool._workers:
        assert worker.channel is not None
        await worker.channel.send(("stop",))
        await worker.channel.send(("stop",))

    async def refused() -> bool:  # both workers stopped listening: they took their stops
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", r.http_port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued at a listener as it closed
            return False
        writer.close()
        return False

    await wait_until(refused, "the workers stopped listening")
    gate.open.set()
    assert await asyncio.gather(*clients) == [200] * EXPORTERS
    assert tel.value("receiver_worker_unanswered_points_total") == 0
