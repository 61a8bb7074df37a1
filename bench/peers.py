"""The peers the benchmarks measure against, started the same way by every script."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


@asynccontextmanager
async def ray_started(**options: Any) -> AsyncIterator[Any]:
    """A local Ray cluster on every core, quiet (no dashboard, no driver logs); stopped on the
    way out. `options` go to `ray.init` (an object store size, say)."""
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        **options,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
