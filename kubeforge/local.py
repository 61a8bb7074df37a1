"""Replicas and a router as local child processes: the embedded default, no cluster needed.

It starts exactly the processes a cluster would run (`python -m kubeforge.replica`,
`python -m kubeforge.router`) on loopback, so what works here works in pods.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=0.5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class LocalDeployment:
    actor: str
    replicas: int
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8080
    replica_flags: list[str] = field(default_factory=list)
    router_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "KUBEFORGE_REPLICA_NAME": name}
        # Children get their own process group: a Ctrl-C reaches us only, and we stop them in
        # order (drain replicas, then the router) instead of all dying at once.
        proc = subprocess.Popen([sys.executable, *argv], env=env, start_new_session=True)
        self.children.append(proc)
        self.names[proc.pid] = name
        return proc

    def start(self, timeout: float = 120.0, progress: Callable[[str], None] = print) -> str:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        urls = []
        for i in range(self.replicas):
            port = free_port(self.host)
            urls.append(f"http://{self.host}:{port}")
            self._spawn(
                [
                    "-m",
                    "kubeforge.replica",
                    "--actor",
                    self.actor,
                    "--args",
                    json.dumps(self.args),
                    "--kwargs",
                    json.dumps(self.kwargs),
                    "--host",
                    self.host,
                    "--port",
                    str(port),
                    *self.replica_flags,
                ],
                f"replica-{i}",
            )
        deadline = time.monotonic() + timeout
        ready: set[str] = set()
        while len(ready) < len(urls):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(urls) - len(ready)} replicas not ready in {timeout:g}s")
            for url in urls:
                if url not in ready and is_ready(url):
                    ready.add(url)
                    progress(f"replica {len(ready)}/{len(urls)} ready ({url})")
            time.sleep(0.05)
        router_args = ["-m", "kubeforge.router", "--host", self.host, "--port", str(self.port)]
        for url in urls:
            router_args += ["--replica", url]
        self._spawn([*router_args, *self.router_flags], "router")
        while not is_ready(self.url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not ready in {timeout:g}s")
            time.sleep(0.05)
        progress(f"router ready at {self.url}")
        return self.url

    def _check_alive(self) -> None:
        for proc in self.children:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.names[proc.pid]} exited with code {proc.returncode}; "
                    "see its output above"
                )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM everything (replicas drain), wait up to `grace`, SIGKILL what is left."""
        for proc in reversed(self.children):  # the router first: no new calls reach replicas
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()
