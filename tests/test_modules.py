"""Shapes from the design notes: every block maps (batch, max_length, emb_dim) to itself."""

import pytest
import torch

from minigpt.modules import FeedForward, GELU, LayerNorm, TransformerBlock

BATCH, MAX_LENGTH, EMB_DIM, N_HEADS = 2, 6, 32, 4

@pytest.fixture
def x():
    return torch.randn(BATCH, MAX_LENGTH, EMB_DIM)


def test_layer_norm_normalises(x):
    ln = LayerNorm(EMB_DIM)
    out = ln(x * 5 + 3)
    assert out.shape == (BATCH, MAX_LENGTH, EMB_DIM)
    torch.testing.assert_close(out.mean(-1), torch.zeros(BATCH, MAX_LENGTH), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(BATCH, MAX_LENGTH), atol=1e-3, rtol=0)


def test_gelu_is_gpt2_tanh_approximation():
    x = torch.linspace(-4, 4, 101)
    expected = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU()(x), expected)


def test_feed_forward_shape_and_width(x):
    ff = FeedForward(EMB_DIM)
    assert ff(x).shape == (BATCH, MAX_LENGTH, EMB_DIM)
    assert ff.fc.out_features == 4 * EMB_DIM


def test_transformer_block_shape_and_causality(x):
    block = TransformerBlock(EMB_DIM, N_HEADS, dropout=0.1, qkv_bias=False).eval()
    out = block(x)
    assert out.shape == (BATCH, MAX_LENGTH, EMB_DIM)
    changed = x.clone()
    changed[:, -1] += 1.0
    torch.testing.assert_close(block(changed)[:, :-1], out[:, :-1], rtol=0, atol=0)


def test_dropout_active_only_in_training(x):
    block = TransformerBlock(EMB_DIM, N_HEADS, dropout=0.5, qkv_bias=False)
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))
