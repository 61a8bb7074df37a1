"""Real replica and router processes on loopback, started and reaped by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kubeforge.local import LocalDeployment, ReplicaSet, free_port

REPO = Path(__file__).resolve().parents[2]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(5)

    def term(self) -> None:
        self.popen.send_signal(signal.SIGTERM)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text()


@dataclass
class Procs:
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    def _spawn(self, args: list[str], port: int, name: str, env: dict[str, str] | None) -> Proc:
        log = self.tmp / f"{name}-{port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        popen = subprocess.Popen(
            [sys.executable, *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=full_env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(popen, f"http://127.0.0.1:{port}", port, log)
        self.started.append(proc)
        return proc

    def replica(
        self,
        actor: str,
        *flags: str,
        name: str = "",
        port: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        port = port or free_port()
        extra = {"KUBEFORGE_REPLICA_NAME": name} if name else {}
        proc = self._spawn(
            ["-m", "kubeforge.replica", "--actor", actor, *flags],
            port,
            "replica",
            {**extra, **(env or {})},
        )
        if wait:
            self.wait_ready(proc)
        return proc

    def replicas(self, actor: str, n: int, *flags: str, **kw: object) -> list[Proc]:
        procs = [
            self.replica(actor, *flags, name=f"r{i}", wait=False, **kw)  # type: ignore[arg-type]
            for i in range(n)
        ]
        for p in procs:
            self.wait_ready(p)
        return procs

    def router(
        self,
        replicas: list[Proc],
        *flags: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        port = port or free_port()
        args = ["-m", "kubeforge.router"]
        for r in replicas:
            args += ["--replica", r.url]
        proc = self._spawn([*args, *flags], port, "router", env)
        self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"process exited early:\n{proc.log_text()}")
            try:
                status, _ = http_get(proc.url + "/readyz", timeout=0.5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{proc.url} not ready in {timeout}s:\n{proc.log_text()}")

    def cleanup(self) -> None:
        for p in self.started:
            if p.alive():
                os.killpg(p.pid, signal.SIGKILL)
                p.popen.wait(5)


def descendants(pid: int) -> set[int]:
    """PIDs of every living process below `pid`, read from /proc."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces; ppid is the 2nd field after the last ')'.
            state_ppid = stat.rsplit(")", 1)[1].split()
            if state_ppid[0] != "Z":
                parent_of[int(entry.name)] = int(state_ppid[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent_of.items() if p in frontier} - found
        found |= frontier
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def deployed(actor: str, replicas: int, *flags: str) -> Iterator[LocalDeployment]:
    """`kubeforge run`'s deployment of `actor`: replica processes behind a router process,
    stopped (every process reaped) on the way out."""
    # An SPMD replica gets rendezvous ports of its own (ranks > 1), not torch's default 29500,
    # which any other SPMD process on the machine may hold.
    ranks = int(flags[flags.index("--procs") + 1]) if "--procs" in flags else 1
    dep = LocalDeployment(
        ReplicaSet(actor=actor, replicas=replicas, flags=list(flags), ranks=ranks),
        port=free_port(),
    )
    dep.start(progress=lambda _m: None)
    try:
        yield dep
    finally:
        dep.stop()
