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
    """A cluster someone else runs: only kubectl and a kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_bin = shutil.which("kubectl") or "kubectl"

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_kubectl(self.kubectl_bin, self.kubeconfig, *args, check=check, input=input)


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
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


class Operator:
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


@pytest.fixture(scope="module")
def operator(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator as a process of this machine, for the module's tests."""
    from tests.e2e.test_cluster import wait_for

    if not hasattr(cluster, "control"):
        pytest.fail("on an external cluster, install the chart instead of running the operator")
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / f"{CRD_NAME}.yaml")
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    def gpus_free() -> bool:
        """no pod of an earlier test holds a GPU"""
        pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
        return not any("nvidia.com/gpu" in json.dumps(p["spec"]) for p in pods)

    wait_for(gpus_free, 60)
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
        op.stop()
        forbidden = [
            line for line in op.log.read_text().splitlines() if "Forbidden" in line or "403" in line
        ]
        assert not forbidden, f"the operator's RBAC is missing something: {forbidden[:3]}"
