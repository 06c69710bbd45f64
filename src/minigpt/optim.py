"""Muon for a transformer's hidden matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024) keeps a Nesterov momentum of each weight matrix's gradient and
replaces the update by the nearest semi-orthogonal matrix (all singular values 1), found
by a few Newton–Schulz iterations: every direction of the matrix moves by the same amount,
instead of the few directions that dominate a raw gradient. It is meant for the 2-D
weights inside the blocks; embeddings, the output head, norms and biases keep AdamW. One
`torch.optim.Optimizer` holds both kinds of group, so checkpoints, exact resume and the
trainer's learning-rate schedule see a single object.

Why not `torch.optim.Muon` (PyTorch >= 2.9): it orthogonalises each parameter whole, so
the fused (3·emb, emb) q/k/v weight would move as one map, and it takes only 2-D
parameters, so the rest would need a second optimizer and two state dicts per checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adamw import adamw

# The quintic iteration's coefficients from the Muon write-up: they push singular values
# into ~[0.7, 1.2] in 5 steps (not exactly 1, which a model does not notice).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """~U V^T of `matrix (..., rows, cols)`'s SVD by Newton–Schulz iterations, in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide side: (rows, rows) products are the smaller ones
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values now <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (..., rows, rows)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps of `lr * lr_scale`; the others AdamW steps of `lr`.

    A Muon group's `split` cuts each matrix into that many equal blocks of rows that are
    orthogonalised on their own (the fused q/k/v projection is three maps, not one).
    The trainer sets every group's `lr` from one schedule; `lr_scale` keeps Muon's
    larger step (~0.02 at the peak) in proportion. Muon groups take no weight decay.
    """

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 lr_scale: float, momentum: float = 0.95, eps: float = 1e-8, fused: bool | None = None) -> None:
        # `fused` in the groups, as AdamW keeps it: loading a checkpoint then moves the step
        # counters to the parameters' device, where the fused kernel wants them.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, split=1,
                        lr_scale=lr_scale, momentum=momentum, fused=fused)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum, split = group["lr"] * group["lr_scale"], group["momentum"], group["split"]
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # an EMA of the gradients
        updates = torch._foreach_lerp(grads, bufs, momentum)  # Nesterov: look one step ahead
        # One batched Newton–Schulz per shape instead of one per matrix: gpt2-tiny's 24
        # small matrices take 4.5 instead of 8.7 ms per step (2 cores); gpt2-small's are
        # large enough that batching changes nothing.
        same_shape: dict[torch.Size, list[int]] = {}
        for i, p in enumerate(params):
            same_shape.setdefault(p.shape, []).append(i)
        for shape, indices in same_shape.items():
            rows, cols = shape[0] // split, shape[1]
            blocks = torch.stack([updates[i].view(split, rows, cols) for i in indices])  # (n, split, rows, cols)
            orthogonal = orthogonalize(blocks)
            # An orthogonal (rows, cols) matrix has entries of RMS 1/sqrt(max(rows, cols));
            # scaling tall blocks by sqrt(rows / cols) gives every shape the same step per input.
            step = -lr * max(1.0, rows / cols) ** 0.5
            for i, update in zip(indices, orthogonal):
                params[i].add_(update.view(shape), alpha=step)

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:  # the same state AdamW keeps, so its kernels apply
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
              fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
