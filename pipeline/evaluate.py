"""Stage 5: score the best checkpoint on validation (and a sample of train) -> reports/eval.json."""

from __future__ import annotations

import mlflow

from minigpt.config import DataConfig, EvalConfig, ModelConfig, TrackingConfig, TrainConfig
from minigpt.data import create_dataloader
from minigpt.evaluation import score, token_byte_lengths
from minigpt.tokenizer import get_tokenizer
from minigpt.utils import write_json_atomic
from pipeline import paths
from pipeline.common import load_sections, stage_main
from pipeline.run import join_run
from pipeline.trained import load_trained_model


@stage_main
def main() -> None:
    sections = load_sections("model", "data", "train", "eval", "tracking")
    model_cfg: ModelConfig = sections["model"]
    data_cfg: DataConfig = sections["data"]
    eval_cfg: EvalConfig = sections["eval"]
    train_cfg: TrainConfig = sections["train"]
    tracking: TrackingConfig = sections["tracking"]

    model, checkpoint, state = load_trained_model(model_cfg, train_cfg.device)
    device = next(model.parameters()).device
    token_bytes = token_byte_lengths(get_tokenizer(data_cfg.tokenizer))
    report = {"checkpoint": checkpoint, "step": state["step"]}
    for split, shard_dir, max_batches in (("val", paths.VAL_TOKENS, eval_cfg.val_batches),
                                          ("train", paths.TRAIN_TOKENS, eval_cfg.train_batches)):
        # Non-overlapping windows in a fixed order: every evaluation scores the same tokens.
        loader = create_dataloader(shard_dir, max_length=data_cfg.max_length, batch_size=eval_cfg.batch_size,
                                   train=False, context_length=model_cfg.context_length)
        # fp32 whatever the training precision: the reported numbers should not carry bf16 rounding.
        scores = score(model, loader, device, token_bytes, "fp32", max_batches)
        report.update({f"{split}_{k}": v for k, v in scores.items()})
        print(f"evaluate: {split}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.1f}, "
              f"{scores['bits_per_byte']:.4f} bits/byte over {scores['tokens']:,} tokens")
    write_json_atomic(paths.EVAL_METRICS, report)
    with join_run(tracking):
        mlflow.log_metrics({f"eval.{k}": v for k, v in report.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(paths.EVAL_METRICS), artifact_path="reports")


if __name__ == "__main__":
    main()
