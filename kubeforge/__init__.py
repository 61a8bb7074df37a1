"""kubeforge: replicated Python actors as a Kubernetes-native Service.

The public API keeps torchforge's names: `Actor` (with `options()`, `as_service()`,
`as_actor()`, `shutdown()`), `endpoint`, `Service`, `ServiceConfig`, and `shutdown()` for all
of them; `ServiceClient`, `connect()` and `connect_actor()` for the same calls against a
cluster's routers.
"""

from kubeforge.actor import Actor, current_session, endpoint
from kubeforge.errors import (
    BadRequestError,
    BroadcastError,
    KubeforgeError,
    NestedSpawnError,
    NoHealthyReplicasError,
    OverloadedError,
    RemoteError,
    ReplicaLostError,
    RequestTimeoutError,
    SessionMovedError,
    UnguardedMainError,
)
from kubeforge.lifecycle import shutdown
from kubeforge.ranks import Rank, current_rank

__all__ = [
    "Actor",
    "ActorHandle",
    "BadRequestError",
    "BroadcastError",
    "KubeforgeError",
    "NestedSpawnError",
    "NoHealthyReplicasError",
    "OverloadedError",
    "Rank",
    "RemoteError",
    "ReplicaLostError",
    "RequestTimeoutError",
    "Service",
    "ServiceClient",
    "ServiceConfig",
    "ServiceHandle",
    "SessionMovedError",
    "UnguardedMainError",
    "connect",
    "connect_actor",
    "current_rank",
    "current_session",
    "endpoint",
    "shutdown",
]


def __getattr__(name: str) -> object:
    # Lazy: `python -m kubeforge.replica` imports this package and should not pay for aiohttp.
    if name in ("Service", "ServiceConfig"):
        from kubeforge import service

        return getattr(service, name)
    if name == "ServiceClient":
        from kubeforge.client import ServiceClient

        return ServiceClient
    if name in ("connect", "connect_actor"):
        from kubeforge import remote

        return getattr(remote, name)
    if name in ("ServiceHandle", "ActorHandle"):
        from kubeforge import handles

        return getattr(handles, name)
    raise AttributeError(f"module 'kubeforge' has no attribute {name!r}")
