"""The container image definition and the Helm chart, checked offline (no Docker engine, no cluster).

Tools come from ./scripts/install-chart-tools (part of `make test`): helm and hadolint in .tools/bin,
kubernetes-validate in this Python. Every `helm/ci/*-values.yaml` (one per mode and preset) and the
example application chart (`helm/examples/app-with-sidecar`, sidecar mode) are:

- linted (`helm lint --strict`) and rendered (`helm template`);
- validated against the Kubernetes JSON schemas with `kubernetes-validate --strict`, at the oldest
  Kubernetes the chart supports and the newest the tool knows, asserting that objects were validated
  (it passes empty input);
- compared with their golden render in tests/helm/golden/ (after a deliberate chart change, rewrite
  them with `HEADWATER_UPDATE_GOLDEN=1 python -m pytest tests/helm` and review the diff);
- asserted on (hostPort only in daemonset mode, security contexts, checksum, volumes, …);
- and their agent config (the ConfigMap's config.yaml) passes `headwater validate`, with the ports
  moved to free ones and the queue directory to a temp one so the machine's checks can run here.

Gateway mode (a StatefulSet behind a headless Service, the stateful processors) and the agents'
`forward: {to: gateway}` (the loadbalancing exporter on that Service) are checked here too.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main as headwater
from tests.integration.conftest import ROOT, free_tcp_udp_port

CHART = ROOT / "helm"
TOOLS = ROOT / ".tools" / "bin"
GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("HEADWATER_UPDATE_GOLDEN") == "1"
RELEASE, NAMESPACE = "hw", "obs"
CI_VALUES = sorted(CHART.glob("ci/*-values.yaml"))
CASES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
EXAMPLE = "example-app-with-sidecar"
OLDEST_K8S, NEWEST_K8S = "1.25.0", "1.37.0"
NATIVE_SIDECAR_K8S = "1.29.0"  # initContainers[].restartPolicy appears in the schema here
CRD_GROUP = "monitoring.coreos.com/"
WORKLOADS = ("DaemonSet", "Deployment", "StatefulSet")
GATEWAY_RELEASE, GATEWAY_NAMESPACE = "gw", "obs-gw"  # what daemonset-forward-gateway-values.yaml names


def _tool(name: str) -> str:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run ./scripts/install-chart-tools (make install)")
    return str(path)


def _kubernetes_validate() -> list[str]:
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("kubernetes-validate is not installed: run ./scripts/install-chart-tools (make install)")
    return [exe]


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def helm(
    env: dict[str, str], *args: str, cwd: Path = CHART, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [_tool("helm"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def template(env: dict[str, str], *args: str) -> str:
    return helm(env, "template", RELEASE, ".", "--namespace", NAMESPACE, *args).stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def renders(helm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every CI values file rendered, plus the example application chart (its dependency built in a copy)."""
    out = {case: template(helm_env, "-f", str(path)) for case, path in zip(CASES, CI_VALUES, strict=True)}
    copy = tmp_path_factory.mktemp("chart") / "helm"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    app = copy / "examples" / "app-with-sidecar"
    helm(helm_env, "dependency", "build", ".", cwd=app)
    out[EXAMPLE] = helm(helm_env, "template", "shop", ".", "--namespace", "shop", cwd=app).stdout
    return {case: _fixed_token(text) for case, text in out.items()}


_TOKEN = re.compile(
    r'(# Source: [^\n]*templates/telemetry-secret\.yaml\n(?:.*\n)*?data:\n  token: )"[^"\n]*"'
)
FIXED_TOKEN = "Zml4ZWQgaW4gdGhlIHRlc3Rz"  # base64 of "fixed in the tests"


def _fixed_token(text: str) -> str:
    """The chart's telemetry Secret holds a random token (kept on upgrade through `lookup`, which
    `helm template` cannot do): a fixed one in the renders, so the golden files stay comparable."""
    return _TOKEN.sub(rf'\g<1>"{FIXED_TOKEN}"', text)


def objects(renders: dict[str, str], case: str) -> list[dict[str, Any]]:
    return docs(renders[case])


def by_kind(renders: dict[str, str], case: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in objects(renders, case) if d["kind"] == kind]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in objs:
        if d["kind"] in WORKLOADS:
            yield d["kind"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield "Pod", d["spec"]


def agent_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [
        c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == "headwater"
    ]
    assert len(found) == 1, spec
    return found[0]


def agent_config(objs: list[dict[str, Any]]) -> str:
    (cm,) = [d for d in objs if d["kind"] == "ConfigMap"]
    return str(cm["data"]["config.yaml"])


def mode_of(case: str) -> str:
    if case == EXAMPLE:
        return "sidecar"
    return str(yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text())["mode"])


# --- the image -----------------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint() -> None:
    done = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))
    ]
    keywords = [i[0] for i in instructions]
    assert keywords.count("FROM") == 2 and "AS build" in text  # multi-stage
    assert "COPY --from=build /opt/headwater /opt/headwater" in text  # only the installed app goes on
    assert ("USER", "10001:10001") in [(i[0], i[1].strip()) for i in instructions]
    assert keywords.index("USER") > len(keywords) - 1 - keywords[::-1].index("RUN")  # after the last RUN
    entry = next(i[1] for i in instructions if i[0] == "ENTRYPOINT")
    assert entry.startswith('["'), "exec form, so the agent is PID 1 and receives SIGTERM itself"
    assert "HEALTHCHECK" not in keywords
    assert "PYTHONDONTWRITEBYTECODE=1" in text  # read-only root filesystem
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!agent/" in ignored  # only what the image needs is sent to the builder


# --- lint, schemas, golden files -----------------------------------------------------------------


def test_helm_lint_strict_for_every_ci_values_file(helm_env: dict[str, str]) -> None:
    assert CASES, "no helm/ci/*-values.yaml"
    assert {mode_of(c) for c in CASES} == {"daemonset", "deployment", "sidecar", "gateway"}
    for path in CI_VALUES:
        done = helm(helm_env, "lint", "--strict", ".", "-f", str(path), check=False)
        assert done.returncode == 0 and "0 chart(s) failed" in done.stdout, f"{path.name}:\n{done.stdout}"


@pytest.mark.parametrize("version", [OLDEST_K8S, NEWEST_K8S])
def test_every_render_passes_kubernetes_validate_strict(
    renders: dict[str, str], tmp_path: Path, version: str
) -> None:
    cases = [c for c in renders if c != EXAMPLE or version != OLDEST_K8S]
    files = {}
    for case in cases:
        files[case] = tmp_path / f"{case}.yaml"
        files[case].write_text(renders[case])
    version_of = {case: version for case in cases}
    if version == OLDEST_K8S:  # the native-sidecar example needs 1.29
        files[EXAMPLE] = tmp_path / f"{EXAMPLE}.yaml"
        files[EXAMPLE].write_text(renders[EXAMPLE])
        version_of[EXAMPLE] = NATIVE_SIDECAR_K8S
    for v in sorted(set(version_of.values())):
        batch = [str(files[c]) for c in files if version_of[c] == v]
        done = subprocess.run(
            [*_kubernetes_validate(), "--strict", "-k", v, *batch],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for case in (c for c in files if version_of[c] == v):
            expected = [d for d in docs(renders[case]) if not d["apiVersion"].startswith(CRD_GROUP)]
            passed = re.findall(rf"{re.escape(str(files[case]))} passed for resource", done.stdout)
            assert expected, f"{case}: nothing rendered"
            assert len(passed) == len(expected), f"{case} at {v}: {done.stdout}"


def test_monitoring_resources_render_only_with_the_crd(helm_env: dict[str, str]) -> None:
    values = str(CHART / "ci" / "deployment-values.yaml")
    without = docs(template(helm_env, "-f", values, "--set", "podMonitor.enabled=true"))
    assert not [d for d in without if d["apiVersion"].startswith(CRD_GROUP)]
    crds = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"]
    crds += ["--api-versions", "monitoring.coreos.com/v1/PodMonitor"]
    with_crd = docs(template(helm_env, "-f", values, "--set", "podMonitor.enabled=true", *crds))
    (sm,) = [d for d in with_crd if d["kind"] == "ServiceMonitor"]
    (pm,) = [d for d in with_crd if d["kind"] == "PodMonitor"]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["hw-metrics", "hw-telemetry"]
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["hw-metrics", "hw-telemetry"]
    (svc,) = [d for d in with_crd if d["kind"] == "Service"]
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_renders_match_the_golden_files(renders: dict[str, str]) -> None:
    GOLDEN.mkdir(exist_ok=True)
    stale = []
    for case, text in renders.items():
        path = GOLDEN / f"{case}.yaml"
        if UPDATE_GOLDEN:
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(case)
    if stale:
        import difflib

        diffs = []
        for case in stale:
            path = GOLDEN / f"{case}.yaml"
            old = path.read_text().splitlines() if path.exists() else []
            diffs += difflib.unified_diff(old, renders[case].splitlines(), str(path), "render", lineterm="")
        pytest.fail(
            "renders differ from tests/helm/golden (HEADWATER_UPDATE_GOLDEN=1 rewrites them):\n"
            + "\n".join(diffs[:200])
        )
    assert sorted(p.stem for p in GOLDEN.glob("*.yaml")) == sorted(renders)


# --- assertions over the rendered objects --------------------------------------------------------


def test_mode_is_required_and_checked(helm_env: dict[str, str]) -> None:
    missing = helm(helm_env, "template", RELEASE, ".", check=False)
    assert missing.returncode != 0 and "mode is required" in missing.stderr
    bad = helm(helm_env, "template", RELEASE, ".", "--set", "mode=gatway", check=False)
    assert bad.returncode != 0
    assert 'mode must be one of the following: "daemonset", "deployment", "sidecar", "gateway"' in bad.stderr
    lint = helm(helm_env, "lint", "--strict", ".", "--set", "mode=gatway", check=False)
    assert lint.returncode != 0


def test_schema_rejects_unknown_keys_in_the_charts_objects(helm_env: dict[str, str]) -> None:
    for key in (
        "presets.statsd.prot=1", "queue.sizelimit=1Gi", "sidecar.nativ=true", "extra=1",
        "forward.gatewaySvc=gw", "gateway.autoscaling.maxReplica=3", "gateway.processors.drift.enabled=true",
        "gateway.persistence.size=1Gi", "gateway.processors.percentiles.windows=1m",
    ):  # fmt: skip
        done = helm(helm_env, "template", RELEASE, ".", "--set", "mode=daemonset", "--set", key, check=False)
        assert done.returncode != 0 and "Additional property" in done.stderr, (key, done.stderr)
    # The agent's own config is free-form here (the agent checks it: see the validate test).
    template(helm_env, "--set", "mode=daemonset", "--set", "config.receivers.statsd.max_series=5")


def test_host_port_only_in_daemonset_mode(renders: dict[str, str], helm_env: dict[str, str]) -> None:
    for case in renders:
        for _, spec in pod_specs(objects(renders, case)):
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                if any("hostPort" in p for p in c.get("ports", [])):
                    assert mode_of(case) == "daemonset", case
    (ds,) = by_kind(renders, "daemonset", "DaemonSet")
    ports = agent_container(ds["spec"]["template"]["spec"])["ports"]
    assert [p for p in ports if "hostPort" in p] == [
        {"name": "statsd-udp", "containerPort": 8125, "protocol": "UDP", "hostPort": 8125}
    ]
    (ds,) = by_kind(renders, "daemonset-emptydir", "DaemonSet")  # not asked: none
    assert not [p for p in agent_container(ds["spec"]["template"]["spec"])["ports"] if "hostPort" in p]
    for mode in ("deployment", "sidecar", "gateway"):
        port = "otlp-grpc" if mode == "gateway" else "statsd-udp"  # a gateway takes OTLP only
        done = helm(
            helm_env, "template", RELEASE, ".", "--set", f"mode={mode}",
            "--set", f"ports.{port}.hostPort=8125", check=False,
        )  # fmt: skip
        assert done.returncode != 0
        assert f"hostPort is only allowed in daemonset mode (this is {mode} mode)" in done.stderr


def test_security_context_on_every_container(renders: dict[str, str]) -> None:
    seen = 0
    for case in renders:
        for kind, spec in pod_specs(objects(renders, case)):
            pod = spec.get("securityContext", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                if case == EXAMPLE and c["name"] == "shop":
                    continue  # the example's own application container
                sc = c["securityContext"]
                seen += 1
                assert sc["readOnlyRootFilesystem"] is True, (case, c["name"])
                assert sc["allowPrivilegeEscalation"] is False, (case, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"], (case, c["name"])
                assert (sc.get("seccompProfile") or pod["seccompProfile"])["type"] == "RuntimeDefault"
                if c["name"] == "queue-permissions":  # hostPath ownership: root, CHOWN only
                    assert kind == "DaemonSet" and sc["capabilities"]["add"] == ["CHOWN"]
                else:
                    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, (case, c["name"])
                    assert sc.get("privileged", False) is False
    assert seen >= len(renders)


def test_probes_env_and_mounts_of_the_agent(renders: dict[str, str]) -> None:
    for case in renders:
        for kind, spec in pod_specs(objects(renders, case)):
            if kind == "Pod":
                continue
            c = agent_container(spec)
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "hw-telemetry"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "hw-telemetry"}
            fields = {
                e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]
            }
            # The agent's container name is not where the data comes from (in sidecar mode the app's
            # data would be labelled k8s.container.name=headwater): not set.
            assert "K8S_CONTAINER_NAME" not in fields, case
            assert {k: fields[k] for k in fields if k.startswith("K8S_") and fields[k]} == {
                "K8S_NODE_NAME": "spec.nodeName",
                "K8S_NODE_IP": "status.hostIP",
                "K8S_POD_NAME": "metadata.name",
                "K8S_NAMESPACE_NAME": "metadata.namespace",
                "K8S_POD_IP": "status.podIP",
                "K8S_POD_UID": "metadata.uid",
            }
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/etc/headwater"]["readOnly"] is True
            assert {"/var/lib/headwater/queue", "/var/run/headwater", "/tmp"} <= set(mounts)
            assert c["args"] == ["run", "-c", "/etc/headwater/config.yaml"]


def test_disk_queue_volume_per_mode_and_max_bytes_below_the_limit(renders: dict[str, str]) -> None:
    def queue_volume(case: str) -> dict[str, Any]:
        (_, spec) = next(pod_specs([d for d in objects(renders, case) if d["kind"] != "Pod"]))
        found = [v for v in spec["volumes"] if v["name"] == "headwater-queue"]
        if found:
            return found[0]
        # gateway mode with persistence: each pod's claim from the StatefulSet's template
        (sts,) = by_kind(renders, case, "StatefulSet")
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "headwater-queue"
        return {
            "name": "headwater-queue",
            "emptyDir": {"sizeLimit": claim["spec"]["resources"]["requests"]["storage"]},
        }

    ds = queue_volume("daemonset")
    assert ds["hostPath"] == {
        "path": f"/var/lib/headwater/{NAMESPACE}/{RELEASE}",
        "type": "DirectoryOrCreate",
    }
    (dset,) = by_kind(renders, "daemonset", "DaemonSet")
    (init,) = dset["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "queue-permissions"
    assert init["command"] == ["chown", "10001:10001", "/var/lib/headwater/queue"]
    assert queue_volume("daemonset-emptydir") == {"name": "headwater-queue", "emptyDir": {"sizeLimit": "1Gi"}}
    (dset,) = by_kind(renders, "daemonset-emptydir", "DaemonSet")
    assert "initContainers" not in dset["spec"]["template"]["spec"]
    assert queue_volume("deployment")["emptyDir"]["sizeLimit"] == "2Gi"
    assert queue_volume("remotewrite")["emptyDir"]["sizeLimit"] == "4Gi"
    (app,) = by_kind(renders, EXAMPLE, "Deployment")
    vols = {v["name"]: v for v in app["spec"]["template"]["spec"]["volumes"]}
    assert vols["headwater-queue"] == {"name": "headwater-queue", "emptyDir": {"sizeLimit": "2Gi"}}

    assert queue_volume("gateway")["emptyDir"]["sizeLimit"] == "8Gi"  # the PersistentVolumeClaim's size

    mib = {"1Gi": 1024, "2Gi": 2048, "4Gi": 4096, "8Gi": 8192}
    seen = set()
    for case in renders:
        cfg = yaml.safe_load(agent_config(objects(renders, case)))
        disk = [q for q in map(_sending_queue, cfg["exporters"].items()) if q and q.get("storage") == "disk"]
        seen |= {case for _ in disk}
        if not disk:
            continue
        vol = queue_volume(EXAMPLE if case == "sidecar" else case)  # sidecar: the app's pod has it
        limit = mib[vol["emptyDir"]["sizeLimit"]] if "emptyDir" in vol else 2048  # hostPath: 2Gi budget
        total = sum(int(q["max_bytes"].removesuffix("MiB")) for q in disk)
        if case.startswith("daemonset-forward-gateway"):  # max_bytes of each gateway's partition, of 10
            total *= 10
        assert all(q["directory"] == "/var/lib/headwater/queue" for q in disk)
        assert 0.5 * limit <= total <= 0.8 * limit, (case, total, limit)
    assert {"gateway", "daemonset-forward-gateway"} <= seen  # remote-write; loadbalancing (per gateway)


def _sending_queue(item: tuple[str, dict[str, Any]]) -> dict[str, Any] | None:
    """An exporter's sending_queue; the loadbalancing exporter's is under protocol.otlp (as in the
    Collector): one queue partition per gateway."""
    cid, body = item
    if cid.split("/")[0] == "loadbalancing":
        return body.get("protocol", {}).get("otlp", {}).get("sending_queue")  # type: ignore[no-any-return]
    return body.get("sending_queue")  # type: ignore[no-any-return]


def test_config_checksum_rolls_the_pods(helm_env: dict[str, str], renders: dict[str, str]) -> None:
    values = str(CHART / "ci" / "deployment-values.yaml")

    def checksum(*extra: str) -> str:
        (dep,) = [d for d in docs(template(helm_env, "-f", values, *extra)) if d["kind"] == "Deployment"]
        return str(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    same = checksum()
    (dep,) = by_kind(renders, "deployment", "Deployment")
    assert same == dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", same)
    assert checksum("--set", "config.receivers.statsd.flush_interval=20s") != same
    assert checksum("--set", "presets.prometheus.port=9200") != same
    assert checksum("--set", "replicaCount=5") == same  # not the config: no roll
    (app,) = by_kind(renders, EXAMPLE, "Deployment")
    assert re.fullmatch(
        r"[0-9a-f]{64}", app["spec"]["template"]["metadata"]["annotations"]["checksum/headwater"]
    )


def test_services_pdb_and_test_hook_per_mode(renders: dict[str, str]) -> None:
    (svc,) = by_kind(renders, "daemonset", "Service")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert {"name": "statsd-udp", "port": 8125, "targetPort": "statsd-udp", "protocol": "UDP"} in svc["spec"][
        "ports"
    ]
    (svc,) = by_kind(renders, "deployment", "Service")
    assert "internalTrafficPolicy" not in svc["spec"]
    assert {p["name"] for p in svc["spec"]["ports"]} >= {"statsd-udp", "otlp-grpc", "otlp-http", "hw-http"}
    for case in renders:
        mode = mode_of(case)
        assert bool(by_kind(renders, case, "PodDisruptionBudget")) == (mode in ("deployment", "gateway")), (
            case
        )
    kinds = sorted(d["kind"] for d in objects(renders, "sidecar"))
    assert kinds == ["ConfigMap", "Secret"]  # the app chart owns the pods; the telemetry token
    (hook,) = by_kind(renders, "deployment", "Pod")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = hook["spec"]["containers"][0]["args"]
    assert args[:3] == ["selftest", "--target", f"{RELEASE}-headwater.{NAMESPACE}.svc"]
    assert dict(zip(args[3::2], args[4::2], strict=True)) == {
        "--statsd-port": "8125",
        "--otlp-http-port": "4318",
        "--telemetry-port": "8888",
        "--prometheus-port": "9102",
        "--timeout": "90s",
    }
    assert not by_kind(renders, "signoz", "Pod")  # no pull endpoint to read back from: no test


def test_sidecar_example_uses_the_native_sidecar_and_binds_localhost(renders: dict[str, str]) -> None:
    (app,) = by_kind(renders, EXAMPLE, "Deployment")
    spec = app["spec"]["template"]["spec"]
    (agent,) = spec["initContainers"]
    assert agent["name"] == "headwater" and agent["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["shop"]
    cfg = yaml.safe_load(agent_config(objects(renders, EXAMPLE)))
    assert cfg["receivers"]["statsd"]["udp"] == "127.0.0.1:8125"
    assert cfg["receivers"]["otlp"] == {"grpc": None, "http": "127.0.0.1:4318"}
    assert cfg["exporters"]["otlp/signoz"]["tls"] == {"insecure": True}
    for case in CASES:
        cfg = yaml.safe_load(agent_config(objects(renders, case)))
        statsd = cfg["receivers"].get("statsd", {})
        host = "127.0.0.1" if mode_of(case) == "sidecar" else "0.0.0.0"
        assert all(statsd[t].startswith(host + ":") for t in ("udp", "tcp") if t in statsd), case


# --- the rendered agent configs pass `headwater validate` ----------------------------------------

_BIND = re.compile(r"^(0\.0\.0\.0|127\.0\.0\.1):\d+$")


def _overrides(cfg: dict[str, Any], tmp: Path) -> list[str]:
    """--set arguments moving every bind address to a free port and every path into ``tmp``."""
    sets = []
    for section in ("receivers", "exporters"):
        for cid, body in (cfg.get(section) or {}).items():
            for key, value in (body or {}).items():
                if isinstance(value, str) and _BIND.match(value):
                    sets.append(f"{section}.{cid}.{key}={value.rsplit(':', 1)[0]}:{free_tcp_udp_port()}")
                elif key in ("unixgram", "unix") and value:
                    sets.append(f"{section}.{cid}.{key}={tmp / 'sockets' / Path(value).name}")
                elif key == "sending_queue" and value.get("storage") == "disk":
                    sets.append(f"{section}.{cid}.sending_queue.directory={tmp / 'queue'}")
                elif (
                    key == "protocol"
                    and (value.get("otlp") or {}).get("sending_queue", {}).get("storage") == "disk"
                ):
                    sets.append(f"{section}.{cid}.protocol.otlp.sending_queue.directory={tmp / 'queue'}")
    endpoint = cfg["service"]["telemetry"]["endpoint"]
    sets.append(f"service.telemetry.endpoint={endpoint.rsplit(':', 1)[0]}:{free_tcp_udp_port()}")
    return sets


@pytest.mark.parametrize("case", [*CASES, EXAMPLE])
def test_rendered_agent_config_passes_headwater_validate(
    renders: dict[str, str], case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    objs = objects(renders, case)
    text = agent_config(objs)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    (tmp_path / "sockets").mkdir()
    # Every ${env:VAR} the config needs is set by the pod spec (downward API or a Secret). Sidecar mode
    # renders no pod: its container comes from the named template, as in the example application.
    pods = [d for d in objs if d["kind"] in WORKLOADS] or by_kind(renders, EXAMPLE, "Deployment")
    (_, spec) = next(pod_specs(pods))
    declared = {e["name"] for e in agent_container(spec)["env"]}
    needed = set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}", text))
    assert needed <= declared, f"{case}: the config needs {needed - declared}, the pod does not set them"
    for name in declared:
        monkeypatch.setenv(name, "ci-value")
    args = ["validate", "-c", str(path)]
    for override in _overrides(yaml.safe_load(text), tmp_path):
        args += ["--set", override]
    code = headwater(args)
    captured = capsys.readouterr()
    assert code == 0, f"{case}:\n{text}\n{captured.err}"
    assert "configuration is valid" in captured.out


# --- what only a real cluster would show -------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A loader that refuses duplicate mapping keys (yaml.safe_load keeps the last one silently; the
    API server's strict decoding does not)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dup)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def test_renders_have_no_duplicate_keys(renders: dict[str, str]) -> None:
    for case, text in renders.items():
        for doc in yaml.load_all(text, Loader=_StrictLoader):  # a SafeLoader subclass
            assert doc is None or isinstance(doc, dict), case


def test_the_test_pod_is_no_agent_and_runs_where_an_agent_runs(renders: dict[str, str]) -> None:
    for case in CASES:
        objs = objects(renders, case)
        hooks = [d for d in objs if d["kind"] == "Pod"]
        selectors = [d["spec"]["selector"]["matchLabels"] for d in objs if d["kind"] in WORKLOADS]
        selectors += [d["spec"]["selector"] for d in objs if d["kind"] == "Service"]
        selectors += [
            d["spec"]["selector"]["matchLabels"] for d in objs if d["kind"] == "PodDisruptionBudget"
        ]
        for hook in hooks:
            labels = hook["metadata"]["labels"]
            # A DaemonSet adopts an orphan pod its selector matches (and deletes a second pod on a
            # node); a Service would route to it and a PDB count it.
            for sel in selectors:
                assert not all(labels.get(k) == v for k, v in sel.items()), (case, sel, labels)
            assert labels["app.kubernetes.io/component"] == "selftest"
    # daemonset mode: the Service is node-local, so the test pod goes where the DaemonSet's pods go.
    (hook,) = by_kind(renders, "daemonset", "Pod")
    (ds,) = by_kind(renders, "daemonset", "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    for key in ("nodeSelector", "affinity", "tolerations"):
        assert hook["spec"].get(key) == pod.get(key), key
    assert hook["spec"]["tolerations"] == [{"operator": "Exists"}]


def test_the_test_pod_targets_the_ports_the_service_has(helm_env: dict[str, str]) -> None:
    values = str(CHART / "ci" / "deployment-values.yaml")

    def args(*extra: str) -> dict[str, str] | None:
        pods = [d for d in docs(template(helm_env, "-f", values, *extra)) if d["kind"] == "Pod"]
        if not pods:
            return None
        a = pods[0]["spec"]["containers"][0]["args"]
        return dict(zip(a[3::2], a[4::2], strict=True))

    moved = args("--set", "config.receivers.statsd.udp=0.0.0.0:9125", "--set", "presets.prometheus.port=9200")
    assert moved is not None
    assert (moved["--statsd-port"], moved["--prometheus-port"]) == ("9125", "9200")
    assert args("--set", "ports.otlp-http.service=false")["--otlp-http-port"] == "0"  # type: ignore[index]
    assert args("--set", "ports.hw-metrics.service=false") is None  # nothing to read back from
    rw = ("--set", "presets.remoteWrite.enabled=true", "--set", "presets.remoteWrite.targets[0].name=rw")
    rw += ("--set", "presets.remoteWrite.targets[0].url=http://rw.example/api/v1/write")
    assert args(*rw, "--set", "presets.prometheus.enabled=false") is None


def test_queue_permissions_init_container_works_again_on_the_next_start(
    renders: dict[str, str], tmp_path: Path
) -> None:
    """hostPath: the first start finds the directory root-owned, every later one owned by the agent.
    The init container runs as root with CAP_CHOWN only (no CAP_FOWNER: it may not chmod a file it
    does not own), so its command must succeed in both cases."""
    (ds,) = by_kind(renders, "daemonset", "DaemonSet")
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    sc = init["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the command with CAP_CHOWN only")
    queue = tmp_path / "queue"
    queue.mkdir()
    command = [queue.as_posix() if a == "/var/lib/headwater/queue" else a for a in init["command"]]
    assert command != init["command"], "the command names the queue mount"
    caps = [setpriv, "--bounding-set=-all,+chown", "--inh-caps=-all,+chown"]
    for start in ("first", "second"):  # the directory is root-owned, then already the agent's
        done = subprocess.run([*caps, *command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (start, done.stderr)
        st = queue.stat()
        assert (st.st_uid, st.st_gid) == (10001, 10001), start


def test_daemonset_never_surges_onto_a_node(renders: dict[str, str], helm_env: dict[str, str]) -> None:
    """A surge pod starts beside the old one on the same node: its agent cannot lock the hostPath
    queue (it exits, and the old pod is only removed once the new one is ready: forever) and cannot
    bind a hostPort."""
    for case in ("daemonset", "daemonset-emptydir", "signoz"):
        (ds,) = by_kind(renders, case, "DaemonSet")
        assert ds["spec"]["updateStrategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
        }, case
    surge = ("--set", "updateStrategy.rollingUpdate.maxSurge=1")
    done = helm(helm_env, "template", RELEASE, ".", "-f", "ci/daemonset-values.yaml", *surge, check=False)
    assert done.returncode != 0 and "hostPath disk queue can be locked by one agent only" in done.stderr
    emptydir = ("-f", "ci/daemonset-emptydir-values.yaml")
    hostport = ("--set", "ports.statsd-udp.hostPort=8125")
    done = helm(helm_env, "template", RELEASE, ".", *emptydir, *surge, *hostport, check=False)
    assert done.returncode != 0 and "hostPorts (statsd-udp) can be bound once per node" in done.stderr
    # An emptyDir queue and no hostPort: surging is the user's choice.
    (ds,) = [d for d in docs(template(helm_env, *emptydir, *surge)) if d["kind"] == "DaemonSet"]
    assert ds["spec"]["updateStrategy"] == {"rollingUpdate": {"maxSurge": 1}}


def test_grace_period_covers_the_drain(helm_env: dict[str, str]) -> None:
    def render(*extra: str) -> subprocess.CompletedProcess[str]:
        return helm(helm_env, "template", RELEASE, ".", *extra, check=False)

    done = render("--set", "mode=daemonset", "--set", "terminationGracePeriodSeconds=30")
    assert done.returncode != 0 and "give at least 35" in done.stderr
    done = render("--set", "mode=deployment", "--set", "config.service.shutdown_timeout=1m")
    assert done.returncode != 0 and "shutdown_timeout (60s)" in done.stderr and "at least 65" in done.stderr
    ok = render("--set", "mode=deployment", "--set", "config.service.shutdown_timeout=1m",
                "--set", "terminationGracePeriodSeconds=65")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # A regular sidecar container sleeps in preStop first, within the same grace period.
    done = render("--set", "mode=sidecar", "--set", "terminationGracePeriodSeconds=39")
    assert done.returncode != 0 and "after the 5s preStop sleep" in done.stderr
    assert render("--set", "mode=sidecar", "--set", "sidecar.native=true",
                  "--set", "terminationGracePeriodSeconds=39").returncode == 0  # fmt: skip


def test_probes_reach_the_telemetry_endpoint(helm_env: dict[str, str]) -> None:
    for mode in ("daemonset", "sidecar"):
        done = helm(
            helm_env, "template", RELEASE, ".", "--set", f"mode={mode}",
            "--set", "config.service.telemetry.endpoint=127.0.0.1:8888", check=False,
        )  # fmt: skip
        assert done.returncode != 0 and "listens on loopback only" in done.stderr, mode
    done = helm(
        helm_env, "template", RELEASE, ".", "--set", "mode=deployment",
        "--set", "config.service.telemetry.endpoint=0.0.0.0:${env:TELEMETRY_PORT}", check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "has no literal port" in done.stderr


def test_pdb_never_blocks_every_eviction(helm_env: dict[str, str]) -> None:
    def pdbs(*extra: str) -> list[dict[str, Any]]:
        out = template(helm_env, "--set", "mode=deployment", *extra)
        return [d for d in docs(out) if d["kind"] == "PodDisruptionBudget"]

    assert pdbs("--set", "replicaCount=1") == []  # minAvailable 1 of 1 would block node drains
    (pdb,) = pdbs("--set", "replicaCount=2")
    assert pdb["spec"]["minAvailable"] == 1
    done = helm(
        helm_env, "template", RELEASE, ".", "--set", "mode=deployment", "--set", "replicaCount=3",
        "--set", "podDisruptionBudget.minAvailable=3", check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "allows no eviction" in done.stderr


def _notes(env: dict[str, str], tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it (helm template does not render it): in a copy of the
    chart, its text becomes a named template that a ConfigMap includes."""
    copy = tmp_path / "helm"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts", "Chart.lock", "examples"))
    notes = copy / "templates" / "NOTES.txt"
    (copy / "templates" / "_zz_notes.tpl").write_text(
        '{{- define "zz.notes" -}}\n' + notes.read_text() + "\n{{- end -}}\n"
    )
    notes.unlink()
    (copy / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: zz-notes}\ndata:\n"
        '  notes: {{ include "zz.notes" . | toJson }}\n'
    )
    out = helm(env, "template", RELEASE, ".", "--namespace", NAMESPACE, *args,
               "--show-only", "templates/zz-notes.yaml", cwd=copy).stdout  # fmt: skip
    return str(docs(out)[0]["data"]["notes"])


def test_notes_follow_the_rendered_ports(helm_env: dict[str, str], tmp_path: Path) -> None:
    svc = f"{RELEASE}-headwater.{NAMESPACE}.svc"
    text = _notes(helm_env, tmp_path / "a", "-f", str(CHART / "ci" / "daemonset-values.yaml"))
    assert f"STATSD_HOST={svc}  STATSD_PORT=8125" in text
    assert "hostPort: statsd-udp 8125/UDP" in text and f"helm test {RELEASE} -n {NAMESPACE}" in text
    text = _notes(helm_env, tmp_path / "b", "-f", str(CHART / "ci" / "deployment-values.yaml"),
                  "--set", "config.receivers.statsd.udp=0.0.0.0:9125")  # fmt: skip
    assert f"StatsD:    {svc} (9125/UDP)" in text  # the config's port; no TCP (tcp: false)
    assert "TCP)" not in text.split("StatsD:", 1)[1].splitlines()[0]
    text = _notes(helm_env, tmp_path / "c", "--set", "mode=deployment", "--set", "service.enabled=false")
    assert "helm test" not in text and "without a Service" in text
    text = _notes(helm_env, tmp_path / "d", "-f", str(CHART / "ci" / "sidecar-values.yaml"))
    assert "STATSD_HOST=127.0.0.1 STATSD_PORT=8125" in text
    assert "DogStatsD socket: /var/run/headwater/dsd.socket" in text and "helm test" not in text


def test_the_images_default_config_listens_on_all_interfaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`docker run -p` reaches only what listens on the container's interfaces, not its 127.0.0.1."""
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^RUN sed '([^']+)' config\.example\.yaml > config\.yaml$", text, re.M)
    assert m, "the Dockerfile derives the image's config from config.example.yaml"
    assert "COPY --from=build /src/config.yaml /etc/headwater/config.yaml" in text
    done = subprocess.run(
        ["sed", m.group(1), str(ROOT / "config.example.yaml")], capture_output=True, text=True, check=True
    )
    cfg = yaml.safe_load(done.stdout)
    binds = [v for section in ("receivers", "exporters") for body in cfg[section].values()
             for k, v in (body or {}).items() if k in ("udp", "tcp", "endpoint")]  # fmt: skip
    binds.append(cfg["service"]["telemetry"]["endpoint"])
    assert binds and all(b.startswith("0.0.0.0:") for b in binds), binds
    path = tmp_path / "config.yaml"
    path.write_text(done.stdout)
    args = ["validate", "-c", str(path)]
    for override in _overrides(cfg, tmp_path):
        args += ["--set", override]
    assert headwater(args) == 0, capsys.readouterr().err


def test_env_references_and_secrets_are_checked_at_render(helm_env: dict[str, str]) -> None:
    def render(*extra: str) -> subprocess.CompletedProcess[str]:
        return helm(helm_env, "template", RELEASE, ".", "--set", "mode=daemonset", *extra, check=False)

    debug = ("--set", "config.exporters.debug.path=/tmp/${env:DEBUG_FILE}")
    done = render(*debug)  # the agent would refuse to start: caught here
    assert done.returncode != 0 and "uses ${env:DEBUG_FILE} but the container does not set it" in done.stderr
    assert render(*debug, "--set", "env[0].name=DEBUG_FILE", "--set", "env[0].value=x").returncode == 0
    assert render(*debug, "--set", "envFrom[0].secretRef.name=extra").returncode == 0  # can't know: allowed
    assert render("--set", "config.exporters.debug.path=/tmp/${env:DEBUG_FILE:-points}").returncode == 0
    cloud = (
        "--set",
        "presets.signoz.enabled=true",
        "--set",
        "presets.signoz.endpoint=ingest.eu.signoz.cloud:443",
    )
    done = render(*cloud)  # every request would be refused (401) without the key
    assert done.returncode != 0 and "SignOz Cloud needs an ingestion key" in done.stderr
    assert render(*cloud, "--set", "presets.signoz.ingestionKey.existingSecret=signoz").returncode == 0


def test_memory_limiter_leads_every_pipeline_in_every_mode(
    renders: dict[str, str], helm_env: dict[str, str]
) -> None:
    for case in renders:
        cfg = yaml.safe_load(agent_config(objects(renders, case)))
        assert cfg["processors"]["memory_limiter"] == {"limit_percentage": 80, "spike_limit_percentage": 20}
        for pid, pipeline in cfg["service"]["pipelines"].items():
            assert pipeline["processors"][0] == "memory_limiter", (case, pid)
    # The user's own pipelines get it first too (once), keeping their processors after it.
    own = template(
        helm_env,
        "--set",
        "mode=deployment",
        "--set-json",
        'config={"processors": {"batch": {}}, "service": {"pipelines": {"metrics": '
        '{"receivers": ["statsd"], "processors": ["batch"], "exporters": ["prometheus"]}}}}',
    )
    cfg = yaml.safe_load(agent_config(docs(own)))
    assert cfg["service"]["pipelines"]["metrics"]["processors"] == ["memory_limiter", "batch"]
    off = template(helm_env, "--set", "mode=deployment", "--set", "presets.memoryLimiter.enabled=false")
    cfg = yaml.safe_load(agent_config(docs(off)))
    assert "processors" not in cfg
    assert "processors" not in cfg["service"]["pipelines"]["metrics"]


# --- gateway mode and the agents forwarding to it ------------------------------------------------


def _config_of(text: str) -> dict[str, Any]:
    return yaml.safe_load(agent_config(docs(text)))  # type: ignore[no-any-return]


def test_gateway_mode_is_a_statefulset_behind_a_headless_service(renders: dict[str, str]) -> None:
    objs = objects(renders, "gateway")
    assert sorted(d["kind"] for d in objs) == sorted([
        "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Service", "Service",
        "ServiceAccount", "StatefulSet",
    ])  # fmt: skip
    (sts,) = by_kind(renders, "gateway", "StatefulSet")
    services = {s["metadata"]["name"]: s for s in by_kind(renders, "gateway", "Service")}
    headless = services.pop(f"{RELEASE}-headwater-headless")
    (plain,) = services.values()
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # The dns resolver sees the ready gateways' pod IPs: no cluster IP, no unready pods.
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"otlp-grpc": 4317, "otlp-http": 4318}
    assert plain["spec"]["type"] == "ClusterIP" and "clusterIP" not in plain["spec"]
    selector = sts["spec"]["selector"]["matchLabels"]
    assert headless["spec"]["selector"] == plain["spec"]["selector"] == selector
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert (
        all(labels[k] == v for k, v in selector.items())
        and labels["app.kubernetes.io/component"] == "gateway"
    )
    # The autoscaler owns the replica count; it scales the StatefulSet on CPU and memory.
    assert "replicas" not in sts["spec"]
    (hpa,) = by_kind(renders, "gateway", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets == {n: {"type": "Utilization", "averageUtilization": 70} for n in ("cpu", "memory")}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    (pdb,) = by_kind(renders, "gateway", "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    # The disk queue is each pod's claim, mounted where the exporters queue.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "8Gi"}},
    }
    spec = sts["spec"]["template"]["spec"]
    assert "headwater-queue" not in {v["name"] for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in agent_container(spec)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/headwater/queue"
    assert "initContainers" not in spec  # fsGroup gives the claim to the agent's group
    assert spec["securityContext"]["fsGroup"] == 10001


def test_gateway_config_runs_the_stateful_processors_on_otlp(renders: dict[str, str]) -> None:
    cfg = yaml.safe_load(agent_config(objects(renders, "gateway")))
    assert cfg["receivers"] == {"otlp": {"grpc": "0.0.0.0:4317", "http": "0.0.0.0:4318"}}  # no StatsD preset
    assert cfg["service"]["pipelines"] == {
        "metrics": {
            "receivers": ["otlp"],
            "processors": ["memory_limiter", "percentiles", "aggregate"],
            "exporters": ["prometheus_remote_write/mimir"],
        }
    }
    assert cfg["processors"]["percentiles"] == {"windows": ["1m", "5m"], "quantiles": [0.5, 0.99]}
    assert cfg["processors"]["aggregate"]["rules"][0]["match"] == ["http.server.*"]
    assert cfg["exporters"]["prometheus_remote_write/mimir"]["headers"] == {"X-Scope-OrgID": NAMESPACE}


def test_gateway_defaults(helm_env: dict[str, str]) -> None:
    objs = docs(template(helm_env, "--set", "mode=gateway"))
    (sts,) = [d for d in objs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == 2
    assert not [d for d in objs if d["kind"] == "HorizontalPodAutoscaler"]  # off by default
    (pdb,) = [d for d in objs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]  # persistence on, the cluster's default class
    assert (
        "storageClassName" not in claim["spec"] and claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    )
    cfg = _config_of(template(helm_env, "--set", "mode=gateway"))
    assert set(cfg["processors"]) == {"memory_limiter", "percentiles"}
    assert cfg["processors"]["percentiles"] == {}  # the processor's own defaults
    assert cfg["service"]["pipelines"]["metrics"]["processors"] == ["memory_limiter", "percentiles"]
    assert set(cfg["exporters"]) == {"prometheus"}  # the pull endpoint, as in the other modes
    # Without persistence the queue is an emptyDir of queue.sizeLimit.
    objs = docs(template(helm_env, "--set", "mode=gateway", "--set", "gateway.persistence.enabled=false"))
    (sts,) = [d for d in objs if d["kind"] == "StatefulSet"]
    assert "volumeClaimTemplates" not in sts["spec"]
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["headwater-queue"] == {"name": "headwater-queue", "emptyDir": {"sizeLimit": "2Gi"}}
    # threshold first (the raw points), then percentiles, then aggregate (which may drop raw points).
    rules = '[{"name": "slow", "metric": "http.duration", "statistic": "percentile", "critical": 2}]'
    cfg = _config_of(template(
        helm_env, "--set", "mode=gateway", "--set", "gateway.processors.aggregate.enabled=true",
        "--set-json", 'gateway.processors.aggregate.config={"rules": [{"match": ["x.*"]}]}',
        "--set", "gateway.processors.threshold.enabled=true",
        "--set-json", f'gateway.processors.threshold.config={{"rules": {rules}}}',
        "--set", "gateway.processors.percentiles.enabled=false",
    ))  # fmt: skip
    assert cfg["service"]["pipelines"]["metrics"]["processors"] == [
        "memory_limiter",
        "threshold",
        "aggregate",
    ]
    assert cfg["processors"]["threshold"]["rules"][0]["name"] == "slow"


def test_gateway_refusals(helm_env: dict[str, str]) -> None:
    def refused(*extra: str) -> str:
        done = helm(helm_env, "template", RELEASE, ".", "--set", "mode=gateway", *extra, check=False)
        assert done.returncode != 0, extra
        return done.stderr

    for name in ("aggregate", "threshold"):  # nothing to do without rules
        err = refused("--set", f"gateway.processors.{name}.enabled=true")
        assert f"gateway.processors.{name} is enabled without rules" in err
    err = refused("--set", "gateway.autoscaling.enabled=true", "--set", "gateway.autoscaling.minReplicas=5",
                  "--set", "gateway.autoscaling.maxReplicas=4")  # fmt: skip
    assert "minReplicas 5 is above maxReplicas 4" in err
    err = refused("--set", "gateway.autoscaling.enabled=true", "--set", "resources.requests=null")
    assert "set resources.requests.cpu and resources.requests.memory" in err
    err = refused("--set", "gateway.autoscaling.enabled=true", "--set", "podDisruptionBudget.minAvailable=2")
    assert "minAvailable 2 with 2 replicas allows no eviction" in err  # the autoscaler's minimum counts
    err = refused("--set", "presets.otlp.grpc=false", "--set", "presets.otlp.http=false")
    assert "gateway mode takes OTLP" in err
    err = refused("--set", "forward.to=gateway", "--set", "forward.gatewayService=gw-headwater-headless")
    assert "a gateway exports to the backends itself" in err
    # One gateway: a PDB would block node drains, so there is none.
    objs = docs(template(helm_env, "--set", "mode=gateway", "--set", "replicaCount=1"))
    assert not [d for d in objs if d["kind"] == "PodDisruptionBudget"]


def test_forwarding_agents_send_only_to_the_gateways_headless_service(
    renders: dict[str, str], helm_env: dict[str, str]
) -> None:
    cfg = yaml.safe_load(agent_config(objects(renders, "daemonset-forward-gateway")))
    assert set(cfg["exporters"]) == {"loadbalancing"}  # no pull endpoint, no backend exporter
    lb = cfg["exporters"]["loadbalancing"]
    assert lb["routing_key"] == "series"
    dns = lb["resolver"]["dns"]
    assert dns == {
        "hostname": f"{GATEWAY_RELEASE}-headwater-headless.{GATEWAY_NAMESPACE}.svc.cluster.local",
        "port": 4317, "interval": "5s", "timeout": "1s",
    }  # fmt: skip
    otlp = lb["protocol"]["otlp"]
    assert "endpoint" not in otlp  # the resolver finds the gateways
    assert otlp["tls"] == {"insecure": True} and otlp["resource_from_environment"] is False
    # Each gateway's partition: the 1Gi emptyDir's 80 % split forward.maxGateways (10) ways.
    assert otlp["sending_queue"] == {
        "storage": "disk",
        "directory": "/var/lib/headwater/queue",
        "max_bytes": "81MiB",
    }
    for pid, pipeline in cfg["service"]["pipelines"].items():
        assert pipeline["exporters"] == ["loadbalancing"], pid
    # The hostname is the headless Service that the gateway release renders, on its OTLP/gRPC port.
    gw = docs(helm(helm_env, "template", GATEWAY_RELEASE, ".", "--namespace", GATEWAY_NAMESPACE,
                   "-f", str(CHART / "ci" / "gateway-values.yaml")).stdout)  # fmt: skip
    (headless,) = [d for d in gw if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    name, namespace = dns["hostname"].split(".")[:2]
    assert (name, namespace) == (headless["metadata"]["name"], headless["metadata"]["namespace"])
    assert {
        "name": "otlp-grpc",
        "port": dns["port"],
        "targetPort": "otlp-grpc",
        "protocol": "TCP",
    } in headless["spec"]["ports"]
    (sts,) = [d for d in gw if d["kind"] == "StatefulSet"]
    assert sts["spec"]["serviceName"] == name
    # Without a pull endpoint there is nothing for `helm test` to read back: no test pod.
    assert not by_kind(renders, "daemonset-forward-gateway", "Pod")


def test_forward_settings_and_refusals(helm_env: dict[str, str]) -> None:
    base = ("--set", "mode=daemonset", "--set", "forward.to=gateway")
    svc = ("--set", "forward.gatewayService=gw-headwater-headless")

    def render(*extra: str) -> subprocess.CompletedProcess[str]:
        return helm(helm_env, "template", RELEASE, ".", "--namespace", NAMESPACE, *base, *extra, check=False)

    done = render()
    assert done.returncode != 0 and "forward.gatewayService is empty" in done.stderr
    for preset, extra in (
        ("remoteWrite", ("--set", "presets.remoteWrite.targets[0].name=rw",
                         "--set", "presets.remoteWrite.targets[0].url=http://rw.example/api/v1/write")),
        ("signoz", ("--set", "presets.signoz.endpoint=signoz.platform.svc:4317")),
    ):  # fmt: skip
        done = render(*svc, "--set", f"presets.{preset}.enabled=true", *extra)
        assert done.returncode != 0, preset
        assert f"presets.{preset} is enabled but forward.to is gateway" in done.stderr
    # Defaults: this release's namespace; a fully qualified name is used as it is; forward.otlp is
    # merged over the generated protocol settings; the routing key goes through.
    done = render(*svc)
    assert done.returncode == 0, done.stderr
    lb = _config_of(done.stdout)["exporters"]["loadbalancing"]
    assert lb["resolver"]["dns"]["hostname"] == f"gw-headwater-headless.{NAMESPACE}.svc.cluster.local"
    done = render(
        "--set", "forward.gatewayService=gw.example.internal", "--set", "forward.routingKey=tenant",
        "--set", "forward.port=14317", "--set", "forward.otlp.compression=none",
        "--set", "forward.otlp.tls.insecure=false", "--set", "queue.enabled=false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lb = _config_of(done.stdout)["exporters"]["loadbalancing"]
    assert lb["resolver"]["dns"]["hostname"] == "gw.example.internal"
    assert (lb["resolver"]["dns"]["port"], lb["routing_key"]) == (14317, "tenant")
    assert lb["protocol"]["otlp"] == {
        "compression": "none",
        "tls": {"insecure": False},
        "resource_from_environment": False,
    }
    done = render(*svc, "--set", "queue.daemonsetVolume=emptyDir", "--set", "forward.maxGateways=200")
    assert (
        done.returncode != 0
        and "leaves 8 MiB per gateway's disk queue (forward.maxGateways 200)" in done.stderr
    )
    for bad in ("forward.routingKey=traceid", "forward.to=gateways", "forward.gatewayService=GW_svc"):
        done = render(*svc, "--set", bad)
        assert done.returncode != 0 and "forward." in done.stderr, bad


def test_notes_point_the_agents_at_the_gateway(helm_env: dict[str, str], tmp_path: Path) -> None:
    text = _notes(helm_env, tmp_path / "a", "-f", str(CHART / "ci" / "gateway-values.yaml"))
    assert "3–12 (autoscaled) gateways" in text
    assert (
        f"gatewayService: {RELEASE}-headwater-headless" in text and f"gatewayNamespace: {NAMESPACE}" in text
    )
    text = _notes(helm_env, tmp_path / "b", "-f", str(CHART / "ci" / "daemonset-forward-gateway-values.yaml"))
    assert "Everything goes to the gateways behind gw-headwater-headless.obs-gw.svc.cluster.local" in text
    assert (
        f"kubectl -n {NAMESPACE} get secret {RELEASE}-headwater-telemetry -o jsonpath='{{.data.token}}'"
        in text
    )


# --- the telemetry token --------------------------------------------------------------------------


def test_the_telemetry_endpoint_gets_a_token_from_a_secret(
    renders: dict[str, str], helm_env: dict[str, str]
) -> None:
    """The agent refuses a telemetry endpoint beyond loopback without a token (the tap, /status and
    /api/* show what flows); the probes bind it on the pod IP, so every render carries one."""
    for case in renders:
        objs = objects(renders, case)
        cfg = yaml.safe_load(agent_config(objs))
        assert cfg["service"]["telemetry"]["auth"] == {"bearer_token": "${env:HEADWATER_TELEMETRY_TOKEN}"}, (
            case
        )
        (secret,) = [d for d in objs if d["kind"] == "Secret"]
        assert secret["data"] == {"token": FIXED_TOKEN}, case
        pods = [d for d in objs if d["kind"] in WORKLOADS]
        if not pods:  # sidecar mode: the example application's pods, with its release's Secret
            pods = by_kind(renders, EXAMPLE, "Deployment")
            (secret,) = by_kind(renders, EXAMPLE, "Secret")
        env = _token_env(pods)
        assert env is not None, case
        assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "token"}, case
    # Unmasked: a random token of 40 characters, a new one per install (an upgrade reads it back).
    tokens = set()
    for _ in range(2):
        (secret,) = [d for d in docs(template(helm_env, "--set", "mode=gateway")) if d["kind"] == "Secret"]
        tokens.add(base64.b64decode(secret["data"]["token"]).decode())
    assert len(tokens) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{40}", tok) for tok in tokens)
    # The user's Secret: no generated one, the env reads its key.
    own = ("--set", "telemetry.auth.existingSecret=hw-admin", "--set", "telemetry.auth.key=bearer")
    objs = docs(template(helm_env, "--set", "mode=daemonset", *own))
    assert not [d for d in objs if d["kind"] == "Secret"]
    assert _token_env(objs)["valueFrom"]["secretKeyRef"] == {"name": "hw-admin", "key": "bearer"}
    # The user's own auth in `config`: used as it is (the agent refuses two token sources).
    text = template(
        helm_env, "--set", "mode=daemonset", "--set", "config.service.telemetry.auth.bearer_token_file=/t"
    )
    assert _config_of(text)["service"]["telemetry"]["auth"] == {"bearer_token_file": "/t"}
    assert not [d for d in docs(text) if d["kind"] == "Secret"] and _token_env(docs(text)) is None


def _token_env(objs: list[dict[str, Any]]) -> dict[str, Any] | None:
    (_, spec) = next(pod_specs(objs))
    found = [e for e in agent_container(spec)["env"] if e["name"] == "HEADWATER_TELEMETRY_TOKEN"]
    return found[0] if found else None
