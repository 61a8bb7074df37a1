"""kopf handlers: translate between the Kubernetes API and the pure planner. Nothing else.

Reconcile runs on events, not on timers. Watch events on a Service, its replica pods and its
children (router Deployment, Service, ServiceAccount, Role, RoleBinding) keep an in-memory view
of them (`World`) and ask for that Service's reconcile, which reads only that view: it writes
only what differs (pods from the plan, children whose fingerprint drifted, status fields that
changed), so an idle Service costs the API server nothing beyond the watches. A slow safety
timer (minutes) asks too.

Every decorator and call names the group (`kubeforge.dev`): the core v1 `Service` wins every
ambiguous lookup.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeforge import tls
from kubeforge.api import ServiceSpec
from kubeforge.contract import GROUP, L_COMPONENT, L_SERVICE, PLURAL, VERSION
from kubeforge.kube import api_client, api_message
from kubeforge.operator import children as ch
from kubeforge.operator import manifests as m
from kubeforge.operator.autoscale import Load, Why, decide
from kubeforge.operator.plan import Observed, PodView, plan

SAFETY_EVERY = 300.0  # seconds: the only periodic work, a net under missed events
FIELD_MANAGER = "kubeforge-operator"
APPLY = "application/apply-patch+yaml"

log = logging.getLogger("kubeforge.operator")
_api: client.ApiClient | None = None

Key = tuple[str, str]  # (namespace, Service name)


@dataclass
class World:
    """What the watches said last, per Service: the resource, its pods, its children."""

    services: dict[Key, dict[str, Any]] = field(default_factory=dict)
    pods: dict[Key, dict[str, PodView]] = field(default_factory=dict)
    children: dict[Key, dict[tuple[str, str], str]] = field(default_factory=dict)
    tokens: set[Key] = field(default_factory=set)  # token Secret known to exist
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)
    rechecks: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)  # one per Service
    loads: dict[Key, Load] = field(default_factory=dict)  # the autoscaler's samples
    # Whether a Service that does not say gets NetworkPolicies and TLS (`kubeforge operator
    # --no-network-policy / --no-tls`, the chart's networkPolicy.enabled and tls.enabled).
    network_policy: bool = True
    tls: bool = True
    tls_secrets: set[Key] = field(default_factory=set)  # TLS Secret known to exist
    certificates: dict[Key, str] = field(default_factory=dict)  # cert-manager's, as applied


_world = World()


def defaults(network_policy: bool, tls: bool) -> None:
    """What Services that do not say get (set before the operator runs)."""
    _world.network_policy = network_policy
    _world.tls = tls


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _api
    prefix = GROUP
    settings.persistence.finalizer = f"{prefix}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.execution.default_backoff = 2
    settings.posting.level = logging.INFO
    _api = await api_client()


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    if _api is not None:
        await _api.close()


# events -----------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_service(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    if event["type"] == "DELETED":
        for table in (_world.services, _world.pods, _world.children, _world.locks, _world.loads):
            table.pop(key, None)  # type: ignore[attr-defined]
        _world.tokens.discard(key)
        _world.tls_secrets.discard(key)
        _world.certificates.pop(key, None)
        if (timer := _world.rechecks.pop(key, None)) is not None:
            timer.cancel()
        return
    _world.services[key] = dict(body)
    _schedule(key)


@kopf.on.event("v1", "pods", labels={L_COMPONENT: "replica"})
async def on_pod(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.labels.get(L_SERVICE, ""))
    pods = _world.pods.setdefault(key, {})
    if event["type"] == "DELETED":
        pods.pop(body.metadata.name, None)
    else:
        pods[body.metadata.name] = _view(body)
    _schedule(key)


async def on_child(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.labels.get(L_SERVICE, ""))
    live = _world.children.setdefault(key, {})
    name = (body.get("kind", ""), body.metadata.name)
    if event["type"] == "DELETED":
        live.pop(name, None)
    else:
        live[name] = ch.fingerprint(dict(body))
    _schedule(key)


for _group_version, _plural in (
    ("v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "rolebindings"),
    ("apps/v1", "deployments"),
    ("v1", "services"),
    ("networking.k8s.io/v1", "networkpolicies"),
):
    kopf.on.event(*_group_version.split("/"), _plural, labels={L_SERVICE: kopf.PRESENT})(on_child)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SAFETY_EVERY, initial_delay=SAFETY_EVERY)
async def safety_net(body: kopf.Body, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    _world.tokens.discard(key)  # looked at again: the Secrets may have been deleted
    _world.tls_secrets.discard(key)
    _world.certificates.pop(key, None)
    _schedule(key)


# reconcile --------------------------------------------------------------------------------


def _schedule(key: Key) -> None:
    """Reconcile `key` soon; events that arrive meanwhile fold into one more pass."""
    if key not in _world.services:
        return
    lock = _world.locks.setdefault(key, asyncio.Lock())
    if lock.locked():
        _world.dirty.add(key)
        return
    asyncio.get_running_loop().create_task(_reconcile_loop(key, lock))


async def _reconcile_loop(key: Key, lock: asyncio.Lock) -> None:
    async with lock:
        while True:
            _world.dirty.discard(key)
            try:
                await reconcile(key)
            except ApiException as exc:
                if _terminating(exc):
                    log.info("namespace %s is being deleted: %s left to go with it", *key)
                    return
                log.warning("reconcile of %s/%s: %s", *key, api_message(exc))
                await asyncio.sleep(1)
                _world.dirty.add(key)
            except Exception:
                log.exception("reconcile of %s/%s failed", *key)
                await asyncio.sleep(1)
                _world.dirty.add(key)
            if key not in _world.dirty:
                return


def _view(pod: dict[str, Any]) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable = (
        scheduled.get("message") or ""
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        else ""
    )
    evicted_until = None
    disruption = conditions.get("DisruptionTarget") or {}
    if meta.get("deletionTimestamp") and disruption.get("reason") == "DeletionByTaintManager":
        evicted_until = datetime.datetime.fromisoformat(meta["deletionTimestamp"]).timestamp()
    crash = ""
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            crash = (
                f"container {cs.get('name')} is crash-looping "
                f"(restarts: {cs.get('restartCount', 0)})"
            )
    return PodView(
        name=meta.get("name", ""),
        index=int(labels.get(m.L_INDEX, "-1")),
        template_hash=labels.get(m.L_HASH, ""),
        phase=status.get("phase") or "Pending",
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        deleting=meta.get("deletionTimestamp") is not None,
        unschedulable=unschedulable,
        crash_looping=crash,
        evicted_until=evicted_until,
        host=int(labels.get(m.L_HOST, "0")),
        ip=status.get("podIP") or "",
    )


async def _apply(obj: dict[str, Any]) -> None:
    """Server-side apply with our field manager: creates, or converges what we own."""
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    api, method = {
        "ServiceAccount": (client.CoreV1Api, "patch_namespaced_service_account"),
        "Service": (client.CoreV1Api, "patch_namespaced_service"),
        "Role": (client.RbacAuthorizationV1Api, "patch_namespaced_role"),
        "RoleBinding": (client.RbacAuthorizationV1Api, "patch_namespaced_role_binding"),
        "Deployment": (client.AppsV1Api, "patch_namespaced_deployment"),
        "NetworkPolicy": (client.NetworkingV1Api, "patch_namespaced_network_policy"),
    }[obj["kind"]]
    await getattr(api(_api), method)(
        name, namespace, obj, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
    )


async def _ensure_token(raw: dict[str, Any], key: Key) -> None:
    """The router<->replica token Secret, created once and never replaced: only a rotation
    (`kubeforge rotate-token`) changes it, in steps the running pods follow."""
    if key in _world.tokens:
        return
    secret = m.token_secret(raw, secrets.token_hex(24), secrets.token_hex(24))
    try:
        await client.CoreV1Api(_api).create_namespaced_secret(key[0], secret)
    except ApiException as exc:
        if exc.status != 409:  # there already: kept as it is
            raise
    _world.tokens.add(key)


async def _ensure_tls(raw: dict[str, Any], key: Key) -> None:
    """The Service's CA and serving certificate, made once (before its pods, which mount it);
    or, when the spec names an issuer, the Secret and the Certificate cert-manager issues
    into it."""
    certificate = m.tls_certificate(raw)
    if certificate is not None:
        await _ensure_certificate(raw, key, certificate)
    if key in _world.tls_secrets:
        return
    if certificate is not None:
        files = tls.PENDING
    else:
        now = datetime.datetime.now(datetime.UTC)
        files = await asyncio.to_thread(tls.issue, key[1], key[0], now)
    try:
        await client.CoreV1Api(_api).create_namespaced_secret(key[0], m.tls_secret(raw, files))
    except ApiException as exc:
        if exc.status != 409:  # there already: kept as it is
            raise
    _world.tls_secrets.add(key)


async def _ensure_certificate(raw: dict[str, Any], key: Key, certificate: dict[str, Any]) -> None:
    """Apply the Certificate when it changed since the last time (or the operator started)."""
    fingerprint = json.dumps(certificate, sort_keys=True)
    if _world.certificates.get(key) == fingerprint:
        return
    group, version = m.CERTIFICATE_API.split("/")
    try:
        await client.CustomObjectsApi(_api).patch_namespaced_custom_object(
            group,
            version,
            key[0],
            "certificates",
            certificate["metadata"]["name"],
            certificate,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
        # No such resource: cert-manager is not installed. Said once, and again after each
        # pass of the safety net, which tries again (cert-manager may have come meanwhile).
        if _world.certificates.get(key) != "missing":
            _world.certificates[key] = "missing"
            message = (
                "spec.tls.issuerRef names a cert-manager issuer, but this cluster has no "
                f"{m.CERTIFICATE_API} Certificate resource: install cert-manager, or remove "
                "issuerRef (by making the Service anew) to use the operator's own CA"
            )
            log.warning("%s/%s: %s", *key, message)
            await _event(raw, "CertManagerMissing", message, "Warning")
        return
    _world.certificates[key] = fingerprint


def _terminating(exc: ApiException) -> bool:
    """Refused because the namespace is being deleted: nothing there needs doing any more."""
    return exc.status == 403 and "being terminated" in str(exc.body)


async def _event(raw: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
    """An Event on the Service (what `kubectl describe` shows), best effort."""
    meta = raw["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": raw.get("apiVersion"),
            "kind": raw.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": FIELD_MANAGER},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await client.CoreV1Api(_api).create_namespaced_event(meta["namespace"], event)
    except ApiException as exc:
        if not _terminating(exc):
            log.warning(
                "event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], api_message(exc)
            )


async def _delete_pod(core: client.CoreV1Api, namespace: str, name: str, **options: Any) -> None:
    """Delete a pod; one that is gone already is fine (its event is on the way)."""
    try:
        await core.delete_namespaced_pod(name, namespace, **options)
    except ApiException as exc:
        if exc.status != 404:
            raise


@dataclass
class _Scaled:
    status: dict[str, Any] | None  # status.autoscaler: its last change, if any yet
    recheck_in: float | None


async def _autoscale(
    raw: dict[str, Any],
    key: Key,
    views: list[PodView],
    metrics: dict[str, Any],
    now: str,
) -> _Scaled | None:
    """With spec.autoscaling: sample the load the routers published, ask the decision, and
    write spec.replicas when it changes (this pass plans with the new count already)."""
    spec = ServiceSpec.model_validate(raw.get("spec") or {})
    if spec.autoscaling is None:
        _world.loads.pop(key, None)
        return None
    policy = spec.autoscaling.policy()
    clock = time.monotonic()  # one moment for the sample and the decision
    samples = _world.loads.setdefault(key, Load()).observe(metrics.get("inFlight"), clock, policy)
    waiting = [v for v in views if v.unschedulable and not v.deleting]
    decision = decide(
        policy,
        spec.replicas,
        samples,
        clock,
        unschedulable=len(waiting),
        scheduler_says=waiting[0].unschedulable if waiting else "",
    )
    before = (raw.get("status") or {}).get("autoscaler") or {}
    status = dict(before) or None  # the last decision that changed something, once there is one
    if decision.replicas != spec.replicas:
        namespace, name = key
        await client.CustomObjectsApi(_api).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"spec": {"replicas": decision.replicas}},
            _content_type="application/merge-patch+json",
        )
        message = f"{spec.replicas} -> {decision.replicas} replicas: {decision.message}"
        log.info("autoscaling %s/%s: %s", namespace, name, message)
        await _event(raw, decision.why.value, message)
        raw["spec"]["replicas"] = decision.replicas  # until the watch says so
        status = {
            "desiredReplicas": decision.replicas,
            "reason": decision.why.value,
            "message": message,
            "lastScaleTime": now,
        }
    elif decision.why == Why.AT_CAPACITY and before.get("reason") != Why.AT_CAPACITY:
        status = {
            **(status or {}),
            "desiredReplicas": spec.replicas,
            "reason": decision.why.value,
            "message": decision.message,
        }
    return _Scaled(status, decision.recheck_in)


async def reconcile(key: Key) -> None:
    raw = _world.services.get(key)
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return
    namespace, name = key
    # What the manifests see: the spec with the operator's defaults filled in. `raw` stays the
    # watched object, which the passes below update until the watch says so.
    body = m.resolve_defaults(raw, _world.tls)
    await _ensure_token(body, key)
    if m.tls_on(ServiceSpec.model_validate(body["spec"])):
        await _ensure_tls(body, key)
    deployment, router_service = m.router_objects(body)
    policies = m.network_policies(body, _world.network_policy)
    wanted = [*m.router_identity(body), deployment, router_service, *policies]
    live = _world.children.get(key, {})
    for child in ch.drifted(wanted, live):
        log.info("applying %s %s/%s", child["kind"], namespace, child["metadata"]["name"])
        await _apply(child)
    for policy in ch.unwanted(wanted, live, "NetworkPolicy"):  # turned off in the spec
        log.info("deleting NetworkPolicy %s/%s", namespace, policy)
        try:
            await client.NetworkingV1Api(_api).delete_namespaced_network_policy(policy, namespace)
        except ApiException as exc:
            if exc.status != 404:  # gone already: its watch event says so
                raise

    views = list(_world.pods.get(key, {}).values())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    spec = raw.get("spec") or {}
    metrics = (raw.get("status") or {}).get("metrics") or {}
    scaled = await _autoscale(raw, key, views, metrics, now)
    decided = plan(
        Observed(
            desired=spec.get("replicas", 1),
            template_hash=m.template_hash(m.pod_template(body)),
            pods=views,
            generation=(raw.get("metadata") or {}).get("generation", 0),
            selector=m.selector(name),
            endpoint=m.endpoint(raw),
            previous_conditions=list((raw.get("status") or {}).get("conditions", [])),
            now=now,
            clock=time.time(),
            hosts=spec.get("hosts", 1),
            autoscaling=scaled is not None,
            sessions={r["name"]: r.get("sessions", 0) for r in metrics.get("replicas") or []},
        )
    )
    if scaled is None:
        if (raw.get("status") or {}).get("autoscaler"):
            decided.status["autoscaler"] = None  # autoscaling was turned off: the count is yours
    else:
        if scaled.status is not None:
            decided.status["autoscaler"] = scaled.status
        if scaled.recheck_in is not None:  # no event marks the end of a pending window
            waits = [w for w in (decided.recheck_in, scaled.recheck_in) if w is not None]
            decided.recheck_in = min(waits)
    core = client.CoreV1Api(_api)
    pods = [m.replica_pod(body, index) for index in decided.create]
    pods += [m.replica_pod(body, j.index, j.host, j.leader_ip) for j in decided.join]
    for pod in pods:
        try:
            await core.create_namespaced_pod(namespace, pod)
        except ApiException as exc:
            if exc.status != 409:  # there already (its event is on the way)
                raise
    for pod_name in decided.delete:
        await _delete_pod(core, namespace, pod_name)
    for pod_name in decided.force_delete:
        log.info("deleting %s/%s without grace: its node is lost", namespace, pod_name)
        await _delete_pod(core, namespace, pod_name, grace_period_seconds=0)
    if (timer := _world.rechecks.pop(key, None)) is not None:
        timer.cancel()
    if decided.recheck_in is not None:  # no event will mark the end of an evicted pod's grace
        _world.rechecks[key] = asyncio.get_running_loop().call_later(
            decided.recheck_in + 0.1, _schedule, key
        )
    for reason, message in decided.events:  # after the writes: only what really happened
        await _event(raw, reason, message)
    # Only what changed: an idle Service's status is not written again and again (the plan keeps
    # each condition's lastTransitionTime while its status holds).
    written = raw.get("status") or {}
    changed = {k: v for k, v in decided.status.items() if written.get(k) != v}
    if changed:
        await client.CustomObjectsApi(_api).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": changed},
            _content_type="application/merge-patch+json",
        )
        raw.setdefault("status", {}).update(changed)  # until the watch says so
