"""The replica: one actor instance served over HTTP (`python -m kubeforge.replica`)."""

from kubeforge.replica.server import ReplicaConfig, ReplicaServer

__all__ = ["ReplicaConfig", "ReplicaServer"]
