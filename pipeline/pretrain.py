"""Stage 4: pretrain the model; open the MLflow run that evaluate and sample log into.

Runs as one process (`dvc repro`) or several (`torchrun --nproc_per_node N -m
pipeline.pretrain`); only rank 0 talks to MLflow and writes files.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import torch

import mlflow
from mlflow.tracking import MlflowClient

from minigpt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_state
from minigpt.config import DataConfig, ModelConfig, TrainConfig, TrackingConfig
from minigpt.data import create_dataloader
from minigpt.model import GPTModel
from minigpt.shards import load_manifest
from minigpt.tokenizer import RANKS_SHA256
from minigpt.tracking import MetricLogger, log_model
from minigpt.train import Record, TrainResult, init_distributed, train
from minigpt.utils import pick_device, seed_everything, sha256_bytes, write_json_atomic, write_text_atomic
from pipeline import paths
from pipeline.common import load_sections, project_modules, read_params, stage_main
from pipeline.run import describe, start_run


def data_fingerprint() -> str:
    """One hash for the exact tokens trained and validated on (their manifests hold shard sha256s)."""
    manifests = [(d / "manifest.json").read_bytes() for d in (paths.TRAIN_TOKENS, paths.VAL_TOKENS)]
    for d in (paths.TRAIN_TOKENS, paths.VAL_TOKENS):
        load_manifest(d)  # refuses a foreign or missing manifest with a clear error
    return sha256_bytes(b"".join(manifests))


def code_fingerprint() -> str:
    """One hash for the code that trains: each minigpt and pipeline module this process
    has imported (the same files dvc.yaml lists as the stage's deps; a test checks)."""
    modules = sorted(project_modules().items())
    return sha256_bytes(b"".join(name.encode() + b"\0" + path.read_bytes() for name, path in modules))


def resume_mode(train_cfg: TrainConfig, run_config: dict, code_sha256: str) -> tuple[str, str | None]:
    """Continue `checkpoints/last` only if it was trained with this very config and code.

    DVC keeps the checkpoint folder between runs (`persist`), so an interrupted
    `dvc repro` picks up where it stopped; budget keys (max_steps, max_tokens,
    max_time) may grow. Any other change, a code change included (that is why DVC
    re-runs the stage), starts afresh. Returns (resume, run id).
    """
    last = paths.CHECKPOINTS / "last.safetensors"
    if train_cfg.resume != "auto" or not last.exists():
        return train_cfg.resume, None
    try:
        saved = read_checkpoint_state(last).get("run_info", {})
    except CheckpointError as err:
        print(f"pretrain: not resuming: {err}")
        return "never", None
    if _without_budget(saved.get("config", {})) != _without_budget(run_config):
        print("pretrain: checkpoints/last was trained with other params; starting afresh")
        return "never", None
    if saved.get("code_sha256") != code_sha256:
        print("pretrain: checkpoints/last was trained by other code; starting afresh")
        return "never", None
    print(f"pretrain: resuming from {last}")
    return "auto", saved.get("mlflow_run_id")


def _without_budget(config: dict) -> dict:
    train = {k: v for k, v in config.get("train", {}).items()
             if k not in ("max_steps", "max_tokens", "max_time", "resume")}
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
    with_tmp = path.with_suffix(".tmp.png")
    fig.savefig(with_tmp, dpi=110)
    plt.close(fig)
    os.replace(with_tmp, path)


def summary(result: TrainResult, seconds: float, n_params: int) -> dict:
    train_recs = [r for r in result.history if r["kind"] == "train"]
    return {
        "steps": result.state.step,
        "tokens": result.state.tokens_seen,
        "stop_reason": result.stop_reason,
        "train_loss": train_recs[-1]["train_loss"] if train_recs else None,
        "best_val_loss": result.state.best_val_loss,
        "last_val_loss": result.state.last_val_loss,
        "tokens_per_s": result.state.tokens_seen / max(result.state.train_time, 1e-9),
        "train_seconds": round(result.state.train_time, 1),
        "wall_seconds": round(seconds, 1),
        "parameters": n_params,
    }


@stage_main
def main() -> None:
    sections = load_sections("model", "data", "train", "tracking")
    model_cfg: ModelConfig = sections["model"]
    data_cfg: DataConfig = sections["data"]
    train_cfg: TrainConfig = sections["train"]
    tracking: TrackingConfig = sections["tracking"]
    params = read_params()
    run_config = {k: params[k] for k in ("model", "data", "train")}

    device = pick_device(train_cfg.device)
    ctx = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)

    loader_args = dict(max_length=data_cfg.max_length, batch_size=train_cfg.micro_batch_size,
                       seed=data_cfg.shuffle_seed, num_workers=data_cfg.num_workers,
                       rank=ctx.rank, world_size=ctx.world_size, context_length=model_cfg.context_length)
    train_loader = create_dataloader(paths.TRAIN_TOKENS, stride=data_cfg.stride, train=True, **loader_args)
    val_loader = create_dataloader(paths.VAL_TOKENS, train=False, **loader_args)

    code_sha256 = code_fingerprint()
    resume, previous_run = resume_mode(train_cfg, run_config, code_sha256)
    train_cfg = train_cfg.model_copy(update={"resume": resume})
    seed_everything(train_cfg.seed)
    model = GPTModel(model_cfg)
    run_info = {"config": run_config, "data_sha256": data_fingerprint(), "tokenizer_sha256": RANKS_SHA256,
                "code_sha256": code_sha256}

    if not ctx.is_main:
        train(model, train_cfg, train_loader, val_loader, paths.CHECKPOINTS, run_info=run_info,
              device=device, ctx=ctx, max_length=data_cfg.max_length)
        return
    started = time.time()
    with start_run(tracking, params, run_info, resume_run_id=previous_run) as active:
        run_info["mlflow_run_id"] = active.info.run_id
        metric_logger = MetricLogger(MlflowClient(), active.info.run_id)
        result = train(model, train_cfg, train_loader, val_loader, paths.CHECKPOINTS,
                       callbacks=(metric_logger,), run_info=run_info,
                       device=device, ctx=ctx, max_length=data_cfg.max_length)
        metric_logger.flush()
        # A resumed run's history starts at the resume point: the curve shows this execution.
        metrics = summary(result, time.time() - started, model.num_parameters())
        write_text_atomic(paths.TRAIN_CURVE, curve_csv(result.history))
        plot_curve(result.history, paths.TRAIN_CURVE_PNG)
        write_json_atomic(paths.TRAIN_METRICS, metrics)
        mlflow.log_metrics({f"final.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in (paths.TRAIN_METRICS, paths.TRAIN_CURVE, paths.TRAIN_CURVE_PNG):
            mlflow.log_artifact(str(path), artifact_path="reports")
        best = result.best_checkpoint or result.last_checkpoint
        mlflow.log_artifact(str(best), artifact_path="checkpoint")
        if tracking.log_model:
            load_checkpoint(best, model)
            log_model(model.cpu(), tracking.register_model)
        write_json_atomic(paths.MLFLOW_RUN, describe(active))
    print(f"pretrain: {metrics['steps']} steps, best val loss {metrics['best_val_loss']:.3f}, "
          f"{metrics['tokens_per_s']:,.0f} tokens/s, MLflow run {active.info.run_id}")


if __name__ == "__main__":
    main()
