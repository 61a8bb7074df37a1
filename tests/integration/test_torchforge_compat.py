"""torchforge's public API, as its own tests use it (tests/unit_tests/test_service.py), on
kubeforge: `options()`, `as_service()`, `as_actor()`, the handles' verbs, metrics, sessions,
fanout, `shutdown()`. Ported without the private-state assertions (`_get_internal_state`,
`_service._cfg`); where kubeforge differs on purpose, the test says so and asserts kubeforge's
behaviour (README's mapping table lists each difference). Real replica processes throughout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

import kubeforge
from kubeforge import (
    Actor,
    KubeforgeError,
    NoHealthyReplicasError,
    RemoteError,
    ServiceConfig,
    endpoint,
    lifecycle,
)
from tests.integration.procs import REPO, free_port, pid_alive
from tests.integration.test_cli import start_run

pytestmark = pytest.mark.timeout(60)


class Counter(Actor):
    """torchforge's test actor."""

    def __init__(self, v: int) -> None:
        self.v = v

    @endpoint
    async def incr(self) -> None:
        self.v += 1

    @endpoint
    async def value(self) -> int:
        return self.v

    @endpoint
    async def fail_me(self) -> None:
        raise RuntimeError("I was asked to fail")

    @endpoint
    async def add_to_value(self, amount: int, multiplier: int = 1) -> int:
        self.v += amount * multiplier
        return self.v

    @endpoint
    async def rank_and_value(self) -> dict[str, int]:
        return {"rank": self.rank, "world_size": self.world_size, "v": self.v}


def total(summary: dict, key: str = "total_requests") -> int:
    return sum(r[key] for r in summary["replicas"].values())


# actors -------------------------------------------------------------------------------------


async def test_as_actor_with_args_config() -> None:
    actor = await Counter.options(procs=1).as_actor(5)
    try:
        assert await actor.value.choose() == 5
        await actor.incr.choose()
        assert await actor.value.choose() == 6
        assert await actor.value.call_one() == 6
        assert await actor.value.call() == [6]  # every rank's, in rank order: here one
    finally:
        await Counter.shutdown(actor)


async def test_as_actor_default_usage() -> None:
    actor = await Counter.as_actor(v=7)
    try:
        assert await actor.value.choose() == 7
        await actor.incr.choose()
        assert await actor.value.choose() == 8
    finally:
        await Counter.shutdown(actor)
    assert lifecycle.live() == []


async def test_options_applies_config() -> None:
    actor_cls = Counter.options(procs=1, with_gpus=False, num_replicas=2)
    assert (actor_cls.procs, actor_cls.with_gpus, actor_cls.num_replicas) == (1, False, 2)
    assert Counter.num_replicas == 1  # the class itself is untouched
    actor = await actor_cls.as_actor(v=3)  # an actor is one replica, whatever num_replicas
    try:
        assert await actor.value.choose() == 3
        assert actor._service.get_metrics().total_replicas == 1  # the local Service's, sync
    finally:
        await Counter.shutdown(actor)


async def test_options_accepts_every_service_config_field_and_refuses_others() -> None:
    every = {
        "procs": 1,
        "with_gpus": False,
        "hosts": 1,
        "health_poll_rate": 0.5,
        "replica_max_concurrent_requests": 4,
        "return_first_rank_result": True,
        "replica_max_queued_requests": 8,
        "request_timeout": 30.0,
        "stream_idle_timeout": 10.0,
        "session_ttl": 60.0,
        "startup_timeout": 60.0,
        "stop_grace": 2.0,
        "raise_on_session_moved": False,
        "at_most_once": False,
        "mesh_name": "counters",
        "max_body_size": 1 << 20,
        "num_replicas": 2,
    }
    assert set(every) == {f.name for f in fields(ServiceConfig)}
    configured = Counter.options(**every)
    assert configured._service_options == every
    with pytest.raises(TypeError, match=r"unknown option.*num_replica\b.*ServiceConfig takes"):
        Counter.options(num_replica=2)
    with pytest.raises(ValueError, match="num_replicas must be a positive integer"):
        Counter.options(num_replicas=0)


async def test_actor_with_ranks_call_returns_every_rank_and_call_one_refuses() -> None:
    actor = await Counter.options(procs=2).as_actor(1)
    try:
        assert actor.world_size == 2
        ranks = await actor.rank_and_value.call()
        assert ranks == [
            {"rank": 0, "world_size": 2, "v": 1},
            {"rank": 1, "world_size": 2, "v": 1},
        ]
        assert await actor.rank_and_value.choose() == {"rank": 0, "world_size": 2, "v": 1}
        with pytest.raises(ValueError, match=r"call_one\(\) needs an actor of one rank.*has 2"):
            await actor.value.call_one()
        # broadcast: every rank runs it, no result; the next call waits for it, in order
        sent = actor.incr.broadcast()
        assert [r["v"] for r in await actor.rank_and_value.call()] == [2, 2]  # on both ranks
        assert sent.done() and sent.result() is None
    finally:
        await actor.shutdown()


async def test_actor_verbs_of_a_service_are_refused_on_an_actor() -> None:
    actor = await Counter.as_actor(0)
    try:
        for verb in ("route", "fanout"):
            with pytest.raises(NotImplementedError, match=f"You tried to use {verb}\\(\\)"):
                await getattr(actor.value, verb)()
        with pytest.raises(AttributeError, match="has no endpoint 'nope'"):
            actor.nope  # noqa: B018
    finally:
        await actor.shutdown()


# service configuration ----------------------------------------------------------------------


async def test_service_with_kwargs_config() -> None:
    service = await Counter.options(num_replicas=4, procs=1, health_poll_rate=0.5).as_service(v=20)
    try:
        assert (await service.get_metrics()).total_replicas == 4
        assert await service.value.route() == 20
    finally:
        await service.shutdown()


async def test_service_default_config() -> None:
    service = await Counter.as_service(30)
    try:
        assert (await service.get_metrics()).total_replicas == 1
        assert await service.value.route() == 30
    finally:
        await service.shutdown()


async def test_multiple_services_isolated_configs() -> None:
    service1 = await Counter.options(num_replicas=2, procs=1).as_service(v=30)
    service2 = await Counter.options(num_replicas=4, procs=1).as_service(v=20)
    try:
        assert (await service1.get_metrics()).total_replicas == 2
        assert (await service2.get_metrics()).total_replicas == 4
        assert await service1.value.route() == 30
        assert await service2.value.route() == 20
    finally:
        await service1.shutdown()
        await service2.shutdown()


async def test_service_endpoint_monarch_method_error() -> None:
    service = await Counter.options(procs=1, num_replicas=1).as_service(0)
    try:
        for verb in ("call_one", "broadcast", "generate", "choose", "call"):
            with pytest.raises(
                NotImplementedError, match=f"You tried to use {verb}\\(\\).*route\\(\\)"
            ):
                await getattr(service.value, verb)()
    finally:
        await service.shutdown()


# core functionality -------------------------------------------------------------------------


async def test_basic_service_operations() -> None:
    service = await Counter.options(procs=1, num_replicas=1).as_service(v=0)
    try:
        session1 = await service.start_session()
        session2 = await service.start_session()
        assert session1 != session2
        assert isinstance(session1, str)
        await service.incr.route(sess_id=session1)
        assert await service.value.route(sess_id=session1) == 1
        assert (await service.get_metrics()).total_sessions == 2
        await service.terminate_session(session1)
        assert (await service.get_metrics()).total_sessions == 1
    finally:
        await service.shutdown()


async def test_sessionless_calls() -> None:
    service = await Counter.options(procs=1, num_replicas=2).as_service(v=0)
    try:
        await service.incr.route()
        await service.incr.route()
        assert await service.value.route() is not None
        metrics = await service.get_metrics_summary()
        assert metrics["service"]["total_sessions"] == 0
        assert total(metrics) == 3
        # each replica holds its own counter: 0 + 5*2 on the least loaded one, plus its incrs
        assert await service.add_to_value.route(5, multiplier=2) in (10, 11, 12)
    finally:
        await service.shutdown()


async def test_session_context_manager() -> None:
    service = await Counter.options(procs=1, num_replicas=1).as_service(v=0)
    try:
        async with service.session() as session:
            assert isinstance(session.session_id, str) and session.session_id == session
            await service.incr.route()
            await service.incr.route()
            assert await service.value.route() == 2

        async def worker(increments: int) -> int:
            async with service.session():
                initial = await service.value.route()
                for _ in range(increments):
                    await service.incr.route()
                return await service.value.route() - initial

        assert sorted([await worker(2), await worker(3)]) == [2, 3]
        assert (await service.get_metrics()).total_sessions == 0  # every session ended
    finally:
        await service.shutdown()


async def test_an_endpoint_error_is_raised_and_counted() -> None:
    """torchforge returns the endpoint's exception and marks the replica failed; kubeforge
    raises it (RemoteError naming RuntimeError) and keeps the replica: a user's exception is
    not a broken replica. The session keeps its replica, and the failure is counted."""
    service = await Counter.options(procs=1, num_replicas=2, health_poll_rate=0.1).as_service(v=0)
    try:
        session = await service.start_session()
        await service.incr.route(sess_id=session)
        with pytest.raises(RemoteError, match="RuntimeError: I was asked to fail") as err:
            await service.fail_me.route(sess_id=session)
        assert err.value.remote_type == "RuntimeError"
        assert await service.value.route(sess_id=session) == 1  # same replica, state kept
        metrics = await service.get_metrics()
        assert metrics.healthy_replicas == 2
    finally:
        await service.shutdown()


async def test_metrics_collection() -> None:
    service = await Counter.options(procs=1, num_replicas=2).as_service(v=0)
    try:
        session1 = await service.start_session()
        session2 = await service.start_session()
        await service.incr.route(sess_id=session1)
        await service.incr.route(sess_id=session1)
        await service.incr.route(sess_id=session2)
        with pytest.raises(RemoteError):
            await service.fail_me.route(sess_id=session1)
        metrics = await service.get_metrics()
        summary = await service.get_metrics_summary()
        assert metrics.total_sessions == 2
        assert metrics.healthy_replicas == 2
        assert metrics.total_replicas == 2
        assert "service" in summary and "replicas" in summary
        assert total(summary) == 4  # 3 successful + 1 failed
        assert total(summary, "failed_requests") == 1
    finally:
        await service.shutdown()


async def test_session_stickiness() -> None:
    service = await Counter.options(procs=1, num_replicas=2).as_service(0)
    try:
        session = await service.start_session()
        for _ in range(4):
            await service.incr.route(sess_id=session)
        assert await service.value.route(sess_id=session) == 4  # one replica had them all
    finally:
        await service.shutdown()


async def test_sessions_the_caller_names() -> None:
    """torchforge's `route(..., sess_id="sess1")`: the first call places the name on the
    least-loaded replica, later calls stick, `terminate_session` ends it."""
    service = await Counter.options(procs=1, num_replicas=2).as_service(0)
    try:
        for _ in range(3):
            await service.incr.route(sess_id="sess1")
        await service.incr("sess2")  # the positional form; placed by fewest sessions
        assert await service.value.route(sess_id="sess1") == 3
        assert await service.value("sess2") == 1
        summary = await service.get_metrics_summary()
        assert sorted(r["assigned_sessions"] for r in summary["replicas"].values()) == [1, 1]
        await service.terminate_session("sess1")
        summary = await service.get_metrics_summary()
        assert sorted(r["assigned_sessions"] for r in summary["replicas"].values()) == [0, 1]
        with pytest.raises(TypeError, match="session id"):
            await service.value(3)  # an argument where the session id goes
    finally:
        await service.shutdown()


async def test_load_balancing_multiple_sessions() -> None:
    service = await Counter.options(procs=1, num_replicas=2).as_service(v=0)
    try:
        sessions = [await service.start_session() for _ in range(4)]
        for s in sessions:
            await service.incr.route(sess_id=s)
        summary = await service.get_metrics_summary()
        assert total(summary) == 4
        # least loaded by sessions: two each (kubeforge asserts what torchforge only hopes)
        assert sorted(r["assigned_sessions"] for r in summary["replicas"].values()) == [2, 2]
    finally:
        await service.shutdown()


async def test_concurrent_operations() -> None:
    service = await Counter.options(procs=1, num_replicas=2).as_service(v=0)
    try:
        session = await service.start_session()
        await asyncio.gather(
            service.incr.route(sess_id=session),
            service.incr.route(sess_id=session),
            service.incr.route(),
            service.incr.route(),
        )
        summary = await service.get_metrics_summary()
        assert summary["service"]["total_sessions"] == 1
        assert total(summary) == 4
    finally:
        await service.shutdown()


async def test_broadcast_call_basic() -> None:
    service = await Counter.options(procs=1, num_replicas=3).as_service(v=10)
    try:
        results = await service.incr.fanout()
        assert results == [None, None, None]
        assert await service.value.fanout() == [11, 11, 11]
    finally:
        await service.shutdown()


async def test_broadcast_fanout_vs_route() -> None:
    service = await Counter.options(procs=1, num_replicas=3).as_service(v=0)
    try:
        await service.incr.fanout()
        assert await service.value.fanout() == [1, 1, 1]
        await service.incr.route()
        assert sorted(await service.value.fanout()) == [1, 1, 2]
        assert total(await service.get_metrics_summary()) == 10
    finally:
        await service.shutdown()


# process-wide shutdown ----------------------------------------------------------------------


async def test_kubeforge_shutdown_stops_every_service_and_actor() -> None:
    service = await Counter.options(num_replicas=2).as_service(0)
    actor = await Counter.as_actor(0)
    pids = [*service._service.pids, *actor._service.pids]
    assert len(lifecycle.live()) == 2 and all(pid_alive(p) for p in pids)
    await kubeforge.shutdown()
    assert lifecycle.live() == []
    assert not any(pid_alive(p) for p in pids)


def test_a_program_that_forgets_shutdown_leaves_no_replica_behind(tmp_path: Path) -> None:
    """The interpreter's exit stops what `kubeforge.shutdown()` would have, and says so."""
    script = tmp_path / "forgetful.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from tests.integration.test_torchforge_compat import Counter

            async def main():
                service = await Counter.options(num_replicas=2).as_service(0)
                actor = await Counter.as_actor(1)
                print("PIDS", *service._service.pids, *actor._service.pids, flush=True)
                assert await actor.value.call_one() == 1

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pids = [int(p) for p in done.stdout.split("PIDS", 1)[1].split()]
    assert len(pids) == 3
    assert not any(pid_alive(p) for p in pids)
    assert "still running at exit" in done.stderr


# the same handles against a router ----------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`kubeforge run` of one Counter replica of 2 ranks behind a router, token on."""
    spec = tmp_path / "actor.yaml"
    spec.write_text(
        "apiVersion: kubeforge.dev/v1alpha1\nkind: Service\nmetadata: {name: counter}\n"
        "spec:\n  replicas: 1\n  procs: 2\n"
        "  actor: tests.integration.test_torchforge_compat:Counter\n  kwargs: {v: 5}\n"
    )
    port = free_port()
    proc, out = start_run(str(spec), port, "--token", "s3cret")
    try:
        assert "is serving at" in out, out
        yield f"http://127.0.0.1:{port}", "s3cret"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


async def test_connect_actor_and_connect_reach_a_router_with_the_same_verbs(
    served: tuple[str, str],
) -> None:
    url, token = served
    actor = await kubeforge.connect_actor(url, token=token, name="counter")
    assert actor.world_size == 2  # the replica's ranks, as its router reports them
    assert [r["rank"] for r in await actor.rank_and_value.call()] == [0, 1]
    assert await actor.value.choose() == 5
    with pytest.raises(ValueError, match="has 2"):
        await actor.value.call_one()
    service = await kubeforge.connect(url, token=token)
    assert await service.add_to_value.route(1) == 6
    assert await service.value.fanout() == [6]
    assert total(await service.get_metrics_summary()) >= 4
    with pytest.raises(NotImplementedError, match="route\\(\\)"):
        await service.value.call_one()
    assert len(lifecycle.live()) == 2
    await kubeforge.shutdown()  # closes the connections; the router keeps serving
    assert lifecycle.live() == []
    again = await kubeforge.connect(url, token=token)
    assert await again.value.route() == 6
    await again.shutdown()


async def test_a_named_session_through_the_router_sticks_to_its_replica(
    served: tuple[str, str],
) -> None:
    url, token = served
    service = await kubeforge.connect(url, token=token)
    try:
        assert [await service.add_to_value.route(1, sess_id="run-7/ep-1") for _ in range(3)] == [
            6,
            7,
            8,
        ]
        await service.terminate_session("run-7/ep-1")
    finally:
        await service.shutdown()


async def test_connect_refuses_a_wrong_token_and_connect_actor_a_service(
    served: tuple[str, str],
) -> None:
    url, token = served
    with pytest.raises(KubeforgeError, match=r"(?i)token"):
        await kubeforge.connect(url, token="guess")
    with pytest.raises(NoHealthyReplicasError, match="cannot reach"):
        await kubeforge.connect(f"http://127.0.0.1:{free_port()}", token=token)
    assert lifecycle.live() == []
