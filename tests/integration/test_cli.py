"""`kubeforge run`, `call` and `status` as a user types them."""

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

from kubeforge.settings import router_request_timeout
from tests.integration.conftest import call
from tests.integration.procs import REPO, descendants, free_port, pid_alive

KUBEFORGE = [sys.executable, "-m", "kubeforge.cli"]


def start_run(spec: str, port: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`kubeforge run SPEC` until it says it serves; returns the process and what it printed."""
    proc = subprocess.Popen(
        [*KUBEFORGE, "run", spec, "--port", str(port), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        lines.append(line)
        if "is serving at" in line or not line:
            break
    return proc, "".join(lines)


async def test_run_serves_and_ctrl_c_under_load_leaves_no_process(
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    proc, out = await asyncio.get_running_loop().run_in_executor(
        None, start_run, "examples/counter.yaml", port
    )
    try:
        assert f"is serving at http://127.0.0.1:{port}" in out, out
        assert "replica 3/3 ready" in out and "router 1/1 ready" in out
        children = descendants(proc.pid)
        assert len(children) == 4  # three replicas and the router
        url = f"http://127.0.0.1:{port}"
        status, body, _ = await call(http, url, "incr")
        assert (status, body["result"]) == (200, 1)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    await call(http, url, "incr")
                except aiohttp.ClientError:
                    return

        workers = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        assert proc.returncode == 0
        assert time.monotonic() - started < 10.0  # within the default 10 s grace
        assert not [p for p in children if pid_alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_call_and_status_commands() -> None:
    port = free_port()
    proc, out = start_run("examples/counter.yaml", port)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "is serving" in out, out
        one = subprocess.run(
            [*KUBEFORGE, "call", url, "incr", "5"], capture_output=True, text=True, timeout=20
        )
        assert (one.returncode, one.stdout.strip()) == (0, "5")
        everyone = subprocess.run(
            [*KUBEFORGE, "call", url, "value", "--all"], capture_output=True, text=True, timeout=20
        )
        assert sorted(json.loads(everyone.stdout)) == [0, 0, 5]
        missing = subprocess.run(
            [*KUBEFORGE, "call", url, "nope"], capture_output=True, text=True, timeout=20
        )
        assert missing.returncode == 1 and "UnknownEndpointError" in missing.stderr
        status = subprocess.run(
            [*KUBEFORGE, "status", url, "--once"], capture_output=True, text=True, timeout=20
        )
        rows = status.stdout.strip().splitlines()
        assert rows[0].split()[:3] == ["REPLICA", "STATE", "IN-FLIGHT"]
        assert [r.split()[:2] for r in rows[1:]] == [[f"replica-{i}", "HEALTHY"] for i in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


def test_call_stream_prints_each_item_as_it_comes() -> None:
    port = free_port()
    proc, out = start_run("examples/tokens.yaml", port)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "is serving" in out, out
        started = time.monotonic()
        args = ["generate", "hi", "--kwargs", '{"n": 3, "delay": 0.5}', "--stream"]
        call = subprocess.Popen(
            [*KUBEFORGE, "call", url, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert call.stdout is not None
        lines = [(call.stdout.readline(), time.monotonic() - started) for _ in range(3)]
        assert call.wait(20) == 0
        assert [json.loads(line) for line, _ in lines] == ["hi-0", "hi-1", "hi-2"]
        assert lines[2][1] - lines[0][1] > 0.8, lines  # printed as they came, 0.5 s apart
        wrong = subprocess.run(
            [*KUBEFORGE, "call", url, "generate", "hi"], capture_output=True, text=True, timeout=20
        )
        assert wrong.returncode == 1 and "/v1/stream/generate" in wrong.stderr, wrong.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


def run_once(spec: Path) -> subprocess.CompletedProcess[str]:
    """`kubeforge run SPEC` expected to exit by itself (a bad spec)."""
    return subprocess.run(
        [*KUBEFORGE, "run", str(spec), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_run_rejects_bad_specs_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubeforge.dev/v1alpha1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {replicas: -1, actor: 'not a path', healthPollRate: fast}\n"
    )
    out = run_once(bad)
    assert out.returncode == 2
    for field in ("spec.replicas", "spec.actor", "spec.healthPollRate"):
        assert field in out.stderr, out.stderr


def test_run_reports_an_unknown_actor_clearly(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "apiVersion: kubeforge.dev/v1alpha1\nkind: Service\nmetadata: {name: x}\n"
        "spec: {replicas: 1, actor: 'examples.counter:Nope'}\n"
    )
    out = run_once(spec)
    assert out.returncode == 1
    assert "has no attribute 'Nope'" in out.stdout + out.stderr
    assert "replica-0 exited with code 1" in out.stderr


def test_run_gives_the_router_every_router_setting_of_the_spec(tmp_path: Path) -> None:
    """A 7m requestTimeout reaches the router too (it used to keep its own 120 s)."""
    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "apiVersion: kubeforge.dev/v1alpha1\nkind: Service\nmetadata: {name: slow}\n"
        "spec: {replicas: 1, actor: 'examples.slow:Slow', requestTimeout: 7m, "
        "healthPollRate: 150ms}\n"
    )
    port = free_port()
    proc, out = start_run(str(spec), port)
    try:
        assert "is serving" in out, out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=5) as resp:
            settings = json.load(resp)["settings"]
        assert settings["request_timeout"] == router_request_timeout(420.0)
        assert settings["health_poll_rate"] == 0.15
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
