"""A script that starts a Service without `if __name__ == "__main__":` must fail once, clearly.

Each replica imports the user's script to find the actor class (as multiprocessing's spawn
does). Without the guard, that import starts a Service again in every replica, whose replicas do
the same: a fork bomb. These tests run such scripts for real, so every run is contained:

- inside `unshare --pid --fork --kill-child --mount-proc`: the script lives in its own PID
  namespace, and SIGKILL to the unshare process ends every process in it at once;
- under a watchdog thread that samples the process tree every 50 ms and kills the namespace as
  soon as the tree holds more than the script's own python process plus its replicas
  (`MAX_PROCESSES`; the reaper below is not counted), or the run passes its time limit.

Inside the namespace, PID 1 is a small reaper (`_REAPER`) that runs the script, and when the
script has exited, lists every process still alive in the namespace: what the script left
behind. It reports that list in a file before the namespace (and with it, any leftover) ends.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NUM_REPLICAS = 3
# What the script itself may have below it: its replicas. The watchdog counts processes in the
# tree under the reaper, so that is the script's python process plus its replicas.
MAX_PROCESSES = NUM_REPLICAS + 1
GUARD = 'if __name__ == "__main__":'
RUN_LIMIT = 30.0  # seconds; a correct refusal takes about one replica start-up (~1 s)

_ACTOR = """\
import asyncio, os
from kubeforge import Actor, endpoint, Service, ServiceConfig
class Who(Actor):
    @endpoint
    async def pid(self) -> int:
        return os.getpid()
async def main():
    async with Service(ServiceConfig(num_replicas=3), Who) as svc:
        print("pids", sorted(await svc.call_all("pid")), flush=True)
"""

UNGUARDED = _ACTOR + "asyncio.run(main())\n"
GUARDED = _ACTOR + 'if __name__ == "__main__":\n    asyncio.run(main())\n'
# The script swallows the error at its top level, in the replicas as in the parent: the replica
# must still refuse to serve, or the parent's Service would start and print the pids.
SWALLOWED = _ACTOR + textwrap.dedent(
    """\
        try:
            asyncio.run(main())
        except Exception as exc:
            print("caught in", __name__, type(exc).__name__, flush=True)
            if __name__ == "__main__":
                raise SystemExit(3)
        """
)

# PID 1 of the namespace: runs the script, reaps orphans (they reparent to PID 1), then reports
# which processes are still alive once the script has exited. argv: report path, script path.
_REAPER = textwrap.dedent(
    """\
    import json, os, subprocess, sys
    rc = subprocess.call([sys.executable, sys.argv[2]])
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.append(cmd)
    with open(sys.argv[1], "w") as f:
        json.dump({"rc": rc, "left": left}, f)
    sys.exit(rc)
    """
)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, start time) for every process on the host, from /proc/*/stat."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # After "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt
        # cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime
        table[int(entry)] = (int(fields[1]), fields[19])
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> set[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[tuple[int, str]] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add((pid, table[pid][1]))
        todo.extend(children.get(pid, []))
    return found


@dataclass
class Contained:
    """What one contained run of a script did."""

    rc: int
    stdout: str
    stderr: str
    elapsed: float
    max_processes: int  # the script's python process plus all its descendants, at the peak
    killed_by_watchdog: bool
    left_behind: list[str] | None  # alive in the namespace after the script exited
    seen: set[tuple[int, str]] = field(default_factory=set)  # (pid, start time), host view

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@functools.cache
def _unshare() -> list[str]:
    """The containment prefix, checked once: without it these tests must not run the scripts."""
    cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        cmd.insert(1, "--map-root-user")  # an unprivileged user namespace makes the rest work
    try:
        probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=20)
    except OSError as exc:
        pytest.fail(f"these tests need util-linux unshare to contain a fork bomb: {exc}")
    if probe.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} does not work here: {probe.stderr.strip()}")
    return cmd


def run_contained(script: Path, limit: float = RUN_LIMIT) -> Contained:
    """Run `python script` in its own PID namespace under the watchdog; never leaks processes."""
    report = script.with_suffix(".report.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEFORGE_")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    proc = subprocess.Popen(
        [*_unshare(), sys.executable, "-c", _REAPER, str(report), str(script)],
        cwd=script.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    killed = False
    seen: set[tuple[int, str]] = set()
    done = threading.Event()

    def kill() -> None:
        # --kill-child: the namespace's PID 1 dies with unshare, and the kernel kills the rest.
        proc.send_signal(signal.SIGKILL)  # a no-op once it has exited

    def watchdog() -> None:
        nonlocal peak, killed
        while not done.is_set() and proc.poll() is None:
            tree = _descendants(proc.pid, _proc_table())
            seen.update(tree)
            # The tree is unshare -> reaper (PID 1 inside) -> script -> replicas -> ...;
            # the reaper is the one process in it that the script did not start.
            count = max(0, len(tree) - 1)
            peak = max(peak, count)
            if count > MAX_PROCESSES or time.monotonic() - started > limit:
                killed = True
                kill()
                return
            done.wait(0.05)

    dog = threading.Thread(target=watchdog, daemon=True)
    dog.start()
    try:
        stdout, stderr = proc.communicate(timeout=limit + 10)
    except subprocess.TimeoutExpired:
        kill()
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        done.set()
        dog.join(5)
    elapsed = time.monotonic() - started
    left: list[str] | None = None
    if report.exists():
        left = json.loads(report.read_text())["left"]
    return Contained(proc.returncode, stdout, stderr, elapsed, peak, killed, left, seen)


def _alive(seen: set[tuple[int, str]], grace: float = 5.0) -> list[int]:
    """Processes the watchdog saw that still exist (same pid and start time: not a reuse).

    SIGKILL is delivered asynchronously, so a process killed with the namespace may linger for
    a moment; only one still there after `grace` seconds counts.
    """
    deadline = time.monotonic() + grace
    while True:
        table = _proc_table()
        alive = [pid for pid, start in seen if pid in table and table[pid][1] == start]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _write(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "who_script.py"
    script.write_text(text)
    return script


def _detail(run: Contained) -> str:
    """What a failed assertion shows of a contained run."""
    return (
        f"rc={run.rc} elapsed={run.elapsed:.1f}s max_processes={run.max_processes} "
        f"killed_by_watchdog={run.killed_by_watchdog}\n--- stdout\n{run.stdout[-3000:]}"
        f"\n--- stderr\n{run.stderr[-6000:]}"
    )


def test_unguarded_script_fails_once_without_recursion(tmp_path: Path) -> None:
    script = _write(tmp_path, UNGUARDED)
    run = run_contained(script)
    detail = _detail(run)
    try:
        assert not run.killed_by_watchdog, "recursive start: the watchdog killed it\n" + detail
        assert run.max_processes <= MAX_PROCESSES, detail
        assert run.rc != 0, detail
        assert run.elapsed < RUN_LIMIT, detail
        assert GUARD in run.stderr, detail
        assert str(script) in run.stderr, detail
        assert "UnguardedMainError" in run.stderr, detail
        assert run.output.count(GUARD) == 1, "the error must be reported once\n" + detail
        assert run.left_behind == [], detail
    finally:
        assert _alive(run.seen) == [], "processes survived the contained run"


def test_swallowed_refusal_still_fails_the_replica(tmp_path: Path) -> None:
    script = _write(tmp_path, SWALLOWED)
    run = run_contained(script)
    detail = _detail(run)
    try:
        assert not run.killed_by_watchdog, detail
        assert run.max_processes <= MAX_PROCESSES, detail
        # The parent's Service failed (the replicas did not serve), and with the refusal:
        assert run.rc == 3, detail
        assert run.stdout.count("caught in __main__ UnguardedMainError") == 1, detail
        assert "pids" not in run.stdout, detail
        assert run.elapsed < RUN_LIMIT, detail
        assert run.left_behind == [], detail
    finally:
        assert _alive(run.seen) == []


def test_guarded_script_still_works(tmp_path: Path) -> None:
    script = _write(tmp_path, GUARDED)
    run = run_contained(script)
    detail = f"rc={run.rc} max_processes={run.max_processes}\n{run.output[-6000:]}"
    try:
        assert run.rc == 0, detail
        assert not run.killed_by_watchdog, detail
        assert run.max_processes == MAX_PROCESSES, detail
        lines = [line for line in run.stdout.splitlines() if line.startswith("pids ")]
        assert len(lines) == 1, detail
        pids = json.loads(lines[0].removeprefix("pids "))
        assert len(set(pids)) == NUM_REPLICAS, detail
        assert run.left_behind == [], detail
    finally:
        assert _alive(run.seen) == []


def test_kubeforge_processes_never_spawn_kubeforge_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubeforge import NestedSpawnError
    from kubeforge.local import Processes

    monkeypatch.setenv("KUBEFORGE_SPAWNED_BY", "12345")
    procs = Processes()
    try:
        with pytest.raises(NestedSpawnError, match="never start"):
            procs.spawn(["-c", "pass"], "replica-0", {})
        assert procs.children == []
    finally:
        procs.stop(1.0)


async def test_service_start_refuses_inside_a_kubeforge_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Making a Service is harmless; starting one is refused, before GPUs are assigned (a
    GpuError would hide the reason) or anything starts."""
    from kubeforge import NestedSpawnError, Service, ServiceConfig
    from kubeforge.actor import load_actor_class

    actor = load_actor_class("examples.counter:Counter")
    monkeypatch.setenv("KUBEFORGE_SPAWNED_BY", "12345")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPUs: assigning them would fail
    svc = Service(ServiceConfig(num_replicas=2, with_gpus=True), actor)
    with pytest.raises(NestedSpawnError, match="KUBEFORGE_SPAWNED_BY"):
        await svc.start()
    assert svc.pids == []


def test_children_carry_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.local import Processes

    monkeypatch.delenv("KUBEFORGE_SPAWNED_BY", raising=False)
    out = tmp_path / "marker"
    procs = Processes()
    try:
        code = f"import os; open({str(out)!r}, 'w').write(os.environ['KUBEFORGE_SPAWNED_BY'])"
        procs.spawn(["-c", code], "probe", {})
        procs.children[0].wait(20)
    finally:
        procs.stop(1.0)
    assert out.read_text() == str(os.getpid())
