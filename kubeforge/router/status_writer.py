"""Writes the router's half of the Service's status (see `kubeforge.router.status`).

The operator owns everything else in status; the router merge-patches only `metrics`,
`healthyReplicas` and its own entry of `routers`, at most every `interval` seconds and only when
the status does not already say it, so a quiet Service costs the API server nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeforge.contract import GROUP, PLURAL, VERSION
from kubeforge.kube import API_UNAVAILABLE, api_client, api_message
from kubeforge.router import report, status
from kubeforge.router.engine import Router

log = logging.getLogger("kubeforge.router.status")


class StatusWriter:
    def __init__(
        self,
        router: Router,
        service: str,
        namespace: str,
        me: str,
        observed: Callable[[], dict[str, Any] | None] = lambda: None,
        live_routers: Callable[[], set[str] | None] = lambda: None,
        interval: float = 2.0,
    ) -> None:
        """`observed` gives the resource's status as last seen; `live_routers` the names of
        the router pods that exist now (both None while unknown)."""
        self.router = router
        self.service = service
        self.namespace = namespace
        self.me = me
        self.observed = observed
        self.live_routers = live_routers
        self.interval = interval
        self.last: dict[str, Any] | None = None
        self.writes = 0

    def next_patch(self) -> dict[str, Any] | None:
        """The patch to send now, or None when status (or our last write) already says it."""
        seen = self.observed()
        self.router.collect()
        patch = status.status_patch(
            report.summary(self.router, time.monotonic()),
            self.me,
            (seen or {}).get("routers"),
            self.live_routers(),
            self.router.take_in_flight(),
        )
        if patch == self.last and seen is None:
            return None
        if status.already_written(patch, seen):
            return None
        return patch

    async def run(self) -> None:
        api = await api_client()
        custom = client.CustomObjectsApi(api)
        try:
            while True:
                await asyncio.sleep(self.interval)
                patch = self.next_patch()
                if patch is None:
                    continue
                now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                try:
                    await custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        self.service,
                        {"status": status.stamped(patch, now)},
                        _content_type="application/merge-patch+json",
                    )
                    self.last = patch
                    self.writes += 1
                except ApiException as exc:
                    log.warning("status write failed: %s", api_message(exc)[:300])
                except API_UNAVAILABLE as exc:
                    log.warning("status write failed: %s: %s", type(exc).__name__, exc)
        finally:
            await api.close()
