"""`Service`: torchforge's API with replicas as local processes and the router in-process.

The replicas are the same `python -m kubeforge.replica` processes a cluster runs; the routing
is the same `Router` engine the router server runs, driven here without HTTP in between.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Any

from kubeforge import gpus, lifecycle, spawn_guard, values, wire
from kubeforge.actor import endpoints_of, import_path_of
from kubeforge.handles import ActorHandle, ServiceHandle
from kubeforge.http.stream import BodyStream
from kubeforge.local import ReplicaSet
from kubeforge.router import report
from kubeforge.router.discovery import StaticDiscovery
from kubeforge.router.engine import Router, RouterConfig
from kubeforge.service_api import Reply, ServiceAPI, ServiceMetrics, summary_with_int_keys
from kubeforge.settings import DEFAULTS, MAX_BODY, MIN_BODY, router_request_timeout

log = logging.getLogger("kubeforge.service")


@dataclass
class ServiceConfig:
    """torchforge's ServiceConfig, plus the bounds kubeforge puts on every wait."""

    num_replicas: int
    procs: int = 1  # rank processes per replica, one GPU each when with_gpus
    with_gpus: bool = False
    hosts: int | None = None
    health_poll_rate: float = DEFAULTS.health_poll_rate
    replica_max_concurrent_requests: int = DEFAULTS.max_concurrent_requests
    return_first_rank_result: bool = True
    replica_max_queued_requests: int = DEFAULTS.max_queued_requests
    request_timeout: float = DEFAULTS.request_timeout  # bounds a whole stream too
    stream_idle_timeout: float = DEFAULTS.stream_idle_timeout  # a stream's gap between items
    session_ttl: float = DEFAULTS.session_ttl
    startup_timeout: float = DEFAULTS.startup_timeout
    stop_grace: float = DEFAULTS.stop_grace
    raise_on_session_moved: bool = False
    at_most_once: bool = False  # never re-send a sessionless call lost with its replica
    mesh_name: str | None = None  # torchforge's: names the replica processes (`<name>-<i>`)
    max_body_size: int = DEFAULTS.max_body  # bytes of one call body (spec.maxBodySize)

    def __post_init__(self) -> None:
        if not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {self.num_replicas!r}")
        if not isinstance(self.procs, int) or self.procs < 1:
            raise ValueError(f"procs must be a positive integer, got {self.procs!r}")
        if self.hosts not in (None, 0, 1):
            raise ValueError(
                f"hosts={self.hosts}: a local Service runs on one host; "
                "multi-host replicas need the Kubernetes operator"
            )
        if self.health_poll_rate <= 0:
            raise ValueError(f"health_poll_rate must be > 0, got {self.health_poll_rate}")
        if self.replica_max_concurrent_requests < 1:
            raise ValueError("replica_max_concurrent_requests must be at least 1")
        if not MIN_BODY <= self.max_body_size <= MAX_BODY:
            raise ValueError(
                f"max_body_size must be between {MIN_BODY} and {MAX_BODY} bytes, "
                f"got {self.max_body_size}"
            )


def service_config(options: dict[str, Any]) -> ServiceConfig:
    """A ServiceConfig from `Actor.options(**options)`, one replica unless they say otherwise;
    an option ServiceConfig does not have is refused with the ones it has."""
    known = {f.name for f in fields(ServiceConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; "
            f"ServiceConfig takes: {', '.join(sorted(known))}"
        )
    return ServiceConfig(**{"num_replicas": 1, **options})


class Service(ServiceAPI):
    """N replicas of `actor_def` behind sticky sessions, least-loaded routing and broadcast."""

    def __init__(
        self, cfg: ServiceConfig, actor_def: type, *actor_args: Any, **actor_kwargs: Any
    ) -> None:
        super().__init__(actor_def)
        self.cfg = cfg
        self.actor_def = actor_def
        self.endpoints = endpoints_of(actor_def)
        if not self.endpoints:
            raise ValueError(f"{actor_def.__qualname__} has no @endpoint methods")
        self.actor_path = import_path_of(actor_def)
        # Refused here, before anything starts: a lambda or closure cannot reach a replica.
        values.encode({"args": list(actor_args), "kwargs": actor_kwargs}, trusted=True)
        self.raise_on_session_moved = cfg.raise_on_session_moved
        self.at_most_once = cfg.at_most_once
        self.return_first_rank_result = cfg.return_first_rank_result
        # GPUs are checked here, before anything starts; not where a start would be refused
        # anyway (`start` says why then, which a GpuError would hide).
        self._gpus = (
            gpus.assign(cfg.num_replicas, cfg.procs, gpus.visible_gpus())
            if cfg.with_gpus and spawn_guard.can_spawn()
            else None
        )
        self._replicas = ReplicaSet(
            actor=self.actor_path,
            replicas=cfg.num_replicas,
            args=list(actor_args),
            kwargs=dict(actor_kwargs),
            gpus=self._gpus,
            ranks=cfg.procs,
            name=cfg.mesh_name or "replica",
            env={"KUBEFORGE_LOG_LEVEL": os.environ.get("KUBEFORGE_LOG_LEVEL", "WARNING")},
            flags=[
                "--max-concurrent-requests",
                str(cfg.replica_max_concurrent_requests),
                "--max-queued-requests",
                str(cfg.replica_max_queued_requests),
                "--request-timeout",
                str(cfg.request_timeout),
                "--stream-idle-timeout",
                str(cfg.stream_idle_timeout),
                "--session-ttl",
                str(cfg.session_ttl),
                "--max-body",
                str(cfg.max_body_size),
                "--share-memory",
                *(
                    ["--procs", str(cfg.procs), "--gpus-per-rank", str(int(cfg.with_gpus))]
                    if cfg.procs > 1
                    else []
                ),
            ],
        )
        self._router: Router | None = None

    def _check_endpoint(self, name: str) -> None:
        if name not in self.__dict__.get("endpoints", ()):
            raise AttributeError(
                f"{self.actor_def.__qualname__} has no endpoint {name!r}; "
                f"endpoints: {sorted(self.endpoints)}"
            )

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> Service:
        if self._router is not None:
            return self
        # Before anything else (GPUs included): a start that would recurse (a replica importing
        # an unguarded script, or any process kubeforge started) is refused, not attempted.
        spawn_guard.check_can_spawn("a Service")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.cfg.startup_timeout
        try:
            urls = await loop.run_in_executor(
                None, functools.partial(self._replicas.start, deadline, log.info)
            )
        except BaseException:
            await loop.run_in_executor(None, self._replicas.stop, 1.0)
            raise
        config = RouterConfig(
            health_poll_rate=self.cfg.health_poll_rate,
            request_timeout=router_request_timeout(self.cfg.request_timeout),
            max_body=self.cfg.max_body_size,
            share_memory=True,  # caller and replicas share this host
        )
        self._router = Router(config, StaticDiscovery(urls))
        await self._router.start()
        lifecycle.started(self)
        return self

    async def stop(self) -> None:
        """Stop routing, drain and stop every replica process; none is left behind."""
        lifecycle.stopped(self)
        router, self._router = self._router, None
        if router is not None:
            await router.stop()
        await asyncio.get_running_loop().run_in_executor(
            None, self._replicas.stop, self.cfg.stop_grace
        )

    def stop_at_exit(self) -> None:
        """The interpreter is exiting (no loop to drain through): stop the replica processes."""
        self._router = None
        self._replicas.stop(self.cfg.stop_grace)

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pids(self) -> list[int]:
        """Process ids of the replica processes (for tests and tooling); with procs > 1, each
        replica's launcher, whose children are its ranks."""
        return self._replicas.procs.pids

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError(
                "the Service is not started: await svc.start() or use "
                "'async with Service(...) as svc'"
            )
        return self._router

    # transport ----------------------------------------------------------------------------

    async def _send_call(self, endpoint: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        resp = await self.router.call(wire.CALL_PREFIX + endpoint, body, headers)
        return Reply(
            resp.status,
            resp.body,
            {wire.H_CONTENT_TYPE: resp.content_type, **dict(resp.headers or ())},
        )

    async def _send_stream(self, path: str, body: bytes, headers: dict[bytes, bytes]) -> Reply:
        if path.startswith(wire.CALL_ALL_PREFIX):
            resp = await self.router.broadcast(path[len(wire.CALL_ALL_PREFIX) :], body, headers)
        else:
            resp = await self.router.call(path, body, headers)
        reply = Reply(
            resp.status,
            resp.body,
            {wire.H_CONTENT_TYPE: resp.content_type, **dict(resp.headers or ())},
        )
        stream = resp.body
        if isinstance(stream, BodyStream):
            reply.body = stream.chunks()

            async def release() -> None:
                if not stream.finished:  # left early: the replica's generator is cancelled
                    stream.cancel("the caller stopped reading the stream")

            reply.release = release
        return reply

    async def _send_broadcast(
        self, endpoint: str, body: bytes, headers: dict[bytes, bytes]
    ) -> Reply:
        resp = await self.router.broadcast(endpoint, body, headers)
        return Reply(resp.status, resp.body, {wire.H_CONTENT_TYPE: resp.content_type})

    async def _send_start_session(self) -> Reply:
        resp = await self.router.start_session()
        return Reply(resp.status, resp.body)

    async def _send_end_session(self, session_id: str) -> Reply:
        resp = await self.router.end_session(session_id)
        return Reply(resp.status, resp.body)

    # metrics ------------------------------------------------------------------------------

    def get_metrics_summary(self) -> dict[str, Any]:
        return summary_with_int_keys(report.summary(self.router, time.monotonic()))

    def get_metrics(self) -> ServiceMetrics:
        return ServiceMetrics.from_summary(report.summary(self.router, time.monotonic()))


async def as_service(
    actor_def: type, options: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ServiceHandle:
    """`Actor.options(**options).as_service(*args, **kwargs)`, started."""
    service = await Service(service_config(options), actor_def, *args, **kwargs).start()
    return ServiceHandle(service, actor_def.__name__)


async def as_actor(
    actor_def: type, options: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> ActorHandle:
    """`Actor.options(**options).as_actor(*args, **kwargs)`: one replica (num_replicas is a
    service's option, as in torchforge), of procs x hosts ranks, started."""
    cfg = service_config({**options, "num_replicas": 1})
    service = await Service(cfg, actor_def, *args, **kwargs).start()
    return ActorHandle(service, actor_def.__name__, cfg.procs * (cfg.hosts or 1))
