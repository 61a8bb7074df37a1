"""The Helm chart: lint, render with several values sets, install and uninstall for real."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeforge.crd import CRD_NAME
from kubeforge.dashboard import dashboard
from kubeforge.operator.rbac import NAMESPACE_RULES
from tests.e2e.test_cluster import wait_for

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeforge"


def helm(cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The helm built by `make k8s-bin` (on PATH in the kind lane)."""
    control = getattr(cluster, "control", None)
    binary = str(control.bins / "helm") if control else shutil.which("helm")
    if binary is None:
        pytest.fail("no helm: run `make k8s-bin` and put its bin dir on PATH")
    done = subprocess.run(
        [binary, "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and done.returncode:
        raise AssertionError(f"helm {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


def render(cluster: Any, *sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = helm(cluster, "template", "kf", str(CHART), "-n", "kf-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_chart_lints_clean(cluster: Any) -> None:
    out = helm(cluster, "lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in out.stdout


def test_chart_renders_with_several_values_sets(cluster: Any) -> None:
    default = render(cluster)
    assert kinds(default) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "ServiceAccount",
    ]
    # The operator's own policy admits nothing (its probes come from the node).
    policy = next(d for d in default if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"] == [] and policy["spec"]["policyTypes"] == ["Ingress"]
    crd = next(d for d in default if d["kind"] == "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployment = next(d for d in default if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubeforge", "operator"]
    assert "--all-namespaces" in container["args"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    assert "CustomResourceDefinition" not in kinds(render(cluster, "crds.create=false"))
    bare = render(
        cluster, "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=mine"
    )
    assert kinds(bare) == ["CustomResourceDefinition", "Deployment", "NetworkPolicy"]
    # Network policies and TLS for Services that do not say: the operator's flags.
    flags = render(cluster, "networkPolicy.enabled=false", "tls.enabled=false")
    assert "NetworkPolicy" not in kinds(flags)
    args = next(d for d in flags if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--no-network-policy" in args and "--no-tls" in args
    spec = next(d for d in bare if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "mine"
    scoped = render(cluster, "operator.namespaces={team-a,team-b}", "image.tag=v9")
    c = next(d for d in scoped if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert c["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    assert c["image"] == "kubeforge:v9"
    # Named namespaces: a Role and RoleBinding in each, nothing cluster-wide.
    assert kinds(scoped) == sorted(
        ["CustomResourceDefinition", "Deployment", "NetworkPolicy", "ServiceAccount"]
        + ["Role", "RoleBinding"] * 2
    )
    roles = {d["metadata"]["namespace"]: d for d in scoped if d["kind"] == "Role"}
    assert sorted(roles) == ["team-a", "team-b"]
    assert roles["team-a"]["rules"] == NAMESPACE_RULES
    assert not any("apiextensions.k8s.io" in r["apiGroups"] for r in roles["team-a"]["rules"])
    binding = next(d for d in scoped if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kf-operator", "namespace": "kf-system"}
    ]
    rules = next(d for d in default if d["kind"] == "ClusterRole")["rules"]
    shipped = yaml.safe_load_all((REPO / "deploy" / "operator-rbac.yaml").read_text())
    assert rules == next(d for d in shipped if d["kind"] == "ClusterRole")["rules"]


def test_monitoring_objects_render_only_when_asked(cluster: Any) -> None:
    assert not [k for k in kinds(render(cluster)) if "Monitor" in k or k == "ConfigMap"]
    docs = render(
        cluster,
        "monitoring.podMonitor.enabled=true",
        "monitoring.podMonitor.labels.release=prom",
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.dashboard.enabled=true",
        "operator.namespaces={ml,rl}",
    )
    by_kind = {d["kind"]: d for d in docs}
    pods = by_kind["PodMonitor"]
    assert pods["metadata"]["labels"]["release"] == "prom"
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["ml", "rl"]}
    expr = pods["spec"]["selector"]["matchExpressions"][0]
    assert expr["key"] == "kubeforge.dev/component" and set(expr["values"]) == {"router", "replica"}
    targets = {r["targetLabel"] for r in pods["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert "kubeforge_service" in targets
    assert by_kind["ServiceMonitor"]["spec"]["selector"]["matchLabels"] == {
        "kubeforge.dev/component": "router"
    }
    board = by_kind["ConfigMap"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["kubeforge-service.json"]) == dashboard()


def test_values_schema_rejects_bad_values(cluster: Any) -> None:
    out = helm(
        cluster, "template", "kf", str(CHART), "--set", "image.pullPolicy=Sometimes", check=False
    )
    assert out.returncode != 0 and "pullPolicy" in out.stderr
    out = helm(cluster, "template", "kf", str(CHART), "--set", "operatr.logLevel=INFO", check=False)
    assert out.returncode != 0 and "operatr" in out.stderr


RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def adopt_crd(cluster: Any, release: str, namespace: str) -> None:
    """A CRD applied before the chart (`kubectl apply -f crds/`, as other tests and many users
    do) joins the release the way Helm adopts an existing object: its ownership metadata."""
    if cluster.kubectl("get", "crd", CRD_NAME, check=False).returncode:
        return
    cluster.kubectl("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite")
    cluster.kubectl(
        "annotate",
        "crd",
        CRD_NAME,
        f"meta.helm.sh/release-name={release}",
        f"meta.helm.sh/release-namespace={namespace}",
        "--overwrite",
    )


def apply_counter(cluster: Any, namespace: str, name: str, replicas: int) -> None:
    doc = {
        "apiVersion": "kubeforge.dev/v1alpha1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "actor": "examples.counter:Counter"},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


# Installs a release of its own: on kind, its operator would fight the lane's (test_real_node.py
# checks the lane's release in a `restricted` namespace instead).
@pytest.mark.process_node
def test_helm_install_runs_the_operator_and_uninstall_cleans_up(
    cluster: Any, namespace: str
) -> None:
    """In namespaces that enforce the `restricted` Pod Security Standard: the operator's, and
    the Service's, whose replica and router pods must be admitted too."""
    if cluster.kubectl("get", "namespace", "kf-system", check=False).returncode != 0:
        cluster.kubectl("create", "namespace", "kf-system")
    for ns in ("kf-system", namespace):
        cluster.kubectl("label", "namespace", ns, RESTRICTED, "--overwrite")
    adopt_crd(cluster, "kf", "kf-system")
    helm(
        cluster,
        "install",
        "kf",
        str(CHART),
        "-n",
        "kf-system",
        "--wait",
        "--timeout",
        "120s",
    )
    try:
        pods = json.loads(cluster.kubectl("get", "pods", "-n", "kf-system", "-o", "json").stdout)[
            "items"
        ]
        assert [p["status"]["phase"] for p in pods] == ["Running"]
        apply_counter(cluster, namespace, "viahelm", 2)

        def ready() -> bool:
            """the Service reconciled by the chart's operator is Ready"""
            body = json.loads(
                cluster.kubectl("get", "fsvc", "viahelm", "-n", namespace, "-o", "json").stdout
            )
            return body.get("status", {}).get("readyReplicas") == 2

        wait_for(ready, 90)
        cluster.kubectl(
            "wait",
            "-n",
            namespace,
            "--for=condition=Available",
            "deployment/viahelm-router",
            "--timeout=90s",
        )
        cluster.kubectl("delete", "fsvc", "viahelm", "-n", namespace)
    finally:
        helm(cluster, "uninstall", "kf", "-n", "kf-system", "--wait", "--timeout", "120s")

    def nothing_left() -> bool:
        """no operator Deployment, ServiceAccount or pod is left"""
        left = cluster.kubectl(
            "get",
            "deployments,serviceaccounts,pods",
            "-n",
            "kf-system",
            "-l",
            "app.kubernetes.io/instance=kf",
            "-o",
            "name",
        ).stdout
        return left.strip() == ""

    wait_for(nothing_left, 60)  # pods go by garbage collection after the Deployment
    cluster_scoped = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout
    assert "kf-operator" not in cluster_scoped
    # The CRD stays, as documented: deleting it would delete every Service in the cluster.
    assert cluster.kubectl("get", "crd", "services.kubeforge.dev", check=False).returncode == 0


@pytest.mark.process_node
def test_a_namespaced_install_reconciles_its_namespace_and_has_no_access_elsewhere(
    cluster: Any, namespace: str
) -> None:
    """`operator.namespaces` installs the operator for one namespace with a Role there: it
    reconciles a Service in that namespace, leaves one elsewhere alone, and its account may do
    nothing outside the namespace (the API server says so, not the chart)."""
    release, system, other = "kfns", "kfns-system", f"{namespace}-other"
    crd = REPO / "crds" / f"{CRD_NAME}.yaml"  # the cluster's admin installs it (crds.create=false)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    for ns in (system, other):
        if cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
            cluster.kubectl("create", "namespace", ns)
    helm(
        cluster,
        "install",
        release,
        str(CHART),
        "-n",
        system,
        "--set",
        f"operator.namespaces={{{namespace}}}",
        "--set",
        "crds.create=false",
        "--wait",
        "--timeout",
        "120s",
    )
    account = f"system:serviceaccount:{system}:{release}-operator"
    try:
        for ns in (namespace, other):
            apply_counter(cluster, ns, "scoped", 1)

        def status(ns: str) -> dict[str, Any]:
            out = cluster.kubectl("get", "fsvc", "scoped", "-n", ns, "-o", "json").stdout
            return json.loads(out).get("status", {})

        wait_for(lambda: status(namespace).get("readyReplicas") == 1, 90)
        # By now the other namespace's Service would long have had pods and a status.
        assert status(other) == {}
        pods = cluster.kubectl("get", "pods", "-n", other, "-o", "name").stdout
        assert pods.strip() == ""

        def can(*argv: str) -> bool:
            done = cluster.kubectl("auth", "can-i", *argv, f"--as={account}", check=False)
            return done.stdout.strip() == "yes"

        assert can("create", "pods", "-n", namespace)
        assert can("patch", "services.kubeforge.dev", "-n", namespace)
        for argv in (
            ("create", "pods", "-n", other),
            ("list", "services.kubeforge.dev", "-n", other),
            ("list", "pods", "--all-namespaces"),
            ("list", "customresourcedefinitions"),
            ("create", "secrets", "-n", system),
            ("list", "nodes"),
        ):
            assert not can(*argv), f"{account} may {' '.join(argv)}"
        cluster_scoped = cluster.kubectl(
            "get", "clusterroles,clusterrolebindings", "-o", "name"
        ).stdout
        assert f"{release}-operator" not in cluster_scoped
        pod = cluster.kubectl(
            "get", "pods", "-n", system, "-l", "app.kubernetes.io/component=operator", "-o", "name"
        ).stdout.split()[0]
        logs = cluster.pod_log(system, pod.removeprefix("pod/"))
        assert "forbidden" not in logs.lower(), logs[-3000:]  # nothing it tried was refused
    finally:
        for ns in (namespace, other):  # the operator removes its finalizer before it goes
            cluster.kubectl("delete", "fsvc", "scoped", "-n", ns, "--timeout=60s", check=False)
        helm(cluster, "uninstall", release, "-n", system, "--wait", "--timeout", "120s")
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
