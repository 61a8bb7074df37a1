"""A GRPO-shaped RL loop, as torchforge's apps/grpo/main.py is shaped, with toy models.

The task is adding two numbers. The policy answers with an error that shrinks as its `skill`
grows; the reward scores each answer; advantages are normalised within the group; the trainer
(two ranks) raises the skill from the batch's advantages and pushes its state dict to every
policy replica. Completions hold torch tensors (token ids, log-probabilities) and, with
episodes, are dataclasses as torchforge's are: they cross between actors as those classes and
tensors (kubeforge's binary format; the endpoints' type hints allow them). The models are toys
(a real policy and trainer are issue 22's); the point is the program's shape and the calls it
makes, which are torchforge's:

* actors (`X.options(**cfg).as_actor(...)`): dataset, trainer (`procs: 2`), replay buffer,
  advantages; called with `.call_one()`, or `.call()` on every rank (the trainer's steps);
* services (`X.options(**cfg).as_service(...)`): policy (2 replicas) and reward; called with
  `.route()`, and `policy.update_weights.fanout()` after each training step;
* rollouts and training run concurrently, and `kubeforge.shutdown()` ends the program.

Locally: `python examples/grpo.py --steps 10` (a few seconds). Against a cluster, after
`kubectl apply -f examples/grpo.yaml`: `python examples/grpo.py --cluster routers.json`, where
the file maps each role to its Service's router, `{"policy": {"url": ..., "token": ...}, ...}`
(the URL is the Service's `status.endpoint`, the token its `<name>-token` Secret). Only where
the handles come from changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kubeforge
from kubeforge import Actor, endpoint

# torchforge's apps read these from YAML; the same shape here.
CONFIG: dict[str, dict[str, dict[str, Any]]] = {
    "actors": {
        "dataset": {"procs": 1},
        "trainer": {"procs": 2},
        "replay_buffer": {"procs": 1},
        "compute_advantages": {"procs": 1},
    },
    "services": {
        "policy": {"procs": 1, "num_replicas": 2},
        "reward_actor": {"procs": 1, "num_replicas": 1},
    },
}
ACTORS = tuple(CONFIG["actors"])
SERVICES = tuple(CONFIG["services"])


@dataclass
class Sample:
    prompt: str
    target: int


@dataclass
class Completion:
    """One response of the policy: its tokens (a character each, in this toy) with their
    log-probabilities, and the policy version that wrote it."""

    text: str
    token_ids: torch.Tensor  # int64, one per character of `text`
    logprobs: torch.Tensor  # float32, one per token
    version: int


@dataclass
class Episode:
    completion: Completion
    reward: float
    advantage: float

    @property
    def version(self) -> int:
        return self.completion.version


class DatasetActor(Actor):
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    @endpoint
    async def sample(self) -> Sample:
        a, b = self.rng.randint(0, 50), self.rng.randint(0, 50)
        return Sample(f"{a}+{b}", a + b)

    @endpoint
    async def pad_token(self) -> int:
        return 0


class Policy(Actor):
    """Answers with an error of spread 4 / (1 + skill): training makes it right more often."""

    def __init__(self, group_size: int = 4, seed: int = 1) -> None:
        self.group_size = group_size
        self.rng = random.Random(seed)
        self.version = 0
        self.skill = 0.0

    @endpoint
    async def generate(self, prompt: str) -> list[Completion]:
        a, b = (int(x) for x in prompt.split("+"))
        spread = 4.0 / (1.0 + self.skill)
        completions = []
        for _ in range(self.group_size):
            error = round(self.rng.gauss(0.0, spread))
            text = str(a + b + error)
            ids = torch.tensor([ord(c) for c in text], dtype=torch.int64)
            # The toy's log-probability of its error, spread over the answer's tokens.
            logprob = -0.5 * (error / spread) ** 2 - math.log(spread * math.sqrt(2 * math.pi))
            logprobs = torch.full((len(text),), logprob / len(text), dtype=torch.float32)
            completions.append(Completion(text, ids, logprobs, self.version))
        return completions

    @endpoint
    async def update_weights(self, version: int, state_dict: dict[str, torch.Tensor]) -> int:
        self.version, self.skill = version, float(state_dict["skill"])
        return version

    @endpoint
    async def weights_version(self) -> int:
        return self.version


class RewardActor(Actor):
    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: int) -> float:
        return max(0.0, 1.0 - abs(int(response) - target) / 5.0)


class ComputeAdvantages(Actor):
    @endpoint
    async def compute(self, rewards: torch.Tensor) -> torch.Tensor:
        """GRPO's group-relative advantage: each reward against its group's mean and spread."""
        return (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-4)


class ReplayBuffer(Actor):
    def __init__(self, batch_size: int = 8, max_policy_age: int = 1) -> None:
        self.batch_size = batch_size
        self.max_policy_age = max_policy_age
        self.episodes: list[Episode] = []

    @endpoint
    async def add(self, episode: Episode) -> None:
        self.episodes.append(episode)

    @endpoint
    async def sample(self, curr_policy_version: int) -> list[Episode] | None:
        """A batch of episodes from recent policies, or None until there are enough."""
        oldest = curr_policy_version - self.max_policy_age
        self.episodes = [e for e in self.episodes if e.version >= oldest]
        if len(self.episodes) < self.batch_size:
            return None
        batch, self.episodes = self.episodes[: self.batch_size], self.episodes[self.batch_size :]
        return batch


class Trainer(Actor):
    """Data parallel over its ranks: each rank's loss is over its shard of the batch. A real
    trainer all-reduces its gradients; this one computes the (tiny) whole-batch update on
    every rank, so that the ranks' weights agree as they would after the all-reduce."""

    def __init__(self, lr: float = 2.0) -> None:
        self.lr = lr
        self.skill = 0.0
        self.steps = 0

    @endpoint
    async def train_step(self, batch: list[Episode]) -> dict[str, Any]:
        shard = batch[self.rank :: self.world_size]
        loss = 0.0
        if shard:  # the policy-gradient loss of this rank's shard, over padded token batches
            logprobs = torch.nn.utils.rnn.pad_sequence(
                [e.completion.logprobs for e in shard], batch_first=True
            )
            advantages = torch.tensor([e.advantage for e in shard])
            loss = float(-(advantages * logprobs.sum(dim=1)).mean())
        self.skill += self.lr * statistics.fmean(max(0.0, e.advantage) for e in batch)
        self.steps += 1
        return {"rank": self.rank, "loss": loss, "episodes": len(shard)}

    @endpoint
    async def push_weights(self, version: int) -> dict[str, torch.Tensor]:
        """This rank's state dict, which every policy replica loads."""
        return {"skill": torch.tensor(self.skill, dtype=torch.float64)}


ROLES: dict[str, type] = {
    "dataset": DatasetActor,
    "policy": Policy,
    "trainer": Trainer,
    "replay_buffer": ReplayBuffer,
    "compute_advantages": ComputeAdvantages,
    "reward_actor": RewardActor,
}


@dataclass
class Handles:
    dataloader: Any
    policy: Any
    trainer: Any
    replay_buffer: Any
    compute_advantages: Any
    reward_actor: Any


async def start_local() -> Handles:
    """As torchforge's main() does: every actor and service from its options, concurrently."""
    actors, services = CONFIG["actors"], CONFIG["services"]
    handles = await asyncio.gather(
        DatasetActor.options(**actors["dataset"]).as_actor(seed=0),
        Policy.options(**services["policy"]).as_service(group_size=4),
        Trainer.options(**actors["trainer"]).as_actor(lr=2.0),
        ReplayBuffer.options(**actors["replay_buffer"]).as_actor(batch_size=8),
        ComputeAdvantages.options(**actors["compute_advantages"]).as_actor(),
        RewardActor.options(**services["reward_actor"]).as_service(),
    )
    return Handles(*handles)


async def connect_cluster(routers: dict[str, dict[str, str]]) -> Handles:
    """The same handles from a cluster's Services: `connect` for services, `connect_actor`
    for the actors (Services with `replicas: 1`)."""

    async def one(role: str) -> Any:
        how = kubeforge.connect if role in SERVICES else kubeforge.connect_actor
        url, token = routers[role]["url"], routers[role].get("token")
        # The actor class lets replies rebuild the dataclasses its endpoints name.
        return await how(url, token=token, name=role, actor=ROLES[role])

    roles = ("dataset", "policy", "trainer", "replay_buffer", "compute_advantages", "reward_actor")
    return Handles(*await asyncio.gather(*(one(r) for r in roles)))


async def train(h: Handles, steps: int, rollout_tasks: int = 2) -> dict[str, Any]:
    """Rollouts and training, concurrently, until `steps` training steps: torchforge's loop."""
    stop = asyncio.Event()
    batch_rewards: list[float] = []
    losses: list[list[float]] = []

    async def continuous_rollouts() -> None:
        while not stop.is_set():
            sample = await h.dataloader.sample.call_one()
            responses = await h.policy.generate.route(sample.prompt)
            rewards = await asyncio.gather(
                *(
                    h.reward_actor.evaluate_response.route(sample.prompt, r.text, sample.target)
                    for r in responses
                )
            )
            advantages = await h.compute_advantages.compute.call_one(torch.tensor(rewards))
            for response, reward, advantage in zip(responses, rewards, advantages, strict=True):
                await h.replay_buffer.add.call_one(Episode(response, reward, float(advantage)))

    async def continuous_training() -> None:
        version = 0
        while version < steps:
            for task in rollouts:  # a rollout that failed ends the program with its error
                if task.done():
                    task.result()
            batch = await h.replay_buffer.sample.call_one(curr_policy_version=version)
            if batch is None:
                await asyncio.sleep(0.01)
                continue
            batch_rewards.append(statistics.fmean(e.reward for e in batch))
            per_rank = await h.trainer.train_step.call(batch)
            losses.append([r["loss"] for r in per_rank])
            weights = await h.trainer.push_weights.call(version + 1)
            if not all(torch.equal(w["skill"], weights[0]["skill"]) for w in weights):
                raise RuntimeError(f"the trainer's ranks disagree on their weights: {weights}")
            await h.policy.update_weights.fanout(version + 1, weights[0])
            version += 1
            print(f"step {version}: batch reward {batch_rewards[-1]:.2f}", flush=True)
        stop.set()

    rollouts = [asyncio.create_task(continuous_rollouts()) for _ in range(rollout_tasks)]
    try:
        await continuous_training()
    finally:
        stop.set()
        await asyncio.gather(*rollouts)
    return {
        "steps": steps,
        "batch_rewards": batch_rewards,
        "losses": losses,
        "trainer_ranks": h.trainer.world_size,
        "policy_versions": await h.policy.weights_version.fanout(),
        "pad_token": await h.dataloader.pad_token.call_one(),
    }


async def main(steps: int, cluster: Path | None) -> dict[str, Any]:
    started = time.monotonic()
    try:
        handles = (
            await connect_cluster(json.loads(cluster.read_text()))
            if cluster
            else await start_local()
        )
        print(f"handles ready in {time.monotonic() - started:.1f}s", flush=True)
        return await train(handles, steps)
    finally:
        await kubeforge.shutdown()  # as torchforge's provisioner shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--cluster", type=Path, help="JSON: each role's router url and token")
    ns = parser.parse_args()
    result = asyncio.run(main(ns.steps, ns.cluster))
    print("RESULT " + json.dumps(result))
    sys.exit(0)
