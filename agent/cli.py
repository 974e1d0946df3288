"""The ``headwater`` command: run (the default), validate, components, queue, selftest, top."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent import gcpolicy
from agent.component import ComponentKind, Factory, validate_config
from agent.config import AgentConfig, ConfigError, load_config
from agent.confmodel import describe_fields
from agent.registry import builtin_factories
from agent.version import VERSION

if TYPE_CHECKING:
    from agent.admin import AdminServer
    from agent.service import Agent

log = logging.getLogger("headwater")

EXIT_CONFIG = 2
"""Exit code for an invalid config or environment (like the OpenTelemetry Collector, non-zero)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater", description="Headwater telemetry agent")
    p.add_argument("--version", action="version", version=f"headwater {VERSION}")
    sub = p.add_subparsers(dest="verb")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", required=True, help="path to the YAML config")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override a config value, e.g. --set exporters.debug.verbosity=detailed (repeatable)",
        )

    with_config(sub.add_parser("run", help="run the agent (the default verb)"))
    with_config(sub.add_parser("validate", help="check the config and the environment (ports, directories)"))
    test = sub.add_parser(
        "test", help="run pipeline tests (tests.yaml) against the config on simulated time; exit 1 on failure"
    )
    with_config(test)
    test.add_argument("tests", nargs="+", help="test files (format: agent/pipeline_test/model.py, version 1)")
    test.add_argument("--junit", default="", metavar="FILE", help="also write the results as JUnit XML")
    test.add_argument(
        "--update", action="store_true", help="golden mode: write the observed outputs as the expectations"
    )
    comp = sub.add_parser("components", help="list every built-in component type with its settings")
    comp.add_argument("--json", action="store_true", help="print JSON instead of text")
    queue = sub.add_parser(
        "queue",
        help="disk-queue tooling: inspect, verify (exit 1 on damage), repair, replay (send the backlog on)",
    )
    queue.add_argument("action", choices=["inspect", "verify", "repair", "replay"])
    queue.add_argument("directory", help="the queue directory (sending_queue.directory) or one partition")
    queue.add_argument("--json", action="store_true", help="print JSON instead of text")
    rp = queue.add_argument_group(
        "replay",
        "replay DIR --to URL: send every unacked record to URL, in order (exit 0 all sent, 1 some rejected,"
        " 2 nothing sent: usage or queue problem, 3 stopped: the endpoint kept failing)",
    )
    rp.add_argument(
        "--to",
        metavar="URL",
        help="remote-write: the full write URL; OTLP: the base http(s):// URL (/v1/<signal> is added)"
        " or a gRPC host:port (grpc://host:port for plaintext)",
    )
    rp.add_argument("--partition", metavar="NAME", help="replay only this partition (a subdirectory of DIR)")
    once = rp.add_mutually_exclusive_group()
    once.add_argument(
        "--ack",
        action="store_true",
        help="ack what was replayed (takes the lock: not beside a running agent)",
    )
    once.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    rp.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="K=V",
        help="add a request header (gRPC: metadata), e.g. X-Scope-OrgID=acme (repeatable)",
    )
    rp.add_argument(
        "--rate", type=float, metavar="REQUESTS_PER_S", help="send at most this many requests a second"
    )
    rp.add_argument(
        "--retries", type=int, default=3, help="retries of a failing record before stopping (default 3)"
    )
    rp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (default 30)")
    st = sub.add_parser(
        "selftest",
        help="send StatsD and OTLP to a running agent and read them back from its pull endpoint"
        " (what `helm test` runs); exit 0 passed, 1 failed",
    )
    st.add_argument("--target", required=True, metavar="HOST", help="the agent's host name or IP")
    st.add_argument("--statsd-port", type=int, default=8125, help="StatsD UDP port (0 skips; default 8125)")
    st.add_argument("--otlp-http-port", type=int, default=4318, help="OTLP/HTTP port (0 skips; default 4318)")
    st.add_argument(
        "--telemetry-port", type=int, default=8888, help="the agent's /readyz port (0 skips; default 8888)"
    )
    st.add_argument(
        "--prometheus-port", type=int, default=9102, help="the prometheus exporter's port (default 9102)"
    )
    st.add_argument("--timeout", default="60s", metavar="DURATION", help="overall time limit (default 60s)")
    top = sub.add_parser(
        "top",
        help="a terminal view of a running agent, refreshed every second: rates per component, queues,"
        " loop lag, memory, CPU, alerts, top metrics (keys: s sort, / filter, q quit)",
    )
    top.add_argument(
        "--endpoint",
        default="127.0.0.1:8888",
        metavar="HOST:PORT",
        help="the agent's telemetry endpoint (service.telemetry.endpoint; default 127.0.0.1:8888)",
    )
    top.add_argument("--token", metavar="T", help="its bearer token (service.telemetry.auth), if it has one")
    cap = sub.add_parser(
        "capture",
        help="record what a running agent's receivers take in (StatsD, OTLP, JSON) to a file, for replay",
    )
    cap.add_argument(
        "--endpoint",
        default="127.0.0.1:8888",
        metavar="HOST:PORT",
        help="the agent's telemetry endpoint (service.telemetry.endpoint; default 127.0.0.1:8888)",
    )
    cap.add_argument(
        "--receiver",
        action="append",
        default=[],
        metavar="ID",
        help="receiver to record (repeatable; default all)",
    )
    cap.add_argument(
        "--duration",
        metavar="DURATION",
        help="stop after this long (default service.telemetry.capture.max_duration)",
    )
    cap.add_argument(
        "--max-bytes",
        metavar="SIZE",
        help="stop at this file size (default service.telemetry.capture.max_bytes)",
    )
    cap.add_argument("--token", metavar="T", help="its bearer token (service.telemetry.auth), if it has one")
    cap.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the capture")
    rep_ = sub.add_parser(
        "replay",
        help="send a capture file's records again (at the recorded pace, --speed N times faster, 0 as fast as"
        " possible): a debugging tool and a load generator",
    )
    rep_.add_argument("file", metavar="FILE", help="a file written by headwater capture")
    rep_.add_argument(
        "--to", default="127.0.0.1", metavar="HOST", help="the host to send to (default 127.0.0.1)"
    )
    rep_.add_argument("--speed", type=float, default=1.0, metavar="N", help="pace multiplier (0: no pauses)")
    rep_.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    rep_.add_argument(
        "--receiver",
        action="append",
        default=[],
        metavar="ID[/TRANSPORT]=HOST:PORT",
        help="where a receiver's records go (repeatable; default: --to at the port it was recorded on)",
    )
    rep_.add_argument("--json", action="store_true", help="print the summary as JSON")
    tap = sub.add_parser(
        "tap",
        help="print what flows through a running agent, live: points, spans and log records leaving (or"
        " entering) its components, filtered",
    )
    tap.add_argument(
        "--endpoint",
        default="127.0.0.1:8888",
        metavar="HOST:PORT",
        help="the agent's telemetry endpoint (service.telemetry.endpoint; default 127.0.0.1:8888)",
    )
    tap.add_argument("--component", default="", metavar="GLOB", help="components to watch (default all)")
    tap.add_argument(
        "--metric", default="", metavar="GLOB", help="metric, span or log event names (default all)"
    )
    tap.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="MATCHER",
        help="label matcher k=v, k!=v, k=~regex, k!~regex (repeatable; all must hold)",
    )
    tap.add_argument("--signal", default="", metavar="LIST", help="metrics,traces,logs (default all)")
    tap.add_argument(
        "--direction", default="out", choices=["out", "in", "both"], help="out (default), in or both"
    )
    tap.add_argument("--format", default="text", choices=["text", "json"], help="text (default) or json")
    tap.add_argument("--token", metavar="T", help="its bearer token (service.telemetry.auth), if it has one")
    return p


def _selftest(args: argparse.Namespace) -> int:
    from agent.confmodel import parse_duration
    from agent.selftest import SelftestOptions, selftest_command

    try:
        timeout_s = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"headwater selftest: --timeout {args.timeout!r}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    ports = (args.statsd_port, args.otlp_http_port, args.telemetry_port, args.prometheus_port)
    if any(not 0 <= p <= 65535 for p in ports) or not args.prometheus_port or timeout_s <= 0:
        print(
            "headwater selftest: ports must be 0-65535 (--prometheus-port not 0), --timeout > 0",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    opts = SelftestOptions(
        target=args.target,
        statsd_port=args.statsd_port,
        otlp_http_port=args.otlp_http_port,
        telemetry_port=args.telemetry_port,
        prometheus_port=args.prometheus_port,
        timeout_s=timeout_s,
    )
    return selftest_command(opts, sys.stdout)


_REPLAY_ONLY = ("to", "partition", "ack", "dry_run", "header", "rate")


def _queue(args: argparse.Namespace) -> int:
    if args.action != "replay":
        given = [n for n in _REPLAY_ONLY if getattr(args, n) not in (None, False, [])]
        if given:
            print(f"headwater queue {args.action}: --{given[0].replace('_', '-')} is only for replay")
            return EXIT_CONFIG
        from agent.diskqueue.tools import queue_command

        return queue_command(args.action, args.directory, args.json)
    from agent.diskqueue.replay import ReplayOptions, replay_command

    if not args.to:
        print("headwater queue replay: --to URL is required")
        return EXIT_CONFIG
    headers: list[tuple[str, str]] = []
    for item in args.header:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            print(f"headwater queue replay: --header {item!r}: expected K=V")
            return EXIT_CONFIG
        headers.append((key.strip(), value))
    opts = ReplayOptions(
        to=args.to,
        partition=args.partition,
        ack=args.ack,
        dry_run=args.dry_run,
        headers=tuple(headers),
        rate=args.rate,
        retries=args.retries,
        timeout_s=args.timeout,
    )
    return replay_command(args.directory, opts, args.json)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM before the agent was running: nothing to drain
        return 0
    except BrokenPipeError:
        # `headwater components | head`: the reader left; stop quietly, as other Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _stop_before_start(signum: int, frame: object) -> None:
    # As PID 1 in a container a signal without a handler is ignored: until the event loop installs
    # its own handlers, SIGTERM must still end a starting agent (nothing is running to drain yet).
    raise KeyboardInterrupt


def _main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop_before_start)
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbs = {"run", "validate", "components", "queue", "selftest", "top", "tap", "test", "capture", "replay"}
    if not any(a in verbs for a in args_list) and not {"-h", "--help", "--version"} & set(args_list):
        args_list = ["run", *args_list]
    args = _parser().parse_args(args_list)
    if args.verb == "queue":
        return _queue(args)
    if args.verb == "selftest":
        return _selftest(args)
    if args.verb == "top":
        from agent.top import top_command

        return top_command(args.endpoint, args.token)
    if args.verb == "capture":
        from agent.capture.client import capture_command
        from agent.confmodel import parse_duration, parse_size

        try:
            duration_s = None if args.duration is None else parse_duration(args.duration)
            max_bytes = None if args.max_bytes is None else parse_size(args.max_bytes)
        except ValueError as exc:
            print(f"headwater capture: {exc}", file=sys.stderr)
            return 2
        return capture_command(args.endpoint, args.output, args.receiver, duration_s, max_bytes, args.token)
    if args.verb == "replay":
        from agent.capture.replay import replay_command

        return replay_command(args.file, args.to, args.speed, args.loop, args.receiver, args.json)
    if args.verb == "tap":
        from agent.tap.client import tap_command

        return tap_command(
            args.endpoint,
            component=args.component,
            metric=args.metric,
            match=args.match,
            signal=args.signal,
            direction=args.direction,
            fmt=args.format,
            token=args.token,
        )
    factories = builtin_factories()
    if args.verb == "components":
        return _components(factories, args.json)
    try:
        config = load_config(args.config, factories, args.set)
    except ConfigError as exc:
        print(f"headwater: invalid configuration ({_count(len(exc.problems))}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.verb == "test":
        from agent import pipeline_test

        return pipeline_test.main(config, args.tests, sys.stdout, junit_path=args.junit, update=args.update)
    if args.verb == "validate":
        problems = environment_problems(config)
        if problems:
            print(f"headwater: the environment is not ready ({_count(len(problems))}):", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{args.config}: configuration is valid; ports and directories are available")
        return 0
    return run(config, args.config, args.set)


def environment_problems(config: AgentConfig) -> list[str]:
    """Ask each component's Config what it needs of the machine (ports free, directories writable)."""
    problems: list[str] = []
    for section, specs in (("receivers", config.receivers), ("exporters", config.exporters)):
        for cid, spec in specs.items():
            check = getattr(spec.config, "environment_problems", None)
            if check is not None:
                problems += [f"{section}::{cid}::{path}: {msg}" for path, msg in check()]
    endpoint = config.service.telemetry.endpoint
    if endpoint:
        from agent.netcheck import bind_problem

        problem = bind_problem("tcp", endpoint)
        if problem:
            problems.append(f"service::telemetry::endpoint: {problem}")
    return problems


STOP_MARGIN_S = 3.0
"""SIGTERM/SIGINT: the process exits at most this long after ``service.shutdown_timeout``, whatever a
component or a backend does (the exporters' drain deadline is shutdown_timeout; this covers the
receivers' last flush, the final sync of a disk queue and tearing down sends)."""

ABANDON_WAIT_S = 1.0
"""At exit: how long tasks still running (abandoned at the deadline) get to end once cancelled."""


def run(config: AgentConfig, path: str | None = None, sets: Sequence[str] = ()) -> int:
    logging.basicConfig(
        level=config.service.telemetry.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Not asyncio.run: at exit it cancels every task left and waits for all of them without a limit, so
    # one component that does not stop would hold the process past the shutdown deadline.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_run(config, path, sets))
    except KeyboardInterrupt:
        return 0
    finally:
        _close_loop(loop)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks left, wait for them at most ABANDON_WAIT_S, and close the loop."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        _, pending = loop.run_until_complete(asyncio.wait(left, timeout=ABANDON_WAIT_S))
        for task in pending:
            log.error("abandoning task %s at exit: it did not end when cancelled", task.get_name())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


async def _run(config: AgentConfig, path: str | None = None, sets: Sequence[str] = ()) -> int:
    """Run until SIGTERM/SIGINT, then stop within ``service.shutdown_timeout`` + STOP_MARGIN_S.

    SIGHUP re-reads ``path``. A file that cannot be loaded — any exception, not only an invalid config —
    is refused and logged, and the running config stays. A valid, changed one is applied to the running
    agent (:meth:`agent.service.Agent.reload`): unchanged components keep running with their sockets and
    queues, changed exporters hand their queues to their successors, removed ones retire in the
    background; if it cannot start, the running config stays. The telemetry endpoint is kept for the
    life of the process (a changed address is logged: it takes effect at restart)."""
    from agent import netguard
    from agent.admin import AdminServer
    from agent.diskqueue import QueueError
    from agent.service import Agent

    loop = asyncio.get_running_loop()
    # Before any socket: the soft open-file limit raised to the hard one, and accept errors (out of
    # descriptors) logged once per interval instead of a traceback per attempt.
    accept_errors = netguard.install_loop_guards(loop, log)
    stop = asyncio.Event()
    reload = asyncio.Event()

    def on_stop(signame: str) -> None:
        log.info("received %s: stopping", signame)
        stop.set()

    def on_hup() -> None:
        if path is None:
            log.warning("received SIGHUP, but the config did not come from a file: nothing to reload")
            return
        log.info("received SIGHUP: reloading %s", path)
        reload.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    agent = Agent(config)
    agent.telemetry.counter_reader(
        "accept_errors_total",
        "Connections the kernel could not hand over (out of file descriptors or memory).",
        lambda: accept_errors.count,
    )
    endpoint = config.service.telemetry.endpoint
    admin = AdminServer(agent, endpoint, config.service.telemetry.health_stall_timeout) if endpoint else None
    try:
        if admin is not None:
            await admin.start()
        await agent.start()
    except (OSError, QueueError) as exc:  # a port taken, a queue directory locked or unreadable
        log.error("cannot start: %s", exc)
        if admin is not None:
            await admin.shutdown()
        return 1
    gcpolicy.freeze_startup_state()
    # The collector's policy for this process (agent/gcpolicy.py): young survivors frozen every 10 s,
    # everything thawed and collected at most hourly, when memory grew (else daily).
    keeper = gcpolicy.GcKeeper()
    keeper.start()

    stopping = asyncio.ensure_future(stop.wait())
    applying: asyncio.Task[None] | None = None
    while not stop.is_set():
        reloading = asyncio.ensure_future(reload.wait())
        await asyncio.wait({stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
        reloading.cancel()
        if stop.is_set():
            break
        reload.clear()
        assert path is not None
        # A task raced against SIGTERM: a stop during a reload does not wait for the reload to finish
        # before its deadline starts (Agent.stop takes over once the reload is done).
        applying = asyncio.ensure_future(_reload(agent, path, sets))
        await asyncio.wait({stopping, applying}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    keeper.stop()
    return await _stop(agent, admin, applying)


async def _reload(agent: Agent, path: str, sets: Sequence[str]) -> None:
    """One SIGHUP: load ``path`` and apply it to ``agent``; every failure is logged, none raised."""
    try:
        new = await asyncio.to_thread(load_config, path, builtin_factories(), sets)
    except ConfigError as exc:
        log.error("reload refused, the running config stays (%s):", _count(len(exc.problems)))
        for problem in exc.problems:
            log.error("  %s", problem)
        return
    except Exception as exc:  # whatever the loader raises, a bad file must never stop the agent
        kind = type(exc).__name__
        log.error("reload refused, the running config stays: cannot load %s: %s: %s", path, kind, exc)
        return
    running = agent.config
    if new.source == running.source:
        log.info("the config has not changed: nothing to reload")
        return
    if new.service.telemetry.endpoint != running.service.telemetry.endpoint:
        log.warning("service::telemetry::endpoint changed: it takes effect when the agent restarts")
    if new.service.telemetry.auth != running.service.telemetry.auth:
        log.warning("service::telemetry::auth changed: it takes effect when the agent restarts")
    try:
        applied = await agent.reload(new)
    except Exception as exc:
        log.error("reload failed, the running config stays: %r", exc, exc_info=exc)
        return
    if not applied:
        log.error("reload refused: the new config cannot start; the running config stays")
        return
    logging.getLogger().setLevel(new.service.telemetry.log_level.upper())
    gcpolicy.freeze_startup_state()
    log.info("reloaded %s", path)


async def _stop(agent: Agent, admin: AdminServer | None, applying: asyncio.Task[None] | None) -> int:
    """Stop the agent, giving up after shutdown_timeout + STOP_MARGIN_S (naming what was still stopping)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + agent.config.service.shutdown_timeout + STOP_MARGIN_S
    stopping = asyncio.ensure_future(agent.stop())
    done, _ = await asyncio.wait({stopping}, timeout=max(0.0, deadline - loop.time()))
    if not done:
        still = ", ".join(agent.stopping_components()) or "a reload in progress"
        log.error(
            "shutdown deadline (shutdown_timeout %.1fs + %.1fs) passed: exiting while %s still stopping",
            agent.config.service.shutdown_timeout,
            STOP_MARGIN_S,
            still,
        )
    elif stopping.exception() is not None:
        log.error("error while stopping: %r", stopping.exception())
    if applying is not None and not applying.done():
        applying.cancel()
    if admin is not None:
        try:
            async with asyncio.timeout(max(0.5, deadline - loop.time())):
                await admin.shutdown()
        except TimeoutError:
            log.error("the telemetry endpoint did not stop in time")
    log.info("stopped (points dropped by exporters over the run: %s)", _drops(agent) or "none")
    return 0


def _drops(agent: Agent) -> str:
    """``exporter{reason=n,...}`` for every exporter that dropped points: the final account of loss."""
    by_exporter: dict[str, list[str]] = {}
    for family in agent.telemetry.collect():
        if family.name != "headwater_exporter_dropped_points":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                exporter, reason = sample.labels["exporter"], sample.labels["reason"]
                by_exporter.setdefault(exporter, []).append(f"{reason}={sample.value:.0f}")
    return ", ".join(f"{cid}{{{','.join(sorted(r))}}}" for cid, r in sorted(by_exporter.items()))


def _components(factories: Mapping[tuple[ComponentKind, str], Factory], as_json: bool) -> int:
    order = {kind: i for i, kind in enumerate(ComponentKind)}
    items = sorted(factories.values(), key=lambda f: (order[f.kind], f.type))
    described: list[dict[str, Any]] = []
    for f in items:
        defaults_ok = not validate_config(f.config_class()) if _has_defaults(f) else False
        # A connector joins pipelines: what it handles is (input signal → output signal) pairs.
        connector = f.kind is ComponentKind.CONNECTOR
        described.append(
            {
                "type": f.type,
                "kind": f.kind.value,
                "signals": (
                    sorted(f"{x.value}->{y.value}" for x, y in f.signal_pairs)
                    if connector
                    else sorted(s.value for s in f.signals)
                ),
                "stability": f.stability,
                "description": f.description,
                "default_config_valid": defaults_ok,
                "fields": describe_fields(f.config_class),
            }
        )
    if as_json:
        print(json.dumps(described, indent=2))
        return 0
    for d in described:
        print(f"{d['kind']} {d['type']}  [{', '.join(d['signals'])}; {d['stability']}]")
        if d["description"]:
            print(f"  {d['description']}")
        _print_fields(d["fields"], "    ")
        print()
    return 0


def _count(n: int) -> str:
    return "1 problem" if n == 1 else f"{n} problems"


def _has_defaults(f: Factory) -> bool:
    try:
        f.config_class()
    except TypeError:
        return False
    return True


def _print_fields(fields: list[dict[str, Any]], indent: str) -> None:
    for fd in fields:
        default = f" = {fd['default']}" if fd["default"] else ""
        print(f"{indent}{fd['name']} ({fd['type']}){default}")
        if fd["doc"]:
            print(f"{indent}    {fd['doc']}")
        if "fields" in fd:
            _print_fields(fd["fields"], indent + "    ")
