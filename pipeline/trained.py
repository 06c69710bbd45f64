"""Loading trained models: the pretrained one (for evaluate, sample and finetuning) and the
weights a finetune starts from (`finetune.init`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minigpt.checkpoint import load_checkpoint
from minigpt.config import FinetuneConfig, ModelConfig
from minigpt.io import sha256_file
from minigpt.model import GPTModel
from minigpt.tokenizer import N_VOCAB
from pipeline import paths
from pipeline.common import StageError


def best_checkpoint(checkpoints: Path = paths.CHECKPOINTS) -> Path:
    """`best.safetensors`, else `last.safetensors` (a run that never improved on itself)."""
    best = checkpoints / "best.safetensors"
    return best if best.exists() else checkpoints / "last.safetensors"


def load_trained_model(model_cfg: ModelConfig, device: torch.device) -> tuple[GPTModel, str, dict[str, Any]]:
    """The model of `checkpoints/best` (else `last`) on its device: (model, path, saved state)."""
    checkpoint = str(best_checkpoint())
    model = GPTModel(model_cfg)
    state = load_checkpoint(checkpoint, model)
    return model.to(device).eval(), checkpoint, state


def init_context_length(finetune: FinetuneConfig, model_cfg: ModelConfig) -> int:
    """The context length of the model a finetune starts from (read without loading weights)."""
    if finetune.init == "pretrain":
        return model_cfg.context_length
    config = _init_dir(finetune) / "config.json"
    try:
        hf = json.loads(config.read_text())
        return int(hf.get("n_positions") or hf["n_ctx"])
    except (OSError, ValueError, KeyError) as err:
        raise StageError(f"finetune.init: {config}: no GPT-2 config with n_positions ({err!r})") from None


def load_init_model(finetune: FinetuneConfig, model_cfg: ModelConfig) -> tuple[GPTModel, str, str]:
    """The model a finetune starts from: (model, where its weights came from, their sha256)."""
    if finetune.init == "pretrain":
        checkpoint = best_checkpoint()
        model = GPTModel(model_cfg)
        load_checkpoint(checkpoint, model)  # a missing, corrupted or other-shaped one: CheckpointError
        return model, str(checkpoint), sha256_file(checkpoint)
    folder = _init_dir(finetune)
    try:
        model = GPTModel.from_hf_gpt2(folder)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise StageError(f"finetune.init: {folder}: not loadable as Hugging Face GPT-2 weights ({err})") from None
    if model.cfg.vocab_size != N_VOCAB:
        raise StageError(f"finetune.init: {folder}: vocab_size {model.cfg.vocab_size}, but the GPT-2 tokenizer "
                         f"has {N_VOCAB} tokens")
    weights = next(p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file())
    return model, str(weights), sha256_file(weights)


def _init_dir(finetune: FinetuneConfig) -> Path:
    folder = Path(finetune.init)
    if not folder.is_dir():
        raise StageError(f"finetune.init: {folder} is not a directory of Hugging Face GPT-2 weights "
                         f"(config.json + model.safetensors); use `pretrain` for this pipeline's model")
    return folder
