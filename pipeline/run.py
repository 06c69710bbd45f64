"""The pipeline's MLflow run: one per execution, opened by pretrain, joined by evaluate and sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow

from minigpt.config import TrackingConfig
from pipeline import paths
from pipeline.common import StageError, read_json
from pipeline.tracking import ensure_experiment, git_tags, log_config, open_run, tracking_uri


def project_root() -> Path:
    """The real repository, also inside a queued DVC experiment's temporary copy.

    DVC points DVC_ROOT at the original repo for queued runs, whose own folder is
    deleted afterwards: a store built on the cwd would vanish with it.
    """
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def dvc_tags() -> dict[str, str]:
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


def connect(tracking: TrackingConfig) -> str:
    """Check the store (a dead server fails here, in seconds) and create the experiment; its id."""
    return ensure_experiment(tracking.experiment, project_root())


def start_run(tracking: TrackingConfig, params: dict[str, Any], run_info: dict[str, Any],
              reopen_run_id: str | None = None, continues_run_id: str | None = None,
              tags: dict[str, str] | None = None, run_name: str | None = None,
              description: str | None = None) -> mlflow.ActiveRun:
    """Open a run (or reopen an unfinished one) and record config and provenance.

    `continues_run_id`: a finished run whose training this one continues (a raised
    budget): the finished run stays as it was, and this one says where it started.
    """
    tags = {
        **git_tags(Path.cwd()),  # the checkout that actually runs (a temp copy for queued exps)
        **dvc_tags(),
        "data.sha256": run_info["data_sha256"],
        "tokenizer.sha256": run_info["tokenizer_sha256"],
        "code.sha256": run_info["code_sha256"],
        **(tags or {}),
    }
    if continues_run_id:
        tags["minigpt.continues"] = continues_run_id
    if description:
        tags["mlflow.note.content"] = description  # the run page's description
    active = open_run(project_root(), tracking.experiment, run_id=reopen_run_id,
                      run_name=tracking.run_name or run_name or os.environ.get("DVC_EXP_NAME"), tags=tags)
    log_config(active.info.run_id, params)
    mlflow.log_artifact(str(paths.PARAMS), artifact_path="config")
    return active


def recorded_run(run_file: Path = paths.MLFLOW_RUN) -> dict[str, str]:
    """The run a training stage recorded (reports/mlflow_run.json), in this tracking store."""
    info = read_json(run_file)
    uri = tracking_uri(project_root())
    if info.get("tracking_uri") != uri:
        raise StageError(
            f"{run_file}: the run was recorded in {info.get('tracking_uri')}, but the tracking "
            f"URI is now {uri}; re-run the stage that wrote it (dvc repro -f -s <stage>) or set MLFLOW_TRACKING_URI"
        )
    return info


def join_run(tracking: TrackingConfig, run_file: Path = paths.MLFLOW_RUN) -> mlflow.ActiveRun:
    """Reopen the run that a training stage recorded in `run_file`."""
    return open_run(project_root(), tracking.experiment, run_id=recorded_run(run_file)["run_id"])


def describe(run_id: str, experiment_id: str) -> dict[str, str]:
    """What reports/mlflow_run.json holds, for the stages that join the run."""
    return {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri(project_root())}


def main() -> None:
    """`python -m pipeline.run`: create the store and experiment once, before parallel runs."""
    from pipeline.common import load_config

    tracking = load_config("tracking").tracking
    experiment_id = connect(tracking)
    print(f"tracking: experiment {tracking.experiment!r} (id {experiment_id}) at {tracking_uri(project_root())}")


if __name__ == "__main__":
    main()
