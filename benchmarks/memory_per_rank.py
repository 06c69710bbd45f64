"""Bytes each process holds for training, measured: weights, gradients and optimizer state
after one AdamW step, under DDP and FSDP (`make bench-memory` runs 1 and 2 processes on CPU);
and the tokens/s of the steps after it, for comparing the two strategies in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/memory_per_rank.py gpt2-small

Counted from the tensors themselves (a DTensor counts its local shard only), so the numbers
check the README's table, which computes 16 bytes per parameter / N for FSDP.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from minigpt.config import TrainConfig, preset_config
from minigpt.distributed import init_distributed, local_tensor, wrap_model
from minigpt.model import GPTModel
from minigpt.train import build_optimizer

TIMED_STEPS = 5  # after the first (which allocates the moments); 4 sequences of 64 tokens per process


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def measure(preset: str, strategy: str) -> dict:
    device = torch.device("cpu")
    ctx = init_distributed(device)
    torch.manual_seed(0)
    model = GPTModel(preset_config(preset, context_length=64))
    cfg = TrainConfig(strategy=strategy, optimizer="adamw", micro_batch_size=1, global_batch_size=ctx.world_size)
    runner = wrap_model(model, cfg, ctx, device)
    optimizer = build_optimizer(model, cfg, device)
    x = torch.randint(0, model.cfg.vocab_size, (4, 64))  # (batch, seq) per process
    runner(x, x).backward()  # (inputs, targets) -> mean loss
    optimizer.step()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        optimizer.zero_grad(set_to_none=True)
        runner(x, x).backward()
        optimizer.step()
    tokens_per_s = TIMED_STEPS * x.numel() * ctx.world_size / (time.perf_counter() - started)
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"preset": preset, "strategy": strategy, "world_size": ctx.world_size, "rank": ctx.rank,
            "parameters": model.num_parameters(),
            "weights": _bytes(model.parameters()), "gradients": _bytes(p.grad for p in model.parameters()),
            "optimizer": _bytes(moments), "tokens_per_s": round(tokens_per_s)}


if __name__ == "__main__":
    preset = sys.argv[1] if len(sys.argv) > 1 else "gpt2-small"
    for strategy in ("ddp", "fsdp"):
        row = measure(preset, strategy)
        row["total_per_parameter"] = round((row["weights"] + row["gradients"] + row["optimizer"]) / row["parameters"], 3)
        if row["rank"] == 0:
            print(json.dumps(row))
