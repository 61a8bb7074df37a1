"""The objects a Service owns, as plain dicts: replica pods, the router Deployment and Service,
and the token Secret. Pure functions of the Service resource."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

from kubeforge import ranks, tls, tokens
from kubeforge.api import ServiceSpec
from kubeforge.contract import A_ROUTER_HASH as ROUTER_HASH
from kubeforge.contract import (
    API_VERSION,
    GROUP,
    HEALTHZ,
    KIND,
    L_COMPONENT,
    L_HASH,
    L_HOST,
    L_INDEX,
    L_SERVICE,
    LABEL_PREFIX,
    PLURAL,
    READYZ,
)
from kubeforge.settings import (
    CONTROL_IMAGE,
    DEFAULTS,
    REPLICA_IMAGE,
    termination_grace_seconds,
)

# Every pod kubeforge writes passes the `restricted` Pod Security Standard.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# The taints the node lifecycle controller puts on a node that stops reporting. Replica pods
# tolerate them for spec.nodeLossGrace (Kubernetes' default is 300 s), then are evicted.
NODE_LOSS_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")

REPLICA_PORT = DEFAULTS.replica_port
ROUTER_PORT = DEFAULTS.router_port
GPU = "nvidia.com/gpu"


def replica_name(service: str, index: int, host: int = 0) -> str:
    """A replica's pod; a replica of several hosts adds `-<host>` for every pod but the
    leader's, as LeaderWorkerSet names its workers."""
    return f"{service}-replica-{index}" + (f"-{host}" if host else "")


def router_name(service: str) -> str:
    return f"{service}-router"


def token_secret_name(service: str) -> str:
    return f"{service}-token"


def owned_meta(body: dict[str, Any], name: str, component: str) -> dict[str, Any]:
    """Metadata of an object the Service owns (deleted with it), labelled with the Service and
    what the object is to it."""
    return {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": {L_SERVICE: body["metadata"]["name"], L_COMPONENT: component},
        "ownerReferences": [owner_reference(body)],
    }


def _secret(body: dict[str, Any], name: str, role: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": owned_meta(body, name, role),
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def token_secret(body: dict[str, Any], token: str, session_key: str) -> dict[str, Any]:
    """The Service's token Secret, as the operator first creates it (`kubeforge.tokens`)."""
    data = {tokens.KEY_TOKEN: token.encode(), tokens.KEY_SESSION: session_key.encode()}
    return _secret(body, token_secret_name(body["metadata"]["name"]), "token", data)


_TOKEN_VOLUME = "kubeforge-token"


def token_volume(service: str) -> dict[str, Any]:
    """The token Secret as files: the kubelet rewrites them when the Secret changes, and the
    router and replicas reload them, so a rotation needs no restart (`kubeforge.tokens`)."""
    return {"name": _TOKEN_VOLUME, "secret": {"secretName": token_secret_name(service)}}


TOKEN_MOUNT = {"name": _TOKEN_VOLUME, "mountPath": tokens.MOUNT_PATH, "readOnly": True}
TOKEN_ENV = {"name": tokens.ENV_DIR, "value": tokens.MOUNT_PATH}


def tls_secret_name(service: str) -> str:
    return f"{service}-tls"


def tls_secret(body: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """The Service's CA and serving certificate (`kubeforge.tls.issue`), as first created;
    with `tls.PENDING`, the Secret cert-manager fills in (made by the operator, so that it is
    the Service's and goes with it, and every key mounts while the first certificate is
    issued)."""
    return _secret(body, tls_secret_name(body["metadata"]["name"]), "tls", files)


CERTIFICATE_API = "cert-manager.io/v1"


def tls_certificate(body: dict[str, Any]) -> dict[str, Any] | None:
    """The cert-manager Certificate for the replicas' serving certificate, when the spec
    names an issuer: the same name and the same Secret as the operator's own would have."""
    spec = ServiceSpec.model_validate(body["spec"])
    ref = spec.tls.issuer_ref
    if not tls_on(spec) or ref is None:
        return None
    service, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    return {
        "apiVersion": CERTIFICATE_API,
        "kind": "Certificate",
        "metadata": owned_meta(body, tls_secret_name(service), "tls"),
        "spec": {
            "secretName": tls_secret_name(service),
            "dnsNames": [tls.server_name(service, namespace)],
            "usages": ["server auth", "digital signature"],
            # A new key with every certificate, as the operator's own CA does.
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": ref.model_dump(),
        },
    }


def tls_on(spec: ServiceSpec) -> bool:
    """After `resolve_defaults`, the spec says; unresolved, TLS is off (the operator's
    default)."""
    return spec.tls.enabled is True


def replica_port_name(spec: ServiceSpec) -> str:
    return "https" if tls_on(spec) else "http"


def resolve_defaults(body: dict[str, Any], tls_default: bool) -> dict[str, Any]:
    """`body` with the operator's defaults written into what the spec leaves unset, so the pod
    template (and its hash) says what runs."""
    spec = body.get("spec") or {}
    asked = spec.get("tls") or {}
    if asked.get("enabled") is not None:
        return body
    on = tls_default or bool(asked.get("issuerRef"))  # naming an issuer asks for TLS
    return {**body, "spec": {**spec, "tls": {**asked, "enabled": on}}}


_TLS_VOLUME = "kubeforge-tls"
TLS_MOUNT = {"name": _TLS_VOLUME, "mountPath": tls.MOUNT_PATH, "readOnly": True}
TLS_ENV = {"name": tls.ENV_DIR, "value": tls.MOUNT_PATH}


def tls_volume(service: str, ca_only: bool = False) -> dict[str, Any]:
    """The `<name>-tls` Secret: all of it for replicas, its CA alone for routers."""
    secret: dict[str, Any] = {"secretName": tls_secret_name(service)}
    if ca_only:
        secret["items"] = [{"key": tls.KEY_CA, "path": tls.KEY_CA}]
    return {"name": _TLS_VOLUME, "secret": secret}


def selector(service: str) -> str:
    """status.selector: the replica pods of this Service (used by the scale subresource)."""
    return f"{L_SERVICE}={service},{L_COMPONENT}=replica"


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _user_labels(body: dict[str, Any]) -> dict[str, str]:
    """The resource's labels reach its pods (queueing and gang schedulers select on them)."""
    return {
        k: v
        for k, v in (body["metadata"].get("labels") or {}).items()
        if not k.startswith(LABEL_PREFIX)
    }


def _user_annotations(body: dict[str, Any]) -> dict[str, str]:
    return {
        k: v
        for k, v in (body["metadata"].get("annotations") or {}).items()
        if not k.startswith((LABEL_PREFIX, "kopf.", "kubectl.kubernetes.io/"))
    }


def _rank_env(spec: ServiceSpec) -> list[dict[str, Any]]:
    """An SPMD replica's pods find rank 0 at the leader pod's IP: its own, in the template;
    the other pods of the group get it written in (`replica_pod`)."""
    if spec.world_size == 1:
        return []
    return [
        {"name": ranks.MASTER_ADDR, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": ranks.HOST_INDEX, "value": "0"},
    ]


def probes(port: str = "http") -> dict[str, Any]:
    """The kubelet's probes of a replica or router container. Readiness answers fast either way
    (a 503 says at once that it takes no calls); liveness restarts a process only after it has
    not answered for 30 s, and waits until it has bound its port (up to 2 min: importing torch
    on a busy node takes long). A probe that merely waits for a CPU is no failure: on a node
    whose cores are all busy (2 cores, 8 torch processes in the kind lane) tighter probes
    killed replicas that were starting, and took healthy ones out of rotation."""
    http = {"port": port, "scheme": port.upper()}
    return {
        "startupProbe": {
            "httpGet": {"path": HEALTHZ, **http},
            "periodSeconds": 1,
            "timeoutSeconds": 5,
            "failureThreshold": 120,
        },
        "readinessProbe": {
            "httpGet": {"path": READYZ, **http},
            "periodSeconds": 2,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": HEALTHZ, **http},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def replica_container(spec: ServiceSpec, service: str) -> dict[str, Any]:
    resources = json.loads(json.dumps(spec.resources or {}))
    if spec.gpus_per_replica:  # split evenly over the group's pods (the schema says it can be)
        resources.setdefault("limits", {})[GPU] = spec.gpus_per_replica // spec.hosts
    port = replica_port_name(spec)
    return {
        "name": "replica",
        "image": spec.image or REPLICA_IMAGE,
        "command": ["python", "-m", "kubeforge.replica"],
        "args": [
            "--actor",
            spec.actor,
            "--args",
            json.dumps(spec.args),
            "--kwargs",
            json.dumps(spec.kwargs),
            "--port",
            str(REPLICA_PORT),
            *spec.replica_flags(),
        ],
        "env": [
            {
                "name": "KUBEFORGE_REPLICA_NAME",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
            TOKEN_ENV,
            *([TLS_ENV] if tls_on(spec) else []),
            *_rank_env(spec),
            *spec.env,
        ],
        # Named by what it speaks, so that a scraper (the chart's PodMonitor) picks the scheme.
        "ports": [{"name": port, "containerPort": REPLICA_PORT}],
        "volumeMounts": [TOKEN_MOUNT, *([TLS_MOUNT] if tls_on(spec) else [])],
        **probes(port),
        "resources": resources,
        # Actor code may write where it likes (caches, /tmp): the root stays writable here.
        "securityContext": CONTAINER_SECURITY,
    }


def pod_template(body: dict[str, Any]) -> dict[str, Any]:
    """Everything about a replica pod except its index: what the template hash covers."""
    spec = ServiceSpec.model_validate(body["spec"])
    service = body["metadata"]["name"]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        # The kubelet waits out the replica's drain before it kills it.
        "terminationGracePeriodSeconds": termination_grace_seconds(spec.drain_grace_seconds),
        "securityContext": POD_SECURITY,
        "containers": [replica_container(spec, service)],
    }
    for field, key in (
        ("node_selector", "nodeSelector"),
        ("tolerations", "tolerations"),
        ("affinity", "affinity"),
        ("image_pull_secrets", "imagePullSecrets"),
        ("priority_class_name", "priorityClassName"),
        ("runtime_class_name", "runtimeClassName"),
        ("scheduler_name", "schedulerName"),
    ):
        value = getattr(spec, field)
        if value:
            pod_spec[key] = value
    tolerations = list(spec.tolerations or [])
    for taint in NODE_LOSS_TAINTS:
        if not any(t.get("key") == taint for t in tolerations):
            tolerations.append(
                {
                    "key": taint,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": math.ceil(spec.node_loss_grace_seconds),
                }
            )
    pod_spec["tolerations"] = tolerations
    overlay = (spec.pod_template or {}).get("spec", {})
    # The overlay goes under the fields the operator owns: it cannot replace the container.
    # A replica never calls the API server: no credentials, unless the overlay asks for them.
    defaults = {"automountServiceAccountToken": False}
    ours = [token_volume(service), *([tls_volume(service)] if tls_on(spec) else [])]
    pod_spec["volumes"] = [*overlay.get("volumes", []), *ours]
    merged = {**defaults, **{k: v for k, v in overlay.items() if k != "containers"}, **pod_spec}
    return {"labels": _user_labels(body), "annotations": _user_annotations(body), "spec": merged}


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def replica_pod(
    body: dict[str, Any], index: int, host: int = 0, leader_ip: str = ""
) -> dict[str, Any]:
    """Pod `host` of replica `index`. Every pod of a group has the template's hash; the pods
    after the leader differ only in what makes them followers: their host index, rank 0's
    address, and no HTTP port or probes (rank 0 alone serves calls)."""
    service = body["metadata"]["name"]
    template = pod_template(body)
    labels = {
        **template["labels"],
        L_SERVICE: service,
        L_COMPONENT: "replica",
        L_INDEX: str(index),
        L_HASH: template_hash(template),
    }
    spec = template["spec"]
    if int(body["spec"].get("hosts", 1)) > 1:
        labels[L_HOST] = str(host)
    if host:
        spec = json.loads(json.dumps(spec))
        container = spec["containers"][0]
        for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe"):
            container.pop(key, None)
        pinned = {ranks.MASTER_ADDR: leader_ip, ranks.HOST_INDEX: str(host)}
        container["env"] = [
            {"name": e["name"], "value": pinned[e["name"]]} if e["name"] in pinned else e
            for e in container["env"]
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": replica_name(service, index, host),
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "annotations": template["annotations"],
            "ownerReferences": [owner_reference(body)],
        },
        "spec": spec,
    }


def router_objects(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The router Deployment and its ClusterIP Service `<name>-router`."""
    spec = ServiceSpec.model_validate(body["spec"])
    service, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    labels = {L_SERVICE: service, L_COMPONENT: "router"}
    meta = {
        "name": router_name(service),
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(body)],
    }
    container = {
        "name": "router",
        "image": spec.image or CONTROL_IMAGE,
        "command": ["python", "-m", "kubeforge.router"],
        "args": [
            "--service",
            service,
            "--namespace",
            namespace,
            "--port",
            str(ROUTER_PORT),
            *spec.router_flags(),
        ],
        "env": [
            TOKEN_ENV,
            *([TLS_ENV] if tls_on(spec) else []),
            {  # names this router's share of the metrics in status.routers
                "name": "KUBEFORGE_ROUTER_NAME",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
        ],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        "volumeMounts": [TOKEN_MOUNT, *([TLS_MOUNT] if tls_on(spec) else [])],
        **probes(),
        "resources": spec.router.resources or {},
        "securityContext": {**CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": dict(meta),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": router_name(service),
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [
                        token_volume(service),
                        *([tls_volume(service, ca_only=True)] if tls_on(spec) else []),
                    ],
                },
            },
        },
    }
    # The operator re-applies the Deployment when this changes (router settings, image, ...).
    deployment["metadata"]["annotations"] = {
        ROUTER_HASH: hashlib.sha256(
            json.dumps(deployment["spec"], sort_keys=True).encode()
        ).hexdigest()[:10]
    }
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": dict(meta),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http"}],
        },
    }
    return [deployment, svc]


def router_rules(service: str) -> list[dict[str, Any]]:
    """What a Service's routers may do, and no more: exactly what tests/e2e/test_rbac_audit.py
    sees routers use. Their own Service only: its watch names it in a field selector, which
    RBAC checks against resourceNames as it does a name in the path."""
    own = {"resourceNames": [service]}
    return [
        # Discovery: the replica pods (listed, then watched; pods are selected by label, which
        # RBAC cannot restrict), and the resource's router settings (watched).
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["watch"], **own},
        # Live metrics and healthyReplicas into the resource's status (nothing else in it).
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"], **own},
    ]


def router_identity(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The router's ServiceAccount, Role and RoleBinding: discovery and its status fields."""
    service, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    meta = {
        "name": router_name(service),
        "namespace": namespace,
        "labels": {L_SERVICE: service, L_COMPONENT: "router"},
        "ownerReferences": [owner_reference(body)],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": router_rules(service),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": router_name(service),
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": router_name(service), "namespace": namespace}
            ],
        },
    ]


def endpoint(body: dict[str, Any]) -> str:
    meta = body["metadata"]
    return f"http://{router_name(meta['name'])}.{meta['namespace']}.svc:{ROUTER_PORT}"


def network_policy_names(service: str) -> tuple[str, str]:
    """The Service's two NetworkPolicies: its replicas', its routers'."""
    return f"{service}-replicas", f"{service}-router"


def network_policies(body: dict[str, Any], on_by_default: bool = True) -> list[dict[str, Any]]:
    """Who may connect to the Service's pods; [] when its policies are off.

    Replicas: the replica port from this Service's routers (and `replicaFrom`), any port from
    the Service's other replica pods (a replica of several hosts: its gang and collectives).
    Routers: the router port from `routerFrom`, else from anywhere. Egress stays open: actors
    fetch weights and datasets from wherever they live.
    """
    spec = ServiceSpec.model_validate(body["spec"])
    wanted = spec.network_policy
    if not (on_by_default if wanted.enabled is None else wanted.enabled):
        return []
    service = body["metadata"]["name"]
    replicas_name, router_policy = network_policy_names(service)

    def pods(component: str) -> dict[str, Any]:
        return {"matchLabels": {L_SERVICE: service, L_COMPONENT: component}}

    def policy(name: str, component: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": owned_meta(body, name, component),
            "spec": {
                "podSelector": pods(component),
                "policyTypes": ["Ingress"],
                "ingress": ingress,
            },
        }

    replica_port = [{"protocol": "TCP", "port": REPLICA_PORT}]
    from_routers = [{"podSelector": pods("router")}, *wanted.replica_from]
    router_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": ROUTER_PORT}]}
    if wanted.router_from:
        router_rule["from"] = wanted.router_from
    return [
        policy(
            replicas_name,
            "replica",
            [
                {"from": from_routers, "ports": replica_port},
                {"from": [{"podSelector": pods("replica")}]},
            ],
        ),
        policy(router_policy, "router", [router_rule]),
    ]
