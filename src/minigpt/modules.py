"""Building blocks of a GPT-2 transformer, one concept per class.

Every block maps `(batch, seq, emb_dim)` to `(batch, seq, emb_dim)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Keys and values of one attention layer for the tokens seen so far.

    Preallocated to `context_length` so that appending a token is a copy into
    a slice, not a `torch.cat` that reallocates the whole history every step.
    """

    def __init__(self, batch: int, n_heads: int, context_length: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, n_heads, context_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # number of positions filled

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new `(batch, heads, new, head_dim)` entries; return all filled ones."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > context_length {self.keys.shape[2]}")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (batch, heads, end, head_dim)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: PyTorch's fused SDPA kernel, written out on CPU."""

    def __init__(self, d_in: int, d_out: int, dropout: float, n_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if d_out % n_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.d_out = d_out
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        self.dropout = dropout
        # One matmul for queries, keys and values instead of three small ones.
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape  # (batch, seq, d_in)
        qkv = self.qkv(x)  # (batch, seq, 3 * d_out)
        qkv = qkv.view(batch, seq, 3, self.n_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, head_dim)

        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            keys, values = kv_cache.append(keys, values)  # (batch, heads, past + seq, head_dim)

        if past == 0 and seq > 1 and x.device.type == "cpu":
            context = self._causal_attention_cpu(queries, keys, values)  # (batch, heads, seq, head_dim)
        else:
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=self._cache_mask(past, seq, x.device),
                is_causal=past == 0 and seq > 1, dropout_p=self.dropout if self.training else 0.0,
            )  # (batch, heads, seq, head_dim)
        context = context.transpose(1, 2).reshape(batch, seq, self.d_out)  # (batch, seq, d_out)
        return self.out_proj(context)  # (batch, seq, d_out)


    def _causal_attention_cpu(self, queries: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v written out, for CPU training and prefill.

        PyTorch's CPU flash kernel is slow at these sizes: forward + backward of
        (16, 4, 128, 32) in bf16 takes 8.7 ms with SDPA and 2.8 ms written out as two
        matmuls and a softmax (17.7 vs 11.4 ms at (8, 6, 256, 64)): ~10% of a gpt2-tiny
        training step. The (seq, seq) scores per head are small on a CPU's budget.
        """
        seq = queries.shape[-2]
        scores = queries @ keys.transpose(-2, -1) * self.head_dim ** -0.5  # (batch, heads, seq, seq)
        future = torch.ones(seq, seq, dtype=torch.bool, device=queries.device).triu(1)  # (seq, seq)
        weights = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(values.dtype)
        weights = F.dropout(weights, self.dropout, self.training)
        return weights @ values  # (batch, heads, seq, head_dim)

    @staticmethod
    def _cache_mask(past: int, seq: int, device: torch.device) -> torch.Tensor | None:
        """Which cached keys each new query may see; None when the kernel needs no mask."""
        if past == 0 or seq == 1:
            # Plain causal attention (the kernel builds the triangle), or one new query
            # attending to every cached position.
            return None
        # New queries sit at positions past..past+seq-1; each sees keys up to itself.
        q_pos = torch.arange(past, past + seq, device=device)[:, None]
        k_pos = torch.arange(past + seq, device=device)[None, :]
        return k_pos <= q_pos  # (seq, past + seq)


class LayerNorm(nn.Module):
    """Normalise each token's features to zero mean and unit variance, then scale and shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))
        self.bias = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel computes the same biased-variance normalisation as GPT-2.
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation (the exact erf form gives slightly different logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: emb_dim -> 4 * emb_dim -> emb_dim."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(emb_dim, 4 * emb_dim)
        self.act = GELU()
        self.proj = nn.Linear(4 * emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))  # (batch, seq, emb_dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, emb_dim: int, n_heads: int, dropout: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = LayerNorm(emb_dim)
        self.attn = MultiHeadAttention(emb_dim, emb_dim, dropout, n_heads, qkv_bias)
        self.norm2 = LayerNorm(emb_dim)
        self.ff = FeedForward(emb_dim)
        self.drop_resid = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop_resid(self.attn(self.norm1(x), kv_cache))  # (batch, seq, emb_dim)
        x = x + self.drop_resid(self.ff(self.norm2(x)))  # (batch, seq, emb_dim)
        return x


def residual_projections(block: TransformerBlock) -> list[nn.Linear]:
    """The layers that write into the residual stream (GPT-2 scales their init)."""
    return [block.attn.out_proj, block.ff.proj]


def gpt2_init_(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation for one module: N(0, std) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def scaled_residual_std(n_layers: int, std: float = 0.02) -> float:
    """Each block adds two residual branches; scaling keeps the stream's variance flat."""
    return std / math.sqrt(2 * n_layers)
