"""kubeforge: replicated Python actors as a Kubernetes-native Service.

The public API keeps torchforge's names: `Actor`, `endpoint`, `Service`, `ServiceConfig`, and
`ServiceClient` for the same calls against a router URL.
"""

from kubeforge.actor import Actor, endpoint
from kubeforge.errors import (
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
from kubeforge.ranks import Rank, current_rank

__all__ = [
    "Actor",
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
    "SessionMovedError",
    "UnguardedMainError",
    "current_rank",
    "endpoint",
]


def __getattr__(name: str) -> object:
    # Lazy: `python -m kubeforge.replica` imports this package and should not pay for aiohttp.
    if name in ("Service", "ServiceConfig"):
        from kubeforge import service

        return getattr(service, name)
    if name == "ServiceClient":
        from kubeforge.client import ServiceClient

        return ServiceClient
    raise AttributeError(f"module 'kubeforge' has no attribute {name!r}")
