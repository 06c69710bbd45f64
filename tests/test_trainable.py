"""Freezing: after one real optimizer step exactly the trainable parameters have moved."""

from __future__ import annotations

import pytest
import torch

from minigpt.tasks.classification import ClassificationLoss, SequenceClassifier, collate_classification
from minigpt.tasks.instruction import collate_instructions
from minigpt.tasks.trainable import set_trainable
from minigpt.tokenizer import EOT_ID, N_VOCAB
from minigpt.train import LanguageModelLoss, train_step
from train_helpers import tiny_model

# tiny_model has 2 blocks: blocks.1 is the last. Names as `named_parameters` gives them: a tied
# vocabulary head is the token embedding, listed once as `tok_emb.weight`.
LAST_BLOCK = {f"blocks.1.{name}" for name in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.out_proj.weight", "attn.out_proj.bias",
    "norm2.weight", "norm2.bias", "ff.fc.weight", "ff.fc.bias", "ff.proj.weight", "ff.proj.bias")}
FINAL_NORM = {"final_norm.weight", "final_norm.bias"}


def _backbone(**overrides) -> torch.nn.Module:
    return tiny_model(vocab_size=N_VOCAB, dropout=0.1, **overrides)


def _classifier_case(**overrides):
    rows = [{"ids": [5, 6, 7, 8], "label_id": 1}, {"ids": [9, 10], "label_id": 0}]
    return SequenceClassifier(_backbone(**overrides), 2), collate_classification(rows), ClassificationLoss()


def _instruction_case(**overrides):
    rows = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, EOT_ID]}, {"prompt_ids": [7], "response_ids": [EOT_ID]}]
    return _backbone(**overrides), collate_instructions(rows, mask_prompt=False), LanguageModelLoss()


def _moved_after_one_step(model, batch, loss_fn) -> set[str]:
    """Names of the parameters one AdamW step through `train_step` changed (any bit)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, optimizer, iter([batch]), loss_fn, lr=1e-2, accum_steps=1, precision="fp32",
               grad_clip=1.0, device=torch.device("cpu"))
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


def _prefixed(prefix: str, names: set[str]) -> set[str]:
    return {prefix + name for name in names}


@pytest.mark.parametrize("which", ["head", "last_block", "all"])
def test_classifier_moves_exactly_its_trainable_parameters(which):
    model, batch, loss_fn = _classifier_case()
    head = {"head.weight", "head.bias"}
    expected = {
        "head": head,
        "last_block": head | _prefixed("backbone.", LAST_BLOCK | FINAL_NORM),
        "all": {name for name, _ in model.named_parameters()},
    }[which]
    n_trainable = set_trainable(model, which)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert n_trainable == sum(p.numel() for name, p in model.named_parameters() if name in expected)
    assert _moved_after_one_step(model, batch, loss_fn) == expected


@pytest.mark.parametrize("which", ["head", "last_block", "all"])
def test_language_model_moves_exactly_its_trainable_parameters(which):
    model, batch, loss_fn = _instruction_case()
    expected = {
        "head": {"tok_emb.weight"},  # the tied vocabulary head: training it trains the embedding
        "last_block": {"tok_emb.weight"} | LAST_BLOCK | FINAL_NORM,
        "all": {name for name, _ in model.named_parameters()},
    }[which]
    set_trainable(model, which)
    assert _moved_after_one_step(model, batch, loss_fn) == expected


def test_untied_heads():
    model, batch, loss_fn = _instruction_case(tie_weights=False)
    set_trainable(model, "head")
    assert _moved_after_one_step(model, batch, loss_fn) == {"out_head.weight"}
    # A classifier never uses an untied vocabulary head: even "all" leaves it frozen.
    classifier, batch, loss_fn = _classifier_case(tie_weights=False)
    assert set_trainable(classifier, "all") == classifier.num_parameters()
    everything = {name for name, _ in classifier.named_parameters()}
    assert _moved_after_one_step(classifier, batch, loss_fn) == everything - {"backbone.out_head.weight"}


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="trainable must be one of"):
        set_trainable(_backbone(), "everything")
