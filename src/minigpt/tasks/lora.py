"""LoRA: finetune a frozen model through low-rank adapters, then fold them back in.

Each targeted linear layer keeps its weight W (out, in) frozen and learns an update of rank r:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A (r, in), B (out, r)

B starts at zero, so the adapted model starts as the base model; A starts as nn.Linear's
own init (Kaiming-uniform), as in the LoRA paper and Hugging Face's peft. Only A, B and the
task's new head train: 0.9% of gpt2-tiny's weights at rank 8, and checkpoints to match (the base
is named by its sha256, not copied). `merge_lora` folds each update into its layer,
W' = W + (alpha / r) B A, leaving a plain model for evaluation, generation and export.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from minigpt.checkpoint import CheckpointError, load_checkpoint
from minigpt.config import LoraConfig
from minigpt.io import sha256_file
from minigpt.model import GPTModel
from minigpt.modules import TransformerBlock
from minigpt.tasks.classification import SequenceClassifier

#: What a checkpoint of an adapted model holds: only the tensors that train.
TRAINABLE_ONLY = "checkpoint_trainable_only"


def _targets(block: TransformerBlock) -> dict[str, tuple[nn.Module, str]]:
    """Each target name: the module holding the layer, and the layer's attribute name."""
    return {"qkv": (block.attn, "qkv"), "attn_out": (block.attn, "out_proj"),
            "ff_in": (block.ff, "fc"), "ff_out": (block.ff, "proj")}


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update of its output."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()  # (batch, seq, in) -> (batch, seq, out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """The plain layer with the update folded into its weight."""
        layer = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                          device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.scaling * (self.lora_b @ self.lora_a))  # (out, in)
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


def _backbone(model: GPTModel | SequenceClassifier) -> GPTModel:
    return model.backbone if isinstance(model, SequenceClassifier) else model


def add_lora(model: GPTModel | SequenceClassifier, cfg: LoraConfig) -> int:
    """Freeze `model`, put adapters on `cfg.targets` of every block, and let a classifier's
    new head train; returns the number of trainable parameters. From now on the model's
    checkpoints hold only those (`checkpoint.model_tensors`)."""
    model.requires_grad_(False)
    for block in _backbone(model).blocks:
        for target in cfg.targets:
            parent, name = _targets(block)[target]
            layer = getattr(parent, name)
            if cfg.rank > min(layer.in_features, layer.out_features):
                raise ValueError(f"finetune.lora.rank: {cfg.rank} is larger than the {target} layer "
                                 f"({layer.out_features} x {layer.in_features}) it adapts")
            setattr(parent, name, LoRALinear(layer, cfg.rank, cfg.alpha, cfg.dropout))
    if isinstance(model, SequenceClassifier):
        model.head.requires_grad_(True)  # new, task-specific: it has nothing to adapt from
    setattr(model, TRAINABLE_ONLY, True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: GPTModel | SequenceClassifier) -> GPTModel | SequenceClassifier:
    """Fold every adapter into its layer, in place: a plain model, as if trained in full."""
    for block in _backbone(model).blocks:
        for parent, name in _targets(block).values():
            layer = getattr(parent, name)
            if isinstance(layer, LoRALinear):
                setattr(parent, name, layer.merged())
    if hasattr(model, TRAINABLE_ONLY):
        delattr(model, TRAINABLE_ONLY)
    return model


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint file holds LoRA adapters rather than a whole model (its tensors say:
    the plain model a LoRA run logs carries the same run config, folded in)."""
    with safe_open(str(path), "pt") as f:
        return any(key.endswith(".lora_a") for key in f.keys())


def load_merged(path: str | Path, model: GPTModel | SequenceClassifier, state: dict[str, Any]) -> nn.Module:
    """The plain model of a LoRA checkpoint: `model` (the task's architecture, fresh) gets the
    base the adapters were trained on, which the checkpoint names by path and sha256 (a base
    that changed since is refused: the adapters would be applied to other weights), then the
    adapters and head, folded in."""
    info = state["run_info"]
    base, expected = Path(info["init_path"]), info["init_sha256"]
    if not base.is_file():
        raise CheckpointError(f"checkpoint {path}: holds LoRA adapters for the base {base}, which is not here "
                              f"(run from the directory the finetune ran in, or restore that file)")
    if (actual := sha256_file(base)) != expected:
        raise CheckpointError(f"checkpoint {path}: its adapters belong to a base with sha256 {expected[:12]}…, "
                              f"but {base} now has {actual[:12]}… (the base was retrained since)")
    backbone = _backbone(model)
    if base.name in ("model.safetensors", "pytorch_model.bin") and (base.parent / "config.json").is_file():
        backbone.load_state_dict(GPTModel.from_hf_gpt2(base).state_dict())  # Hugging Face GPT-2 weights
    else:
        load_checkpoint(base, backbone)
    add_lora(model, LoraConfig(**info["config"]["finetune"]["lora"]))
    load_checkpoint(path, model)
    return merge_lora(model)
