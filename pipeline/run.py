"""The pipeline's MLflow run: one per execution, opened by pretrain, joined by evaluate and sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow

from minigpt.config import TrackingConfig
from minigpt.tracking import git_tags, log_config, open_run, tracking_uri
from pipeline import paths
from pipeline.common import StageError, read_json


def project_root() -> Path:
    """The real repository, also inside a queued DVC experiment's temporary copy.

    DVC points DVC_ROOT at the original repo for queued runs, whose own folder is
    deleted afterwards: a store built on the cwd would vanish with it.
    """
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def dvc_tags() -> dict[str, str]:
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def start_run(tracking: TrackingConfig, params: dict[str, Any], run_info: dict[str, Any],
              resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """Open (or, for a resumed training, reopen) the run and record config and provenance."""
    tags = {
        **git_tags(Path.cwd()),  # the checkout that actually runs (a temp copy for queued exps)
        **dvc_tags(),
        "data.sha256": run_info["data_sha256"],
        "tokenizer.sha256": run_info["tokenizer_sha256"],
        "code.sha256": run_info["code_sha256"],
    }
    active = open_run(project_root(), tracking.experiment, run_id=resume_run_id,
                      run_name=tracking.run_name or os.environ.get("DVC_EXP_NAME"), tags=tags)
    log_config(active.info.run_id, params)
    mlflow.log_artifact(str(paths.PARAMS), artifact_path="config")
    return active


def join_run(tracking: TrackingConfig) -> mlflow.ActiveRun:
    """Reopen the run that pretrain recorded in reports/mlflow_run.json."""
    info = read_json(paths.MLFLOW_RUN)
    uri = tracking_uri(project_root())
    if info.get("tracking_uri") != uri:
        raise StageError(
            f"{paths.MLFLOW_RUN}: the run was recorded in {info.get('tracking_uri')}, but the tracking "
            f"URI is now {uri}; re-run pretrain (dvc repro -f -s pretrain) or set MLFLOW_TRACKING_URI"
        )
    return open_run(project_root(), tracking.experiment, run_id=info["run_id"])


def describe(active: mlflow.ActiveRun) -> dict[str, str]:
    return {"run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
            "tracking_uri": tracking_uri(project_root())}


def main() -> None:
    """`python -m pipeline.run`: create the store and experiment once, before parallel runs."""
    from minigpt.tracking import ensure_experiment
    from pipeline.common import load_sections

    tracking: TrackingConfig = load_sections("tracking")["tracking"]
    experiment_id = ensure_experiment(tracking.experiment, project_root())
    print(f"tracking: experiment {tracking.experiment!r} (id {experiment_id}) at {tracking_uri(project_root())}")


if __name__ == "__main__":
    main()
