"""Processes that train together: the process group torchrun asks for, and the model spread over it.

Two strategies, picked by `train.strategy` when torchrun starts more than one process:
- `ddp`: every process holds the whole model, its gradients and its optimizer state;
  gradients are all-reduced once per optimizer step.
- `fsdp`: FSDP2's `fully_shard` on each transformer block and on the root; each process
  keeps 1/world_size of every parameter, gradient and optimizer moment, all-gathers a
  block's weights just before using them and reduce-scatters its gradients after.
One process trains the plain model under either. The training loop asks this module three
things: wrap the model (`wrap_model`), skip a micro-batch's gradient reduction
(`accumulating`), and agree across ranks (`all_reduce_mean`, `on_any_rank`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minigpt.config import TrainConfig
from minigpt.modules import TransformerBlock
from minigpt.utils import compiled


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restarts: int = 0  # how often torchrun restarted the workers of this job (--max-restarts)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_s: float = 300) -> DistContext:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    `timeout_s` bounds every collective: a peer that died mid-step fails the others after
    it instead of leaving them blocked (torchrun then restarts the group, or stops)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world_size == 1:
        return DistContext(restarts=restarts)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # one GPU per process on each node; NCCL needs it set first
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    if restarts == 0 and rank == 0 and _shares_the_agent_store():
        print("torchrun: the workers share the launcher's key-value store, which keeps the keys of the "
              "attempt before a restart; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun so that a "
              "restart cannot stall (README: Train on several machines)")
    # Each agent counts only the restarts its own workers' failures caused; the one whose worker
    # died may not be rank 0's. The run reports the group's count.
    count = torch.tensor(restarts, device=device if device.type == "cpu" else torch.device("cuda", local_rank))
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return DistContext(rank, dist.get_world_size(), local_rank, int(count.item()))


def _shares_the_agent_store() -> bool:
    """torchrun with restarts allowed and workers meeting in the agent's store. That store outlives
    a restart (torch 2.13, c10d rendezvous): a restarted rank can read its dead peer's address and
    fail to connect (1 restart in 3 here), or the ranks of agents that counted the restart
    differently wait for each other's keys until the timeout. With the opt-out, rank 0's worker
    hosts a fresh store each round (8 of 8 restarts clean under load)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)


def is_sharded(model: torch.nn.Module) -> bool:
    """True once `fully_shard` has turned the model's parameters into DTensor shards."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """What forward passes go through: `model` itself, compiled, under DDP, or sharded.

    FSDP shards `model` in place (its parameters become DTensors), so build the optimizer
    after this call; the returned module is `model` (or its compiled wrapper).
    """
    if ctx.enabled and cfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 weights for the all-gathers and the compute, gradients reduced in fp32: gloo
        # reduces bf16 by summing in bf16 (pytorch#111131), which loses bits across ranks.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
                                      reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, head(s)
    runner = compiled(model) if cfg.compile else model
    if ctx.enabled and cfg.strategy == "ddp":
        runner = DistributedDataParallel(runner, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    return runner


@contextlib.contextmanager
def accumulating(runner: torch.nn.Module) -> Iterator[None]:
    """Forward and backward of a micro-batch whose gradients only accumulate locally: the
    reduction across ranks waits for the step's last micro-batch."""
    model = getattr(runner, "_orig_mod", runner)  # under torch.compile's wrapper
    if isinstance(runner, DistributedDataParallel):
        with runner.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)  # checked by the backward hooks, not the forward
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def as_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP's grad norm is one) as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return value.to_local() if hasattr(value, "to_local") else value


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / ctx.world_size
    return value


def on_any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank if `flag` is true on one. Each rank measures its own time, so
    without this one rank could stop at `max_time` while the others wait forever in the
    next step's all-reduce."""
    if not ctx.enabled:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
