"""kopf handlers: translate between the Kubernetes API and the pure planner. Nothing else.

Every decorator and call names the group (`kubeforge.dev`): the core v1 `Service` wins every
ambiguous lookup.
"""

from __future__ import annotations

import base64
import datetime
import logging
import secrets
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeforge.contract import GROUP, PLURAL, VERSION
from kubeforge.kube import api_client
from kubeforge.operator import manifests as m
from kubeforge.operator.plan import Observed, PodView, plan

RECONCILE_EVERY = 2.0  # seconds; events on create/update/resume reconcile at once

log = logging.getLogger("kubeforge.operator")
_api: client.ApiClient | None = None


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


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def on_change(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    await reconcile(body, patch)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_EVERY, initial_delay=RECONCILE_EVERY)
async def on_timer(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    await reconcile(body, patch)


def _view(pod: Any) -> PodView:
    labels = pod.metadata.labels or {}
    conditions = {c.type: c for c in (pod.status.conditions or [])}
    scheduled = conditions.get("PodScheduled")
    unschedulable = (
        (scheduled.message or "")
        if scheduled is not None
        and scheduled.status == "False"
        and scheduled.reason == "Unschedulable"
        else ""
    )
    crash = ""
    for cs in pod.status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason == "CrashLoopBackOff":
            crash = f"container {cs.name} is crash-looping (restarts: {cs.restart_count})"
    ready = conditions.get("Ready")
    return PodView(
        name=pod.metadata.name,
        index=int(labels.get(m.L_INDEX, "-1")),
        template_hash=labels.get(m.L_HASH, ""),
        phase=pod.status.phase or "Pending",
        ready=ready is not None and ready.status == "True",
        deleting=pod.metadata.deletion_timestamp is not None,
        unschedulable=unschedulable,
        crash_looping=crash,
    )


async def _ensure(create: Any, body: dict[str, Any], namespace: str) -> None:
    try:
        await create(namespace, body)
    except ApiException as exc:
        if exc.status != 409:  # already there: fine, this is level-based
            raise


async def _ensure_router(
    apps: client.AppsV1Api, deployment: dict[str, Any], namespace: str
) -> None:
    """Create the router Deployment, or re-apply it when its template hash changed."""
    try:
        await apps.create_namespaced_deployment(namespace, deployment)
        return
    except ApiException as exc:
        if exc.status != 409:
            raise
    name = deployment["metadata"]["name"]
    current = await apps.read_namespaced_deployment(name, namespace)
    wanted = deployment["metadata"]["annotations"][m.ROUTER_HASH]
    if (current.metadata.annotations or {}).get(m.ROUTER_HASH) != wanted:
        await apps.patch_namespaced_deployment(
            name,
            namespace,
            {"metadata": {"annotations": {m.ROUTER_HASH: wanted}}, "spec": deployment["spec"]},
        )


async def reconcile(body: kopf.Body, patch: kopf.Patch) -> None:
    core, apps = client.CoreV1Api(_api), client.AppsV1Api(_api)
    raw = dict(body)
    name, namespace = body.metadata.name, body.metadata.namespace
    await _ensure(
        core.create_namespaced_secret,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": m.token_secret_name(name),
                "namespace": namespace,
                "ownerReferences": [m.owner_reference(raw)],
            },
            "data": {"token": base64.b64encode(secrets.token_hex(24).encode()).decode()},
        },
        namespace,
    )
    account, role, binding = m.router_identity(raw)
    rbac = client.RbacAuthorizationV1Api(_api)
    await _ensure(core.create_namespaced_service_account, account, namespace)
    await _ensure(rbac.create_namespaced_role, role, namespace)
    await _ensure(rbac.create_namespaced_role_binding, binding, namespace)
    deployment, router_service = m.router_objects(raw)
    await _ensure_router(apps, deployment, namespace)
    await _ensure(core.create_namespaced_service, router_service, namespace)

    pods = await core.list_namespaced_pod(namespace, label_selector=m.selector(name))
    views = [_view(p) for p in pods.items]
    current = m.template_hash(m.pod_template(raw))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    decided = plan(
        Observed(
            desired=body.spec.get("replicas", 1),
            template_hash=current,
            pods=views,
            generation=body.metadata.get("generation", 0),
            selector=m.selector(name),
            endpoint=m.endpoint(raw),
            previous_conditions=list(body.get("status", {}).get("conditions", [])),
            now=now,
        )
    )
    for index in decided.create:
        await _ensure(core.create_namespaced_pod, m.replica_pod(raw, index), namespace)
    for pod_name in decided.delete:
        try:
            await core.delete_namespaced_pod(pod_name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
    for reason, message in decided.events:
        kopf.info(body, reason=reason, message=message)
    # Only what changed: an idle Service's status is not written again and again (the plan keeps
    # each condition's lastTransitionTime while its status holds).
    written = body.get("status", {})
    changed = {k: v for k, v in decided.status.items() if written.get(k) != v}
    if changed:
        patch.status.update(changed)
