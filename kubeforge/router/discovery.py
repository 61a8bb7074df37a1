"""Where replicas come from. The router only needs `add` and `remove` calls on its table.

`StaticDiscovery` serves a fixed list (local processes, `--replica URL`); Kubernetes discovery,
which watches replica pods, plugs in behind the same interface.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit


class ReplicaSink(Protocol):
    def replica_added(self, index: int, name: str, url: str) -> None: ...
    def replica_removed(self, index: int) -> None: ...


class Discovery(Protocol):
    async def run(self, sink: ReplicaSink) -> None:
        """Report the current replicas, then keep reporting changes until cancelled."""


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"replica URL {url!r} must look like http://host:port")
    return parts.hostname, parts.port or 80


class StaticDiscovery:
    """A fixed list: the replica's index is its position, so every router agrees on it."""

    def __init__(self, urls: list[str]) -> None:
        for url in urls:
            split_url(url)  # fail at start-up, not at the first call
        self.urls = urls

    async def run(self, sink: ReplicaSink) -> None:
        for index, url in enumerate(self.urls):
            sink.replica_added(index, f"replica-{index}", url)
