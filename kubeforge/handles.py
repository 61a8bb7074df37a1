"""The handles torchforge programs hold: what `as_service()` and `as_actor()` return.

A `ServiceHandle` is torchforge's `ServiceInterface`: endpoints take `route()`/`fanout()`, and
every method is awaitable (`get_metrics_summary()` included), whatever the transport: a local
`Service` or a `ServiceClient` to a cluster's router. An `ActorHandle` is a singleton actor, as
Monarch spells its verbs: `call_one()`, `call()`, `choose()`, `broadcast()`. Under both is the
same `ServiceAPI`; an actor is a service of one replica whose ranks answer `call()` in rank order.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from kubeforge.service_api import ServiceAPI, Session

log = logging.getLogger("kubeforge")


async def _value(maybe: Any) -> Any:
    """A local Service answers metrics at once, a client over the network: await either."""
    return await maybe if inspect.isawaitable(maybe) else maybe


class ServiceHandle:
    """torchforge's service interface over a local `Service` or a cluster's router."""

    def __init__(self, service: ServiceAPI, name: str) -> None:
        self._service = service
        self.name = name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._service, name)  # endpoints, call_all, sessions_moved, ...

    async def start_session(self) -> Session:
        return await self._service.start_session()

    async def terminate_session(self, sess_id: str) -> None:
        await self._service.terminate_session(sess_id)

    def session(self) -> AbstractAsyncContextManager[Session]:
        """`async with svc.session() as s:`: calls in the block stick to `s.session_id`."""
        return self._service.session()

    async def get_metrics(self) -> Any:
        return await _value(self._service.get_metrics())  # type: ignore[attr-defined]

    async def get_metrics_summary(self) -> dict[str, Any]:
        return await _value(self._service.get_metrics_summary())  # type: ignore[attr-defined]

    async def shutdown(self) -> None:
        """Stop the service (a local one's replicas). For a cluster's Service: close this
        connection; the Service keeps running, as kubectl owns it."""
        await self._service.stop()  # type: ignore[attr-defined]

    stop = shutdown

    def __repr__(self) -> str:
        return f"<service {self.name}>"


class ActorEndpoint:
    """One endpoint of a singleton actor, with Monarch's verbs."""

    def __init__(self, actor: ActorHandle, name: str) -> None:
        self._actor = actor
        self.name = name

    async def call_one(self, *args: Any, **kwargs: Any) -> Any:
        """The actor's one rank. An actor with several ranks refuses, before anything runs."""
        if self._actor.world_size > 1:
            raise ValueError(
                f"call_one() needs an actor of one rank; {self._actor.name} has "
                f"{self._actor.world_size}: use call() for every rank's result, in rank order, "
                "or choose() for one"
            )
        return await self._actor._call(self.name, args, kwargs, all_ranks=False)

    async def choose(self, *args: Any, **kwargs: Any) -> Any:
        """One rank's result (rank 0's). Every rank runs the call: kubeforge keeps the ranks of
        a replica in one order of calls, so that collectives inside endpoints cannot hang."""
        return await self._actor._call(self.name, args, kwargs, all_ranks=False)

    async def call(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Every rank runs it; every rank's result, in rank order (Monarch's ValueMesh, as a
        list)."""
        return await self._actor._call(self.name, args, kwargs, all_ranks=True)

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """A streaming endpoint's items, as they are yielded (an actor of one rank)."""
        await self._actor._wait_behind()
        items = self._actor._service._stream(self.name, None, args, kwargs)
        async with contextlib.aclosing(items):  # leaving early cancels it at once
            async for item in items:
                yield item

    def broadcast(self, *args: Any, **kwargs: Any) -> asyncio.Task[None]:
        """Every rank runs it; no result, and the caller does not wait (Monarch's fire and
        forget). The actor's next call through this handle waits until it has run, so calls
        keep their order; a failure is logged, as Monarch reports it to the supervisor."""
        return self._actor._send_behind(self.name, args, kwargs)

    def __getattr__(self, verb: str) -> Any:
        if verb in ("route", "fanout"):
            raise NotImplementedError(
                f"You tried to use {verb}() on an actor, not a service. Actors support "
                f"call_one(), call(), choose() and broadcast(): `await actor.{self.name}"
                f".call_one(...)`. For replicas behind route()/fanout(), start it with "
                "`.as_service()`."
            )
        raise AttributeError(f"{type(self).__name__} {self.name!r} has no attribute {verb!r}")

    def __repr__(self) -> str:
        return f"<actor endpoint {self._actor.name}.{self.name}>"


class ActorHandle:
    """A singleton actor: one replica of `world_size` ranks (procs x hosts)."""

    def __init__(self, service: ServiceAPI, name: str, world_size: int) -> None:
        self._service = service
        self.name = name
        self.world_size = world_size
        self._behind: list[asyncio.Task[None]] = []  # broadcasts not yet run

    def __getattr__(self, name: str) -> ActorEndpoint:
        if name.startswith("_"):
            raise AttributeError(name)
        self._service._check_endpoint(name)
        return ActorEndpoint(self, name)

    async def _call(
        self, endpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any], all_ranks: bool
    ) -> Any:
        await self._wait_behind()
        return await self._service._call(endpoint, None, args, kwargs, all_ranks=all_ranks)

    def _send_behind(
        self, endpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> asyncio.Task[None]:
        earlier = list(self._behind)

        async def send() -> None:
            await asyncio.gather(*earlier, return_exceptions=True)
            try:
                await self._service._call(endpoint, None, args, kwargs, all_ranks=True)
            except Exception:
                log.exception("%s.%s.broadcast() failed", self.name, endpoint)

        task = asyncio.get_running_loop().create_task(send())
        self._behind.append(task)
        task.add_done_callback(self._behind.remove)
        return task

    async def _wait_behind(self) -> None:
        if self._behind:
            await asyncio.gather(*self._behind, return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop the actor (its replica's ranks) once the broadcasts sent to it have run."""
        await self._wait_behind()
        await self._service.stop()  # type: ignore[attr-defined]

    stop = shutdown

    def __repr__(self) -> str:
        return f"<actor {self.name} ({self.world_size} rank(s))>"
