"""The headwater command as a user runs it: exit codes, messages, the admin endpoint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.cli import main
from agent.registry import builtin_factories
from tests.integration.conftest import ROOT, free_tcp_udp_port, http_get, wait_for_peer

CONFIG = """\
receivers:
  statsd:
    udp: 127.0.0.1:{statsd}
exporters:
  debug:
    path: {out}
service:
  telemetry:
    endpoint: 127.0.0.1:{telemetry}
  pipelines:
    metrics:
      receivers: [statsd]
      exporters: [debug]
"""


def test_components_lists_every_type_with_fields(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["components", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert {(c["kind"], c["type"]) for c in described} == {(k.value, t) for k, t in builtin_factories()}
    listed = {c["type"]: c for c in described if c["kind"] != "receiver" or c["type"] != "otlp"}
    expected = {"statsd", "http", "prometheus", "prometheus_remote_write", "otlp", "otlp_http", "debug"}
    assert expected <= set(listed)
    assert all(c["default_config_valid"] for c in listed.values())
    fields = {f["name"]: f for f in listed["statsd"]["fields"]}
    assert fields["flush_interval"]["default"] == "10s"
    assert fields["flush_interval"]["doc"].startswith("Aggregation interval")
    rw = {f["name"]: f for f in listed["prometheus_remote_write"]["fields"]}
    assert {f["name"] for f in rw["retry_on_failure"]["fields"]} >= {"initial_interval", "max_elapsed_time"}
    assert all(f["doc"] for c in listed.values() for f in c["fields"]), "every field needs a doc line"
    assert main(["components"]) == 0
    assert "receiver statsd" in capsys.readouterr().out


def test_components_expands_the_fields_of_lists_and_maps_of_objects(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["components", "--json"]) == 0
    described = {(c["kind"], c["type"]): c for c in json.loads(capsys.readouterr().out)}

    def field(kind: str, type_: str, name: str) -> dict[str, Any]:
        return next(f for f in described[(kind, type_)]["fields"] if f["name"] == name)

    rules = field("processor", "aggregate", "rules")
    assert rules["type"] == "list of object"
    nested = {f["name"]: f for f in rules["fields"]}
    assert {"match", "intervals", "by", "without", "outputs", "keep_input"} <= nested.keys()
    assert nested["intervals"]["default"] == "[1m]" and nested["keep_input"]["doc"]
    assert {f["name"] for f in field("receiver", "http", "routes")["fields"]} >= {"path", "format"}
    assert field("receiver", "http", "mappings")["type"] == "map of object"
    assert {f["name"] for f in field("receiver", "http", "mappings")["fields"]} >= {"metrics", "labels"}
    assert {f["name"] for f in field("processor", "threshold", "rules")["fields"]} >= {"metric", "window"}
    assert main(["components"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("processor aggregate") :]
    # Indented under `rules` like a single nested config's fields.
    assert "    rules (list of object) = []\n" in block
    assert "        match (list of str) = []\n" in block
    assert "        keep_input (bool) = false\n" in block


def test_validate_reports_config_errors_with_exit_code(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("receivers:\n  statsd:\n    udp: nowhere\nexporters: {}\nservice: {pipelines: {}}\n")
    assert main(["validate", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (3 problems)" in err
    assert "receivers::statsd::udp (line 3)" in err
    assert "service::pipelines (line 5): at least one pipeline is required" in err
    assert "receivers::statsd (line 2): defined but not used in any pipeline" in err


def test_validate_checks_ports(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(CONFIG.format(statsd=port, out=tmp_path / "o", telemetry=free_tcp_udp_port()))
        assert main(["validate", "-c", str(cfg)]) == 2
        assert f"receivers::statsd::udp: cannot bind udp 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["validate", "-c", str(cfg)]) == 0


def test_run_admin_endpoints_and_sigterm(tmp_path: Path) -> None:
    ports = {"statsd": free_tcp_udp_port(), "telemetry": free_tcp_udp_port()}
    out = tmp_path / "points.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(out=out, **ports))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(cfg), "--set", "receivers.statsd.flush_interval=100ms"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{ports['telemetry']}"
        wait_for_peer(lambda: http_get(base + "/readyz")[0] == 200, "ready")
        assert http_get(base + "/healthz") == (200, "ok\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"cli.hits:4|c|#k:v", ("127.0.0.1", ports["statsd"]))
        wait_for_peer(lambda: out.exists() and "cli.hits" in out.read_text(), "debug output")
        line = json.loads(out.read_text().splitlines()[0])
        assert line["name"] == "cli.hits" and line["value"] == 4 and line["labels"] == {"k": "v"}
        status = json.loads(http_get(base + "/status")[1])
        assert status["ready"] is True
        statsd_status = next(c for c in status["components"] if c["id"] == "statsd")
        assert statsd_status["accepted"] == 1
        with urllib.request.urlopen(base + "/metrics") as resp:
            body = resp.read().decode()
        assert 'headwater_receiver_accepted_points_total{receiver="statsd"} 1.0' in body
        assert 'headwater_exporter_sent_points_total{exporter="debug"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stderr is not None
        proc.stderr.close()


def test_run_fails_cleanly_when_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            CONFIG.format(statsd=free_tcp_udp_port(), out=tmp_path / "o", telemetry=busy.getsockname()[1])
        )
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=ROOT, capture_output=True, timeout=60
        )
    assert proc.returncode == 1
    assert b"cannot start" in proc.stderr and b"address already in use" in proc.stderr.lower()
    assert time.monotonic() - started < 60


def test_a_reader_leaving_early_is_not_an_error() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m agent components | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_the_example_agent_loads_only_the_processor_it_uses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from agent.config import load_config\n"
        "from agent.registry import builtin_factories\n"
        "load_config('config.example.yaml', builtin_factories())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('grpc', 'receivers.otlp', 'processors'))))\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # No grpc, no OTLP receiver, and of the processors only its memory_limiter.
    assert out.stdout.strip() == "['processors', 'processors.memory_limiter']"


def test_every_registry_row_names_its_factory() -> None:
    factories = builtin_factories()
    assert all((f.kind, f.type) == key for key, f in factories.items())


def test_sighup_refuses_a_bad_config_and_applies_a_good_one(tmp_path: Path) -> None:
    telemetry = free_tcp_udp_port()
    first, second = free_tcp_udp_port(), free_tcp_udp_port()
    out = tmp_path / "points.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(statsd=first, out=out, telemetry=telemetry))
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "-c", str(cfg), "--set", "receivers.statsd.flush_interval=100ms"],
            cwd=ROOT,
            stderr=err,
        )
    base = f"http://127.0.0.1:{telemetry}"
    try:
        wait_for_peer(lambda: http_get(base + "/readyz")[0] == 200, "ready")
        cfg.write_text(CONFIG.format(statsd=second, out=out, telemetry=telemetry).replace("udp:", "udpp:"))
        proc.send_signal(signal.SIGHUP)
        wait_for_peer(lambda: "reload refused" in log.read_text(), "the bad config refused")
        assert "receivers::statsd::udpp" in log.read_text()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"before.reload:1|c", ("127.0.0.1", first))  # the old config still runs
        wait_for_peer(
            lambda: out.exists() and "before.reload" in out.read_text(), "the old pipeline still flows"
        )

        cfg.write_text(CONFIG.format(statsd=second, out=out, telemetry=telemetry))
        proc.send_signal(signal.SIGHUP)
        wait_for_peer(lambda: "reloaded" in log.read_text(), "reloaded")
        wait_for_peer(lambda: http_get(base + "/readyz")[0] == 200, "ready again")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"after.reload:1|c", ("127.0.0.1", second))  # the new statsd port
        wait_for_peer(lambda: "after.reload" in out.read_text(), "the new pipeline flows")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_raises_the_open_file_limit_and_reports_accept_errors(tmp_path: Path) -> None:
    import resource

    telemetry, statsd = free_tcp_udp_port(), free_tcp_udp_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(statsd=statsd, out=tmp_path / "points.jsonl", telemetry=telemetry))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(1024, hard)

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(cfg)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_soft_limit,
    )
    base = f"http://127.0.0.1:{telemetry}"
    try:
        wait_for_peer(lambda: http_get(base + "/readyz")[0] == 200, "ready")
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3] == str(hard)  # the soft limit, raised to the hard one
        status, page = http_get(base + "/metrics")
        assert status == 200 and "headwater_accept_errors_total 0.0" in page
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
