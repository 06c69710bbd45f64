"""Which parameters a finetune updates: the head, the head and the last block, or all.

Freezing is `requires_grad=False`: a frozen parameter gets no gradient, the trainer's
optimizer leaves it out (`minigpt.train.param_groups`) and it stays bit-identical.
"""

from __future__ import annotations

from typing import Literal

from minigpt.model import GPTModel
from minigpt.tasks.classification import SequenceClassifier

Trainable = Literal["head", "last_block", "all"]


def set_trainable(model: SequenceClassifier | GPTModel, which: Trainable) -> int:
    """Freeze everything, then unfreeze `which`; returns the number of trainable parameters.

    head        the output head: a classifier's new `head`; for a `GPTModel` its vocabulary
                head, which with tied weights *is* the token embedding, so "head" also
                trains the input embeddings (one tensor in both roles)
    last_block  the head, the last transformer block and the final LayerNorm (the book's choice)
    all         everything the model computes with (a classifier leaves out an untied
                vocabulary head it never uses)
    """
    if isinstance(model, SequenceClassifier):
        backbone, head = model.backbone, model.head
    else:
        backbone, head = model, model.out_head
    parts = {
        "head": [head],
        "last_block": [head, backbone.blocks[-1], backbone.final_norm],
        "all": [head, backbone.tok_emb, backbone.pos_emb, backbone.blocks, backbone.final_norm],
    }
    if which not in parts:
        raise ValueError(f"trainable must be one of {sorted(parts)}, got {which!r}")
    model.requires_grad_(False)
    for part in parts[which]:
        part.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
