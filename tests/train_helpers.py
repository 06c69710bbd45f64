"""Shared by the training tests: a tiny real corpus, a tiny model, and one training entry point.

The corpus is real English stored as byte-level token shards (token id = byte, vocab 256)
through the real shard writer and read back by the real `minigpt.data` loaders. Bytes
rather than GPT-2 ids keep the output head at 256 rows instead of 50,257, which makes a
training step ~30x cheaper (ms instead of a second) while every code path stays the same.

Run as a script (`python tests/train_helpers.py --data D --out O ...`) it trains once and
writes its records as JSON: the exact-resume test continues a run in a new process this way,
and the DDP test launches it under `torchrun`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt import train as train_module
from minigpt.config import ModelConfig, TrainConfig
from minigpt.data import create_dataloader
from minigpt.model import GPTModel
from minigpt.data.shards import write_shards
from minigpt.distributed import DistContext, init_distributed
from minigpt.train import TrainResult, train

# Public-domain openings (Dickens 1859, Melville 1851, Austen 1813).
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way. "
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in "
    "my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world. It is a way I have of driving off the spleen "
    "and regulating the circulation. "
)
VAL_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
)

# A model small enough that a step takes ~10 ms on 2 CPU cores.
TINY_MODEL = dict(vocab_size=256, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
MAX_LENGTH = 16


def byte_tokens(text: str, n_tokens: int) -> np.ndarray:
    """The first `n_tokens` bytes of `text` repeated as often as needed, as uint16 token ids."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    reps = -(-n_tokens // len(raw))
    return np.tile(raw, reps)[:n_tokens].astype(np.uint16)


def make_corpus(root: str | Path, train_tokens: int, val_tokens: int, shard_tokens: int = 300,
                train_text: str = TEXT, val_text: str = VAL_TEXT) -> Path:
    """`root/train` and `root/val` shard directories (several shards, so windows cross files)."""
    root = Path(root)
    for split, text, n in (("train", train_text, train_tokens), ("val", val_text, val_tokens)):
        write_shards(root / split, [byte_tokens(text, n)], tokenizer="bytes", vocab_size=256,
                     shard_tokens=shard_tokens)
    return root


def windows_tokens(n_windows: int, max_length: int = MAX_LENGTH) -> int:
    """Tokens that give exactly `n_windows` non-overlapping windows of `max_length` (+1 target)."""
    return n_windows * max_length + 1


def tiny_model(seed: int = 0, **overrides: Any) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(ModelConfig(**{**TINY_MODEL, **overrides}))


def base_config(**overrides: Any) -> dict[str, Any]:
    """A TrainConfig dict for a short, fully logged, quiet run."""
    cfg = dict(micro_batch_size=4, global_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
               max_steps=6, eval_interval=2, eval_batches=2, log_interval=1, resume="never")
    cfg.update(overrides)
    return cfg


def run_training(data_dir: str | Path, out_dir: str | Path, cfg: dict[str, Any], *,
                 model: GPTModel | None = None, model_overrides: dict[str, Any] | None = None,
                 callbacks: tuple = (), run_info: dict[str, Any] | None = None,
                 ctx: DistContext = DistContext(), max_length: int = MAX_LENGTH) -> TrainResult:
    """Train a tiny model on `data_dir/{train,val}` with the real loaders and `train()`."""
    tcfg = TrainConfig(**cfg)
    model = model if model is not None else tiny_model(**(model_overrides or {}))
    data_dir = Path(data_dir)
    common = dict(max_length=max_length, batch_size=tcfg.micro_batch_size, seed=1337,
                  rank=ctx.rank, world_size=ctx.world_size, vocab_size=model.cfg.vocab_size)
    train_loader = create_dataloader(data_dir / "train", train=True, **common)
    val_loader = create_dataloader(data_dir / "val", train=False, **common)
    return train(model, tcfg, train_loader, val_loader, out_dir, callbacks=callbacks,
                 run_info=run_info, device=torch.device("cpu"), ctx=ctx, max_length=max_length,
                 progress=False)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cfg", required=True, help="TrainConfig fields as JSON")
    parser.add_argument("--model", default="{}", help="ModelConfig overrides as JSON")
    parser.add_argument("--run-info", default="{}")
    parser.add_argument("--records", required=True, help="JSON file for the records; `.rank<N>` added under DDP")
    parser.add_argument("--fast-clock-rank", type=int, default=None,
                        help="this rank's clock runs 3x fast (ranks disagree about elapsed time)")
    parser.add_argument("--exit-after-saves", type=int, default=None,
                        help="every process exits (status 17) right after the Nth save of `last`, as if killed")
    parser.add_argument("--kill-rank", type=int, default=None,
                        help="with --exit-after-saves: only this rank dies, by SIGKILL, in torchrun's first attempt")
    args = parser.parse_args()

    ctx = init_distributed(torch.device("cpu"))
    if args.fast_clock_rank is not None and ctx.rank == args.fast_clock_rank:
        real = train_module.time.perf_counter
        train_module.time = types.SimpleNamespace(perf_counter=lambda: 3.0 * real())

    # Count checkpoint writes per process: under DDP only rank 0 may write.
    saves: list[str] = []
    real_save = train_module.save_checkpoint

    def counting_save(path, *a, **k):  # noqa: ANN001, ANN002, ANN003
        saves.append(Path(path).name)
        return real_save(path, *a, **k)

    train_module.save_checkpoint = counting_save
    if args.exit_after_saves is not None:
        real_last_save, last_saves = train_module._Checkpoints.save, []

        def save_then_exit(self, path, state):  # noqa: ANN001
            real_last_save(self, path, state)
            if path == self.last:
                last_saves.append(path)
            if len(last_saves) == args.exit_after_saves:
                if args.kill_rank is None:
                    os._exit(17)  # no cleanup, no flush: what a kill leaves
                if ctx.rank == args.kill_rank and ctx.restarts == 0:
                    os.kill(os.getpid(), signal.SIGKILL)

        train_module._Checkpoints.save = save_then_exit
    records: list[dict] = []
    outcome: dict[str, Any] = {}
    try:
        result = run_training(args.data, args.out, json.loads(args.cfg), model_overrides=json.loads(args.model),
                              callbacks=(records.append,), run_info=json.loads(args.run_info), ctx=ctx)
        outcome = dict(stop_reason=result.stop_reason, step=result.state.step)
    finally:
        path = Path(args.records)
        if ctx.enabled:
            path = path.with_name(f"{path.name}.rank{ctx.rank}")
        path.write_text(json.dumps(dict(records=records, saves=saves, world_size=ctx.world_size,
                                        restarts=ctx.restarts, **outcome)))
    if ctx.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main()
