"""Stage 5: score the best checkpoint on validation (and a sample of train) -> reports/eval.json."""

from __future__ import annotations

import mlflow

from minigpt.data import create_dataloader
from minigpt.evaluation import score, token_byte_lengths
from minigpt.tokenizer import get_tokenizer
from minigpt.io import write_json_atomic
from pipeline import paths
from pipeline.common import load_config, stage_device, stage_main
from pipeline.run import join_run
from pipeline.tracking import log_results
from pipeline.trained import load_trained_model


@stage_main
def main() -> None:
    cfg = load_config("model", "data", "train", "eval", "tracking")
    model, checkpoint, state = load_trained_model(cfg.model, stage_device(cfg.train.device))
    device = next(model.parameters()).device
    token_bytes = token_byte_lengths(get_tokenizer(cfg.data.tokenizer))
    report = {"checkpoint": checkpoint, "step": state["step"]}
    for split, shard_dir, max_batches in (("val", paths.VAL_TOKENS, cfg.eval.val_batches),
                                          ("train", paths.TRAIN_TOKENS, cfg.eval.train_batches)):
        # Non-overlapping windows in a fixed order: every evaluation scores the same tokens.
        loader = create_dataloader(shard_dir, max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                                   train=False, vocab_size=cfg.model.vocab_size)
        # fp32 whatever the training precision: the reported numbers should not carry bf16 rounding.
        scores = score(model, loader, device, token_bytes, "fp32", max_batches)
        report.update({f"{split}_{k}": v for k, v in scores.items()})
        print(f"evaluate: {split}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.1f}, "
              f"{scores['bits_per_byte']:.4f} bits/byte over {scores['tokens']:,} tokens")
    write_json_atomic(paths.EVAL_METRICS, report)
    with join_run(cfg.tracking):
        # The full split, beside the `val_loss` series (an estimate on a few batches per evaluation).
        log_results({"val_loss_full": report["val_loss"], "val_perplexity": report["val_perplexity"],
                     "val_bits_per_byte": report["val_bits_per_byte"], "train_loss_full": report["train_loss"],
                     "train_perplexity": report["train_perplexity"],
                     "train_bits_per_byte": report["train_bits_per_byte"]},
                    {f"eval.{k}": report[k] for k in ("step", "val_tokens", "val_bytes", "train_tokens", "train_bytes")})
        mlflow.log_artifact(str(paths.EVAL_METRICS))


if __name__ == "__main__":
    main()
