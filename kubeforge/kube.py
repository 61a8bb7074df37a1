"""The Kubernetes API client, made one way for every part that talks to the API server."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

# What a call or a watch to the API server raises while the server restarts, is unreachable, or
# drops a stream midway: the caller waits a moment and tries again. A router must outlive an
# API server restart with its watches and status writes intact (tests/e2e/test_faults.py).
API_UNAVAILABLE = (ApiException, OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError)


def api_message(exc: ApiException) -> str:
    """The API server's own words for a refusal (the Status body's message), for logs: the raw
    body is bytes, whose repr escapes the quotes that name the user, verb and resource."""
    body = exc.body
    try:
        text = body.decode() if isinstance(body, bytes) else str(body or "")
        message = json.loads(text).get("message") if text.startswith("{") else text
    except (ValueError, AttributeError):
        message = None
    return f"{exc.status} {exc.reason}: {message or ''}".rstrip(": ")


async def api_client() -> client.ApiClient:
    """In-cluster credentials when mounted (a pod), else $KUBECONFIG (a developer, the e2e
    node's per-pod kubeconfig)."""
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return await config.new_client_from_config()
