"""Muon: the orthogonalisation, which parameters it takes, and AdamW for the rest unchanged."""

import pytest
import torch

from minigpt.config import TrainConfig
from minigpt.optim import Muon, orthogonalize
from minigpt.train import build_optimizer
from train_helpers import tiny_model


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 16, 16)])
def test_orthogonalize_gives_singular_values_near_one_along_the_gradients_directions(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-3, 0, shape[-1])  # badly conditioned, like a gradient
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    sv = torch.linalg.svdvals(out)  # descending
    # The quintic iteration maps singular values into a band around 1 (not exactly 1); the
    # smallest, under ~1e-3 of the largest, stay small after 5 steps.
    assert sv.max() < 1.3 and sv.median() > 0.6
    assert (torch.linalg.svdvals(g)[..., 0] / torch.linalg.svdvals(g).median(-1).values > 4).all()  # the input was not
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    exact = u @ vh  # the nearest semi-orthogonal matrix
    cosine = (out * exact).sum(dim=(-2, -1)) / (out.norm(dim=(-2, -1)) * exact.norm(dim=(-2, -1)))
    assert (cosine > 0.9).all()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3, min_lr=0, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)]: g["split"] for g in opt.param_groups if g["muon"] for p in g["params"]}
    adamw = [names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    n_layers = model.cfg.n_layers
    assert muon == {**{f"blocks.{i}.attn.qkv.weight": 3 for i in range(n_layers)},
                    **{f"blocks.{i}.{m}.weight": 1 for i in range(n_layers)
                       for m in ("attn.out_proj", "ff.fc", "ff.proj")}}
    assert "tok_emb.weight" in adamw and "pos_emb.weight" in adamw and "final_norm.weight" in adamw
    assert sorted([*muon, *adamw]) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert {g["lr_scale"] for g in opt.param_groups} == {0.02 / 3e-3}


def test_muon_groups_without_muon_are_exactly_adamw():
    """The AdamW half is PyTorch's own kernel on the same state: bit-identical steps."""
    model_a, model_b = tiny_model(seed=1), tiny_model(seed=1)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() == 2], "weight_decay": 0.1},
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups(model_a), lr=1e-2, betas=(0.9, 0.95), fused=True)
    opt = Muon(groups(model_b), lr=1e-2, betas=(0.9, 0.95), lr_scale=5.0, fused=True)
    x = torch.randint(0, model_a.cfg.vocab_size, (2, 8))
    for _ in range(3):
        for model, o in ((model_a, ref), (model_b, opt)):
            o.zero_grad()
            model(x, x).backward()
            o.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_a_muon_step_moves_each_qkv_third_by_an_orthogonal_matrix():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3 * 16, 16))
    opt = Muon([{"params": [weight], "muon": True, "split": 3}], lr=0.1, betas=(0.9, 0.95),
               lr_scale=1.0, momentum=0.0)
    before = weight.detach().clone()
    weight.grad = torch.randn(3 * 16, 16) * torch.tensor([1.0, 1e-3, 10.0]).repeat_interleave(16)[:, None]
    opt.step()
    step = (before - weight.detach()).view(3, 16, 16) / 0.1
    # Gradients 1e4 apart in scale, yet every third moved as much as the others.
    sv = torch.linalg.svdvals(step)  # (3, 16)
    assert sv.max() < 1.3 and (sv.median(-1).values > 0.6).all()
    norms = step.norm(dim=(1, 2))
    assert norms.max() / norms.min() < 1.3


def test_step_with_a_closure_returns_its_loss_like_any_torch_optimizer():
    weight = torch.nn.Parameter(torch.ones(4, 4))
    opt = Muon([{"params": [weight], "muon": True}], lr=0.1, betas=(0.9, 0.95), lr_scale=1.0)

    def closure():
        opt.zero_grad()
        loss = (weight * torch.arange(16.0).view(4, 4)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 120.0
    assert not torch.equal(weight.detach(), torch.ones(4, 4))


def test_matrices_batched_by_shape_move_as_if_each_were_alone():
    """Newton-Schulz runs on a stack of same-shaped matrices: each must still be normalised and
    orthogonalised on its own (gradients 1e5 apart in scale, one matrix of another shape)."""
    torch.manual_seed(0)
    shapes, scales = [(16, 16), (16, 16), (32, 16), (16, 16)], [1.0, 1e-3, 10.0, 1e2]
    grads = [torch.randn(shape) * scale for shape, scale in zip(shapes, scales)]

    def muon_step(params, grads_):
        opt = Muon([{"params": params, "muon": True}], lr=0.1, betas=(0.9, 0.95), lr_scale=1.0, momentum=0.0)
        for p, g in zip(params, grads_):
            p.grad = g.clone()
        opt.step()

    together = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    muon_step(together, grads)
    for p, g in zip(together, grads):
        alone = torch.nn.Parameter(torch.zeros(g.shape))
        muon_step([alone], [g])
        torch.testing.assert_close(p.detach(), alone.detach(), rtol=0, atol=1e-3)  # steps are ~0.025
