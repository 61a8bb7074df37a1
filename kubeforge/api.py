"""The `Service` resource's spec as pydantic models: the single source of truth for its shape.

`kubeforge run` reads a manifest through these models; the operator and the CRD schema derive
from them too, so a spec that runs locally means the same thing on a cluster.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kubeforge._runtime import duration, format_duration
from kubeforge.contract import API_VERSION, KIND
from kubeforge.operator.autoscale import Policy
from kubeforge.settings import DEFAULTS, MAX_BODY, MIN_BODY, router_request_timeout

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?)(ms|s|m|h)$"
ACTOR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*$"


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class AutoscalingSpec(_Model):
    """With it, the operator owns `replicas`: it follows the load the routers publish."""

    model_config = ConfigDict(
        populate_by_name=True,
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not be above maxReplicas",
                    "fieldPath": ".minReplicas",
                },
                {
                    "rule": "duration(self.scaleUpDelay) <= duration('1h') && "
                    "duration(self.scaleDownDelay) <= duration('1h')",
                    "message": "scaleUpDelay and scaleDownDelay must be at most 1h",
                    "fieldPath": ".scaleUpDelay",
                },
            ]
        },
    )
    min_replicas: int = Field(1, alias="minReplicas", ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(..., alias="maxReplicas", ge=1, le=1000, description="Most replicas.")
    target_in_flight: float = Field(
        ...,
        alias="targetInFlight",
        gt=0,
        le=10000,
        description="Calls running or queued per replica that the count aims at.",
    )
    scale_up_delay: str = Field(
        format_duration(DEFAULTS.scale_up_delay),
        alias="scaleUpDelay",
        pattern=DURATION_PATTERN,
        description="Load must stay above target this long before replicas are added.",
    )
    scale_down_delay: str = Field(
        format_duration(DEFAULTS.scale_down_delay),
        alias="scaleDownDelay",
        pattern=DURATION_PATTERN,
        description="Load must stay below target this long before replicas are removed.",
    )

    def policy(self) -> Policy:
        return Policy(
            self.min_replicas,
            self.max_replicas,
            self.target_in_flight,
            duration(self.scale_up_delay),
            duration(self.scale_down_delay),
        )


class RouterSpec(_Model):
    replicas: int = Field(1, ge=1, description="Router pods (sessions survive any of them).")
    resources: dict[str, Any] | None = Field(None, description="Router container resources.")


class NetworkPolicySpec(_Model):
    """Who may connect to the Service's pods: the operator writes a NetworkPolicy for its
    replicas and one for its routers (enforced where the cluster's network plugin does so)."""

    enabled: bool | None = Field(
        None,
        description="Write the policies; unset: the operator's default (on, unless the "
        "chart's networkPolicy.enabled is false).",
    )
    replica_from: list[dict[str, Any]] = Field(
        default_factory=list,
        alias="replicaFrom",
        description="NetworkPolicyPeers that may reach the replicas' port besides this "
        "Service's routers (a metrics scraper, say).",
    )
    router_from: list[dict[str, Any]] = Field(
        default_factory=list,
        alias="routerFrom",
        description="NetworkPolicyPeers that may reach the router's port; empty: any.",
    )


class IssuerRef(_Model):
    """A cert-manager issuer, as a cert-manager Certificate names it."""

    name: str = Field(..., min_length=1, description="The Issuer's or ClusterIssuer's name.")
    kind: Literal["Issuer", "ClusterIssuer"] = Field(
        "Issuer", description="Issuer (in the Service's namespace) or ClusterIssuer."
    )
    group: str = Field("cert-manager.io", min_length=1, description="The issuer's API group.")


class TlsSpec(_Model):
    """TLS between the Service's routers and its replicas (Secret `<name>-tls`): a CA of the
    Service's own made by the operator, or a certificate cert-manager issues and renews when
    `issuerRef` names an issuer. Routers verify the replicas' certificate against `ca.crt`."""

    enabled: bool | None = Field(
        None,
        description="Serve TLS; unset: the operator's default (on, unless the chart's "
        "tls.enabled is false).",
    )
    issuer_ref: IssuerRef | None = Field(
        None,
        alias="issuerRef",
        description="Have cert-manager issue (and renew) the replicas' certificate from this "
        "issuer, which must put the CA in ca.crt (a CA or self-signed issuer does); unset: the "
        "operator's own CA.",
    )


_ISSUER = "(has(self.tls) && has(self.tls.issuerRef))"
_SPEC_RULES = [
    {
        "rule": "duration(self.healthPollRate) >= duration('10ms')",
        "message": "healthPollRate must be at least 10ms",
        "fieldPath": ".healthPollRate",
    },
    {
        "rule": "duration(self.requestTimeout) >= duration(self.healthPollRate)",
        "message": "requestTimeout must not be shorter than healthPollRate",
        "fieldPath": ".requestTimeout",
    },
    {
        "rule": "duration(self.drainGrace) <= duration('1h')",
        "message": "drainGrace must be at most 1h",
        "fieldPath": ".drainGrace",
    },
    {
        "rule": "duration(self.nodeLossGrace) <= duration('1h')",
        "message": "nodeLossGrace must be at most 1h",
        "fieldPath": ".nodeLossGrace",
    },
    {
        "rule": "self.gpusPerReplica % (self.procs * self.hosts) == 0",
        "message": "gpusPerReplica must be a multiple of procs x hosts: every rank gets the "
        "same number of GPUs",
        "fieldPath": ".gpusPerReplica",
    },
    {
        # Routers trust the CA they started with; a certificate from another issuer would
        # fail their check until they restarted.
        "rule": f"{_ISSUER} == {_ISSUER.replace('self', 'oldSelf')} && (!{_ISSUER} || "
        "self.tls.issuerRef == oldSelf.tls.issuerRef)",
        "message": "tls.issuerRef is fixed when the Service is created: make a new Service to "
        "have its certificate issued another way",
        "fieldPath": ".tls.issuerRef",
    },
]

# A string field where "" has no meaning: refused (by the schema too), naming the field.
NonEmpty = Annotated[str, Field(min_length=1)]


class ServiceSpec(_Model):
    model_config = ConfigDict(
        populate_by_name=True,
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": _SPEC_RULES},
    )

    replicas: int = Field(1, ge=0, description="Actor replicas, each with its GPUs.")
    gpus_per_replica: int = Field(
        0,
        alias="gpusPerReplica",
        ge=0,
        description="nvidia.com/gpu of each replica, split evenly over its hosts' pods and "
        "then over their ranks.",
    )
    procs: int = Field(
        1,
        ge=1,
        le=64,
        description="Rank processes per pod (torchforge's procs): every call runs on every "
        "rank, in one order; rank 0 answers.",
    )
    hosts: int = Field(
        1,
        ge=1,
        le=64,
        description="Pods per replica (torchforge's hosts), created and replaced together; "
        "ranks are numbered across them.",
    )
    health_poll_rate: str = Field(
        format_duration(DEFAULTS.health_poll_rate),
        alias="healthPollRate",
        pattern=DURATION_PATTERN,
        description="How often the router checks each replica.",
    )
    image: NonEmpty | None = Field(
        None, description="Replica image (built FROM replica_image/); default: this version's."
    )
    actor: str = Field(..., pattern=ACTOR_PATTERN, description="The actor, as module:Class.")
    args: list[Any] = Field(default_factory=list, description="Positional constructor args.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword constructor args.")
    max_concurrent_requests: int = Field(
        DEFAULTS.max_concurrent_requests,
        alias="maxConcurrentRequests",
        ge=1,
        description="Calls one replica runs at once.",
    )
    request_timeout: str = Field(
        format_duration(DEFAULTS.request_timeout),
        alias="requestTimeout",
        pattern=DURATION_PATTERN,
        description="Longest a call may take, queue wait included.",
    )
    stream_idle_timeout: str = Field(
        format_duration(DEFAULTS.stream_idle_timeout),
        alias="streamIdleTimeout",
        pattern=DURATION_PATTERN,
        description="Longest gap between a streaming endpoint's items; requestTimeout "
        "bounds the whole stream.",
    )
    max_body_size: int = Field(
        DEFAULTS.max_body,
        alias="maxBodySize",
        ge=MIN_BODY,
        le=MAX_BODY,
        description="Largest call body in bytes (a state dict for a weight update, say): "
        "larger ones are refused with 413 before they are read.",
    )
    drain_grace: str = Field(
        format_duration(DEFAULTS.drain_grace),
        alias="drainGrace",
        pattern=DURATION_PATTERN,
        description="How long a stopping replica lets running calls finish; the pod's "
        "termination grace is set a little longer.",
    )
    node_loss_grace: str = Field(
        format_duration(DEFAULTS.node_loss_grace),
        alias="nodeLossGrace",
        pattern=DURATION_PATTERN,
        description="How long a replica pod stays on a node that stopped reporting (NotReady "
        "or unreachable) before it is evicted and replaced on another node.",
    )
    env: list[dict[str, Any]] = Field(default_factory=list, description="Replica env vars.")
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = Field(None, alias="nodeSelector")
    tolerations: list[dict[str, Any]] | None = None
    affinity: dict[str, Any] | None = None
    image_pull_secrets: list[dict[str, Any]] | None = Field(None, alias="imagePullSecrets")
    priority_class_name: NonEmpty | None = Field(None, alias="priorityClassName")
    runtime_class_name: NonEmpty | None = Field(None, alias="runtimeClassName")
    scheduler_name: NonEmpty | None = Field(None, alias="schedulerName")
    pod_template: dict[str, Any] | None = Field(None, alias="podTemplate")
    router: RouterSpec = Field(default_factory=RouterSpec)
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, alias="networkPolicy"
    )
    tls: TlsSpec = Field(default_factory=TlsSpec)
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Follow the load; without it, replicas is yours (kubectl scale, HPA)."
    )

    @property
    def health_poll_seconds(self) -> float:
        return duration(self.health_poll_rate)

    @property
    def request_timeout_seconds(self) -> float:
        return duration(self.request_timeout)

    @property
    def drain_grace_seconds(self) -> float:
        return duration(self.drain_grace)

    @property
    def node_loss_grace_seconds(self) -> float:
        return duration(self.node_loss_grace)

    @model_validator(mode="after")
    def _gpus_split_evenly(self) -> ServiceSpec:
        """The CEL rule on gpusPerReplica, for manifests that never meet the API server."""
        if self.gpus_per_replica % self.world_size:
            rule = next(r for r in _SPEC_RULES if r["fieldPath"] == ".gpusPerReplica")
            raise ValueError(rule["message"])
        return self

    @property
    def world_size(self) -> int:
        """Ranks of one replica."""
        return self.procs * self.hosts

    def replica_flags(self) -> list[str]:
        """`python -m kubeforge.replica` flags for what the spec says of each replica; pods
        and `kubeforge run` start replicas with exactly these."""
        flags = [
            "--max-concurrent-requests",
            str(self.max_concurrent_requests),
            "--request-timeout",
            self.request_timeout,
            "--stream-idle-timeout",
            self.stream_idle_timeout,
            "--drain-grace",
            self.drain_grace,
            "--max-body",
            str(self.max_body_size),
        ]
        if self.world_size > 1:
            flags += ["--procs", str(self.procs), "--hosts", str(self.hosts)]
            flags += ["--gpus-per-rank", str(self.gpus_per_replica // self.world_size)]
        return flags

    def router_flags(self) -> list[str]:
        """`python -m kubeforge.router` flags for every spec field the router uses; the router
        Deployment and `kubeforge run` pass exactly these, and a router in a cluster follows
        later changes of the same fields (`k8s_discovery.router_settings`)."""
        return [
            "--health-poll-rate",
            self.health_poll_rate,
            "--request-timeout",
            format_duration(router_request_timeout(self.request_timeout_seconds)),
            "--max-body",
            str(self.max_body_size),
        ]


class Condition(BaseModel):
    """Kubernetes API conventions' condition: Ready, Progressing, Degraded."""

    model_config = ConfigDict(populate_by_name=True)
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field("", pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$")
    message: str = ""
    observed_generation: int | None = Field(None, alias="observedGeneration", ge=0)
    last_transition_time: str | None = Field(None, alias="lastTransitionTime")


class ReplicaStatus(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    index: int = Field(..., ge=0)
    pod: str
    phase: str = ""
    ready: bool = False
    reason: str = ""


class ReplicaMetrics(BaseModel):
    """One replica as the router sees it."""

    model_config = ConfigDict(populate_by_name=True)
    name: str
    index: int = Field(..., ge=0)
    state: str = ""
    request_rate: float = Field(0.0, alias="requestRate")
    p50_latency_ms: float = Field(0.0, alias="p50LatencyMs")
    in_flight: int = Field(0, alias="inFlight")
    queue_depth: int = Field(0, alias="queueDepth")
    sessions: int = 0
    token_digest: str = Field(
        "", alias="tokenDigest", description="Fingerprint of the tokens the replica has loaded."
    )


class Traffic(BaseModel):
    """Rates and latencies of calls, as measured at a router."""

    model_config = ConfigDict(populate_by_name=True)
    request_rate: float = Field(0.0, alias="requestRate")
    error_rate: float = Field(0.0, alias="errorRate")
    p50_latency_ms: float = Field(0.0, alias="p50LatencyMs")
    p95_latency_ms: float = Field(0.0, alias="p95LatencyMs")
    p99_latency_ms: float = Field(0.0, alias="p99LatencyMs")
    in_flight: float = Field(
        0.0,
        alias="inFlight",
        description="Calls open at the routers (running or queued at a "
        "replica), averaged over the last status interval; the autoscaler's load.",
    )


class ServiceMetrics(Traffic):
    """Written by the routers at a throttled rate, only when the figures change; the printer
    columns read from here. The operator never writes `metrics`, `routers` or
    `healthyReplicas`."""

    queue_depth: int = Field(0, alias="queueDepth")
    active_sessions: int = Field(0, alias="activeSessions")
    replicas: list[ReplicaMetrics] = Field(default_factory=list)
    last_update_time: str | None = Field(None, alias="lastUpdateTime")


class RouterReplicaShare(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    request_rate: float = Field(0.0, alias="requestRate")
    p50_latency_ms: float = Field(0.0, alias="p50LatencyMs")
    in_flight: int = Field(0, alias="inFlight")


class RouterShare(Traffic):
    """One router pod's part of the traffic; `metrics` combines every live router's share."""

    replicas: dict[str, RouterReplicaShare] = Field(
        default_factory=dict, description="Per replica pod name."
    )
    token_digest: str = Field(
        "", alias="tokenDigest", description="Fingerprint of the tokens the router has loaded."
    )
    last_update_time: str | None = Field(None, alias="lastUpdateTime")


class AutoscalerStatus(BaseModel):
    """The autoscaler's latest decision that changed something, and why."""

    model_config = ConfigDict(populate_by_name=True)
    desired_replicas: int = Field(0, alias="desiredReplicas")
    reason: str = ""
    message: str = ""
    last_scale_time: str | None = Field(None, alias="lastScaleTime")


class ServiceStatus(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    observed_generation: int | None = Field(None, alias="observedGeneration")
    replicas: int = 0
    ready_replicas: int = Field(0, alias="readyReplicas")
    healthy_replicas: int = Field(0, alias="healthyReplicas")
    updated_replicas: int = Field(0, alias="updatedReplicas")
    selector: str = Field("", description="Label selector of the replica pods (scale subresource).")
    endpoint: str = Field("", description="The router's in-cluster URL.")
    conditions: list[Condition] = Field(default_factory=list)
    replica_statuses: list[ReplicaStatus] = Field(default_factory=list, alias="replicaStatuses")
    metrics: ServiceMetrics | None = None
    routers: dict[str, RouterShare] = Field(
        default_factory=dict, description="Each router pod's share of the metrics, by pod name."
    )
    autoscaler: AutoscalerStatus | None = None


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ServiceManifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: str = Field(..., alias="apiVersion")
    kind: str
    metadata: Metadata
    spec: ServiceSpec
    status: dict[str, Any] | None = None


class ManifestError(ValueError):
    """A manifest that is not a valid kubeforge Service; the message names each bad field."""


def parse_manifest(doc: Any, source: str = "manifest") -> ServiceManifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a YAML mapping, got {type(doc).__name__}")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ManifestError(
            f"{source}: expected apiVersion: {API_VERSION} and kind: {KIND}, got "
            f"apiVersion: {doc.get('apiVersion')!r}, kind: {doc.get('kind')!r}"
        )
    try:
        return ServiceManifest.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ManifestError(f"{source}: invalid Service: {problems}") from None
