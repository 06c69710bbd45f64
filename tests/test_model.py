import pytest
import torch
from pydantic import ValidationError

from minigpt.config import PRESETS, ModelConfig, check_length_fits, preset_config
from minigpt.model import GPTModel

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


def test_logits_shape():
    model = GPTModel(ModelConfig(**TINY))
    idx = torch.randint(0, 97, (3, 10))  # (batch, max_length)
    assert model(idx).shape == (3, 10, 97)  # (batch, max_length, vocab_size)


def test_embedding_and_head_shapes():
    model = GPTModel(ModelConfig(**TINY))
    assert model.tok_emb.weight.shape == (97, 32)  # vocab_size x emb_dim
    assert model.pos_emb.weight.shape == (16, 32)  # context_length x emb_dim
    assert model.out_head.weight.shape == (97, 32)


def test_too_long_input_is_a_clear_error():
    model = GPTModel(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds the model's context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_is_causal():
    model = GPTModel(ModelConfig(**TINY)).eval()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8], rtol=0, atol=0)


def test_gpt2_124m_has_exactly_124_439_808_parameters():
    model = GPTModel.from_preset("gpt2-124M")
    assert model.cfg.tie_weights and model.cfg.qkv_bias
    assert model.num_parameters() == 124_439_808


def test_untied_head_adds_one_embedding_matrix():
    tied = GPTModel(ModelConfig(**TINY, tie_weights=True))
    untied = GPTModel(ModelConfig(**TINY, tie_weights=False))
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32
    assert tied.out_head.weight is tied.tok_emb.weight


def test_gpt2_init_statistics():
    model = GPTModel(ModelConfig(vocab_size=5000, context_length=64, emb_dim=256, n_heads=4, n_layers=8))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].ff.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / (2 * 8) ** 0.5
    assert model.blocks[3].attn.out_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[3].ff.proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].ff.fc.bias) == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = preset_config(name)
    assert cfg.emb_dim % cfg.n_heads == 0


def test_real_gpt2_dimensions():
    assert (preset_config("gpt2-small").emb_dim, preset_config("gpt2-small").n_layers) == (384, 6)
    xl = preset_config("gpt2-xl")
    assert (xl.emb_dim, xl.n_layers, xl.n_heads, xl.context_length) == (1600, 48, 25, 1024)


def test_preset_overrides_and_unknown_name():
    assert GPTModel.from_preset("gpt2-tiny", n_layers=1).cfg.n_layers == 1
    with pytest.raises(ValueError, match="unknown name 'gpt2-huge'"):
        preset_config("gpt2-huge")


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(emb_dim=0), "emb_dim"),
        (dict(n_layers=-1), "n_layers"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(emb_dim=384, n_heads=5), "n_heads"),
        (dict(context_lenght=8), "context_lenght"),  # typo: unknown keys are refused
    ],
)
def test_invalid_model_configs_name_the_field(bad, field):
    with pytest.raises(ValidationError) as err:
        ModelConfig(**{**TINY, **bad})
    assert field in str(err.value)


def test_max_length_must_fit_context():
    check_length_fits(16, 16)
    with pytest.raises(ValueError, match=r"data.max_length: max_length \(17\) must be <= model.context_length \(16\)"):
        check_length_fits(17, 16)
