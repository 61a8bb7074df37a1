"""The Kubernetes API client, made one way for every part that talks to the API server."""

from __future__ import annotations

from kubernetes_asyncio import client, config


async def api_client() -> client.ApiClient:
    """In-cluster credentials when mounted (a pod), else $KUBECONFIG (a developer, the e2e
    node's per-pod kubeconfig)."""
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return await config.new_client_from_config()
