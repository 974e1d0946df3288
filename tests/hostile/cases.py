"""Every hostile input of issue 10, each with its generator and what the agent must do with it.

A :class:`Case` configures the agent (``configure``), sends its input (``drive``) and returns the
problems it found: the input accepted when it must be refused, refused without its reason counted,
data lost without a count, a reload or a shutdown that did not finish. The harness adds the checks
common to all cases (the agent alive, ``/healthz`` answering, RSS under the memory limit, the
legitimate traffic arrived). Sizes come in two scales: ``ci`` (bounded for the test suite on a 2-core
machine) and ``bench`` (the issue's full sizes).

Refusal reasons are matched by pattern (``Run.refusals``) where the issue fixes the behaviour but not
the reason's name (truncated datagrams, cancelled calls); where a reason already exists
(``line_too_long``, ``too_many_items``, ``label_value_too_long``) it is matched exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import http.client
import json
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

from tests.hostile.harness import (
    CaseError,
    Run,
    background,
    sizes,
    wait_until,
)

Problems = list[str]


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    """config | memory | health | silent | counters | regression (the issue's sections)."""
    summary: str
    drive: Callable[[Run], Problems]
    configure: Callable[[Run, dict[str, Any]], None] = lambda run, config: None
    heavy: bool = False
    """Part of the ``hostile_heavy`` group (still run by ``make test``)."""
    legit: str = "statsd"
    """The legitimate client sending meanwhile: statsd (TCP), otlp (the SDK over OTLP/HTTP) or none."""
    expect_alive: bool = True


# -- helpers ------------------------------------------------------------------------------------------


def post(
    run: Run, port: str, path: str, body: bytes, headers: dict[str, str], timeout_s: float = 120
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", run.ports[port], timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_json(run: Run, body: bytes, **headers: str) -> tuple[int, bytes]:
    return post(run, "http", "/v1/metrics", body, {"Content-Type": "application/json", **headers})


def post_otlp(run: Run, request: Any) -> tuple[int, bytes]:
    body = request if isinstance(request, bytes) else request.SerializeToString()
    return post(run, "otlp_http", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})


def otlp_request(metrics: list[Any], resource_attrs: dict[str, str] | None = None) -> Any:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in (resource_attrs or {}).items():
        rm.resource.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    rm.scope_metrics.add().metrics.extend(metrics)
    return req


def gauge(name: str, points: list[tuple[dict[str, Any], float]]) -> Any:
    """An OTLP gauge metric; attribute values may be str or ready AnyValue messages."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

    m = Metric(name=name)
    now = time.time_ns()
    for attrs, value in points:
        p = m.gauge.data_points.add(time_unix_nano=now, as_double=value)
        for k, v in attrs.items():
            p.attributes.append(
                KeyValue(key=k, value=v if isinstance(v, AnyValue) else AnyValue(string_value=v))
            )
    return m


def udp_send(run: Run, payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, ("127.0.0.1", run.ports["statsd"]))


def tcp_send(run: Run, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", run.ports["statsd"]), timeout=10) as s:
        s.sendall(data)


def flushed(run: Run, marker: str) -> None:
    """Send ``marker:1|c`` over StatsD TCP after the case's input and wait until the pull page shows
    it: everything the agent read before it has then been flushed and exported too."""
    tcp_send(run, f"{marker}:1|c\n".encode())
    name = marker.replace(".", "_") + "_total"
    wait_until(f"{name} on the pull page", lambda: run.pull_value(name) is not None, timeout_s=30)


def counted(run: Run, reason: str, before: float, at_least: float = 1, what: str = "") -> Problems:
    """A problem unless refusals matching ``reason`` grew by ``at_least`` (waiting, bounded, for it)."""
    got = [0.0]

    def check() -> bool:
        got[0] = run.refusals(reason) - before
        return got[0] >= at_least

    try:
        wait_until(f"refusals {reason}", check, timeout_s=10, every_s=0.25)
    except CaseError:
        what = what or "the input"
        return [f"{what} was not counted as refused{{reason=~{reason!r}}} ({got[0]:g} < {at_least:g})"]
    return []


def raise_own_nofile(wanted: int) -> int:
    """Raise this process's soft nofile toward ``wanted`` (up to the hard limit); return what we got."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def self_metric(run: Run, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in run.self_metrics() if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


class Backend:
    """A remote-write backend that misbehaves: ``hang`` (accepts, reads, never answers), ``fail``
    (answers every request 503), ``reset`` (accepts and resets the connection at once), ``gone``
    (refuses connections)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        if mode == "gone":
            # Bound but not listening: the port stays reserved and every connection is refused.
            self._listener = socket.socket()
            self._listener.bind(("127.0.0.1", 0))
            self.port = self._listener.getsockname()[1]
            return
        if mode == "fail":
            backend = self

            class Handler(BaseHTTPRequestHandler):
                def do_POST(self) -> None:
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    backend.requests += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                def log_message(self, *args: Any) -> None:
                    pass

            self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.port = self._http.server_address[1]
            self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        else:
            self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
            self.port = self._listener.getsockname()[1]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._serve_raw, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/write"

    def _serve_raw(self) -> None:
        sel = selectors.DefaultSelector()
        self._listener.setblocking(False)
        sel.register(self._listener, selectors.EVENT_READ)
        held: list[socket.socket] = []
        while not self._stop.is_set():
            for key, _ in sel.select(0.2):
                if key.fileobj is self._listener:
                    try:
                        conn, _ = self._listener.accept()
                    except OSError:
                        continue
                    self.requests += 1
                    if self.mode == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        conn.close()
                    else:
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ)
                        held.append(conn)
                else:
                    conn = key.fileobj  # type: ignore[assignment]
                    try:
                        data = conn.recv(1 << 16)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(conn)
                        conn.close()
                        held.remove(conn)
        for conn in held:
            conn.close()
        self._listener.close()
        sel.close()

    def close(self) -> None:
        if self.mode == "gone":
            self._listener.close()
            return
        if self.mode == "fail":
            self._http.shutdown()
            self._http.server_close()
        else:
            self._stop.set()
        self._thread.join(10)


def add_remote_write(run: Run, config: dict[str, Any], name: str, backend: Backend, **settings: Any) -> None:
    config["exporters"][name] = {
        "endpoint": backend.url,
        "timeout": "2s",
        "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"},
        **settings,
    }
    config["service"]["pipelines"]["metrics"]["exporters"].append(name)
    run.on_stop(backend.close)


def statsd_series_payloads(prefix: str, count: int, start: int = 0) -> list[bytes]:
    """``count`` distinct counter series, packed ~1,400 bytes per datagram."""
    out: list[bytes] = []
    lines: list[bytes] = []
    size = 0
    for i in range(start, start + count):
        line = f"{prefix}:1|c|#i:{i}".encode()
        if size + len(line) + 1 > 1400:
            out.append(b"\n".join(lines))
            lines, size = [], 0
        lines.append(line)
        size += len(line) + 1
    if lines:
        out.append(b"\n".join(lines))
    return out


def paced(payloads: list[bytes], seconds: float, send: Callable[[bytes], object]) -> None:
    """Send ``payloads`` evenly over ``seconds`` (a load generator's schedule, not a wait)."""
    started = time.monotonic()
    per = seconds / max(1, len(payloads))
    for i, p in enumerate(payloads):
        send(p)
        ahead = started + i * per - time.monotonic()
        if ahead > 0.005:
            time.sleep(ahead)


def hold(run: Run, probes: int, max_s: float) -> None:
    """Keep an attack up until the /healthz probe has run ``probes`` more times (or ``max_s`` passed)."""
    out = run.workdir / "probe.txt"

    def lines() -> int:
        return out.read_text().count("\n") if out.exists() else 0

    target = lines() + probes
    # On timeout the probe itself was stuck (a stalled agent): the attack has been held long enough.
    with contextlib.suppress(CaseError):
        wait_until(f"{probes} /healthz probes", lambda: lines() >= target or not run.alive(), timeout_s=max_s)


def settle(run: Run, name: str, **labels: str) -> float:
    """Wait until a self-metric stops moving (two reads 1.5 flush intervals apart agree)."""
    last = [-1.0]

    def check() -> bool:
        now = self_metric(run, name, **labels)
        same = now == last[0]
        last[0] = now
        return same

    wait_until(f"{name} to settle", check, timeout_s=120, every_s=1.5)
    return last[0]


# -- config ---------------------------------------------------------------------------------------------


def _reload_with(run: Run, text: str) -> tuple[int, Problems]:
    offset = len(run.log_text())
    run.write_config(text)
    run.signal(signal.SIGHUP)
    problems: Problems = []
    try:
        run.wait_log(r"reload refused|reloaded ", after=offset, timeout_s=sizes(run.scale, 90, 180))
    except CaseError as exc:
        problems.append(f"the reload did not finish: {exc}")
    if not run.alive():
        problems.append(f"the agent died on the reload (exit {run.returncode()})")
    return offset, problems


def drive_reload_huge_int(run: Run) -> Problems:
    config = copy.deepcopy(run.config)
    config["receivers"]["statsd"]["max_series"] = "HUGE"
    text = yaml.safe_dump(config, sort_keys=False).replace("max_series: HUGE", "max_series: " + "9" * 5000)
    offset, problems = _reload_with(run, text)
    log = run.log_text()[offset:]
    if "reload refused" not in log:
        problems.append("a config with a 5,000-digit integer was not refused")
    elif not re.search(r"max_series", log):
        problems.append("the refusal does not name the field (receivers.statsd.max_series)")
    if "Traceback" in log:
        problems.append("the refusal logged a traceback")
    return problems


def alias_bomb(levels: int) -> str:
    """A YAML "billion laughs": each level a list of nine aliases of the one before (~960 bytes)."""
    lines = ['l0: &l0 "lollollollollollollollollollollol"']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def drive_reload_alias_bomb(run: Run) -> Problems:
    bomb = alias_bomb(9)
    run.facts["bomb_bytes"] = len(bomb)
    text = yaml.safe_dump(run.config, sort_keys=False) + bomb
    offset, problems = _reload_with(run, text)
    log = run.log_text()[offset:]
    if "reload refused" not in log:
        problems.append("the alias bomb was not refused")
    elif "alias" not in log.lower():
        problems.append("the refusal does not say it was the aliases")
    return problems


def configure_hung_backend(run: Run, config: dict[str, Any]) -> None:
    add_remote_write(run, config, "prometheus_remote_write", Backend("hang"), timeout="10s")
    config["service"]["shutdown_timeout"] = "10s"


def drive_reload_hung_backend(run: Run) -> Problems:
    """SIGHUP with a changed remote-write exporter while its backend hangs: StatsD intake must keep
    taking connections and lines the whole time, and queued points must not be dropped."""
    payloads = statsd_series_payloads("reload.load", 5_000)
    udp_send(run, payloads)
    wait_until(
        "remote-write has a request in flight",
        lambda: self_metric(run, "headwater_receiver_accepted_points_total") >= 5_000,
        timeout_s=30,
    )
    flushed(run, "reload.before")
    dropped_before = self_metric(run, "headwater_exporter_dropped_points_total")
    config = copy.deepcopy(run.config)
    config["exporters"]["prometheus_remote_write"]["external_labels"] = {"reload": "2"}
    failures: list[float] = []

    def intake(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", run.ports["statsd"]), timeout=2) as s:
                    s.sendall(b"reload.intake:1|c\n")
            except OSError:
                failures.append(time.monotonic())
            stop.wait(0.05)

    with background(intake, "intake"):
        _, problems = _reload_with(run, yaml.safe_dump(config, sort_keys=False))
    refused = [len(failures)]
    run.facts["intake_refused"] = len(failures)
    run.facts["intake_paused_s"] = round(failures[-1] - failures[0], 1) if failures else 0.0
    if refused[0]:
        problems.append(f"StatsD TCP intake paused during the reload: {refused[0]} connections failed")
    if "reloaded " not in run.log_text():
        problems.append("the changed config was not applied")
    if run.alive():
        lost = self_metric(run, "headwater_exporter_dropped_points_total") - dropped_before
        run.facts["dropped_at_reload"] = lost
        if lost:
            problems.append(f"{lost:g} queued points were dropped by the reload instead of handed over")
    return problems


SHUTDOWN_TIMEOUT_S = 5


def configure_sigterm(run: Run, config: dict[str, Any]) -> None:
    # The backend hangs until SIGTERM, then goes: sends time out at about the shutdown deadline, the
    # window where a cancelled worker could miss its cancellation.
    backend = Backend("hang")
    add_remote_write(
        run,
        config,
        "prometheus_remote_write",
        backend,
        sending_queue={"queue_size": 5, "num_consumers": 2},
        timeout=f"{SHUTDOWN_TIMEOUT_S}s",
    )
    run.peers["backend"] = backend
    config["service"]["shutdown_timeout"] = f"{SHUTDOWN_TIMEOUT_S}s"


def drive_sigterm_full_queue(run: Run) -> Problems:
    """Fill the memory queue behind a hung backend, SIGTERM and take the backend away: the agent must
    exit within service.shutdown_timeout (plus process teardown)."""

    def full() -> bool:
        udp_send(run, statsd_series_payloads("term.load", 2_000))
        return self_metric(run, "headwater_exporter_queue_size") >= 5

    wait_until("the remote-write memory queue to fill", full, timeout_s=60, every_s=1.1)
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    run.peers["backend"].close()
    assert run.proc is not None
    bound = SHUTDOWN_TIMEOUT_S + 25
    try:
        code = run.proc.wait(bound)
    except subprocess.TimeoutExpired:
        run.facts["exit_s"] = f">{bound}"
        return [f"SIGTERM did not finish within {bound}s (shutdown_timeout {SHUTDOWN_TIMEOUT_S}s)"]
    run.facts["exit_s"] = round(time.monotonic() - started, 1)
    return [] if code == 0 else [f"the agent exited with {code} on SIGTERM"]


# -- memory -----------------------------------------------------------------------------------------------


def drive_otlp_big_labels(run: Run) -> Problems:
    count = 60
    before = run.refusals("label_value_too_long|series_too_large")
    filler = "x" * (10 * 2**20)
    statuses: Counter[int] = Counter()
    for i in range(count):
        statuses[post_otlp(run, otlp_request([gauge("big.label", [({"v": f"{i}{filler}"}, 1.0)])]))[0]] += 1
    run.facts["statuses"] = dict(statuses)
    problems = counted(
        run, "label_value_too_long|series_too_large", before, count, "a 10 MiB attribute value"
    )
    page = run.pull_page()
    run.facts["pull_page_mib"] = round(len(page) / 2**20, 1)
    if b"big_label" in page:
        problems.append("a 10 MiB label value reached the pull page")
    return problems


def json_histograms(total_bytes: int, items: int) -> bytes:
    """A JSON list of ``items`` histogram items with integer observations, ``total_bytes`` long."""
    per_item = total_bytes // items
    head = '{"name":"bulk.values","type":"histogram","value":['
    values = ",".join(["12345"] * ((per_item - len(head) - 3) // 6))
    item = head + values + "]}"
    return ("[" + ",".join([item] * items) + "]").encode()


async def _post_many(
    run: Run, body: bytes, count: int, port: str = "http", headers: dict[str, str] | None = None
) -> tuple[Counter[str], list[bytes]]:
    import aiohttp

    outcomes: Counter[str] = Counter()
    refused_bodies: list[bytes] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one() -> None:
            try:
                async with session.post(
                    f"http://127.0.0.1:{run.ports[port]}/v1/metrics",
                    data=body,
                    headers=headers or {"Content-Type": "application/json"},
                ) as resp:
                    data = await resp.read()
                    outcomes[str(resp.status)] += 1
                    if resp.status != 200:
                        refused_bodies.append(data)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return outcomes, refused_bodies


def refused_codes_counted(
    run: Run, outcomes: Counter[str], bodies: list[bytes], before: dict[str, float]
) -> Problems:
    """Every request was answered; those refused carry a code the agent also counted."""
    problems: Problems = []
    errors = {k: v for k, v in outcomes.items() if not k.isdigit()}
    if errors:
        problems.append(f"requests failed without an answer: {errors}")
    codes: set[str] = set()
    for body in bodies:
        try:
            codes.add(str(json.loads(body)["code"]))
        except (ValueError, KeyError, TypeError):
            problems.append(f"a refusal without a reason code: {body[:120]!r}")
            break
    for code in sorted(codes):
        if run.refusals(re.escape(code)) <= before.get(code, 0.0):
            problems.append(f"refusals answered {code} were not counted")
    return problems


def drive_json_concurrent_bodies(run: Run) -> Problems:
    count = sizes(run.scale, 30, 60)
    body = json_histograms(int(19.9 * 10**6), 1000)
    before = {c: run.refusals(c) for c in ("backpressure", "memory_limit")}
    outcomes, bodies = asyncio.run(_post_many(run, body, count))
    run.facts["outcomes"] = dict(outcomes)
    return refused_codes_counted(run, outcomes, bodies, before)


def drive_statsd_series_flood(run: Run) -> Problems:
    """Distinct StatsD series (1 M in 60 s; CI 200 k in 10 s): every one is on the pull page or counted
    as refused or dropped."""
    total, seconds = sizes(run.scale, (200_000, 10.0), (1_000_000, 60.0))
    payloads = statsd_series_payloads("flood", total)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        paced(payloads, seconds, lambda p: s.sendto(p, ("127.0.0.1", run.ports["statsd"])))
    settle(run, "headwater_receiver_datagrams_total", receiver="statsd")
    settle(run, "headwater_receiver_accepted_points_total", receiver="statsd")
    page = run.pull_page()
    kept = len(re.findall(rb"^flood_total\{", page, re.M))
    counted_lines = run.refusals("series_limit|.*limit.*|memory.*|backpressure")
    kernel = self_metric(run, "headwater_receiver_udp_kernel_drops_total")
    run.facts.update(
        kept=kept, refused_or_dropped=counted_lines, kernel_drops=kernel, page_mib=round(len(page) / 2**20, 1)
    )
    # A kernel drop loses a whole datagram (~45 lines), counted once.
    if kept + counted_lines + kernel * 45 < total:
        return [f"{total - kept - counted_lines:g} of {total} series neither kept nor counted"]
    return []


# -- health ------------------------------------------------------------------------------------------------


HALF_HEADERS_NOFILE = 4096
HTTP_RECEIVERS = ("http", "otlp")


def configure_half_headers(run: Run, config: dict[str, Any]) -> None:
    run.nofile = HALF_HEADERS_NOFILE


def drive_half_sent_headers(run: Run) -> Problems:
    """Connections that send half a request header and stop, far more than the agent's nofile."""
    wanted = sizes(run.scale, 6_000, 10_000)
    have = raise_own_nofile(wanted + 500)
    count = min(wanted, have - 500)
    run.facts["connections_wanted"] = count
    log_before = run.log_path.stat().st_size
    before = run.refusals(".*", HTTP_RECEIVERS)
    socks: list[socket.socket] = []
    opened = 0
    ports = ["http", "otlp_http"]
    deadline = time.monotonic() + sizes(run.scale, 30, 60)
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            s = socket.socket()
            s.settimeout(1.0)
            try:
                s.connect(("127.0.0.1", run.ports[ports[i % 2]]))
                s.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
                opened += 1
            except OSError:
                s.close()
                continue
            socks.append(s)
        run.facts["connections_opened"] = opened
        hold(run, probes=sizes(run.scale, 60, 400), max_s=sizes(run.scale, 20, 60))
    finally:
        for s in socks:
            s.close()
    problems: Problems = []
    grown = run.log_path.stat().st_size - log_before
    run.facts["log_growth_kib"] = grown // 1024
    if grown > 256 * 1024:
        problems.append(
            f"the agent logged {grown // 1024} KiB during the attack (accept errors per attempt?)"
        )
    if run.alive() and run.refusals(".*", HTTP_RECEIVERS) <= before:
        problems.append(
            "no connection was refused or closed with a counted reason (header timeout, connection cap)"
        )
    return problems


def drive_json_int_arrays(run: Run) -> Problems:
    """4 clients posting 20 MB integer arrays, several rounds each: valid, big, CPU-heavy to parse."""
    rounds = sizes(run.scale, 2, 5)
    body = json_histograms(20 * 10**6, 1)
    before = {c: run.refusals(c) for c in ("backpressure", "memory_limit")}

    async def clients() -> tuple[Counter[str], list[bytes]]:
        outcomes: Counter[str] = Counter()
        bodies: list[bytes] = []
        for _ in range(rounds):
            o, b = await _post_many(run, body, 4)
            outcomes.update(o)
            bodies.extend(b)
        return outcomes, bodies

    outcomes, bodies = asyncio.run(clients())
    run.facts["outcomes"] = dict(outcomes)
    return refused_codes_counted(run, outcomes, bodies, before)


def drive_otlp_million_points(run: Run) -> Problems:
    """One OTLP request of 1,000,000 points (one series, distinct timestamps; ~19 MB)."""
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

    points = 1_000_000
    m = Metric(name="million.points")
    t0 = time.time_ns() - points * 1000
    dps = m.gauge.data_points
    for i in range(points):
        dps.add(time_unix_nano=t0 + i * 1000, as_double=float(i))
    body = otlp_request([m]).SerializeToString()
    run.facts["request_mib"] = round(len(body) / 2**20, 1)
    before = {c: run.refusals(c) for c in ("backpressure", "memory_limit")}
    status, answer = post_otlp(run, body)
    run.facts["status"] = status
    run.facts["refusals_before"] = sum(before.values())
    if status == 200:
        return []
    # Converted in chunks, the request costs one chunk of points (~200 MiB peak, not ~400): the
    # memory limiter has no reason to refuse it, so a valid request must be taken.
    return [f"a valid 1 M-point request was answered {status}: {answer[:160]!r}"]


def drive_scrape_many_series(run: Run) -> Problems:
    """The pull endpoint holding many series (617 k; CI 100 k), scraped several times. Requests the
    agent refuses for backpressure are left out (and must be counted); the rest must be on the page."""
    total = sizes(run.scale, 100_000, 617_000)
    chunk = 20_000
    accepted = 0
    before = run.refusals("backpressure|memory_limit")
    refused = 0
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        status, body = post_otlp(
            run, otlp_request([gauge("scrape.series", [({"i": str(start + i)}, 1.0) for i in range(n)])])
        )
        if status == 200:
            accepted += n
        elif status in (429, 503):
            refused += n
        else:
            return [f"populating the pull endpoint: {status} {body[:200]!r}"]
    problems = counted(run, "backpressure|memory_limit", before, refused, "refused series") if refused else []
    # The pull exporter holds at most its max_series (200 k): the accepted series beyond it must be
    # counted as dropped{series_limit}, the others must be on the page.
    on_page: list[int] = [0]

    def all_accounted() -> bool:
        on_page[0] = len(re.findall(rb"^scrape_series\{", run.pull_page(), re.M))
        capped = self_metric(run, "headwater_exporter_dropped_points_total", reason="series_limit")
        return on_page[0] + capped >= accepted

    wait_until("the series on the pull page or counted over its cap", all_accounted, timeout_s=120, every_s=2)
    run.facts.update(series=accepted, refused_series=refused, on_page=on_page[0])
    durations = []
    for _ in range(sizes(run.scale, 3, 5)):
        t0 = time.monotonic()
        page = run.pull_page()
        durations.append(time.monotonic() - t0)
    run.facts.update(page_mib=round(len(page) / 2**20, 1), scrape_s=round(max(durations), 2))
    return problems


def drive_statsd_packed_datagrams(run: Run) -> Problems:
    """100 datagrams a second, each packing 30,000 values of one histogram."""
    seconds = sizes(run.scale, 5, 10)
    datagram = b"packed.values:" + b":".join([b"7"] * 30_000) + b"|h"
    before = self_metric(run, "headwater_receiver_datagrams_total")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        paced(
            [datagram] * (100 * seconds), seconds, lambda p: s.sendto(p, ("127.0.0.1", run.ports["statsd"]))
        )
    sent = 100 * seconds
    got = settle(run, "headwater_receiver_datagrams_total") - before
    kernel = self_metric(run, "headwater_receiver_udp_kernel_drops_total")
    run.facts.update(datagrams_read=got, kernel_drops=kernel)
    if got + kernel < sent:
        return [f"{sent - got - kernel:g} of {sent} datagrams neither read nor counted as dropped"]
    return []


def drive_concurrent_small_posts(run: Run) -> Problems:
    """2,000 concurrent small POSTs: each answered, or its connection closed by a connection cap that
    counted it."""
    count = 2_000
    raise_own_nofile(count + 500)
    body = b'{"name":"small.post","value":1}'
    before = {c: run.refusals(c) for c in ("backpressure", "memory_limit")}
    capped_before = run.refusals(CONNECTION_CAP, HTTP_RECEIVERS)
    outcomes, bodies = asyncio.run(_post_many(run, body, count))
    run.facts["outcomes"] = dict(outcomes)
    unanswered = sum(v for k, v in outcomes.items() if not k.isdigit())
    capped = run.refusals(CONNECTION_CAP, HTTP_RECEIVERS) - capped_before
    run.facts["closed_by_connection_cap"] = capped
    if unanswered and capped >= unanswered:
        outcomes = Counter({k: v for k, v in outcomes.items() if k.isdigit()})
    return refused_codes_counted(run, outcomes, bodies, before)


CONNECTION_CAP = ".*connection.*limit.*|.*too_many_connections.*|.*connection_cap.*"


GRPC_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


async def _grpc_calls(run: Run, count: int, request: Any, timeout_s: float) -> Counter[str]:
    import grpc
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{run.ports['grpc']}") as channel:
        export = channel.unary_unary(
            GRPC_EXPORT,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

        async def one() -> None:
            try:
                await export(request, timeout=timeout_s)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1

        await asyncio.gather(*(one() for _ in range(count)))
    return outcomes


CANCELLED = "cancel.*|.*cancelled|.*canceled|deadline.*|.*deadline_exceeded"


def drive_concurrent_grpc_calls(run: Run) -> Problems:
    count = 2_000
    request = otlp_request([gauge("grpc.calls", [({"k": "v"}, 1.0)])])
    before = run.refusals(CANCELLED)
    outcomes = asyncio.run(_grpc_calls(run, count, request, timeout_s=60))
    run.facts["outcomes"] = dict(outcomes)
    problems: Problems = []
    ended = outcomes.get("CANCELLED", 0) + outcomes.get("DEADLINE_EXCEEDED", 0)
    if ended:
        # Each one, not just some: the agent counts even the calls gRPC cancels in its own queue.
        problems += counted(run, CANCELLED, before, at_least=ended, what=f"{ended} calls answered CANCELLED")
    run.facts["cancelled_counted"] = run.refusals(CANCELLED) - before
    unexpected = {
        k: v for k, v in outcomes.items() if k not in ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")
    }
    if unexpected:
        problems.append(f"calls ended in {unexpected}")
    return problems


# -- silent damage -------------------------------------------------------------------------------------


def drive_unixgram_truncated(run: Run) -> Problems:
    """A Unix datagram longer than max_datagram_size (64 KiB): the kernel cuts it inside a tag."""
    cut_at = 65535
    tail = b"cut:1|c|#env:production\n" + b"".join(b"after.%d:1|c\n" % i for i in range(99))
    head = b""
    i = 0
    prefix_len = len(b"cut:1|c|#env:pr")
    while len(head) < cut_at - prefix_len - 40:
        head += b"pad.%d:1|c\n" % i
        i += 1
    head += b"x" * (cut_at - prefix_len - len(head) - 1) + b"\n"  # one malformed filler line
    datagram = head + tail
    assert datagram[cut_at - 2 : cut_at] == b"pr"
    before = run.refusals(r".*trunc.*|datagram_too_large|too_large")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(datagram, str(run.sockdir / "statsd.sock"))
    flushed(run, "trunc.marker")
    page = run.pull_page()
    problems: Problems = []
    if re.search(rb'^cut_total\{env="pr"\}', page, re.M):
        problems.append('the cut line was accepted (cut_total{env="pr"})')
    problems += counted(run, r".*trunc.*|datagram_too_large|too_large", before, what="the truncated datagram")
    return problems


def configure_line_limit(run: Run, config: dict[str, Any]) -> None:
    config["receivers"]["statsd"]["tcp_max_line_length"] = "4KiB"


def drive_tcp_line_too_long(run: Run) -> Problems:
    """A line over tcp_max_line_length (4 KiB here) whose newline arrives in the same read."""
    before = run.refusals("line_too_long")
    line = b"long.line:1|c|#t:" + b"y" * 6000 + b"\n"
    tcp_send(run, line)
    problems = counted(run, "line_too_long", before, what="a 6 KB line")
    flushed(run, "long.marker")
    if run.pull_value("long_line_total") is not None or b"long_line_total" in run.pull_page():
        problems.append("a line over tcp_max_line_length was accepted")
    return problems


RESET = r".*reset.*|.*partial.*|incomplete.*|.*truncated.*"


def drive_tcp_partial_line_reset(run: Run) -> Problems:
    """A whole line, then half a line, then a reset (SO_LINGER 0): the half line must not count."""
    before = run.refusals(RESET)
    s = socket.create_connection(("127.0.0.1", run.ports["statsd"]), timeout=10)
    s.sendall(b"rst.whole:1|c\nrst.partial:1|c|#k:v")
    # Wait until the agent read the whole line before resetting (it is flushed once read).
    wait_until("the whole line", lambda: run.pull_value("rst_whole_total") is not None, timeout_s=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    problems = counted(run, RESET, before, what="the partial line of a reset connection")
    flushed(run, "rst.marker")
    if b"rst_partial_total" in run.pull_page():
        problems.append("the partial line of a reset connection was accepted")
    return problems


CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def drive_control_chars(run: Run) -> Problems:
    """NUL and ESC in StatsD tags, JSON labels and OTLP attributes; the pull page must stay valid."""
    udp_send(run, [b"ctl.statsd:1|c|#v:a\x00b\x1bc", b"ctl.statsd2:1|c|#v\x00k:x"])
    post_json(run, json.dumps({"name": "ctl.json", "value": 1, "tags": {"v": "a\u0000b\u001bc"}}).encode())
    post_otlp(run, otlp_request([gauge("ctl.otlp", [({"v": "a\x00b\x1bc"}, 1.0)])]))
    flushed(run, "ctl.marker")
    page = run.pull_page()
    problems: Problems = []
    raw = CONTROL.findall(page)
    if raw:
        problems.append(f"the pull page carries {len(raw)} raw control bytes")
    promtool = shutil.which("promtool")
    if promtool is None:
        return [*problems, "promtool is not installed (Debian prometheus package)"]
    check = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, timeout=60)
    if check.returncode not in (0, 3):  # 3: lint remarks only (help text, naming), the page parsed
        problems.append(
            f"promtool check metrics: {(check.stdout + check.stderr).decode(errors='replace')[:300]}"
        )
    return problems


# -- counters -------------------------------------------------------------------------------------------


def drive_too_many_items(run: Run) -> Problems:
    """3 requests of 10,000 items each (max_items 1,000): too_many_items counts 3, not 30,000."""
    before = run.refusals("too_many_items")
    body = json.dumps([{"name": "many.items", "value": 1}] * 10_000).encode()
    statuses = [post_json(run, body)[0] for _ in range(3)]
    run.facts["statuses"] = statuses
    got = run.refusals("too_many_items") - before
    run.facts["too_many_items_counted"] = got
    problems = [] if got == 3 else [f"3 refused requests counted as {got:g} too_many_items"]
    if statuses != [413] * 3:
        problems.append(f"answered {statuses}, not 413")
    return problems


def drive_grpc_cancelled(run: Run) -> Problems:
    """Many concurrent calls with short deadlines: calls the server gives up on must be counted."""
    count = sizes(run.scale, 1_000, 2_000)
    request = otlp_request([gauge("grpc.cancel", [({"i": str(i)}, 1.0) for i in range(2_000)])])
    before = run.refusals(CANCELLED)
    outcomes = asyncio.run(_grpc_calls(run, count, request, timeout_s=0.5))
    run.facts["outcomes"] = dict(outcomes)
    failed = outcomes.get("CANCELLED", 0) + outcomes.get("DEADLINE_EXCEEDED", 0)
    if not failed:
        return [f"no call was cancelled ({dict(outcomes)}): the case did not provoke any"]
    return counted(run, CANCELLED, before, what=f"{failed} cancelled or timed-out calls")


def drive_deep_kvlist(run: Run) -> Problems:
    """An attribute nested 50 kvlists deep: refused, and the message says it is too deep (not merely
    "not valid KeyValues")."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    request = otlp_request([gauge("deep.kvlist", [({"deep": AnyValue(string_value="top")}, 1.0)])])
    # Built in place: copying a nested message into a constructor re-checks protobuf's own depth.
    value = request.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0].attributes[0].value
    for _ in range(50):
        value = value.kvlist_value.values.add(key="k").value
    value.string_value = "bottom"
    before = run.refusals(".*")
    status, body = post_otlp(run, request)
    message = body.decode(errors="replace")
    if status == 200:
        message = ExportMetricsServiceResponse.FromString(body).partial_success.error_message
    run.facts.update(status=status, message=message[:160])
    problems = counted(run, ".*", before, what="a 50-deep kvlist")
    if not re.search(r"depth|deep|nested", message, re.I):
        problems.append(f"the refusal does not say depth: {message[:160]!r}")
    return problems


# -- already passing (regression) -------------------------------------------------------------------------


def drive_random_bytes(run: Run) -> Problems:
    rng = random.Random(10)
    before = run.refusals(".*")
    blobs = [rng.randbytes(rng.choice((100, 1400, 65_000))) for _ in range(30)]
    udp_send(run, [b[:1400] for b in blobs])
    for port in ("statsd", "http", "otlp_http", "grpc", "pull", "telemetry"):
        for blob in blobs[:10]:
            try:
                with socket.create_connection(("127.0.0.1", run.ports[port]), timeout=5) as s:
                    s.sendall(blob)
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(5)
                    while s.recv(65536):
                        pass
            except OSError:
                pass  # the agent closing on garbage is fine
    return counted(run, ".*", before, what="random bytes on the StatsD port")


def drive_gzip_bomb(run: Run) -> Problems:
    bomb = gzip.compress(b"\0" * (100 * 2**20), 9)
    before = run.refusals("body_too_large")
    problems: Problems = []
    for port in ("http", "otlp_http"):
        ctype = "application/json" if port == "http" else "application/x-protobuf"
        status, _ = post(run, port, "/v1/metrics", bomb, {"Content-Type": ctype, "Content-Encoding": "gzip"})
        if status != 413:
            problems.append(f"a gzip bomb on {port} was answered {status}, not 413")
    return problems + counted(run, "body_too_large", before, 2, "gzip bombs")


def drive_deep_json(run: Run) -> Problems:
    before = run.refusals("invalid_json")
    status, _ = post_json(run, b"[" * 100_000)
    problems = [] if status == 400 else [f"100k '[' answered {status}, not 400"]
    return problems + counted(run, "invalid_json", before, what="deep JSON")


def configure_slow_body(run: Run, config: dict[str, Any]) -> None:
    config["receivers"]["http"]["read_timeout"] = "2s"


def drive_slow_body(run: Run) -> Problems:
    before = run.refusals("read_timeout")
    with socket.create_connection(("127.0.0.1", run.ports["http"]), timeout=30) as s:
        s.sendall(
            b"POST /v1/metrics HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n[{"
        )
        answer = s.recv(4096)  # the agent answers when read_timeout expires
    problems = [] if answer.startswith(b"HTTP/1.1 408") else [f"a stalled body was answered {answer[:40]!r}"]
    return problems + counted(run, "read_timeout", before, what="a stalled body")


def drive_header_flood(run: Run) -> Problems:
    headers = "".join(f"X-Flood-{i}: {'h' * 8000}\r\n" for i in range(200))
    with socket.create_connection(("127.0.0.1", run.ports["http"]), timeout=30) as s:
        with contextlib.suppress(OSError):  # closed by the agent once the limit is hit
            s.sendall(f"POST /v1/metrics HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode())
        try:
            answer = s.recv(4096)
        except OSError:
            answer = b""
    if answer and not re.match(rb"HTTP/1\.[01] 4\d\d", answer):
        return [f"a header flood was answered {answer[:40]!r}"]
    return []


def configure_failing_backends(run: Run, config: dict[str, Any]) -> None:
    for mode in ("hang", "fail", "reset"):
        add_remote_write(run, config, f"prometheus_remote_write/{mode}", Backend(mode))


def drive_failing_backends(run: Run) -> Problems:
    problems: Problems = []
    for mode in ("hang", "fail", "reset"):
        exporter = f"prometheus_remote_write/{mode}"

        def failed(exporter: str = exporter) -> bool:
            udp_send(run, statsd_series_payloads("backend.load", 200))
            return self_metric(run, "headwater_exporter_failed_points_total", exporter=exporter) > 0

        try:
            wait_until(f"{exporter} failures counted", failed, timeout_s=60, every_s=1)
        except CaseError as exc:
            problems.append(str(exc))
    return problems


# -- the list ------------------------------------------------------------------------------------------


CASES: tuple[Case, ...] = (
    Case(
        "reload_huge_int", "config", "SIGHUP with a 5,000-digit integer in the config", drive_reload_huge_int
    ),
    Case(
        "reload_alias_bomb",
        "config",
        "SIGHUP with a 964-byte YAML alias bomb (9 levels)",
        drive_reload_alias_bomb,
    ),
    Case(
        "reload_hung_backend",
        "config",
        "SIGHUP with a changed remote-write exporter whose backend never answers",
        drive_reload_hung_backend,
        configure_hung_backend,
    ),
    Case(
        "sigterm_full_queue",
        "config",
        "SIGTERM with the backend gone and the memory queue full",
        drive_sigterm_full_queue,
        configure_sigterm,
        legit="none",
        expect_alive=False,
    ),
    Case(
        "otlp_big_labels",
        "memory",
        "60 OTLP requests with 10 MiB attribute values",
        drive_otlp_big_labels,
        heavy=True,
    ),
    Case(
        "json_concurrent_bodies",
        "memory",
        "60 (CI 30) concurrent 19.9 MB JSON bodies, memory_limiter on",
        drive_json_concurrent_bodies,
        heavy=True,
    ),
    Case(
        "statsd_series_flood",
        "memory",
        "1 M distinct StatsD series in 60 s (CI 200 k in 10 s)",
        drive_statsd_series_flood,
        heavy=True,
        # StatsD's per-interval series cap is shared by every app on the port: the legitimate app
        # of this case speaks OTLP.
        legit="otlp",
    ),
    Case(
        "half_sent_headers",
        "health",
        "10 k (CI 6 k) half-sent request headers, agent nofile 4,096",
        drive_half_sent_headers,
        configure_half_headers,
        heavy=True,
    ),
    Case(
        "json_int_arrays",
        "health",
        "4 clients posting 20 MB integer arrays",
        drive_json_int_arrays,
        heavy=True,
    ),
    Case(
        "otlp_million_points", "health", "one 1 M-point OTLP request", drive_otlp_million_points, heavy=True
    ),
    Case(
        "scrape_many_series",
        "health",
        "scrapes of 617 k (CI 100 k) series",
        drive_scrape_many_series,
        heavy=True,
    ),
    Case(
        "statsd_packed_datagrams",
        "health",
        "100 StatsD datagrams/s of 30,000 values each",
        drive_statsd_packed_datagrams,
        heavy=True,
    ),
    Case(
        "concurrent_small_posts",
        "health",
        "2,000 concurrent small POSTs",
        drive_concurrent_small_posts,
        heavy=True,
    ),
    Case(
        "concurrent_grpc_calls",
        "health",
        "2,000 concurrent gRPC Export calls",
        drive_concurrent_grpc_calls,
        heavy=True,
    ),
    Case("unixgram_truncated", "silent", "a Unix datagram over max_datagram_size", drive_unixgram_truncated),
    Case(
        "tcp_line_too_long",
        "silent",
        "a TCP line over tcp_max_line_length in one read",
        drive_tcp_line_too_long,
        configure_line_limit,
    ),
    Case("tcp_partial_line_reset", "silent", "a partial TCP line then a reset", drive_tcp_partial_line_reset),
    Case("control_chars", "silent", "NUL and ESC in tags → promtool check metrics", drive_control_chars),
    Case("too_many_items", "counters", "too_many_items counts requests", drive_too_many_items),
    Case("grpc_cancelled", "counters", "cancelled gRPC calls are counted", drive_grpc_cancelled),
    Case("deep_kvlist", "counters", "a 50-deep kvlist is refused for depth", drive_deep_kvlist),
    Case("random_bytes", "regression", "random bytes on every port", drive_random_bytes),
    Case("gzip_bomb", "regression", "gzip bombs (100 MiB of zeros) on HTTP and OTLP", drive_gzip_bomb),
    Case("deep_json", "regression", "100k nested JSON arrays", drive_deep_json),
    Case(
        "slow_body", "regression", "a request body that stops arriving", drive_slow_body, configure_slow_body
    ),
    Case("header_flood", "regression", "200 headers of 8 KB", drive_header_flood),
    Case(
        "failing_backends",
        "regression",
        "remote-write backends that hang, fail (503) and reset",
        drive_failing_backends,
        configure_failing_backends,
    ),
)

BY_NAME = {c.name: c for c in CASES}
