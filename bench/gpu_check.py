"""kubeforge on CUDA, in one script for the day a GPU machine is lent: one summary line a check.

    python bench/gpu_check.py          # a GPU machine: procs = the visible GPUs (1 is fine)
    python bench/gpu_check.py --cpu    # the same checks on CPU, gloo, 2 ranks (CI runs this)

The checks, each printed as `CHECK <name>: ok ...` (or `FAILED ...`, and the exit status is 1):

1. ranks: a `with_gpus=True` Service whose every rank sees one GPU of its own, and whose ranks
   form one process group (NCCL across GPUs, gloo on CPU);
2. all_reduce: a collective over every rank, result checked, time per call;
3. tensors: CUDA tensors as arguments (they travel as their bytes and `@endpoint(device=...)`
   moves them onto the rank's GPU) and as results (they arrive on the caller's CPU), every
   dtype bit-exact;
4. model: examples/grpo.py's TinyLM on the GPU: its state dict loaded with
   `update_weights.fanout`, sampling throughput, and GRPO training steps whose loss is finite.

A `RESULT {json}` line at the end holds the figures. Finishes within 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

if "--cpu" in sys.argv:  # before torch is imported, here and in every replica started from here
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.grpo import RESPONSE_TOKENS, TinyLM, simple_grpo_loss
from kubeforge import Actor, Service, ServiceConfig, current_rank, endpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


class GpuCheck(Actor):
    async def setup(self) -> None:
        self.me = current_rank()
        self.device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
        self.backend = "nccl" if DEVICE == "cuda" else "gloo"
        if self.me.world_size > 1:
            await asyncio.to_thread(
                dist.init_process_group, self.backend, timeout=timedelta(seconds=60)
            )
        self.model = TinyLM().to(self.device)

    @endpoint
    async def where(self) -> dict[str, Any]:
        return {
            "rank": self.me.rank,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
            "group": dist.get_backend() if dist.is_initialized() else None,
        }

    @endpoint
    async def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        x = t.to(self.device) * (self.me.rank + 1)
        if dist.is_initialized():
            await asyncio.to_thread(dist.all_reduce, x)
        return x

    @endpoint(device=DEVICE)
    async def on_device(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """Where the arguments arrived, and themselves, doubled (booleans negated), as results
        that live on the device."""
        return {
            "devices": sorted({str(t.device.type) for t in tensors}),
            "results": [~t if t.dtype == torch.bool else t * 2 for t in tensors],
        }

    @endpoint
    async def update_weights(self, state_dict: dict[str, torch.Tensor]) -> int:
        self.model.load_state_dict(state_dict)
        return sum(t.numel() for t in state_dict.values())

    @endpoint
    async def sample(self, n: int) -> dict[str, float]:
        prompts = torch.stack([torch.tensor([10, i % 10]) for i in range(n)]).to(self.device)
        self.model.sample(prompts, RESPONSE_TOKENS)  # warm
        _sync()
        started = time.perf_counter()
        tokens, _ = self.model.sample(prompts, RESPONSE_TOKENS)
        _sync()
        return {"tokens_per_s": tokens.numel() / (time.perf_counter() - started)}

    @endpoint
    async def train(self, steps: int) -> list[float]:
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        losses = []
        for _ in range(steps):
            prompts = torch.randint(0, 10, (64, 1), device=self.device)
            prompts = torch.cat([torch.full_like(prompts, 10), prompts], dim=1)
            tokens, sampled = self.model.sample(prompts, RESPONSE_TOKENS)
            advantages = torch.randn(64, device=self.device)
            loss = simple_grpo_loss(self.model.logprobs(prompts, tokens), sampled, advantages, 0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.figures: dict[str, Any] = {}

    def report(self, name: str, ok: bool, detail: str, **figures: Any) -> None:
        print(f"CHECK {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)
        self.figures[name] = {"ok": ok, **figures}
        if not ok:
            self.failed.append(name)


async def run(cpu: bool) -> Checks:
    gpus = 0 if cpu else torch.cuda.device_count()
    if not cpu and gpus == 0:
        raise SystemExit("no GPU visible: run with --cpu to check the CPU path")
    procs = gpus if gpus else 2
    cfg = ServiceConfig(
        num_replicas=1, procs=procs, with_gpus=gpus > 0, return_first_rank_result=False
    )
    checks = Checks()
    started = time.monotonic()
    async with Service(cfg, GpuCheck) as svc:
        checks.figures["start_s"] = time.monotonic() - started
        ranks = await svc.where.route()
        visible = [r["cuda_visible_devices"] for r in ranks]
        own = gpus == 0 or (len(set(visible)) == len(visible) and all(visible))
        grouped = procs == 1 or {r["group"] for r in ranks} == {"nccl" if gpus else "gloo"}
        checks.report(
            "ranks",
            own and grouped,
            f"{procs} ranks, devices {[r['device'] for r in ranks]}, "
            f"CUDA_VISIBLE_DEVICES {visible}, group {ranks[0]['group']}",
            ranks=ranks,
        )

        t = torch.arange(1 << 20, dtype=torch.float32)
        want = t * sum(range(1, procs + 1))
        took = []
        for _ in range(10):
            began = time.perf_counter()
            out = await svc.all_reduce.route(t)
            took.append(time.perf_counter() - began)
        exact = all(torch.equal(x, want) for x in out)
        ms = sorted(took)[len(took) // 2] * 1e3
        checks.report("all_reduce", exact, f"4 MiB over {procs} ranks: p50 {ms:.1f} ms", p50_ms=ms)

        args = [
            (torch.rand(256, 256) * 100).to(d) if d.is_floating_point else torch.ones(7, dtype=d)
            for d in DTYPES
        ]
        sent = [a.to(DEVICE) for a in args]  # CUDA tensors as arguments, where there is CUDA
        answers = await svc.on_device.route(sent)
        back = answers[0]["results"]
        exact = all(
            torch.equal(r, ~a if a.dtype == torch.bool else a * 2)
            and r.dtype == a.dtype
            and r.device.type == "cpu"
            for r, a in zip(back, args, strict=True)
        )
        where = answers[0]["devices"]
        checks.report(
            "tensors",
            exact and where == [DEVICE],
            f"{len(DTYPES)} dtypes sent from {DEVICE}, computed on {where}, back on the CPU, "
            "bit-exact",
        )

        model = TinyLM()
        loaded = await svc.update_weights.fanout(model.state_dict())
        rates = await svc.sample.route(4096)
        losses = await svc.train.route(20)
        finite = all(torch.isfinite(torch.tensor(r)).all() for r in losses)
        rate = min(r["tokens_per_s"] for r in rates)
        checks.report(
            "model",
            finite and loaded == [[sum(p.numel() for p in model.parameters())] * procs],
            f"TinyLM ({loaded[0][0]} parameters) loaded on every rank; sampling "
            f"{rate:,.0f} tokens/s a rank; 20 GRPO steps, last loss {losses[0][-1]:.3f}",
            tokens_per_s=rate,
        )
    checks.figures["total_s"] = time.monotonic() - started
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="CPU only: gloo, 2 ranks")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    checks = asyncio.run(run(args.cpu))
    figures = {"device": "cpu" if args.cpu else DEVICE, "failed": checks.failed, **checks.figures}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print("RESULT " + json.dumps(figures))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
