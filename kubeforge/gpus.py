"""Which GPUs this machine has, and which replica gets which: never two replicas on one GPU."""

from __future__ import annotations

import os
import shutil
import subprocess


class GpuError(RuntimeError):
    """GPUs were asked for that are not there; raised before anything starts."""


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def assign(replicas: int, per_replica: int, available: list[str]) -> list[list[str]]:
    """Disjoint GPU sets, `per_replica` each, for `replicas` replicas, or a GpuError."""
    if per_replica < 1:
        raise GpuError(f"each replica needs at least one GPU with GPUs on, got {per_replica}")
    needed = replicas * per_replica
    if needed > len(available):
        have = (
            f"{len(available)} ({', '.join(available)})"
            if available
            else "none (no CUDA_VISIBLE_DEVICES and no GPU listed by nvidia-smi)"
        )
        raise GpuError(
            f"{replicas} replicas x {per_replica} GPUs need {needed} GPUs; this machine has {have}"
        )
    return [available[i * per_replica : (i + 1) * per_replica] for i in range(replicas)]
