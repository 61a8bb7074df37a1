"""GRPO, shaped as torchforge's apps/grpo/main.py is, with a real (tiny) causal language model.

The task: after a prompt of one digit `a`, write digits equal to `(a + 1) % 10`. The policy is
a one-layer transformer defined below (no weights from a hub); it samples a group of responses
per prompt; the reward is the fraction of a response's digits that are right; advantages are
normalised within the group; the trainer (two ranks, DDP over gloo) minimises torchforge's
GRPO loss (`simple_grpo_loss`: the policy-gradient term with a KL penalty against the policy
that sampled) with Adam, then its state dict goes to every policy replica. Over 60 steps the
batch reward rises from about 0.1 (chance) to 0.97-0.99 (two runs here, 0.28 s a step).

* actors (`X.options(**cfg).as_actor(...)`): dataset, trainer (`procs: 2`), replay buffer,
  advantages; called with `.call_one()`, or `.call()` on every rank (the trainer's steps);
* services (`X.options(**cfg).as_service(...)`): policy (2 replicas) and reward; called with
  `.route()`, and `policy.update_weights.fanout(version, state_dict)` after each step;
* each rollout is a session the caller names (`sess_id="rollout-3"`): the policy keeps the
  prompt of its session (as a serving engine keeps a prefix cache) and frees it in
  `on_session_end` when the rollout ends the session;
* rollouts and training run concurrently, and `kubeforge.shutdown()` ends the program.

Locally: `python examples/grpo.py` (60 steps, about 25 s here). Against a cluster, after
`kubectl apply -f examples/grpo.yaml`: `python examples/grpo.py --cluster routers.json`, where
the file maps each role to its Service's router, `{"policy": {"url": ..., "token": ...}, ...}`
(the URL is the Service's `status.endpoint`, the token its `<name>-token` Secret). Only where
the handles come from changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import kubeforge
from kubeforge import Actor, current_session, endpoint

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

DIGITS, BOS = 10, 10  # tokens 0-9 are digits; 10 starts a prompt
RESPONSE_TOKENS = 4
GROUP_SIZE = 8
BATCH = 64  # episodes per training step: 8 prompts' groups


class TinyLM(torch.nn.Module):
    """A causal transformer language model over digits: embeddings, one masked self-attention
    layer, a linear head. About 9k parameters: it trains in milliseconds on a CPU."""

    def __init__(self, d: int = 32, layers: int = 1, heads: int = 2, max_len: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(DIGITS + 1, d)
        self.position = torch.nn.Embedding(max_len, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, DIGITS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        x = self.embed(ids) + self.position(torch.arange(n, device=ids.device))
        return self.head(self.body(x, mask=mask, is_causal=True))

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` tokens after each prompt, and the log-probability each had when sampled."""
        ids, logprobs = prompts, []
        for _ in range(n):
            choice = torch.distributions.Categorical(logits=self(ids)[:, -1])
            token = choice.sample()
            logprobs.append(choice.log_prob(token))
            ids = torch.cat([ids, token[:, None]], dim=1)
        return ids[:, prompts.shape[1] :], torch.stack(logprobs, dim=1)

    def logprobs(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of `responses` after `prompts` under this model (with gradients)."""
        return response_logprobs(self, prompts, responses)


def response_logprobs(
    model: torch.nn.Module, prompts: torch.Tensor, responses: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of `responses` after `prompts` under `model`, which may be a DDP
    wrapper: its forward is what makes the backward pass all-reduce the gradients."""
    logits = model(torch.cat([prompts, responses], dim=1))[:, prompts.shape[1] - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, responses[..., None]).squeeze(-1)


def simple_grpo_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor, beta: float
) -> torch.Tensor:
    """torchforge's GRPO loss: the policy-gradient term, minus `beta` times a KL estimate
    against the reference (here the policy that sampled), averaged over tokens, then episodes."""
    kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
    policy = torch.exp(logprobs - logprobs.detach()) * advantages[:, None]
    return (-(policy - beta * kl)).mean(dim=1).mean()


@dataclass
class Sample:
    prompt: str
    prompt_ids: torch.Tensor  # int64: BOS and the digit
    target: int


@dataclass
class Completion:
    """One response of the policy: its tokens with their log-probabilities when sampled, and
    the policy version that wrote it."""

    prompt_ids: torch.Tensor
    text: str
    token_ids: torch.Tensor  # int64, one per digit of `text`
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
        a = self.rng.randrange(DIGITS)
        return Sample(str(a), torch.tensor([BOS, a]), (a + 1) % DIGITS)

    @endpoint
    async def pad_token(self) -> int:
        return BOS


class Policy(Actor):
    """Samples groups of responses with its copy of the model; `update_weights` loads the
    trainer's state dict. The prompt of each session is kept until the session ends."""

    def __init__(self, group_size: int = GROUP_SIZE) -> None:
        self.group_size = group_size
        torch.seed()  # each replica samples with a random stream of its own
        self.model = TinyLM().eval()
        self.version = -1  # no weights from the trainer yet
        self.prompts: dict[str, torch.Tensor] = {}  # per session

    @endpoint
    async def generate(self, prompt_ids: torch.Tensor) -> list[Completion]:
        session = current_session()
        if session is not None:
            self.prompts[session] = prompt_ids
        prompts = prompt_ids.expand(self.group_size, -1)
        tokens, logprobs = self.model.sample(prompts, RESPONSE_TOKENS)
        return [
            Completion(prompt_ids, "".join(map(str, t.tolist())), t, lp, self.version)
            for t, lp in zip(tokens, logprobs, strict=True)
        ]

    async def on_session_end(self, session_id: str) -> None:
        self.prompts.pop(session_id, None)

    @endpoint
    async def update_weights(self, version: int, state_dict: dict[str, torch.Tensor]) -> int:
        self.model.load_state_dict(state_dict)
        self.version = version
        return version

    @endpoint
    async def weights_version(self) -> int:
        return self.version

    @endpoint
    async def sessions_kept(self) -> int:
        return len(self.prompts)


class RewardActor(Actor):
    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: int) -> float:
        """The fraction of the response's digits that are the target."""
        return sum(c == str(target) for c in response) / max(len(response), 1)


class ComputeAdvantages(Actor):
    @endpoint
    async def compute(self, rewards: torch.Tensor) -> torch.Tensor:
        """GRPO's group-relative advantage: each reward against its group's mean and spread."""
        return (rewards - rewards.mean()) / (rewards.std() + 1e-4)


class ReplayBuffer(Actor):
    def __init__(self, batch_size: int = BATCH, max_policy_age: int = 1) -> None:
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
    """Data parallel over its ranks (DDP over gloo): each rank's loss is over its shard of the
    batch, and the backward pass all-reduces the gradients, so every rank's weights agree."""

    def __init__(self, lr: float = 0.01, beta: float = 0.05, seed: int = 0) -> None:
        self.lr, self.beta, self.seed = lr, beta, seed
        self.steps = 0

    async def setup(self) -> None:
        await asyncio.to_thread(dist.init_process_group, "gloo", timeout=timedelta(seconds=60))
        torch.manual_seed(self.seed)  # every rank starts from the same weights
        self.model = torch.nn.parallel.DistributedDataParallel(TinyLM())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def _step(self, shard: list[Episode]) -> float:
        prompts = torch.stack([e.completion.prompt_ids for e in shard])
        responses = torch.stack([e.completion.token_ids for e in shard])
        sampled = torch.stack([e.completion.logprobs for e in shard])
        advantages = torch.tensor([e.advantage for e in shard])
        logprobs = response_logprobs(self.model, prompts, responses)
        loss = simple_grpo_loss(logprobs, sampled, advantages, self.beta)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @endpoint
    async def train_step(self, batch: list[Episode]) -> dict[str, Any]:
        shard = batch[self.rank :: self.world_size]
        loss = await asyncio.to_thread(self._step, shard)  # a collective: off the event loop
        self.steps += 1
        return {"rank": self.rank, "loss": loss, "episodes": len(shard)}

    @endpoint
    async def push_weights(self, version: int) -> dict[str, torch.Tensor]:
        """This rank's state dict, which every policy replica loads."""
        return {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}


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
        Policy.options(**services["policy"]).as_service(group_size=GROUP_SIZE),
        Trainer.options(**actors["trainer"]).as_actor(lr=0.01),
        ReplayBuffer.options(**actors["replay_buffer"]).as_actor(batch_size=BATCH),
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
    step_seconds: list[float] = []
    versions: list[list[int]] = []

    async def push(version: int) -> None:
        weights = await h.trainer.push_weights.call(version)
        for other in weights[1:]:
            if any(not torch.equal(other[k], weights[0][k]) for k in weights[0]):
                raise RuntimeError("the trainer's ranks disagree on their weights")
        versions.append(await h.policy.update_weights.fanout(version, weights[0]))

    async def continuous_rollouts(task: int) -> None:
        n = 0
        while not stop.is_set():
            sample = await h.dataloader.sample.call_one()
            session, n = f"rollout-{task}-{n}", n + 1  # a session named by the caller
            responses = await h.policy.generate.route(sample.prompt_ids, sess_id=session)
            await h.policy.terminate_session(session)  # the policy frees what it kept for it
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
        await push(version)  # the policy starts from the trainer's weights
        while version < steps:
            for task in rollouts:  # a rollout that failed ends the program with its error
                if task.done():
                    task.result()
            batch = await h.replay_buffer.sample.call_one(curr_policy_version=version)
            if batch is None:
                await asyncio.sleep(0.01)
                continue
            started = time.monotonic()
            batch_rewards.append(statistics.fmean(e.reward for e in batch))
            per_rank = await h.trainer.train_step.call(batch)
            losses.append([r["loss"] for r in per_rank])
            version += 1
            await push(version)
            step_seconds.append(time.monotonic() - started)
            print(f"step {version}: batch reward {batch_rewards[-1]:.2f}", flush=True)
        stop.set()

    rollouts = [asyncio.create_task(continuous_rollouts(i)) for i in range(rollout_tasks)]
    started = time.monotonic()
    try:
        await continuous_training()
    finally:
        stop.set()
        await asyncio.gather(*rollouts)
    return {
        "steps": steps,
        "batch_rewards": batch_rewards,
        "losses": losses,
        "seconds_per_step": (time.monotonic() - started) / max(steps, 1),
        "train_and_push_seconds": statistics.median(step_seconds) if step_seconds else None,
        "versions_after_each_push": versions,
        "trainer_ranks": h.trainer.world_size,
        "policy_versions": await h.policy.weights_version.fanout(),
        "sessions_kept": await h.policy.sessions_kept.fanout(),
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
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--cluster", type=Path, help="JSON: each role's router url and token")
    ns = parser.parse_args()
    result = asyncio.run(main(ns.steps, ns.cluster))
    print("RESULT " + json.dumps(result))
    sys.exit(0)
