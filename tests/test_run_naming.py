"""Runs a user can tell apart: names from what matters and what an experiment overrides,
a dirty flag that a queued experiment's own params do not raise, the UI's runs URL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.run import overrides, preset_name, run_name, runs_url
from pipeline.tracking import git_tags

PARAMS = {"model": {"vocab_size": 50257, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
                    "dropout": 0.0, "qkv_bias": False, "tie_weights": True},
          "train": {"lr": 0.002, "max_steps": 800}, "finetune": {"train": {"lr": 0.0005}}}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git checkout whose commit holds PARAMS as params.yaml, and some code."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "baseline")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_lr(lr: float) -> dict:
    return {**PARAMS, "train": {**PARAMS["train"], "lr": lr}}


def test_the_model_is_named_by_its_preset():
    assert preset_name(PARAMS["model"]) == "gpt2-tiny"
    assert preset_name({**PARAMS["model"], "n_layers": 8}) == "custom"


def test_a_plain_run_is_named_by_model_and_corpus_and_an_override_by_its_value(repo):
    assert overrides(PARAMS, ("model.", "train.")) == {}
    assert run_name("gpt2-tiny·shakespeare", {}) == "gpt2-tiny·shakespeare"
    changed = overrides(with_lr(0.005), ("model.", "train."))
    assert changed == {"train.lr": 0.005}
    assert run_name("gpt2-tiny·shakespeare", changed) == "gpt2-tiny·shakespeare·lr=0.005"


def test_only_the_stage_s_own_sections_name_it(repo):
    finetune_lr = {**PARAMS, "finetune": {"train": {"lr": 0.001}}}
    assert overrides(finetune_lr, ("model.", "train.")) == {}  # pretrain: not its business
    assert overrides(finetune_lr, ("finetune.",)) == {"finetune.train.lr": 0.001}
    # Two overridden keys ending alike keep their full names, so the name stays unambiguous.
    assert run_name("x", {"train.lr": 0.1, "finetune.train.lr": 0.2}) == "x·train.lr=0.1·finetune.train.lr=0.2"


def test_outside_git_nothing_counts_as_overridden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert overrides(with_lr(0.005), ("train.",)) == {}


def test_params_yaml_and_dvc_lock_do_not_make_the_code_dirty(repo):
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "params.yaml").write_text(yaml.safe_dump(with_lr(0.005)))  # what `dvc exp run -S` does
    assert git_tags(repo)["git.dirty"] == "false"
    (repo / "code.py").write_text("x = 2\n")
    assert git_tags(repo)["git.dirty"] == "true"


def test_the_ui_url_opens_the_training_runs_not_the_genai_overview():
    assert runs_url("http://127.0.0.1:5000/", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
