"""How the operator scales, on the e2e control plane (a real API server; pods run as processes).

For each count of Services (default 1 and 10; `--services 1,10,100`), each with 2 replicas:
- apply to Ready: seconds from `kubectl apply` of all of them to every one Ready;
- idle API requests per minute: the API server's own `apiserver_request_total` over a quiet
  window with the operator running and one with it stopped (routers, node and controllers keep
  running in both), watches excluded; in all, and of the kinds the operator makes;
- the operator's RSS and its CPU per minute while idle;
and once: seconds from a replica pod's deletion to its replacement being created, and Ready.
Prints each figure and a RESULT line. Usage: `.venv/bin/python bench/operator_scale.py`; for 100
Services (300 pods as processes, about 14 GB): `--services 100 --settle 120`, since on two cores
the first minute after Ready is not idle yet (pods' readiness and routers' first status writes).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import add_json_arg, emit  # noqa: E402

from devcluster.cluster import Cluster  # noqa: E402

# What the operator asks of the API server (reads and writes of Services, their pods and
# children, Events): counted apart from what controllers and the node do meanwhile, which the
# on/off difference alone leaves noisy (controller retries, event count updates).
OPERATOR_RESOURCES = {
    "pods",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "deployments",
    "services",
    "secrets",
}


def request_counts(cluster: Cluster) -> collections.Counter[str]:
    """Requests answered so far by "resource verb", watches excluded."""
    counts: collections.Counter[str] = collections.Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{") or 'verb="WATCH"' in line:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        kind = labels.get("resource", "") + (
            f"/{labels['subresource']}" if labels.get("subresource") else ""
        )
        counts[f"{kind} {labels.get('verb')}"] += float(line.rsplit(" ", 1)[1])
    return counts


def operators_kind(key: str) -> bool:
    resource, verb = key.split(" ")
    return resource.split("/")[0] in OPERATOR_RESOURCES or (resource == "events" and verb == "POST")


def per_minute(cluster: Cluster, window: float) -> collections.Counter[str]:
    """Requests per minute by "resource verb" over a quiet `window`."""
    before = request_counts(cluster)
    time.sleep(window)
    after = request_counts(cluster)
    after["nonResourceURL GET"] -= 1  # the metrics scrape itself
    return collections.Counter(
        {k: (after[k] - before[k]) * 60 / window for k in after if after[k] != before[k]}
    )


def proc_stat(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds so far) of a process."""
    rss = next(
        int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubeforge.dev/v1alpha1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": 2, "actor": "examples.echo:Echo", "drainGrace": "2s"},
        }
    )


def all_ready(cluster: Cluster, names: set[str]) -> bool:
    items = json.loads(cluster.kubectl("get", "fsvc", "-o", "json").stdout)["items"]
    ready = {i["metadata"]["name"] for i in items if i.get("status", {}).get("readyReplicas") == 2}
    return names <= ready


def start_operator(cluster: Cluster, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubeforge.cli", "operator", "-A"],
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def replacement(cluster: Cluster, pod: str) -> tuple[float, float]:
    """Seconds from deleting `pod` to its replacement existing, and to it being Ready."""
    old = json.loads(cluster.kubectl("get", "pod", pod, "-o", "json").stdout)["metadata"]["uid"]
    started = time.monotonic()
    cluster.kubectl("delete", "pod", pod, "--wait=false")
    created = None
    while time.monotonic() - started < 60:
        out = cluster.kubectl("get", "pod", pod, "-o", "json", check=False).stdout
        body = json.loads(out) if out else {}
        if body and body["metadata"]["uid"] != old:
            created = created or time.monotonic() - started
            conditions = body["status"].get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return created, time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"{pod} was not replaced within 60 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", default="1,10", help="comma-separated counts of Services")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per idle measurement")
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait after Ready before measuring idle (routers' first status writes)",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    counts = [int(c) for c in args.services.split(",")]
    # 100 Services are 300 pods (2 replicas and a router each): more than a node's usual 110.
    cluster = Cluster(gpus=0, max_pods=400)
    cluster.start(progress=lambda m: print(m, flush=True))
    workdir = Path(tempfile.mkdtemp(prefix="kubeforge-bench-"))  # removed on the way out
    log = workdir / "operator.log"
    op: subprocess.Popen[bytes] | None = None
    results: dict[str, object] = {}
    try:
        cluster.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds" / "services.kubeforge.dev.yaml")
        )
        cluster.kubectl("wait", "--for=condition=Established", "crd/services.kubeforge.dev")
        op = start_operator(cluster, log)
        applied: set[str] = set()
        for count in counts:
            names = {f"svc-{i}" for i in range(count)}
            started = time.monotonic()
            for name in sorted(names - applied):
                cluster.kubectl("apply", "-f", "-", input=service(name))
            applied |= names
            while not all_ready(cluster, names):
                if time.monotonic() - started > 600:
                    raise TimeoutError(f"{count} Services not Ready in 600 s")
                time.sleep(0.5)
            ready_s = time.monotonic() - started
            time.sleep(args.settle)  # routers' first status writes, pods settled
            _, cpu0 = proc_stat(op.pid)
            with_operator = per_minute(cluster, args.window)
            rss, cpu1 = proc_stat(op.pid)
            op.terminate()
            op.wait(15)
            without = per_minute(cluster, args.window)
            op = start_operator(cluster, log)
            time.sleep(5)  # it lists everything again before the next measurement
            figures = {
                "apply_to_ready_s": round(ready_s, 1),
                "operator_kind_requests_per_min": round(
                    sum(v for k, v in with_operator.items() if operators_kind(k))
                    - sum(v for k, v in without.items() if operators_kind(k)),
                    1,
                ),
                "cluster_requests_per_min": {
                    "with": round(sum(with_operator.values())),
                    "without": round(sum(without.values())),
                },
                # Where the two differ most ("resource verb": with - without), to read the
                # difference instead of guessing at it.
                "largest_differences": dict(
                    (k, round(v, 1)) for k, v in (with_operator - without).most_common(5)
                ),
                "operator_rss_mib": round(rss, 1),
                "operator_idle_cpu_s_per_min": round((cpu1 - cpu0) * 60 / args.window, 2),
            }
            results[str(count)] = figures
            print(f"{count} Services x 2 replicas: {figures}", flush=True)
        created, ready = replacement(cluster, "svc-0-replica-1")
        results["replacement"] = {"created_s": round(created, 2), "ready_s": round(ready, 2)}
        print(
            f"deleted replica pod: replacement created after {created:.2f} s, Ready {ready:.2f} s"
        )
        emit(results, args.json)
    finally:
        if op is not None:
            op.terminate()
            op.wait(15)
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
