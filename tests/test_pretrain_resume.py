"""When `dvc repro` re-runs pretrain, does it continue `checkpoints/last` or start afresh?

DVC keeps the checkpoint folder (`persist`), so the stage itself decides: continue an
interrupted run of the same config and code, restart after any other change.
"""

from __future__ import annotations

import shutil

import pytest

from minigpt.checkpoint import save_checkpoint
from minigpt.config import TrainConfig
from minigpt.model import GPTModel
from pipeline import paths
from pipeline.training import code_fingerprint, resume_mode

CONFIG = {"model": {"n_layers": 1}, "data": {"max_length": 8},
          "train": {"lr": 1e-3, "max_steps": 10, "max_tokens": 5_000, "max_time": 30.0, "resume": "auto"}}


@pytest.fixture
def saved_run(tmp_path, monkeypatch) -> str:
    """A `checkpoints/last` in a fresh working directory, written by this code and CONFIG."""
    monkeypatch.chdir(tmp_path)
    model = GPTModel.from_preset("gpt2-tiny", n_layers=1, context_length=8, emb_dim=16, n_heads=2)
    code = code_fingerprint()
    run_info = {"config": CONFIG, "code_sha256": code, "mlflow_run_id": "abc123"}
    save_checkpoint(paths.CHECKPOINTS / "last.safetensors", model, None, {"step": 4, "run_info": run_info})
    return code


def with_train(**changes) -> dict:
    return {**CONFIG, "train": {**CONFIG["train"], **changes}}


def continued_run(resume: tuple[str, dict | None]) -> str | None:
    """The MLflow run id of the saved run that `resume_mode` continues, None when it starts afresh."""
    mode, saved = resume
    return saved["run_info"]["mlflow_run_id"] if mode == "auto" and saved else None


def test_same_config_and_code_continue_the_run(saved_run):
    assert continued_run(resume_mode(TrainConfig(), CONFIG, saved_run)) == "abc123"


@pytest.mark.parametrize("budget", [{"max_steps": 20}, {"max_tokens": 10_000}, {"max_time": 60.0},
                                    {"max_time": None}])
def test_a_larger_budget_continues_the_run(saved_run, budget):
    assert continued_run(resume_mode(TrainConfig(), with_train(**budget), saved_run)) == "abc123"


@pytest.mark.parametrize("budget", [{"max_steps": 5}, {"max_tokens": 1_000}, {"max_time": 10.0}])
def test_a_budget_cut_starts_afresh(saved_run, budget, capsys):
    """The run in `last` may already have gone past the new budget: keeping it would
    leave a longer-trained model under params that say otherwise."""
    assert resume_mode(TrainConfig(), with_train(**budget), saved_run) == ("never", None)
    assert f"train.{next(iter(budget))} was cut" in capsys.readouterr().out


def test_other_params_start_afresh(saved_run, capsys):
    assert resume_mode(TrainConfig(), with_train(lr=2e-3), saved_run) == ("never", None)
    assert "other params" in capsys.readouterr().out


def test_other_code_starts_afresh(saved_run, capsys):
    assert resume_mode(TrainConfig(), CONFIG, "0" * 64) == ("never", None)
    assert "other code" in capsys.readouterr().out


def test_resume_never_and_no_checkpoint(saved_run):
    assert resume_mode(TrainConfig(resume="never"), CONFIG, saved_run) == ("never", None)
    (paths.CHECKPOINTS / "last.safetensors").unlink()
    assert resume_mode(TrainConfig(), CONFIG, saved_run) == ("auto", None)  # nothing to resume


def test_a_corrupt_checkpoint_starts_afresh(saved_run, capsys):
    (paths.CHECKPOINTS / "last.safetensors").write_bytes(b"not a checkpoint")
    assert resume_mode(TrainConfig(), CONFIG, saved_run) == ("never", None)
    assert "not resuming" in capsys.readouterr().out


def test_a_checkpoint_with_a_flipped_byte_in_its_tensors_starts_afresh(saved_run, capsys):
    """The header still parses: only checking the whole file finds it, before any run is reopened."""
    last = paths.CHECKPOINTS / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor, far from the JSON header
    last.write_bytes(bytes(data))
    assert resume_mode(TrainConfig(), CONFIG, saved_run) == ("never", None)
    assert "do not match their sha256" in capsys.readouterr().out


def test_the_code_fingerprint_sees_a_changed_library_file(tmp_path, monkeypatch):
    import minigpt.modules

    copy = tmp_path / "modules.py"
    shutil.copy(minigpt.modules.__file__, copy)
    monkeypatch.setattr(minigpt.modules, "__file__", str(copy))  # where the fingerprint reads it
    before = code_fingerprint()
    assert code_fingerprint() == before
    with copy.open("a") as f:
        f.write("\n# a change\n")
    assert code_fingerprint() != before
