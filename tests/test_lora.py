"""LoRA (`minigpt.tasks.lora`): adapters start as the identity, train alone while the backbone
stays bit-identical, fold back into a plain model with the same logits, checkpoint only what
trains, load back onto the base they name (and no other), and compute what Hugging Face's
peft computes on the same weights and inputs. Exact resume is in test_finetune_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from minigpt.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from minigpt.config import FinetuneConfig, LoraConfig, TrainConfig, format_validation_error
from minigpt.tasks.classification import SequenceClassifier
from minigpt.tasks.lora import LoRALinear, add_lora, is_lora_checkpoint, load_merged, merge_lora
from train_helpers import tiny_model

LORA = LoraConfig(rank=4, alpha=8.0)
IDS = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
LENGTHS = torch.tensor([12, 9, 5])


def nudged(model: torch.nn.Module) -> torch.nn.Module:
    """Adapters as after some training: B away from its zero init, so they change the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.2)
    return model


def classifier(seed: int = 0) -> SequenceClassifier:
    return SequenceClassifier(tiny_model(seed), 3, "mean")


def test_adapters_start_as_the_identity_and_only_adapters_and_head_train():
    model = classifier()
    base = model(IDS, LENGTHS)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = add_lora(model, LORA)
    torch.testing.assert_close(model(IDS, LENGTHS), base, rtol=0, atol=0)  # B = 0: the base model exactly
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if n.endswith(("lora_a", "lora_b")) or n.startswith("head.")}
    assert sum(n.endswith("lora_a") for n in names) == 2 * 4  # 2 blocks x 4 targets
    # emb 32, rank 4: per block qkv 4*(32+96) + attn_out 4*(32+32) + ff_in 4*(32+128) + ff_out 4*(128+32); head 32*3+3
    assert trainable == 2 * 4 * (128 + 64 + 160 + 160) + 99
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(IDS, LENGTHS), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    after = {k.replace(".base.", "."): v for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the backbone did not move
    assert not torch.equal(model(IDS, LENGTHS), base)


@pytest.mark.parametrize("kind", ["classifier", "language model"])
def test_merged_model_gives_the_adapted_logits(kind):
    model = classifier() if kind == "classifier" else tiny_model()
    add_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["qkv", "ff_out"]))
    nudged(model).eval()
    inputs = (IDS, LENGTHS) if kind == "classifier" else (IDS,)
    adapted = model(*inputs)
    plain = merge_lora(copy.deepcopy(model))
    assert type(plain) is type(model)  # a classifier stays one
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert not hasattr(plain, "checkpoint_trainable_only")
    torch.testing.assert_close(plain(*inputs), adapted, rtol=0, atol=1e-5)


def lora_state(base_path, sha: str) -> dict:
    finetune = {"method": "lora", "lora": LORA.model_dump()}
    return {"step": 5, "run_info": {"config": {"finetune": finetune}, "init_path": str(base_path),
                                    "init_sha256": sha}}


def test_a_checkpoint_holds_the_adapters_and_head_only_and_loads_onto_its_base(tmp_path):
    from minigpt.io import sha256_file

    base_path = tmp_path / "base.safetensors"
    save_checkpoint(base_path, tiny_model(), None, {"step": 100})
    model = classifier()
    load_from = tiny_model()  # the same weights as the base file
    model.backbone.load_state_dict(load_from.state_dict())
    add_lora(model, LORA)
    nudged(model).eval()
    state = lora_state(base_path, sha256_file(base_path))
    adapter = tmp_path / "adapter.safetensors"
    save_checkpoint(adapter, model, None, state)
    tensors, _ = read_checkpoint(adapter)
    weights = sorted(k.removeprefix("model.") for k in tensors if k.startswith("model."))
    assert weights == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert adapter.stat().st_size < base_path.stat().st_size / 4

    loaded = load_merged(adapter, classifier(seed=7), state)  # other initial weights: all come from the files
    assert is_lora_checkpoint(adapter) and not is_lora_checkpoint(base_path)
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    torch.testing.assert_close(loaded.eval()(IDS, LENGTHS), model(IDS, LENGTHS), rtol=0, atol=1e-5)

    save_checkpoint(base_path, tiny_model(seed=3), None, {"step": 200})  # the base retrained since
    with pytest.raises(CheckpointError, match="its adapters belong to a base with sha256 .* now has"):
        load_merged(adapter, classifier(), state)
    base_path.unlink()
    with pytest.raises(CheckpointError, match="holds LoRA adapters for the base .* which is not here"):
        load_merged(adapter, classifier(), state)


def finetune_config(**overrides) -> dict:
    cfg = {"task": "classification", "method": "lora", "trainable": "head",
           "data": {"source": {"kind": "file", "path": "x.csv"}, "classes": ["a", "b"]},
           "train": TrainConfig().model_dump()}
    return {**cfg, **overrides}


@pytest.mark.parametrize("overrides, message", [
    ({"lora": {"rank": 0}}, "finetune.lora.rank: Input should be greater than 0"),
    ({"lora": {"alpha": 0}}, "finetune.lora.alpha: Input should be greater than 0"),
    ({"lora": {"targets": ["qkv", "lm_head"]}}, "finetune.lora.targets.1: Input should be 'qkv', 'attn_out'"),
    ({"lora": {"targets": []}}, "finetune.lora.targets: List should have at least 1 item"),
    ({"lora": {"targets": ["qkv", "qkv"]}}, "finetune.lora.targets: ['qkv', 'qkv'] names a layer twice"),
    ({"trainable": "all"}, "finetune.trainable: all contradicts method=lora"),
    ({"method": "adapters"}, "finetune.method: Input should be 'full' or 'lora'"),
])
def test_bad_lora_settings_name_their_key(overrides, message):
    with pytest.raises(ValidationError) as err:
        FinetuneConfig(**finetune_config(**overrides))
    assert message in format_validation_error(err.value, "finetune")


def test_a_rank_larger_than_a_layer_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"finetune.lora.rank: 33 is larger than the attn_out layer \(32 x 32\)"):
        add_lora(classifier(), LoraConfig(rank=33, targets=["attn_out"]))


def test_the_same_as_peft_on_the_same_weights_and_inputs():
    """peft's LoRA on transformers' GPT-2 (our export) with our A and B copied in: the same logits."""
    peft = pytest.importorskip("peft", reason="peft is a dev dependency: `make setup`")
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_model(qkv_bias=True, tie_weights=False)
    cfg = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                                    n_layer=cfg.n_layers, n_head=cfg.n_heads, activation_function="gelu_new",
                                    tie_word_embeddings=False, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    hf.load_state_dict(model.to_hf_gpt2_state_dict())
    add_lora(model, LORA)
    nudged(model).eval()
    # c_proj is both attention's output and the feed-forward's second layer in GPT-2's names.
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                         target_modules=["c_attn", "c_proj", "c_fc"],
                                                         fan_in_fan_out=True)).eval()
    ours = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "mlp.c_fc": "ff.fc", "mlp.c_proj": "ff.proj"}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for hf_name, name in ours.items():
                layer = block.get_submodule(name)
                target = peft_model.base_model.model.transformer.h[i].get_submodule(hf_name)
                target.lora_A["default"].weight.copy_(layer.lora_a)  # (rank, in) in both
                target.lora_B["default"].weight.copy_(layer.lora_b)  # (out, rank) in both
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS), rtol=0, atol=1e-5)
