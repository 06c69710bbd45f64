"""Text in, text out: a trained model loaded from its checkpoint alone, and prompts continued
as text that streams.

The console script (`minigpt.cli`) and the MLflow model that the pipeline logs
(`pipeline/generator.py`) share these, so the same checkpoint, prompt and settings give the
same text in both.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from minigpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_state
from minigpt.config import ModelConfig, format_validation_error
from minigpt.generate import stream_tokens
from minigpt.model import GPTModel
from minigpt.tasks.lora import is_lora_checkpoint, load_merged
from minigpt.tokenizer import EOT_ID, get_tokenizer

#: Generation settings and their defaults, for the CLI's options and the pyfunc's params
#: (whose schema needs a typed default for each, hence 0 and 1.0 for "off", not None):
#: greedy, and with a temperature, sampled from a generator seeded with `seed`.
GENERATION_DEFAULTS: dict[str, int | float] = {
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": 0,  # 0: no top-k filtering
    "top_p": 1.0,  # 1.0: no nucleus filtering
    "seed": 0,
}


def model_config_of(state: dict[str, Any], path: str | Path) -> ModelConfig:
    """The model a checkpoint's saved `state` holds, from its run_info: `model_config` (a
    finetune's backbone) or `config.model` (pretraining). A classifier is refused: its head
    predicts classes, not the next token."""
    info = state.get("run_info") or {}
    config = info.get("config") or {}
    task = (config.get("finetune") or {}).get("task")
    if task == "classification":
        raise CheckpointError(f"checkpoint {path}: a classifier (finetune.task=classification) "
                              f"predicts classes, not text: it has no language-model head to generate with or export; "
                              f"use a pretrain or instruction checkpoint")
    raw = info.get("model_config") or config.get("model")
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path}: holds no model config "
                              f"(run_info.config.model or run_info.model_config)")
    try:
        return ModelConfig(**raw)
    except ValidationError as err:
        raise CheckpointError(f"checkpoint {path}: {format_validation_error(err, 'model')}") from None


def load_language_model(path: str | Path, device: torch.device | str = "cpu",
                        precision: str = "fp32") -> tuple[GPTModel, dict[str, Any]]:
    """The `GPTModel` of a checkpoint file, built from the config it holds, verified and in
    eval mode on `device`; and the checkpoint's saved state. A `CheckpointError` says why not.

    `precision="bf16"` keeps the weights (and so the KV cache) in bfloat16 for decoding:
    half the bytes read per token, which is what batch-1 decoding waits on (see `make bench`,
    `sample.kv_bf16_*`); logits are still fp32 for sampling.
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: expected fp32 or bf16")
    state = read_checkpoint_state(path)
    model = GPTModel(model_config_of(state, path))
    if is_lora_checkpoint(path):  # an instruction finetune's adapters, folded into their base
        model = load_merged(path, model, state)
    else:
        load_checkpoint(path, model)  # reads the whole file and checks its sha256
    return model.to(device, dtypes[precision]).eval(), state


def stream_text(model: GPTModel, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, seed: int) -> Iterator[str]:
    """The continuation of `prompt` (not the prompt itself), piece by piece as tokens come.

    Tokens are decoded incrementally: a character whose UTF-8 bytes span two tokens comes
    out whole with the second (an invalid sequence becomes U+FFFD, as `enc.decode` does).
    Generation ends at `<|endoftext|>` (not part of the text) or after `max_new_tokens`.
    An empty prompt starts a new document. Settings as in `GENERATION_DEFAULTS`; a bad one
    raises ValueError at the first `next()`.
    """
    ids = get_tokenizer().encode_ordinary(prompt) or [EOT_ID]
    return stream_continuation(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed)


def stream_continuation(model: GPTModel, ids: list[int], *, max_new_tokens: int, temperature: float, top_k: int,
                        top_p: float, seed: int) -> Iterator[str]:
    """`stream_text` for a prompt given as token ids (a chat builds its context from them)."""
    enc = get_tokenizer()
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)  # (1, seq)
    tokens = stream_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                           top_p=None if top_p == 1.0 else top_p,
                           generator=torch.Generator(device=device).manual_seed(seed))
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if token == EOT_ID:
            break
        if piece := utf8.decode(enc.decode_single_token_bytes(token)):
            yield piece
    if tail := utf8.decode(b"", final=True):
        yield tail
