"""Autoregressive sampling: greedy, temperature, top-k, top-p, per-sequence EOS, KV cache;
all at once (`generate`) or token by token as they come (`stream_tokens`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from minigpt.model import GPTModel
from minigpt.modules import KVCache
from minigpt.utils import eval_mode


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. `(batch, vocab)`."""
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (batch, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (batch, vocab)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row of `(batch, vocab)` logits; returns `(batch, 1)`."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (batch, 1)


class _Decoder:
    """Logits of the last position, reusing cached keys/values while the context has room."""

    def __init__(self, model: GPTModel, batch: int, use_cache: bool) -> None:
        self.model = model
        self.context_length = model.cfg.context_length
        self.caches: list[KVCache] | None = model.new_kv_caches(batch) if use_cache else None
        # With the cache the head is most of a token's cost. In fp32 one row times the
        # (vocab, emb) weight is a matrix-vector product that MKL runs ~2x slower than the
        # same product against an (emb, vocab) copy (gpt2-small: 5.3 vs 2.7 ms), so decoding
        # pays for that copy once; in bf16 the weight as stored is the faster one (1.5 vs 1.7 ms).
        weight = model.out_head.weight  # (vocab_size, emb_dim)
        self.head_weight = weight.t().contiguous() if weight.dtype == torch.float32 else weight.t()  # (emb, vocab)

    def last_logits(self, idx: torch.Tensor, n_new: int) -> torch.Tensor:
        """`idx` is the whole sequence so far `(batch, seq)`; `n_new` tokens are not in the cache yet."""
        window = idx[:, -self.context_length:]  # the model sees at most context_length tokens
        if self.caches is None:
            feed, caches = window, None
        elif self.caches[0].length + n_new <= self.context_length:
            feed, caches = idx[:, -n_new:], self.caches
        else:
            # The window slid: absolute positions changed, so cached keys are stale.
            # Re-encode the window from scratch (same result as uncached decoding).
            self.caches = self.model.new_kv_caches(idx.shape[0])
            feed, caches = window, self.caches
        hidden = self.model.hidden_states(feed, caches)  # (batch, len(feed), emb_dim)
        # Only the last position is needed: projecting the others to 50k logits is wasted work.
        # fp32 logits whatever the weights' dtype, so that sampling and top-p see no rounding.
        return (hidden[:, -1] @ self.head_weight).float()  # (batch, vocab_size)


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend token ids `(batch, seq)` by up to `max_new_tokens`; returns `(batch, seq + n)`.

    temperature 0 is greedy. A sequence that emits `eos_id` stops there: its later
    positions are padded with `eos_id`, and decoding ends when every sequence has stopped.
    """
    _check_request(idx, max_new_tokens)
    steps = _decode(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, use_cache=use_cache, generator=generator)
    return torch.cat([idx, *steps], dim=1)  # (batch, seq + n)


def stream_tokens(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """The new token ids of one sequence `(1, seq)`, each as soon as it is chosen: the same
    tokens `generate` appends, from the same arguments (and generator state).

    The shape is checked now, the sampling arguments at the first token. The model is in
    eval mode until the iterator is exhausted or closed (leaving a `for` loop closes it).
    """
    _check_request(idx, max_new_tokens)
    if idx.shape[0] != 1:
        raise ValueError(f"stream_tokens decodes one sequence, got a batch of {idx.shape[0]}; use generate")
    steps = _decode(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, use_cache=use_cache, generator=generator)
    return (int(token) for token in steps)


def _check_request(idx: torch.Tensor, max_new_tokens: int) -> None:
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (batch, seq) tensor of token ids, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


# no_grad on a generator function holds on every resumption, not only while it is created.
@torch.no_grad()
def _decode(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, *, temperature: float,
            top_k: int | None, top_p: float | None, eos_id: int | None, use_cache: bool,
            generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """The sampling loop that `generate` and `stream_tokens` share: yields each step's
    tokens `(batch, 1)`, then stops after `max_new_tokens` or once every sequence has
    emitted `eos_id` (a sequence that stopped is padded with `eos_id`)."""
    with eval_mode(model):
        decoder = _Decoder(model, idx.shape[0], use_cache)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (batch,)
        n_new = min(idx.shape[1], model.cfg.context_length)
        for _ in range(max_new_tokens):
            logits = decoder.last_logits(idx, n_new)  # (batch, vocab_size)
            token = next_token(logits, temperature, top_k, top_p, generator)  # (batch, 1)
            if eos_id is not None:
                token = token.masked_fill(finished[:, None], eos_id)
                finished |= token[:, 0] == eos_id
            yield token
            idx = torch.cat([idx, token], dim=1)  # (batch, seq + 1)
            n_new = 1
            if eos_id is not None and bool(finished.all()):
                break
