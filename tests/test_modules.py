"""Shapes from the design notes: every block maps (batch, max_length, emb_dim) to itself."""

import pytest
import torch

from minigpt.modules import FeedForward, GELU, KVCache, LayerNorm, MultiHeadAttention, TransformerBlock

BATCH, MAX_LENGTH, EMB_DIM, N_HEADS, CONTEXT = 2, 6, 32, 4, 8


@pytest.fixture
def x():
    return torch.randn(BATCH, MAX_LENGTH, EMB_DIM)


def test_attention_shape(x):
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, CONTEXT, 0.0, N_HEADS, qkv_bias=True)
    assert mha(x).shape == (BATCH, MAX_LENGTH, EMB_DIM)


def test_attention_projects_to_d_out(x):
    mha = MultiHeadAttention(EMB_DIM, 16, CONTEXT, 0.0, N_HEADS)
    assert mha(x).shape == (BATCH, MAX_LENGTH, 16)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(EMB_DIM, 30, CONTEXT, 0.0, 4)


def test_attention_is_causal(x):
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, CONTEXT, 0.0, N_HEADS).eval()
    before = mha(x)
    changed = x.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])  # alter the future of position 2
    after = mha(changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=0, atol=0)
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_attention_matches_explicit_softmax(x):
    """SDPA's output equals the textbook masked softmax(QK^T/sqrt(d))V."""
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, CONTEXT, 0.0, N_HEADS).eval()
    q, k, v = mha.qkv(x).view(BATCH, MAX_LENGTH, 3, N_HEADS, EMB_DIM // N_HEADS).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / (EMB_DIM // N_HEADS) ** 0.5  # (batch, heads, seq, seq)
    mask = torch.triu(torch.ones(MAX_LENGTH, MAX_LENGTH, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    expected = mha.out_proj((weights @ v).transpose(1, 2).reshape(BATCH, MAX_LENGTH, EMB_DIM))
    torch.testing.assert_close(mha(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_with_cache_equals_full_pass(x):
    """Prefill 2 tokens, then 3 at once (explicit mask), then 1: same as one full pass."""
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, CONTEXT, 0.0, N_HEADS).eval()
    cache = KVCache(BATCH, N_HEADS, CONTEXT, EMB_DIM // N_HEADS, x.device, x.dtype)
    pieces = [mha(x[:, :2], cache), mha(x[:, 2:5], cache), mha(x[:, 5:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), mha(x), rtol=1e-5, atol=1e-6)
    assert cache.length == MAX_LENGTH


def test_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 2, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))


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
    block = TransformerBlock(EMB_DIM, N_HEADS, CONTEXT, dropout=0.1, qkv_bias=False).eval()
    out = block(x)
    assert out.shape == (BATCH, MAX_LENGTH, EMB_DIM)
    changed = x.clone()
    changed[:, -1] += 1.0
    torch.testing.assert_close(block(changed)[:, :-1], out[:, :-1], rtol=0, atol=0)


def test_dropout_active_only_in_training(x):
    block = TransformerBlock(EMB_DIM, N_HEADS, CONTEXT, dropout=0.5, qkv_bias=False)
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))
