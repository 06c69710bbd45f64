"""The pipeline end to end: real DVC, real MLflow (the SQLite store), real processes; the same
pipeline against a tracking server on PostgreSQL and S3 is tests/test_team_stack.py.

Each test works in a temporary git clone of this checkout, with the smoke presets
(`train=smoke`, `data=shakespeare-mini`: three real plays, six steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from pipeline_helpers import (SMOKE, STAGES, all_runs, client, clone_checkout, compose_smoke, git,
                              ran_stages, run, stage_runs,
                              start_queue, wait_for_queue)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clone that has run `dvc repro` once with the smoke params."""
    repo = clone_checkout(tmp_path_factory.mktemp("clone"))
    compose_smoke(repo)
    proc = run(repo, "dvc", "repro")
    assert ran_stages(proc.stdout) == STAGES
    return repo


def test_repro_produces_reports(project):
    train = json.loads((project / "reports/train.json").read_text())
    evaluation = json.loads((project / "reports/eval.json").read_text())
    assert train["steps"] == 6 and train["stop_reason"] == "max_steps"
    assert 0 < evaluation["val_loss"] < 11.0 and evaluation["val_bits_per_byte"] > 0
    assert evaluation["val_tokens"] == 4 * 4 * 32  # val_batches x batch_size x max_length
    samples = json.loads((project / "reports/samples.json").read_text())["samples"]
    assert [s["temperature"] for s in samples] == [0.0, 0.8]
    assert all(s["text"].startswith("ROMEO:") for s in samples)
    assert (project / "checkpoints/best.safetensors").is_file()
    # The finetune stages ran too (four smoke steps; tests/test_finetune_pipeline.py looks closer).
    assert json.loads((project / "reports/finetune_train.json").read_text())["steps"] == 4
    assert "accuracy" in json.loads((project / "reports/finetune_eval.json").read_text())


def test_one_mlflow_run_holds_everything(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    runs = stage_runs(uri, "pretrain")
    assert len(runs) == 1 and len(all_runs(uri)) == 2  # and the finetune's own run
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert json.loads((project / "reports/mlflow_run.json").read_text())["run_id"] == run_.info.run_id
    params = run_.data.params
    assert params["model.n_layers"] == "4" and params["train.max_steps"] == "6"
    assert params["data.source.max_documents"] == "3" and params["sample.max_new_tokens"] == "8"
    history = client(uri).get_metric_history(run_.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client(uri).get_metric_history(run_.info.run_id, "val_loss")] == [3, 6]
    metrics = run_.data.metrics
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_loss_full", "val_bits_per_byte",
                "val_perplexity", "train_bits_per_byte"):
        assert key in metrics
    # One key per quantity: no prefixed copies, no counts among the metrics (they are tags).
    assert not [k for k in metrics if k.startswith(("final.", "eval.", "best_"))] and "tokens" not in metrics
    assert metrics["val_loss_full"] == pytest.approx(json.loads((project / "reports/eval.json").read_text())["val_loss"])
    assert run_.data.tags["train.steps"] == "6" and run_.data.tags["eval.val_tokens"] == str(4 * 4 * 32)
    tags = run_.data.tags
    assert tags["git.commit"] == git(project, "rev-parse", "HEAD").strip()
    assert tags["git.dirty"] == "false"
    assert len(tags["data.sha256"]) == 64 and len(tags["tokenizer.sha256"]) == 64
    artifacts = {a.path for d in (None, "config", "checkpoint") for a in client(uri).list_artifacts(run_.info.run_id, d)}
    # The reports at the root, where MLflow's compare page finds them as common artifacts.
    assert {"config/params.yaml", "train_curve.png", "eval.json", "samples.md",
            "checkpoint/best.safetensors"} <= artifacts
    assert Path(client(uri).get_experiment(run_.info.experiment_id).artifact_location.removeprefix("file://")).is_dir()


def test_logged_model_loads_and_generates(project):
    import mlflow

    from minigpt.generate import generate
    from minigpt.model import GPTModel

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "reports/mlflow_run.json").read_text())["run_id"]
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert isinstance(model, GPTModel)
    out = generate(model, torch.tensor([[464, 1110]]), 5)
    assert out.shape == (1, 7)


def test_second_repro_is_a_no_op_and_a_sample_param_reruns_only_sample(project):
    proc = run(project, "dvc", "repro")
    assert ran_stages(proc.stdout) == []
    compose_smoke(project, "sample.temperatures=[0.5]")
    proc = run(project, "dvc", "repro")
    assert ran_stages(proc.stdout) == ["sample"]
    uri = f"sqlite:///{project / 'mlflow.db'}"
    assert len(stage_runs(uri, "pretrain")) == 1 and len(all_runs(uri)) == 2  # sample joined the same run
    shown = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    assert "reports/eval.json" in json.dumps(shown)
    plots = json.loads(run(project, "dvc", "plots", "show", "--json").stdout)
    assert "loss" in plots["data"]


def test_queued_sweep_runs_in_parallel_and_keeps_every_run(project):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    before = {r.info.run_id for r in all_runs(uri)}
    overrides = [arg for o in SMOKE for arg in ("-S", o)]
    run(project, "dvc", "exp", "run", "--queue", *overrides, "-S", "train.lr=1e-3,2e-3")
    start_queue(project, 2, MINIGPT_SWEEP="sweep-test")  # as `make sweep` does
    status = wait_for_queue(project, deadline=time.time() + 600)
    assert status.count("Success") == 2, status
    new = [r for r in stage_runs(uri, "pretrain") if r.info.run_id not in before]
    assert sorted(r.data.params["train.lr"] for r in new) == ["0.001", "0.002"]
    finetunes = [r for r in stage_runs(uri, "finetune") if r.info.run_id not in before]
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in finetunes) == sorted(r.info.run_id for r in new)
    assert {r.info.status for r in finetunes} == {"FINISHED"}
    # Told apart: named by what differs, grouped by the sweep, drawn in different colours; the
    # composed params.yaml of a queued experiment does not make its code "dirty".
    assert sorted(r.info.run_name for r in new) == ["gpt2-tiny·shakespeare·lr=0.001", "gpt2-tiny·shakespeare·lr=0.002"]
    assert {r.data.tags["sweep"] for r in new + finetunes} == {"sweep-test"}
    assert len({r.data.tags["mlflow.runColor"] for r in new}) == 2
    assert {r.data.tags["git.dirty"] for r in new} == {"false"}
    assert all("`train.lr=" in r.data.tags["mlflow.note.content"] for r in new)
    for r in new:
        assert r.info.status == "FINISHED"
        assert "val_bits_per_byte" in r.data.metrics and r.data.tags.get("dvc.exp_name")
        paths_ = {a.path for a in client(uri).list_artifacts(r.info.run_id)}
        assert "samples.md" in paths_
    assert not list((project / ".dvc/tmp/exps").glob("tmp*"))  # temporary copies are gone
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert len(exps) == 2


@pytest.mark.parametrize(
    "override, message",
    [("train.lr=-1", "train.lr: Input should be greater than 0"),
     ("model.n_heads=5", "n_heads: emb_dim (128) must be divisible by n_heads (5)")],
)
def test_bad_param_fails_the_stage_and_no_run_succeeds(project, override, message):
    uri = f"sqlite:///{project / 'mlflow.db'}"
    finished = {r.info.run_id for r in all_runs(uri) if r.info.status == "FINISHED"}
    overrides = [arg for o in SMOKE for arg in ("-S", o)]
    proc = run(project, "dvc", "exp", "run", *overrides, "-S", override, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert {r.info.run_id for r in all_runs(uri) if r.info.status == "FINISHED"} == finished
    git(project, "checkout", "--", "params.yaml")
