"""The pipeline's MLflow run: one per execution, opened by pretrain, joined by evaluate and sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from minigpt.config import PRESETS, ModelConfig, TrackingConfig
from pipeline import paths
from pipeline.common import StageError, read_json
from pipeline.tracking import (committed_params, ensure_experiment, flatten, git_tags, log_config, open_run,
                               tracking_uri)
from pipeline.trial import trial_tags


def project_root() -> Path:
    """The real repository, also inside a queued DVC experiment's temporary copy.

    DVC points DVC_ROOT at the original repo for queued runs, whose own folder is
    deleted afterwards: a store built on the cwd would vanish with it.
    """
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def dvc_tags() -> dict[str, str]:
    """The DVC experiment (name, baseline) and the sweep it belongs to: `make sweep` sets
    MINIGPT_SWEEP for the queue it starts; other experiments group by their baseline. A trial
    of `make search` also carries its study and number (`search`, `trial`)."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    tags = {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}
    sweep = os.environ.get("MINIGPT_SWEEP") or (f"exp-{tags['dvc.baseline_rev'][:7]}" if "dvc.baseline_rev" in tags
                                                  else None)
    return tags | ({"sweep": sweep} if sweep else {}) | trial_tags()


def overrides(params: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The flattened params under `prefixes` that differ from the committed params.yaml: in a
    queued experiment, its -S overrides; in a plain `dvc repro`, nothing."""
    committed = flatten(committed_params(Path.cwd()) or {})
    missing = object()  # a key the commit does not have at all
    return {k: v for k, v in flatten(params).items()
            if committed and k.startswith(prefixes) and committed.get(k, missing) != v}


def run_name(base: str, changed: dict[str, Any]) -> str:
    """`gpt2-tiny·shakespeare`, or in a sweep `gpt2-tiny·lr=0.003`: what the run is, and what
    makes it differ from its siblings (a key's last part, unless two would clash)."""
    last = [key.rsplit(".", 1)[-1] for key in changed]
    parts = [f"{short if last.count(short) == 1 else key}={_value(value)}"
             for (key, value), short in zip(changed.items(), last)]
    name = "·".join([base, *parts])
    return name if len(name) <= 100 else name[:99] + "…"


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).replace(" ", "")


def preset_name(model: dict[str, Any]) -> str:
    """The named size these model params are (`gpt2-tiny`), else `custom`."""
    return next((name for name, sizes in PRESETS.items() if ModelConfig(**sizes).model_dump() == model), "custom")


# Distinct colours for the runs of one sweep (MLflow's own choice hashes the run id into 29
# colours, so two runs of a sweep often share one); the UI reads the `mlflow.runColor` tag.
RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
              "#bcbd22", "#7f7f7f")


def run_color(run: mlflow.entities.Run) -> str:
    """The run's colour: its place among the runs of its sweep (by start time, then id), so
    runs started at the same moment by a parallel queue still get different colours."""
    sweep = run.data.tags.get("sweep")
    if sweep is None:
        return RUN_COLORS[0]
    siblings = MlflowClient().search_runs([run.info.experiment_id], filter_string=f"tags.sweep = '{sweep}'",
                                          max_results=1000)
    order = sorted((r.info.start_time, r.info.run_id) for r in siblings)
    return RUN_COLORS[order.index((run.info.start_time, run.info.run_id)) % len(RUN_COLORS)]


def connect(tracking: TrackingConfig) -> str:
    """Check the store (a dead server fails here, in seconds) and create the experiment; its id."""
    return ensure_experiment(tracking.experiment, project_root())


def start_run(tracking: TrackingConfig, params: dict[str, Any], run_info: dict[str, Any], *, name: str,
              name_keys: tuple[str, ...], description: str, reopen_run_id: str | None = None,
              continues_run_id: str | None = None, tags: dict[str, str] | None = None) -> mlflow.ActiveRun:
    """Open a run (or reopen an unfinished one) and record config and provenance.

    It is named `name` plus the params under `name_keys` that this experiment overrides
    (`tracking.run_name` wins), described as `description` plus those overrides.
    `continues_run_id`: a finished run whose training this one continues (a raised
    budget): the finished run stays as it was, and this one says where it started.
    """
    changed = overrides(params, name_keys)
    tags = {
        **git_tags(Path.cwd()),  # the checkout that actually runs (a temp copy for queued exps)
        **dvc_tags(),
        "data.sha256": run_info["data_sha256"],
        "tokenizer.sha256": run_info["tokenizer_sha256"],
        "code.sha256": run_info["code_sha256"],
        "params.changed": ", ".join(f"{k}={_value(v)}" for k, v in changed.items()) or "none",
        **(tags or {}),
    }
    if continues_run_id:
        tags["minigpt.continues"] = continues_run_id
    if changed:
        description += "\n\nOverrides of this experiment: " + ", ".join(f"`{k}={_value(v)}`" for k, v in changed.items())
    tags["mlflow.note.content"] = description  # the run page's description (markdown)
    active = open_run(project_root(), tracking.experiment, run_id=reopen_run_id,
                      run_name=tracking.run_name or run_name(name, changed), tags=tags)
    run = MlflowClient().get_run(active.info.run_id)
    if "mlflow.runColor" not in run.data.tags:  # a reopened run keeps its colour
        mlflow.set_tag("mlflow.runColor", run_color(run))
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


def runs_url(ui: str, experiment_id: str) -> str:
    """The experiment's training-runs table in `mlflow ui` at `ui`. MLflow 3 opens an experiment
    on its GenAI traces overview unless `workflowType=machine_learning` is asked for (the
    `mlflow.experimentKind` tag is not read by 3.17's UI; its sidebar toggle remembers the
    choice per browser)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.run`: create the store and experiment once, before parallel runs;
    with `--ui URL`, print the experiment's runs page in the MLflow UI at URL."""
    import argparse

    from pipeline.common import load_config

    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=main.__doc__)
    parser.add_argument("--ui", metavar="URL", help="print the training-runs URL of the UI served at URL")
    args = parser.parse_args(argv)
    tracking = load_config("tracking").tracking
    experiment_id = connect(tracking)
    print(f"tracking: experiment {tracking.experiment!r} (id {experiment_id}) at {tracking_uri(project_root())}")
    if args.ui:
        print(f"tracking: training runs: {runs_url(args.ui, experiment_id)}")


if __name__ == "__main__":
    main()
