"""Causal multi-head attention (design notes: (batch, max_length, emb_dim) in and out) and its KV cache."""

import pytest
import torch

from minigpt.modules import KVCache, MultiHeadAttention

BATCH, MAX_LENGTH, EMB_DIM, N_HEADS, CONTEXT = 2, 6, 32, 4, 8

@pytest.fixture
def x():
    return torch.randn(BATCH, MAX_LENGTH, EMB_DIM)


def test_attention_shape(x):
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, 0.0, N_HEADS, qkv_bias=True)
    assert mha(x).shape == (BATCH, MAX_LENGTH, EMB_DIM)


def test_attention_projects_to_d_out(x):
    mha = MultiHeadAttention(EMB_DIM, 16, 0.0, N_HEADS)
    assert mha(x).shape == (BATCH, MAX_LENGTH, 16)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(EMB_DIM, 30, 0.0, 4)


def test_attention_is_causal(x):
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, 0.0, N_HEADS).eval()
    before = mha(x)
    changed = x.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])  # alter the future of position 2
    after = mha(changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=0, atol=0)
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_attention_matches_explicit_softmax(x):
    """SDPA's output equals the textbook masked softmax(QK^T/sqrt(d))V."""
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, 0.0, N_HEADS).eval()
    q, k, v = mha.qkv(x).view(BATCH, MAX_LENGTH, 3, N_HEADS, EMB_DIM // N_HEADS).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / (EMB_DIM // N_HEADS) ** 0.5  # (batch, heads, seq, seq)
    mask = torch.triu(torch.ones(MAX_LENGTH, MAX_LENGTH, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    expected = mha.out_proj((weights @ v).transpose(1, 2).reshape(BATCH, MAX_LENGTH, EMB_DIM))
    torch.testing.assert_close(mha(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_with_cache_equals_full_pass(x):
    """Prefill 2 tokens, then 3 at once (explicit mask), then 1: same as one full pass."""
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, 0.0, N_HEADS).eval()
    cache = KVCache(BATCH, N_HEADS, CONTEXT, EMB_DIM // N_HEADS, x.device, x.dtype)
    pieces = [mha(x[:, :2], cache), mha(x[:, 2:5], cache), mha(x[:, 5:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), mha(x), rtol=1e-5, atol=1e-6)
    assert cache.length == MAX_LENGTH


def test_cache_overflow_is_an_error():
    cache = KVCache(1, 1, 2, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_matches_the_sdpa_kernel(dtype):
    """On CPU the training/prefill path is written out (faster there); values and gradients
    must be those of PyTorch's fused causal kernel."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(BATCH, N_HEADS, MAX_LENGTH, EMB_DIM // N_HEADS, dtype=dtype, requires_grad=True)
               for _ in range(3))
    mha = MultiHeadAttention(EMB_DIM, EMB_DIM, 0.0, N_HEADS)
    ours = mha._causal_attention_cpu(q, k, v)
    ours_grads = torch.autograd.grad(ours.float().square().sum(), (q, k, v))
    kernel = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    kernel_grads = torch.autograd.grad(kernel.float().square().sum(), (q, k, v))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, kernel, **tol)
    for a, b in zip(ours_grads, kernel_grads):
        torch.testing.assert_close(a, b, **tol)
