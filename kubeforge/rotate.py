"""`kubeforge rotate-token`: a Service on Kubernetes gets a new token, and no call is refused.

It writes the token Secret's states (`kubeforge.tokens.rotation`) one after the other. Each
waits until every router, and every replica the routers poll, reports in the Service's status
that it has loaded the state before (the kubelet takes up to a minute or so to update a
mounted Secret). Cut off anywhere, the Secret still accepts both tokens, and running the command
again carries the rotation on.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubeforge import tokens
from kubeforge.contract import GROUP, PLURAL, VERSION
from kubeforge.operator.manifests import token_secret_name


def lagging(status: Mapping[str, Any] | None, digest: str) -> list[str]:
    """The routers and replicas whose loaded tokens (per status) are not `digest` yet."""
    status = status or {}
    routers = status.get("routers") or {}
    out = [
        f"router {name}"
        for name, share in sorted(routers.items())
        if (share or {}).get("tokenDigest") != digest
    ]
    for replica in (status.get("metrics") or {}).get("replicas") or []:
        if replica.get("tokenDigest") != digest:
            out.append(f"replica {replica.get('name', '?')} ({replica.get('state', '?')})")
    if not routers:
        out.append("no router has reported yet")
    return out


def _decoded(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


async def rotate(
    service: str,
    namespace: str,
    new: str | None = None,
    grace: float = 300.0,
    timeout: float = 600.0,
    say: Callable[[str], None] = print,
) -> None:
    """Rotate `service`'s token to `new` (random when None); `grace` is how long callers have,
    once the new token is in the Secret, before the old one stops working."""
    from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi

    from kubeforge.kube import api_client

    api = await api_client()
    try:
        core, custom = CoreV1Api(api), CustomObjectsApi(api)
        name = token_secret_name(service)

        async def status() -> Mapping[str, Any] | None:
            body = await custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, service
            )
            return body.get("status")

        secret = await core.read_namespaced_secret(name, namespace)
        steps = tokens.rotation(_decoded(secret.data), new or secrets.token_hex(24))
        for n, step in enumerate(steps, 1):
            state = step.get(tokens.KEY_ROTATION, "done")
            if state == "done" and grace > 0:
                say(
                    f"the new token is in Secret {namespace}/{name} (key {tokens.KEY_TOKEN}); "
                    f"the old one still works for {grace:g}s"
                )
                await asyncio.sleep(grace)
            secret.data = {k: base64.b64encode(v.encode()).decode() for k, v in step.items()}
            secret = await core.replace_namespaced_secret(name, namespace, secret)
            digest = tokens.from_secret(step).digest
            say(f"step {n}/{len(steps)}: {state} (tokens {digest}); waiting for every pod")
            await _wait_loaded(status, digest, timeout, say)
        say(f"{namespace}/{service}: token rotated; the old token is refused from now on")
    finally:
        await api.close()


async def _wait_loaded(
    status: Callable[[], Any], digest: str, timeout: float, say: Callable[[str], None]
) -> None:
    deadline = time.monotonic() + timeout
    shown: list[str] | None = None
    while True:
        behind = lagging(await status(), digest)
        if not behind:
            return
        if behind != shown:
            say("  waiting for: " + ", ".join(behind))
            shown = behind
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout:g}s these have not loaded the new state: {', '.join(behind)}. "
                "The Secret accepts both tokens meanwhile; run the command again to go on."
            )
        await asyncio.sleep(1.0)
