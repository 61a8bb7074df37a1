"""Kubernetes discovery: the router follows its Service's replica pods and its settings.

A pod joins when it is Ready and has an IP, and leaves at once when the watch says it is gone
or not ready (a silent death is caught by the router's own health polls). The Service resource
is watched too, so changed router settings (`router_settings`) take effect without a restart,
and so is the set
of router pods, whose shares of the metrics the status writer combines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client, watch

from kubeforge._runtime import duration
from kubeforge.contract import GROUP, L_COMPONENT, L_HOST, L_INDEX, L_SERVICE, PLURAL, VERSION
from kubeforge.kube import API_UNAVAILABLE, api_client
from kubeforge.router.discovery import ReplicaSink
from kubeforge.settings import DEFAULTS, router_request_timeout

log = logging.getLogger("kubeforge.router.discovery")


def _member(pod: Any) -> tuple[int, str, str] | None:
    """(index, name, url) of a pod that may take calls, else None."""
    if pod.metadata.deletion_timestamp is not None or not pod.status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    if not ready:
        return None
    labels = pod.metadata.labels or {}
    if labels.get(L_HOST, "0") != "0":
        return None  # a replica's other hosts: rank 0, on the leader pod, takes its calls
    try:
        index = int(labels[L_INDEX])
    except (KeyError, ValueError):
        return None
    return index, pod.metadata.name, f"http://{pod.status.pod_ip}:{DEFAULTS.replica_port}"


class KubernetesDiscovery:
    def __init__(
        self,
        service: str,
        namespace: str,
        on_settings: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.on_settings = on_settings
        self.members: dict[int, tuple[str, str]] = {}  # index -> (pod name, url)
        self.routers: set[str] | None = None  # router pods that exist, once listed
        self.status: dict[str, Any] | None = None  # the resource's status as last seen

    async def run(self, sink: ReplicaSink) -> None:
        api = await api_client()
        try:
            await asyncio.gather(self._watch_pods(api, sink), self._watch_service(api))
        finally:
            await api.close()

    def _apply(self, sink: ReplicaSink, kind: str, pod: Any) -> None:
        if (pod.metadata.labels or {}).get(L_COMPONENT) == "router":
            if self.routers is not None:
                gone = kind == "DELETED" or pod.metadata.deletion_timestamp is not None
                (self.routers.discard if gone else self.routers.add)(pod.metadata.name)
            return
        index = int((pod.metadata.labels or {}).get(L_INDEX, -1))
        member = None if kind == "DELETED" else _member(pod)
        known = self.members.get(index)
        if member is None:
            if known is not None and known[0] == pod.metadata.name:
                del self.members[index]
                log.info(
                    "replica %s left (%s)",
                    pod.metadata.name,
                    "deleted" if kind == "DELETED" else "not ready",
                )
                sink.replica_removed(index)
            return
        _, name, url = member
        if known != (name, url):
            self.members[index] = (name, url)
            log.info("replica %s joined at %s", name, url)
            sink.replica_added(index, name, url)

    async def _watch_pods(self, api: client.ApiClient, sink: ReplicaSink) -> None:
        core = client.CoreV1Api(api)
        selector = f"{L_SERVICE}={self.service}"  # replicas and routers
        while True:
            try:
                listed = await core.list_namespaced_pod(self.namespace, label_selector=selector)
                seen = set()
                self.routers = set()
                for pod in listed.items:
                    seen.add(pod.metadata.name)
                    self._apply(sink, "ADDED", pod)
                for index, (name, _url) in list(self.members.items()):
                    if name not in seen:
                        del self.members[index]
                        sink.replica_removed(index)
                async with watch.Watch() as w:
                    async for event in w.stream(
                        core.list_namespaced_pod,
                        self.namespace,
                        label_selector=selector,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=300,
                    ):
                        self._apply(sink, event["type"], event["object"])
            except asyncio.CancelledError:
                raise
            except API_UNAVAILABLE as exc:
                log.warning("pod watch interrupted (%s); relisting", exc)
                await asyncio.sleep(1)

    async def _watch_service(self, api: client.ApiClient) -> None:
        custom = client.CustomObjectsApi(api)
        while True:
            try:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        custom.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        field_selector=f"metadata.name={self.service}",
                        timeout_seconds=300,
                    ):
                        if event["type"] == "DELETED":
                            continue
                        self.status = event["object"].get("status") or {}
                        if self.on_settings is not None:
                            self.on_settings(event["object"].get("spec", {}))
            except asyncio.CancelledError:
                raise
            except API_UNAVAILABLE as exc:
                log.warning("Service watch interrupted (%s); retrying", exc)
                await asyncio.sleep(1)


def router_settings(spec: dict[str, Any]) -> dict[str, float]:
    """The router's settings that the resource carries (DESIGN §5), as RouterConfig fields.

    The operator passes the same ones as flags (`manifests.router_objects`), so a router
    starts with them and follows their changes without a restart.
    """
    out: dict[str, float] = {}
    if "healthPollRate" in spec:
        out["health_poll_rate"] = duration(spec["healthPollRate"])
    if "requestTimeout" in spec:
        out["request_timeout"] = router_request_timeout(duration(spec["requestTimeout"]))
    return out
