"""An actor that takes and returns what RL programs pass: tensors, arrays, and dataclasses,
NamedTuples and enums holding them (the tests and `bench/payloads.py` use it).

The classes below cross by value because the endpoints name them in their type hints; nothing
else has to be registered.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from kubeforge import Actor, endpoint


class Role(enum.Enum):
    POLICY = "policy"
    REFERENCE = "reference"


@dataclass
class Completion:
    prompt_ids: torch.Tensor
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    text: str = ""


@dataclass
class Episode:
    episode_id: str
    completion: Completion | None
    reward: float = 0.0
    advantages: list[float] = field(default_factory=list)
    role: Role = Role.POLICY


class Batch(NamedTuple):
    inputs: dict[str, torch.Tensor]
    targets: tuple[torch.Tensor, ...]


def double(x: Any) -> Any:
    """A module-level function: one can be a constructor argument (it crosses by name)."""
    return x * 2


class Tensors(Actor):
    def __init__(self, transform: Any = None, scale: float = 1.0) -> None:
        self.transform = transform
        self.scale = scale
        self.version = 0

    @endpoint
    async def echo(self, value: Any) -> Any:
        """Whatever arrives, sent back unchanged."""
        return value

    @endpoint
    async def describe(self, value: Any) -> dict[str, Any]:
        """What arrived, as the actor sees it: type, dtype, shape, writable, device."""
        out: dict[str, Any] = {"type": type(value).__qualname__}
        if isinstance(value, torch.Tensor):
            out.update(
                dtype=str(value.dtype).removeprefix("torch."),
                shape=list(value.shape),
                device=str(value.device),
                contiguous=value.is_contiguous(),
            )
        elif isinstance(value, np.ndarray):
            out.update(
                dtype=value.dtype.name, shape=list(value.shape), writable=value.flags.writeable
            )
        return out

    @endpoint
    async def add_in_place(self, t: torch.Tensor, by: float) -> torch.Tensor:
        """Mutates its argument, as torch code does: the argument must be writable."""
        t.add_(by)
        return t

    @endpoint
    async def score(self, episode: Episode) -> Episode:
        """A dataclass holding a dataclass holding tensors, in and out."""
        assert episode.completion is not None
        episode.reward = float(episode.completion.logprobs.sum()) * self.scale
        episode.advantages = [episode.reward]
        return episode

    @endpoint
    async def collate(self, episodes: list[Episode]) -> Batch:
        ids = torch.stack([e.completion.token_ids for e in episodes if e.completion])
        rewards = torch.tensor([e.reward for e in episodes])
        return Batch({"input_ids": ids}, (rewards, rewards * 2))

    @endpoint
    async def apply(self, value: Any) -> Any:
        """The constructor's function argument, applied."""
        return self.transform(value) if self.transform is not None else value

    @endpoint
    async def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """A weight update: the total of every tensor, so a caller can check each arrived."""
        self.version = version
        return version

    @endpoint
    async def rollout(self, prompt: torch.Tensor, steps: int) -> AsyncIterator[Completion]:
        """A stream of dataclasses holding tensors: step i's completion of `prompt`."""
        for i in range(steps):
            logprobs = torch.full((prompt.numel(),), float(i))
            yield Completion(prompt, prompt + i, logprobs, f"step {i}")

    @endpoint
    async def nbytes(self, value: Any) -> int:
        """Bytes of an array or tensor: a broadcast's upload without sending it back."""
        return int(value.nbytes)

    @endpoint
    async def remember(self, value: Any) -> None:
        """Keep an argument past its call, as a replay buffer does."""
        self.kept = value

    @endpoint
    async def recall(self) -> Any:
        return self.kept

    @endpoint
    async def checksum(self, state_dict: dict[str, torch.Tensor]) -> float:
        return float(sum(t.double().sum() for t in state_dict.values()))

    @endpoint(device="meta")  # "cuda" on a GPU machine; meta shows the move without one
    async def where(self, t: torch.Tensor, episode: Episode) -> list[str]:
        """Where the tensors of the call arrived (the endpoint asked for a device)."""
        assert episode.completion is not None
        return [str(t.device), str(episode.completion.logprobs.device)]

    @endpoint
    async def typed(self, n: int, x: float, t: torch.Tensor, name: str = "") -> str:
        """Type hints the replica checks before the call runs."""
        return f"{n} {x} {tuple(t.shape)} {name}"
