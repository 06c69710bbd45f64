"""Model FLOPs per token and the machine's matmul throughput, for MFU."""

from __future__ import annotations

import functools
import time

import torch

from minigpt.model import GPTModel


def flops_per_token(model: GPTModel, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention scores.

    Position embeddings are a lookup, not a matmul, so they are left out; the token
    embedding counts once, as the output head's matmul. Attention adds
    2 (QK^T and AV) x 2 (multiply-add) x 3 (fwd + bwd) x n_layers x seq x emb_dim.
    """
    cfg = model.cfg
    n_matmul_params = model.num_parameters(exclude_position_embeddings=True)
    return 6.0 * n_matmul_params + 12.0 * cfg.n_layers * seq_len * cfg.emb_dim


@functools.lru_cache(maxsize=None)
def matmul_flops_per_s(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 1024,
                       seconds: float = 0.3, shape: tuple[int, int, int] | None = None) -> float:
    """Achieved FLOP/s of a square matmul in `dtype`: the yardstick MFU is measured against.

    This CPU has no published peak for our thread count, so we measure one; on CUDA
    the same measurement gives a realistic (below datasheet) ceiling. `shape=(m, k, n)`
    measures `(m, k) @ (k, n)` instead of `size`-square (the benchmark uses a model's shapes).
    """
    device = torch.device(device)
    m, k, n = shape or (size, size, size)
    # A private generator: measuring must not shift the global RNG a training run depends on.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    for _ in range(3):  # warm up kernels and caches
        a @ b
    _sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    _sync(device)
    return 2.0 * m * k * n * calls / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
