"""The e2e tier's cluster: a real control plane with a process node, started once per run.

With KUBEFORGE_E2E_KUBECONFIG set, the same tests run against that cluster instead (a kind
cluster from tests/e2e/kind/run.sh, say). A control plane that cannot start is an error,
never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import Cluster
from devcluster.controlplane import run_kubectl


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
