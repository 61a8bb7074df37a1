"""The harness cleans up after itself: no process and no temp dir outlive a cluster."""

from __future__ import annotations

import pytest

from devcluster.cluster import Cluster
from tests.e2e.test_cluster import alive

pytestmark = [pytest.mark.timeout(180), pytest.mark.process_node]


def test_a_cluster_leaves_no_process_or_directory_behind() -> None:
    c = Cluster(gpus=2)
    c.start(progress=lambda _m: None)
    pids = [p.pid for p in c.control.procs.values()]
    root = c.root
    assert len(pids) == 4 and all(alive(p) for p in pids)
    out = c.kubectl("get", "node", "e2e-node", "-o", "jsonpath={.status.capacity.nvidia\\.com/gpu}")
    assert out.stdout == "2"
    c.stop()
    assert not [p for p in pids if alive(p)]
    assert not root.exists()
