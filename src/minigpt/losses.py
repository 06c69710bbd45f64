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
    and 0 on ignored ones (whose loss is left out too). Written as whole-tensor
    expressions so that a compiler fuses them into two passes over the logits (row
    max/sum, then the gradient written in the logits' dtype); eager PyTorch makes six.
    """
    x = logits.float()  # (chunk, vocab)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (chunk, 1)
    picked = x.gather(1, targets[:, None])  # (chunk, 1)
    loss = ((lse - picked).squeeze(1) * (row_scale != 0)).sum()
    vocab_ids = torch.arange(x.shape[1], device=x.device)  # (vocab,)
    one_hot = (vocab_ids == targets[:, None]).float()  # (chunk, vocab), never materialised when fused
    grad = (torch.exp(x - lse) - one_hot) * row_scale[:, None]  # (chunk, vocab)
    return loss, grad.to(logits.dtype)


@functools.cache
def _fused_loss_and_logit_grad(device_type: str) -> Callable:
    """`loss_and_logit_grad` compiled into fused kernels, on CPU.

    On 2 cores, 1,024 rows of bf16 logits take 19 ms fused and 48 ms as the eager
    in-place sequence (float, log_softmax, gather, exp_, index, mul_, to bf16): a
    gpt2-tiny step goes from ~6,300 to ~7,600 tokens/s. Elsewhere (CUDA, or no C++
    compiler for inductor) the plain function runs: not measured there, so not assumed.
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
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        row_scale = keep / n_kept  # (tokens,) the mean's weights: 0 on ignored rows
        # Inside a compiled model the compiler fuses the plain function itself.
        loss_and_grad = (loss_and_logit_grad if torch.compiler.is_compiling()
                         else _fused_loss_and_logit_grad(hidden.device.type))
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start:start + chunk_size].to(dtype)  # (chunk, emb)
            rows = slice(start, start + chunk_size)
            t = targets[rows].masked_fill(~keep[rows], 0)  # (chunk,) any valid index
            chunk_loss, grad_logits = loss_and_grad(h @ w.t(), t, row_scale[rows])  # (), (chunk, vocab)
            total += chunk_loss
            grad_hidden[rows] = grad_logits @ w  # (chunk, emb)
            grad_weight += (grad_logits.t() @ h).float()  # (vocab, emb)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
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
