"""Exact resume of a finetune: a run interrupted at step k and resumed from its `last`
checkpoint ends with the very weights, AdamW state, RNG, loader position and history of
one uninterrupted run, for both tasks and for LoRA adapters (whose checkpoint holds only
the adapters and the head: the frozen base comes from its own weights).

The pieces are the ones `pipeline.finetune` plugs into `train()`: a `SequenceClassifier`
with `ClassificationLoss` and a val-accuracy `eval_metrics`, or the language model with
`LanguageModelLoss` over `collate_instructions` batches; both served by
`create_task_loader` (seeded, resumable). Only the backbone is tiny (byte vocabulary, as
in train_helpers.py), so each run takes well under a second.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt.checkpoint import read_checkpoint
from minigpt.config import LoraConfig, TrainConfig
from minigpt.tasks.batches import create_task_loader
from minigpt.tasks.classification import ClassificationLoss, SequenceClassifier, collate_classification
from minigpt.tasks.instruction import collate_instructions
from minigpt.tasks.lora import add_lora
from minigpt.tasks.trainable import set_trainable
from minigpt.train import LanguageModelLoss, train
from pipeline.finetune import val_accuracy
from train_helpers import TEXT, VAL_TEXT, base_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0  # byte vocabulary: GPT-2's end-of-text id (50256) is not in it
CONTEXT = 40
MODEL = dict(context_length=CONTEXT, dropout=0.1)  # dropout draws from the RNG: resuming must restore it
# 24 training rows in batches of 2, 2 micro-batches a step: 6 steps an epoch, so 14 steps cross two epochs.
CFG = base_config(micro_batch_size=2, global_batch_size=4, max_steps=14, eval_interval=3, checkpoint_interval=1,
                  lr_decay_steps=14, resume="auto")
RUN_INFO = {"data_sha256": "d" * 64, "tokenizer_sha256": "t" * 64}


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chunks(text: str, words: int = 3) -> list[str]:
    """`text` cut into runs of `words` words."""
    split = text.split()
    return [" ".join(split[i : i + words]) for i in range(0, len(split), words)]


def classification_rows() -> tuple[list[dict], list[dict]]:
    """Three-word runs of real English labelled by their book (0 Dickens, 1 Melville, 2 Austen):
    8 of each to train on, 4 of each to validate."""
    dickens, melville = TEXT.split("Call me Ishmael")
    books = [_chunks(book) for book in (dickens, "Call me Ishmael" + melville, VAL_TEXT)]
    def rows(part: slice) -> list[dict]:
        return [{"ids": _ids(chunk), "label_id": label} for label, chunks in enumerate(books) for chunk in chunks[part]]

    return rows(slice(1, 16, 2)), rows(slice(0, 8, 2))


def instruction_rows() -> tuple[list[dict], list[dict]]:
    """'Add a and b.' -> 'a+b', end-of-text (here PAD); prompt and response as the data stage splits them."""
    def row(a: int, b: int) -> dict:
        return {"prompt_ids": _ids(f"Add {a} and {b}.\n"), "response_ids": _ids(str(a + b)) + [PAD]}

    pairs = [(a, b) for a in range(1, 8) for b in range(1, 6)]
    return [row(a, b) for a, b in pairs[:24]], [row(a, b) for a, b in pairs[24:32]]


def classifier() -> SequenceClassifier:
    model = SequenceClassifier(tiny_model(**MODEL), 3)
    set_trainable(model, "last_block")  # frozen parameters: the optimizer must hold exactly the others
    return model


def lora_classifier() -> SequenceClassifier:
    """The base weights come from `tiny_model`'s seed (as a finetune's from its base checkpoint),
    adapters (with dropout of their own) and head from the RNG, or from the checkpoint."""
    model = SequenceClassifier(tiny_model(**MODEL), 3)
    add_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    return model


TASKS: dict[str, dict[str, Any]] = {
    "classification": dict(rows=classification_rows, model=classifier, loss_fn=ClassificationLoss,
                           collate=functools.partial(collate_classification, pad_id=PAD)),
    "lora": dict(rows=classification_rows, model=lora_classifier, loss_fn=ClassificationLoss,
                 collate=functools.partial(collate_classification, pad_id=PAD)),
    "instruction": dict(rows=instruction_rows, model=lambda: tiny_model(**MODEL),
                        loss_fn=LanguageModelLoss,
                        collate=functools.partial(collate_instructions, mask_prompt=True, pad_id=PAD)),
}


class Interrupted(Exception):
    """Raised from a callback: the process 'dies' mid-run."""


def finetune(task: str, out: Path, model: torch.nn.Module | None = None,
             callbacks: tuple[Callable[[dict], None], ...] = ()) -> list[dict]:
    """Train `task` into `out` as `pipeline.finetune` does (resume=auto); its records."""
    spec = TASKS[task]
    model = model if model is not None else spec["model"]()
    train_rows, val_rows = spec["rows"]()
    cfg = TrainConfig(**CFG)
    train_loader, val_loader = (create_task_loader(rows, cfg.micro_batch_size, spec["collate"], train=is_train,
                                                   seed=cfg.seed)
                                for rows, is_train in ((train_rows, True), (val_rows, False)))
    # The stage's own val-accuracy hook, as the finetune stage passes it.
    eval_metrics = val_accuracy(val_loader, torch.device("cpu")) if task != "instruction" else None

    records: list[dict] = []
    train(model, cfg, train_loader, val_loader, out, loss_fn=spec["loss_fn"](), eval_metrics=eval_metrics,
          callbacks=(records.append, *callbacks), run_info=RUN_INFO, device=torch.device("cpu"),
          max_length=CONTEXT, progress=False)
    return records


def interrupted_then_resumed(task: str, out: Path, dies_at_step: int) -> list[dict]:
    """The records of a run that 'dies' during `dies_at_step` (those its `last` checkpoint
    holds) followed by those of its resumption in a fresh model."""
    records: list[dict] = []

    def die(record: dict) -> None:
        # Train records come after the optimizer step and before that step's checkpoint,
        # so the last checkpoint on disk is from the step before.
        if record["kind"] == "train" and record["step"] == dies_at_step:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(task, out, callbacks=(records.append, die))
    before = [r for r in records if r["step"] < dies_at_step]
    torch.manual_seed(999)  # whatever the process did before: the checkpoint decides
    fresh = TASKS[task]["model"]()  # other initial weights, other head
    after = finetune(task, out, model=fresh)
    assert min(r["step"] for r in after) == dies_at_step  # it continued, it did not start over
    return before + after


def losses(records: list[dict]) -> list[tuple]:
    """Every loss and task metric of the records, in order (not their timings)."""
    keys = ("kind", "step", "tokens", "train_loss", "lr", "grad_norm", "val_loss", "best_val_loss", "val_accuracy")
    return [tuple(r.get(k) for k in keys) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """The reference run of each task, in one go."""
    runs = {}
    for task in TASKS:
        out = tmp_path_factory.mktemp(task)
        runs[task] = out, finetune(task, out)
        assert max(r["step"] for r in runs[task][1]) == CFG["max_steps"]
    return runs


def assert_same_run(reference: tuple[Path, list[dict]], out: Path, records: list[dict]) -> None:
    ref_out, ref_records = reference
    assert losses(records) == losses(ref_records)  # exact float equality, every record
    (ref_tensors, ref_meta), (tensors, meta) = (read_checkpoint(d / "last.safetensors") for d in (ref_out, out))
    assert ref_tensors.keys() == tensors.keys()
    assert any(k.startswith("optim") for k in tensors), sorted(tensors)[:10]  # AdamW moments are compared too
    different = [k for k in tensors if not torch.equal(tensors[k], ref_tensors[k])]
    assert not different, f"not bit-identical after resume: {different[:5]}"  # weights, AdamW moments, RNG
    assert meta["rng"] == ref_meta["rng"] and meta["optimizer_param_groups"] == ref_meta["optimizer_param_groups"]
    state, ref_state = json.loads(meta["state"]), json.loads(ref_meta["state"])
    # step, tokens, best loss, loader position; and the history the checkpoint carries
    assert {**state, "train_time": 0, "history": []} == {**ref_state, "train_time": 0, "history": []}
    assert losses(state["history"]) == losses(ref_records)


def test_the_tasks_learn_something(uninterrupted):
    """The reference runs are real finetunes: val accuracy is reported, the loss moves."""
    for task, (_, records) in uninterrupted.items():
        train_losses = [r["train_loss"] for r in records if r["kind"] == "train"]
        assert train_losses[-1] < train_losses[0], task
        evals = [r for r in records if r["kind"] == "eval"]
        assert [r["step"] for r in evals] == [3, 6, 9, 12, 14]
        if task != "instruction":
            assert all(0 <= r["val_accuracy"] <= 1 for r in evals)
        else:
            assert all("val_accuracy" not in r for r in evals)


# Mid-epoch, at an epoch's last step (6), right after an evaluation (10: 9 evaluated), and the last step.
@pytest.mark.parametrize("dies_at_step", [2, 7, 10, 14])
@pytest.mark.parametrize("task", list(TASKS))
def test_an_interrupted_finetune_resumes_bit_identically(task, dies_at_step, uninterrupted, tmp_path):
    out = tmp_path / "run"
    records = interrupted_then_resumed(task, out, dies_at_step)
    assert_same_run(uninterrupted[task], out, records)


def test_a_lora_checkpoint_holds_only_what_trains(uninterrupted):
    out, _ = uninterrupted["lora"]
    tensors, _ = read_checkpoint(out / "last.safetensors")
    weights = {k.removeprefix("model.") for k in tensors if k.startswith("model.")}
    assert weights and all(k.endswith((".lora_a", ".lora_b")) or k.startswith("head.") for k in weights)
    assert len(weights) == 2 * 4 * 2 + 2  # 2 blocks x 4 targets x (A, B); the head's weight and bias


@pytest.mark.parametrize("task", list(TASKS))
def test_the_check_would_catch_a_loader_that_restarts_its_epoch(task, uninterrupted, tmp_path, monkeypatch):
    """The comparison is sensitive: a loader position not restored gives other batches."""
    from minigpt.data.loader import ResumableDataLoader

    monkeypatch.setattr(ResumableDataLoader, "load_state_dict", lambda self, state: None)
    out = tmp_path / "run"
    records = interrupted_then_resumed(task, out, dies_at_step=5)
    assert losses(records) != losses(uninterrupted[task][1])
