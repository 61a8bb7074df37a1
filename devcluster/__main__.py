"""`python -m devcluster up|down|serve`: a local control plane for humans (make cluster-up)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from devcluster.cluster import Cluster

DEFAULT_DIR = Path(os.environ.get("KUBEFORGE_CLUSTER_DIR", "/tmp/kubeforge-cluster"))


def serve(root: Path, gpus: int) -> int:
    """Run the cluster in the foreground until SIGTERM/SIGINT."""
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root / "state", gpus=gpus)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        cluster.start(progress=lambda m: print(m, flush=True))
        (root / "ready").write_text(str(cluster.kubeconfig))
        stop.wait()
    finally:
        cluster.stop()
        shutil.rmtree(root / "state", ignore_errors=True)
        (root / "ready").unlink(missing_ok=True)
    return 0


def up(root: Path, gpus: int) -> int:
    if (root / "pid").exists():
        print(f"a cluster already runs from {root}; `make cluster-down` first", file=sys.stderr)
        return 1
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "cluster.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devcluster", "serve", "--dir", str(root), "--gpus", str(gpus)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    (root / "pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 180
    shown = 0
    while not (root / "ready").exists():
        lines = (root / "cluster.log").read_text(errors="replace").splitlines()
        for line in lines[shown:]:
            print(line, flush=True)
        shown = len(lines)
        if proc.poll() is not None or time.monotonic() > deadline:
            print("the cluster did not come up; see the lines above", file=sys.stderr)
            down(root)
            return 1
        time.sleep(0.5)
    print(f"export KUBECONFIG={(root / 'ready').read_text()}")
    return 0


def down(root: Path) -> int:
    pid_file = root / "pid"
    if not pid_file.exists():
        print(f"no cluster runs from {root}")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(600):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(root, ignore_errors=True)
    print("cluster stopped")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m devcluster")
    p.add_argument("command", choices=["up", "down", "serve"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu the node advertises")
    ns = p.parse_args()
    if ns.command == "serve":
        return serve(ns.dir, ns.gpus)
    if ns.command == "up":
        return up(ns.dir, ns.gpus)
    return down(ns.dir)


if __name__ == "__main__":
    sys.exit(main())
