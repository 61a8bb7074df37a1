"""Handles to Services that run on a cluster: the same surface as `as_service()`/`as_actor()`.

A torchforge program that runs against Kubernetes changes only where its handles come from:
`await kubeforge.connect(url)` instead of `X.options(...).as_service(...)`, and
`await kubeforge.connect_actor(url)` (a Service with `replicas: 1`) instead of `.as_actor(...)`.
The URL is the Service's router: `status.endpoint` inside the cluster; the token is the
`<name>-token` Secret's. Both check the router at once, so a wrong URL or token fails here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubeforge import lifecycle
from kubeforge.client import ServiceClient
from kubeforge.errors import KubeforgeError
from kubeforge.handles import ActorHandle, ServiceHandle


async def _replicas(client: ServiceClient) -> list[dict[str, Any]]:
    """The router's replicas: proof that the URL and the token are right, or the error."""
    try:
        return await client.replicas()
    except BaseException:
        await client.close()
        raise


async def connect(
    url: str | Sequence[str], *, token: str | None = None, name: str | None = None, **options: Any
) -> ServiceHandle:
    """A service handle to a cluster's Service. `options` are ServiceClient's (timeout,
    at_most_once, return_first_rank_result, ...); `token` defaults to $KUBEFORGE_TOKEN."""
    client = ServiceClient(url, token=token, **options)
    await _replicas(client)
    lifecycle.started(client)
    return ServiceHandle(client, name or client.url)


async def connect_actor(
    url: str | Sequence[str], *, token: str | None = None, name: str | None = None, **options: Any
) -> ActorHandle:
    """An actor handle to a cluster's Service of one replica: its ranks (procs x hosts, as
    the replica reports them) answer `call()` in rank order."""
    client = ServiceClient(url, token=token, **options)
    replicas = await _replicas(client)
    if len(replicas) != 1:
        await client.close()
        raise KubeforgeError(
            f"the Service at {client.url} has {len(replicas)} replicas; an actor is a Service "
            "with `replicas: 1` (use kubeforge.connect() for a service)"
        )
    lifecycle.started(client)
    return ActorHandle(client, name or client.url, int(replicas[0].get("ranks", 1)))
