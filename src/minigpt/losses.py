"""Cross-entropy over a 50k vocabulary without materialising all the logits.

For a small GPT the output head dominates the step: `(tokens, vocab)` logits and
their gradient are hundreds of MB that get allocated, zeroed and freed every step.
`LinearCrossEntropy` walks the tokens in chunks and, since the loss is a scalar,
computes each chunk's gradients right away in the forward pass. Peak memory is one
`(chunk, vocab)` block; the backward pass only rescales the stored gradients.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigpt.utils import compiled


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would use on this device, else the inputs' own."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor,
                        row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of one chunk of `logits (chunk, vocab)` and its gradient, scaled per row.

    d(CE)/d logits = softmax - one_hot; `row_scale (chunk,)` is 1/n_kept on kept rows
    and 0 on ignored ones (whose loss is left out too). Written so that a compiler
    makes one pass per row for the max and one that takes exp once per logit, keeps
    the row's exps in cache for its sum, and writes the gradient from them; the one
    entry per row where one_hot is 1 is then overwritten. Spelled as logsumexp with
    the one-hot inside the big expression, inductor made a second exp pass and a
    64-bit index compare per logit: 20 vs 12 ms per 1,024 rows of a 50k vocabulary.
    """
    x = logits.float()  # (chunk, vocab)
    row_max = x.amax(dim=-1, keepdim=True)  # (chunk, 1)
    exps = torch.exp(x - row_max)  # (chunk, vocab), never materialised when fused
    sum_exps = exps.sum(dim=-1, keepdim=True)  # (chunk, 1)
    lse = row_max + torch.log(sum_exps)  # (chunk, 1)
    picked = x.gather(1, targets[:, None])  # (chunk, 1)
    loss = ((lse - picked).squeeze(1) * (row_scale != 0)).sum()
    grad = (exps * (row_scale[:, None] / sum_exps)).to(logits.dtype)  # (chunk, vocab) softmax, scaled
    at_target = ((torch.exp(picked - lse) - 1.0) * row_scale[:, None]).to(logits.dtype)  # (chunk, 1)
    return loss, grad.scatter(1, targets[:, None], at_target)


@functools.cache
def fused_loss_and_logit_grad(device_type: str) -> Callable:
    """`loss_and_logit_grad` compiled into fused kernels, on CPU.

    On 2 cores, 1,024 rows of bf16 logits take 12 ms fused and 48 ms as the eager
    in-place sequence (float, log_softmax, gather, exp_, index, mul_, to bf16).
    Elsewhere (CUDA, or no C++ compiler for inductor) the plain function runs: not
    measured there, so not assumed.
    """
    if device_type != "cpu":
        return loss_and_logit_grad
    fused = compiled(loss_and_logit_grad, dynamic=False)

    def run(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor):
        nonlocal fused
        try:
            return fused(logits, targets, row_scale)
        except Exception as exc:  # inductor needs a working C++ toolchain
            warnings.warn(f"fused cross-entropy unavailable ({type(exc).__name__}: {exc}); "
                          f"using the unfused one, ~2x slower in the loss", stacklevel=2)
            fused = loss_and_logit_grad
            return fused(logits, targets, row_scale)

    return run


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T, target_i) with gradients for hidden and weight."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, ignore_index: int) -> torch.Tensor:
        # hidden (tokens, emb), weight (vocab, emb), targets (tokens,)
        dtype = _compute_dtype(hidden.device.type, hidden.dtype)
        n_tokens = hidden.shape[0]
        # Like F.cross_entropy, `ignore_index` targets (masked prompt tokens when fine-tuning)
        # count in neither the sum nor the mean. A tensor, not an int: no host sync.
        keep = targets != ignore_index  # (tokens,)
        n_kept = keep.sum().float()
        w = weight.to(dtype)  # (vocab, emb)
        grad_hidden = torch.empty_like(hidden)
        # The weight's gradient is summed transposed, (emb, vocab) = h^T @ grad_logits: with
        # an odd vocabulary (50,257) oneDNN runs the (vocab, emb) = grad_logits^T @ h product
        # at ~450 GFLOP/s and this one at ~700 (bf16, 2 cores); one transpose at the end.
        # With the one-exp loss above: training steps ~10% (gpt2-tiny) / ~8% (gpt2-small) faster.
        grad_weight_t = torch.zeros(weight.shape[::-1], dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        row_scale = keep / n_kept  # (tokens,) the mean's weights: 0 on ignored rows
        # Inside a compiled model the compiler fuses the plain function itself.
        loss_and_grad = (loss_and_logit_grad if torch.compiler.is_compiling()
                         else fused_loss_and_logit_grad(hidden.device.type))
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start:start + chunk_size].to(dtype)  # (chunk, emb)
            rows = slice(start, start + chunk_size)
            t = targets[rows].masked_fill(~keep[rows], 0)  # (chunk,) any valid index
            chunk_loss, grad_logits = loss_and_grad(h @ w.t(), t, row_scale[rows])  # (), (chunk, vocab)
            total += chunk_loss
            grad_hidden[rows] = grad_logits @ w  # (chunk, emb)
            grad_weight_t += h.t() @ grad_logits  # (emb, vocab)
        grad_weight = torch.empty_like(weight).copy_(grad_weight_t.t())  # (vocab, emb), laid out as weight
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n_kept

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `hidden (..., emb) @ weight (vocab, emb)^T` against `targets (...)`,
    skipping `ignore_index` targets exactly as `F.cross_entropy` does.

    `chunk_size=None` takes the plain path (full logits, autograd), which is also
    what runs when no gradient is needed, since then there is nothing to precompute.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, emb)
    targets = targets.reshape(-1)  # (tokens,)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if chunk_size is None or not needs_grad:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
