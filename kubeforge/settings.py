"""kubeforge's defaults, written once.

The flags of `python -m kubeforge.replica` and `python -m kubeforge.router`, `ServiceConfig`,
`kubeforge run`, the Service resource's schema (and so the CRD) and the pods the operator
writes all take their defaults from `DEFAULTS`, and the figures derived from them from the
functions below, so no number is repeated where it could drift.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass

VERSION = importlib.metadata.version("kubeforge")
# The images of this version: an upgraded operator never starts pods of another version unless
# the Service names an image itself.
CONTROL_IMAGE = f"kubeforge:{VERSION}"  # operator and routers (the repo's Dockerfile)
REPLICA_IMAGE = f"kubeforge-replica:{VERSION}"  # base of actor images (replica_image/)

# The router waits this much longer than the replicas' own limit on a call, so the replica's
# RequestTimeoutError (which says where the time went: queue or actor) reaches the caller.
ROUTER_TIMEOUT_SLACK = 5.0
# Bounds of a Service's maxBodySize: 1 KiB to 8 GiB.
MIN_BODY = 1 << 10
MAX_BODY = 8 << 30
# A replica pod's kubelet grace beyond the replica's drain grace: interpreter exit, last writes.
TERMINATION_SLACK = 5.0


@dataclass(frozen=True)
class Defaults:
    health_poll_rate: float = 0.2  # seconds between health checks of each replica
    health_timeout: float = 2.0  # a health check, or a connect, that takes longer fails
    request_timeout: float = 60.0  # longest a call may take, queue wait included
    stream_idle_timeout: float = 30.0  # longest gap between a stream's items
    max_concurrent_requests: int = 10  # calls one replica runs at once
    max_queued_requests: int = 100  # calls one replica holds beyond those
    session_ttl: float = 1800.0  # idle sessions end after this long
    drain_grace: float = 25.0  # on SIGTERM, a replica waits this long for running calls
    node_loss_grace: float = 30.0  # a replica pod outlives its node's silence this long
    retries: int = 3  # re-sends of a call that failed without an answer
    retry_backoff: float = 0.01  # first pause before re-sending after a refused connect
    max_body: int = 1 << 30  # bytes of one call body (1 GiB: a state dict fits)
    metrics_window: float = 60.0  # seconds of the sliding window rates and latencies use
    startup_timeout: float = 120.0  # a local Service's replicas must be ready within this
    stop_grace: float = 10.0  # a local Service's replicas drain this long on stop
    scale_up_delay: float = 10.0  # autoscaling: load above target this long adds replicas
    scale_down_delay: float = 300.0  # and below target this long removes them
    replica_port: int = 8000
    master_port: int = 29500  # an SPMD replica's torch.distributed rendezvous (MASTER_PORT)
    gang_port: int = 29400  # where rank 0 of an SPMD replica hands calls to the other ranks
    rank_silence: float = 5.0  # a rank not heard from this long makes its replica unready
    router_port: int = 8080


DEFAULTS = Defaults()


def router_request_timeout(request_timeout: float) -> float:
    """The router's own limit on a relayed call, for a Service whose calls may take
    `request_timeout` seconds at the replicas."""
    return request_timeout + ROUTER_TIMEOUT_SLACK


def termination_grace_seconds(drain_grace: float) -> int:
    """A replica pod's terminationGracePeriodSeconds: the kubelet must not kill a replica
    that is still draining."""
    return math.ceil(drain_grace + TERMINATION_SLACK)
