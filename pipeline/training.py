"""One tracked training execution, shared by pretrain and finetune.

DVC keeps a training stage's checkpoint folder between runs (`persist`), so the stage
itself decides what a re-run means (the README's Resume section says the same):
- the same params and code, after a kill: continue `last` exactly where it stopped;
- only a budget raised (max_steps, max_tokens, max_time): continue training;
- the run in `last` already complete: train nothing, regenerate the reports;
- anything else (other params or code, a budget cut, a corrupted checkpoint): start afresh.
Then it opens the MLflow run (reopening an unfinished one, never a finished one), trains,
writes the reports of the whole run and logs them with the best checkpoint and the model.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from minigpt.checkpoint import CheckpointError, load_checkpoint, remove_partial_checkpoints
from minigpt.config import TrackingConfig, TrainConfig
from minigpt.io import atomic_path, sha256_bytes, write_json_atomic, write_text_atomic
from minigpt.model import GPTModel
from minigpt.distributed import DistContext, init_distributed
from minigpt.sharded_checkpoint import last_checkpoint, read_any_state
from minigpt.train import Callback, LossFn, Record, ResumableLoader, TrainResult, TrainState, stop_reason, train
from pipeline import paths
from pipeline.common import StageError, project_modules, stage_device
from pipeline.run import connect, describe, start_run
from pipeline.lineage import DataInput, log_data_inputs
from pipeline.tracking import MetricLogger, log_generator, log_model, log_results, logged_points, run_status
from pipeline.trial import PRUNED, pruning_callback

BUDGET_KEYS = ("max_steps", "max_tokens", "max_time")


@dataclass(frozen=True)
class Outputs:
    """Where a training stage writes (dvc.yaml lists the same paths)."""

    checkpoints: Path
    curve: Path  # csv, a DVC plot
    curve_png: Path
    metrics: Path  # json, DVC metrics
    run_file: Path  # the MLflow run, for the stages after this one


def code_fingerprint() -> str:
    """One hash for the code that trains: each minigpt and pipeline module this process
    has imported (the same files dvc.yaml lists as the stage's deps; a test checks)."""
    modules = sorted(project_modules().items())
    return sha256_bytes(b"".join(name.encode() + b"\0" + path.read_bytes() for name, path in modules))


def resume_mode(train_cfg: TrainConfig, run_config: dict, code_sha256: str,
                checkpoints: Path = paths.CHECKPOINTS, stage: str = "pretrain",
                base_sha256: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """Continue `<checkpoints>/last` only if it was trained with this config and code (and,
    for a finetune, from the base weights of sha256 `base_sha256`), and no budget was cut.
    Returns (train.resume to use, the saved state of the run continued)."""
    last = last_checkpoint(checkpoints)  # an FSDP run's shards until it ends, else the file
    if train_cfg.resume != "auto" or last is None:
        return train_cfg.resume, None
    try:
        # The whole checkpoint, not just its header: a corrupted one found only once a run
        # has been reopened would mark a finished run FAILED.
        saved = read_any_state(last, verify=True)
    except CheckpointError as err:
        print(f"{stage}: not resuming: {err}; starting afresh")
        return "never", None
    info = saved.get("run_info", {})
    old_config = info.get("config", {})
    if _without_budget(old_config) != _without_budget(run_config):
        print(f"{stage}: {last} was trained with other params; starting afresh")
        return "never", None
    if info.get("code_sha256") != code_sha256:
        print(f"{stage}: {last} was trained by other code; starting afresh")
        return "never", None
    if base_sha256 and info.get("init_sha256") != base_sha256:  # the model it started from was retrained
        print(f"{stage}: {last} was trained from other base weights; starting afresh")
        return "never", None
    old_train, new_train = _train_section(old_config), _train_section(run_config)
    for key in BUDGET_KEYS:
        old, new = _budget(old_train.get(key)), _budget(new_train.get(key))
        if new < old:
            print(f"{stage}: train.{key} was cut ({old} -> {new}): the run in {last} went further; starting afresh")
            return "never", None
    print(f"{stage}: resuming from {last} (step {saved.get('step')})")
    return "auto", saved


def _train_section(config: dict) -> dict:
    """The TrainConfig part of a run config: `train` (pretrain) or `finetune.train`."""
    return config.get("train") or config.get("finetune", {}).get("train", {})


def _budget(value: float | None) -> float:
    return math.inf if value is None else value


def _without_budget(config: dict) -> dict:
    """The config with the budget keys (which may grow) and `resume` left out."""
    if not isinstance(config, dict):
        return config
    return {k: _without_budget(v) for k, v in config.items() if k not in (*BUDGET_KEYS, "resume")}


def curve_csv(history: list[Record]) -> str:
    """One row per logged step: train loss, lr, tokens/s, and the eval numbers where evaluated."""
    rows: dict[int, dict] = {}
    eval_keys: list[str] = []
    for rec in history:
        row = rows.setdefault(rec["step"], {"step": rec["step"]})
        if rec["kind"] == "train":
            row.update(train_loss=rec["train_loss"], lr=rec["lr"], tokens_per_s=rec["tokens_per_s"])
        else:
            extra = {k: v for k, v in rec.items() if k.startswith("val_") and k != "val_perplexity"}
            eval_keys += [k for k in extra if k not in eval_keys]
            row.update(extra)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "train_loss", *eval_keys, "lr", "tokens_per_s"])
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue()


def plot_curve(history: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(r["step"], r["train_loss"]) for r in history if r["kind"] == "train"]
    val_points = [(r["step"], r["val_loss"]) for r in history if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_points:
        ax.plot(*zip(*train_points), label="train loss", linewidth=1)
    if val_points:
        ax.plot(*zip(*val_points), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def summary(state: TrainState, reason: str, n_params: int) -> dict:
    """The metrics file: the whole run, however many executions it took."""
    train_recs = [r for r in state.history if r["kind"] == "train"]
    return {
        "steps": state.step,
        "tokens": state.tokens_seen,
        "stop_reason": reason,
        "train_loss": train_recs[-1]["train_loss"] if train_recs else None,
        "best_val_loss": state.best_val_loss,
        "last_val_loss": state.last_val_loss,
        "tokens_per_s": state.tokens_seen / max(state.train_time, 1e-9),
        "train_seconds": round(state.train_time, 1),
        "parameters": n_params,
    }


def write_reports(outputs: Outputs, state: TrainState, reason: str, n_params: int) -> dict:
    metrics = summary(state, reason, n_params)
    write_text_atomic(outputs.curve, curve_csv(state.history))
    plot_curve(state.history, outputs.curve_png)
    write_json_atomic(outputs.metrics, metrics)
    return metrics


@dataclass
class TrainingInputs:
    """What a training stage trains: the model and everything `minigpt.train.train` takes."""

    model: torch.nn.Module
    train_cfg: TrainConfig
    train_loader: ResumableLoader
    val_loader: ResumableLoader
    device: torch.device
    ctx: DistContext
    max_length: int | None
    run_info: dict[str, Any]  # into every checkpoint; gains `mlflow_run_id` once the run is open
    loss_fn: LossFn | None = None  # None: language modelling
    eval_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None
    # The plain model the run logs, made from (a copy of) the trained one: LoRA folds its adapters in.
    plain: Callable[[torch.nn.Module], torch.nn.Module] | None = None

    def train(self, out_dir: Path, callbacks: tuple[Callback, ...] = ()) -> TrainResult:
        return train(self.model, self.train_cfg, self.train_loader, self.val_loader, out_dir, callbacks=callbacks,
                     loss_fn=self.loss_fn, eval_metrics=self.eval_metrics, run_info=self.run_info,
                     device=self.device, ctx=self.ctx, max_length=self.max_length)


@dataclass(frozen=True)
class RunSpec:
    """The stage's MLflow run, as `pipeline.run.start_run` names, describes and tags it."""

    experiment_id: str | None
    params: dict[str, Any]
    tags: dict[str, str]
    name: str
    name_keys: tuple[str, ...]
    description: str
    datasets: tuple[DataInput, ...] = ()  # what it trains and validates on, for the run's lineage


def tracked_training(stage: str, outputs: Outputs, inputs: TrainingInputs, run: RunSpec,
                     tracking: TrackingConfig, saved: dict[str, Any] | None) -> None:
    """Train (`saved`: the checkpoint state `resume_mode` chose to continue) inside an MLflow
    run, then write and log the reports, the best checkpoint and the model."""
    model, train_cfg, ctx = inputs.model, inputs.train_cfg, inputs.ctx
    if not ctx.is_main:  # only rank 0 talks to MLflow and writes files
        inputs.train(outputs.checkpoints)
        return

    previous = saved["run_info"].get("mlflow_run_id") if saved else None
    status = run_status(previous) if previous else None
    saved_state = TrainState.from_saved(saved) if saved else None
    if saved_state and status == "FINISHED" and (reason := stop_reason(saved_state, train_cfg)):
        # Nothing left to train, and its run is complete: leave the run as it is.
        write_reports(outputs, saved_state, reason, model.num_parameters())
        write_json_atomic(outputs.run_file, describe(previous, run.experiment_id))
        print(f"{stage}: {outputs.checkpoints}/last already holds the finished run ({saved_state.step} steps, "
              f"{reason}); reports regenerated, MLflow run {previous} unchanged")
        return

    # A finished run stays finished: training it further (a raised budget) is a new run.
    reopen, continues = (None, previous) if status == "FINISHED" else (previous, None)
    # FSDP shards `model` in place; the model logged at the end is a plain copy (rank 0 holds
    # one more set of weights, not the gradients and moments that sharding saves).
    to_log = copy.deepcopy(model) if ctx.enabled and train_cfg.strategy == "fsdp" else model
    started = time.time()
    with start_run(tracking, run.params, inputs.run_info, name=run.name, name_keys=run.name_keys,
                   description=run.description, reopen_run_id=reopen, continues_run_id=continues,
                   tags=run.tags) as active:
        inputs.run_info["mlflow_run_id"] = active.info.run_id
        log_data_inputs(run.datasets)
        if ctx.restarts:  # torchrun restarted the workers (--max-restarts): the same run goes on
            mlflow.set_tag("torchelastic.restarts", str(ctx.restarts))
        metric_logger = metric_logger_for(active.info.run_id, saved_state, reopened=reopen is not None)
        # In a search (pipeline.search), the study's pruner may stop the run after an evaluation.
        callbacks = tuple(c for c in (metric_logger, pruning_callback()) if c is not None)
        result = inputs.train(outputs.checkpoints, callbacks=callbacks)
        try:
            metric_logger.close(timeout=tracking.outage_wait)
        except StageError:
            # The server is down past the wait: marking the run FAILED gets one try, not MLflow's
            # minutes of retries; the run stays open for the re-run that logs what is missing.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            raise
        metrics = write_reports(outputs, result.state, result.stop_reason, model.num_parameters())
        # The run's size and end as tags; its losses are the step series already.
        log_results({}, {f"train.{k}": v for k, v in metrics.items()
                         if k in ("steps", "tokens", "stop_reason", "train_seconds", "parameters", "tokens_per_s")})
        if result.stop_reason == PRUNED:  # a search stopped it: a finished run, not a failed one
            mlflow.set_tag("pruned", "true")
        # At the run's root: MLflow's compare page shows only root-level files that all runs have.
        for path in (outputs.metrics, outputs.curve, outputs.curve_png):
            mlflow.log_artifact(str(path))
        best = result.best_checkpoint or result.last_checkpoint
        mlflow.log_artifact(str(best), artifact_path="checkpoint")
        if tracking.log_model:
            load_checkpoint(best, to_log)
            if inputs.plain is not None:
                to_log = inputs.plain(copy.deepcopy(to_log))
            log_model(to_log.cpu(), tracking.register_model)
            if isinstance(to_log, GPTModel):  # text in, text out; a classifier (finetune) is not
                log_generator(to_log, best)
        write_json_atomic(outputs.run_file, describe(active.info.run_id, active.info.experiment_id))
    print(f"{stage}: {metrics['steps']} steps, best val loss {metrics['best_val_loss']:.3f}, "
          f"{metrics['tokens_per_s']:,.0f} tokens/s in {time.time() - started:.0f} s, "
          f"MLflow run {active.info.run_id}")


def metric_logger_for(run_id: str, saved_state: TrainState | None, *, reopened: bool) -> MetricLogger:
    """The run's metric logger, with the points of the training continued here that the run
    lacks sent first: all of them for a new run continuing a finished one (its charts show the
    whole training), the missing ones for a reopened run (those its server did not take before
    the last execution ended; the ones it holds are not sent again, nor logged twice when the
    steps after the last checkpoint are trained again)."""
    client = MlflowClient()
    if saved_state is None:
        return MetricLogger(client, run_id)
    skip = set()
    if reopened:
        keys = {key for record in saved_state.history for key in record} - set(MetricLogger.SKIPPED)
        skip = logged_points(client, run_id, keys)
    metric_logger = MetricLogger(client, run_id, skip=skip)
    metric_logger.replay(saved_state.history)
    return metric_logger


def start_training_stage(stage: str, device_name: str, tracking: TrackingConfig,
                         checkpoints: Path) -> tuple[torch.device, DistContext, str | None]:
    """The device and process group (torchrun) of a training stage; on rank 0 also the
    MLflow experiment id, after checking the store (a dead server fails now, not after
    training) and deleting what checkpoint writes killed mid-way left behind (before DVC
    could record it as part of the output)."""
    device = stage_device(device_name)
    ctx = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not ctx.is_main:
        return device, ctx, None
    experiment_id = connect(tracking)
    for leftover in remove_partial_checkpoints(checkpoints):
        print(f"{stage}: removed {leftover}, left by an interrupted checkpoint write")
    return device, ctx, experiment_id
