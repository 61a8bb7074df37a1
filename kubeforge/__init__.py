"""kubeforge: replicated Python actors as a Kubernetes-native Service.

The public API keeps torchforge's names: `Actor`, `endpoint`, and the errors below.
"""

from kubeforge.actor import Actor, endpoint
from kubeforge.errors import (
    BroadcastError,
    KubeforgeError,
    NoHealthyReplicasError,
    OverloadedError,
    RemoteError,
    ReplicaLostError,
    RequestTimeoutError,
    SessionMovedError,
)

__all__ = [
    "Actor",
    "BroadcastError",
    "KubeforgeError",
    "NoHealthyReplicasError",
    "OverloadedError",
    "RemoteError",
    "ReplicaLostError",
    "RequestTimeoutError",
    "SessionMovedError",
    "endpoint",
]
