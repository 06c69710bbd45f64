"""Cross-entropy over a 50k vocabulary without materialising all the logits.

For a small GPT the output head dominates the step: `(tokens, vocab)` logits and
their gradient are hundreds of MB that get allocated, zeroed and freed every step.
`LinearCrossEntropy` walks the tokens in chunks and, since the loss is a scalar,
computes each chunk's gradients right away in the forward pass. Peak memory is one
`(chunk, vocab)` block; the backward pass only rescales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would use on this device, else the inputs' own."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


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
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start:start + chunk_size].to(dtype)  # (chunk, emb)
            k = keep[start:start + chunk_size]  # (chunk,)
            t = targets[start:start + chunk_size].masked_fill(~k, 0)  # (chunk,) any valid index
            logits = (h @ w.t()).float()  # (chunk, vocab)
            log_probs = torch.log_softmax(logits, dim=-1)
            total -= (log_probs.gather(1, t[:, None]).squeeze(1) * k).sum()
            # d(mean CE)/d logits = (softmax - one_hot) / n_kept on kept rows, 0 on ignored
            # ones: one row scale does both, reusing the logits buffer.
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = grad_logits.mul_((k / n_kept)[:, None]).to(dtype)  # (chunk, vocab)
            grad_hidden[start:start + chunk_size] = grad_logits @ w  # (chunk, emb)
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
