"""Held-out scores of a trained model: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import tiktoken
import torch

from minigpt.model import GPTModel
from minigpt.utils import autocast_for, eval_mode


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; special tokens (EOT) stand for none."""
    special = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for token in range(enc.n_vocab):
        if token not in special:
            lengths[token] = len(enc.decode_single_token_bytes(token))
    return lengths


@torch.no_grad()
def score(model: GPTModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
          token_bytes: np.ndarray, precision: str = "fp32", max_batches: int | None = None) -> dict[str, float]:
    """Cross-entropy over the given batches, summed exactly (not a mean of means).

    Bits per byte divide the total information (nats -> bits) by the bytes of text
    the target tokens spell, so models with different tokenizers compare fairly.
    """
    total_nats, n_tokens, n_bytes = 0.0, 0, 0
    byte_table = torch.from_numpy(token_bytes)
    with eval_mode(model):
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            with autocast_for(device, precision):
                mean_loss = model(x.to(device), y.to(device)).float().item()
            total_nats += mean_loss * y.numel()
            n_tokens += y.numel()
            n_bytes += int(byte_table[y].sum())
    if n_tokens == 0:
        raise ValueError("no batch to evaluate: the split is smaller than one batch")
    loss = total_nats / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
        "tokens": n_tokens,
        "bytes": n_bytes,
    }
