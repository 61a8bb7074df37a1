"""torchforge's Service scenario, for the local `Service` and for `ServiceClient` against
`kubeforge run`: one test body, two front ends, real processes."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from examples.counter import Counter
from examples.failing import Failing
from kubeforge import (
    BroadcastError,
    RemoteError,
    Service,
    ServiceClient,
    ServiceConfig,
    SessionMovedError,
)
from kubeforge.gpus import GpuError
from tests.integration.procs import descendants, free_port, pid_alive
from tests.integration.test_cli import start_run


@pytest.fixture
async def local_service() -> AsyncIterator[Service]:
    svc = Service(ServiceConfig(num_replicas=3, health_poll_rate=0.2), Counter)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def _metrics(api: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(api, Service):
        return api.get_metrics(), api.get_metrics_summary()
    return await api.get_metrics(), await api.get_metrics_summary()


async def torchforge_scenario(
    api: Any, replica_names: tuple[str, ...] = ("replica-0", "replica-1", "replica-2")
) -> None:
    # A session's calls stick: one counter counts up by one each call.
    sid = await api.start_session()
    firsts = [await api.incr(sid, 1) for _ in range(5)]
    firsts += [await api.incr.route(1, sess_id=sid) for _ in range(5)]
    assert firsts == list(range(firsts[0], firsts[0] + 10))
    holder = (await api.whoami(sid))["replica"]
    # call_all: three results, in replica order.
    names = [r["replica"] for r in await api.call_all("whoami")]
    assert names == list(replica_names)
    assert [r["replica"] for r in await api.whoami.fanout()] == names
    # Calls without a session spread over the replicas (least-loaded, ties in turn).
    spread = {(await api.whoami(None))["replica"] for _ in range(9)}
    assert spread == set(names)
    # Calls inside `session()` stick to one replica too.
    async with api.session():
        inside = {(await api.whoami.route())["replica"] for _ in range(5)}
    assert len(inside) == 1
    calls = 10 + 1 + 3 + 3 + 9 + 5
    metrics, summary = await _metrics(api)
    rate = metrics.get_total_request_rate()
    # Every call falls in the 60 s window; the span is at least one second.
    assert calls / 60.0 <= rate <= calls / 1.0, rate
    assert sum(r.total_requests for r in metrics.replica_metrics.values()) >= calls
    assert summary["service"]["healthy_replicas"] == 3
    assert set(summary["replicas"]) == {0, 1, 2}
    assert metrics.healthy_replicas == 3 and metrics.get_avg_queue_depth() == 0.0
    # terminate_session reaches on_session_end on the replica that held the session.
    await api.terminate_session(sid)
    ended = await api.call_all("ended")
    assert [n for n, e in zip(names, ended, strict=True) if sid in e] == [holder]


async def test_torchforge_scenario_local_service() -> None:
    svc = Service(ServiceConfig(num_replicas=3), Counter)
    await svc.start()
    pids = svc.pids
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    try:
        await torchforge_scenario(svc)
    finally:
        await svc.stop()
    assert not [p for p in pids if pid_alive(p)]
    assert not descendants(os.getpid()) - set(pids)  # and nothing else of ours is left


async def test_torchforge_scenario_service_client_against_kubeforge_run() -> None:
    port = free_port()
    proc, out = await asyncio.get_running_loop().run_in_executor(
        None, start_run, "examples/counter.yaml", port
    )
    children = descendants(proc.pid)
    try:
        assert "is serving" in out, out
        async with ServiceClient(f"http://127.0.0.1:{port}") as client:
            await torchforge_scenario(client)
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
    assert not [p for p in children if pid_alive(p)]


async def test_kill9_replica_of_a_running_service(local_service: Service) -> None:
    svc = local_service
    sids = [await svc.start_session() for _ in range(6)]
    holders = {sid: (await svc.whoami(sid))["pid"] for sid in sids}
    victim = svc.pids[1]
    doomed = [s for s, pid in holders.items() if pid == victim]
    assert len(doomed) == 2
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while svc.get_metrics_summary()["service"]["healthy_replicas"] != 2:
        assert time.monotonic() - killed <= 0.2 + 0.5, "replica still counted healthy"
        await asyncio.sleep(0.01)
    # Calls keep working, with and without sessions.
    assert len({(await svc.whoami(None))["pid"] for _ in range(6)}) == 2
    moved_to = set()
    for sid in doomed:
        pid = (await svc.whoami(sid))["pid"]  # followed to its new replica, transparently
        assert pid != victim
        assert (await svc.whoami(sid))["pid"] == pid  # and it sticks there
        moved_to.add(pid)
    assert len(moved_to) == 2  # spread over the survivors, not piled on one
    assert svc.sessions_moved == 2
    assert svc.get_metrics_summary()["service"]["sessions_moved"] == 2
    for sid in set(sids) - set(doomed):
        assert (await svc.whoami(sid))["pid"] == holders[sid]


async def test_session_moved_error_when_asked_for() -> None:
    cfg = ServiceConfig(num_replicas=2, raise_on_session_moved=True)
    async with Service(cfg, Counter) as svc:
        sid = await svc.start_session()
        pid = (await svc.whoami(sid))["pid"]
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.8)
        with pytest.raises(SessionMovedError) as info:
            await svc.whoami(sid)
        new_id = info.value.details["session_id"]
        assert (await svc.whoami(new_id))["pid"] != pid


async def test_endpoint_exception_raises_remote_error() -> None:
    async with Service(ServiceConfig(num_replicas=1), Failing) as svc:
        with pytest.raises(RemoteError) as info:
            await svc.maybe_fail(None, "bad things")
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "bad things"
        assert "raise ValueError(message)" in (info.value.traceback or "")
        assert await svc.ping(None) == "pong"  # the replica stays in rotation


async def test_broadcast_error_carries_every_result_and_error() -> None:
    async with Service(ServiceConfig(num_replicas=2), Failing, fail=True) as svc:
        with pytest.raises(BroadcastError) as info:
            await svc.call_all("maybe_fail", "x")
        assert info.value.results == [None, None]
        assert set(info.value.errors) == {"replica-0", "replica-1"}
        assert all(isinstance(e, RemoteError) for e in info.value.errors.values())


class NoEndpoints:
    pass


@pytest.mark.parametrize(
    ("make", "error", "text"),
    [
        (lambda: ServiceConfig(num_replicas=0), ValueError, "num_replicas must be a positive"),
        (lambda: ServiceConfig(num_replicas=-2), ValueError, "num_replicas must be a positive"),
        (
            lambda: Service(ServiceConfig(num_replicas=1), NoEndpoints),
            ValueError,
            "no @endpoint methods",
        ),
        (
            lambda: Service(ServiceConfig(num_replicas=1), Counter).nope,
            AttributeError,
            "Counter has no endpoint 'nope'",
        ),
    ],
)
def test_config_errors_are_clear_and_early(make: Any, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        make()


def test_gpus_that_are_not_there_fail_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(GpuError, match="need 2 GPUs; this machine has none"):
        Service(ServiceConfig(num_replicas=2, with_gpus=True), Counter)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(GpuError, match="need 2 GPUs; this machine has 1"):
        Service(ServiceConfig(num_replicas=2, with_gpus=True), Counter)
    assert not descendants(os.getpid())


async def test_actor_options_as_service() -> None:
    svc = await Counter.options(num_replicas=2).as_service(start=100)
    try:
        assert await svc.call_all("value") == [100, 100]
    finally:
        await svc.stop()


SCRIPT = """
import asyncio, os
from kubeforge import Actor, Service, ServiceConfig, endpoint

print("top level runs in", os.getpid())

class Doubler(Actor):
    @endpoint
    async def double(self, x: int) -> int:
        return 2 * x

async def main():
    async with Service(ServiceConfig(num_replicas=2), Doubler) as svc:
        print("results", await svc.call_all("double", 21), await svc.double(None, 5))

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_actor_defined_in_the_users_main_script(tmp_path: Any) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "results [42, 42] 10" in out.stdout
    # The script's top level ran in the replicas too (as with spawn), its __main__ block not.
    assert out.stdout.count("top level runs in") == 3
