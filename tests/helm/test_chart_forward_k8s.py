"""The chart's `forward.resolver: k8s`: the agents' loadbalancing exporter watches the gateway release's
headless Service through the Kubernetes API, so the chart renders a Role (get/list/watch endpointslices)
in the gateway's namespace, a RoleBinding for the agents' ServiceAccount, and mounts its token in the
agents' pods. Lint, the strict schema, kubernetes-validate, the golden render and `headwater validate` of
the rendered config cover helm/ci/daemonset-forward-gateway-k8s-values.yaml through tests/helm/test_chart.py
(every ci values file); this file asserts what the k8s resolver needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helm import test_chart as chart
from tests.helm.test_chart import (
    CHART,
    EXAMPLE,
    GATEWAY_NAMESPACE,
    GATEWAY_RELEASE,
    NAMESPACE,
    RELEASE,
    _config_of,
    _notes,
    by_kind,
    docs,
    helm,
    pod_specs,
)

helm_env = chart.helm_env  # the chart tests' fixtures, used here too
renders = chart.renders

CASE = "daemonset-forward-gateway-k8s"
FORWARD = ("--set", "forward.to=gateway", "--set", "forward.gatewayService=gw-headwater-headless")


def render(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return helm(env, "template", RELEASE, ".", "--namespace", NAMESPACE, *args, check=False)


def test_the_k8s_resolver_watches_the_gateway_service_with_a_role_in_its_namespace(
    renders: dict[str, str], helm_env: dict[str, str]
) -> None:
    lb = _config_of(renders[CASE])["exporters"]["loadbalancing"]
    assert lb["resolver"] == {
        "k8s": {"service": f"{GATEWAY_RELEASE}-headwater-headless.{GATEWAY_NAMESPACE}", "ports": [4317],
                "timeout": "1s"}
    }  # fmt: skip
    (role,) = by_kind(renders, CASE, "Role")
    (binding,) = by_kind(renders, CASE, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == GATEWAY_NAMESPACE
    # What the resolver asks (GET …/apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices, list and
    # watch) and nothing more.
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    ((_, spec),) = list(pod_specs(by_kind(renders, CASE, "DaemonSet")))
    (account,) = by_kind(renders, CASE, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert account["metadata"]["name"] == spec["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is True  # the token and CA the resolver reads
    # The Service watched is the one the gateway release renders (name and namespace), on its OTLP port.
    gw = docs(helm(helm_env, "template", GATEWAY_RELEASE, ".", "--namespace", GATEWAY_NAMESPACE,
                   "-f", str(CHART / "ci" / "gateway-values.yaml")).stdout)  # fmt: skip
    (headless,) = [d for d in gw if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    name, namespace = lb["resolver"]["k8s"]["service"].split(".")
    assert (name, namespace) == (headless["metadata"]["name"], headless["metadata"]["namespace"])
    assert any(p["port"] == 4317 and p["name"] == "otlp-grpc" for p in headless["spec"]["ports"])


def test_the_dns_resolver_renders_no_rbac_and_mounts_no_token(renders: dict[str, str]) -> None:
    for case in renders:
        if case in (CASE, EXAMPLE):  # the example's pods are the application's
            continue
        assert not by_kind(renders, case, "Role") and not by_kind(renders, case, "RoleBinding"), case
        for _, spec in pod_specs(by_kind(renders, case, "DaemonSet") + by_kind(renders, case, "Deployment")):
            assert spec["automountServiceAccountToken"] is False, case
    assert "dns" in _config_of(renders["daemonset-forward-gateway"])["exporters"]["loadbalancing"]["resolver"]


def test_k8s_resolver_in_deployment_mode_and_with_an_existing_service_account(
    helm_env: dict[str, str],
) -> None:
    done = render(
        helm_env, "--set", "mode=deployment", *FORWARD, "--set", "forward.resolver=k8s",
        "--set", "serviceAccount.create=false", "--set", "forward.port=14317",
        "--set", "forward.resolverTimeout=3s",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    objs = docs(done.stdout)
    (binding,) = [d for d in objs if d["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == NAMESPACE  # no gatewayNamespace: this release's
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}]
    ((_, spec),) = list(pod_specs([d for d in objs if d["kind"] == "Deployment"]))
    assert spec["automountServiceAccountToken"] is True
    k8s = _config_of(done.stdout)["exporters"]["loadbalancing"]["resolver"]["k8s"]
    assert k8s == {"service": f"gw-headwater-headless.{NAMESPACE}", "ports": [14317], "timeout": "3s"}


def test_k8s_resolver_refusals(helm_env: dict[str, str]) -> None:
    done = render(
        helm_env, "--set", "mode=daemonset", "--set", "forward.to=gateway", "--set", "forward.resolver=k8s",
        "--set", "forward.gatewayService=gw-headwater-headless.obs-gw.svc.cluster.local",
    )  # fmt: skip
    assert done.returncode != 0
    assert "forward.resolver k8s watches a Service by name" in done.stderr
    done = render(helm_env, "--set", "mode=sidecar", *FORWARD, "--set", "forward.resolver=k8s")
    assert done.returncode != 0 and "sidecar mode does not render" in done.stderr
    done = render(helm_env, "--set", "mode=daemonset", *FORWARD, "--set", "forward.resolver=endpoints")
    assert done.returncode != 0 and "forward.resolver" in done.stderr  # the strict schema


def test_notes_name_the_watched_service(helm_env: dict[str, str], tmp_path: Path) -> None:
    values = str(CHART / "ci" / f"{CASE}-values.yaml")
    text = _notes(helm_env, tmp_path, "-f", values)
    assert (
        "Everything goes to the gateways of the Service gw-headwater-headless.obs-gw (its EndpointSlices"
        in text
    )
