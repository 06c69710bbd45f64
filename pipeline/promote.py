"""`make promote`: the experiment's best run becomes the registered model's `champion`.

    python -m pipeline.promote                               # best FINISHED pretrain run, by val_bits_per_byte
    python -m pipeline.promote --metric val_loss             # by another metric (minimised)
    python -m pipeline.promote --stage finetune              # finetune runs, by test_rouge_l (maximised)
    python -m pipeline.promote --filter "params.data.name = 'shakespeare'"
    python -m pipeline.promote --run RUN_ID                  # this run, whatever its score
    python -m pipeline.promote --name minigpt-shakespeare    # another registered model

The run's `generator` (the text-in, text-out model logged beside its checkpoint: weights in
safetensors, no pickle) becomes a new version of the registered model (`minigpt`, or
`tracking.register_model`); alias `champion` moves to it and `previous` to the version that was
champion. Deploy by alias, not by number: `minigpt generate --model models:/minigpt@champion`,
`mlflow models serve -m models:/minigpt@champion`. (MLflow deprecated the Staging/Production
stages in 2.9; aliases replace them.) A run that already is the champion changes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.common import StageError, load_config, stage_main
from pipeline.run import connect

#: What each stage's runs are ranked by by default, and whether higher is better.
DEFAULT_METRIC = {"pretrain": ("val_bits_per_byte", False), "finetune": ("test_rouge_l", True)}
MODEL_ARTIFACT = "generator"


def best_run(client: MlflowClient, experiment_id: str, stage: str, metric: str, maximise: bool,
             extra_filter: str) -> Run:
    """The FINISHED run of `stage` with the best `metric` (runs without it do not compete)."""
    query = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'" + (f" and {extra_filter}" if extra_filter else "")
    try:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=5000)
    except MlflowException as err:  # a malformed --filter
        raise StageError(f"--filter: {err.message.splitlines()[0]}") from None
    scored = [run for run in runs if not math.isnan(run.data.metrics.get(metric, math.nan))]
    if not scored:
        raise StageError(f"no FINISHED {stage} run matching {query!r} has metric {metric!r}"
                         + (f" ({len(runs)} runs without it)" if runs else ""))
    return (max if maximise else min)(scored, key=lambda run: run.data.metrics[metric])


def checked_run(client: MlflowClient, run_id: str) -> tuple[Run, str]:
    """`run_id` and the id of the generator model it logged, if it is FINISHED and logged
    one; a StageError saying why not."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StageError(f"--run {run_id}: no such run in the tracking store") from None
    if run.info.status != "FINISHED":
        raise StageError(f"run {run_id} is {run.info.status}, not FINISHED: only a completed run is promoted")
    # MLflow 3 keeps a logged model apart from the run's artifacts, as a LoggedModel of its experiment.
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'")
    if not models:
        why = ("a classifier predicts classes, not text, and its `model` artifact is pickled, which promote "
               "never registers" if run.data.tags.get("finetune.task") == "classification"
               else "it was trained with tracking.log_model=false")
        raise StageError(f"run {run_id} logged no {MODEL_ARTIFACT} model to register ({why})")
    return run, models[-1].model_id


def current_version(client: MlflowClient, name: str, alias: str):
    """The version `alias` points to, or None (no such model or alias yet)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def describe(run: Run, metric: str) -> str:
    value = run.data.metrics.get(metric)
    score = f", {metric} {value:.4f}" if value is not None else ""
    return f"run {run.info.run_id[:8]} {run.data.tags.get('mlflow.runName', '')!r}{score}"


def promote(client: MlflowClient, run: Run, model_id: str, name: str, metric: str) -> str:
    """Register `run`'s generator (logged model `model_id`) under `name`, move the aliases;
    what changed, in words."""
    champion = current_version(client, name, "champion")
    if champion is not None and champion.run_id == run.info.run_id:
        return f"{name}@champion is already version {champion.version} ({describe(run, metric)}): nothing changed"
    version = mlflow.register_model(f"models:/{model_id}", name, tags={
        "stage": run.data.tags.get("stage", ""), metric: str(run.data.metrics.get(metric, ""))})
    client.update_model_version(name, version.version, description=f"promoted by make promote: {describe(run, metric)}")
    client.set_registered_model_alias(name, "champion", version.version)
    lines = [f"{name}@champion -> version {version.version} ({describe(run, metric)})"]
    if champion is not None:
        client.set_registered_model_alias(name, "previous", champion.version)
        old = client.get_run(champion.run_id) if champion.run_id else None
        lines.append(f"{name}@previous -> version {champion.version}"
                     + (f" ({describe(old, metric)})" if old else ""))
    return "\n".join(lines)


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.promote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(DEFAULT_METRIC), default="pretrain")
    parser.add_argument("--metric", help="rank by this metric (default: val_bits_per_byte for pretrain, "
                                         "test_rouge_l for finetune)")
    parser.add_argument("--max", action="store_true", help="with --metric: higher is better (default: lower)")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"params.train.lr = '0.001'\"")
    parser.add_argument("--run", help="promote this run instead of the best one")
    parser.add_argument("--name", help="registered model name (default: tracking.register_model, else minigpt)")
    args = parser.parse_args(sys.argv[1:])

    tracking = load_config("tracking").tracking
    experiment_id = connect(tracking)
    client = MlflowClient(mlflow.get_tracking_uri())
    metric, maximise = DEFAULT_METRIC[args.stage]
    if args.metric:
        metric, maximise = args.metric, args.max
    run_id = args.run or best_run(client, experiment_id, args.stage, metric, maximise, args.filter).info.run_id
    run, model_id = checked_run(client, run_id)
    print(promote(client, run, model_id, args.name or tracking.register_model or "minigpt", metric))


if __name__ == "__main__":
    main()
