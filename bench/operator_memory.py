"""The operator's resident memory with 1 and with 20 Services, and apply-to-Ready time.

Runs on the e2e control plane (devcluster: real API server, pods as local processes), with the
operator as its own process (admin kubeconfig). Prints the figures.
Usage: `.venv/bin/python bench/operator_memory.py [--services 20]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import add_json_arg, emit  # noqa: E402

from devcluster.cluster import Cluster  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubeforge.dev/v1alpha1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"replicas": 1, "actor": "examples.echo:Echo"},
        }
    )


def wait_ready(cluster: Cluster, names: list[str], timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        items = json.loads(cluster.kubectl("get", "fsvc", "-o", "json").stdout)["items"]
        ready = {
            i["metadata"]["name"] for i in items if i.get("status", {}).get("readyReplicas") == 1
        }
        if set(names) <= ready:
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"not all of {len(names)} Services became Ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=20, help="Services in the second point")
    add_json_arg(ap)
    args = ap.parse_args()
    many = args.services
    cluster = Cluster(gpus=0)
    cluster.start(progress=lambda m: print(m, flush=True))
    op = None
    try:
        cluster.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds" / "services.kubeforge.dev.yaml")
        )
        cluster.kubectl("wait", "--for=condition=Established", "crd/services.kubeforge.dev")
        op = subprocess.Popen(
            [sys.executable, "-m", "kubeforge.cli", "operator", "-A"],
            cwd=ROOT,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3)
        idle = rss_mib(op.pid)
        cluster.kubectl("apply", "-f", "-", input=service("svc-0"))
        first = wait_ready(cluster, ["svc-0"])
        time.sleep(3)
        one = rss_mib(op.pid)
        names = [f"svc-{i}" for i in range(many)]
        for name in names[1:]:
            cluster.kubectl("apply", "-f", "-", input=service(name))
        twenty_ready = wait_ready(cluster, names)
        time.sleep(5)
        twenty = rss_mib(op.pid)
        print(
            f"operator RSS: idle {idle:.1f} MiB, 1 Service {one:.1f} MiB, "
            f"{many} Services {twenty:.1f} MiB"
        )
        print(f"apply -> Ready: 1 Service {first:.1f}s; {many - 1} more {twenty_ready:.1f}s")
        emit(
            {
                "rss_mib": {"idle": idle, "1": one, str(many): twenty},
                "ready_s": {"1": first, str(many): twenty_ready},
            },
            args.json,
        )
    finally:
        if op is not None:
            op.terminate()
            op.wait(15)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
