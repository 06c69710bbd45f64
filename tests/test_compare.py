"""`make compare` on a real MLflow store holding three runs of a sweep (and one older run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TRACKING = {"experiment": "minigpt", "run_name": None, "log_model": False, "register_model": None}


def add_run(client: MlflowClient, experiment_id: str, name: str, sweep: str, lr: float, bpb: float) -> str:
    tags = {"stage": "pretrain", "sweep": sweep, "train.train_seconds": str(round(60 / lr)), "train.tokens_per_s": "8000.4"}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {"train.lr": str(lr), "model.n_layers": "4", "train.max_steps": "6"}
    curve = [Metric("train_loss", 10 - step * lr * 100, 0, step) for step in (1, 2, 3)]
    curve += [Metric("val_loss", 10 - step * lr * 90, 0, step) for step in (3,)]
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[*curve, Metric("val_bits_per_byte", bpb, 0, 0), Metric("val_perplexity", 50 + bpb, 0, 0)],
                     tags=[RunTag("mlflow.runColor", "#1f77b4")])
    client.set_terminated(run_id)
    return run_id


def test_compare_lists_the_latest_sweep_best_first_with_only_the_params_that_differ(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": TRACKING}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("minigpt", artifact_location=(tmp_path / "mlartifacts").as_uri())
    add_run(client, experiment_id, "old", "sweep-0", 0.01, 1.5)  # better, but of an earlier sweep
    for name, lr, bpb in (("a", 0.001, 2.3), ("b", 0.003, 2.1), ("c", 0.002, 2.2)):
        add_run(client, experiment_id, name, "sweep-1", lr, bpb)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run([sys.executable, "-m", "pipeline.compare"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "reports/compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[:3] == ["run", "run_id", "train.lr"]  # model.n_layers and max_steps are the same: left out
    assert "model.n_layers" not in header and {"val_bits_per_byte", "val_perplexity"} <= set(header)
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["b", "c", "a"]  # best bits/byte first
    assert header[-2:] == ["train_seconds", "tokens_per_s"]  # what each score cost
    assert [cell.strip() for cell in rows[2].split("|")[-3:-1]] == ["20000", "8000"]
    assert (tmp_path / "reports/compare.png").read_bytes()[:4] == b"\x89PNG"

    every = subprocess.run([sys.executable, "-m", "pipeline.compare", "--all"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert every.returncode == 0 and "| old " in (tmp_path / "reports/compare.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "pipeline.compare", "0123456789abcdef"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("compare: error: no such run in the experiment: 0123456789abcdef")


def test_mean_over_seeds_gives_one_row_per_candidate_best_mean_first():
    import pandas as pd

    from pipeline.common import StageError
    from pipeline.compare import mean_over

    table = pd.DataFrame({
        "run": list("abcdef"), "run_id": list("123456"),
        "finetune.train.lr": ["1e-4"] * 3 + ["5e-4"] * 3,
        "finetune.train.seed": ["124", "123", "125"] * 2,
        "test_accuracy": [0.96, 0.95, 0.97, 0.92, 0.93, 0.91],
        "test_macro_f1": [0.9, 0.9, 0.9, 0.8, 0.8, 0.8],
    })
    means = mean_over(table, "finetune.train.seed", "finetune")
    assert list(means["finetune.train.lr"]) == ["1e-4", "5e-4"] and list(means["runs"]) == [3, 3]
    assert list(means["test_accuracy"]) == [0.96, 0.92]
    assert list(means["test_accuracy per seed"]) == ["0.9500 0.9600 0.9700", "0.9300 0.9200 0.9100"]  # seeds 123..125
    with pytest.raises(StageError, match="--mean-over train.lr: the compared runs do not differ in params.train.lr"):
        mean_over(table, "train.lr", "finetune")
