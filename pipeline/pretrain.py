"""Stage 4: pretrain the model; open the MLflow run that evaluate and sample log into.

Runs as one process (`dvc repro`) or several (`torchrun --nproc_per_node N -m
pipeline.pretrain`); only rank 0 talks to MLflow and writes files. What a re-run
does with the checkpoints DVC kept (resume, start afresh, or nothing) is decided in
`pipeline.training`.
"""

from __future__ import annotations

from minigpt.data import create_dataloader
from minigpt.data.shards import verify_shards
from minigpt.io import sha256_bytes
from minigpt.model import GPTModel
from minigpt.tokenizer import RANKS_SHA256
from minigpt.utils import seed_everything
from pipeline import paths
from pipeline.common import load_config, read_params, stage_main
from pipeline.lineage import corpus_source, split_inputs
from pipeline.run import preset_name
from pipeline.training import (Outputs, RunSpec, TrainingInputs, code_fingerprint, resume_mode, start_training_stage,
                               tracked_training)

MANIFEST = "manifest.json"  # a shard folder's list of shards and their sha256
OUTPUTS = Outputs(paths.CHECKPOINTS, paths.TRAIN_CURVE, paths.TRAIN_CURVE_PNG, paths.TRAIN_METRICS,
                  paths.MLFLOW_RUN)


def data_fingerprint(vocab_size: int) -> str:
    """One hash for the exact tokens trained and validated on. Each shard's sha256 is checked
    against its manifest first: a shard list that points elsewhere, or a changed file,
    stops the stage here instead of training on the wrong tokens."""
    manifests = []
    for shard_dir in (paths.TRAIN_TOKENS, paths.VAL_TOKENS):
        verify_shards(shard_dir, vocab_size)
        manifests.append((shard_dir / MANIFEST).read_bytes())
    return sha256_bytes(b"".join(manifests))


@stage_main
def main() -> None:
    cfg = load_config("model", "data", "train", "tracking")
    params = read_params()
    run_config = {k: params[k] for k in ("model", "data", "train")}

    device, ctx, experiment_id = start_training_stage("pretrain", cfg.train.device, cfg.tracking, paths.CHECKPOINTS)

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
    preset, corpus = preset_name(params["model"]), cfg.data.source.kind
    inputs = TrainingInputs(model, train_cfg, train_loader, val_loader, device, ctx, cfg.data.max_length, run_info)
    run = RunSpec(experiment_id, params, name=f"{preset}·{corpus}", name_keys=("model.", "data.", "train."),
                  tags={"stage": "pretrain", "model.preset": preset, "model.parameters": str(model.num_parameters())},
                  datasets=split_inputs(*corpus_source(cfg.data.source), {"training": paths.TRAIN_TOKENS / MANIFEST,
                                                                          "validation": paths.VAL_TOKENS / MANIFEST}),
                  description=(f"Pretraining of {preset} ({model.num_parameters():,} parameters) on the `{corpus}` "
                               f"corpus, {train_cfg.max_steps} steps; evaluated and sampled in the same run."))
    tracked_training("pretrain", OUTPUTS, inputs, run, cfg.tracking, saved)


if __name__ == "__main__":
    main()
