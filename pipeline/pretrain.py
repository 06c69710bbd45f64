"""Stage 4: pretrain the model; open the MLflow run that evaluate and sample log into.

Runs as one process (`dvc repro`) or several (`torchrun --nproc_per_node N -m
pipeline.pretrain`); only rank 0 talks to MLflow and writes files.

DVC keeps `checkpoints/` between runs (`persist`), so this stage decides what a
re-run means (the README's Resume section says the same):
- the same params and code, after a kill: continue `last` exactly where it stopped;
- only a budget raised (max_steps, max_tokens, max_time): continue training;
- the run in `last` already complete: train nothing, regenerate the reports;
- anything else (other params or code, a budget cut, a corrupted checkpoint): start afresh.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient

from minigpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_state, remove_partial_checkpoints
from minigpt.config import TrainConfig
from minigpt.data import create_dataloader
from minigpt.data.shards import verify_shards
from minigpt.io import atomic_path, sha256_bytes, write_json_atomic, write_text_atomic
from minigpt.model import GPTModel
from minigpt.tokenizer import RANKS_SHA256
from minigpt.train import Record, TrainState, init_distributed, stop_reason, train
from minigpt.utils import seed_everything
from pipeline import paths
from pipeline.common import load_config, project_modules, read_params, stage_device, stage_main
from pipeline.run import connect, describe, start_run
from pipeline.tracking import MetricLogger, log_model, run_status

BUDGET_KEYS = ("max_steps", "max_tokens", "max_time")


def data_fingerprint(vocab_size: int) -> str:
    """One hash for the exact tokens trained and validated on. Each shard's sha256 is checked
    against its manifest first: a shard list that points elsewhere, or a changed file,
    stops the stage here instead of training on the wrong tokens."""
    manifests = []
    for shard_dir in (paths.TRAIN_TOKENS, paths.VAL_TOKENS):
        verify_shards(shard_dir, vocab_size)
        manifests.append((shard_dir / "manifest.json").read_bytes())
    return sha256_bytes(b"".join(manifests))


def code_fingerprint() -> str:
    """One hash for the code that trains: each minigpt and pipeline module this process
    has imported (the same files dvc.yaml lists as the stage's deps; a test checks)."""
    modules = sorted(project_modules().items())
    return sha256_bytes(b"".join(name.encode() + b"\0" + path.read_bytes() for name, path in modules))


def resume_mode(train_cfg: TrainConfig, run_config: dict, code_sha256: str) -> tuple[str, dict[str, Any] | None]:
    """Continue `checkpoints/last` only if it was trained with this config and code, and no
    budget was cut. Returns (train.resume to use, the saved state of the run continued)."""
    last = paths.CHECKPOINTS / "last.safetensors"
    if train_cfg.resume != "auto" or not last.exists():
        return train_cfg.resume, None
    try:
        # The whole file, not just its header: a corrupted checkpoint found only once a
        # run has been reopened would mark a finished run FAILED.
        saved = read_checkpoint_state(last, verify=True)
    except CheckpointError as err:
        print(f"pretrain: not resuming: {err}; starting afresh")
        return "never", None
    info = saved.get("run_info", {})
    old_config = info.get("config", {})
    if _without_budget(old_config) != _without_budget(run_config):
        print("pretrain: checkpoints/last was trained with other params; starting afresh")
        return "never", None
    if info.get("code_sha256") != code_sha256:
        print("pretrain: checkpoints/last was trained by other code; starting afresh")
        return "never", None
    for key in BUDGET_KEYS:
        old, new = (_budget(config.get("train", {}).get(key)) for config in (old_config, run_config))
        if new < old:
            print(f"pretrain: train.{key} was cut ({old} -> {new}): the run in checkpoints/last went "
                  f"further; starting afresh")
            return "never", None
    print(f"pretrain: resuming from {last} (step {saved.get('step')})")
    return "auto", saved


def _budget(value: float | None) -> float:
    return math.inf if value is None else value


def _without_budget(config: dict) -> dict:
    train = {k: v for k, v in config.get("train", {}).items() if k not in (*BUDGET_KEYS, "resume")}
    return {**config, "train": train}


def curve_csv(history: list[Record]) -> str:
    """One row per logged step: train loss, lr, tokens/s, and val loss where evaluated."""
    rows: dict[int, dict] = {}
    for rec in history:
        row = rows.setdefault(rec["step"], {"step": rec["step"]})
        if rec["kind"] == "train":
            row.update(train_loss=rec["train_loss"], lr=rec["lr"], tokens_per_s=rec["tokens_per_s"])
        else:
            row.update(val_loss=rec["val_loss"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "train_loss", "val_loss", "lr", "tokens_per_s"])
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow(rows[step])
    return out.getvalue()


def plot_curve(history: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in history if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def summary(state: TrainState, reason: str, n_params: int) -> dict:
    """reports/train.json: the whole run, however many executions it took."""
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


def write_reports(state: TrainState, reason: str, n_params: int) -> dict:
    metrics = summary(state, reason, n_params)
    write_text_atomic(paths.TRAIN_CURVE, curve_csv(state.history))
    plot_curve(state.history, paths.TRAIN_CURVE_PNG)
    write_json_atomic(paths.TRAIN_METRICS, metrics)
    return metrics


@stage_main
def main() -> None:
    cfg = load_config("model", "data", "train", "tracking")
    params = read_params()
    run_config = {k: params[k] for k in ("model", "data", "train")}

    device = stage_device(cfg.train.device)
    ctx = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if ctx.is_main:
        experiment_id = connect(cfg.tracking)  # a dead tracking server fails now, not after training
        for leftover in remove_partial_checkpoints(paths.CHECKPOINTS):
            print(f"pretrain: removed {leftover}, left by an interrupted checkpoint write")

    loader_args = dict(max_length=cfg.data.max_length, batch_size=cfg.train.micro_batch_size,
                       seed=cfg.data.shuffle_seed, num_workers=cfg.data.num_workers,
                       rank=ctx.rank, world_size=ctx.world_size, vocab_size=cfg.model.vocab_size)
    train_loader = create_dataloader(paths.TRAIN_TOKENS, stride=cfg.data.stride, train=True, **loader_args)
    val_loader = create_dataloader(paths.VAL_TOKENS, train=False, **loader_args)

    code_sha256 = code_fingerprint()
    resume, saved = resume_mode(cfg.train, run_config, code_sha256)
    train_cfg = cfg.train.model_copy(update={"resume": resume})
    seed_everything(train_cfg.seed)
    model = GPTModel(cfg.model)
    run_info = {"config": run_config, "data_sha256": data_fingerprint(cfg.model.vocab_size),
                "tokenizer_sha256": RANKS_SHA256, "code_sha256": code_sha256}
    train_args = dict(run_info=run_info, device=device, ctx=ctx, max_length=cfg.data.max_length)
    if not ctx.is_main:
        train(model, train_cfg, train_loader, val_loader, paths.CHECKPOINTS, **train_args)
        return

    previous = saved["run_info"].get("mlflow_run_id") if saved else None
    status = run_status(previous) if previous else None
    saved_state = TrainState.from_saved(saved) if saved else None
    if saved_state and status == "FINISHED" and (reason := stop_reason(saved_state, train_cfg)):
        # Nothing left to train, and its run is complete: leave the run as it is.
        write_reports(saved_state, reason, model.num_parameters())
        write_json_atomic(paths.MLFLOW_RUN, describe(previous, experiment_id))
        print(f"pretrain: checkpoints/last already holds the finished run ({saved_state.step} steps, "
              f"{reason}); reports regenerated, MLflow run {previous} unchanged")
        return

    # A finished run stays finished: training it further (a raised budget) is a new run.
    reopen, continues = (None, previous) if status == "FINISHED" else (previous, None)
    started = time.time()
    with start_run(cfg.tracking, params, run_info, reopen_run_id=reopen, continues_run_id=continues) as active:
        run_info["mlflow_run_id"] = active.info.run_id
        metric_logger = MetricLogger(MlflowClient(), active.info.run_id)
        if continues:
            metric_logger.replay(saved_state.history)  # so this run's charts show the whole training
        result = train(model, train_cfg, train_loader, val_loader, paths.CHECKPOINTS,
                       callbacks=(metric_logger,), **train_args)
        metric_logger.flush()
        metrics = write_reports(result.state, result.stop_reason, model.num_parameters())
        mlflow.log_metrics({f"final.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in (paths.TRAIN_METRICS, paths.TRAIN_CURVE, paths.TRAIN_CURVE_PNG):
            mlflow.log_artifact(str(path), artifact_path="reports")
        best = result.best_checkpoint or result.last_checkpoint
        mlflow.log_artifact(str(best), artifact_path="checkpoint")
        if cfg.tracking.log_model:
            load_checkpoint(best, model)
            log_model(model.cpu(), cfg.tracking.register_model)
        write_json_atomic(paths.MLFLOW_RUN, describe(active.info.run_id, active.info.experiment_id))
    print(f"pretrain: {metrics['steps']} steps, best val loss {metrics['best_val_loss']:.3f}, "
          f"{metrics['tokens_per_s']:,.0f} tokens/s in {time.time() - started:.0f} s, "
          f"MLflow run {active.info.run_id}")


if __name__ == "__main__":
    main()
