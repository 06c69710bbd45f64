"""The pretraining loop: schedule, parameter groups, accumulation, exact resume, guards, budgets.

Runs use the real pieces end to end: byte-level token shards of real English
(train_helpers.py), `minigpt.data` loaders (shuffled, resumable), `train()` and its
safetensors checkpoints; only the model is tiny.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minigpt.train as train_module
from minigpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from minigpt.config import ModelConfig, TrainConfig
from minigpt.model import GPTModel
from minigpt.train import TrainingDiverged, build_optimizer, lr_at, param_groups, stop_reason
from train_helpers import (
    MAX_LENGTH,
    TEXT,
    base_config,
    make_corpus,
    run_training,
    tiny_model,
    windows_tokens,
)

HELPER = Path(__file__).with_name("train_helpers.py")
TOKENS_PER_SEQUENCE = MAX_LENGTH
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """32 training windows (8 batches of 4 per epoch) and 16 validation windows."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), windows_tokens(32), windows_tokens(16))


def _losses(records: list[dict], kind: str = "train") -> list[tuple[int, float]]:
    key = "train_loss" if kind == "train" else "val_loss"
    return [(r["step"], r[key]) for r in records if r["kind"] == kind]


class Interrupted(Exception):
    """Raised from a callback: the process 'dies' mid-run."""


def _run_interrupted(corpus: Path, out: Path, dies_at_step: int, cfg: dict | None = None) -> list[dict]:
    """Run the resume config until the process 'dies' during `dies_at_step`; return the
    records of the steps its `last` checkpoint holds (all before `dies_at_step`)."""
    records: list[dict] = []

    def die(record: dict) -> None:
        # Train records come after the optimizer step and before that step's checkpoint,
        # so the last checkpoint on disk is from the step before.
        if record["kind"] == "train" and record["step"] == dies_at_step:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_training(corpus, out, cfg or RESUME_CFG, model_overrides=RESUME_MODEL, run_info=RUN_INFO,
                     callbacks=(records.append, die))
    return [r for r in records if r["step"] < dies_at_step]


# --------------------------------------------------------------------------- schedule
def test_lr_warmup_cosine_and_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # first step: lr / warmup_steps, never 0
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warmup's last step reaches the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # the cosine starts at the peak: no jump
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way: (lr + min_lr) / 2
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(10_000, cfg) == pytest.approx(1e-4)  # the floor holds past the end
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_decay_steps_and_no_warmup():
    cfg = TrainConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, max_steps=1000, lr_decay_steps=100)
    assert lr_at(0, cfg) == pytest.approx(2e-3)
    assert lr_at(50, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == 0.0
    assert lr_at(500, cfg) == 0.0


# --------------------------------------------------------------------------- parameter groups
def _names(model: GPTModel, params: list[torch.Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}  # a tied head is listed under tok_emb
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("tie_weights", [True, False])
def test_only_matmul_weights_decay(tie_weights):
    model = GPTModel(
        ModelConfig(
            vocab_size=64,
            context_length=8,
            emb_dim=16,
            n_heads=2,
            n_layers=2,
            qkv_bias=True,
            tie_weights=tie_weights,
        )
    )
    decay_group, no_decay_group = param_groups(model, weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    decay, no_decay = _names(model, decay_group["params"]), _names(model, no_decay_group["params"])

    matmuls = {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.out_proj", "ff.fc", "ff.proj")
    }
    assert decay == matmuls | (set() if tie_weights else {"out_head.weight"})
    assert {
        "tok_emb.weight",
        "pos_emb.weight",
        "final_norm.weight",
        "final_norm.bias",
        "blocks.0.attn.qkv.bias",
        "blocks.1.norm2.weight",
        "blocks.1.ff.proj.bias",
    } <= no_decay
    assert all(
        p.dim() == 1
        for p in no_decay_group["params"]
        if p is not model.tok_emb.weight and p is not model.pos_emb.weight
    )
    # Every parameter exactly once; a tied head is the embedding, so it is not counted twice.
    all_params = decay_group["params"] + no_decay_group["params"]
    assert len({id(p) for p in all_params}) == len(all_params) == len(list(model.parameters()))
    assert sum(p.numel() for p in all_params) == model.num_parameters()


def test_optimizer_settings_come_from_the_config():
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, min_lr=0, weight_decay=0.05, beta1=0.8, beta2=0.99)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.99) and g["lr"] == 1e-3 for g in opt.param_groups)
    assert opt.param_groups[0]["fused"]  # PyTorch's fused AdamW runs on CPU too


# --------------------------------------------------------------------------- accumulation
def _train_capturing_grads(corpus: Path, out: Path, micro: int, monkeypatch) -> tuple[list, list[dict]]:
    """Run 3 steps of global batch 8; return the (clipped) gradients each optimizer step applied."""
    grads: list[list[torch.Tensor]] = []

    def spying_build(model, cfg, device):
        opt = build_optimizer(model, cfg, device)  # the real one, imported before any patching
        opt.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in model.parameters()]))
        return opt

    monkeypatch.setattr(train_module, "build_optimizer", spying_build)
    cfg = base_config(micro_batch_size=micro, global_batch_size=8, max_steps=3, eval_interval=100)
    result = run_training(corpus, out, cfg)
    return grads, result.history


def test_accumulated_micro_batches_equal_one_big_batch(corpus, tmp_path, monkeypatch):
    """4 micro-batches of 2 and 1 batch of 8 see the same 8 windows (same seeded permutation)."""
    big_grads, big_records = _train_capturing_grads(corpus, tmp_path / "big", 8, monkeypatch)
    acc_grads, acc_records = _train_capturing_grads(corpus, tmp_path / "acc", 2, monkeypatch)
    assert len(big_grads) == len(acc_grads) == 3
    for step, (big, acc) in enumerate(zip(big_grads, acc_grads)):
        for g_big, g_acc in zip(big, acc):
            torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6, msg=f"step {step + 1}")
    for a, b in zip(*[[r for r in records if r["kind"] == "train"] for records in (big_records, acc_records)]):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"] == a["step"] * 8 * TOKENS_PER_SEQUENCE
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert big_grads[0][0].abs().sum() > 0  # the comparison is not between zeros


# --------------------------------------------------------------------------- exact resume
RESUME_CFG = base_config(
    micro_batch_size=2,
    global_batch_size=4,
    max_steps=12,
    eval_interval=3,
    checkpoint_interval=1,
    resume="auto",
)
RESUME_MODEL = dict(dropout=0.1)  # dropout draws from the RNG: resuming must restore it
RUN_INFO = {"data_sha256": "d" * 64, "tokenizer_sha256": "t" * 64}


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """12 steps (1.5 epochs of 8 steps) with no interruption: the reference."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_training(corpus, out, RESUME_CFG, model_overrides=RESUME_MODEL, run_info=RUN_INFO)
    assert result.stop_reason == "max_steps" and result.state.step == 12
    return out, result.history


def _assert_same_run(reference: tuple[Path, list[dict]], out: Path, records: list[dict]) -> None:
    ref_out, ref_records = reference
    assert _losses(records) == _losses(ref_records)  # exact float equality, every step
    assert _losses(records, "eval") == _losses(ref_records, "eval")
    (ref_tensors, ref_meta), (tensors, meta) = read_checkpoint(ref_out / "last.safetensors"), read_checkpoint(out / "last.safetensors")
    assert ref_tensors.keys() == tensors.keys()
    different = [k for k in tensors if not torch.equal(tensors[k], ref_tensors[k])]
    assert not different, f"not bit-identical after resume: {different[:5]}"  # weights, AdamW moments, RNG
    assert meta["rng"] == ref_meta["rng"] and meta["optimizer_param_groups"] == ref_meta["optimizer_param_groups"]
    state, ref_state = json.loads(meta["state"]), json.loads(ref_meta["state"])
    # step, tokens, best loss, loader position; and the history the checkpoint carries
    assert {**state, "train_time": 0, "history": []} == {**ref_state, "train_time": 0, "history": []}
    assert _losses(state["history"]) == _losses(ref_records) and len(state["history"]) == len(ref_records)


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_identical(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    records = _run_interrupted(corpus, out, dies_at_step=7)
    assert load_checkpoint(out / "last.safetensors", tiny_model(**RESUME_MODEL))["step"] == 6

    second = tmp_path / "second.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(HELPER),
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--cfg",
            json.dumps(RESUME_CFG),
            "--model",
            json.dumps(RESUME_MODEL),
            "--run-info",
            json.dumps(RUN_INFO),
            "--records",
            str(second),
        ],
        check=True,
        env=env,
        timeout=120,
    )
    continued = json.loads(second.read_text())
    assert continued["stop_reason"] == "max_steps" and continued["step"] == 12
    assert min(r["step"] for r in continued["records"]) == 7  # it continued, it did not start over
    _assert_same_run(uninterrupted, out, records + continued["records"])


# Mid-epoch, at the epoch's last batch (step 8 = 16 micro-batches of 2 = 32 windows), and in epoch 2.
@pytest.mark.parametrize("saved_step", [1, 5, 8, 10])
def test_resume_at_any_step_is_bit_identical(corpus, uninterrupted, tmp_path, saved_step):
    out = tmp_path / "run"
    records = _run_interrupted(corpus, out, dies_at_step=saved_step + 1)
    torch.manual_seed(999)  # whatever the process did before: the checkpoint decides
    new_records: list[dict] = []
    result = run_training(corpus, out, RESUME_CFG, model=tiny_model(seed=5, **RESUME_MODEL), run_info=RUN_INFO,
                          callbacks=(new_records.append,))
    _assert_same_run(uninterrupted, out, records + new_records)
    assert _losses(result.history) == _losses(uninterrupted[1])  # the result reports the whole run


def test_resume_with_muon_is_bit_identical(corpus, tmp_path):
    """Muon's momentum buffers and AdamW's moments both travel in the checkpoint."""
    cfg = {**RESUME_CFG, "optimizer": "muon"}
    reference = run_training(corpus, tmp_path / "ref", cfg, model_overrides=RESUME_MODEL, run_info=RUN_INFO)
    out = tmp_path / "run"
    records = _run_interrupted(corpus, out, dies_at_step=6, cfg=cfg)
    new_records: list[dict] = []
    run_training(corpus, out, cfg, model=tiny_model(seed=5, **RESUME_MODEL), run_info=RUN_INFO,
                 callbacks=(new_records.append,))
    _assert_same_run((tmp_path / "ref", reference.history), out, records + new_records)
    assert any(k.endswith("momentum_buffer") for k in read_checkpoint(out / "last.safetensors")[0])


@pytest.mark.parametrize("broken", ["rng", "loader"])
def test_resume_test_would_catch_a_missing_rng_or_loader_restore(
    corpus, uninterrupted, tmp_path, monkeypatch, broken
):
    """The check above is sensitive: drop either restore and the runs diverge."""
    out = tmp_path / "run"
    _run_interrupted(corpus, out, dies_at_step=6)
    if broken == "rng":
        real = train_module.load_checkpoint
        monkeypatch.setattr(
            train_module, "load_checkpoint", lambda *a, **k: real(*a, **{**k, "restore_rng": False})
        )
    else:
        from minigpt.data import ResumableDataLoader

        monkeypatch.setattr(ResumableDataLoader, "load_state_dict", lambda self, state: None)
    result = run_training(corpus, out, RESUME_CFG, model_overrides=RESUME_MODEL, run_info=RUN_INFO)
    resumed = [x for x in _losses(result.history) if x[0] > 5]
    assert resumed and resumed != [x for x in _losses(uninterrupted[1]) if x[0] > 5]


def test_resume_refuses_a_checkpoint_of_other_data(corpus, tmp_path):
    out = tmp_path / "run"
    run_training(corpus, out, base_config(max_steps=2), run_info=RUN_INFO)
    other = {**RUN_INFO, "data_sha256": "e" * 64}
    model = tiny_model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(42)
    with pytest.raises(CheckpointError, match="data_sha256=dddddddddddd.*this run has eeeeeeeeeeee"):
        run_training(corpus, out, base_config(max_steps=4, resume="auto"), model=model, run_info=other)
    # Refused before anything was loaded: the caller's model keeps its own weights.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="does not exist"):
        run_training(corpus, out, base_config(max_steps=4, resume=str(tmp_path / "nope.safetensors")))


def test_resume_after_the_end_does_nothing_and_a_larger_budget_continues(corpus, tmp_path):
    out = tmp_path / "run"
    first = run_training(corpus, out, base_config(max_steps=4, lr_decay_steps=8, eval_interval=4))
    before = (out / "last.safetensors").read_bytes()
    again = run_training(
        corpus, out, base_config(max_steps=4, lr_decay_steps=8, eval_interval=4, resume="auto")
    )
    assert again.state.step == 4 and _losses(again.history) == _losses(first.history)  # the whole run's curve
    assert (out / "last.safetensors").read_bytes() == before
    more = run_training(
        corpus, out, base_config(max_steps=8, lr_decay_steps=8, eval_interval=4, resume="auto")
    )
    assert [r["step"] for r in more.history if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_evaluating_does_not_change_the_training_run(corpus, tmp_path):
    """With dropout on, evaluating every step or never gives the same training losses and weights."""
    cfg = dict(max_steps=6, lr_decay_steps=6, checkpoint_interval=6)
    often = run_training(corpus, tmp_path / "often", base_config(eval_interval=1, **cfg), model_overrides=RESUME_MODEL)
    rarely = run_training(corpus, tmp_path / "rarely", base_config(eval_interval=100, **cfg), model_overrides=RESUME_MODEL)
    assert len(_losses(often.history, "eval")) == 6 and len(_losses(rarely.history, "eval")) == 1
    assert _losses(often.history) == _losses(rarely.history)
    a, b = read_checkpoint(often.last_checkpoint)[0], read_checkpoint(rarely.last_checkpoint)[0]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


# --------------------------------------------------------------------------- checkpoints from train()
def test_checkpoint_written_by_train_round_trips(corpus, tmp_path):
    model = tiny_model()
    result = run_training(corpus, tmp_path, base_config(max_steps=4), model=model, run_info=RUN_INFO)
    assert result.last_checkpoint == tmp_path / "last.safetensors" and result.best_checkpoint is not None
    assert model.out_head.weight is model.tok_emb.weight

    fresh = tiny_model(seed=1)
    assert not torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    state = load_checkpoint(result.last_checkpoint, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.out_head.weight is fresh.tok_emb.weight  # still one tensor after loading
    with torch.no_grad():
        fresh.tok_emb.weight[0, 0] += 1.0
    assert fresh.out_head.weight[0, 0] == fresh.tok_emb.weight[0, 0]
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 4 * TOKENS_PER_SEQUENCE
    assert state["train_loader"]["position"] == 4 and state["run_info"] == RUN_INFO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "last.safetensors"]


def test_records_carry_the_per_step_metrics(corpus, tmp_path):
    cfg = base_config(max_steps=4, eval_interval=2)
    result = run_training(corpus, tmp_path, cfg)
    train_records = [r for r in result.history if r["kind"] == "train"]
    eval_records = [r for r in result.history if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4] and [r["step"] for r in eval_records] == [2, 4]
    for r in train_records:
        assert r["tokens"] == r["step"] * 4 * TOKENS_PER_SEQUENCE
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, TrainConfig(**cfg)))
        assert 0 < r["train_loss"] < 7 and r["grad_norm"] > 0
        # Measured rates: present and positive, nothing more (a loaded machine may give any value).
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and math.isfinite(r["mfu"]) and r["mfu"] > 0
    for r in eval_records:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    assert eval_records[-1]["best_val_loss"] == min(r["val_loss"] for r in eval_records)
    assert train_records[0]["train_loss"] == pytest.approx(math.log(256), rel=0.05)  # uniform at init


# --------------------------------------------------------------------------- NaN guard
def test_huge_lr_stops_with_a_clear_error_and_no_bad_checkpoint(corpus, tmp_path):
    """lr=1e36 sends the weights to ~1e36 after one step: the next forward is NaN."""
    cfg = base_config(
        lr=1e36, min_lr=0, warmup_steps=0, grad_clip=None, eval_interval=1, checkpoint_interval=1
    )
    with pytest.raises(
        TrainingDiverged, match=r"step 1: validation loss is nan\. No checkpoint was written yet"
    ):
        run_training(corpus, tmp_path, cfg)
    assert not (tmp_path / "last.safetensors").exists() and not (tmp_path / "best.safetensors").exists()


@pytest.mark.parametrize("eval_interval", [1, 100], ids=["caught-by-eval", "caught-before-save"])
def test_inf_weight_mid_run_keeps_the_last_good_checkpoint(corpus, tmp_path, eval_interval):
    model = tiny_model()
    snapshot: dict[str, bytes] = {}

    def poison(record: dict) -> None:
        if record["kind"] == "train" and record["step"] == 3:
            snapshot["last"] = (tmp_path / "last.safetensors").read_bytes()  # step 2's checkpoint
            with torch.no_grad():
                model.blocks[1].ff.fc.weight[3, 5] = math.inf

    cfg = base_config(max_steps=6, eval_interval=eval_interval, checkpoint_interval=1)
    with pytest.raises(TrainingDiverged, match=r"step 3: .*(nan|inf).*last\.safetensors") as err:
        run_training(corpus, tmp_path, cfg, model=model, callbacks=(poison,))
    assert "lower train.lr" in str(err.value)
    assert (tmp_path / "last.safetensors").read_bytes() == snapshot["last"]  # untouched
    fresh = tiny_model(seed=1)
    assert load_checkpoint(tmp_path / "last.safetensors", fresh)["step"] == 2
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_nan_loss_stops_before_the_update(corpus, tmp_path):
    model = tiny_model()
    calls = {"n": 0}
    real_forward = model.forward

    def forward(idx, targets=None, **kwargs):
        calls["n"] += 1
        loss = real_forward(idx, targets, **kwargs)
        return loss * math.nan if calls["n"] == 3 and model.training else loss

    model.forward = forward  # the third training forward returns NaN
    cfg = base_config(max_steps=6, eval_interval=100, checkpoint_interval=1)
    with pytest.raises(TrainingDiverged, match=r"step 3: train loss is nan.*without applying the update"):
        run_training(corpus, tmp_path, cfg, model=model)
    state = load_checkpoint(tmp_path / "last.safetensors", tiny_model(seed=1))
    assert state["step"] == 2


# --------------------------------------------------------------------------- stopping
def test_early_stopping_after_patience_evaluations_without_improvement(corpus, tmp_path):
    # min_delta is larger than any loss can fall: only the first evaluation (vs inf) improves.
    cfg = base_config(max_steps=50, eval_interval=2, patience=2, min_delta=100.0)
    result = run_training(corpus, tmp_path, cfg)
    assert result.stop_reason == "early_stopping"
    assert result.state.step == 6 and result.state.evals_without_improvement == 2
    assert [r["step"] for r in result.history if r["kind"] == "eval"] == [2, 4, 6]
    model = tiny_model(seed=1)
    assert load_checkpoint(result.best_checkpoint, model)["step"] == 2
    assert load_checkpoint(result.last_checkpoint, model)["step"] == 6


def test_no_early_stopping_while_val_loss_improves(corpus, tmp_path):
    result = run_training(corpus, tmp_path, base_config(max_steps=8, eval_interval=2, patience=1))
    assert result.stop_reason == "max_steps" and result.state.step == 8


def test_a_callback_stops_the_run_after_an_evaluation_and_it_can_go_on(corpus, tmp_path):
    """What a search's pruner does: a reason returned for an eval record ends the run there,
    `last` saved at that step, and the run is not complete (a resume trains on to the budget)."""
    seen: list[tuple[str, int]] = []

    def prune_at_4(record):
        seen.append((record["kind"], record["step"]))
        return "pruned" if record["kind"] == "eval" and record["step"] == 4 else None

    cfg = base_config(max_steps=8, eval_interval=2, lr_decay_steps=8)
    result = run_training(corpus, tmp_path, cfg, callbacks=(prune_at_4,))
    assert result.stop_reason == "pruned" and result.state.step == 4
    assert seen[-1] == ("eval", 4) and ("train", 5) not in seen
    assert load_checkpoint(result.last_checkpoint, tiny_model())["step"] == 4
    assert stop_reason(result.state, TrainConfig(**cfg)) is None
    resumed = run_training(corpus, tmp_path, {**cfg, "resume": "auto"})
    assert resumed.stop_reason == "max_steps" and resumed.state.step == 8
    assert [r["step"] for r in resumed.history if r["kind"] == "train"] == list(range(1, 9))
    # Asked at the first evaluation it stops there; asked only at the last, the run has trained
    # its budget and ends complete, not pruned (a search measured such a trial as pruned).
    every_eval = run_training(corpus, tmp_path / "every", cfg, callbacks=(lambda record: "pruned",))
    assert every_eval.stop_reason == "pruned" and every_eval.state.step == 2
    last_only = run_training(corpus, tmp_path / "last", cfg,
                             callbacks=(lambda record: "pruned" if record["step"] == 8 else None,))
    assert last_only.stop_reason == "max_steps" and last_only.state.step == 8


def test_max_tokens_budget(corpus, tmp_path):
    per_step = 4 * TOKENS_PER_SEQUENCE
    result = run_training(corpus, tmp_path, base_config(max_steps=100, max_tokens=3 * per_step + 1))
    assert result.stop_reason == "max_tokens"
    assert result.state.step == 4 and result.state.tokens_seen == 4 * per_step
    assert load_checkpoint(result.last_checkpoint, tiny_model())["step"] == 4


def test_max_time_budget(corpus, tmp_path):
    start = time.perf_counter()
    result = run_training(corpus, tmp_path, base_config(max_steps=100_000, max_time=0.5, eval_interval=1000))
    assert result.stop_reason == "max_time"
    assert 1 <= result.state.step < 100_000 and result.state.train_time >= 0.5
    # A bounded wait, not a speed check: without the budget the run would take 100,000 steps.
    assert time.perf_counter() - start < 120
    assert load_checkpoint(result.last_checkpoint, tiny_model())["step"] == result.state.step


# --------------------------------------------------------------------------- learning
def test_tiny_model_overfits_a_tiny_text(tmp_path):
    """256 bytes of English, repeated: 4 distinct windows that a tiny model must memorise."""
    length = 64
    text = TEXT[: 4 * length]
    assert len({text[i * length] for i in range(4)}) == 4  # each window's first byte tells which it is
    data = make_corpus(
        tmp_path / "data",
        windows_tokens(4, length),
        windows_tokens(4, length),
        train_text=text,
        val_text=text,
    )
    cfg = base_config(
        micro_batch_size=4,
        global_batch_size=4,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=10,
        max_steps=80,
        eval_interval=80,
        log_interval=10,
        weight_decay=0.0,
    )
    result = run_training(
        data,
        tmp_path / "out",
        cfg,
        max_length=length,
        model_overrides=dict(context_length=length, emb_dim=64, n_heads=4),
    )
    losses = [loss for _, loss in _losses(result.history)]
    assert losses[0] > 2.0
    assert losses[-1] < 0.1, losses
    assert _losses(result.history, "eval")[-1][1] < 0.1
