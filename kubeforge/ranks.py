"""SPMD replicas: which rank a process is, and the environment each rank starts with.

A replica of `hosts` x `procs` ranks gives every rank the variables torch.distributed's
`env://` rendezvous reads, so `torch.distributed.init_process_group()` in an actor's `setup()`
works unchanged. The planning here is pure; `replica.launcher` starts the processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
HOST_INDEX = "KUBEFORGE_HOST_INDEX"  # which pod of its replica's group a launcher runs in


@dataclass(frozen=True)
class Rank:
    """Where this process sits in its replica (torchforge/Monarch: `current_rank()`)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def host(self) -> int:
        """Which host (pod) of the replica this rank runs on."""
        return self.rank // self.local_world_size


def current_rank() -> Rank:
    """This process's rank, from the environment its replica started it with; a plain
    single-process replica is rank 0 of 1."""
    env = os.environ

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    return Rank(
        rank=number(RANK, 0),
        local_rank=number(LOCAL_RANK, 0),
        world_size=number(WORLD_SIZE, 1),
        local_world_size=number(LOCAL_WORLD_SIZE, 1),
    )


class RankError(ValueError):
    """An SPMD layout that cannot run: said before any rank starts."""


@dataclass(frozen=True)
class Layout:
    """One host's share of an SPMD replica."""

    procs: int  # ranks on each host
    hosts: int = 1
    host_index: int = 0  # which host this is; host 0 holds rank 0
    gpus_per_rank: int = 0

    def __post_init__(self) -> None:
        if self.procs < 1 or self.hosts < 1:
            raise RankError(f"procs and hosts must be at least 1, got {self.procs}, {self.hosts}")
        if not 0 <= self.host_index < self.hosts:
            raise RankError(f"host index {self.host_index} is not below hosts={self.hosts}")
        if self.gpus_per_rank < 0:
            raise RankError(f"gpus per rank must be >= 0, got {self.gpus_per_rank}")

    @property
    def world_size(self) -> int:
        return self.procs * self.hosts

    @property
    def ranks(self) -> range:
        """The global ranks on this host, in order."""
        first = self.host_index * self.procs
        return range(first, first + self.procs)


def rank_envs(
    layout: Layout, master_addr: str, master_port: int, visible: list[str] | None
) -> list[dict[str, str]]:
    """The environment of each rank on this host, by local rank.

    `visible` is the GPUs this host's share may use (its CUDA_VISIBLE_DEVICES), or None when
    nothing narrowed them: in a pod the runtime exposes exactly the pod's GPUs as 0..n-1. Each
    rank gets its own disjoint slice, so no two ranks ever share a device.
    """
    needed = layout.procs * layout.gpus_per_rank
    devices = visible if visible is not None else [str(i) for i in range(needed)]
    if len(devices) < needed:
        raise RankError(
            f"{layout.procs} ranks x {layout.gpus_per_rank} GPUs need {needed} GPUs; "
            f"this replica has {len(devices)} ({', '.join(devices) or 'none'})"
        )
    envs = []
    for local, rank in enumerate(layout.ranks):
        env = {
            RANK: str(rank),
            LOCAL_RANK: str(local),
            WORLD_SIZE: str(layout.world_size),
            LOCAL_WORLD_SIZE: str(layout.procs),
            MASTER_ADDR: master_addr,
            MASTER_PORT: str(master_port),
        }
        if layout.gpus_per_rank:
            mine = devices[local * layout.gpus_per_rank : (local + 1) * layout.gpus_per_rank]
            env[CUDA_VISIBLE_DEVICES] = ",".join(mine)
        envs.append(env)
    return envs
