"""Loading the trained model, for the stages after pretrain (evaluate, sample)."""

from __future__ import annotations

from typing import Any

import torch

from minigpt.checkpoint import load_checkpoint
from minigpt.config import ModelConfig
from minigpt.model import GPTModel
from pipeline import paths


def load_trained_model(model_cfg: ModelConfig, device: torch.device) -> tuple[GPTModel, str, dict[str, Any]]:
    """The model of `checkpoints/best` (else `last`) on its device: (model, path, saved state)."""
    best = paths.CHECKPOINTS / "best.safetensors"
    checkpoint = str(best if best.exists() else paths.CHECKPOINTS / "last.safetensors")
    model = GPTModel(model_cfg)
    state = load_checkpoint(checkpoint, model)
    return model.to(device).eval(), checkpoint, state
