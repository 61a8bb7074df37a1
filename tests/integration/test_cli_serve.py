"""`kubeforge serve`: local replicas behind a router, ready with progress, gone after Ctrl-C."""

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp

from tests.integration.conftest import call
from tests.integration.procs import REPO, descendants, free_port, pid_alive


async def test_serve_answers_and_ctrl_c_leaves_no_process(http: aiohttp.ClientSession) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubeforge.cli",
            "serve",
            "examples.counter:Counter",
            "--replicas",
            "2",
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
            lines.append(line)
            if "kubeforge serving" in line or not line:
                break
        out = "".join(lines)
        assert f"at http://127.0.0.1:{port}" in out, out
        assert "replica 2/2 ready" in out and "router ready" in out
        children = descendants(proc.pid)
        assert len(children) == 3  # two replicas and the router
        status, body, _ = await call(http, f"http://127.0.0.1:{port}", "incr")
        assert (status, body["result"]) == (200, 1)
        # Under load, Ctrl-C: everything exits within the grace period, nothing is left.
        load = [
            asyncio.create_task(call(http, f"http://127.0.0.1:{port}", "incr")) for _ in range(20)
        ]
        proc.send_signal(signal.SIGINT)
        await asyncio.gather(*load, return_exceptions=True)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
        assert proc.returncode == 0
        assert time.monotonic() - started < 12
        assert not [p for p in children if pid_alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reports_a_bad_actor_clearly() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubeforge.cli",
            "serve",
            "examples.counter:Nope",
            "--replicas",
            "1",
            "--port",
            str(free_port()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "has no attribute 'Nope'" in out.stdout + out.stderr
    assert "replica-0 exited with code" in out.stderr
