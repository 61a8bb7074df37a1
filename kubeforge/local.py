"""Replicas (and a router) as local child processes: the embedded default, no cluster needed.

It starts exactly the processes a cluster would run (`python -m kubeforge.replica`,
`python -m kubeforge.router`) on loopback, so what works here works in pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubeforge import spawn_guard, values
from kubeforge.contract import READYZ
from kubeforge.errors import UnguardedMainError
from kubeforge.settings import DEFAULTS


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: all are held open together, so the kernel cannot hand
    out one twice (ports taken one at a time may repeat before any child binds them)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + READYZ, timeout=0.5) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _python_path() -> str:
    """The parent's import path for the children, as multiprocessing's spawn passes it on."""
    entries = [os.getcwd(), *(p for p in sys.path if p and os.path.isdir(p))]
    return os.pathsep.join(dict.fromkeys(entries))


def _actor_script(args: Any) -> str | None:
    """The script in a replica's `--actor /path/script.py:Class` argument, if it has one."""
    argv = list(args) if isinstance(args, list | tuple) else []
    if "--actor" not in argv[:-1]:
        return None
    return spawn_guard.script_of_actor(str(argv[argv.index("--actor") + 1]))


@dataclass
class Processes:
    """Child processes started in order and stopped together, with their names for errors."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)

    def spawn(self, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `python argv`; the one place kubeforge starts processes, so guarded here."""
        spawn_guard.check_can_spawn(name)
        # The marker makes the child refuse to start kubeforge processes of its own.
        marker = {spawn_guard.SPAWNED_BY_ENV: str(os.getpid())}
        # Own process group: a Ctrl-C reaches the parent only, which then stops the children
        # in order (replicas drain) instead of all of them dying at once.
        proc = subprocess.Popen(
            [sys.executable, *argv], env={**os.environ, **env, **marker}, process_group=0
        )
        self.children.append(proc)
        self.names[proc.pid] = name
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.children]

    def check_alive(self) -> None:
        exited = [proc for proc in self.children if proc.poll() is not None]
        # A replica whose script starts a Service at import exits quietly with a dedicated code
        # and leaves the explanation to us: raised here once, not once per replica.
        for proc in exited:
            if proc.returncode == spawn_guard.EXIT_UNGUARDED_MAIN:
                script = _actor_script(proc.args) or "the actor's script"
                raise UnguardedMainError(
                    f"{self.names[proc.pid]} refused to start: "
                    + spawn_guard.unguarded_main_message(script)
                )
        if exited:
            raise RuntimeError(
                f"{self.names[exited[0].pid]} exited with code {exited[0].returncode} while "
                "starting; see its output above"
            )

    def wait_ready(
        self, urls: list[str], deadline: float, what: str, progress: Callable[[str], None]
    ) -> None:
        ready: set[str] = set()
        while len(ready) < len(urls):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(urls) - len(ready)} of {len(urls)} {what} not ready "
                    "before the start-up timeout"
                )
            for url in urls:
                if url not in ready and is_ready(url):
                    ready.add(url)
                    progress(f"{what} {len(ready)}/{len(urls)} ready ({url})")
            time.sleep(0.05)

    def stop(self, grace: float) -> None:
        """SIGTERM all (newest first), wait up to `grace` in all, SIGKILL what is left."""
        for proc in reversed(self.children):
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


@dataclass
class ReplicaSet:
    """N replica processes of one actor on loopback, each with its own GPUs if any."""

    actor: str
    replicas: int
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    flags: list[str] = field(default_factory=list)
    gpus: list[list[str]] | None = None  # per replica, from kubeforge.gpus.assign
    ranks: int = 1  # processes per replica (flags carry --procs); each replica gets its ports
    name: str = "replica"  # the processes are `<name>-<i>` in logs and errors
    env: dict[str, str] = field(default_factory=dict)
    procs: Processes = field(default_factory=Processes)
    urls: list[str] = field(default_factory=list)
    _init_dir: str | None = None

    def _init_flags(self) -> list[str]:
        """Constructor arguments as flags: JSON when JSON carries them exactly, else kubeforge's
        binary format (tensors, tuples, dataclasses, functions by import path) in a file only
        this user can read, removed by `stop`."""
        exact = False
        with contextlib.suppress(TypeError, ValueError):
            exact = json.loads(json.dumps([self.args, self.kwargs])) == [self.args, self.kwargs]
        if exact:
            return ["--args", json.dumps(self.args), "--kwargs", json.dumps(self.kwargs)]
        encoded = values.encode({"args": list(self.args), "kwargs": self.kwargs}, trusted=True)
        self._init_dir = tempfile.mkdtemp(prefix="kubeforge-init-")
        path = os.path.join(self._init_dir, "init.kfb")
        with open(path, "wb") as f:
            f.writelines(encoded.parts)
        return ["--init-file", path]

    def start(self, deadline: float, progress: Callable[[str], None] = print) -> list[str]:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        init = self._init_flags()
        per_replica = 3 if self.ranks > 1 else 1  # HTTP, and for ranks master and gang
        ports = iter(free_ports(self.replicas * per_replica, self.host))
        for i in range(self.replicas):
            port = next(ports)
            self.urls.append(f"http://{self.host}:{port}")
            env = {
                **self.env,
                "KUBEFORGE_REPLICA_NAME": f"{self.name}-{i}",
                "PYTHONPATH": _python_path(),
            }
            if self.gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[i])
            argv = [
                "-m",
                "kubeforge.replica",
                "--actor",
                self.actor,
                *init,
                "--host",
                self.host,
                "--port",
                str(port),
                *self.flags,
            ]
            if self.ranks > 1:  # one rendezvous per replica, on ports of its own
                argv += ["--master-port", str(next(ports)), "--gang-port", str(next(ports))]
            self.procs.spawn(argv, f"{self.name}-{i}", env)
        self.procs.wait_ready(self.urls, deadline, "replica", progress)
        return self.urls

    def stop(self, grace: float) -> None:
        self.procs.stop(grace)
        if self._init_dir is not None:
            shutil.rmtree(self._init_dir, ignore_errors=True)
            self._init_dir = None


@dataclass
class LocalDeployment:
    """A ReplicaSet behind a router process: what `kubeforge run` serves."""

    replica_set: ReplicaSet
    port: int = 8080
    router_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    router: Processes = field(default_factory=Processes)

    @property
    def url(self) -> str:
        return f"http://{self.replica_set.host}:{self.port}"

    def start(
        self, timeout: float = DEFAULTS.startup_timeout, progress: Callable[[str], None] = print
    ) -> str:
        deadline = time.monotonic() + timeout
        urls = self.replica_set.start(deadline, progress)
        argv = [
            "-m",
            "kubeforge.router",
            "--host",
            self.replica_set.host,
            "--port",
            str(self.port),
            *self.router_flags,
        ]
        for url in urls:
            argv += ["--replica", url]
        self.router.spawn(argv, "router", self.env)
        self.router.wait_ready([self.url], deadline, "router", progress)
        return self.url

    @property
    def pids(self) -> list[int]:
        return self.replica_set.procs.pids + self.router.pids

    def stop(self, grace: float = 10.0) -> None:
        """The router first, so no new call reaches a draining replica; then the replicas."""
        started = time.monotonic()
        self.router.stop(grace)
        self.replica_set.stop(max(0.0, grace - (time.monotonic() - started)))
