"""The e2e tier's cluster: a real control plane with a process node, started once per run.

With KUBEFORGE_E2E_KUBECONFIG set, the same tests run against that cluster instead (a kind
cluster from tests/e2e/kind/run.sh, say). A control plane that cannot start is an error,
never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import Cluster
from devcluster.controlplane import run_kubectl, write_kubeconfig
from kubeforge.crd import CRD_NAME

REPO = Path(__file__).resolve().parents[2]


class ExternalCluster:
    """A cluster someone else runs: kubectl and a kubeconfig; on kind, also the node's name
    (KUBEFORGE_E2E_NODE) and the docker client (KUBEFORGE_REAL_DOCKER) to reach into it."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_bin = shutil.which("kubectl") or "kubectl"

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_kubectl(self.kubectl_bin, self.kubeconfig, *args, check=check, input=input)

    def pod_log(self, namespace: str, pod: str) -> str:
        return self.kubectl("logs", "-n", namespace, pod, "--all-containers", check=False).stdout

    def kill_container(self, namespace: str, pod: str, container: str) -> float:
        """SIGKILL the container's main process on the node, as the OOM killer would. Returns
        when it was killed (time.time(): the node shares this machine's clock), which is later
        than the call by however long docker exec and crictl took."""
        node = os.environ.get("KUBEFORGE_E2E_NODE")
        if not node:
            pytest.fail("killing a container needs the kind node's name in KUBEFORGE_E2E_NODE")
        script = (
            f"id=$(crictl ps -q --label io.kubernetes.pod.namespace={namespace} "
            f"--label io.kubernetes.pod.name={pod} "
            f"--label io.kubernetes.container.name={container}); "
            "pid=$(crictl inspect --output go-template --template '{{.info.pid}}' $id); "
            "date +%s.%N; kill -9 $pid"
        )
        docker = os.environ.get("KUBEFORGE_REAL_DOCKER", "docker")
        done = subprocess.run(
            [docker, "exec", node, "sh", "-c", script],
            check=True,
            timeout=30,
            capture_output=True,
            text=True,
        )
        return float(done.stdout.split()[-1])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `after_all` (the RBAC audit) run after every other test of the tier."""
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster | ExternalCluster]:
    external = os.environ.get("KUBEFORGE_E2E_KUBECONFIG")
    if external:
        yield ExternalCluster(Path(external))
        return
    c = Cluster()
    c.start(progress=lambda m: print(f"[e2e] {m}", flush=True))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(cluster: Cluster | ExternalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))
    name = f"e2e-{base[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller manager has made the namespace's default
    # ServiceAccount (admission looks it up): on a busy machine that takes a while.
    deadline = time.monotonic() + 60
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        assert time.monotonic() < deadline, f"namespace {name} got no default ServiceAccount"
        time.sleep(0.2)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Operator:
    """The operator as a process of this machine, running as its service account."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig, self.log = kubeconfig, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubeforge.cli", "operator", "-A"],
                cwd=REPO,
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ChartOperator(Operator):
    """The operator that the kind lane installed with the chart: a Deployment's pod."""

    def __init__(self, cluster: ExternalCluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.selector = "app.kubernetes.io/component=operator"
        self.killed: list[str] = []

    def _pods(self) -> list[str]:
        out = self.cluster.kubectl(
            "get", "pods", "-n", self.namespace, "-l", self.selector, "-o", "name"
        ).stdout
        return out.split()

    def start(self) -> None:
        """The Deployment starts a new pod by itself; wait until it runs."""
        self.cluster.kubectl(
            "rollout", "status", "deployment", "-n", self.namespace, "-l", self.selector,
            "--timeout=120s",
        )  # fmt: skip

    def kill9(self) -> None:
        """SIGKILL, as the kubelet does past the grace period: delete the pod with none."""
        pods = self._pods()
        self.killed += pods
        self.cluster.kubectl(
            "delete", "-n", self.namespace, *pods, "--grace-period=0", "--force", "--wait=false"
        )

    def stop(self) -> None:
        pass

    def output(self) -> str:
        return "\n".join(
            self.cluster.kubectl("logs", "-n", self.namespace, pod, check=False).stdout
            for pod in self._pods()
        )


_REFUSAL = re.compile(
    r'User "([^"]+)" cannot (\w+) resource "([^"]+)" in API group "([^"]*)"'
    r'(?: in the namespace "([^"]+)")?'
)


def _granted(cluster: Any, line: str) -> bool:
    """Whether the RBAC refused in `line` is granted after all (`kubectl auth can-i`, as that
    user). Then the refusal was the API server's, not a missing rule: right after the tests
    restart etcd or the API server, its RBAC authorizer answers from caches that are not
    synced yet and refuses requests its rules allow, for a moment."""
    m = _REFUSAL.search(re.sub(r'\\+"', '"', line))  # quotes escaped once or twice, too
    if m is None:
        return False
    user, verb, resource, group, namespace = m.groups()
    resource, _, sub = resource.partition("/")
    what = f"{resource}.{group}" if group else resource
    argv = ["auth", "can-i", verb, what, "--as", user]
    argv += ["-n", namespace] if namespace else ["--all-namespaces"]
    if sub:
        argv += ["--subresource", sub]
    return cluster.kubectl(*argv, check=False).stdout.strip() == "yes"


def wait_gpus_free(cluster: Any) -> None:
    """Until no pod of an earlier test holds a GPU (they may still be terminating)."""
    from tests.e2e.test_cluster import wait_for

    def gpus_free() -> bool:
        pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
        return not any("nvidia.com/gpu" in json.dumps(p["spec"]) for p in pods)

    wait_for(gpus_free, 90)


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """An operator for the module's tests: on the process-node cluster a process of this
    machine, on kind the chart's. Fails the module if its RBAC was ever refused."""

    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / f"{CRD_NAME}.yaml")
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    wait_gpus_free(cluster)
    op: Operator
    if isinstance(cluster, ExternalCluster):
        installed = os.environ.get("KUBEFORGE_E2E_OPERATOR")
        if not installed:
            pytest.fail("on an external cluster, install the chart and set KUBEFORGE_E2E_OPERATOR")
        op = ChartOperator(cluster, installed)
    else:
        # The operator runs as its service account, with exactly the RBAC it ships with.
        cluster.kubectl("apply", "-f", str(REPO / "deploy" / "operator-rbac.yaml"))
        token = cluster.kubectl(
            "create", "token", "kubeforge-operator", "-n", "kubeforge-system", "--duration=2h"
        ).stdout.strip()
        workdir = tmp_path_factory.mktemp("operator")
        kubeconfig = write_kubeconfig(
            workdir / "kubeconfig",
            cluster.control.server,
            cluster.control.pki.ca,
            "system:serviceaccount:kubeforge-system:kubeforge-operator",
            token=token,
        )
        op = Operator(kubeconfig, workdir / "operator.log")
    op.start()
    try:
        yield op
    finally:
        # RBAC's refusals say who may not do what; other 403s (an admission plugin that could
        # not find a namespace's default ServiceAccount just after an etcd restart) are not
        # about the operator's rules.
        forbidden = [line for line in op.output().splitlines() if "forbidden: User" in line]
        op.stop()
        missing = [line for line in forbidden if not _granted(cluster, line)]
        assert not missing, f"the operator's RBAC is missing something: {missing[:3]}"
