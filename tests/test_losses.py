"""The fused chunked head + cross-entropy equals F.cross_entropy on full logits: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import ModelConfig
from minigpt.losses import linear_cross_entropy
from minigpt.model import GPTModel


def _inputs(tokens_shape=(3, 13), emb=24, vocab=101, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*tokens_shape, emb, generator=gen, dtype=dtype).requires_grad_()  # (batch, seq, emb)
    weight = (0.3 * torch.randn(vocab, emb, generator=gen, dtype=dtype)).requires_grad_()  # (vocab, emb)
    targets = torch.randint(0, vocab, tokens_shape, generator=gen)  # (batch, seq)
    return hidden, weight, targets


def _reference(hidden, weight, targets, **kw):
    """Plain full-logits loss and its gradients."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = F.cross_entropy((h @ w.t()).float().flatten(0, 1), targets.flatten(), **kw)  # logits (tokens, vocab)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _fused(hidden, weight, targets, chunk_size):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_size)
    loss.backward()
    return loss.detach(), h.grad, w.grad


# 39 tokens: chunks that divide it, that leave a remainder, of one row, and larger than everything.
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 39, 1000])
def test_fused_loss_and_grads_equal_full_logits_fp32(chunk_size):
    hidden, weight, targets = _inputs()
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    loss, gh, gw = _fused(hidden, weight, targets, chunk_size)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)


def test_backward_scales_with_the_upstream_gradient():
    """Gradients are computed in forward; backward must still multiply by d(out)/d(loss)."""
    hidden, weight, targets = _inputs()
    _, gh, gw = _fused(hidden, weight, targets, 8)
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (-2.5 * linear_cross_entropy(h, w, targets, 8)).backward()
    torch.testing.assert_close(h.grad, -2.5 * gh)
    torch.testing.assert_close(w.grad, -2.5 * gw)


def test_ignored_targets_are_skipped_like_f_cross_entropy():
    """-100 targets (e.g. masked prompt tokens in fine-tuning) count in neither the sum nor the mean."""
    hidden, weight, targets = _inputs()
    targets[0, :5] = -100
    targets[2, 7] = -100
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    loss, gh, gw = _fused(hidden, weight, targets, 6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(gh[0, :5]) == 0  # an ignored position gets no gradient


def test_without_grad_the_plain_path_gives_the_same_value():
    hidden, weight, targets = _inputs()
    ref_loss, _, _ = _reference(hidden, weight, targets)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_matches_fp32_loosely_and_plain_bf16_closely():
    hidden, weight, targets = _inputs(tokens_shape=(4, 32), emb=64, vocab=300)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _reference(hidden, weight, targets)
        fused = _fused(hidden, weight, targets, 48)
    for got in (plain, fused):
        assert got[0].dtype == torch.float32  # the loss is reduced in fp32 even under autocast
        assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # grads in the params' dtype
        torch.testing.assert_close(got[0], ref_loss, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[1], ref_gh, rtol=5e-2, atol=5e-3)
        torch.testing.assert_close(got[2], ref_gw, rtol=5e-2, atol=5e-3)
    # Both bf16 paths round the same matmul inputs, so they agree better than either does with fp32.
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_model_loss_and_every_param_grad_same_with_and_without_chunks(tie_weights):
    """Through GPTModel: a tied head gets the loss's gradient plus the embedding's, once each."""
    cfg = ModelConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, tie_weights=tie_weights)
    torch.manual_seed(0)
    plain = GPTModel(cfg)
    chunked = GPTModel(cfg)
    chunked.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))  # (batch, seq) each
    loss_plain, loss_chunked = plain(x, y), chunked(x, y, loss_chunk_size=10)
    loss_plain.backward()
    loss_chunked.backward()
    torch.testing.assert_close(loss_chunked, loss_plain, rtol=1e-6, atol=1e-6)
    grads_plain = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_weight_gradient_is_contiguous_like_the_weight():
    """The weight's gradient is summed transposed; the one autograd hands on must be laid out
    as the weight is (a transposed view made the tied embedding's sum and AdamW ~8% slower
    per gpt2-small step)."""
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, 7)
    grad_weight, = torch.autograd.grad(loss, [weight])
    assert grad_weight.is_contiguous() and grad_weight.shape == weight.shape
