"""Sequence classification: a class head on the pretrained model's features of a text.

A causal model's feature at position t has seen tokens 0..t, so the last real
token of a text is the one that has read all of it (`pooling="last"`, LLMs-from-scratch's
choice); `pooling="mean"` averages the features of every real token instead, so each
token's view of its prefix votes. On the default run (gpt2-tiny pretrained on
Shakespeare, spam) mean pooling is the better feature: `make sweep-finetune`'s table
in the README. Batches are right-padded with end-of-text to their longest row and
carry each row's length; only positions before `length` are read. Padding sits after
them, and causal attention never lets a position see later ones, so padding cannot
change a prediction (up to float rounding): no attention mask is needed.

Training plugs into `minigpt.train.train` with `loss_fn=ClassificationLoss()` and
loaders from `create_task_loader(rows, batch_size, collate_classification, ...)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import ModelConfig
from minigpt.io import DataError, atomic_path
from minigpt.model import GPTModel
from minigpt.modules import gpt2_init_
from minigpt.tasks.batches import Row, pad_right
from minigpt.tokenizer import EOT_ID
from minigpt.utils import eval_mode


Pooling = Literal["last", "mean"]


class SequenceClassifier(nn.Module):
    """A pretrained `GPTModel` (`backbone`) with a new linear head (`head`) on its final features.

    The backbone's vocabulary head is not used. Tied (as in every preset and in GPT-2),
    it is the token embedding, which the classifier still uses for the lookup; untied,
    it is a passenger: not counted by `num_parameters`, never made trainable by
    `set_trainable`.
    """

    def __init__(self, backbone: GPTModel, n_classes: int, pooling: Pooling = "last") -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.cfg.emb_dim, n_classes)  # emb_dim -> n_classes
        gpt2_init_(self.head)

    @property
    def cfg(self) -> ModelConfig:
        """The backbone's config (the trainer reads `context_length`, FLOPs code the sizes)."""
        return self.backbone.cfg

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits `(batch, n_classes)` of right-padded token ids `(batch, seq)` whose
        rows hold `lengths (batch,)` real tokens each."""
        hidden = self.backbone.hidden_states(idx)  # (batch, seq, emb_dim)
        if self.pooling == "last":
            rows = torch.arange(idx.shape[0], device=idx.device)  # (batch,)
            features = hidden[rows, lengths - 1]  # (batch, emb_dim): each row's last real token
        else:
            real = torch.arange(idx.shape[1], device=idx.device) < lengths[:, None]  # (batch, seq)
            summed = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(dim=1)  # (batch, emb_dim)
            features = summed / lengths.unsqueeze(-1).to(hidden.dtype)  # (batch, emb_dim): mean of real tokens
        return self.head(features)  # (batch, n_classes)

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Unique parameters the classifier computes with (see the class docstring)."""
        n = self.backbone.num_parameters(exclude_position_embeddings)
        if not self.cfg.tie_weights:
            n -= self.backbone.out_head.weight.numel()
        return n + sum(p.numel() for p in self.head.parameters())


def collate_classification(rows: list[Row], *,
                           pad_id: int = EOT_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(idx (batch, longest), lengths (batch,), labels (batch,))` from rows with `ids` and `label_id`.

    Padded to the batch's longest row, not to a fixed length: the classifier reads
    each row at `length - 1`, so the padding's amount (and its id) changes nothing
    but the compute spent on it, and short batches are cheap.
    """
    lengths = torch.tensor([len(row["ids"]) for row in rows])  # (batch,)
    if bool((lengths == 0).any()):
        # length 0 would read position -1, i.e. the last padding token, without any error
        raise DataError("classification: a row has no token ids")
    idx = pad_right([row["ids"] for row in rows], pad_id)  # (batch, longest)
    labels = torch.tensor([row["label_id"] for row in rows])  # (batch,)
    return idx, lengths, labels


class ClassificationLoss:
    """Mean cross-entropy of `(idx, lengths, labels)` batches (a `minigpt.train.LossFn`)."""

    def __call__(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        idx, lengths, labels = (t.to(device, non_blocking=True) for t in batch)
        logits = model(idx, lengths)  # (batch, n_classes)
        return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[tuple[torch.Tensor, ...]],
            device: torch.device) -> tuple[list[int], list[int]]:
    """True labels and predicted classes (argmax) of every row the loader serves, in its order."""
    labels: list[int] = []
    predictions: list[int] = []
    with eval_mode(model):
        for idx, lengths, batch_labels in loader:
            logits = model(idx.to(device), lengths.to(device))  # (batch, n_classes)
            predictions += logits.argmax(dim=-1).tolist()
            labels += batch_labels.tolist()
    return labels, predictions


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, and 0.0 for 0 / 0 (a class never predicted, or absent)."""
    return numerator / denominator if denominator else 0.0


def classification_metrics(labels: Sequence[int], predictions: Sequence[int],
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix.

    `confusion_matrix[i][j]` counts rows of true class i predicted as j. A ratio with a
    zero denominator is 0.0: the precision of a class never predicted, the recall of a
    class absent from `labels`, the F1 of a class with precision + recall = 0 (as
    scikit-learn's `zero_division=0`). Macro scores are unweighted means over classes
    (macro F1 is the mean of the per-class F1s, not the F1 of macro precision and recall).
    """
    n_classes = len(class_names)
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for true, predicted in zip(labels, predictions):
        if not (0 <= true < n_classes and 0 <= predicted < n_classes):
            raise ValueError(f"class ids must be in [0, {n_classes}), got label {true}, prediction {predicted}")
        matrix[true][predicted] += 1

    per_class = {}
    for k, name in enumerate(class_names):
        hits = matrix[k][k]
        precision = _ratio(hits, sum(row[k] for row in matrix))  # of the rows predicted k
        recall = _ratio(hits, sum(matrix[k]))  # of the rows truly k
        per_class[name] = {"precision": precision, "recall": recall,
                           "f1": _ratio(2 * precision * recall, precision + recall), "support": sum(matrix[k])}
    return {
        "accuracy": _ratio(sum(matrix[k][k] for k in range(n_classes)), len(labels)),
        "macro": {key: sum(scores[key] for scores in per_class.values()) / n_classes
                  for key in ("precision", "recall", "f1")},
        "per_class": per_class,
        "confusion_matrix": matrix,
        "class_names": list(class_names),
    }


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path) -> Path:
    """Write the confusion matrix as a PNG heat map with counts (rows: true, columns: predicted).

    Needs matplotlib (the `pipeline` extra), imported here so the library does not.
    A bare `Figure` (no pyplot) leaves matplotlib's global backend and figure list alone.
    """
    from matplotlib.figure import Figure

    n = len(class_names)
    fig = Figure(figsize=(1.2 * n + 2.5, 1.2 * n + 2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title="confusion matrix")
    threshold = max(max(row) for row in matrix) / 2  # white text on the dark cells
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
