"""The control plane plus one process node, as one object tests and humans start and stop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devcluster.controlplane import ControlPlane
from devcluster.node import ProcessNode


class Cluster:
    """`start()` blocks until the API server, controllers, scheduler and node are up; the
    node runs on its own event loop in a thread so sync and async callers can both use it."""

    def __init__(self, root: Path | None = None, gpus: int = 4, max_pods: int = 110) -> None:
        self.control = ControlPlane(root)
        self.gpus = gpus
        self.max_pods = max_pods
        self.node: ProcessNode | None = None
        self.extra_nodes: list[ProcessNode] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.control.kubeconfig

    @property
    def root(self) -> Path:
        return self.control.root

    def kubectl(self, *args: str, check: bool = True, input: str | None = None):
        return self.control.kubectl(*args, check=check, input=input)

    def kill_container(self, namespace: str, pod: str, container: str) -> float:
        """SIGKILL the container's process (the node restarts it, as a kubelet would).
        Returns when it was killed (time.time())."""
        status = json.loads(self.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)
        for c in status["status"].get("containerStatuses", []):
            if c["name"] == container:
                os.kill(int(c["containerID"].split("://")[1]), signal.SIGKILL)
                return time.time()
        raise LookupError(f"no running container {container} in pod {namespace}/{pod}")

    def pod_log(self, namespace: str, pod: str) -> str:
        """What a pod's containers printed (there is no kubelet API for `kubectl logs`)."""
        return "\n".join(
            path.read_text(errors="replace")
            for path in sorted(self.root.glob(f"pods*/{namespace}_{pod}_*/*.log"))
        )

    def start(self, progress: Callable[[str], None] = print) -> None:
        self.control.start(progress)
        try:
            self._start_node()
            progress(f"node {self.node.name} ready ({self.gpus} nvidia.com/gpu)")  # type: ignore[union-attr]
        except BaseException:
            self.stop()
            raise

    def _start_node(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.node = ProcessNode(
            self.control.kubeconfig,
            self.control.server,
            self.control.pki.ca,
            self.control.root / "pods",
            gpus=self.gpus,
            max_pods=self.max_pods,
            # Pod addresses: another prefix lets a second cluster run beside this one.
            ip_prefix=os.environ.get("KUBEFORGE_E2E_POD_PREFIX", "127.0.0."),
        )
        self._thread = threading.Thread(target=loop.run_forever, name="process-node", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.node.start(), loop).result(60)
        # Ready means schedulable: the scheduler has seen the node.
        self.control.kubectl(
            "wait", "--for=condition=Ready", f"node/{self.node.name}", "--timeout=60s"
        )

    def add_node(self, name: str, gpus: int, ip_prefix: str) -> ProcessNode:
        """A second process node on the same loop, its pods on their own addresses; stopped with
        the cluster (fault tests lose one with `run(node.freeze())`)."""
        assert self._loop is not None
        node = ProcessNode(
            self.control.kubeconfig,
            self.control.server,
            self.control.pki.ca,
            self.control.root / f"pods-{name}",
            name=name,
            gpus=gpus,
            ip_prefix=ip_prefix,
        )
        self.run(node.start())
        self.extra_nodes.append(node)
        self.control.kubectl("wait", "--for=condition=Ready", f"node/{name}", "--timeout=60s")
        return node

    def run(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the nodes' event loop, from any thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        for node in self.extra_nodes:
            try:
                self.run(node.stop())
            except Exception:
                logging.getLogger("devcluster").exception("stopping node %s failed", node.name)
        self.extra_nodes.clear()
        if self._loop is not None and self.node is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.node.stop(), self._loop).result(60)
            except Exception:
                logging.getLogger("devcluster").exception("stopping the node failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None
        self.control.stop()
